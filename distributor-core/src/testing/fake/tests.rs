//! Tests of the fake itself, all under `tokio::time::pause`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError, unbounded_channel};
use tokio::time::{Instant, advance, sleep};

use super::*;
use crate::types::{
    AbnormalKind, Attempt, AuthToken, ExecutionId, NotificationRoute, Outcome, RequestId, TaskId,
    Token,
};

struct Rig {
    d: Arc<dyn Distributor>,
    backend: FakeBackend,
    pushes: UnboundedReceiver<(ExecutionId, Notification)>,
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("unit-{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn rig_on(backend: &str, push: bool) -> Rig {
    let (tx, rx) = unbounded_channel();
    let config = FakeConfig {
        backend: backend.into(),
        push,
        poll_interval_ms: Some(250),
    };
    let ctx = BuildContext {
        notifier: Notifier::new(tx),
        ..BuildContext::detached("fake")
    };
    Rig {
        d: Arc::new(FakeDistributor::new(config, ctx)),
        backend: FakeBackend::named(backend),
        pushes: rx,
    }
}

fn rig(prefix: &str) -> Rig {
    rig_on(&unique(prefix), true)
}

fn task(id: u64, payload: Value) -> TaskDescription {
    TaskDescription {
        execution_id: ExecutionId(id),
        task_id: TaskId(id),
        attempt: Attempt(1),
        request_id: RequestId::new(format!("req-{id}")),
        redispatch: false,
        distributor: "fake".into(),
        payload,
        previous: None,
        notify: NotificationRoute {
            target: None,
            auth_token: AuthToken(format!("auth-{id}")),
        },
        timeouts: Default::default(),
        labels: Default::default(),
    }
}

fn execution(task: &TaskDescription, launch: &Launch) -> Execution {
    Execution {
        id: task.execution_id,
        task_id: task.task_id,
        attempt: task.attempt,
        request_id: task.request_id.clone(),
        payload: task.payload.clone(),
        token: launch.token.clone(),
        handle: launch.handle.clone(),
    }
}

impl Rig {
    async fn start(&self, id: u64, payload: Value) -> (TaskDescription, Execution) {
        let t = task(id, payload);
        let launch = self.d.run(&t).await.expect("run");
        let e = execution(&t, &launch);
        (t, e)
    }

    async fn status(&self, e: &Execution) -> Status {
        self.d.status(e).await.expect("status")
    }

    /// The next push, with the instant it arrived.
    async fn push(&mut self) -> (Notification, Instant) {
        let (_, n) = self.pushes.recv().await.expect("push channel open");
        (n, Instant::now())
    }

    /// Lets every spawned task run while `for_` passes on the paused clock.
    async fn settle(&self, for_: Duration) {
        sleep(for_).await;
    }
}

fn body(n: &Notification) -> Status {
    serde_json::from_slice(&n.data).expect("push body is a Status")
}

fn abnormal(kind: AbnormalKind) -> impl Fn(&Status) -> bool {
    move |s| matches!(s, Status::Finished(Outcome::Abnormal { kind: k, .. }) if *k == kind)
}

#[tokio::test(start_paused = true)]
async fn status_follows_the_scripted_clock() {
    let r = rig("clock");
    let (_, e) = r
        .start(
            1,
            json!({"pending_for_ms": 100, "run_for_ms": 200, "outcome": {"outcome": "succeeded", "data": 7}}),
        )
        .await;
    assert_eq!(r.status(&e).await, Status::Pending);
    advance(Duration::from_millis(100)).await;
    assert_eq!(r.status(&e).await, Status::Running);
    advance(Duration::from_millis(199)).await;
    assert_eq!(r.status(&e).await, Status::Running);
    advance(Duration::from_millis(1)).await;
    assert_eq!(
        r.status(&e).await,
        Status::Finished(Outcome::Succeeded { data: json!(7) })
    );
}

#[tokio::test(start_paused = true)]
async fn run_is_idempotent_per_request_id() {
    let r = rig("idem");
    let t = task(1, json!({"run_for_ms": 1000}));
    let a = r.d.run(&t).await.unwrap();
    let b = r.d.run(&t).await.unwrap();
    assert_eq!(a.token, b.token);
    assert_eq!(a.token, FakeBackend::token_for(&t.request_id));
    assert_eq!(a.poll_interval, Some(Duration::from_millis(250)));
    assert_eq!(r.backend.starts(&t.request_id), 1);
    let runs = r
        .backend
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Run { .. }))
        .count();
    assert_eq!(runs, 2);
    // Another instance on the same backend (a rebuilt engine) dedupes too.
    let r2 = rig_on(r.backend.name(), true);
    assert_eq!(r2.d.run(&t).await.unwrap().token, a.token);
    assert_eq!(r.backend.starts(&t.request_id), 1);
}

#[tokio::test(start_paused = true)]
async fn transient_run_errors_n_times_then_success() {
    let r = rig("transient");
    let t = task(1, json!({"transient_run_errors": 2}));
    for _ in 0..2 {
        let e = r.d.run(&t).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert_eq!(r.backend.starts(&t.request_id), 0);
    }
    r.d.run(&t).await.unwrap();
    assert_eq!(r.backend.starts(&t.request_id), 1);
    // The count is per request id: another task gets its own two errors.
    let t2 = task(2, json!({"transient_run_errors": 2}));
    assert!(r.d.run(&t2).await.unwrap_err().is_transient());
}

#[tokio::test(start_paused = true)]
async fn permanent_run_error_starts_nothing() {
    let r = rig("permanent");
    let t = task(
        1,
        json!({"transient_run_errors": 1, "permanent_run_error": "no such queue"}),
    );
    assert!(r.d.run(&t).await.unwrap_err().is_transient());
    for _ in 0..2 {
        let e = r.d.run(&t).await.unwrap_err();
        assert!(!e.is_transient());
        assert_eq!(e.to_string(), "no such queue");
    }
    assert_eq!(r.backend.starts(&t.request_id), 0);
}

#[tokio::test(start_paused = true)]
async fn injected_run_and_status_failures() {
    let r = rig("inject");
    r.backend.fail_next_runs(1);
    let t = task(1, json!({}));
    assert!(r.d.run(&t).await.unwrap_err().is_transient());
    let launch = r.d.run(&t).await.unwrap();
    let e = execution(&t, &launch);
    r.backend.fail_next_statuses(2);
    assert!(r.d.status(&e).await.unwrap_err().is_transient());
    let batch = r.d.status_batch(&[e.clone(), e.clone()]).await;
    assert!(batch[0].as_ref().unwrap_err().is_transient());
    assert_eq!(
        batch[1].as_ref().unwrap(),
        &Status::Finished(Outcome::Succeeded { data: Value::Null })
    );
}

#[tokio::test(start_paused = true)]
async fn pushes_are_delivered_in_order_with_auth_and_sequence() {
    let mut r = rig("deliver");
    let t0 = Instant::now();
    let (t, e) = r
        .start(1, json!({"pending_for_ms": 50, "run_for_ms": 100}))
        .await;
    let (running, at) = r.push().await;
    assert_eq!(at - t0, Duration::from_millis(50));
    assert_eq!(body(&running), Status::Running);
    assert_eq!(running.sequence, Some(1));
    assert_eq!(
        running.attributes.get("auth_token"),
        Some(&t.notify.auth_token.0)
    );
    let (finished, at) = r.push().await;
    assert_eq!(at - t0, Duration::from_millis(150));
    assert_eq!(
        body(&finished),
        Status::Finished(Outcome::Succeeded { data: Value::Null })
    );
    assert_eq!(finished.sequence, Some(2));
    assert_ne!(finished.message_id, running.message_id);
    // handle_notification turns the push into its status.
    assert_eq!(
        r.d.handle_notification(&e, &finished).await.unwrap(),
        Some(body(&finished))
    );
    r.settle(Duration::from_secs(1)).await;
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(r.backend.pushes().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropped_and_poll_only_pushes_send_nothing() {
    let mut r = rig("drop");
    let (_, a) = r
        .start(1, json!({"run_for_ms": 10, "pushes": "drop"}))
        .await;
    let (_, b) = r
        .start(2, json!({"run_for_ms": 10, "poll_only": true}))
        .await;
    r.settle(Duration::from_secs(1)).await;
    assert!(r.status(&a).await.outcome().is_some());
    assert!(r.status(&b).await.outcome().is_some());
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);

    // An instance configured without push sends nothing and says so.
    let mut quiet = rig_on(&unique("nopush"), false);
    assert!(!quiet.d.capabilities().push_notifications);
    quiet.start(3, json!({"run_for_ms": 10})).await;
    quiet.settle(Duration::from_secs(1)).await;
    assert_eq!(quiet.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(start_paused = true)]
async fn duplicated_pushes_repeat_message_id_and_sequence() {
    let mut r = rig("dup");
    r.start(1, json!({"run_for_ms": 10, "pushes": "duplicate"}))
        .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(r.push().await.0);
    }
    let seqs: Vec<_> = got.iter().map(|n| n.sequence.unwrap()).collect();
    assert_eq!(seqs, [1, 1, 2, 2]);
    assert_eq!(got[0], got[1]);
    assert_eq!(got[2], got[3]);
    r.settle(Duration::from_secs(1)).await;
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(start_paused = true)]
async fn reordered_pushes_send_finished_first() {
    let mut r = rig("reorder");
    let t0 = Instant::now();
    r.start(1, json!({"run_for_ms": 100, "pushes": "reorder"}))
        .await;
    let (first, at) = r.push().await;
    assert_eq!(at - t0, Duration::from_millis(100), "held until finished");
    assert_eq!(first.sequence, Some(2));
    assert!(body(&first).outcome().is_some());
    let (second, _) = r.push().await;
    assert_eq!(second.sequence, Some(1));
    assert_eq!(body(&second), Status::Running);
}

#[tokio::test(start_paused = true)]
async fn delayed_pushes_arrive_late() {
    let mut r = rig("delay");
    let t0 = Instant::now();
    let (_, e) = r
        .start(1, json!({"run_for_ms": 100, "push_delay_ms": 30}))
        .await;
    let (running, at) = r.push().await;
    assert_eq!(body(&running), Status::Running);
    assert_eq!(at - t0, Duration::from_millis(30));
    let (finished, at) = r.push().await;
    assert_eq!(finished.sequence, Some(2));
    assert_eq!(at - t0, Duration::from_millis(130));
    // The status was Finished before the push arrived.
    assert!(r.status(&e).await.outcome().is_some());
}

#[tokio::test(start_paused = true)]
async fn forget_reports_missing_once_finished() {
    let r = rig("forget");
    let (_, e) = r
        .start(
            1,
            json!({"run_for_ms": 100, "forget": true, "pushes": "drop"}),
        )
        .await;
    assert_eq!(r.status(&e).await, Status::Running);
    advance(Duration::from_millis(100)).await;
    assert!(abnormal(AbnormalKind::Missing)(&r.status(&e).await));

    // By hand, on running work.
    let (_, e2) = r.start(2, json!({"hang": true})).await;
    assert!(r.backend.forget(&e2.token));
    assert!(abnormal(AbnormalKind::Missing)(&r.status(&e2).await));
}

#[tokio::test(start_paused = true)]
async fn crash_reports_crashed_and_pushes_no_finish() {
    let mut r = rig("crash");
    let (_, e) = r.start(1, json!({"run_for_ms": 100, "crash": true})).await;
    let (running, _) = r.push().await;
    assert_eq!(running.sequence, Some(1));
    r.settle(Duration::from_secs(1)).await;
    assert!(abnormal(AbnormalKind::Crashed)(&r.status(&e).await));
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);

    // By hand.
    let (_, e2) = r.start(2, json!({"hang": true})).await;
    assert_eq!(r.push().await.0.sequence, Some(1));
    assert!(r.backend.crash(&e2.token));
    assert!(!r.backend.crash(&e2.token), "already ended");
    assert!(abnormal(AbnormalKind::Crashed)(&r.status(&e2).await));
    r.settle(Duration::from_secs(1)).await;
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_work_and_pushes_cancelled() {
    let mut r = rig("cancel");
    let (_, e) = r.start(1, json!({"hang": true})).await;
    assert_eq!(r.push().await.0.sequence, Some(1));
    r.d.cancel(&e).await.unwrap();
    let (finished, _) = r.push().await;
    assert!(abnormal(AbnormalKind::Cancelled)(&body(&finished)));
    assert!(abnormal(AbnormalKind::Cancelled)(&r.status(&e).await));
    // Idempotent: again, and on unknown work.
    r.d.cancel(&e).await.unwrap();
    let mut unknown = e.clone();
    unknown.token = Token::new("never-issued");
    r.d.cancel(&unknown).await.unwrap();
    assert!(abnormal(AbnormalKind::Missing)(&r.status(&unknown).await));
}

#[tokio::test(start_paused = true)]
async fn cancel_while_pending_never_runs() {
    let mut r = rig("cancel-pending");
    let (_, e) = r.start(1, json!({"pending_for_ms": 1000})).await;
    r.d.cancel(&e).await.unwrap();
    let (only, _) = r.push().await;
    assert_eq!(only.sequence, Some(2));
    r.settle(Duration::from_secs(2)).await;
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
}

#[tokio::test(start_paused = true)]
async fn cancel_transient_errors_then_ok() {
    let r = rig("cancel-transient");
    let (_, e) = r
        .start(1, json!({"hang": true, "cancel_transient_errors": 2}))
        .await;
    for _ in 0..2 {
        assert!(r.d.cancel(&e).await.unwrap_err().is_transient());
        assert_eq!(r.status(&e).await, Status::Running);
    }
    r.d.cancel(&e).await.unwrap();
    assert!(abnormal(AbnormalKind::Cancelled)(&r.status(&e).await));
}

#[tokio::test(start_paused = true)]
async fn ignore_cancel_returns_ok_but_work_goes_on() {
    let mut r = rig("ignore-cancel");
    let (_, e) = r
        .start(1, json!({"run_for_ms": 10_000, "ignore_cancel": true}))
        .await;
    r.push().await;
    r.d.cancel(&e).await.unwrap();
    advance(Duration::from_secs(5)).await;
    assert_eq!(r.status(&e).await, Status::Running);
    let (finished, _) = r.push().await;
    assert_eq!(
        body(&finished),
        Status::Finished(Outcome::Succeeded { data: Value::Null })
    );
}

#[tokio::test(start_paused = true)]
async fn finish_by_hand_ends_hanging_work() {
    let mut r = rig("finish");
    let (_, e) = r.start(1, json!({"hang": true})).await;
    r.push().await;
    advance(Duration::from_secs(3600)).await;
    assert_eq!(r.status(&e).await, Status::Running);
    let outcome = Outcome::Succeeded { data: json!("ok") };
    assert!(r.backend.finish(&e.token, outcome.clone()));
    assert_eq!(r.status(&e).await, Status::Finished(outcome.clone()));
    assert_eq!(body(&r.push().await.0), Status::Finished(outcome));
}

#[tokio::test(start_paused = true)]
async fn recover_reattaches_pushes_to_a_rebuilt_instance() {
    let old = rig("recover");
    let (_, e) = old.start(1, json!({"run_for_ms": 1000})).await;
    let name = old.backend.name().to_owned();
    drop(old);
    let mut new = rig_on(&name, true);
    assert_eq!(new.d.recover(&e).await.unwrap(), Status::Running);
    // The new pusher starts over; the engine drops what it has already seen by sequence.
    assert_eq!(new.push().await.0.sequence, Some(1));
    let (finished, _) = new.push().await;
    assert_eq!(finished.sequence, Some(2));
    assert!(matches!(
        new.backend.calls().last(),
        Some(Call::Recover { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn garbage_notifications_are_ignored() {
    let r = rig("garbage");
    let (_, e) = r.start(1, json!({})).await;
    for data in [
        &b""[..],
        b"\xff\xfe",
        b"{}",
        b"{\"status\":\"exploded\"}",
        b"null",
    ] {
        let n = Notification {
            data: data.to_vec(),
            ..Notification::default()
        };
        assert_eq!(r.d.handle_notification(&e, &n).await.unwrap(), None);
    }
}

#[tokio::test(start_paused = true)]
async fn info_url_is_pure_and_total() {
    let r = rig("url");
    let (_, e) = r.start(1, json!({})).await;
    let a = r.d.info_url(&e).unwrap();
    assert_eq!(r.d.info_url(&e), Some(a.clone()));
    assert!(a.as_str().ends_with(e.token.as_str()), "{a}");
    let mut odd = e.clone();
    odd.token = Token::new("a/b?c#d e");
    assert!(r.d.info_url(&odd).is_some());
}

#[tokio::test(start_paused = true)]
async fn validate_reports_semantic_problems_with_pointers() {
    let r = rig("validate");
    r.d.validate(&json!({})).unwrap();
    let e =
        r.d.validate(&json!({"permanent_run_error": "", "hang": true, "crash": true}))
            .unwrap_err();
    let pointers: Vec<_> = e.violations.iter().map(|v| v.pointer.as_str()).collect();
    assert_eq!(pointers, ["/permanent_run_error", "/crash"]);
}

#[tokio::test(start_paused = true)]
async fn reset_forgets_everything() {
    let mut r = rig("reset");
    let (t, e) = r.start(1, json!({"hang": true})).await;
    r.push().await;
    r.backend.reset();
    assert_eq!(r.backend.starts(&t.request_id), 0);
    assert!(r.backend.calls().is_empty());
    assert!(abnormal(AbnormalKind::Missing)(&r.status(&e).await));
    r.settle(Duration::from_secs(1)).await;
    assert_eq!(r.pushes.try_recv().unwrap_err(), TryRecvError::Empty);
}
