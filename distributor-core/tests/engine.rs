//! Engine behaviour, driven by the fake distributor. Most tests run on tokio's paused clock, so
//! hours of durable timers pass instantly and deterministically; the SQLite crash tests run in
//! real time with short scripts (sqlx's pool keeps real-time timeouts).

use std::sync::Arc;
use std::time::Duration;

use distributor_core::engine::{Actor, CancelCause, Clock};
use distributor_core::store::{ListFilter, MemoryStore, SqliteStore, Store};
use distributor_core::testing::{Call, FakeBackend, FakeConfig};
use distributor_core::*;
use serde_json::{Value, json};

fn registry() -> Registry {
    Registry::new().register::<FakeConfig>().unwrap()
}

fn config(backend: &str) -> DistributorsConfig {
    let doc = json!({"distributors": {
        "fake": {"kind": "fake", "backend": backend},
        "poller": {"kind": "fake", "backend": backend, "push": false, "poll_interval_ms": 1000},
        "default": {"alias": "fake"},
    }});
    DistributorsConfig::from_value(&registry(), "test", &doc).unwrap()
}

fn fast_settings() -> Settings {
    Settings {
        poll_interval: Duration::from_millis(50),
        hedge_poll_interval: Duration::from_millis(200),
        cancel_poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..Settings::default()
    }
}

async fn engine_on(backend: &str, store: Arc<dyn Store>, clock: Clock) -> Engine {
    Engine::builder()
        .registry(registry())
        .distributors(config(backend))
        .store_arc(store)
        .clock(clock)
        .build()
        .await
        .unwrap()
}

async fn engine(backend: &str) -> (Engine, FakeBackend, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let e = engine_on(backend, store.clone(), Clock::new()).await;
    (e, FakeBackend::named(backend), store)
}

fn task(distributor: &str, script: Value) -> Task {
    Task::new(distributor, script)
}

/// Polls `f` until it is true, advancing (paused or real) time in small steps; panics past the
/// deadline.
async fn until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn states(h: &[engine::HistoryEntry]) -> Vec<State> {
    let mut v: Vec<State> = h.iter().map(|e| e.to).collect();
    v.dedup();
    v
}

fn kind_of(r: &ExecutionRecord) -> Option<AbnormalKind> {
    r.outcome.as_ref().and_then(Outcome::abnormal_kind)
}

#[tokio::test(start_paused = true)]
async fn lifecycle_goes_through_every_state_with_history_and_events() {
    let (e, fake, _) = engine("lifecycle").await;
    let mut events = e.subscribe();
    let id = e.submit(task("fake", json!({"pending_for_ms": 100, "run_for_ms": 500, "outcome": {"outcome": "succeeded", "data": {"x": 1}}}))).await.unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(
        rec.outcome,
        Some(Outcome::Succeeded {
            data: json!({"x": 1})
        })
    );
    let h = e.history(id).await.unwrap();
    assert_eq!(
        states(&h),
        [
            State::Queued,
            State::Dispatching,
            State::Pending,
            State::Running,
            State::Succeeded
        ]
    );
    assert!(
        h.windows(2).all(|w| w[0].version < w[1].version),
        "versions increase: {h:?}"
    );
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(match ev {
            Event::Created { .. } => "created",
            Event::Dispatched { .. } => "dispatched",
            Event::Started { .. } => "started",
            Event::Finished { .. } => "finished",
            _ => "other",
        });
    }
    assert_eq!(seen, ["created", "dispatched", "started", "finished"]);
    assert_eq!(fake.starts(&rec.request_id), 1);
}

#[tokio::test(start_paused = true)]
async fn submit_rejects_unknown_distributors_and_bad_payloads() {
    let (e, _, _) = engine("submit-errors").await;
    let err = e.submit(task("fkae", json!({}))).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownDistributor { .. }), "{err}");
    assert!(
        msg.contains("did you mean `fake`") && msg.contains("`poller`"),
        "{msg}"
    );
    let err = e
        .submit(task("fake", json!({"run_for_ms": "soon", "pushs": "drop"})))
        .await
        .unwrap_err();
    let Error::Validation(v) = err else {
        panic!("{err}")
    };
    let pointers: Vec<_> = v.violations.iter().map(|v| v.pointer.as_str()).collect();
    assert_eq!(pointers, ["/pushs", "/run_for_ms"], "{v}");
    assert_eq!(v.violations[0].suggestion.as_deref(), Some("pushes"));
    // Aliases resolve to their instance, and the record names the instance.
    let id = e.submit(task("default", json!({}))).await.unwrap();
    assert_eq!(e.wait(id).await.unwrap().distributor.as_str(), "fake");
}

#[tokio::test(start_paused = true)]
async fn lost_pushes_are_found_by_polling() {
    let (e, fake, _) = engine("lost-pushes").await;
    let id = e
        .submit(task("fake", json!({"run_for_ms": 1000, "pushes": "drop"})))
        .await
        .unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(rec.state, State::Succeeded);
    let h = e.history(id).await.unwrap();
    assert_eq!(
        h.last().unwrap().actor,
        Actor::Timer,
        "found by a poll: {h:?}"
    );
    assert!(
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Status { .. } | Call::StatusBatch { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn pull_only_distributors_are_polled_at_their_hint() {
    let (e, _, _) = engine("pull-only").await;
    let id = e
        .submit(task(
            "poller",
            json!({"pending_for_ms": 500, "run_for_ms": 2500}),
        ))
        .await
        .unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(rec.poll_interval, Some(Duration::from_secs(1)));
    let h = e.history(id).await.unwrap();
    assert_eq!(
        states(&h),
        [
            State::Queued,
            State::Dispatching,
            State::Pending,
            State::Running,
            State::Succeeded
        ]
    );
    // Finished at 3 s of work; the hint is 1 s, so it is seen within one interval of that.
    let finished = h.last().unwrap().at;
    let created = h.first().unwrap().at;
    assert!(
        created.until(finished) <= Duration::from_millis(4100),
        "{:?}",
        created.until(finished)
    );
}

#[tokio::test(start_paused = true)]
async fn duplicated_and_reordered_pushes_never_regress_state() {
    let (e, fake, _) = engine("dup-reorder").await;
    for mode in ["duplicate", "reorder"] {
        let id = e
            .submit(task("fake", json!({"run_for_ms": 100, "pushes": mode})))
            .await
            .unwrap();
        let rec = e.wait(id).await.unwrap();
        assert_eq!(rec.state, State::Succeeded, "{mode}");
        let h = e.history(id).await.unwrap();
        let terminal_at = h.iter().position(|e| e.to.is_terminal()).unwrap();
        assert_eq!(
            terminal_at,
            h.len() - 1,
            "{mode}: nothing after terminal: {h:?}"
        );
        until("the late pushes to be delivered", || async {
            fake.pushes().iter().filter(|(x, _)| *x == id).count() >= 2
        })
        .await;
        // On the paused clock this advances only once every task is idle, i.e. after the
        // engine has processed (and dropped) the late pushes: not a guess at timing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            e.get(id).await.unwrap().version,
            rec.version,
            "{mode}: late pushes changed the record"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn late_stale_and_replayed_pushes_are_rejected_and_change_nothing() {
    let (e, fake, _) = engine("stale").await;
    let id = e
        .submit(task(
            "fake",
            json!({"run_for_ms": 1000, "outcome": {"outcome": "succeeded"}}),
        ))
        .await
        .unwrap();
    until("the running push", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    let pushes: Vec<Notification> = fake
        .pushes()
        .into_iter()
        .filter(|(x, _)| *x == id)
        .map(|(_, n)| n)
        .collect();
    let running = pushes[0].clone();
    let before = e.get(id).await.unwrap();
    let err = e.notify(id, running.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotificationRejected(NotificationRejection::Stale)
        ),
        "{err}"
    );
    assert_eq!(e.get(id).await.unwrap().version, before.version);
    e.wait(id).await.unwrap();
    let err = e.notify(id, running).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotificationRejected(NotificationRejection::Terminal)
        ),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_submits_once_across_retries_races_and_restarts() {
    let (e, _, store) = engine("idem").await;
    let t = || task("fake", json!({"hang": true}));
    let (a, created) = e.submit_idempotent("req-1", t()).await.unwrap();
    assert!(created);
    let (again, created) = e.submit_idempotent("req-1", t()).await.unwrap();
    assert_eq!((again, created), (a, false));
    // Concurrent first submissions of one key create one execution.
    let (x, y) = tokio::join!(
        e.submit_idempotent("req-2", t()),
        e.submit_idempotent("req-2", t())
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.0, y.0);
    assert!(x.1 ^ y.1, "exactly one created it: {x:?} {y:?}");
    assert!(e.submit_idempotent("", t()).await.is_err());
    let all = e.list(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    e.shutdown().await;
    // The key is durable: a new engine on the same store answers the first id.
    let e2 = engine_on("idem", store, Clock::new()).await;
    let (b, created) = e2.submit_idempotent("req-1", t()).await.unwrap();
    assert_eq!((b, created), (a, false));
    assert_eq!(e2.list(&ListFilter::default()).await.unwrap().len(), 2);
    for id in [a, x.0] {
        e2.cancel(id, "end of test").await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_sequence_is_refused_and_does_not_poison_later_pushes() {
    let (e, fake, _) = engine("seqjump").await;
    let id = e.submit(task("fake", json!({"hang": true}))).await.unwrap();
    until("the running push", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    let running = fake
        .pushes()
        .into_iter()
        .find(|(x, _)| *x == id)
        .map(|(_, n)| n)
        .unwrap();
    let with_seq = |seq: u64, msg: &str| {
        let mut n = running.clone();
        n.sequence = Some(seq);
        n.message_id = Some(msg.into());
        n
    };
    let err = e.notify(id, with_seq(u64::MAX, "huge")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotificationRejected(NotificationRejection::SequenceJump)
        ),
        "{err}"
    );
    // The next genuine update (a small step past the last accepted one) is still accepted.
    e.notify(id, with_seq(5, "next")).await.unwrap();
    let err = e.notify(id, with_seq(4, "older")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotificationRejected(NotificationRejection::Stale)
        ),
        "{err}"
    );
    e.cancel(id, "end of test").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn forged_expired_and_misdirected_tokens_are_rejected() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let settings = Settings {
        token_ttl: Duration::from_secs(60),
        ..Settings::default()
    };
    let e = Engine::builder()
        .registry(registry())
        .distributors(config("tokens"))
        .store_arc(store)
        .settings(settings)
        .build()
        .await
        .unwrap();
    let fake = FakeBackend::named("tokens");
    let a = e.submit(task("fake", json!({"hang": true}))).await.unwrap();
    let b = e.submit(task("fake", json!({"hang": true}))).await.unwrap();
    until("both running", || async { fake.pushes().len() >= 2 }).await;
    let token_of = |id: ExecutionId| {
        fake.pushes()
            .into_iter()
            .find(|(x, _)| *x == id)
            .unwrap()
            .1
            .attributes["auth_token"]
            .clone()
    };
    let reject = |n: Notification, id| {
        let e = e.clone();
        async move {
            match e.notify(id, n).await {
                Err(Error::NotificationRejected(r)) => r,
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    };
    let with_token = |t: &str, seq: u64| {
        let mut n = Notification::json(
            &serde_json::to_value(Status::Finished(Outcome::Succeeded {
                data: json!("forged"),
            }))
            .unwrap(),
        );
        n.attributes.insert("auth_token".into(), t.into());
        n.sequence = Some(seq);
        n
    };
    let before = e.get(a).await.unwrap().version;
    assert_eq!(
        reject(Notification::default(), a).await,
        NotificationRejection::MissingToken
    );
    assert_eq!(
        reject(with_token("v1.1.99999999999999.00ff", 9), a).await,
        NotificationRejection::Forged
    );
    assert_eq!(
        reject(with_token(&token_of(b), 9), a).await,
        NotificationRejection::WrongExecution
    );
    assert_eq!(
        reject(with_token(&token_of(a), 9), ExecutionId(999)).await,
        NotificationRejection::WrongExecution
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        reject(with_token(&token_of(a), 9), a).await,
        NotificationRejection::Expired
    );
    let after = e.get(a).await.unwrap();
    assert_eq!(after.state, State::Running);
    assert_eq!(after.version, before, "a rejected push changed the record");
}

#[tokio::test(start_paused = true)]
async fn transient_run_errors_are_retried_then_succeed_once() {
    let (e, fake, _) = engine("transient").await;
    let id = e
        .submit(task("fake", json!({"transient_run_errors": 3})))
        .await
        .unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(fake.starts(&rec.request_id), 1);
    let runs = fake
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Run { execution_id, .. } if *execution_id == id))
        .count();
    assert_eq!(runs, 4);
    let notes = e
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.reason.contains("transiently"))
        .count();
    assert_eq!(notes, 3);
}

#[tokio::test(start_paused = true)]
async fn too_many_transient_run_errors_end_rejected() {
    let (e, _, _) = engine("transient-forever").await;
    let id = e
        .submit(task("fake", json!({"transient_run_errors": 1000})))
        .await
        .unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(kind_of(&rec), Some(AbnormalKind::Rejected));
    assert!(format!("{:?}", rec.outcome).contains("gave up after 10 transient run errors"));
}

#[tokio::test(start_paused = true)]
async fn permanent_run_error_is_rejected_with_its_text() {
    let (e, _, _) = engine("permanent").await;
    let id = e
        .submit(task(
            "fake",
            json!({"permanent_run_error": "partition gpu does not exist"}),
        ))
        .await
        .unwrap();
    let rec = e.wait(id).await.unwrap();
    match rec.outcome {
        Some(Outcome::Abnormal {
            kind: AbnormalKind::Rejected,
            reason,
        }) => assert!(reason.contains("partition gpu does not exist"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_outcomes_start_new_attempts_within_the_per_kind_budget() {
    let (e, fake, _) = engine("retries").await;
    let mut t = task(
        "fake",
        json!({"run_for_ms": 10, "outcome": {"outcome": "abnormal", "kind": "failed", "reason": "exit 1"}}),
    );
    t.retry = RetryPolicy::attempts(5);
    t.retry.per_kind.insert(AbnormalKind::Failed, 2);
    let id = e.submit(t).await.unwrap();
    let last = e.wait_task(id).await.unwrap();
    assert_eq!(last.attempt, Attempt(3), "1 try + 2 retries of Failed");
    assert_eq!(kind_of(&last), Some(AbnormalKind::Failed));
    assert_eq!(last.task_id, TaskId(id.0));
    assert_eq!(
        last.previous.as_ref().and_then(Outcome::abnormal_kind),
        Some(AbnormalKind::Failed)
    );
    let all = e
        .list(&ListFilter {
            task_id: Some(TaskId(id.0)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let request_ids: std::collections::HashSet<_> =
        all.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(request_ids.len(), 3, "each attempt has its own request id");
    assert!(all.iter().all(|r| fake.starts(&r.request_id) == 1));
    // Non-retryable kinds are never retried.
    let mut t = task(
        "fake",
        json!({"outcome": {"outcome": "abnormal", "kind": "result_malformed"}}),
    );
    t.retry = RetryPolicy::attempts(5);
    let id = e.submit(t).await.unwrap();
    assert_eq!(e.wait_task(id).await.unwrap().attempt, Attempt(1));
}

#[tokio::test(start_paused = true)]
async fn start_deadline_expires_stuck_pending_work_and_cancels_it() {
    let (e, fake, _) = engine("expired").await;
    let mut t = task("fake", json!({"pending_for_ms": 3_600_000}));
    t.timeouts.start = Some(Duration::from_secs(10));
    let id = e.submit(t).await.unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(kind_of(&rec), Some(AbnormalKind::Expired));
    assert!(
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Cancel { .. })),
        "the stuck work was cancelled"
    );
}

#[tokio::test(start_paused = true)]
async fn run_deadline_times_out_and_stops_the_work() {
    let (e, fake, _) = engine("timed-out").await;
    let mut t = task("fake", json!({"run_for_ms": 3_600_000}));
    t.timeouts.run = Some(Duration::from_secs(5));
    let id = e.submit(t).await.unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(
        kind_of(&rec),
        Some(AbnormalKind::TimedOut),
        "{:?}",
        rec.outcome
    );
    assert!(
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Cancel { .. }))
    );
    assert_eq!(rec.cancel, Some(CancelCause::RunTimeout));
}

#[tokio::test(start_paused = true)]
async fn cancel_of_pending_running_finished_and_unknown() {
    let (e, fake, _) = engine("cancel").await;
    let pending = e
        .submit(task("fake", json!({"pending_for_ms": 3_600_000})))
        .await
        .unwrap();
    let running = e.submit(task("fake", json!({"hang": true}))).await.unwrap();
    until("running", || async {
        e.get(running).await.unwrap().state == State::Running
    })
    .await;
    until("pending", || async {
        e.get(pending).await.unwrap().state == State::Pending
    })
    .await;
    for id in [pending, running] {
        e.cancel(id, "not needed").await.unwrap();
        e.cancel(id, "twice is fine").await.unwrap();
        let rec = e.wait(id).await.unwrap();
        assert_eq!(
            kind_of(&rec),
            Some(AbnormalKind::Cancelled),
            "{:?}",
            rec.outcome
        );
        assert!(states(&e.history(id).await.unwrap()).contains(&State::Cancelling));
    }
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| matches!(c, Call::Cancel { .. }))
            .count(),
        2,
        "one cancel call each"
    );
    // Finished: Ok, nothing changes.
    let done = e.submit(task("fake", json!({}))).await.unwrap();
    let rec = e.wait(done).await.unwrap();
    e.cancel(done, "too late").await.unwrap();
    assert_eq!(e.get(done).await.unwrap(), rec);
    // Unknown: a typed error.
    assert!(matches!(
        e.cancel(ExecutionId(4242), "x").await,
        Err(Error::UnknownExecution(ExecutionId(4242)))
    ));
}

#[tokio::test(start_paused = true)]
async fn cancel_with_transient_errors_is_retried() {
    let (e, fake, _) = engine("cancel-transient").await;
    let id = e
        .submit(task(
            "fake",
            json!({"hang": true, "cancel_transient_errors": 2}),
        ))
        .await
        .unwrap();
    until("running", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    e.cancel(id, "stop").await.unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(kind_of(&rec), Some(AbnormalKind::Cancelled));
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| matches!(c, Call::Cancel { .. }))
            .count(),
        3
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_unconfirmed_by_its_deadline_ends_cancelled_with_a_reason() {
    let (e, _, _) = engine("cancel-unconfirmed").await;
    let mut t = task("fake", json!({"hang": true, "ignore_cancel": true}));
    t.timeouts.stop = Some(Duration::from_secs(5));
    let id = e.submit(t).await.unwrap();
    until("running", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    let mut events = e.subscribe();
    let t0 = e.clock().now();
    e.cancel(id, "operator").await.unwrap();
    let rec = e.wait(id).await.unwrap();
    let Some(Outcome::Abnormal {
        kind: AbnormalKind::Cancelled,
        reason,
    }) = &rec.outcome
    else {
        panic!("{:?}", rec.outcome)
    };
    assert!(reason.contains("not confirmed stopped"), "{reason}");
    // Stop timeout (5 s) + 3 more polls 30 s apart, as DM.
    let waited = t0.until(rec.updated_at);
    assert!(
        waited >= Duration::from_secs(95) && waited < Duration::from_secs(100),
        "{waited:?}"
    );
    let mut finished = false;
    while let Ok(ev) = events.try_recv() {
        finished |= matches!(ev, Event::Finished { id: x, .. } if x == id);
    }
    assert!(finished, "a Finished event was emitted");
}

#[tokio::test(start_paused = true)]
async fn crash_while_running_reattaches_and_finishes() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Clock::new();
    let fake = FakeBackend::named("crash-running");
    let e1 = engine_on("crash-running", store.clone(), clock).await;
    let id = e1
        .submit(task(
            "fake",
            json!({"run_for_ms": 60_000, "outcome": {"outcome": "succeeded", "data": "ok"}}),
        ))
        .await
        .unwrap();
    until("running", || async {
        e1.get(id).await.unwrap().state == State::Running
    })
    .await;
    drop(e1); // crash: no shutdown
    let e2 = engine_on("crash-running", store.clone(), clock).await;
    let rec = e2.wait(id).await.unwrap();
    assert_eq!(rec.outcome, Some(Outcome::Succeeded { data: json!("ok") }));
    assert!(
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Recover { .. })),
        "re-attached through recover"
    );
    assert_eq!(fake.starts(&rec.request_id), 1);
    assert!(
        e2.history(id)
            .await
            .unwrap()
            .iter()
            .any(|h| h.actor == Actor::Recovery || h.actor == Actor::Notification)
    );
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_then_restart_keeps_everything() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Clock::new();
    let e1 = engine_on("graceful", store.clone(), clock).await;
    let ids: Vec<_> = futures_ids(&e1, 5, json!({"run_for_ms": 10_000})).await;
    e1.shutdown().await;
    assert!(matches!(
        e1.submit(task("fake", json!({}))).await,
        Err(Error::Shutdown)
    ));
    let e2 = engine_on("graceful", store, clock).await;
    for id in ids {
        assert_eq!(e2.wait(id).await.unwrap().state, State::Succeeded);
    }
}

async fn futures_ids(e: &Engine, n: usize, script: Value) -> Vec<ExecutionId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(e.submit(task("fake", script.clone())).await.unwrap());
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn config_reload_keeps_in_flight_snapshots() {
    let (e, old, _) = engine("reload-old").await;
    let mut events = e.subscribe();
    let before = e
        .submit(task("fake", json!({"run_for_ms": 5_000})))
        .await
        .unwrap();
    let snapshot = e.get(before).await.unwrap().config_hash;
    e.reload_config(config("reload-new")).await.unwrap();
    let after = e.submit(task("fake", json!({}))).await.unwrap();
    let a = e.wait(after).await.unwrap();
    let b = e.wait(before).await.unwrap();
    assert_eq!(b.state, State::Succeeded);
    assert_eq!(
        b.config_hash, snapshot,
        "in-flight execution kept its snapshot"
    );
    assert_ne!(a.config_hash, snapshot);
    assert_eq!(old.starts(&b.request_id), 1);
    assert_eq!(FakeBackend::named("reload-new").starts(&a.request_id), 1);
    assert_eq!(
        old.starts(&a.request_id),
        0,
        "new work went to the new config"
    );
    let mut reloaded = false;
    while let Ok(ev) = events.try_recv() {
        reloaded |= matches!(ev, Event::ConfigReloaded { .. });
    }
    assert!(reloaded);
}

#[tokio::test(start_paused = true)]
async fn poke_polls_now() {
    let (e, fake, _) = engine("poke").await;
    let id = e
        .submit(task("poller", json!({"hang": true})))
        .await
        .unwrap();
    until("pending", || async {
        e.get(id).await.unwrap().token.is_some()
    })
    .await;
    let token = e.get(id).await.unwrap().token.unwrap();
    fake.finish(
        &token,
        Outcome::Succeeded {
            data: json!("by hand"),
        },
    );
    e.poke(id).await.unwrap();
    let rec = e.wait(id).await.unwrap();
    assert_eq!(
        rec.outcome,
        Some(Outcome::Succeeded {
            data: json!("by hand")
        })
    );
    assert!(matches!(
        e.poke(ExecutionId(999)).await,
        Err(Error::UnknownExecution(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn forgotten_work_is_missing_and_crashed_work_is_crashed() {
    let (e, _, _) = engine("missing").await;
    let id = e
        .submit(task(
            "fake",
            json!({"run_for_ms": 100, "pushes": "drop", "forget": true}),
        ))
        .await
        .unwrap();
    assert_eq!(
        kind_of(&e.wait(id).await.unwrap()),
        Some(AbnormalKind::Missing)
    );
    let id = e
        .submit(task("fake", json!({"run_for_ms": 100, "crash": true})))
        .await
        .unwrap();
    assert_eq!(
        kind_of(&e.wait(id).await.unwrap()),
        Some(AbnormalKind::Crashed)
    );
}

#[tokio::test(start_paused = true)]
async fn list_filters_by_state_label_and_distributor() {
    let (e, _, _) = engine("list").await;
    let mut t = task("fake", json!({"hang": true}));
    t.labels.insert("team".into(), "red".into());
    let red = e.submit(t).await.unwrap();
    let blue = e.submit(task("poller", json!({}))).await.unwrap();
    e.wait(blue).await.unwrap();
    until("running", || async {
        e.get(red).await.unwrap().state == State::Running
    })
    .await;
    let ids = |v: Vec<ExecutionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let mut f = ListFilter::default();
    f.labels.insert("team".into(), "red".into());
    assert_eq!(ids(e.list(&f).await.unwrap()), [red]);
    let f = ListFilter {
        states: vec![State::Succeeded],
        ..Default::default()
    };
    assert_eq!(ids(e.list(&f).await.unwrap()), [blue]);
    let f = ListFilter {
        distributor: Some("poller".into()),
        ..Default::default()
    };
    assert_eq!(ids(e.list(&f).await.unwrap()), [blue]);
}

// ----- crash tests on a real SQLite file (real time, short scripts) ------------------------

async fn sqlite_engine(backend: &str, path: &std::path::Path) -> Engine {
    Engine::builder()
        .registry(registry())
        .distributors(config(backend))
        .store(SqliteStore::open(path).await.unwrap())
        .settings(fast_settings())
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn crash_between_intent_and_dispatch_starts_the_work_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("engine.db");
    let fake = FakeBackend::named("crash-intent");
    // The first run call fails transiently, so the execution sits in Dispatching with its
    // request id stored; the engine "crashes" before retrying.
    let e1 = sqlite_engine("crash-intent", &db).await;
    let id = e1
        .submit(task(
            "fake",
            json!({"transient_run_errors": 1, "run_for_ms": 50}),
        ))
        .await
        .unwrap();
    until("the first run call", || async {
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Run { execution_id, .. } if *execution_id == id))
    })
    .await;
    let request_id = e1.get(id).await.unwrap().request_id;
    drop(e1);
    let e2 = sqlite_engine("crash-intent", &db).await;
    let rec = tokio::time::timeout(Duration::from_secs(20), e2.wait(id))
        .await
        .expect("finished")
        .unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(
        rec.request_id, request_id,
        "re-dispatched with the same request id"
    );
    assert_eq!(fake.starts(&request_id), 1);
    assert!(
        e2.history(id)
            .await
            .unwrap()
            .iter()
            .any(|h| h.actor == Actor::Recovery)
    );
}

#[tokio::test]
async fn crash_after_the_backend_started_but_before_the_launch_was_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("engine.db");
    let fake = FakeBackend::named("crash-launch");
    let e1 = sqlite_engine("crash-launch", &db).await;
    let id = e1
        .submit(task(
            "fake",
            json!({"transient_run_errors": 1, "run_for_ms": 50}),
        ))
        .await
        .unwrap();
    until("the first run call", || async { !fake.calls().is_empty() }).await;
    let rec = e1.get(id).await.unwrap();
    drop(e1);
    // The backend really started the work for this request id (the second run call succeeds),
    // but the engine died before it could record the launch.
    let kind = registry().kind("fake").unwrap().clone();
    let inst = kind
        .build(
            json!({"backend": "crash-launch"}),
            BuildContext::detached("fake"),
            rec.config_hash.clone(),
        )
        .await
        .unwrap();
    let desc = TaskDescription {
        execution_id: id,
        task_id: rec.task_id,
        attempt: rec.attempt,
        request_id: rec.request_id.clone(),
        redispatch: false,
        distributor: rec.distributor.clone(),
        payload: rec.task.payload.to_value(),
        previous: None,
        notify: NotificationRoute {
            target: None,
            auth_token: AuthToken(String::new()),
        },
        timeouts: Timeouts::default(),
        labels: Labels::new(),
    };
    inst.distributor().run(&desc).await.unwrap();
    assert_eq!(fake.starts(&rec.request_id), 1);
    let e2 = sqlite_engine("crash-launch", &db).await;
    let done = tokio::time::timeout(Duration::from_secs(20), e2.wait(id))
        .await
        .expect("finished")
        .unwrap();
    assert_eq!(done.state, State::Succeeded);
    assert_eq!(
        fake.starts(&rec.request_id),
        1,
        "the re-dispatch was deduplicated"
    );
}

#[tokio::test]
async fn crash_while_running_on_sqlite_reattaches() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("engine.db");
    let fake = FakeBackend::named("crash-sqlite-running");
    let e1 = sqlite_engine("crash-sqlite-running", &db).await;
    let id = e1
        .submit(task("fake", json!({"run_for_ms": 300})))
        .await
        .unwrap();
    until("running", || async {
        e1.get(id).await.unwrap().state == State::Running
    })
    .await;
    drop(e1);
    let e2 = sqlite_engine("crash-sqlite-running", &db).await;
    let rec = tokio::time::timeout(Duration::from_secs(20), e2.wait(id))
        .await
        .expect("finished")
        .unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(fake.starts(&rec.request_id), 1);
}

// ----- an adapter that reports from inside `run` (races with the launch being recorded) ----

mod eager {
    use std::sync::Arc;

    use async_trait::async_trait;
    use distributor_core::*;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    #[derive(Debug, Serialize, Deserialize, JsonSchema)]
    pub struct EagerConfig {}

    #[derive(Debug)]
    pub struct Eager(pub Notifier);

    #[async_trait]
    impl KindConfig for EagerConfig {
        const KIND: &'static str = "eager";
        type Payload = Value;
        async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
            Ok(Arc::new(Eager(ctx.notifier)))
        }
    }

    #[async_trait]
    impl Distributor for Eager {
        async fn run(&self, task: &TaskDescription) -> Result<Launch> {
            let mut n = Notification::json(&serde_json::to_value(Status::Running).unwrap());
            n.attributes
                .insert("auth_token".into(), task.notify.auth_token.0.clone());
            n.sequence = Some(1);
            self.0.send(task.execution_id, n);
            // Let the engine see the push before this call returns.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            Ok(Launch::new(format!("eager-{}", task.request_id)))
        }
        async fn cancel(&self, _: &Execution) -> Result<()> {
            Ok(())
        }
        async fn status(&self, _: &Execution) -> Result<Status> {
            Ok(Status::Running)
        }
        fn info_url(&self, _: &Execution) -> Option<url::Url> {
            None
        }
        async fn handle_notification(
            &self,
            e: &Execution,
            n: &Notification,
        ) -> Result<Option<Status>> {
            // Like adapters that look the token up: without one, they cannot answer.
            if e.token.as_str().is_empty() {
                return Ok(None);
            }
            Ok(serde_json::from_slice(&n.data).ok())
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                push_notifications: true,
                ..Capabilities::default()
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_push_sent_before_run_returns_is_applied_once_the_launch_is_recorded() {
    let registry = Registry::new().register::<eager::EagerConfig>().unwrap();
    let doc = json!({"distributors": {"eager": {"kind": "eager"}}});
    let config = DistributorsConfig::from_value(&registry, "t", &doc).unwrap();
    let e = Engine::builder()
        .registry(registry)
        .distributors(config)
        .build()
        .await
        .unwrap();
    let t0 = e.clock().now();
    let id = e.submit(task("eager", json!({}))).await.unwrap();
    until("running", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    let rec = e.get(id).await.unwrap();
    assert!(
        t0.until(rec.updated_at) < Duration::from_secs(1),
        "seen by the push, not a hedge poll 30 s later"
    );
    assert_eq!(rec.last_sequence, 1);
    let h = e.history(id).await.unwrap();
    assert_eq!(h.last().unwrap().actor, Actor::Notification, "{h:?}");
}

/// A memory store whose next `apply` calls fail, transiently or permanently, on demand; it
/// counts the batches it was given.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail_next: std::sync::atomic::AtomicU32,
    transient: std::sync::atomic::AtomicBool,
    applies: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for FlakyStore {
    async fn apply(&self, batch: &[store::Write]) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.applies.fetch_add(1, SeqCst);
        if self
            .fail_next
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::Store {
                message: "injected write failure".into(),
                transient: self.transient.load(SeqCst),
                source: None,
            });
        }
        self.inner.apply(batch).await
    }
    async fn get(&self, id: ExecutionId) -> Result<Option<engine::ExecutionRecord>> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &ListFilter) -> Result<Vec<engine::ExecutionRecord>> {
        self.inner.list(filter).await
    }
    async fn live(&self) -> Result<Vec<engine::ExecutionRecord>> {
        self.inner.live().await
    }
    async fn history(&self, id: ExecutionId) -> Result<Vec<engine::HistoryEntry>> {
        self.inner.history(id).await
    }
    async fn max_id(&self) -> Result<u64> {
        self.inner.max_id().await
    }
    async fn meta(&self, key: &str) -> Result<Option<String>> {
        self.inner.meta(key).await
    }
    async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.inner.meta_prefix(prefix).await
    }
    async fn deferred(&self) -> Result<Vec<(u64, DistributorName, DeferredWork)>> {
        self.inner.deferred().await
    }
}

#[tokio::test(start_paused = true)]
async fn store_write_failures_are_retried_or_reported_and_nothing_runs_unrecorded() {
    use std::sync::atomic::Ordering::SeqCst;
    let flaky = Arc::new(FlakyStore::default());
    let e = engine_on("store-failures", flaky.clone(), Clock::new()).await;
    let backend = FakeBackend::named("store-failures");

    // Transient failures: retried with backoff, then the batch commits and the work runs.
    flaky.transient.store(true, SeqCst);
    flaky.fail_next.store(3, SeqCst);
    let id = e
        .submit(task("fake", json!({"run_for_ms": 10})))
        .await
        .unwrap();
    assert_eq!(e.wait(id).await.unwrap().state, State::Succeeded);

    // A permanent failure: the submit is refused, nothing was dispatched, and the engine goes
    // on working for the next one.
    flaky.transient.store(false, SeqCst);
    flaky.fail_next.store(1, SeqCst);
    let starts_before = backend.calls().len();
    let err = e.submit(task("fake", json!({}))).await.unwrap_err();
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert_eq!(backend.calls().len(), starts_before, "nothing dispatched");
    let id = e
        .submit(task("fake", json!({"run_for_ms": 10})))
        .await
        .unwrap();
    assert_eq!(e.wait(id).await.unwrap().state, State::Succeeded);
    assert_eq!(
        flaky
            .inner
            .list(&ListFilter::default())
            .await
            .unwrap()
            .len(),
        2,
        "the refused submit left no record"
    );
}

/// Regression: a batch's commit notice could be handled before its writer task had returned,
/// and then nothing settled the batch: with no other activity, replies and waiters hung. Many
/// lone lifecycles on a multi-threaded runtime (each one waiting for its own commit) hit that
/// window; they must all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_lifecycles_never_wait_forever_for_their_commit() {
    let (e, _backend, _store) = engine("lone-lifecycles").await;
    let run = async {
        for _ in 0..3_000 {
            let id = e.submit(task("fake", json!({}))).await.unwrap();
            assert_eq!(e.wait(id).await.unwrap().state, State::Succeeded);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("a lifecycle hung waiting for its commit");
}

/// What the `capture` kind's instance saw: the notifier the engine built it with, and the
/// notification token of the last task it ran.
static CAPTURED: std::sync::Mutex<Option<(Notifier, String)>> = std::sync::Mutex::new(None);

/// A kind that keeps its in-process notifier and its tasks' tokens where the test can use them,
/// and reports whatever status a push carries.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct CaptureConfig {}

#[derive(Debug)]
struct Capture(Notifier);

#[async_trait::async_trait]
impl KindConfig for CaptureConfig {
    const KIND: &'static str = "capture";
    type Payload = Value;
    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(Capture(ctx.notifier)))
    }
}

#[async_trait::async_trait]
impl Distributor for Capture {
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        *CAPTURED.lock().unwrap() = Some((self.0.clone(), task.notify.auth_token.0.clone()));
        Ok(Launch::new(task.request_id.as_str()))
    }
    async fn cancel(&self, _: &Execution) -> Result<()> {
        Ok(())
    }
    async fn status(&self, _: &Execution) -> Result<Status> {
        Ok(Status::Pending)
    }
    fn info_url(&self, _: &Execution) -> Option<url::Url> {
        None
    }
    async fn handle_notification(&self, _: &Execution, n: &Notification) -> Result<Option<Status>> {
        Ok(Some(serde_json::from_slice(&n.data).map_err(|e| {
            Error::permanent_from("capture: not a status", e)
        })?))
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: true,
            ..Capabilities::default()
        }
    }
}

/// In-process pushes (an adapter's `Notifier`) are authenticated like `Engine::notify`: a
/// forged one is refused and changes nothing, a genuine one is applied.
#[tokio::test(start_paused = true)]
async fn in_process_pushes_with_a_forged_token_are_refused() {
    let registry = Registry::new().register::<CaptureConfig>().unwrap();
    let doc = json!({"distributors": {"capture": {"kind": "capture"}}});
    let config = DistributorsConfig::from_value(&registry, "test", &doc).unwrap();
    let e = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let id = e.submit(task("capture", json!({}))).await.unwrap();
    until("launched", || async {
        e.get(id).await.unwrap().state == State::Pending
    })
    .await;
    let (notifier, token) = CAPTURED.lock().unwrap().clone().expect("run was called");
    let push = |status: Status, token: &str, seq: u64| {
        let mut n = Notification::json(&serde_json::to_value(status).unwrap());
        n.attributes.insert("auth_token".into(), token.into());
        n.sequence = Some(seq);
        n
    };
    let forged = push(
        Status::Finished(Outcome::Succeeded {
            data: json!("forged"),
        }),
        "v1.1.99999999999999.00",
        2,
    );
    assert!(notifier.send(id, forged), "the engine is listening");
    // Pushes reach the engine in order: once the genuine `Running` (sequence 1) is applied,
    // the forged `Finished` (sequence 2) sent before it would have been applied first.
    assert!(notifier.send(id, push(Status::Running, &token, 1)));
    until("running", || async {
        e.get(id).await.unwrap().state == State::Running
    })
    .await;
    assert_eq!(e.get(id).await.unwrap().state, State::Running);
}

/// An engine on a counting store with the given group-commit delay.
async fn engine_with_commit_delay(backend: &str, delay: Duration) -> (Engine, Arc<FlakyStore>) {
    let store = Arc::new(FlakyStore::default());
    let e = Engine::builder()
        .registry(registry())
        .distributors(config(backend))
        .store_arc(store.clone())
        .settings(Settings {
            commit_delay: delay,
            ..Settings::default()
        })
        .build()
        .await
        .unwrap();
    (e, store)
}

/// Group commit never slows down a client that awaits its answers: with other executions live,
/// sequential submit-then-wait takes no more (virtual) time than with group commit off.
#[tokio::test(start_paused = true)]
async fn group_commit_does_not_delay_awaited_answers() {
    let mut elapsed = Vec::new();
    for (name, delay) in [
        ("gc-awaited-off", Duration::ZERO),
        ("gc-awaited-on", Duration::from_millis(5)),
    ] {
        let (e, _store) = engine_with_commit_delay(name, delay).await;
        for _ in 0..20 {
            e.submit(task("fake", json!({"hang": true}))).await.unwrap();
        }
        let t0 = tokio::time::Instant::now();
        for _ in 0..30 {
            let id = e.submit(task("fake", json!({}))).await.unwrap();
            assert_eq!(e.wait(id).await.unwrap().state, State::Succeeded);
        }
        elapsed.push(t0.elapsed());
    }
    assert!(
        elapsed[1] <= elapsed[0] + Duration::from_millis(5),
        "with group commit {:?}, without {:?}",
        elapsed[1],
        elapsed[0]
    );
}

/// Changes nobody awaits (here: executions finishing a few at a time while others are live)
/// share transactions when group commit is on: fewer store writes for the same work. So do
/// changes of executions that are awaited all at once, as `orchestrator run` waits for its
/// tasks (only a client following a few at a time is never held).
#[tokio::test(start_paused = true)]
async fn group_commit_groups_unawaited_changes() {
    group_commit_groups(false).await;
    group_commit_groups(true).await;
}

async fn group_commit_groups(wait_for_all: bool) {
    let mut batches = Vec::new();
    for (name, delay) in [
        ("gc-groups-off", Duration::ZERO),
        ("gc-groups-on", Duration::from_millis(5)),
    ] {
        let (e, store) = engine_with_commit_delay(name, delay).await;
        for _ in 0..20 {
            e.submit(task("fake", json!({"hang": true}))).await.unwrap();
        }
        // Finishes spread over 40 ms, one per millisecond.
        let mut ids = Vec::new();
        for i in 0..40u64 {
            ids.push(
                e.submit(task("fake", json!({"run_for_ms": 1_000 + i})))
                    .await
                    .unwrap(),
            );
        }
        until("all running", || async {
            let mut all = true;
            for id in &ids {
                all &= e.get(*id).await.unwrap().state == State::Running;
            }
            all
        })
        .await;
        let mut waits = tokio::task::JoinSet::new();
        if wait_for_all {
            for id in &ids {
                let (e, id) = (e.clone(), *id);
                waits.spawn(async move { e.wait(id).await });
            }
        }
        let before = store.applies.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        while let Some(r) = waits.join_next().await {
            assert_eq!(r.unwrap().unwrap().state, State::Succeeded);
        }
        for id in &ids {
            assert_eq!(e.get(*id).await.unwrap().state, State::Succeeded);
        }
        batches.push(store.applies.load(std::sync::atomic::Ordering::SeqCst) - before);
    }
    assert!(
        batches[1] * 2 <= batches[0],
        "{} batches with group commit, {} without (waiting for all: {wait_for_all})",
        batches[1],
        batches[0]
    );
}
