//! Workflow routes of `orchestrator serve`: the JSON API and the web pages.
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/workflows/runs` | start a run: `{"workflow": <workflow document>, "params": {…}}` → 201 `{id, url, page}` |
//! | `GET /v1/workflows/runs` | every run, newest first |
//! | `GET /v1/workflows/runs/{id}` | one run: its steps, their state, durations, executions and info links |
//! | `POST /v1/workflows/runs/{id}/cancel` | cancel the run (running steps are cancelled) → 202 |
//! | `POST /v1/workflows/runs/{id}/steps/{step}/approve` | approve a waiting step (`{"by"}` optional) → 202 |
//! | `POST /v1/workflows/runs/{id}/steps/{step}/rerun` | re-run a failed step and what depends on it → 202 |
//! | `POST /v1/workflows/runs/{id}/poke` | poll the backends of the run's live executions → 202 |
//! | `GET /v1/workflows/schema` | the JSON Schema of workflow documents |
//! | `GET /workflows` | HTML: the runs |
//! | `GET /workflows/{id}` | HTML: one run's graph, live (polls the JSON every second), with Cancel / Approve / Re-run buttons |
//!
//! Errors are JSON `{"error": {code, message, field?, violations?}}`: a bad workflow or bad
//! parameters 422 with every violation's JSON Pointer (under `/workflow` or `/params`), unknown
//! runs or steps 404, an operation that does not apply now (approve a step that is not waiting)
//! 409.
//!
//! The runs are driven by one [`Workflows`] per router, opened (resuming unfinished runs) when
//! the router is built: build one router per engine.

#![allow(clippy::result_large_err)] // axum answers (Response) are the error type of the helpers

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use distributor_core::{Engine, ExecutionId, Timestamp};
use distributor_workflow::{
    RunId, RunSnapshot, StepState, UnitState, WorkflowError, WorkflowSpec, Workflows,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

/// Executions listed per step in a run view (a fan-out step may have thousands).
const EXECUTIONS_SHOWN: usize = 20;

/// The workflow routes' state: the run manager, opened once.
#[derive(Clone)]
struct WfState {
    engine: Engine,
    workflows: Arc<OnceCell<Result<Workflows, String>>>,
}

impl WfState {
    async fn workflows(&self) -> Result<&Workflows, Response> {
        let w = self
            .workflows
            .get_or_init(|| async {
                Workflows::open(self.engine.clone())
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        w.as_ref().map_err(|e| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("workflow runs could not be resumed: {e}"),
            )
        })
    }
}

/// The workflow routes over `engine`, to merge into the API router. Opens the runs (resuming
/// unfinished ones) right away when called inside a tokio runtime, else on the first request.
pub fn routes(engine: Engine) -> Router {
    let state = WfState {
        engine,
        workflows: Arc::new(OnceCell::new()),
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        let s = state.clone();
        tokio::spawn(async move {
            if let Err(e) = s.workflows().await {
                tracing::error!(status = %e.status(), "workflow runs could not be resumed");
            }
        });
    }
    Router::new()
        .route("/workflows", get(runs_page))
        .route("/workflows/{id}", get(run_page))
        .route("/v1/workflows/schema", get(schema))
        .route("/v1/workflows/runs", post(start).get(list))
        .route("/v1/workflows/runs/{id}", get(get_run))
        .route("/v1/workflows/runs/{id}/cancel", post(cancel))
        .route("/v1/workflows/runs/{id}/poke", post(poke))
        .route(
            "/v1/workflows/runs/{id}/steps/{step}/approve",
            post(approve),
        )
        .route("/v1/workflows/runs/{id}/steps/{step}/rerun", post(rerun))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

fn bad(field: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": {"code": "invalid_request", "message": message.into(), "field": field}})),
    )
        .into_response()
}

/// A workflow error as an answer; violations get `prefix` before their pointer.
fn wf_error(e: WorkflowError, prefix: &str) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match &e {
        WorkflowError::Invalid(_) => "invalid_workflow",
        WorkflowError::Parse { .. } | WorkflowError::Io { .. } => "invalid_request",
        WorkflowError::UnknownRun(_) | WorkflowError::UnknownStep { .. } => "not_found",
        WorkflowError::Conflict(_) => "conflict",
        e if e.is_transient() => "unavailable",
        _ => "internal",
    };
    let message = e.to_string();
    let mut body = json!({"code": code, "message": message});
    if let WorkflowError::Invalid(v) = &e {
        let vs: Vec<Value> = v
            .violations
            .iter()
            .map(|x| {
                let pointer = if x.pointer.starts_with("/params") {
                    x.pointer.clone()
                } else {
                    format!("{prefix}{}", x.pointer)
                };
                json!({"pointer": pointer, "expected": x.expected, "message": x.message, "suggestion": x.suggestion})
            })
            .collect();
        body["field"] = vs
            .first()
            .map(|v| v["pointer"].clone())
            .unwrap_or(Value::Null);
        body["violations"] = Value::Array(vs);
    }
    (status, axum::Json(json!({ "error": body }))).into_response()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], empty_ok: bool) -> Result<T, Response> {
    let body: &[u8] = if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let pointer = if path == "." {
            String::new()
        } else {
            path.split('.')
                .map(|s| format!("/{}", s.trim_start_matches('[').trim_end_matches(']')))
                .collect()
        };
        bad(
            &pointer,
            format!("invalid request body: {}", e.into_inner()),
        )
    })
}

/// The body of `POST /v1/workflows/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The workflow document (what a workflow file holds, as JSON).
    pub workflow: Value,
    /// Parameter values by name.
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
}

/// The answer to a start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// The run id.
    pub id: String,
    /// The run's JSON.
    pub url: String,
    /// The run's page.
    pub page: String,
}

async fn start(AxState(s): AxState<WfState>, body: Bytes) -> Response {
    let req: StartRequest = match parse(&body, false) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let w = match s.workflows().await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let spec = match WorkflowSpec::from_value("request", &req.workflow) {
        Ok(s) => s,
        Err(e) => return wf_error(e, "/workflow"),
    };
    match w.start(spec, req.params).await {
        Ok(id) => {
            let url = format!("/v1/workflows/runs/{id}");
            (
                StatusCode::CREATED,
                [(axum::http::header::LOCATION, url.clone())],
                axum::Json(Started {
                    page: format!("/workflows/{id}"),
                    id: id.0,
                    url,
                }),
            )
                .into_response()
        }
        Err(e) => wf_error(e, "/workflow"),
    }
}

async fn list(AxState(s): AxState<WfState>) -> Response {
    let w = match s.workflows().await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match w.list().await {
        Ok(runs) => axum::Json(json!({ "runs": runs })).into_response(),
        Err(e) => wf_error(e, ""),
    }
}

async fn schema() -> axum::Json<Value> {
    axum::Json(WorkflowSpec::schema())
}

/// One execution of a step, as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionLink {
    /// Fan-out index.
    pub unit: u32,
    /// Execution id (the task's last attempt once it ended).
    pub id: u64,
    /// Its state.
    pub state: String,
    /// Where a person looks at the work (the adapter's info URL).
    pub info_url: Option<String>,
    /// The execution with its history (`/v1/executions/{id}`).
    pub url: String,
}

/// One step, as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepView {
    /// Name.
    pub name: String,
    /// State.
    pub state: StepState,
    /// Depth in the graph (0 = no dependencies).
    pub level: usize,
    /// Its dependencies.
    pub depends_on: Vec<String>,
    /// The distributor (none for approvals).
    pub distributor: Option<String>,
    /// Approval prompt, for approval steps.
    pub approval: Option<String>,
    /// Re-runs so far.
    pub generation: u32,
    /// Started / finished (ms since epoch).
    pub started_at: Option<Timestamp>,
    /// Finished.
    pub finished_at: Option<Timestamp>,
    /// Duration so far or in all, in ms.
    pub duration_ms: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The result.
    pub result: Option<Value>,
    /// Tasks: total, and how many are in each state.
    pub units: BTreeMap<String, usize>,
    /// The first executions.
    pub executions: Vec<ExecutionLink>,
}

/// A run, as shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunView {
    /// Id.
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Its description.
    pub description: Option<String>,
    /// State.
    pub state: String,
    /// Parameters.
    pub params: BTreeMap<String, Value>,
    /// Started.
    pub created_at: Timestamp,
    /// Ended.
    pub finished_at: Option<Timestamp>,
    /// Duration so far or in all, in ms.
    pub duration_ms: i64,
    /// Steps in dependency order.
    pub steps: Vec<StepView>,
}

/// Builds the view of a stored run (with info links of its first executions per step).
pub async fn view(engine: &Engine, snap: &RunSnapshot) -> RunView {
    let now = engine.clock().now();
    let spec = &snap.run.spec;
    let levels = spec.levels();
    let mut steps = Vec::new();
    for name in spec.topological() {
        let Some(st) = spec.step(name) else { continue };
        let d = &snap.steps[name];
        let units = snap.units.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        counts.insert("total".into(), units.len());
        for u in units {
            let k = match u.state {
                UnitState::Submitting | UnitState::Running => "running",
                UnitState::Succeeded => "succeeded",
                UnitState::Failed => "failed",
                UnitState::Cancelled => "cancelled",
            };
            *counts.entry(k.into()).or_default() += 1;
        }
        let mut executions = Vec::new();
        for u in units.iter().take(EXECUTIONS_SHOWN) {
            let Some(id) = u.last_execution.or(u.execution) else {
                continue;
            };
            executions.push(link(engine, u.index, id).await);
        }
        steps.push(StepView {
            name: name.to_owned(),
            state: d.state,
            level: levels.get(name).copied().unwrap_or(0),
            depends_on: st.depends_on.clone(),
            distributor: st.distributor.clone(),
            approval: st.approval.as_ref().map(|a| {
                let prompt = a.prompt.clone().unwrap_or_else(|| "Approve?".into());
                render_text(snap, &prompt)
            }),
            generation: d.generation,
            started_at: d.started_at,
            finished_at: d.finished_at,
            duration_ms: d
                .started_at
                .map(|s| d.finished_at.unwrap_or(now).0.saturating_sub(s.0)),
            error: d.error.clone(),
            result: d.result.clone(),
            units: counts,
            executions,
        });
    }
    RunView {
        id: snap.run.id.0.clone(),
        workflow: spec.name.clone(),
        description: spec.description.clone(),
        state: snap.run.state.as_str().to_owned(),
        params: snap.run.params.clone(),
        created_at: snap.run.created_at,
        finished_at: snap.run.finished_at,
        duration_ms: snap
            .run
            .finished_at
            .unwrap_or(now)
            .0
            .saturating_sub(snap.run.created_at.0),
        steps,
    }
}

/// `text` with its `{{ params.… }}` / `{{ run.… }}` references filled in (as written when
/// one does not render).
fn render_text(snap: &RunSnapshot, text: &str) -> String {
    let scope = distributor_workflow::template::Scope {
        params: Some(&snap.run.params),
        run_id: &snap.run.id.0,
        run_name: &snap.run.spec.name,
        ..Default::default()
    };
    match scope.render(&Value::String(text.to_owned()), "") {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => text.to_owned(),
    }
}

async fn link(engine: &Engine, unit: u32, id: ExecutionId) -> ExecutionLink {
    let rec = engine.get(id).await.ok();
    // Follow retries to the current attempt.
    let mut rec = rec;
    while let Some(next) = rec.as_ref().and_then(|r| r.retried_by) {
        rec = engine.get(next).await.ok();
    }
    let id = rec.as_ref().map_or(id, |r| r.id);
    let info_url = rec.as_ref().and_then(|r| {
        r.token.as_ref()?;
        engine
            .instance(r.distributor.as_str())
            .ok()
            .and_then(|i| i.distributor().info_url(&r.execution()))
            .map(|u| u.to_string())
    });
    ExecutionLink {
        unit,
        id: id.0,
        state: rec.map_or_else(|| "unknown".into(), |r| r.state.to_string()),
        info_url,
        url: format!("/v1/executions/{id}"),
    }
}

async fn get_run(AxState(s): AxState<WfState>, Path(id): Path<String>) -> Response {
    let w = match s.workflows().await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match w.get(&RunId(id)).await {
        Ok(snap) => axum::Json(view(&s.engine, &snap).await).into_response(),
        Err(e) => wf_error(e, ""),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveRequest {
    #[serde(default)]
    by: Option<String>,
}

async fn after_op(s: &WfState, id: &RunId, r: Result<(), WorkflowError>) -> Response {
    match r {
        Ok(()) => match s.workflows().await {
            Ok(w) => match w.get(id).await {
                Ok(snap) => (
                    StatusCode::ACCEPTED,
                    axum::Json(view(&s.engine, &snap).await),
                )
                    .into_response(),
                Err(e) => wf_error(e, ""),
            },
            Err(r) => r,
        },
        Err(e) => wf_error(e, ""),
    }
}

async fn cancel(AxState(s): AxState<WfState>, Path(id): Path<String>) -> Response {
    let id = RunId(id);
    let r = match s.workflows().await {
        Ok(w) => w.cancel(&id).await,
        Err(r) => return r,
    };
    after_op(&s, &id, r).await
}

async fn poke(AxState(s): AxState<WfState>, Path(id): Path<String>) -> Response {
    let id = RunId(id);
    let r = match s.workflows().await {
        Ok(w) => w.poke(&id).await,
        Err(r) => return r,
    };
    after_op(&s, &id, r).await
}

async fn approve(
    AxState(s): AxState<WfState>,
    Path((id, step)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let req: ApproveRequest = match parse(&body, true) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let id = RunId(id);
    let by = req.by.unwrap_or_else(|| "web".into());
    let r = match s.workflows().await {
        Ok(w) => w.approve(&id, &step, &by).await,
        Err(r) => return r,
    };
    after_op(&s, &id, r).await
}

async fn rerun(AxState(s): AxState<WfState>, Path((id, step)): Path<(String, String)>) -> Response {
    let id = RunId(id);
    let r = match s.workflows().await {
        Ok(w) => w.rerun(&id, &step).await,
        Err(r) => return r,
    };
    after_op(&s, &id, r).await
}

async fn runs_page(AxState(s): AxState<WfState>) -> Response {
    let w = match s.workflows().await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match w.list().await {
        Ok(runs) => Html(crate::workflow_page::runs(&runs, s.engine.clock().now())).into_response(),
        Err(e) => wf_error(e, ""),
    }
}

async fn run_page(AxState(s): AxState<WfState>, Path(id): Path<String>) -> Response {
    let w = match s.workflows().await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match w.get(&RunId(id)).await {
        Ok(snap) => {
            let v = view(&s.engine, &snap).await;
            Html(crate::workflow_page::run(&v)).into_response()
        }
        Err(e) => wf_error(e, ""),
    }
}
