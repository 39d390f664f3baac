//! Runtime control of `switch` distributors: the `orchestrator switch …` commands and the HTTP
//! routes they call.
//!
//! | route | scope | effect |
//! |---|---|---|
//! | `GET /v1/switch/{name}` | read | the switch's state (`{"op":"show"}`) |
//! | `POST /v1/switch/{name}` | admin | a control request: `{"op":"set","cutover":T,"who":W,"why":Y}` or `{"op":"clear","who":W,"why":Y}` |
//!
//! Both answer with the state after the request (mode, cutover, grid, dispatched watermarks,
//! history) or an error body `{"error":{"code","message","field"?}}`: 400 `invalid_request`
//! with the field's JSON Pointer for a malformed request or an off-grid cutover, 404
//! `not_found` for an unknown distributor, 409 `refused` for a change the switch refuses (it
//! would move work already dispatched) or a kind that takes no control requests, 503
//! `unavailable` for a transient failure (nothing changed; try again).
//!
//! ```text
//! orchestrator switch show bq-export
//! orchestrator switch set bq-export 2026-12-02T15:05:00Z --why "go exporter verified"
//! orchestrator switch set bq-export +10m --why "after the deploy settles"
//! orchestrator switch clear bq-export --why "go exporter misconfigured"
//! ```

use std::process::ExitCode;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use distributor_core::{Engine, Error};
use serde_json::{Value, json};

/// The switch routes over `engine` (merged into the API router, behind its security layers).
pub fn routes(engine: Engine) -> Router {
    Router::new()
        .route("/v1/switch/{name}", get(show).post(control))
        .with_state(engine)
}

async fn show(AxState(engine): AxState<Engine>, Path(name): Path<String>) -> Response {
    answer(engine.control(&name, &json!({ "op": "show" })).await)
}

async fn control(
    AxState(engine): AxState<Engine>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("expected a JSON control request: {e}"),
                Some(String::new()),
            );
        }
    };
    answer(engine.control(&name, &request).await)
}

fn answer(r: Result<Value, Error>) -> Response {
    match r {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => {
            let message = e.to_string();
            match e {
                Error::Validation(v) => {
                    let field = v.violations.first().map(|x| x.pointer.clone());
                    error(StatusCode::BAD_REQUEST, "invalid_request", message, field)
                }
                Error::UnknownDistributor { .. } => {
                    error(StatusCode::NOT_FOUND, "not_found", message, None)
                }
                e if e.is_transient() => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    message,
                    None,
                ),
                Error::Shutdown => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    message,
                    None,
                ),
                _ => error(StatusCode::CONFLICT, "refused", message, None),
            }
        }
    }
}

fn error(status: StatusCode, code: &str, message: String, field: Option<String>) -> Response {
    let mut body = json!({ "code": code, "message": message });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    (status, axum::Json(json!({ "error": body }))).into_response()
}

/// `orchestrator switch …`: show or change a switch's cutover on a running server.
#[derive(Debug, clap::Subcommand)]
pub enum SwitchCmd {
    /// Show the cutover, the grid, what each side was handed, and the history of changes.
    Show {
        /// The switch distributor.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set or move the cutover. TIME is RFC 3339 (`2026-12-02T15:05:00Z`), milliseconds since
    /// the epoch, or `+<duration>` (`+10m`: that far from now, rounded up to the grid).
    Set {
        /// The switch distributor.
        name: String,
        /// The cutover time; it must lie on the switch's grid.
        time: String,
        /// Why (kept in the history).
        #[arg(long)]
        why: String,
        /// Who (kept in the history). Default: `$USER`.
        #[arg(long)]
        who: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Clear the cutover: everything goes to `before` again (refused once `after` ran work).
    Clear {
        /// The switch distributor.
        name: String,
        /// Why (kept in the history).
        #[arg(long)]
        why: String,
        /// Who (kept in the history). Default: `$USER`.
        #[arg(long)]
        who: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The API token the switch commands send: `ORCHESTRATOR_TOKEN`, else the file named by
/// `ORCHESTRATOR_TOKEN_FILE`, else `.distributor/api-token` if it exists.
fn token() -> Option<String> {
    if let Ok(t) = std::env::var("ORCHESTRATOR_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_owned());
    }
    let path = std::env::var("ORCHESTRATOR_TOKEN_FILE")
        .unwrap_or_else(|_| ".distributor/api-token".to_owned());
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn who(who: Option<String>) -> String {
    who.or_else(|| std::env::var("USER").ok())
        .filter(|w| !w.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs a switch command against the server at `server`. Prints the state after it; exits 1
/// with the server's message when the request is refused.
pub async fn command(server: &str, cmd: SwitchCmd) -> Result<ExitCode, String> {
    let (name, request, as_json) = match cmd {
        SwitchCmd::Show { name, json } => (name, None, json),
        SwitchCmd::Set {
            name,
            time,
            why,
            who: w,
            json,
        } => {
            let cutover = match time.parse::<i64>() {
                Ok(ms) => json!(ms),
                Err(_) => json!(time),
            };
            let req = json!({ "op": "set", "cutover": cutover, "who": who(w), "why": why });
            (name, Some(req), json)
        }
        SwitchCmd::Clear {
            name,
            why,
            who: w,
            json,
        } => (
            name,
            Some(json!({ "op": "clear", "who": who(w), "why": why })),
            json,
        ),
    };
    let base = url::Url::parse(server).map_err(|e| format!("bad server URL `{server}`: {e}"))?;
    let url = base
        .join(&format!("/v1/switch/{name}"))
        .map_err(|e| format!("bad distributor name `{name}`: {e}"))?;
    let http = reqwest::Client::new();
    let mut req = match &request {
        Some(body) => http.post(url.clone()).json(body),
        None => http.get(url.clone()),
    };
    if let Some(t) = token() {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot talk to {url}: {e}"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("cannot talk to {url}: {e}"))?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = body["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| body.to_string());
        return Err(format!("{}: {msg}", status.as_u16()));
    }
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    } else {
        print!("{}", describe(&body));
    }
    Ok(ExitCode::SUCCESS)
}

/// A person's view of a switch's state.
pub fn describe(state: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = format!(
        "switch {} ({} → {}), grid {} s\n",
        s(&state["name"]),
        s(&state["before"]),
        s(&state["after"]),
        state["grid_secs"]
    );
    match state["cutover"].as_str() {
        Some(c) => out.push_str(&format!(
            "cutover: {c}: intervals from then go to `after`\n"
        )),
        None => out.push_str("cutover: none: everything goes to `before`\n"),
    }
    let d = &state["dispatched"];
    if let Some(b) = d["before_latest"].as_object() {
        out.push_str(&format!(
            "`before` ran up to: {}\n",
            b.get("end").map(s).unwrap_or_default()
        ));
    }
    if let Some(a) = d["after_earliest"].as_object() {
        out.push_str(&format!(
            "`after` ran from: {}\n",
            a.get("start").map(s).unwrap_or_default()
        ));
    }
    if let Some(h) = state["history"].as_array().filter(|h| !h.is_empty()) {
        out.push_str("history:\n");
        for c in h {
            out.push_str(&format!(
                "  {}  {}: {} → {}  ({})\n",
                s(&c["at"]),
                s(&c["who"]),
                c["from"].as_str().unwrap_or("none"),
                c["to"].as_str().unwrap_or("none"),
                s(&c["why"])
            ));
        }
    }
    out
}
