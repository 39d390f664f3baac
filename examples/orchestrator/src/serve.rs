//! `orchestrator serve`: the HTTP API over an engine (axum router and handlers).
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/executions` | submit a task ([`SubmitRequest`]) → 201 `{id, url}`; with an `Idempotency-Key` header or `request_id`, a repeat answers 200 and the first id |
//! | `GET /v1/executions/{id}` | one execution with its history |
//! | `GET /v1/executions?state=a,b&distributor=d&label=k=v&task_id=&after=&limit=` | list |
//! | `POST /v1/executions/{id}/cancel` | request cancellation (`{"reason"}` optional) of the task's current attempt → 202 |
//! | `POST /v1/executions/{id}/poke` | poll the backend now → 202 |
//! | `POST /v1/notify` | a push: Google Pub/Sub push JSON or plain JSON |
//! | `GET /v1/kinds` | registered kinds, their config and payload schemas, configured names |
//! | `GET /v1/openapi.json` | the OpenAPI 3.1 document ([`crate::openapi`]) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | liveness (the store answers) |
//! | `GET /` | an HTML status page |
//! | `/v1/workflows/…`, `GET /workflows` | workflow runs: API and pages ([`crate::workflow_http`]) |
//!
//! Every route, including routes merged into [`routes`] by other modules, sits behind
//! [`crate::security`]: `Host` and `Origin` checks, JSON-only bodies, bearer tokens with scopes,
//! body size and time limits. [`serve`] adds header timeouts, a connection limit and a shutdown
//! deadline ([`Limits`]).
//!
//! Every non-2xx answer is JSON ([`ErrorResponse`]) with a stable `code`, naming the body field
//! at fault as a JSON Pointer (`field`) or the query or path parameter (`parameter`): malformed
//! bodies 400, invalid payloads 422 with every violation, unknown ids 404, wrong method 405,
//! body too large 413 (naming the limit), wrong content type 415, no or bad API token 401, a
//! token without the scope 403; a plain push without a token 401, with a forged, expired or
//! foreign token 403.
//!
//! Pushes and redelivery: Google Pub/Sub push redelivers every answer outside 102/200/201/202/204
//! (with backoff, until the message expires). So a push that can never succeed — forged,
//! malformed, too large, for an unknown or finished execution, stale — is **acknowledged with
//! 200** `{"accepted": false, "reason", "error": {...}}` when it is a Pub/Sub push (its body has a
//! `message` envelope or `subscription`, or its `User-Agent` is Pub/Sub's), and counted in
//! `orchestrator_push_dropped_total{code}`; a failure that may pass later (store unavailable,
//! shutting down) answers 503 so that Pub/Sub redelivers it. Plain pushes get the 4xx above.
//! Stale, duplicate and post-terminal pushes get 200 `{"accepted": false, "reason"}` in both
//! forms.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use distributor_core::store::ListFilter;
use distributor_core::{
    Engine, Error, ExecutionId, Notification, NotificationRejection, State, TaskId,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::api::{ErrorBody, ErrorResponse, ExecutionView, SubmitRequest, Submitted};
use crate::security::Security;

/// The server's shared state.
#[derive(Debug, Clone)]
pub struct AppState {
    engine: Engine,
    metrics: PrometheusHandle,
}

/// Installs the process-wide Prometheus recorder once (without an HTTP listener: `/metrics`
/// renders on request) and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedder's); ours then renders
            // nothing but stays usable.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The API router over `engine`, behind [`crate::security::secure`] with `security`: what
/// [`serve`] serves, and what an embedder serves with its own listener.
pub fn router(engine: Engine, security: Security) -> Router {
    crate::security::secure(routes(engine), security)
}

/// The API's routes without the security layers. Modules that add routes merge them here, so
/// that [`router`] puts them behind the same checks; never serve this directly.
pub fn routes(engine: Engine) -> Router {
    // workflow: the workflow routes (API and pages), merged after the state is set.
    let workflows = crate::workflow_http::routes(engine.clone());
    let switch = crate::switch::routes(engine.clone());
    let state = AppState {
        engine,
        metrics: prometheus(),
    };
    Router::new()
        .route("/", get(crate::page::index))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/kinds", get(kinds))
        .route("/v1/openapi.json", get(openapi_doc))
        .route("/v1/executions", post(submit).get(list))
        .route("/v1/executions/{id}", get(get_one))
        .route("/v1/executions/{id}/cancel", post(cancel))
        .route("/v1/executions/{id}/poke", post(poke))
        .route("/v1/notify", post(notify))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
        .merge(workflows) // workflow:
        .merge(switch)
}

/// Connection limits of [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time for a request's headers to arrive; also how long a keep-alive connection may sit
    /// idle between requests. A connection that exceeds it is closed.
    pub header_timeout: Duration,
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// After `shutdown` completes: how long requests in progress may finish. Connections still
    /// open then are dropped.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router(engine, security)` on `listener` until `shutdown` completes, then lets
/// requests in progress finish for at most `limits.shutdown_grace`, drops the connections still
/// open (a client holding half a request included), and stops the engine gracefully (work in
/// the backends keeps running).
///
/// Errors: none today (accept errors are logged and retried); the type leaves room for them.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    security: Security,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(engine.clone(), security);
    serve_app(listener, app, limits, shutdown).await;
    engine.shutdown().await;
    Ok(())
}

/// The accept loop of [`serve`] for any router: HTTP/1.1 with a header timeout, a connection
/// limit, and a graceful shutdown bounded by `limits.shutdown_grace`.
pub async fn serve_app(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        conns.spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let open = conns.len();
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown: {} connection(s) still open after {:?}, dropping them",
            conns.len(),
            limits.shutdown_grace
        );
    } else if open > 0 {
        tracing::info!("shutdown: {open} connection(s) closed");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

impl AppState {
    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Box<ErrorBody>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                code: code.into(),
                message: message.into(),
                field: None,
                parameter: None,
                violations: Vec::new(),
            }),
        }
    }
    /// Names the body field at fault: a JSON Pointer (`""` or starting with `/`).
    fn field(mut self, field: impl Into<String>) -> Self {
        let f = field.into();
        debug_assert!(
            f.is_empty() || f.starts_with('/'),
            "not a JSON Pointer: {f}"
        );
        self.body.field = Some(f);
        self
    }
    /// Names the query or path parameter at fault.
    fn param(mut self, name: impl Into<String>) -> Self {
        self.body.parameter = Some(name.into());
        self
    }
    fn bad(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message).field(field)
    }
    fn bad_param(name: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message).param(name)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorResponse { error: *self.body })).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Validation(v) => {
                let field = v
                    .violations
                    .first()
                    .map(|x| format!("/payload{}", x.pointer));
                let mut a = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_payload", msg);
                a.body.field = field;
                a.body.violations = v
                    .violations
                    .into_iter()
                    .map(|mut x| {
                        x.pointer = format!("/payload{}", x.pointer);
                        x
                    })
                    .collect();
                a
            }
            Error::UnknownDistributor { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_distributor", msg)
                    .field("/distributor")
            }
            Error::UnknownExecution(_) => Self::new(StatusCode::NOT_FOUND, "not_found", msg),
            Error::NotificationRejected(r) => match r {
                NotificationRejection::Stale | NotificationRejection::Terminal => {
                    Self::new(StatusCode::OK, "stale", msg)
                }
                NotificationRejection::SequenceJump => {
                    Self::new(StatusCode::BAD_REQUEST, "invalid_request", msg).field("/sequence")
                }
                NotificationRejection::MissingToken => {
                    Self::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
                        .field("/attributes/auth_token")
                }
                NotificationRejection::UnknownExecution => {
                    Self::new(StatusCode::NOT_FOUND, "not_found", msg).field("/execution_id")
                }
                _ => Self::new(StatusCode::FORBIDDEN, "forbidden", msg)
                    .field("/attributes/auth_token"),
            },
            Error::Shutdown => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg),
            e if e.is_transient() => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body, naming the field at fault (as a JSON Pointer) on error.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad("", "expected a JSON body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let pointer = crate::taskfile::pointer_of(&e.path().to_string());
        let inner = e.into_inner();
        let text = inner.to_string();
        let field = missing_field(&text)
            .map(|m| format!("{pointer}/{m}"))
            .unwrap_or(pointer);
        let msg = crate::taskfile::humanize(&text);
        ApiError::bad(&field, format!("invalid request body: {msg}"))
    })
}

/// The field a serde "missing field `x`" message names (the error's path stops at its parent;
/// for unknown fields the path already ends with the field).
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

fn parse_id(raw: &str) -> ApiResult<ExecutionId> {
    raw.parse::<u64>().map(ExecutionId).map_err(|_| {
        ApiError::bad_param("id", format!("`{raw}` is not an execution id (an integer)"))
    })
}

async fn healthz(AxState(s): AxState<AppState>) -> ApiResult<axum::Json<Value>> {
    s.engine
        .list(&ListFilter {
            limit: Some(1),
            ..ListFilter::default()
        })
        .await?;
    Ok(axum::Json(json!({"status": "ok"})))
}

async fn metrics_text(AxState(s): AxState<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn kinds(AxState(s): AxState<AppState>) -> axum::Json<Value> {
    let mut by_kind: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in s.engine.distributor_names() {
        if let Ok(i) = s.engine.instance(name.as_str()) {
            by_kind
                .entry(i.kind().name().to_string())
                .or_default()
                .push(name.to_string());
        }
    }
    let kinds: Vec<Value> = s
        .engine
        .registry()
        .kinds()
        .map(|k| {
            let name = k.name().to_string();
            json!({
                "kind": name,
                "distributors": by_kind.get(&name).cloned().unwrap_or_default(),
                "config_schema": k.config_schema(),
                "payload_schema": k.payload_schema(),
            })
        })
        .collect();
    axum::Json(json!({ "kinds": kinds }))
}

async fn submit(
    AxState(s): AxState<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let req: SubmitRequest = parse_body(&body)?;
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map(str::to_owned).map_err(|_| {
            ApiError::bad_param("Idempotency-Key", "the Idempotency-Key header is not text")
        })?),
    };
    let key = match (header_key, &req.request_id) {
        (Some(h), Some(b)) if h != *b => {
            return Err(ApiError::bad(
                "/request_id",
                "`request_id` and the Idempotency-Key header differ; send one of them",
            ));
        }
        (Some(h), _) => Some(h),
        (None, b) => b.clone(),
    };
    let (id, created) = match key {
        None => (s.engine.submit(req.to_task()).await?, true),
        Some(k) => s
            .engine
            .submit_idempotent(&k, req.to_task())
            .await
            .map_err(|e| match e {
                Error::Permanent { message, .. } => ApiError::bad("/request_id", message),
                e => e.into(),
            })?,
    };
    let url = format!("/v1/executions/{id}");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        [(axum::http::header::LOCATION, url.clone())],
        axum::Json(Submitted { id: id.0, url }),
    )
        .into_response())
}

async fn get_one(
    AxState(s): AxState<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<ExecutionView>> {
    let id = parse_id(&id)?;
    let rec = s.engine.get(id).await?;
    let mut view = ExecutionView::of(&s.engine, &rec);
    view.history = s.engine.history(id).await?;
    Ok(axum::Json(view))
}

/// Parses the list query; every unknown or malformed parameter is a 400 naming it.
fn list_filter(query: Option<&str>) -> ApiResult<ListFilter> {
    let mut f = ListFilter::default();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "state" => {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    f.states.push(
                        s.parse::<State>()
                            .map_err(|e| ApiError::bad_param("state", e))?,
                    );
                }
            }
            "distributor" => f.distributor = Some(v.as_ref().into()),
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or_else(|| {
                    ApiError::bad_param("label", format!("`{v}` is not key=value"))
                })?;
                f.labels.insert(lk.into(), lv.into());
            }
            "task_id" => {
                f.task_id = Some(TaskId(v.parse().map_err(|_| {
                    ApiError::bad_param("task_id", format!("`{v}` is not an integer"))
                })?));
            }
            "after" => {
                f.after = Some(ExecutionId(v.parse().map_err(|_| {
                    ApiError::bad_param("after", format!("`{v}` is not an integer"))
                })?));
            }
            "limit" => {
                f.limit = Some(v.parse().map_err(|_| {
                    ApiError::bad_param("limit", format!("`{v}` is not a positive integer"))
                })?);
            }
            other => {
                return Err(ApiError::bad_param(
                    other,
                    format!(
                        "unknown query parameter `{other}`; expected state, distributor, \
                         label, task_id, after, limit"
                    ),
                ));
            }
        }
    }
    Ok(f)
}

async fn list(
    AxState(s): AxState<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<axum::Json<Value>> {
    let filter = list_filter(q.as_deref())?;
    let recs = s.engine.list(&filter).await?;
    let views: Vec<ExecutionView> = recs
        .iter()
        .map(|r| ExecutionView::of(&s.engine, r))
        .collect();
    Ok(axum::Json(json!({ "executions": views })))
}

use crate::openapi::CancelRequest;

async fn openapi_doc() -> axum::Json<Value> {
    static DOC: OnceLock<Value> = OnceLock::new();
    axum::Json(DOC.get_or_init(crate::openapi::document).clone())
}

async fn cancel(
    AxState(s): AxState<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let mut id = parse_id(&id)?;
    let req: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        parse_body(&body)?
    };
    // Cancelling an attempt that was retried cancels the task's current attempt.
    loop {
        let rec = s.engine.get(id).await?;
        match rec.retried_by {
            Some(next) if rec.state.is_terminal() => id = next,
            _ => break,
        }
    }
    s.engine
        .cancel(
            id,
            req.reason.unwrap_or_else(|| "requested over HTTP".into()),
        )
        .await?;
    let rec = s.engine.get(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(ExecutionView::of(&s.engine, &rec)),
    )
        .into_response())
}

async fn poke(AxState(s): AxState<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    s.engine.poke(id).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"poked": id.0}))).into_response())
}

/// Whether a push body is in Pub/Sub's envelope (`message` or `subscription` at the top).
fn is_pubsub_body(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .is_ok_and(|m| m.contains_key("message") || m.contains_key("subscription"))
}

/// Parses a push with the core's parser (`distributor_core::push`, the format's one
/// definition), as a 400 naming the field when it does not parse.
fn parse_push(body: &[u8], pubsub: bool) -> ApiResult<(ExecutionId, Notification)> {
    let parsed = if pubsub {
        distributor_core::push::parse_pubsub_push(body)
    } else {
        distributor_core::push::parse_push(body)
    };
    parsed.map_err(|e| ApiError::bad(&e.pointer, crate::taskfile::humanize(&e.message)))
}

/// The 200 answer that makes Pub/Sub drop a push that can never succeed.
pub(crate) fn push_dropped(code: &str, message: &str) -> Response {
    push_dropped_with(code, message, json!({"code": code, "message": message}))
}

fn push_dropped_with(code: &str, message: &str, error: Value) -> Response {
    metrics::counter!("orchestrator_push_dropped_total", "code" => code.to_owned()).increment(1);
    tracing::warn!("push dropped ({code}): {message}");
    (
        StatusCode::OK,
        axum::Json(json!({"accepted": false, "reason": message, "error": error})),
    )
        .into_response()
}

async fn notify(
    AxState(s): AxState<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let pubsub = crate::security::from_pubsub(&headers) || is_pubsub_body(&body);
    let result = match parse_push(&body, pubsub) {
        Ok((id, n)) => s.engine.notify(id, n).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(axum::Json(json!({"accepted": true})).into_response()),
        Err(e) if e.body.code == "stale" => {
            Ok(axum::Json(json!({"accepted": false, "reason": e.body.message})).into_response())
        }
        // Transient: ask for redelivery.
        Err(e) if e.status.is_server_error() => Err(e),
        Err(e) if pubsub => {
            let error = serde_json::to_value(&e.body).unwrap_or(Value::Null);
            Ok(push_dropped_with(&e.body.code, &e.body.message, error))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn pubsub_push_decodes_data_id_and_sequence() {
        let body = json!({
            "message": {
                "data": base64::engine::general_purpose::STANDARD.encode(b"{\"x\":1}"),
                "attributes": {"execution_id": "7", "auth_token": "t", "sequence": "3"},
                "messageId": "m1", "publishTime": "2024-01-01T00:00:00Z"
            },
            "subscription": "projects/p/subscriptions/s"
        });
        let (id, n) = parse_push(body.to_string().as_bytes(), false).unwrap();
        assert_eq!(id, ExecutionId(7));
        assert_eq!(n.data, b"{\"x\":1}");
        assert_eq!(n.sequence, Some(3));
        assert_eq!(n.message_id.as_deref(), Some("m1"));
        assert_eq!(
            n.attributes.get("auth_token").map(String::as_str),
            Some("t")
        );
        assert!(!n.attributes.contains_key("execution_id"));
    }

    #[test]
    fn plain_push_and_errors_name_fields() {
        let (id, n) = parse_push(
            br#"{"execution_id": 4, "data": {"a": 1}, "sequence": 2}"#,
            false,
        )
        .unwrap();
        assert_eq!((id, n.sequence), (ExecutionId(4), Some(2)));
        assert_eq!(n.data, br#"{"a":1}"#);
        let e = parse_push(br#"{"execution_id": "x"}"#, false).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("/execution_id"));
        let e = parse_push(br#"{"data": 1}"#, false).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("/execution_id"), "{e:?}");
        let e = parse_push(br#"{"message": {"attributes": {}}}"#, false).unwrap_err();
        assert_eq!(
            e.body.field.as_deref(),
            Some("/message/attributes/execution_id")
        );
    }

    #[test]
    fn list_query_is_parsed_and_unknown_parameters_named() {
        let f = list_filter(Some(
            "state=running,failed&distributor=local&label=a%3Db&label=c=d",
        ))
        .unwrap();
        assert_eq!(f.states.len(), 2);
        assert_eq!(f.labels.len(), 2);
        assert_eq!(f.labels["a"], "b");
        assert_eq!(
            list_filter(Some("stat=x"))
                .unwrap_err()
                .body
                .parameter
                .as_deref(),
            Some("stat")
        );
        assert_eq!(
            list_filter(Some("state=nope"))
                .unwrap_err()
                .body
                .parameter
                .as_deref(),
            Some("state")
        );
    }
}
