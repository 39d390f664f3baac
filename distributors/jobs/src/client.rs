//! The worker SDK (feature `worker`): a typed client for the Jobs API and a worker loop.
//!
//! [`Worker::run`] runs up to `capacity` jobs at once. It claims them in batches (`/v1/claims`,
//! carrying the results of finished jobs; see [`Worker::batched`]), heartbeats each in
//! the background at a third of the lease, runs the [`Handler`], and reports `complete` or
//! `error`. When a heartbeat answers "cancelled" the handler is dropped (so anything it owns,
//! e.g. a child process spawned with `kill_on_drop`, stops) and the job is released, which the
//! server records as `Cancelled`. Connection errors and 5xx answers are retried with
//! exponential backoff and jitter. On shutdown a slot stops claiming and either finishes its
//! job or releases it, per [`ShutdownPolicy`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use url::Url;

use crate::wire::{
    ActivateRequest, ApiError, ClaimManyRequest, ClaimManyResponse, ClaimRequest, ClaimResponse,
    ClaimedJob, CompleteItem, CompleteManyRequest, CompleteManyResponse, CompleteRequest,
    ErrorCode, ErrorRequest, FinalReply, HeartbeatRequest, JobId, LeaseReply, MAX_BATCH,
    ReleaseRequest, UpdateRequest,
};

/// A failed Jobs API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the connection broke. Retry with backoff.
    #[error("cannot reach the jobs server: {0}")]
    Connection(#[source] reqwest::Error),
    /// The server answered with an error.
    #[error("jobs server answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The API error code, when the body had one.
        code: Option<ErrorCode>,
        /// The server's message.
        message: String,
    },
    /// The answer could not be read.
    #[error("unreadable answer from the jobs server: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether repeating the call may succeed: connection errors and 5xx answers.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connection(_) => true,
            Self::Refused { status, .. } => *status >= 500,
            Self::Protocol(_) => false,
        }
    }
    /// The API error code, if the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

/// A typed client of the Jobs API for one worker (one bearer token).
#[derive(Debug, Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: Url,
    auth: String,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(15);

impl WorkerClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:8089/`) presenting `token`.
    pub fn new(base: Url, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            http,
            base,
            auth: format!("Bearer {token}"),
        }
    }

    /// A client of the server at the URL `base`, or `Protocol` if it is not a URL.
    pub fn with_base(base: &str, token: &str) -> Result<Self, ClientError> {
        let base = Url::parse(base)
            .map_err(|e| ClientError::Protocol(format!("bad server URL `{base}`: {e}")))?;
        Ok(Self::new(base, token))
    }

    async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| ClientError::Protocol(format!("bad URL for `{path}`: {e}")))?;
        let resp = self
            .http
            .post(url)
            .header(reqwest::header::AUTHORIZATION, &self.auth)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(ClientError::Connection)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(ClientError::Connection)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(e.to_string()));
        }
        let (code, message) = match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => (Some(e.error.code), e.error.message),
            Err(_) => (None, String::from_utf8_lossy(&bytes).into_owned()),
        };
        Err(ClientError::Refused {
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Claims the next job (`None` if the wait ended without one).
    pub async fn claim(&self, req: &ClaimRequest) -> Result<Option<ClaimedJob>, ClientError> {
        let wait = Duration::from_millis(req.wait_ms.unwrap_or(60_000));
        let r: ClaimResponse = self.post("v1/claim", req, wait + CALL_TIMEOUT).await?;
        Ok(r.job)
    }

    /// Claims up to `req.max` jobs in one request, after completing the results in
    /// `req.complete` (`POST /v1/claims`). A server without the batch endpoints answers 404.
    pub async fn claim_many(
        &self,
        req: &ClaimManyRequest,
    ) -> Result<ClaimManyResponse, ClientError> {
        let wait = Duration::from_millis(req.wait_ms.unwrap_or(60_000));
        self.post("v1/claims", req, wait + CALL_TIMEOUT).await
    }

    /// Reports several results in one request (`POST /v1/complete`); each item gets its own
    /// reply.
    pub async fn complete_many(
        &self,
        req: &CompleteManyRequest,
    ) -> Result<CompleteManyResponse, ClientError> {
        self.post("v1/complete", req, CALL_TIMEOUT).await
    }

    /// Claims job `id` with its activation token; the first claim wins.
    pub async fn activate(&self, id: JobId, token: &str) -> Result<ClaimedJob, ClientError> {
        let body = ActivateRequest {
            activation_token: token.to_owned(),
        };
        let r: ClaimResponse = self
            .post(&format!("v1/jobs/{id}/claim"), &body, CALL_TIMEOUT)
            .await?;
        r.job
            .ok_or_else(|| ClientError::Protocol("claim answered without a job".into()))
    }

    /// Extends the lease; the answer says whether the job was cancelled.
    pub async fn heartbeat(
        &self,
        id: JobId,
        req: &HeartbeatRequest,
    ) -> Result<LeaseReply, ClientError> {
        self.post(&format!("v1/jobs/{id}/heartbeat"), req, CALL_TIMEOUT)
            .await
    }

    /// Reports stage/progress/message (also extends the lease).
    pub async fn update(&self, id: JobId, req: &UpdateRequest) -> Result<LeaseReply, ClientError> {
        self.post(&format!("v1/jobs/{id}/update"), req, CALL_TIMEOUT)
            .await
    }

    /// Reports a failure (transient: offered again; permanent: the execution fails).
    pub async fn error(&self, id: JobId, req: &ErrorRequest) -> Result<FinalReply, ClientError> {
        self.post(&format!("v1/jobs/{id}/error"), req, CALL_TIMEOUT)
            .await
    }

    /// Reports the result.
    pub async fn complete(
        &self,
        id: JobId,
        req: &CompleteRequest,
    ) -> Result<FinalReply, ClientError> {
        self.post(&format!("v1/jobs/{id}/complete"), req, CALL_TIMEOUT)
            .await
    }

    /// Gives the job back (cancel acknowledged, or shutting down).
    pub async fn release(
        &self,
        id: JobId,
        req: &ReleaseRequest,
    ) -> Result<FinalReply, ClientError> {
        self.post(&format!("v1/jobs/{id}/release"), req, CALL_TIMEOUT)
            .await
    }
}

/// Why a handler failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// What went wrong.
    pub message: String,
    /// `true`: the execution fails; `false`: the job is offered again while its budget lasts.
    pub permanent: bool,
}

impl JobFailure {
    /// A failure that another attempt may not repeat.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
    /// A failure no retry will fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }
}

/// What a handler gets: the claimed job and a way to report progress.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job as claimed.
    pub job: ClaimedJob,
    client: WorkerClient,
}

impl JobContext {
    /// The job's free-form input.
    pub fn input(&self) -> &Value {
        &self.job.input
    }
    /// Reports stage, progress (0..=1) and a message. Returns whether the job was cancelled.
    pub async fn update(
        &self,
        stage: Option<&str>,
        progress: Option<f64>,
        message: Option<&str>,
    ) -> Result<bool, ClientError> {
        let req = UpdateRequest {
            lease: self.job.lease.id.clone(),
            stage: stage.map(str::to_owned),
            progress,
            message: message.map(str::to_owned),
        };
        Ok(self.client.update(self.job.id, &req).await?.cancelled)
    }
}

/// Runs jobs. Implemented for every `Fn(JobContext) -> impl Future<Output = Result<Value,
/// JobFailure>>`. The future is dropped if the job is cancelled or its lease is lost, so it
/// MUST be cancel-safe (spawn child processes with `kill_on_drop(true)`).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one job; `Ok(result)` completes it.
    async fn handle(&self, job: JobContext) -> Result<Value, JobFailure>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, JobFailure>> + Send + 'static,
{
    async fn handle(&self, job: JobContext) -> Result<Value, JobFailure> {
        self(job).await
    }
}

/// What a slot does with its current job on shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShutdownPolicy {
    /// Let the handler finish and report (default).
    #[default]
    Finish,
    /// Drop the handler and release the job at once, for another worker to take.
    Release,
}

/// A worker: claims jobs of its task types and runs them with its handler.
pub struct Worker {
    client: WorkerClient,
    task_types: Vec<String>,
    capacity: u32,
    handler: Arc<dyn Handler>,
    policy: ShutdownPolicy,
    claim_wait: Duration,
    batched: bool,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("task_types", &self.task_types)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff with full jitter, 50 ms doubling to 5 s.
#[derive(Debug)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = 50u64.saturating_mul(1 << self.0.min(7)).min(5_000);
        self.0 = self.0.saturating_add(1);
        Duration::from_millis(cap / 2 + rand::random_range(0..=cap / 2))
    }
}

enum Interrupt {
    Cancelled,
    LeaseLost,
    Shutdown,
}

impl Worker {
    /// A worker with capacity 1, finishing its job on shutdown, waiting up to 30 s per claim.
    pub fn new(client: WorkerClient, task_types: Vec<String>, handler: impl Handler) -> Self {
        Self {
            client,
            task_types,
            capacity: 1,
            handler: Arc::new(handler),
            policy: ShutdownPolicy::Finish,
            claim_wait: Duration::from_secs(30),
            batched: true,
        }
    }
    /// Whether to use the batch endpoints (default): one request claims as many jobs as there
    /// are free slots and carries the results of finished ones, so a worker of capacity 1 makes
    /// one request per job. `false` (or a server without them, detected by its 404) uses one
    /// claim and one report per job.
    pub fn batched(mut self, on: bool) -> Self {
        self.batched = on;
        self
    }
    /// How many jobs run at once (slots). At least 1.
    pub fn capacity(mut self, n: u32) -> Self {
        self.capacity = n.max(1);
        self
    }
    /// What to do with running jobs on shutdown.
    pub fn on_shutdown(mut self, policy: ShutdownPolicy) -> Self {
        self.policy = policy;
        self
    }
    /// How long one claim waits for work (the server caps it).
    pub fn claim_wait(mut self, d: Duration) -> Self {
        self.claim_wait = d;
        self
    }

    /// Runs until `shutdown` resolves, then stops claiming and finishes or releases the jobs
    /// in hand (per [`ShutdownPolicy`]) before returning. A claim in flight at shutdown is
    /// abandoned; if the server had just handed it a job, that job is offered again when its
    /// lease lapses.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let this = Arc::new(self);
        if this.batched {
            tokio::pin!(shutdown);
            let batched = this.clone().run_batched(stop_rx.clone());
            tokio::pin!(batched);
            let fall_back = tokio::select! {
                _ = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    batched.await
                }
                fall_back = &mut batched => fall_back,
            };
            if !fall_back {
                return;
            }
            tracing::info!("jobs worker: the server has no batch endpoints; one claim per job");
            return this.run_slots(shutdown, stop_tx, stop_rx).await;
        }
        this.run_slots(shutdown, stop_tx, stop_rx).await
    }

    async fn run_slots(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()> + Send,
        stop_tx: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
    ) {
        let this = self;
        let mut slots = tokio::task::JoinSet::new();
        for _ in 0..this.capacity {
            slots.spawn(this.clone().slot(stop_rx.clone()));
        }
        tokio::select! {
            _ = shutdown => {}
            _ = async { while slots.join_next().await.is_some() {} } => {}
        }
        let _ = stop_tx.send(true);
        while slots.join_next().await.is_some() {}
    }

    async fn slot(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let req = ClaimRequest {
            task_types: self.task_types.clone(),
            capacity: self.capacity,
            wait_ms: Some(u64::try_from(self.claim_wait.as_millis()).unwrap_or(u64::MAX)),
        };
        let mut backoff = Backoff(0);
        loop {
            if *stop.borrow() {
                return;
            }
            let claimed = tokio::select! {
                r = self.client.claim(&req) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let pause = match claimed {
                Ok(Some(job)) => {
                    backoff = Backoff(0);
                    if let Some(item) = self.work(job, &mut stop).await {
                        let req = CompleteRequest {
                            lease: item.lease,
                            result: item.result,
                        };
                        self.retry(|| self.client.complete(item.job, &req)).await;
                    }
                    continue;
                }
                Ok(None) => continue,
                Err(e) => {
                    if e.code() != Some(ErrorCode::CapacityExhausted) {
                        tracing::warn!(error = %e, "jobs worker: claim failed");
                    }
                    backoff.next()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// The batched loop: one `POST /v1/claims` asks for as many jobs as there are free slots
    /// and carries the results gathered since the last one; results that finish while a claim
    /// waits go in a `POST /v1/complete` of their own. Returns `true` when the server has no
    /// batch endpoints (before anything was claimed), for the caller to fall back.
    async fn run_batched(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> bool {
        type Call = Pin<Box<dyn Future<Output = Result<ClaimManyResponse, ClientError>> + Send>>;
        let capacity = usize::try_from(self.capacity).unwrap_or(usize::MAX);
        let wait_ms = u64::try_from(self.claim_wait.as_millis()).unwrap_or(u64::MAX);
        let mut running: JoinSet<Option<CompleteItem>> = JoinSet::new();
        let mut reports: Vec<CompleteItem> = Vec::new();
        // Separate report requests in flight; their jobs still count against the capacity
        // until the server has them.
        let mut reporting: JoinSet<usize> = JoinSet::new();
        let mut reporting_held = 0usize;
        let mut claim: Option<(Call, Vec<CompleteItem>)> = None;
        let mut backoff = Backoff(0);
        let mut not_before: Option<Instant> = None;
        let mut answered = false;
        let mut stopping = *stop.borrow();
        loop {
            if claim.is_none() && !stopping && not_before.is_none() {
                let free = capacity.saturating_sub(running.len() + reporting_held);
                if free > 0 {
                    let carried: Vec<CompleteItem> =
                        reports.drain(..reports.len().min(MAX_BATCH)).collect();
                    let req = ClaimManyRequest {
                        task_types: self.task_types.clone(),
                        capacity: self.capacity,
                        max: Some(u32::try_from(free.min(MAX_BATCH)).unwrap_or(1)),
                        wait_ms: Some(wait_ms),
                        complete: carried.clone(),
                    };
                    let client = self.client.clone();
                    let call: Call = Box::pin(async move { client.claim_many(&req).await });
                    claim = Some((call, carried));
                }
            }
            if !reports.is_empty() {
                let batch: Vec<CompleteItem> =
                    reports.drain(..reports.len().min(MAX_BATCH)).collect();
                let n = batch.len();
                reporting_held += n;
                let client = self.client.clone();
                reporting.spawn(async move {
                    let req = CompleteManyRequest { results: batch };
                    let mut backoff = Backoff(0);
                    for _ in 0..8 {
                        match client.complete_many(&req).await {
                            Ok(r) => {
                                warn_refused(&r.replies);
                                break;
                            }
                            Err(e) if e.is_retryable() => {
                                tracing::warn!(error = %e, "jobs worker: report failed; retrying");
                                tokio::time::sleep(backoff.next()).await;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "jobs worker: report refused");
                                break;
                            }
                        }
                    }
                    n
                });
            }
            if stopping && claim.is_none() && running.is_empty() && reporting.is_empty() {
                return false;
            }
            tokio::select! {
                r = async { claim.as_mut().map(|c| c.0.as_mut()).expect("guarded").await },
                    if claim.is_some() =>
                {
                    let carried = claim.take().map(|c| c.1).unwrap_or_default();
                    match r {
                        Ok(resp) => {
                            answered = true;
                            backoff = Backoff(0);
                            warn_refused(&resp.completed);
                            for job in resp.jobs {
                                let this = Arc::clone(&self);
                                let mut stop = stop.clone();
                                running.spawn(async move { this.work(job, &mut stop).await });
                            }
                        }
                        Err(e) if !answered && matches!(&e, ClientError::Refused { status: 404 | 405, .. }) => {
                            return true;
                        }
                        Err(e) => {
                            // The results may or may not have been taken: send them again (a
                            // repeated one is answered `job_finished`).
                            reports.extend(carried);
                            if e.code() != Some(ErrorCode::CapacityExhausted) {
                                tracing::warn!(error = %e, "jobs worker: claim failed");
                            }
                            not_before = Some(Instant::now() + backoff.next());
                        }
                    }
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok(Some(item)) => reports.push(item),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "jobs worker: a job's task failed"),
                    }
                }
                Some(done) = reporting.join_next(), if !reporting.is_empty() => {
                    // A report task cannot panic; if it did, its jobs are the server's to
                    // lapse, and no longer this worker's.
                    if let Ok(n) = done {
                        reporting_held = reporting_held.saturating_sub(n);
                    } else {
                        reporting_held = 0;
                    }
                }
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    if let Some((_, carried)) = claim.take() {
                        reports.extend(carried);
                    }
                }
                _ = async {
                    match not_before {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if claim.is_none() && not_before.is_some() => {
                    not_before = None;
                }
            }
        }
    }

    /// Runs one job to its end; a success is returned for the caller to report, anything else
    /// is reported here.
    async fn work(
        &self,
        job: ClaimedJob,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<CompleteItem> {
        let id = job.id;
        let lease = job.lease.id.clone();
        let every = Duration::from_millis((job.lease.duration_ms / 3).max(1));
        let ctx = JobContext {
            job,
            client: self.client.clone(),
        };
        let client = self.client.clone();
        let hb_lease = lease.clone();
        let heartbeat = async move {
            let req = HeartbeatRequest { lease: hb_lease };
            loop {
                tokio::time::sleep(every).await;
                match client.heartbeat(id, &req).await {
                    Ok(r) if r.cancelled => return Interrupt::Cancelled,
                    Ok(_) => {}
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(job = %id, error = %e, "jobs worker: heartbeat failed");
                    }
                    Err(_) => return Interrupt::LeaseLost,
                }
            }
        };
        let release_on_stop = self.policy == ShutdownPolicy::Release;
        let stopping = async {
            if release_on_stop {
                let _ = stop.wait_for(|s| *s).await;
                Interrupt::Shutdown
            } else {
                std::future::pending().await
            }
        };
        let outcome = tokio::select! {
            r = self.handler.handle(ctx) => Ok(r),
            i = heartbeat => Err(i),
            i = stopping => Err(i),
        };
        match outcome {
            Ok(Ok(result)) => {
                return Some(CompleteItem {
                    job: id,
                    lease,
                    result,
                });
            }
            Ok(Err(f)) => {
                let req = ErrorRequest {
                    lease,
                    message: f.message,
                    permanent: f.permanent,
                };
                self.retry(|| self.client.error(id, &req)).await;
            }
            Err(Interrupt::Cancelled) => {
                let req = ReleaseRequest {
                    lease,
                    reason: Some("cancelled".into()),
                };
                self.retry(|| self.client.release(id, &req)).await;
            }
            Err(Interrupt::Shutdown) => {
                let req = ReleaseRequest {
                    lease,
                    reason: Some("worker shutting down".into()),
                };
                self.retry(|| self.client.release(id, &req)).await;
            }
            Err(Interrupt::LeaseLost) => {
                tracing::warn!(job = %id, "jobs worker: lease lost; result dropped");
            }
        }
        None
    }

    /// Retries a report while it fails retryably, at most 8 times.
    async fn retry<F, Fut>(&self, mut call: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<FinalReply, ClientError>>,
    {
        let mut backoff = Backoff(0);
        for _ in 0..8 {
            match call().await {
                Ok(_) => return,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "jobs worker: report failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "jobs worker: report refused");
                    return;
                }
            }
        }
    }
}

/// Logs the items of a batch the server refused (a lease lost meanwhile, a job already
/// finished): their results are dropped, as a single report's would be.
fn warn_refused(replies: &[crate::wire::ItemReply]) {
    for r in replies {
        if let Some(e) = &r.error {
            tracing::warn!(job = %r.job, code = ?e.code, message = %e.message, "jobs worker: result refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff(0);
        let first = b.next();
        assert!(first <= Duration::from_millis(50), "{first:?}");
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_secs(5));
        }
        let late = b.next();
        assert!(late >= Duration::from_millis(2_500), "{late:?}");
    }

    #[test]
    fn retryable_errors_are_connection_and_5xx() {
        let refused = |status| ClientError::Refused {
            status,
            code: None,
            message: String::new(),
        };
        assert!(refused(503).is_retryable());
        assert!(!refused(409).is_retryable());
        assert!(!ClientError::Protocol("x".into()).is_retryable());
    }
}
