//! The Jobs API wire types, shared by the server and the worker SDK.
//!
//! Every request body rejects unknown fields. Every error answer is an [`ApiError`] body with an
//! HTTP 4xx/5xx status.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job's id on the Jobs API; also the execution's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Fencing token of one claim: `<generation>.<random>`. Every report MUST carry the lease it
/// was given; a report with a lease that was taken over is refused with `lease_lost`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub String);

impl LeaseId {
    /// The generation this lease was issued in (how many times the job had been claimed).
    pub fn generation(&self) -> Option<i64> {
        self.0.split_once('.').and_then(|(g, _)| g.parse().ok())
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `POST /v1/claim`: asks for the next job this worker can run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Task types the worker can run. A job is offered only to workers declaring its type.
    pub task_types: Vec<String>,
    /// How many jobs this worker holds at most at once. A claim while it already holds that
    /// many is refused with `capacity_exhausted`. Default 1.
    #[serde(default = "one")]
    pub capacity: u32,
    /// How long to wait for a job before answering with none, in milliseconds (capped by the
    /// server's `long_poll_ms`; default that cap). 0 answers at once.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// `POST /v1/jobs/{id}/claim`: claims one named job with its activation token. The first claim
/// of a queued job wins; a claim of a job someone holds is refused with `already_claimed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// The job's activation token.
    pub activation_token: String,
}

/// Answer to a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// The job, or `None` when the wait ended without one.
    pub job: Option<ClaimedJob>,
}

/// A job a worker now holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimedJob {
    /// The job.
    pub id: JobId,
    /// The orchestrator's execution id.
    pub execution_id: u64,
    /// Its task type.
    pub task_type: String,
    /// The payload's free-form `input`.
    pub input: Value,
    /// Its priority.
    pub priority: i32,
    /// The execution's activation token (proves the claim to anyone the worker hands work to).
    pub activation_token: String,
    /// The lease: report with it, heartbeat before it expires.
    pub lease: Lease,
    /// How many times this job has been offered, this one included.
    pub offer: u32,
}

/// A claim's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The fencing token to present in every report.
    pub id: LeaseId,
    /// When it lapses without a heartbeat (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// The lease duration; heartbeat well within it (the SDK uses a third).
    pub duration_ms: u64,
}

/// `POST /v1/jobs/{id}/heartbeat`: extends the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The lease held.
    pub lease: LeaseId,
}

/// `POST /v1/jobs/{id}/update`: reports progress (and extends the lease like a heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest {
    /// The lease held.
    pub lease: LeaseId,
    /// Current stage name (free text, e.g. `parsing`).
    #[serde(default)]
    pub stage: Option<String>,
    /// Progress in 0..=1.
    #[serde(default)]
    pub progress: Option<f64>,
    /// A human-readable note.
    #[serde(default)]
    pub message: Option<String>,
}

/// Answer to a heartbeat or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    /// The new lease expiry (ms since the Unix epoch).
    pub expires_at_ms: i64,
    /// The execution was cancelled: stop and `release` the job.
    pub cancelled: bool,
}

/// `POST /v1/jobs/{id}/error`: the handler failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRequest {
    /// The lease held.
    pub lease: LeaseId,
    /// What went wrong.
    pub message: String,
    /// `true`: retrying will not help, the execution ends `Failed`. `false` (default): the job
    /// is offered again while its re-offer budget lasts.
    #[serde(default)]
    pub permanent: bool,
}

/// `POST /v1/jobs/{id}/complete`: the handler succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The lease held.
    pub lease: LeaseId,
    /// The result (any JSON); becomes the execution's `Succeeded { data }`.
    #[serde(default)]
    pub result: Value,
}

/// `POST /v1/jobs/{id}/release`: gives the job back without a result (shutdown, or
/// acknowledging a cancel). A cancelled job then ends `Cancelled`; any other is queued again
/// without using its re-offer budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The lease held.
    pub lease: LeaseId,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Most jobs one [`ClaimManyRequest`] or [`CompleteManyRequest`] may carry; larger batches are
/// refused with `invalid_request`.
pub const MAX_BATCH: usize = 1000;

/// `POST /v1/claims`: asks for up to `max` jobs in one request, optionally completing jobs in
/// the same request (`complete`, applied first, so that their slots count as free). The reply
/// comes as soon as at least one job is handed out, or when `wait_ms` ends without one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimManyRequest {
    /// Task types the worker can run.
    pub task_types: Vec<String>,
    /// How many jobs this worker holds at most at once (as in [`ClaimRequest`]). The server
    /// hands out at most `capacity` minus what the worker then holds. Default 1.
    #[serde(default = "one")]
    pub capacity: u32,
    /// Most jobs to hand out in this reply (1..=[`MAX_BATCH`]). Default: `capacity`.
    #[serde(default)]
    pub max: Option<u32>,
    /// How long to wait for a first job, in milliseconds (capped by `long_poll_ms`; default
    /// that cap). 0 answers at once.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// Results of jobs this worker holds, reported before claiming (as with `/v1/complete`).
    #[serde(default)]
    pub complete: Vec<CompleteItem>,
}

/// Answer to [`ClaimManyRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimManyResponse {
    /// The jobs now held, best first; empty when the wait ended without one.
    pub jobs: Vec<ClaimedJob>,
    /// One reply per item of the request's `complete`, in its order.
    #[serde(default)]
    pub completed: Vec<ItemReply>,
}

/// One result of a held job, in a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteItem {
    /// The job.
    pub job: JobId,
    /// The lease held.
    pub lease: LeaseId,
    /// The result (any JSON); becomes the execution's `Succeeded { data }`.
    #[serde(default)]
    pub result: Value,
}

/// `POST /v1/complete`: the results of several held jobs in one request. Each item is applied
/// on its own (one refused item does not refuse the others); all are committed together before
/// the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteManyRequest {
    /// The results (1..=[`MAX_BATCH`]).
    pub results: Vec<CompleteItem>,
}

/// Answer to [`CompleteManyRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteManyResponse {
    /// One reply per item, in the request's order.
    pub replies: Vec<ItemReply>,
}

/// What became of one item of a batch: a disposition, or the error a single call would have
/// answered (`lease_lost`, `job_finished`, `unknown_job`, `not_holder`…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemReply {
    /// The job.
    pub job: JobId,
    /// What became of it, when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disposition: Option<Disposition>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiErrorDetail>,
}

/// What became of a job after `error`, `complete` or `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Queued again for another worker.
    Requeued,
    /// Finished `Succeeded`.
    Succeeded,
    /// Finished `Failed`.
    Failed,
    /// Finished `Cancelled`.
    Cancelled,
}

/// Answer to `error`, `complete` and `release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalReply {
    /// What became of the job.
    pub disposition: Disposition,
}

/// Machine-readable error codes of the Jobs API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 401: no or unknown bearer token.
    Unauthorized,
    /// 404: no such job.
    UnknownJob,
    /// 404: no such endpoint.
    NotFound,
    /// 400: the body is not JSON, or the path is malformed.
    MalformedRequest,
    /// 422: the JSON does not have the expected fields or types.
    InvalidRequest,
    /// 403: the job is held by another worker.
    NotHolder,
    /// 403: wrong activation token.
    WrongActivationToken,
    /// 409: the lease presented was taken over (lapsed and re-offered, or superseded).
    LeaseLost,
    /// 409: the job has already finished.
    JobFinished,
    /// 409: the job is already claimed.
    AlreadyClaimed,
    /// 409: the worker already holds as many jobs as its declared capacity.
    CapacityExhausted,
    /// 405: the endpoint exists but not with this method.
    MethodNotAllowed,
    /// 503: the server is shutting down or its database failed; try again.
    Unavailable,
}

/// Body of every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// The error.
    pub error: ApiErrorDetail,
}

/// The error inside [`ApiError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorDetail {
    /// What kind of problem.
    pub code: ErrorCode,
    /// A human-readable description naming the problem (field, job, lease).
    pub message: String,
}
