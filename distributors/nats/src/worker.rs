//! The worker SDK: pull work of some task types from the work queue, activate it, run a
//! handler, report progress and the result, and ack only once the result is stored.
//!
//! ```text
//! pull (durable consumer w-<task type>, shared by every worker of that type)
//!   → activate: compare-and-set on the execution record (first activation wins; a
//!     redelivery takes over from a holder silent for half a lease; a finished record or a duplicate
//!     message is acked and dropped)
//!   → handler, with `+WPI` (in progress) and a record heartbeat every ack_wait / 3; a
//!     heartbeat refused because another delivery took over stops the handler
//!   → result written to the record (compare-and-set: a superseded worker's late result is
//!     refused), then ack; permanent failure → written, then `+TERM`; transient failure →
//!     `-NAK` with the handler's delay (on the last delivery: written as failed, then `+TERM`)
//! cancel: the worker watches `cancel.>` in the bucket; a cancel request for work it runs
//!   drops the handler's future and records `Cancelled`.
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use distributor_core::{AbnormalKind, Outcome};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};

use crate::config::{Credentials, Layout, request_key};
use crate::core::{Records, Write, connect, now_ms, open_bucket};
use crate::error::NatsError;
use crate::wire::{ExecRecord, JobMessage, RecordState};

/// How a handler failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFailure {
    /// Retrying cannot help: the execution ends `Failed` with the message.
    Permanent(String),
    /// Another delivery may succeed: the work is redelivered after `retry_after` (while
    /// deliveries are left; on the last one it ends `Failed`).
    Transient {
        /// What went wrong.
        message: String,
        /// How long the broker waits before delivering it again.
        retry_after: Duration,
    },
}

impl JobFailure {
    /// A permanent failure.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent(message.into())
    }
    /// A transient failure, redelivered after `retry_after`.
    pub fn transient(message: impl Into<String>, retry_after: Duration) -> Self {
        Self::Transient {
            message: message.into(),
            retry_after,
        }
    }
}

/// What activating a delivery found.
#[derive(Debug)]
pub enum Activation {
    /// This delivery owns the work now.
    Activated(Box<Lease>),
    /// The work already ended: drop (ack) the message.
    Finished,
    /// Another message of the same request (a repeat published outside the duplicate window)
    /// owns the work: drop (ack) this one.
    Duplicate,
    /// Another delivery of this message holds the work and is alive: leave the message alone
    /// (the broker delivers it again after the lease; by then it has ended or its holder is
    /// gone).
    Held,
}

/// A worker's hold on one execution record, from its activation on: every write is a
/// compare-and-set on the revision it last wrote.
#[derive(Debug)]
pub struct Lease {
    records: Records,
    request_id: String,
    worker: String,
    delivered: u64,
    held: tokio::sync::Mutex<(ExecRecord, u64)>,
}

impl Lease {
    /// The delivery number this lease holds.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Rewrites the record (with `progress` if given), proving the lease is still held.
    ///
    /// Errors: [`NatsError::Superseded`] if another delivery took the work over or it ended;
    /// broker errors (transient) otherwise.
    pub async fn heartbeat(&self, progress: Option<Value>) -> Result<(), NatsError> {
        let mut held = self.held.lock().await;
        let mut record = held.0.clone();
        if let RecordState::Active { progress: p, .. } = &mut record.state
            && progress.is_some()
        {
            *p = progress;
        }
        match self
            .records
            .update(&self.request_id, &record, held.1)
            .await?
        {
            Write::Done(rev) => {
                *held = (record, rev);
                Ok(())
            }
            Write::Conflict => Err(NatsError::Superseded(format!(
                "delivery {} of {} on worker {}",
                self.delivered, self.request_id, self.worker
            ))),
        }
    }

    /// Writes the result. After it the record never changes again.
    ///
    /// Errors: [`NatsError::Superseded`] if another delivery took the work over (this
    /// worker's late result is refused) or it already ended; broker errors (transient).
    pub async fn finish(&self, outcome: Outcome) -> Result<(), NatsError> {
        let mut held = self.held.lock().await;
        let record = ExecRecord {
            state: RecordState::Finished {
                outcome,
                worker: Some(self.worker.clone()),
            },
            ..held.0.clone()
        };
        match self
            .records
            .update(&self.request_id, &record, held.1)
            .await?
        {
            Write::Done(rev) => {
                *held = (record, rev);
                Ok(())
            }
            Write::Conflict => Err(NatsError::Superseded(format!(
                "result of delivery {} of {} on worker {}",
                self.delivered, self.request_id, self.worker
            ))),
        }
    }
}

impl Records {
    /// Opens the record bucket of `stream` (it MUST exist: the adapter creates it).
    pub async fn open(js: &jetstream::Context, stream: &str) -> Result<Self, NatsError> {
        open_bucket(js, &Layout::new(stream, ""))
            .await
            .map(Self::new)
    }

    /// Activates delivery `delivered` of message `seq` carrying `job` for `worker`, whose
    /// consumer's lease (ack wait) is `lease`.
    ///
    /// The first activation of a request wins. A later delivery of the same message takes the
    /// work over only when the holder's record has been silent for half a lease (a live holder
    /// rewrites it every third of one), so a redelivery the broker makes while the holder is
    /// alive (after a broker restart lost its delivery state) does not run the work twice.
    /// A finished record or another message of the same request means: drop this message.
    /// See [`Activation`].
    pub async fn activate(
        &self,
        job: &JobMessage,
        seq: u64,
        delivered: u64,
        worker: &str,
        lease: Duration,
    ) -> Result<Activation, NatsError> {
        let active = ExecRecord {
            execution_id: job.execution_id,
            auth_token: job.auth_token.clone(),
            seq,
            activation: job.activation.clone(),
            state: RecordState::Active {
                worker: worker.to_owned(),
                delivered,
                holder: hex::encode(rand::random::<[u8; 8]>()),
                progress: None,
            },
        };
        let hold = |rev: u64| Lease {
            records: self.clone(),
            request_id: job.request_id.clone(),
            worker: worker.to_owned(),
            delivered,
            held: tokio::sync::Mutex::new((active.clone(), rev)),
        };
        let half_lease_ms = i64::try_from(lease.as_millis() / 2).unwrap_or(i64::MAX);
        // Most deliveries are first activations: try the create before reading.
        if let Write::Done(rev) = self.create(&job.request_id, &active).await? {
            return Ok(Activation::Activated(Box::new(hold(rev))));
        }
        loop {
            let write = match self.read_stored(&job.request_id).await? {
                None => self.create(&job.request_id, &active).await?,
                Some(s) if s.record.is_finished() => return Ok(Activation::Finished),
                Some(s) if s.record.seq != seq || s.record.activation != job.activation => {
                    return Ok(Activation::Duplicate);
                }
                // Our own write whose answer was lost.
                Some(s) if s.record == active => {
                    return Ok(Activation::Activated(Box::new(hold(s.revision))));
                }
                Some(s) if now_ms() - s.written_ms > half_lease_ms => {
                    self.update(&job.request_id, &active, s.revision).await?
                }
                Some(_) => return Ok(Activation::Held),
            };
            if let Write::Done(rev) = write {
                return Ok(Activation::Activated(Box::new(hold(rev))));
            }
        }
    }
}

/// What a handler receives.
#[derive(Debug)]
pub struct JobContext {
    /// The work message.
    pub job: Arc<JobMessage>,
    /// The delivery number (1 for the first delivery).
    pub delivered: u64,
    lease: Arc<Lease>,
    cancel: watch::Receiver<bool>,
}

impl JobContext {
    /// The handler's input.
    pub fn input(&self) -> &Value {
        &self.job.input
    }
    /// Records progress (any JSON) on the execution record.
    ///
    /// Errors: [`NatsError::Superseded`] when the work was taken over (the handler SHOULD
    /// stop); broker errors (transient).
    pub async fn progress(&self, progress: Value) -> Result<(), NatsError> {
        self.lease.heartbeat(Some(progress)).await
    }
    /// Whether a cancel was asked for. The worker also drops the handler's future then, so a
    /// handler only needs this to clean up between awaits.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }
}

/// A handler: called once per activated delivery.
pub trait Handler: Send + Sync + 'static {
    /// Runs the work.
    fn call(
        &self,
        job: JobContext,
    ) -> futures::future::BoxFuture<'static, Result<Value, JobFailure>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, JobFailure>> + Send + 'static,
{
    fn call(
        &self,
        job: JobContext,
    ) -> futures::future::BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(self(job))
    }
}

/// Where a worker connects and what it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOptions {
    /// Server URLs.
    pub servers: Vec<String>,
    /// Credentials.
    pub credentials: Credentials,
    /// The work stream (the distributor's `stream`).
    pub stream: String,
    /// The subject prefix (the distributor's `subject_prefix`; only used for naming).
    pub subject_prefix: String,
    /// This worker's name, recorded on the work it activates.
    pub name: String,
    /// The task types it serves.
    pub task_types: Vec<String>,
    /// How many pieces of work it runs at once. Default 16.
    pub capacity: usize,
}

impl WorkerOptions {
    /// Options for a worker `name` serving `task_types` on `servers`, with the default stream
    /// (`DIST_JOBS`), prefix (`dist`), no credentials and capacity 16.
    pub fn new(servers: Vec<String>, name: impl Into<String>, task_types: Vec<String>) -> Self {
        Self {
            servers,
            credentials: Credentials::None,
            stream: "DIST_JOBS".into(),
            subject_prefix: "dist".into(),
            name: name.into(),
            task_types,
            capacity: 16,
        }
    }
}

/// A worker process's pool: pulls, activates and runs work. Build with [`Worker::connect`],
/// then [`run`](Worker::run).
pub struct Worker {
    options: WorkerOptions,
    js: jetstream::Context,
    handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

type Cancels = Arc<Mutex<HashMap<String, watch::Sender<bool>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything one job's driver needs.
struct Ctx {
    name: String,
    records: Records,
    handler: Arc<dyn Handler>,
    cancels: Cancels,
    ack_wait: Duration,
    max_deliver: u64,
}

impl Worker {
    /// Connects (waiting for the broker if it is down).
    ///
    /// Errors: a bad server URL, unreadable credentials, refused credentials (permanent).
    pub async fn connect(options: WorkerOptions, handler: impl Handler) -> Result<Self, NatsError> {
        let client = connect(
            &options.servers,
            &options.credentials,
            &format!("worker {}", options.name),
            true,
        )
        .await?;
        Ok(Self {
            js: jetstream::new(client),
            options,
            handler: Arc::new(handler),
        })
    }

    /// Runs until `shutdown` completes, then stops pulling and waits for the work in hand to
    /// end (its results are written and acked as usual).
    ///
    /// Waits for the stream, bucket and consumers to exist (the distributor creates them).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), NatsError> {
        let layout = Layout::new(
            self.options.stream.clone(),
            self.options.subject_prefix.clone(),
        );
        let capacity = self.options.capacity.max(1);
        let slots = Arc::new(Semaphore::new(capacity));
        let cancels: Cancels = Arc::default();
        let mut tasks = Vec::new();
        let setup = async {
            let kv = wait_for(|| open_bucket(&self.js, &layout)).await;
            let records = Records::new(kv.clone());
            tasks.push(tokio::spawn(watch_cancels(kv, Arc::clone(&cancels))));
            let stream = wait_for(|| async {
                self.js
                    .get_stream(&layout.stream)
                    .await
                    .map_err(|e| NatsError::broker("open the work stream")(e.into()))
            })
            .await;
            for task_type in &self.options.task_types {
                tasks.push(tokio::spawn(pull(
                    stream.clone(),
                    layout.consumer(task_type),
                    capacity,
                    Arc::clone(&slots),
                    Arc::new(Ctx {
                        name: self.options.name.clone(),
                        records: records.clone(),
                        handler: Arc::clone(&self.handler),
                        cancels: Arc::clone(&cancels),
                        ack_wait: Duration::ZERO,
                        max_deliver: 0,
                    }),
                )));
            }
        };
        let mut shutdown = std::pin::pin!(shutdown);
        tokio::select! {
            () = setup => shutdown.await,
            () = &mut shutdown => {}
        }
        for t in &tasks {
            t.abort();
        }
        // Wait for the work in hand.
        let _ = slots
            .acquire_many(u32::try_from(capacity).unwrap_or(u32::MAX))
            .await;
        Ok(())
    }
}

/// Retries `f` every 250 ms until it succeeds.
async fn wait_for<T, F, Fut>(f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, NatsError>>,
{
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::debug!(error = %e, "nats worker: waiting");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Follows the cancel requests and signals the work they name.
async fn watch_cancels(kv: kv::Store, cancels: Cancels) {
    loop {
        let mut w = match kv.watch("cancel.>").await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %e, "nats worker: cannot watch cancels; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        while let Some(Ok(entry)) = w.next().await {
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if let Some(key) = entry.key.strip_prefix("cancel.")
                && let Some(tx) = lock(&cancels).get(key)
            {
                let _ = tx.send(true);
            }
        }
    }
}

/// Pulls the work of one consumer and drives each piece on its own task.
async fn pull(
    stream: stream::Stream,
    consumer_name: String,
    batch: usize,
    slots: Arc<Semaphore>,
    template: Arc<Ctx>,
) {
    let consumer: consumer::PullConsumer = wait_for(|| async {
        stream
            .get_consumer(&consumer_name)
            .await
            .map_err(|e| NatsError::broker("open the consumer")(e))
    })
    .await;
    let config = &consumer.cached_info().config;
    let ctx = Arc::new(Ctx {
        name: template.name.clone(),
        records: template.records.clone(),
        handler: Arc::clone(&template.handler),
        cancels: Arc::clone(&template.cancels),
        ack_wait: config.ack_wait,
        max_deliver: u64::try_from(config.max_deliver).unwrap_or(u64::MAX),
    });
    loop {
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "nats worker: cannot pull; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let mut errors = 0;
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            match messages.next().await {
                Some(Ok(msg)) => {
                    errors = 0;
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        drive(&ctx, msg).await;
                        drop(slot);
                    });
                }
                Some(Err(e)) => {
                    errors += 1;
                    tracing::debug!(error = %e, "nats worker: pull error");
                    if errors >= 3 {
                        break;
                    }
                }
                None => break,
            }
        }
    }
}

/// How a handler run ended.
enum Ended {
    Ran(Result<Value, JobFailure>),
    Cancelled,
    Expired,
    Lost,
}

/// Acks with `kind`, retrying a few times (a lost ack means a redelivery, which finds the
/// record finished and drops it).
async fn settle(msg: &jetstream::Message, kind: AckKind) {
    for attempt in 0..5u64 {
        if msg.double_ack_with(kind).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    tracing::warn!("nats worker: cannot ack; the broker will redeliver and it will be dropped");
}

/// Writes the result, retrying broker errors until it is stored or refused.
async fn finish(lease: &Lease, outcome: Outcome) -> bool {
    let mut backoff = Duration::from_millis(50);
    loop {
        match lease.finish(outcome.clone()).await {
            Ok(()) => return true,
            Err(NatsError::Superseded(what)) => {
                tracing::info!(%what, "nats worker: late result ignored (taken over)");
                return false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "nats worker: cannot store the result; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Drives one delivery from activation to ack.
async fn drive(ctx: &Ctx, msg: jetstream::Message) {
    let (seq, delivered) = match msg.info() {
        Ok(i) => (
            i.stream_sequence,
            u64::try_from(i.delivered).unwrap_or(u64::MAX),
        ),
        Err(_) => return,
    };
    let job: JobMessage = match serde_json::from_slice(&msg.payload) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(seq, error = %e, "nats worker: unreadable work message; terminating it");
            settle(&msg, AckKind::Term).await;
            return;
        }
    };
    let lease = match ctx
        .records
        .activate(&job, seq, delivered, &ctx.name, ctx.ack_wait)
        .await
    {
        Ok(Activation::Activated(l)) => Arc::<Lease>::from(l),
        Ok(Activation::Finished | Activation::Duplicate) => {
            settle(&msg, AckKind::Ack).await;
            return;
        }
        Ok(Activation::Held) => return,
        Err(e) => {
            tracing::debug!(error = %e, "nats worker: cannot activate; redelivering");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
    };
    let key = request_key(&job.request_id);
    let (tx, mut rx) = watch::channel(false);
    lock(&ctx.cancels).insert(key.clone(), tx);
    let ended = run_handler(ctx, &msg, &job, &lease, delivered, &mut rx).await;
    lock(&ctx.cancels).remove(&key);
    let worker = &ctx.name;
    match ended {
        Ended::Ran(Ok(data)) => {
            if finish(&lease, Outcome::Succeeded { data }).await {
                settle(&msg, AckKind::Ack).await;
            }
        }
        Ended::Ran(Err(JobFailure::Permanent(m))) => {
            if finish(&lease, Outcome::abnormal(AbnormalKind::Failed, m)).await {
                settle(&msg, AckKind::Term).await;
            }
        }
        Ended::Ran(Err(JobFailure::Transient {
            message,
            retry_after,
        })) => {
            if delivered >= ctx.max_deliver {
                let reason = format!(
                    "{message} (transient, on delivery {delivered} of {}: none left)",
                    ctx.max_deliver
                );
                if finish(&lease, Outcome::abnormal(AbnormalKind::Failed, reason)).await {
                    settle(&msg, AckKind::Term).await;
                }
            } else {
                let _ = msg.ack_with(AckKind::Nak(Some(retry_after))).await;
            }
        }
        Ended::Cancelled => {
            let reason = format!("cancelled while running on worker {worker}");
            if finish(&lease, Outcome::abnormal(AbnormalKind::Cancelled, reason)).await {
                settle(&msg, AckKind::Ack).await;
            }
        }
        Ended::Expired => {
            let reason = format!("worker {worker} received it after its start deadline");
            if finish(&lease, Outcome::abnormal(AbnormalKind::Expired, reason)).await {
                settle(&msg, AckKind::Ack).await;
            }
        }
        Ended::Lost => {}
    }
}

/// Completes when a cancel is signalled (never if the signal's sender is gone).
async fn cancelled(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run_handler(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &JobMessage,
    lease: &Arc<Lease>,
    delivered: u64,
    rx: &mut watch::Receiver<bool>,
) -> Ended {
    match ctx.records.cancel_requested(&job.request_id).await {
        Ok(true) => return Ended::Cancelled,
        Ok(false) => {}
        Err(_) => return Ended::Lost,
    }
    if job.start_by_ms.is_some_and(|t| now_ms() > t) {
        return Ended::Expired;
    }
    let context = JobContext {
        job: Arc::new(job.clone()),
        delivered,
        lease: Arc::clone(lease),
        cancel: rx.clone(),
    };
    let mut work = ctx.handler.call(context);
    let period = (ctx.ack_wait / 3).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            r = &mut work => return Ended::Ran(r),
            () = cancelled(rx) => return Ended::Cancelled,
            _ = tick.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
                if let Err(NatsError::Superseded(what)) = lease.heartbeat(None).await {
                    tracing::info!(%what, "nats worker: work taken over; stopping it");
                    return Ended::Lost;
                }
            }
        }
    }
}
