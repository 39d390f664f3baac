//! Behaviour of the `nats` adapter and its workers on a real nats-server with JetStream.
//!
//! Tests that use the shared server (`NATS_URL`, default `nats://127.0.0.1:4222`) report
//! themselves ignored with the reason when it does not answer; the broker-restart test starts
//! its own `nats-server` (from `NATS_SERVER_BIN` or `/usr/sbin/nats-server`) on a free port and
//! is ignored when the binary is absent. Every test uses a stream of its own and deletes it.

use std::collections::HashMap;
use std::future::Future;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distributor_core::{
    AbnormalKind, Attempt, AuthToken, Distributor, DistributorName, Execution, ExecutionId,
    Notification, NotificationRoute, Notifier, Outcome, RequestId, Status, TaskDescription, TaskId,
    Timeouts,
};
use distributor_nats::async_nats::jetstream::{self, AckKind, consumer};
use distributor_nats::{
    Activation, JobContext, JobFailure, NatsConfig, NatsDistributor, Records, Worker,
    WorkerOptions, async_nats,
};
use futures::StreamExt;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

type TestResult = Result<(), String>;

const DEADLINE: Duration = Duration::from_secs(30);

fn shared_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

/// Why the shared server cannot be used, if it cannot.
fn shared_unreachable() -> Option<String> {
    let url = shared_url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(3), async_nats::connect(&url)).await {
            Ok(Ok(c)) => match jetstream::new(c).get_stream("NO_SUCH_STREAM_PROBE").await {
                Err(e) if e.to_string().contains("not found") => None,
                Ok(_) => None,
                Err(e) => Some(format!("nats-server at {url} has no JetStream: {e}")),
            },
            Ok(Err(e)) => Some(format!("no nats-server at {url}: {e}")),
            Err(_) => Some(format!("no nats-server at {url}: connect timed out")),
        }
    })
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// One test's names on the broker.
#[derive(Debug, Clone)]
struct Env {
    url: String,
    stream: String,
    prefix: String,
}

impl Env {
    fn new(url: String) -> Self {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("{}_{n}_{nanos:x}", std::process::id());
        Self {
            url,
            stream: format!("T_{id}"),
            prefix: format!("t{id}"),
        }
    }

    fn config(&self, extra: Value) -> NatsConfig {
        let mut base = json!({
            "servers": [self.url],
            "stream": self.stream,
            "subject_prefix": self.prefix,
            "ack_wait_ms": 5000,
            "poll_interval_ms": 100,
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).expect("a valid NatsConfig")
    }

    fn worker_options(&self, name: &str, task_types: &[&str], capacity: usize) -> WorkerOptions {
        let mut o = WorkerOptions::new(
            vec![self.url.clone()],
            name,
            task_types.iter().map(|t| (*t).to_owned()).collect(),
        );
        o.stream = self.stream.clone();
        o.subject_prefix = self.prefix.clone();
        o.capacity = capacity;
        o
    }

    async fn js(&self) -> Result<jetstream::Context, String> {
        let c = async_nats::connect(&self.url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        Ok(jetstream::new(c))
    }

    async fn clean(&self) {
        if let Ok(js) = self.js().await {
            let _ = js.delete_stream(&self.stream).await;
            let _ = js.delete_key_value(format!("{}_EXEC", self.stream)).await;
        }
    }

    async fn messages_in_stream(&self) -> Result<u64, String> {
        let js = self.js().await?;
        let mut s = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| format!("get stream: {e}"))?;
        Ok(s.info()
            .await
            .map_err(|e| format!("stream info: {e}"))?
            .state
            .messages)
    }
}

/// Runs `f` on a runtime of its own, then deletes the test's stream and bucket.
fn run<F, Fut>(url: String, f: F) -> Result<(), Failed>
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = TestResult>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let env = Env::new(url);
    let result = rt.block_on(f(env.clone()));
    rt.block_on(env.clean());
    rt.shutdown_timeout(Duration::from_secs(1));
    result.map_err(Failed::from)
}

static NEXT_EXEC: AtomicUsize = AtomicUsize::new(1);

fn task(task_type: &str, input: Value) -> TaskDescription {
    let id = NEXT_EXEC.fetch_add(1, Ordering::Relaxed) as u64;
    TaskDescription {
        execution_id: ExecutionId(id),
        task_id: TaskId(id),
        attempt: Attempt(1),
        request_id: RequestId::random(),
        redispatch: false,
        distributor: DistributorName::new("test"),
        payload: json!({ "task_type": task_type, "input": input }),
        previous: None,
        notify: NotificationRoute {
            target: None,
            auth_token: AuthToken(format!("token-{id}")),
        },
        timeouts: Timeouts::default(),
        labels: Default::default(),
    }
}

async fn start(d: &NatsDistributor, t: &TaskDescription) -> Result<Execution, String> {
    let launch = d.run(t).await.map_err(|e| format!("run: {e}"))?;
    Ok(Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token: launch.token,
        handle: launch.handle,
    })
}

/// Polls `status` until `pred` holds or the deadline passes (transient errors are retried).
async fn wait_status(
    d: &NatsDistributor,
    e: &Execution,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> Result<Status, String> {
    let deadline = Instant::now() + DEADLINE;
    let mut last: Option<String>;
    loop {
        match d.status(e).await {
            Ok(s) if pred(&s) => return Ok(s),
            Ok(s) => last = Some(format!("{s:?}")),
            Err(err) if err.is_transient() => last = Some(format!("transient error {err}")),
            Err(err) => return Err(format!("status of {}: {err}", e.request_id)),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} did not become {what} within {DEADLINE:?} (last: {last:?})",
                e.request_id
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_finished(d: &NatsDistributor, e: &Execution) -> Result<Outcome, String> {
    match wait_status(d, e, "finished", |s| matches!(s, Status::Finished(_))).await? {
        Status::Finished(o) => Ok(o),
        _ => Err("unreachable".into()),
    }
}

/// Counts starts per request id.
#[derive(Debug, Clone, Default)]
struct Starts(Arc<Mutex<HashMap<String, Vec<String>>>>);

impl Starts {
    fn record(&self, request_id: &str, worker: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(request_id.to_owned())
            .or_default()
            .push(worker.to_owned());
    }
    fn of(&self, request_id: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(request_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// Starts an in-process worker; it stops when the returned sender is dropped or sent `true`.
async fn spawn_worker<H>(options: WorkerOptions, handler: H) -> Result<watch::Sender<bool>, String>
where
    H: Fn(JobContext) -> futures::future::BoxFuture<'static, Result<Value, JobFailure>>
        + Send
        + Sync
        + 'static,
{
    let worker = Worker::connect(options, handler)
        .await
        .map_err(|e| format!("worker connect: {e}"))?;
    let (tx, mut rx) = watch::channel(false);
    tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    Ok(tx)
}

fn counting(
    starts: Starts,
    name: &'static str,
) -> impl Fn(JobContext) -> futures::future::BoxFuture<'static, Result<Value, JobFailure>>
+ Send
+ Sync
+ 'static {
    move |job: JobContext| {
        let starts = starts.clone();
        Box::pin(async move {
            starts.record(&job.job.request_id, name);
            if let Some(ms) = job.input().get("sleep_ms").and_then(Value::as_u64) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Ok(json!({ "worker": name }))
        })
    }
}

// ---------------------------------------------------------------------------------------------

async fn three_competing_workers(env: Env) -> TestResult {
    let d = NatsDistributor::connect(
        env.config(json!({ "task_types": { "count": {} } })),
        Notifier::detached(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let starts = Starts::default();
    let mut stops = Vec::new();
    for name in ["w1", "w2", "w3"] {
        stops.push(
            spawn_worker(
                env.worker_options(name, &["count"], 4),
                counting(starts.clone(), name),
            )
            .await?,
        );
    }
    let mut executions = Vec::new();
    for i in 0..90 {
        executions.push(start(&d, &task("count", json!({ "i": i, "sleep_ms": 5 }))).await?);
    }
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for e in &executions {
        let o = wait_finished(&d, e).await?;
        let Outcome::Succeeded { data } = o else {
            return Err(format!("{} ended {o:?}", e.request_id));
        };
        let ran = starts.of(e.request_id.as_str());
        if ran.len() != 1 {
            return Err(format!(
                "{} was started {} times: {ran:?}",
                e.request_id,
                ran.len()
            ));
        }
        if data["worker"] != json!(ran[0]) {
            return Err(format!(
                "result {data} is not from the worker that ran it ({ran:?})"
            ));
        }
        *by_worker.entry(ran[0].clone()).or_default() += 1;
    }
    if by_worker.len() < 2 {
        return Err(format!("one worker took all the work: {by_worker:?}"));
    }
    if env.messages_in_stream().await? != 0 {
        return Err("messages are left in the work stream".into());
    }
    drop(stops);
    Ok(())
}

/// A worker that activates a delivery and then stops responding (a killed or hung process),
/// and later, when it wakes, tries to write its result.
async fn worker_killed_mid_job(env: Env) -> TestResult {
    let d = NatsDistributor::connect(
        env.config(json!({ "ack_wait_ms": 500, "task_types": { "job": {} } })),
        Notifier::detached(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let e = start(&d, &task("job", json!({}))).await?;
    // The zombie: pull the delivery and activate it, then go silent.
    let js = env.js().await?;
    let stream = js
        .get_stream(&env.stream)
        .await
        .map_err(|e| e.to_string())?;
    let consumer: consumer::PullConsumer = stream
        .get_consumer("w-job")
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| format!("fetch: {e}"))?;
    let msg = batch
        .next()
        .await
        .ok_or("no delivery for the zombie")?
        .map_err(|e| format!("delivery: {e}"))?;
    let info = msg.info().map_err(|e| e.to_string())?;
    let (seq, delivered) = (info.stream_sequence, info.delivered as u64);
    let job = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
    let records = Records::open(&js, &env.stream)
        .await
        .map_err(|e| e.to_string())?;
    let Activation::Activated(zombie) = records
        .activate(&job, seq, delivered, "zombie", Duration::from_millis(500))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Err("the zombie's first delivery did not activate".into());
    };
    wait_status(&d, &e, "Running", |s| matches!(s, Status::Running)).await?;
    // A healthy worker joins; after the zombie's lease lapses it gets the redelivery.
    let starts = Starts::default();
    let _w = spawn_worker(
        env.worker_options("healthy", &["job"], 2),
        counting(starts.clone(), "healthy"),
    )
    .await?;
    let o = wait_finished(&d, &e).await?;
    if o != (Outcome::Succeeded {
        data: json!({ "worker": "healthy" }),
    }) {
        return Err(format!("ended {o:?}, expected the healthy worker's result"));
    }
    if starts.of(e.request_id.as_str()).len() != 1 {
        return Err("the healthy worker did not run it exactly once".into());
    }
    // The zombie wakes up: its result and heartbeat are refused, and the outcome stays.
    match zombie
        .finish(Outcome::Succeeded {
            data: json!({ "worker": "zombie" }),
        })
        .await
    {
        Err(distributor_nats::NatsError::Superseded(_)) => {}
        other => {
            return Err(format!(
                "the zombie's late result was not refused: {other:?}"
            ));
        }
    }
    if zombie.heartbeat(None).await.is_ok() {
        return Err("the zombie's heartbeat was accepted after the takeover".into());
    }
    let _ = msg.ack_with(AckKind::Ack).await;
    let after = d.status(&e).await.map_err(|e| e.to_string())?;
    if after != Status::Finished(o) {
        return Err(format!(
            "after the zombie's late result the status is {after:?}"
        ));
    }
    Ok(())
}

async fn cancel_of_running_work(env: Env) -> TestResult {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let d = NatsDistributor::connect(
        env.config(json!({ "task_types": { "long": {} } })),
        Notifier::new(tx),
    )
    .await
    .map_err(|e| e.to_string())?;
    let dropped = Arc::new(AtomicUsize::new(0));
    let dropped2 = Arc::clone(&dropped);
    struct OnDrop(Arc<AtomicUsize>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let _w = spawn_worker(
        env.worker_options("w", &["long"], 2),
        move |_job: JobContext| {
            let guard = OnDrop(Arc::clone(&dropped2));
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }) as futures::future::BoxFuture<'static, _>
        },
    )
    .await?;
    let t = task("long", json!({}));
    let e = start(&d, &t).await?;
    wait_status(&d, &e, "Running", |s| matches!(s, Status::Running)).await?;
    d.cancel(&e).await.map_err(|e| format!("cancel: {e}"))?;
    let o = wait_finished(&d, &e).await?;
    if o.abnormal_kind() != Some(AbnormalKind::Cancelled) {
        return Err(format!("cancelled running work ended {o:?}"));
    }
    if dropped.load(Ordering::SeqCst) != 1 {
        return Err("the handler's future was not dropped on cancel".into());
    }
    // The push path reported it too, with the execution's auth token.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((id, n))) = tokio::time::timeout(left, rx.recv()).await else {
            return Err("no push reported the cancellation".into());
        };
        let n: Notification = n;
        if id != t.execution_id || n.attributes.get("auth_token") != Some(&t.notify.auth_token.0) {
            return Err(format!(
                "a push for {id} with attributes {:?}",
                n.attributes
            ));
        }
        if let Ok(Some(Status::Finished(p))) = d.handle_notification(&e, &n).await
            && p.abnormal_kind() == Some(AbnormalKind::Cancelled)
        {
            break;
        }
    }
    if env.messages_in_stream().await? != 0 {
        return Err("the cancelled work's message is left in the stream".into());
    }
    // A queued task cancelled before any worker takes it.
    let q = start(&d, &task("other", json!({}))).await?;
    d.cancel(&q).await.map_err(|e| format!("cancel: {e}"))?;
    let o = wait_finished(&d, &q).await?;
    if o.abnormal_kind() != Some(AbnormalKind::Cancelled) {
        return Err(format!("cancelled queued work ended {o:?}"));
    }
    if env.messages_in_stream().await? != 0 {
        return Err("the cancelled queued message is left in the stream".into());
    }
    Ok(())
}

async fn orchestrator_restart(env: Env) -> TestResult {
    let config = env.config(json!({ "ack_wait_ms": 20000, "task_types": { "gate": {} } }));
    let first = NatsDistributor::connect(config.clone(), Notifier::detached())
        .await
        .map_err(|e| e.to_string())?;
    let (open_tx, open_rx) = watch::channel(false);
    let starts = Starts::default();
    let s2 = starts.clone();
    let _w = spawn_worker(
        env.worker_options("w", &["gate"], 1),
        move |job: JobContext| {
            let mut open = open_rx.clone();
            let starts = s2.clone();
            Box::pin(async move {
                starts.record(&job.job.request_id, "w");
                let _ = open.wait_for(|o| *o).await;
                Ok(json!("done"))
            }) as futures::future::BoxFuture<'static, _>
        },
    )
    .await?;
    let running = start(&first, &task("gate", json!({}))).await?;
    wait_status(&first, &running, "Running", |s| {
        matches!(s, Status::Running)
    })
    .await?;
    let queued = start(&first, &task("gate", json!({}))).await?;
    wait_status(&first, &queued, "Pending", |s| matches!(s, Status::Pending)).await?;
    drop(first);
    // The new orchestrator process: another connection, nothing in memory.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let second = NatsDistributor::connect(config, Notifier::new(tx))
        .await
        .map_err(|e| e.to_string())?;
    let r = second.recover(&running).await.map_err(|e| e.to_string())?;
    if r != Status::Running {
        return Err(format!("recover of running work: {r:?}"));
    }
    let q = second.recover(&queued).await.map_err(|e| e.to_string())?;
    if q != Status::Pending {
        return Err(format!("recover of queued work: {q:?}"));
    }
    let _ = open_tx.send(true);
    for e in [&running, &queued] {
        let o = wait_finished(&second, e).await?;
        if o != (Outcome::Succeeded {
            data: json!("done"),
        }) {
            return Err(format!("{} ended {o:?}", e.request_id));
        }
        if starts.of(e.request_id.as_str()).len() != 1 {
            return Err(format!("{} did not run exactly once", e.request_id));
        }
    }
    // The recovered executions' results were pushed to the new instance.
    let mut finished = 0;
    let deadline = Instant::now() + DEADLINE;
    while finished < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((id, n))) = tokio::time::timeout(left, rx.recv()).await else {
            return Err(format!(
                "only {finished} of 2 results were pushed after the restart"
            ));
        };
        let e = if id == running.id { &running } else { &queued };
        if let Ok(Some(Status::Finished(_))) = second.handle_notification(e, &n).await {
            finished += 1;
        }
    }
    Ok(())
}

async fn max_deliver_exhausted(env: Env) -> TestResult {
    let d = NatsDistributor::connect(
        env.config(json!({ "ack_wait_ms": 300, "max_deliver": 2, "task_types": { "doomed": {} } })),
        Notifier::detached(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let e = start(&d, &task("doomed", json!({}))).await?;
    // Each delivery is taken by a worker that activates it and dies.
    let js = env.js().await?;
    let stream = js
        .get_stream(&env.stream)
        .await
        .map_err(|e| e.to_string())?;
    let consumer: consumer::PullConsumer = stream
        .get_consumer("w-doomed")
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let records = Records::open(&js, &env.stream)
        .await
        .map_err(|e| e.to_string())?;
    for expected in 1..=2u64 {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        let msg = batch
            .next()
            .await
            .ok_or(format!("no delivery {expected}"))?
            .map_err(|e| format!("delivery: {e}"))?;
        let info = msg.info().map_err(|e| e.to_string())?;
        if info.delivered as u64 != expected {
            return Err(format!(
                "delivery {} where {expected} was expected",
                info.delivered
            ));
        }
        let job = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
        let a = records
            .activate(
                &job,
                info.stream_sequence,
                expected,
                &format!("dies-{expected}"),
                Duration::from_millis(300),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !matches!(a, Activation::Activated(_)) {
            return Err(format!("delivery {expected} did not activate: {a:?}"));
        }
    }
    let o = wait_finished(&d, &e).await?;
    let Outcome::Abnormal {
        kind: AbnormalKind::Crashed,
        reason,
    } = &o
    else {
        return Err(format!("exhausted work ended {o:?}, expected Crashed"));
    };
    if !reason.contains("max_deliver 2") || !reason.contains("dies-2") {
        return Err(format!("the reason does not say why: {reason}"));
    }
    // The message was removed: the stream is clean.
    let deadline = Instant::now() + DEADLINE;
    while env.messages_in_stream().await? != 0 {
        if Instant::now() >= deadline {
            return Err("the exhausted message is left in the stream".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn run_is_idempotent_outside_the_duplicate_window(env: Env) -> TestResult {
    // A repeat published after the broker forgot the request id is a second message; the
    // activation keeps the work from running twice and the duplicate is dropped.
    let d = NatsDistributor::connect(
        env.config(json!({ "duplicate_window_ms": 1000, "task_types": { "count": {} } })),
        Notifier::detached(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let t = task("count", json!({}));
    let first = start(&d, &t).await?;
    // Bypass the dedupe window: publish the same request again as a new message.
    let js = env.js().await?;
    let raw = js
        .get_stream(&env.stream)
        .await
        .map_err(|e| e.to_string())?
        .get_raw_message(first.token.as_str().parse().map_err(|_| "token")?)
        .await
        .map_err(|e| e.to_string())?;
    js.publish(raw.subject.clone(), raw.payload.clone())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let starts = Starts::default();
    let _w = spawn_worker(
        env.worker_options("w", &["count"], 4),
        counting(starts.clone(), "w"),
    )
    .await?;
    wait_finished(&d, &first).await?;
    let deadline = Instant::now() + DEADLINE;
    while env.messages_in_stream().await? != 0 {
        if Instant::now() >= deadline {
            return Err("the duplicate message was not dropped".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran = starts.of(t.request_id.as_str());
    if ran.len() != 1 {
        return Err(format!(
            "two messages of one request ran {} times",
            ran.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// A nats-server of the test's own, on a free port, with its store in a temp dir.
struct OwnServer {
    bin: String,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnServer {
    fn start() -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("free port: {e}"))?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut s = Self {
            bin: server_bin(),
            port,
            dir,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() >= deadline {
                return Err("the test's nats-server did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn broker_connection_dropped_and_restored(
    server: Arc<Mutex<OwnServer>>,
    env: Env,
) -> TestResult {
    let d = NatsDistributor::connect(
        env.config(json!({ "ack_wait_ms": 10000, "task_types": { "count": {} } })),
        Notifier::detached(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let starts = Starts::default();
    let _w1 = spawn_worker(
        env.worker_options("w1", &["count"], 4),
        counting(starts.clone(), "w1"),
    )
    .await?;
    let _w2 = spawn_worker(
        env.worker_options("w2", &["count"], 4),
        counting(starts.clone(), "w2"),
    )
    .await?;
    let mut executions = Vec::new();
    for i in 0..20 {
        executions.push(start(&d, &task("count", json!({ "i": i, "sleep_ms": 100 }))).await?);
    }
    // Some work has started, some is queued: drop the broker and bring it back.
    wait_status(&d, &executions[0], "Running or finished", |s| {
        !matches!(s, Status::Pending)
    })
    .await?;
    {
        let s = Arc::clone(&server);
        tokio::task::spawn_blocking(move || {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.kill();
            s.spawn()
        })
        .await
        .map_err(|e| e.to_string())??;
    }
    // More work after the restart, through the reconnected client.
    for i in 20..30 {
        let t = task("count", json!({ "i": i }));
        let deadline = Instant::now() + DEADLINE;
        let e = loop {
            match start(&d, &t).await {
                Ok(e) => break e,
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    let mut t2 = t.clone();
                    t2.redispatch = true;
                    if let Ok(e) = start(&d, &t2).await {
                        break e;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err),
            }
        };
        executions.push(e);
    }
    for e in &executions {
        let o = wait_finished(&d, e).await?;
        if !o.is_success() {
            return Err(format!("{} ended {o:?}", e.request_id));
        }
        let ran = starts.of(e.request_id.as_str());
        if ran.len() != 1 {
            return Err(format!(
                "{} was started {} times: {ran:?}",
                e.request_id,
                ran.len()
            ));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let unreachable = shared_unreachable();
    if let Some(r) = &unreachable {
        eprintln!("nats: tests on the shared server are ignored: {r}");
    }
    let url = shared_url();
    let shared = |name: &str, f: fn(Env) -> futures::future::BoxFuture<'static, TestResult>| {
        let url = url.clone();
        let reason = unreachable.clone();
        Trial::test(format!("nats::{name}"), move || {
            if let Some(r) = reason {
                return Err(format!("ignored: {r}").into());
            }
            run(url, f)
        })
        .with_ignored_flag(unreachable.is_some())
    };
    let bin = server_bin();
    let has_bin = std::path::Path::new(&bin).is_file();
    if !has_bin {
        eprintln!(
            "nats::broker_connection_dropped_and_restored is ignored: no nats-server at {bin}"
        );
    }
    let trials = vec![
        shared("three_competing_workers_each_job_done_once", |e| {
            Box::pin(three_competing_workers(e))
        }),
        shared(
            "worker_killed_mid_job_is_redelivered_and_its_late_result_ignored",
            |e| Box::pin(worker_killed_mid_job(e)),
        ),
        shared("cancel_of_running_work", |e| {
            Box::pin(cancel_of_running_work(e))
        }),
        shared("orchestrator_restart_with_work_queued_and_running", |e| {
            Box::pin(orchestrator_restart(e))
        }),
        shared(
            "max_deliver_exhausted_ends_crashed_and_cleans_the_stream",
            |e| Box::pin(max_deliver_exhausted(e)),
        ),
        shared("run_is_idempotent_outside_the_duplicate_window", |e| {
            Box::pin(run_is_idempotent_outside_the_duplicate_window(e))
        }),
        Trial::test("nats::broker_connection_dropped_and_restored", move || {
            let server = OwnServer::start()?;
            let url = server.url();
            let server = Arc::new(Mutex::new(server));
            run(url, move |env| {
                broker_connection_dropped_and_restored(server, env)
            })
        })
        .with_ignored_flag(!has_bin),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
