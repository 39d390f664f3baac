//! The batch endpoints of the Jobs API (`/v1/claims`, `/v1/complete`) and the worker SDK's
//! batched loop, over real HTTP on loopback with real SQLite files. No sleeps: every wait polls
//! with a deadline or waits on a channel.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distributor_core::{
    AuthToken, BuildContext, DeferredQueue, Distributor, DistributorName, Execution, ExecutionId,
    Launch, Notifier, Outcome, RequestId, Status, TaskDescription,
};
use distributor_jobs::{
    ClaimManyRequest, ClaimRequest, ClientError, CompleteItem, CompleteManyRequest, Disposition,
    ErrorCode, JobContext, JobFailure, JobsConfig, JobsServer, LeaseId, Worker, WorkerClient,
    WorkerCredential,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

const DEADLINE: Duration = Duration::from_secs(20);

async fn start(dir: &tempfile::TempDir) -> Arc<JobsServer> {
    let config = JobsConfig {
        listen: "127.0.0.1:0".into(),
        workers: ["a", "b"]
            .into_iter()
            .map(|n| WorkerCredential {
                name: n.into(),
                token: format!("token-{n}").into(),
            })
            .collect(),
        database: dir.path().join("jobs.sqlite"),
        lease_ms: 10_000,
        max_reoffers: 3,
        long_poll_ms: 5_000,
        public_url: None,
    };
    let (tx, _pushes) = mpsc::unbounded_channel();
    std::mem::forget(_pushes);
    let ctx = BuildContext {
        name: DistributorName::new("jobs"),
        deferred: DeferredQueue::detached(),
        notifier: Notifier::new(tx),
        ..BuildContext::detached("jobs")
    };
    JobsServer::start(config, ctx).await.unwrap()
}

fn client(server: &JobsServer, who: &str) -> WorkerClient {
    WorkerClient::new(server.local_url(), &format!("token-{who}"))
}

async fn submit(server: &JobsServer, n: u64) -> Execution {
    let payload = json!({ "task_type": "echo", "input": { "n": n } });
    let mut t = TaskDescription::new(
        ExecutionId(n),
        RequestId::new(format!("req-{n}")),
        "jobs",
        payload,
    );
    t.notify.auth_token = AuthToken(format!("auth-{n}"));
    let l: Launch = server.run(&t).await.unwrap();
    Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token: l.token,
        handle: l.handle,
    }
}

async fn wait_finished(server: &JobsServer, e: &Execution) -> Outcome {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Status::Finished(o) = server.status(e).await.unwrap() {
            return o;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "execution {} not finished",
            e.id
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn many(capacity: u32, max: u32, wait_ms: u64, complete: Vec<CompleteItem>) -> ClaimManyRequest {
    ClaimManyRequest {
        task_types: vec!["echo".into()],
        capacity,
        max: Some(max),
        wait_ms: Some(wait_ms),
        complete,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_claims_up_to_capacity_and_the_next_completes_and_claims() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir).await;
    let a = client(&server, "a");
    let mut execs = Vec::new();
    for n in 1..=5 {
        execs.push(submit(&server, n).await);
    }
    // max 4, capacity 3: three jobs, oldest first.
    let r = a.claim_many(&many(3, 4, 0, vec![])).await.unwrap();
    let ids: Vec<i64> = r.jobs.iter().map(|j| j.id.0).collect();
    assert_eq!(r.jobs.len(), 3, "{ids:?}");
    assert_eq!(
        r.jobs
            .iter()
            .map(|j| j.input["n"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(2), json!(3)]
    );
    // Full: a claim without results is refused as a single claim would be.
    let full = a.claim_many(&many(3, 1, 0, vec![])).await.unwrap_err();
    assert_eq!(full.code(), Some(ErrorCode::CapacityExhausted), "{full}");

    // Two results, one stale lease, and a claim in the same request: the results are applied
    // one by one, then the freed slots are filled.
    let items = vec![
        CompleteItem {
            job: r.jobs[0].id,
            lease: r.jobs[0].lease.id.clone(),
            result: json!({ "done": 1 }),
        },
        CompleteItem {
            job: r.jobs[1].id,
            lease: LeaseId("1.not-the-lease".into()),
            result: Value::Null,
        },
        CompleteItem {
            job: r.jobs[2].id,
            lease: r.jobs[2].lease.id.clone(),
            result: json!({ "done": 3 }),
        },
    ];
    let r2 = a.claim_many(&many(3, 3, 0, items)).await.unwrap();
    assert_eq!(r2.completed.len(), 3);
    assert_eq!(r2.completed[0].disposition, Some(Disposition::Succeeded));
    assert_eq!(r2.completed[1].disposition, None);
    assert_eq!(
        r2.completed[1].error.as_ref().map(|e| e.code),
        Some(ErrorCode::LeaseLost)
    );
    assert_eq!(r2.completed[2].disposition, Some(Disposition::Succeeded));
    // Two slots freed (job 2 is still held): jobs 4 and 5.
    assert_eq!(r2.jobs.len(), 2);
    assert_eq!(
        wait_finished(&server, &execs[0]).await,
        Outcome::Succeeded {
            data: json!({ "done": 1 })
        }
    );
    assert_eq!(
        wait_finished(&server, &execs[2]).await,
        Outcome::Succeeded {
            data: json!({ "done": 3 })
        }
    );

    // `/v1/complete`: a repeated result is told apart as finished, the rest are applied.
    let items = vec![
        CompleteItem {
            job: r.jobs[0].id,
            lease: r.jobs[0].lease.id.clone(),
            result: Value::Null,
        },
        CompleteItem {
            job: r.jobs[1].id,
            lease: r.jobs[1].lease.id.clone(),
            result: json!({ "done": 2 }),
        },
    ];
    let r3 = a
        .complete_many(&CompleteManyRequest { results: items })
        .await
        .unwrap();
    assert_eq!(
        r3.replies[0].error.as_ref().map(|e| e.code),
        Some(ErrorCode::JobFinished)
    );
    assert_eq!(r3.replies[1].disposition, Some(Disposition::Succeeded));
    assert_eq!(
        wait_finished(&server, &execs[1]).await,
        Outcome::Succeeded {
            data: json!({ "done": 2 })
        }
    );
    // Another worker cannot complete a's jobs.
    let b = client(&server, "b");
    let stolen = CompleteItem {
        job: r2.jobs[0].id,
        lease: r2.jobs[0].lease.id.clone(),
        result: Value::Null,
    };
    let r4 = b
        .complete_many(&CompleteManyRequest {
            results: vec![stolen],
        })
        .await
        .unwrap();
    assert_eq!(
        r4.replies[0].error.as_ref().map(|e| e.code),
        Some(ErrorCode::NotHolder)
    );
    // The old single claim still works next to the batch ones.
    let mut old = ClaimRequest {
        task_types: vec!["echo".into()],
        capacity: 1,
        wait_ms: Some(0),
    };
    assert!(b.claim(&old).await.unwrap().is_none(), "nothing queued");
    submit(&server, 6).await;
    old.wait_ms = Some(5_000);
    assert_eq!(b.claim(&old).await.unwrap().unwrap().input["n"], json!(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir).await;
    let a = client(&server, "a");
    let refused = |e: ClientError| match e {
        ClientError::Refused {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("{other}"),
    };
    let (status, code, message) = refused(a.claim_many(&many(1, 0, 0, vec![])).await.unwrap_err());
    assert_eq!((status, code), (422, Some(ErrorCode::InvalidRequest)));
    assert!(message.contains("`max`"), "{message}");
    let (status, _, message) = refused(
        a.complete_many(&CompleteManyRequest { results: vec![] })
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 422);
    assert!(message.contains("`results`"), "{message}");
    let (status, _, message) = refused(
        a.claim_many(&ClaimManyRequest {
            task_types: vec![],
            ..many(1, 1, 0, vec![])
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(status, 422);
    assert!(message.contains("`task_types`"), "{message}");
}

/// Runs `n` echo jobs through two workers built by `make` and checks each ran exactly once.
async fn two_workers_run_each_once(make: impl Fn(WorkerClient, Arc<Mutex<Vec<i64>>>) -> Worker) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir).await;
    let done: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut stops = Vec::new();
    for who in ["a", "b"] {
        let (tx, rx) = oneshot::channel::<()>();
        let w = make(client(&server, who), done.clone());
        stops.push((
            tx,
            tokio::spawn(w.run(async move {
                let _ = rx.await;
            })),
        ));
    }
    let mut execs = Vec::new();
    for n in 1..=60 {
        execs.push(submit(&server, n).await);
    }
    for e in &execs {
        assert_eq!(
            wait_finished(&server, e).await,
            Outcome::Succeeded {
                data: json!({ "n": e.id.0 })
            }
        );
    }
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), 60, "{done:?}");
    assert_eq!(
        done.iter().collect::<HashSet<_>>().len(),
        60,
        "a job ran twice"
    );
    for (tx, j) in stops {
        let _ = tx.send(());
        j.await.unwrap();
    }
}

fn recording(
    done: Arc<Mutex<Vec<i64>>>,
    running: Arc<AtomicUsize>,
    capacity: usize,
) -> impl Fn(
    JobContext,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, JobFailure>> + Send>>
+ Send
+ Sync
+ 'static {
    move |job: JobContext| {
        let (done, running) = (done.clone(), running.clone());
        Box::pin(async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(
                now <= capacity,
                "{now} jobs at once in a worker of capacity {capacity}"
            );
            tokio::task::yield_now().await;
            running.fetch_sub(1, Ordering::SeqCst);
            done.lock().unwrap().push(job.job.id.0);
            Ok(job.input().clone())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_workers_of_capacity_three_run_each_job_once_within_capacity() {
    two_workers_run_each_once(|c, done| {
        Worker::new(c, vec!["echo".into()], recording(done, Arc::default(), 3)).capacity(3)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbatched_workers_still_run_each_job_once() {
    two_workers_run_each_once(|c, done| {
        Worker::new(c, vec!["echo".into()], recording(done, Arc::default(), 1)).batched(false)
    })
    .await;
}
