//! The Jobs API over HTTP (axum): claims, reports, the status page, JSON errors.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::HeaderValue;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::core::{Shared, now_ms};
use crate::error::ApiFailure;
use crate::page;
use crate::queue::{Effects, Queue, Refusal};
use crate::wire::{
    ActivateRequest, ClaimManyRequest, ClaimManyResponse, ClaimRequest, ClaimResponse, ClaimedJob,
    CompleteItem, CompleteManyRequest, CompleteManyResponse, CompleteRequest, Disposition,
    ErrorCode, ErrorRequest, FinalReply, HeartbeatRequest, ItemReply, LeaseReply, MAX_BATCH,
    ReleaseRequest, UpdateRequest,
};

/// The API's routes.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/claim", post(claim))
        .route("/v1/claims", post(claim_many))
        .route("/v1/complete", post(complete_many))
        .route("/v1/jobs/{id}/claim", post(activate))
        .route("/v1/jobs/{id}/heartbeat", post(heartbeat))
        .route("/v1/jobs/{id}/update", post(update))
        .route("/v1/jobs/{id}/error", post(error))
        .route("/v1/jobs/{id}/complete", post(complete))
        .route("/v1/jobs/{id}/release", post(release))
        .route("/", get(page::html))
        .route("/status", get(page::html))
        .route("/status.json", get(page::json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        if self.code == ErrorCode::Unauthorized {
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(ErrorCode::NotFound, "no such endpoint")
}

async fn method_not_allowed() -> ApiFailure {
    ApiFailure::new(ErrorCode::MethodNotAllowed, "method not allowed here")
}

/// The calling worker, from its bearer token. Rejects with 401.
pub(crate) struct AuthWorker(pub(crate) Arc<str>);

impl FromRequestParts<Arc<Shared>> for AuthWorker {
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match (header, state.worker_for(header)) {
            (_, Some(w)) => Ok(Self(w)),
            (None, None) => Err(ApiFailure::new(
                ErrorCode::Unauthorized,
                "missing `Authorization: Bearer <token>` header",
            )),
            (Some(_), None) => Err(ApiFailure::new(
                ErrorCode::Unauthorized,
                "unknown worker token",
            )),
        }
    }
}

/// A JSON body; malformed JSON → 400 `malformed_request`, wrong fields or types → 422
/// `invalid_request`, each with serde's description naming the field.
pub(crate) struct Body<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiFailure::new(
                ErrorCode::MalformedRequest,
                format!("cannot read body: {e}"),
            )
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| body_error(&e.path().to_string(), e.inner()))?;
        de.end().map_err(|e| body_error("", &e))?;
        Ok(Body(value))
    }
}

fn body_error(at: &str, e: &serde_json::Error) -> ApiFailure {
    match e.classify() {
        serde_json::error::Category::Data => ApiFailure::new(
            ErrorCode::InvalidRequest,
            match at {
                "" | "." => format!("invalid request body: {e}"),
                _ => format!("invalid request body at `{at}`: {e}"),
            },
        ),
        _ => ApiFailure::new(
            ErrorCode::MalformedRequest,
            format!("malformed JSON body: {e}"),
        ),
    }
}

fn job_id(raw: &str) -> Result<i64, ApiFailure> {
    raw.parse().map_err(|_| {
        ApiFailure::new(
            ErrorCode::MalformedRequest,
            format!("job id `{raw}` is not an integer"),
        )
    })
}

fn invalid(message: impl Into<String>) -> ApiFailure {
    ApiFailure::new(ErrorCode::InvalidRequest, message)
}

/// Applies a report on job `id`; a job that is not live is told apart as finished or unknown.
async fn report<T>(
    shared: &Shared,
    id: i64,
    f: impl FnOnce(&mut Queue, &mut Effects) -> Result<T, Refusal>,
) -> Result<T, ApiFailure> {
    match shared.apply(false, f).await {
        Ok(t) => Ok(t),
        Err(Refusal::Api(a)) => Err(a),
        Err(Refusal::NotLive) => Err(match shared.store.view(id).await {
            Ok(Some(_)) => ApiFailure::new(
                ErrorCode::JobFinished,
                format!("job {id} has already finished"),
            ),
            Ok(None) => ApiFailure::new(ErrorCode::UnknownJob, format!("no job {id}")),
            Err(e) => e.into(),
        }),
    }
}

async fn claim(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Body(req): Body<ClaimRequest>,
) -> Result<axum::Json<ClaimResponse>, ApiFailure> {
    if req.task_types.is_empty() {
        return Err(invalid("`task_types` must name at least one task type"));
    }
    if req.capacity == 0 {
        return Err(invalid("`capacity` must be at least 1"));
    }
    let wait = req
        .wait_ms
        .map(std::time::Duration::from_millis)
        .map_or(shared.settings.long_poll, |w| {
            w.min(shared.settings.long_poll)
        });
    let deadline = Instant::now() + wait;
    let mut shutdown = shared.shutdown.clone();
    let mut first = true;
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = now_ms();
        let see = std::mem::take(&mut first);
        let job = shared
            .apply(false, |q, fx| {
                if see {
                    q.see(&worker, now, Some((&req.task_types, req.capacity)));
                }
                q.claim_next(&worker, &req.task_types, req.capacity, now, fx)
            })
            .await
            .map_err(|r| match r {
                Refusal::Api(a) => a,
                Refusal::NotLive => ApiFailure::new(ErrorCode::Unavailable, "claim raced"),
            })?;
        if job.is_some() || Instant::now() >= deadline || *shutdown.borrow() {
            return Ok(axum::Json(ClaimResponse { job }));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// `POST /v1/claims`: completes the results it carries, then hands out up to `max` jobs (long
/// poll until the first one).
async fn claim_many(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Body(req): Body<ClaimManyRequest>,
) -> Result<axum::Json<ClaimManyResponse>, ApiFailure> {
    if req.task_types.is_empty() {
        return Err(invalid("`task_types` must name at least one task type"));
    }
    if req.capacity == 0 {
        return Err(invalid("`capacity` must be at least 1"));
    }
    let max = req.max.unwrap_or(req.capacity);
    if max == 0 || usize::try_from(max).map_or(true, |m| m > MAX_BATCH) {
        return Err(invalid(format!(
            "`max` must be within 1..={MAX_BATCH}, got {max}"
        )));
    }
    if req.complete.len() > MAX_BATCH {
        return Err(invalid(format!(
            "`complete` carries {} results, at most {MAX_BATCH} are allowed",
            req.complete.len()
        )));
    }
    let wait = req
        .wait_ms
        .map(std::time::Duration::from_millis)
        .map_or(shared.settings.long_poll, |w| {
            w.min(shared.settings.long_poll)
        });
    let deadline = Instant::now() + wait;
    let mut shutdown = shared.shutdown.clone();
    let mut complete = Some(req.complete);
    let mut completed = Vec::new();
    loop {
        let notified = shared.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let now = now_ms();
        let first = complete.take();
        let (done, jobs, full) = shared
            .apply(false, |q, fx| {
                let mut done = Vec::new();
                if let Some(items) = first {
                    q.see(&worker, now, Some((&req.task_types, req.capacity)));
                    for item in items {
                        let r = q.complete(&worker, item.job.0, &item.lease, item.result, now, fx);
                        done.push((item.job, r));
                    }
                }
                let mut jobs: Vec<ClaimedJob> = Vec::new();
                let mut full = false;
                while jobs.len() < max as usize {
                    match q.claim_next(&worker, &req.task_types, req.capacity, now, fx) {
                        Ok(Some(job)) => jobs.push(job),
                        Ok(None) => break,
                        // At capacity with nothing handed out and nothing reported: refused,
                        // as a single claim would be.
                        Err(e) if jobs.is_empty() && done.is_empty() => return Err(e),
                        // At capacity after some jobs or results: those are the answer.
                        Err(_) => {
                            full = true;
                            break;
                        }
                    }
                }
                Ok((done, jobs, full))
            })
            .await
            .map_err(|r| match r {
                Refusal::Api(a) => a,
                Refusal::NotLive => ApiFailure::new(ErrorCode::Unavailable, "claim raced"),
            })?;
        if !done.is_empty() {
            completed = item_replies(&shared, done).await;
        }
        if !jobs.is_empty() || full || Instant::now() >= deadline || *shutdown.borrow() {
            return Ok(axum::Json(ClaimManyResponse { jobs, completed }));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// `POST /v1/complete`: several results in one request, each applied on its own, all committed
/// together.
async fn complete_many(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Body(req): Body<CompleteManyRequest>,
) -> Result<axum::Json<CompleteManyResponse>, ApiFailure> {
    if req.results.is_empty() || req.results.len() > MAX_BATCH {
        return Err(invalid(format!(
            "`results` must carry 1..={MAX_BATCH} items, got {}",
            req.results.len()
        )));
    }
    let now = now_ms();
    let done = shared
        .apply(false, |q, fx| {
            q.see(&worker, now, None);
            Ok(req
                .results
                .into_iter()
                .map(|CompleteItem { job, lease, result }| {
                    (job, q.complete(&worker, job.0, &lease, result, now, fx))
                })
                .collect::<Vec<_>>())
        })
        .await
        .map_err(|r| match r {
            Refusal::Api(a) => a,
            Refusal::NotLive => ApiFailure::new(ErrorCode::Unavailable, "complete raced"),
        })?;
    Ok(axum::Json(CompleteManyResponse {
        replies: item_replies(&shared, done).await,
    }))
}

/// The per-item answers of a batch: a job that is not live is told apart as finished or
/// unknown, as [`report`] does for a single call.
async fn item_replies(
    shared: &Shared,
    done: Vec<(crate::wire::JobId, Result<Disposition, Refusal>)>,
) -> Vec<ItemReply> {
    let mut replies = Vec::with_capacity(done.len());
    for (job, r) in done {
        let failure = match r {
            Ok(d) => {
                replies.push(ItemReply {
                    job,
                    disposition: Some(d),
                    error: None,
                });
                continue;
            }
            Err(Refusal::Api(a)) => a,
            Err(Refusal::NotLive) => match shared.store.view(job.0).await {
                Ok(Some(_)) => ApiFailure::new(
                    ErrorCode::JobFinished,
                    format!("job {job} has already finished"),
                ),
                Ok(None) => ApiFailure::new(ErrorCode::UnknownJob, format!("no job {job}")),
                Err(e) => e.into(),
            },
        };
        replies.push(ItemReply {
            job,
            disposition: None,
            error: Some(failure.body().error),
        });
    }
    replies
}

async fn activate(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<ActivateRequest>,
) -> Result<axum::Json<ClaimResponse>, ApiFailure> {
    let id = job_id(&raw)?;
    let now = now_ms();
    let job = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.activate(&worker, id, &req.activation_token, now, fx)
    })
    .await?;
    Ok(axum::Json(ClaimResponse { job: Some(job) }))
}

async fn heartbeat(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<HeartbeatRequest>,
) -> Result<axum::Json<LeaseReply>, ApiFailure> {
    let id = job_id(&raw)?;
    let now = now_ms();
    let reply = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.heartbeat(&worker, id, &req.lease, None, now, fx)
    })
    .await?;
    Ok(axum::Json(reply))
}

async fn update(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<UpdateRequest>,
) -> Result<axum::Json<LeaseReply>, ApiFailure> {
    let id = job_id(&raw)?;
    if let Some(p) = req.progress.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(invalid(format!("`progress` must be within 0..=1, got {p}")));
    }
    let now = now_ms();
    let UpdateRequest {
        lease,
        stage,
        progress,
        message,
    } = req;
    let reply = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.heartbeat(
            &worker,
            id,
            &lease,
            Some((stage, progress, message)),
            now,
            fx,
        )
    })
    .await?;
    Ok(axum::Json(reply))
}

async fn error(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<ErrorRequest>,
) -> Result<axum::Json<FinalReply>, ApiFailure> {
    let id = job_id(&raw)?;
    let now = now_ms();
    let disposition = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.error(
            &worker,
            id,
            &req.lease,
            (req.message, req.permanent),
            now,
            fx,
        )
    })
    .await?;
    Ok(axum::Json(FinalReply { disposition }))
}

async fn complete(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<CompleteRequest>,
) -> Result<axum::Json<FinalReply>, ApiFailure> {
    let id = job_id(&raw)?;
    let now = now_ms();
    let disposition = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.complete(&worker, id, &req.lease, req.result, now, fx)
    })
    .await?;
    Ok(axum::Json(FinalReply { disposition }))
}

async fn release(
    State(shared): State<Arc<Shared>>,
    AuthWorker(worker): AuthWorker,
    Path(raw): Path<String>,
    Body(req): Body<ReleaseRequest>,
) -> Result<axum::Json<FinalReply>, ApiFailure> {
    let id = job_id(&raw)?;
    let now = now_ms();
    let disposition = report(&shared, id, |q, fx| {
        q.see(&worker, now, None);
        q.release(&worker, id, &req.lease, req.reason, now, fx)
    })
    .await?;
    Ok(axum::Json(FinalReply { disposition }))
}
