//! Behaviour of the `jobs` adapter over real HTTP on loopback, with real SQLite files.
//! No sleeps: every wait polls with a deadline or waits on a channel.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distributor_core::{
    AbnormalKind, AuthToken, BuildContext, DeferredQueue, Distributor, DistributorName, Execution,
    ExecutionId, Launch, Notification, Notifier, Outcome, RequestId, Status, TaskDescription,
};
use distributor_jobs::{
    ClaimRequest, ClientError, CompleteRequest, ErrorCode, ErrorRequest, HeartbeatRequest,
    JobContext, JobFailure, JobsConfig, JobsServer, ReleaseRequest, Worker, WorkerClient,
    WorkerCredential,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use url::Url;

const DEADLINE: Duration = Duration::from_secs(20);

struct Harness {
    server: Arc<JobsServer>,
    pushes: mpsc::UnboundedReceiver<(ExecutionId, Notification)>,
    config: JobsConfig,
}

fn config(dir: &tempfile::TempDir, listen: &str, lease_ms: u64, max_reoffers: u32) -> JobsConfig {
    JobsConfig {
        listen: listen.into(),
        workers: ["a", "b", "c"]
            .into_iter()
            .map(|n| WorkerCredential {
                name: n.into(),
                token: format!("token-{n}").into(),
            })
            .collect(),
        database: dir.path().join("jobs.sqlite"),
        lease_ms,
        max_reoffers,
        long_poll_ms: 5_000,
        public_url: None,
    }
}

async fn start(config: JobsConfig) -> Harness {
    let (tx, pushes) = mpsc::unbounded_channel();
    let ctx = BuildContext {
        name: DistributorName::new("jobs"),
        deferred: DeferredQueue::detached(),
        notifier: Notifier::new(tx),
        ..BuildContext::detached("jobs")
    };
    let server = JobsServer::start(config.clone(), ctx).await.unwrap();
    Harness {
        server,
        pushes,
        config,
    }
}

impl Harness {
    fn client(&self, who: &str) -> WorkerClient {
        WorkerClient::new(self.server.local_url(), &format!("token-{who}"))
    }
}

fn task(n: u64, task_type: &str, input: Value) -> TaskDescription {
    let payload = json!({ "task_type": task_type, "input": input });
    let mut t = TaskDescription::new(
        ExecutionId(n),
        RequestId::new(format!("req-{n}")),
        "jobs",
        payload,
    );
    t.notify.auth_token = AuthToken(format!("auth-{n}"));
    t
}

fn execution(t: &TaskDescription, l: &Launch) -> Execution {
    Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token: l.token.clone(),
        handle: l.handle.clone(),
    }
}

/// Polls `status` until `done` holds, or panics with the last status at the deadline.
async fn wait_status(d: &JobsServer, e: &Execution, done: impl Fn(&Status) -> bool) -> Status {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let s = d.status(e).await.unwrap();
        if done(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "execution {} still {s:?}",
            e.id
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn finished(s: &Status) -> bool {
    matches!(s, Status::Finished(_))
}

fn claim_req(types: &[&str], wait_ms: u64) -> ClaimRequest {
    ClaimRequest {
        task_types: types.iter().map(|t| t.to_string()).collect(),
        capacity: 1,
        wait_ms: Some(wait_ms),
    }
}

fn spawn_worker(worker: Worker) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let h = tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    (tx, h)
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_competing_workers_run_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = start(config(&dir, "127.0.0.1:0", 2_000, 3)).await;
    let done: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let started = Arc::new(AtomicUsize::new(0));
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let mut stops = Vec::new();
    for who in ["a", "b"] {
        let (done, started, both) = (done.clone(), started.clone(), both.clone());
        let handler = move |job: JobContext| {
            let (done, started, both) = (done.clone(), started.clone(), both.clone());
            async move {
                // The first two jobs wait for each other: with capacity 1 each, both workers
                // must be running one, so both take part.
                if started.fetch_add(1, Ordering::SeqCst) < 2 {
                    both.wait().await;
                }
                done.lock().unwrap().push((who.to_owned(), job.job.id.0));
                Ok::<_, JobFailure>(job.input().clone())
            }
        };
        stops.push(spawn_worker(Worker::new(
            h.client(who),
            vec!["echo".into()],
            handler,
        )));
    }
    let mut execs = Vec::new();
    for n in 1..=40 {
        let t = task(n, "echo", json!({ "n": n }));
        let l = h.server.run(&t).await.unwrap();
        execs.push(execution(&t, &l));
    }
    for e in &execs {
        let s = wait_status(&h.server, e, finished).await;
        let n = e.id.0;
        assert_eq!(
            s,
            Status::Finished(Outcome::Succeeded {
                data: json!({ "n": n })
            })
        );
    }
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), 40, "{done:?}");
    let ids: HashSet<i64> = done.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 40, "a job ran twice: {done:?}");
    let workers: HashSet<&str> = done.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(workers.len(), 2, "{done:?}");

    // Every job pushed Running then Succeeded, with its auth token and rising sequences.
    let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut succeeded = HashSet::new();
    while let Ok((exec, n)) = h.pushes.try_recv() {
        assert_eq!(n.attributes["auth_token"], format!("auth-{}", exec.0));
        let seq = n.sequence.unwrap();
        assert!(seq > last_seq.get(&exec.0).copied().unwrap_or(0));
        last_seq.insert(exec.0, seq);
        let e = &execs[usize::try_from(exec.0 - 1).unwrap()];
        if let Some(Status::Finished(o)) = h.server.handle_notification(e, &n).await.unwrap() {
            assert!(o.is_success());
            succeeded.insert(exec.0);
        }
    }
    assert_eq!(succeeded.len(), 40);
    for (tx, j) in stops {
        let _ = tx.send(());
        j.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_its_job_and_its_late_report() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 200, 3)).await;
    let t = task(1, "work", json!("x"));
    let e = execution(&t, &h.server.run(&t).await.unwrap());

    // Worker a claims the job and hangs; then it is killed (its task aborted: no heartbeats).
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let handler = move |job: JobContext| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(job.job.clone());
            std::future::pending::<Result<Value, JobFailure>>().await
        }
    };
    let (_stop_a, a) = spawn_worker(Worker::new(h.client("a"), vec!["work".into()], handler));
    let held = started_rx.recv().await.unwrap();
    assert_eq!(held.offer, 1);
    a.abort();
    let _ = a.await;

    // Worker b waits for work; it gets the job once a's lease lapses.
    let b = h.client("b");
    let until = tokio::time::Instant::now() + DEADLINE;
    let second = loop {
        if let Some(j) = b.claim(&claim_req(&["work"], 1_000)).await.unwrap() {
            break j;
        }
        assert!(tokio::time::Instant::now() < until, "never re-offered");
    };
    assert_eq!(second.id, held.id);
    assert_eq!(second.offer, 2);

    // The dead worker's late report is refused while b holds the job…
    let a_client = h.client("a");
    let late = CompleteRequest {
        lease: held.lease.id.clone(),
        result: json!("late"),
    };
    let err = a_client.complete(held.id, &late).await.unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::LeaseLost), "{err}");
    let err = a_client
        .heartbeat(
            held.id,
            &HeartbeatRequest {
                lease: held.lease.id.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::LeaseLost), "{err}");

    // …b finishes it…
    b.complete(
        second.id,
        &CompleteRequest {
            lease: second.lease.id.clone(),
            result: json!("from b"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        wait_status(&h.server, &e, finished).await,
        Status::Finished(Outcome::Succeeded {
            data: json!("from b")
        })
    );
    // …and a's report after that is refused too, and changes nothing.
    let err = a_client.complete(held.id, &late).await.unwrap_err();
    assert_eq!(code(&err), Some(ErrorCode::JobFinished), "{err}");
    assert_eq!(
        h.server.status(&e).await.unwrap(),
        Status::Finished(Outcome::Succeeded {
            data: json!("from b")
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lapsing_past_the_budget_end_crashed_and_transient_errors_end_failed() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 100, 1)).await;
    let c = h.client("c");
    // Capacity 5: c keeps holding the lapsing claims until the reaper ends them.
    let claim5 = ClaimRequest {
        capacity: 5,
        ..claim_req(&["flaky"], 1_000)
    };

    let t = task(1, "flaky", Value::Null);
    let e = execution(&t, &h.server.run(&t).await.unwrap());
    // Two offers (first + one re-offer), each left to lapse.
    for offer in 1..=2 {
        let until = tokio::time::Instant::now() + DEADLINE;
        let j = loop {
            if let Some(j) = c.claim(&claim5).await.unwrap() {
                break j;
            }
            assert!(tokio::time::Instant::now() < until);
        };
        assert_eq!(j.offer, offer);
    }
    match wait_status(&h.server, &e, finished).await {
        Status::Finished(Outcome::Abnormal { kind, reason }) => {
            assert_eq!(kind, AbnormalKind::Crashed);
            assert!(reason.contains("lease expired 2 times"), "{reason}");
        }
        s => panic!("{s:?}"),
    }

    let t = task(2, "flaky", Value::Null);
    let e = execution(&t, &h.server.run(&t).await.unwrap());
    let mut dispositions = Vec::new();
    for _ in 0..2 {
        let j = c.claim(&claim5).await.unwrap().unwrap();
        let r = c
            .error(
                j.id,
                &ErrorRequest {
                    lease: j.lease.id,
                    message: "disk full".into(),
                    permanent: false,
                },
            )
            .await
            .unwrap();
        dispositions.push(r.disposition);
    }
    assert_eq!(
        dispositions,
        [
            distributor_jobs::Disposition::Requeued,
            distributor_jobs::Disposition::Failed
        ]
    );
    match h.server.status(&e).await.unwrap() {
        Status::Finished(Outcome::Abnormal { kind, reason }) => {
            assert_eq!(kind, AbnormalKind::Failed);
            assert!(reason.contains("disk full"), "{reason}");
        }
        s => panic!("{s:?}"),
    }

    // The status page lists the errors and the worker.
    let page: Value = reqwest::get(h.server.local_url().join("status.json").unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let errors = page["errors"].as_array().unwrap();
    assert!(errors.iter().any(|e| e["message"] == "disk full"), "{page}");
    assert!(
        errors
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("lease expired")),
        "{page}"
    );
    assert_eq!(page["workers"][0]["name"], "c");
    assert_eq!(page["finished"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_running_worker_through_its_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 200, 3)).await;

    // A queued job is cancelled at once.
    let q = task(1, "nobody-runs-this", Value::Null);
    let qe = execution(&q, &h.server.run(&q).await.unwrap());
    h.server.cancel(&qe).await.unwrap();
    assert!(matches!(
        h.server.status(&qe).await.unwrap(),
        Status::Finished(Outcome::Abnormal {
            kind: AbnormalKind::Cancelled,
            ..
        })
    ));

    // A running one: the worker's handler is dropped once a heartbeat says "cancelled".
    struct Dropped(Option<oneshot::Sender<()>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = oneshot::channel();
    let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
    let handler = move |_job: JobContext| {
        let started_tx = started_tx.clone();
        let guard = Dropped(dropped_tx.lock().unwrap().take());
        async move {
            let _guard = guard;
            let _ = started_tx.send(());
            std::future::pending::<Result<Value, JobFailure>>().await
        }
    };
    let (stop, w) = spawn_worker(Worker::new(h.client("a"), vec!["long".into()], handler));
    let t = task(2, "long", Value::Null);
    let e = execution(&t, &h.server.run(&t).await.unwrap());
    started_rx.recv().await.unwrap();
    assert_eq!(h.server.status(&e).await.unwrap(), Status::Running);
    h.server.cancel(&e).await.unwrap();
    h.server.cancel(&e).await.unwrap();
    tokio::time::timeout(DEADLINE, dropped_rx)
        .await
        .expect("handler never dropped")
        .unwrap();
    match wait_status(&h.server, &e, finished).await {
        Status::Finished(Outcome::Abnormal { kind, reason }) => {
            assert_eq!(kind, AbnormalKind::Cancelled);
            assert!(reason.contains("worker `a` stopped"), "{reason}");
        }
        s => panic!("{s:?}"),
    }
    let _ = stop.send(());
    w.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_jobs_queued_and_claimed_loses_none_and_runs_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 5_000, 3)).await;
    let addr = h.server.local_addr();
    let tasks: Vec<_> = (1..=6).map(|n| task(n, "echo", json!(n))).collect();
    let mut execs = Vec::new();
    for t in &tasks {
        execs.push(execution(t, &h.server.run(t).await.unwrap()));
    }
    // Worker a holds one job across the restart.
    let a = h.client("a");
    let held = a.claim(&claim_req(&["echo"], 0)).await.unwrap().unwrap();
    assert_eq!(held.id.0.to_string(), execs[0].token.as_str());

    h.server.shutdown().await;
    drop(h);
    let mut cfg = config(&dir, &addr.to_string(), 5_000, 3);
    cfg.long_poll_ms = 1_000;
    let h = start(cfg).await;
    assert_eq!(h.server.local_addr(), addr);
    assert_eq!(h.config.listen, addr.to_string());

    // The engine re-runs with the same request ids: same tokens, nothing new queued.
    for (t, e) in tasks.iter().zip(&execs) {
        assert_eq!(h.server.run(t).await.unwrap().token, e.token);
        let s = h.server.recover(e).await.unwrap();
        let expect = if e.id.0 == 1 {
            Status::Running
        } else {
            Status::Pending
        };
        assert_eq!(s, expect);
    }

    // a's lease survived the restart: it heartbeats and completes with it.
    let hb = a
        .heartbeat(
            held.id,
            &HeartbeatRequest {
                lease: held.lease.id.clone(),
            },
        )
        .await
        .unwrap();
    assert!(!hb.cancelled);
    a.complete(
        held.id,
        &CompleteRequest {
            lease: held.lease.id.clone(),
            result: json!("a"),
        },
    )
    .await
    .unwrap();

    // b drains the rest; none is lost, none runs twice (a's job is not among b's).
    let ran: Arc<Mutex<Vec<i64>>> = Arc::default();
    let r = ran.clone();
    let handler = move |job: JobContext| {
        let r = r.clone();
        async move {
            r.lock().unwrap().push(job.job.id.0);
            Ok::<_, JobFailure>(job.input().clone())
        }
    };
    let (stop, w) = spawn_worker(Worker::new(h.client("b"), vec!["echo".into()], handler));
    for e in &execs {
        let s = wait_status(&h.server, e, finished).await;
        let want = if e.id.0 == 1 {
            json!("a")
        } else {
            json!(e.id.0)
        };
        assert_eq!(s, Status::Finished(Outcome::Succeeded { data: want }));
    }
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    let want: Vec<i64> = execs[1..]
        .iter()
        .map(|e| e.token.as_str().parse().unwrap())
        .collect();
    assert_eq!(ran, want);
    let _ = stop.send(());
    w.await.unwrap();
}

async fn raw(url: Url, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn assert_error(got: (u16, Value), status: u16, code: &str, mentions: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"]["code"], code, "{got:?}");
    let message = got.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "`{message}` should mention `{mentions}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_json_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 5_000, 3)).await;
    let base = h.server.local_url();
    let at = |p: &str| base.join(p).unwrap();
    let claim = r#"{"task_types": ["t"], "wait_ms": 0}"#;

    assert_error(
        raw(at("v1/claim"), None, claim).await,
        401,
        "unauthorized",
        "Bearer",
    );
    assert_error(
        raw(at("v1/claim"), Some("nope"), claim).await,
        401,
        "unauthorized",
        "unknown worker token",
    );
    assert_error(
        raw(at("v1/claim"), Some("token-a"), "{not json").await,
        400,
        "malformed_request",
        "malformed JSON",
    );
    assert_error(
        raw(at("v1/claim"), Some("token-a"), r#"{"task_types": "t"}"#).await,
        422,
        "invalid_request",
        "task_types",
    );
    assert_error(
        raw(
            at("v1/claim"),
            Some("token-a"),
            r#"{"task_types": ["t"], "capacity": -1}"#,
        )
        .await,
        422,
        "invalid_request",
        "capacity",
    );
    assert_error(
        raw(at("v1/claim"), Some("token-a"), r#"{"task_typo": ["t"]}"#).await,
        422,
        "invalid_request",
        "task_typo",
    );
    assert_error(
        raw(
            at("v1/jobs/999/heartbeat"),
            Some("token-a"),
            r#"{"lease": "1.x"}"#,
        )
        .await,
        404,
        "unknown_job",
        "no job 999",
    );
    assert_error(
        raw(
            at("v1/jobs/abc/heartbeat"),
            Some("token-a"),
            r#"{"lease": "1.x"}"#,
        )
        .await,
        400,
        "malformed_request",
        "abc",
    );
    assert_error(
        raw(
            at("v1/jobs/1/complete"),
            Some("token-a"),
            r#"{"result": 1}"#,
        )
        .await,
        422,
        "invalid_request",
        "lease",
    );
    assert_error(
        raw(at("v1/nothing"), Some("token-a"), "{}").await,
        404,
        "not_found",
        "endpoint",
    );

    // A job held by a is not b's to report on; a second claim of it is refused.
    let t = task(1, "t", Value::Null);
    let e = execution(&t, &h.server.run(&t).await.unwrap());
    let job = h
        .client("a")
        .claim(&claim_req(&["t"], 0))
        .await
        .unwrap()
        .unwrap();
    let lease = json!({ "lease": job.lease.id }).to_string();
    assert_error(
        raw(
            at(&format!("v1/jobs/{}/complete", job.id)),
            Some("token-b"),
            &lease,
        )
        .await,
        403,
        "not_holder",
        "held by another worker",
    );
    let activate = json!({ "activation_token": job.activation_token }).to_string();
    assert_error(
        raw(
            at(&format!("v1/jobs/{}/claim", job.id)),
            Some("token-b"),
            &activate,
        )
        .await,
        409,
        "already_claimed",
        "already claimed",
    );
    assert_error(
        raw(
            at(&format!("v1/jobs/{}/claim", job.id)),
            Some("token-b"),
            r#"{"activation_token": "guess"}"#,
        )
        .await,
        403,
        "wrong_activation_token",
        "activation token",
    );
    // Holding one job with capacity 1, a cannot claim another.
    let err = h
        .client("a")
        .claim(&claim_req(&["t"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CapacityExhausted));
    // Progress outside 0..=1.
    let bad = json!({ "lease": job.lease.id, "progress": 3.0 }).to_string();
    assert_error(
        raw(
            at(&format!("v1/jobs/{}/update", job.id)),
            Some("token-a"),
            &bad,
        )
        .await,
        422,
        "invalid_request",
        "progress",
    );
    // None of it changed the job.
    assert_eq!(h.server.status(&e).await.unwrap(), Status::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_first_claim_wins_and_status_page_shows_progress() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 5_000, 3)).await;
    let t = task(7, "t", json!({"k": 1}));
    let l = h.server.run(&t).await.unwrap();
    let e = execution(&t, &l);
    // Read the activation token the way an out-of-band launcher would get it: from a claim by
    // another worker that then releases the job.
    let c = h.client("c");
    let first = c.claim(&claim_req(&["t"], 0)).await.unwrap().unwrap();
    let r = c
        .release(
            first.id,
            &ReleaseRequest {
                lease: first.lease.id.clone(),
                reason: Some("handing over".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.disposition, distributor_jobs::Disposition::Requeued);
    assert_eq!(h.server.status(&e).await.unwrap(), Status::Pending);

    let a = h
        .client("a")
        .activate(first.id, &first.activation_token)
        .await
        .unwrap();
    assert_eq!(a.offer, 1, "a release does not use the re-offer budget");
    let err = h
        .client("b")
        .activate(first.id, &first.activation_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyClaimed));

    let ctx_reply = h
        .client("a")
        .update(
            a.id,
            &distributor_jobs::UpdateRequest {
                lease: a.lease.id.clone(),
                stage: Some("parsing".into()),
                progress: Some(0.5),
                message: Some("half way".into()),
            },
        )
        .await
        .unwrap();
    assert!(!ctx_reply.cancelled);

    let page: Value = reqwest::get(h.server.local_url().join("status.json").unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let running = &page["running"][0];
    assert_eq!(running["id"], a.id.0);
    assert_eq!(running["stage"], "parsing");
    assert_eq!(running["progress"], 0.5);
    assert_eq!(running["worker"], "a");

    let info = h.server.info_url(&e).unwrap();
    assert_eq!(info, h.server.info_url(&e).unwrap());
    assert_eq!(info.fragment(), Some(format!("job-{}", a.id).as_str()));
    let html = reqwest::get(info).await.unwrap().text().await.unwrap();
    assert!(html.contains(&format!("id=\"job-{}\"", a.id)), "{html}");
    assert!(html.contains("Selected job"));
    assert!(html.contains("parsing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_is_idempotent_and_unknown_tokens_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 5_000, 3)).await;
    let t = task(1, "t", Value::Null);
    let l1 = h.server.run(&t).await.unwrap();
    let l2 = h.server.run(&t).await.unwrap();
    assert_eq!(l1.token, l2.token);
    let page: Value = reqwest::get(h.server.local_url().join("status.json").unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["queued"].as_array().unwrap().len(), 1);

    let mut e = execution(&t, &l1);
    for bogus in ["999", "not-a-number"] {
        e.token = bogus.into();
        assert!(matches!(
            h.server.status(&e).await.unwrap(),
            Status::Finished(Outcome::Abnormal {
                kind: AbnormalKind::Missing,
                ..
            })
        ));
        h.server.cancel(&e).await.unwrap();
    }
    // A token of another request is Missing too.
    let other = task(2, "t", Value::Null);
    let mut e2 = execution(&other, &l1);
    e2.request_id = other.request_id.clone();
    assert!(matches!(
        h.server.status(&e2).await.unwrap(),
        Status::Finished(Outcome::Abnormal {
            kind: AbnormalKind::Missing,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_or_finishes_the_job_in_hand() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(&dir, "127.0.0.1:0", 5_000, 3)).await;

    // Release: the handler is dropped and the job goes back to the queue, budget untouched.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let handler = move |_job: JobContext| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            std::future::pending::<Result<Value, JobFailure>>().await
        }
    };
    let worker = Worker::new(h.client("a"), vec!["t".into()], handler)
        .on_shutdown(distributor_jobs::ShutdownPolicy::Release);
    let (stop, w) = spawn_worker(worker);
    let t = task(1, "t", Value::Null);
    let e = execution(&t, &h.server.run(&t).await.unwrap());
    started_rx.recv().await.unwrap();
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, w).await.unwrap().unwrap();
    assert_eq!(h.server.status(&e).await.unwrap(), Status::Pending);

    // Finish: a worker asked to stop mid-job completes it first.
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(Some(go_rx)));
    let handler = move |job: JobContext| {
        let (started_tx, go_rx) = (started_tx.clone(), go_rx.clone());
        async move {
            let _ = started_tx.send(());
            if let Some(rx) = go_rx.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, JobFailure>(json!({ "offer": job.job.offer }))
        }
    };
    let (stop, w) = spawn_worker(Worker::new(h.client("b"), vec!["t".into()], handler));
    started_rx.recv().await.unwrap();
    let _ = stop.send(());
    let _ = go_tx.send(());
    tokio::time::timeout(DEADLINE, w).await.unwrap().unwrap();
    assert_eq!(
        h.server.status(&e).await.unwrap(),
        Status::Finished(Outcome::Succeeded {
            data: json!({ "offer": 1 })
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_one_queue_file_share_a_server_and_another_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir, "127.0.0.1:0", 5_000, 3);
    let one = start(cfg.clone()).await;
    let mut two = start(cfg.clone()).await;
    assert_eq!(one.server.local_addr(), two.server.local_addr());
    // A job run through `two` pushes to `two`'s notifier.
    let t = task(1, "t", Value::Null);
    two.server.run(&t).await.unwrap();
    let j = two
        .client("a")
        .claim(&claim_req(&["t"], 0))
        .await
        .unwrap()
        .unwrap();
    let (exec, n) = tokio::time::timeout(DEADLINE, two.pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (exec, n.attributes["job"].clone()),
        (ExecutionId(1), j.id.to_string())
    );

    let mut other = cfg;
    other.lease_ms = 1_000;
    let err = JobsServer::start(other, BuildContext::detached("x"))
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("another config"), "{err}");
}
