//! The adapter against the fake Swarming server (`swarming-fake`) over loopback HTTP, alone and
//! inside an engine (pushes, lost pushes, forged pushes). No sleeps: states are awaited by
//! polling with a deadline.

use std::sync::Arc;
use std::time::Duration;

use distributor_core::{
    AbnormalKind, BuildContext, Distributor, DistributorsConfig, Engine, Error, Execution,
    ExecutionId, KindConfig, Notification, NotificationRejection, Outcome, Registry, RequestId,
    Settings, State, Status, Task, TaskDescription,
};
use distributor_swarming::{SwarmingConfig, decode_push};
use serde_json::{Value, json};
use swarming_fake::{Behaviour, End, FakeSwarming, Options, TaskState};

const TOPIC: &str = "projects/test/topics/swarming";

struct Setup {
    fake: FakeSwarming,
    _dir: tempfile::TempDir,
    config: Value,
}

async fn setup(options: Options) -> Setup {
    let fake = FakeSwarming::start_with(options).await.expect("fake");
    fake.set_default_behaviour(Behaviour {
        run_ms: 20,
        ..Behaviour::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "ci-bot\n").expect("token");
    let config = json!({"url": fake.url().as_str(), "token": {"file": token}, "pool": "default"});
    Setup {
        fake,
        _dir: dir,
        config,
    }
}

async fn adapter(config: &Value) -> Arc<dyn Distributor> {
    let c: SwarmingConfig = serde_json::from_value(config.clone()).expect("config");
    c.build(BuildContext::detached("sw")).await.expect("builds")
}

fn task(payload: Value) -> TaskDescription {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    TaskDescription::new(ExecutionId(id), RequestId::random(), "sw", payload)
}

fn execution(t: &TaskDescription, token: distributor_core::Token) -> Execution {
    Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token,
        handle: Default::default(),
    }
}

async fn start(d: &Arc<dyn Distributor>, payload: Value) -> Execution {
    let t = task(payload);
    let l = d.run(&t).await.expect("run");
    execution(&t, l.token)
}

async fn wait_until(
    d: &Arc<dyn Distributor>,
    e: &Execution,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = d.status(e).await.expect("status");
        if done(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "last status {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finished(d: &Arc<dyn Distributor>, e: &Execution) -> Outcome {
    match wait_until(d, e, |s| matches!(s, Status::Finished(_))).await {
        Status::Finished(o) => o,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn new_task_is_idempotent_per_request_id() {
    let s = setup(Options::default()).await;
    let d = adapter(&s.config).await;
    let mut t = task(json!({"command": ["true"]}));
    let first = d.run(&t).await.expect("run");
    t.redispatch = true;
    let second = d.run(&t).await.expect("again");
    assert_eq!(first.token, second.token);
    // After it finished too (the engine repeats run after a crash).
    let e = execution(&t, first.token.clone());
    assert!(finished(&d, &e).await.is_success());
    let third = d.run(&t).await.expect("after finish");
    assert_eq!(third.token, first.token);
    let tag = format!("distributor_request_id:{}", t.request_id);
    assert_eq!(s.fake.tasks_with_tag(&tag), 1, "one Swarming task");
    assert_eq!(s.fake.stats().new_task_calls, 3);
    // Another request id is another task.
    let other = d
        .run(&task(json!({"command": ["true"]})))
        .await
        .expect("run");
    assert_ne!(other.token, first.token);
    // The handle names the task and the uuid.
    assert_eq!(first.handle.version, 1);
    assert_eq!(first.handle.data["task_id"], first.token.as_str());
}

#[tokio::test]
async fn every_final_task_state_maps_to_its_outcome() {
    let s = setup(Options::default()).await;
    let rules = [
        ("case:fail", End::Exit(3), Some(AbnormalKind::Failed)),
        ("case:botdied", End::BotDied, Some(AbnormalKind::Crashed)),
        ("case:timeout", End::TimedOut, Some(AbnormalKind::TimedOut)),
        (
            "case:clienterror",
            End::ClientError,
            Some(AbnormalKind::Rejected),
        ),
        ("case:expire", End::Expire, Some(AbnormalKind::Expired)),
        ("case:ok", End::Exit(0), None),
    ];
    for (tag, end, _) in &rules {
        s.fake.behave_for_tag(
            tag,
            Behaviour {
                pending_ms: 1,
                run_ms: 5,
                end: end.clone(),
                kill_delay_ms: 0,
            },
        );
    }
    let d = adapter(&s.config).await;
    for (tag, _, want) in rules {
        let e = start(&d, json!({"command": ["x"], "tags": [tag]})).await;
        let o = finished(&d, &e).await;
        assert_eq!(o.abnormal_kind(), want, "{tag}: {o:?}");
        if let Outcome::Succeeded { data } = &o {
            assert_eq!(data["task_id"], e.token.as_str());
            assert!(data["run_id"].as_str().is_some_and(|r| r.ends_with('1')));
            assert!(
                data["bot_id"]
                    .as_str()
                    .is_some_and(|b| b.starts_with("fake-bot-"))
            );
        }
        if let Outcome::Abnormal {
            kind: AbnormalKind::Rejected,
            reason,
        } = &o
        {
            assert!(reason.contains("CIPD"), "{reason}");
        }
    }
    // NO_RESOURCE: no bot has the dimension; Swarming refuses at once.
    let e = start(
        &d,
        json!({"command": ["x"], "dimensions": {"os": "Windows"}}),
    )
    .await;
    let o = finished(&d, &e).await;
    assert_eq!(o.abnormal_kind(), Some(AbnormalKind::Expired), "{o:?}");
    // PENDING and RUNNING, then KILLED and CANCELED: the cancel test.
}

#[tokio::test]
async fn cancel_of_pending_and_running_tasks_ends_cancelled() {
    let s = setup(Options {
        bots: 1,
        ..Options::default()
    })
    .await;
    s.fake.set_default_behaviour(Behaviour {
        end: End::Hang,
        kill_delay_ms: 30,
        ..Behaviour::default()
    });
    let d = adapter(&s.config).await;
    let running = start(&d, json!({"command": ["sleep", "inf"]})).await;
    wait_until(&d, &running, |s| *s == Status::Running).await;
    // The only bot is busy: this one stays pending.
    let pending = start(&d, json!({"command": ["sleep", "inf"]})).await;
    assert_eq!(d.status(&pending).await.expect("status"), Status::Pending);

    d.cancel(&pending).await.expect("cancel pending");
    assert_eq!(
        s.fake.task_state(pending.token.as_str()),
        Some(TaskState::Canceled)
    );
    let o = finished(&d, &pending).await;
    assert_eq!(o.abnormal_kind(), Some(AbnormalKind::Cancelled), "{o:?}");

    d.cancel(&running).await.expect("cancel running");
    // The kill bit is set; the task is RUNNING until the bot notices (30 ms).
    let o = finished(&d, &running).await;
    assert_eq!(o.abnormal_kind(), Some(AbnormalKind::Cancelled), "{o:?}");
    assert_eq!(
        s.fake.task_state(running.token.as_str()),
        Some(TaskState::Killed)
    );
    // Idempotent: again, and for unknown tokens.
    d.cancel(&running).await.expect("cancel again");
    let mut unknown = running.clone();
    unknown.token = "7ffffffffffffff00".into();
    d.cancel(&unknown).await.expect("unknown is ok");
    assert_eq!(
        d.status(&unknown)
            .await
            .expect("status")
            .outcome()
            .and_then(Outcome::abnormal_kind),
        Some(AbnormalKind::Missing)
    );
}

#[tokio::test]
async fn batch_status_matches_status_and_chunks_past_1000() {
    let s = setup(Options::default()).await;
    let d = adapter(&s.config).await;
    let mut execs = Vec::new();
    for _ in 0..3 {
        execs.push(start(&d, json!({"command": ["true"]})).await);
    }
    for e in &execs {
        finished(&d, e).await;
    }
    let mut bogus = execs[0].clone();
    bogus.token = "not-a-task".into();
    execs.push(bogus);
    execs.push(execs[0].clone()); // a duplicate id: sent once, answered twice
    let batch = d.status_batch(&execs).await;
    assert_eq!(batch.len(), execs.len());
    for (e, b) in execs.iter().zip(&batch) {
        assert_eq!(b.as_ref().ok(), Some(&d.status(e).await.expect("status")));
    }
    let calls = s.fake.stats().batch_get_result_calls;
    assert_eq!(calls, 1);
    // 1001 distinct ids: two calls (the fake refuses more than 1000).
    let many: Vec<Execution> = (0..1001u64)
        .map(|i| {
            let mut e = execs[0].clone();
            e.token = format!("{:x}0", 0x1000 + i).into();
            e
        })
        .collect();
    let out = d.status_batch(&many).await;
    assert!(out.iter().all(|r| matches!(
        r.as_ref().ok().and_then(Status::outcome).and_then(Outcome::abnormal_kind),
        Some(AbnormalKind::Missing)
    )));
    assert_eq!(s.fake.stats().batch_get_result_calls, calls + 2);
}

#[tokio::test]
async fn transient_server_errors_are_transient_and_bad_requests_permanent() {
    let s = setup(Options::default()).await;
    let d = adapter(&s.config).await;
    s.fake.fail_next(1, swarming_fake::prpc::Code::Unavailable);
    let e = d
        .run(&task(json!({"command": ["true"]})))
        .await
        .expect_err("unavailable");
    assert!(e.is_transient(), "{e}");
    // The fake refuses execution timeouts under 30 s: INVALID_ARGUMENT is permanent.
    let e = d
        .run(&task(
            json!({"command": ["true"], "execution_timeout_secs": 10}),
        ))
        .await
        .expect_err("schema would refuse it too, the server does");
    assert!(!e.is_transient(), "{e}");
}

#[tokio::test]
async fn an_unregistered_token_is_refused_after_one_refresh() {
    let s = setup(Options::default()).await;
    s.fake.accept_token("good", "user:ci@example.com");
    let d = adapter(&s.config).await; // the file holds `ci-bot`
    let e = d
        .run(&task(json!({"command": ["true"]})))
        .await
        .expect_err("unauthenticated");
    assert!(e.is_transient(), "token may be rotated: {e}");
    // Rotate the token file: the next call re-reads it.
    let path = s.config["token"]["file"].as_str().expect("path").to_owned();
    std::fs::write(&path, "good").expect("rotate");
    d.run(&task(json!({"command": ["true"]})))
        .await
        .expect("fresh token works");
}

#[tokio::test]
async fn a_command_token_source_is_run() {
    let s = setup(Options::default()).await;
    s.fake.accept_token("from-command", "user:cmd@example.com");
    let mut config = s.config.clone();
    config["token"] = json!({"command": {"argv": ["echo", "from-command"]}});
    let d = adapter(&config).await;
    d.run(&task(json!({"command": ["true"]})))
        .await
        .expect("command token");
    config["token"] = json!({"command": {"argv": ["false"]}});
    let c: SwarmingConfig = serde_json::from_value(config).expect("config");
    let e = c
        .build(BuildContext::detached("sw"))
        .await
        .expect_err("a failing token command fails the build");
    assert!(e.to_string().contains("token command"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Inside an engine: pushes through the adapter's push endpoint.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn engine(s: &Setup, port: u16) -> Engine {
    let registry = Registry::new()
        .register::<SwarmingConfig>()
        .expect("registers");
    let mut instance = s.config.clone();
    instance["kind"] = json!("swarming");
    instance["pubsub_topic"] = json!(TOPIC);
    instance["push_listen"] = json!(format!("127.0.0.1:{port}"));
    let doc = json!({"distributors": {"sw": instance}});
    let distributors =
        DistributorsConfig::from_value(&registry, "test", &doc).expect("distributors config");
    Engine::builder()
        .registry(registry)
        .distributors(distributors)
        .settings(Settings {
            // The hedge poll: the only path when pushes are lost.
            hedge_poll_interval: Duration::from_millis(200),
            poll_interval: Duration::from_millis(200),
            cancel_poll_interval: Duration::from_millis(20),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..Settings::default()
        })
        .build()
        .await
        .expect("engine")
}

#[tokio::test]
async fn pushes_reach_the_engine_through_the_push_endpoint() {
    let s = setup(Options::default()).await;
    let port = free_port();
    s.fake.subscribe(
        TOPIC,
        format!("http://127.0.0.1:{port}/swarming")
            .parse()
            .expect("url"),
    );
    let e = engine(&s, port).await;
    let id = e
        .submit(Task::new("sw", json!({"command": ["true"]})))
        .await
        .expect("submit");
    let rec = e.wait(id).await.expect("wait");
    assert_eq!(rec.state, State::Succeeded, "{rec:?}");
    assert!(s.fake.stats().pushes_delivered >= 1, "{:?}", s.fake.stats());
    e.shutdown().await;
}

#[tokio::test]
async fn a_lost_push_is_recovered_by_polling() {
    let s = setup(Options::default()).await;
    let port = free_port();
    s.fake.subscribe(
        TOPIC,
        format!("http://127.0.0.1:{port}/").parse().expect("url"),
    );
    s.fake.lose_pushes(true);
    let e = engine(&s, port).await;
    let id = e
        .submit(Task::new("sw", json!({"command": ["true"]})))
        .await
        .expect("submit");
    let rec = e.wait(id).await.expect("wait");
    assert_eq!(rec.state, State::Succeeded, "{rec:?}");
    let stats = s.fake.stats();
    assert_eq!(stats.pushes_delivered, 0, "{stats:?}");
    assert!(
        stats.pushes_lost >= 2,
        "claim and completion were lost: {stats:?}"
    );
    assert!(stats.get_result_calls + stats.batch_get_result_calls >= 1);
    e.shutdown().await;
}

/// The body Pub/Sub would push for `task_id` of execution `id`, with `auth_token`.
fn forged_push(id: ExecutionId, task_id: &str, auth_token: &str) -> Vec<u8> {
    use base64::Engine as _;
    let userdata = json!({"execution_id": id.to_string(), "attempt": 1, "request_id": "x"});
    let data = json!({"task_id": task_id, "userdata": userdata.to_string()});
    serde_json::to_vec(&json!({
        "message": {
            "attributes": {"auth_token": auth_token},
            "data": base64::engine::general_purpose::STANDARD.encode(data.to_string()),
            "messageId": "forged-1",
        },
        "subscription": "projects/test/subscriptions/swarming-push",
    }))
    .expect("json")
}

#[tokio::test]
async fn a_push_with_a_bad_auth_token_is_refused() {
    let s = setup(Options::default()).await;
    // Pushes are lost and the task hangs: nothing but the forged push could change it.
    s.fake.lose_pushes(true);
    s.fake.set_default_behaviour(Behaviour {
        end: End::Hang,
        ..Behaviour::default()
    });
    let e = engine(&s, free_port()).await;
    let id = e
        .submit(Task::new("sw", json!({"command": ["sleep", "inf"]})))
        .await
        .expect("submit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let rec = loop {
        let rec = e.get(id).await.expect("get");
        if rec.state == State::Running {
            break rec;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rec:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let token = rec.token.clone().expect("dispatched");
    let before = s.fake.stats().get_result_calls;
    let (pid, n) = decode_push(&forged_push(id, token.as_str(), "forged-token")).expect("decodes");
    assert_eq!(pid, id);
    match e.notify(pid, n).await {
        Err(Error::NotificationRejected(NotificationRejection::Forged)) => {}
        other => panic!("a forged token must be refused, got {other:?}"),
    }
    // Without a token at all: refused too.
    let mut n = decode_push(&forged_push(id, token.as_str(), "x"))
        .expect("decodes")
        .1;
    n.attributes.clear();
    assert!(matches!(
        e.notify(id, n).await,
        Err(Error::NotificationRejected(
            NotificationRejection::MissingToken
        ))
    ));
    assert_eq!(
        s.fake.stats().get_result_calls,
        before,
        "a refused push never reaches the adapter (no GetResult)"
    );
    assert_eq!(e.get(id).await.expect("get").state, State::Running);
    e.cancel(id, "test over").await.expect("cancel");
    let rec = e.wait(id).await.expect("wait");
    assert_eq!(rec.state, State::Abnormal(AbnormalKind::Cancelled));
    e.shutdown().await;
}

#[tokio::test]
async fn handle_notification_ignores_other_tasks_and_garbage() {
    let s = setup(Options::default()).await;
    let d = adapter(&s.config).await;
    let e = start(&d, json!({"command": ["true"]})).await;
    let note = |data: Value| Notification {
        data: serde_json::to_vec(&data).expect("json"),
        ..Notification::default()
    };
    assert_eq!(
        d.handle_notification(&e, &note(json!({"task_id": "7ffffffffffffff00"})))
            .await
            .expect("other task"),
        None
    );
    assert_eq!(
        d.handle_notification(&e, &Notification::default())
            .await
            .expect("garbage"),
        None
    );
    let ud = json!({"execution_id": "999999", "attempt": 1, "request_id": "r"}).to_string();
    assert_eq!(
        d.handle_notification(
            &e,
            &note(json!({"task_id": e.token.as_str(), "userdata": ud}))
        )
        .await
        .expect("another execution's userdata"),
        None
    );
    let s2 = d
        .handle_notification(&e, &note(json!({"task_id": e.token.as_str()})))
        .await
        .expect("poke");
    assert!(
        s2.is_some(),
        "a poke for this task is answered with its status"
    );
}
