//! The status page (HTML) and its JSON twin: jobs by stage, recent errors, workers seen.
//! Both are read-only, unauthenticated, and never show payloads, tokens or leases.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Html;
use serde::Serialize;

use crate::core::Shared;
use crate::error::ApiFailure;
use crate::queue::{ErrorRow, JobState, WorkerSeen};
use crate::store::JobView;

const LIMIT: i64 = 200;

/// The JSON view.
#[derive(Debug, Serialize)]
pub(crate) struct Overview {
    /// The job asked for with `?job=<id>`, if it exists.
    selected: Option<JobView>,
    queued: Vec<JobView>,
    claimed: Vec<JobView>,
    running: Vec<JobView>,
    /// The latest finished jobs, newest first.
    finished: Vec<JobView>,
    /// The latest errors, newest first.
    errors: Vec<ErrorRow>,
    workers: Vec<WorkerSeen>,
}

async fn overview(
    shared: &Shared,
    params: &HashMap<String, String>,
) -> Result<Overview, ApiFailure> {
    let (live, finished) = shared.store.overview(LIMIT).await?;
    let errors = shared.store.recent_errors(50).await?;
    let selected = match params.get("job").and_then(|j| j.parse::<i64>().ok()) {
        Some(id) => shared.store.view(id).await?,
        None => None,
    };
    let by = |s: JobState| live.iter().filter(|j| j.state == s).cloned().collect();
    Ok(Overview {
        selected,
        queued: by(JobState::Queued),
        claimed: by(JobState::Claimed),
        running: by(JobState::Running),
        finished,
        errors,
        workers: shared.lock().workers(),
    })
}

/// `GET /status.json`.
pub(crate) async fn json(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<axum::Json<Overview>, ApiFailure> {
    Ok(axum::Json(overview(&shared, &params).await?))
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|v| esc(&v.to_string())).unwrap_or_default()
}

fn table(out: &mut String, title: &str, jobs: &[JobView], anchors: bool) {
    let _ = write!(out, "<h2>{} ({})</h2>", esc(title), jobs.len());
    if jobs.is_empty() {
        return;
    }
    out.push_str(
        "<table><tr><th>job</th><th>execution</th><th>type</th><th>prio</th><th>worker</th>\
         <th>offers</th><th>stage</th><th>progress</th><th>message</th><th>outcome</th>\
         <th>last heartbeat (ms)</th></tr>",
    );
    for j in jobs {
        let id = if anchors {
            format!(" id=\"job-{}\"", j.id)
        } else {
            String::new()
        };
        let outcome = j
            .outcome
            .as_ref()
            .and_then(|o| serde_json::to_string(o).ok())
            .map(|o| esc(&o))
            .unwrap_or_default();
        let cancel = if j.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr{id}><td>{}{cancel}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{outcome}</td><td>{}</td></tr>",
            j.id,
            j.execution_id,
            esc(&j.task_type),
            j.priority,
            opt(&j.worker),
            j.offers,
            opt(&j.stage),
            opt(&j.progress),
            opt(&j.message),
            opt(&j.heartbeat_ms),
        );
    }
    out.push_str("</table>");
}

/// `GET /status`: the page people look at (`info_url` points at a job's row on it).
pub(crate) async fn html(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Html<String>, ApiFailure> {
    let o = overview(&shared, &params).await?;
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>jobs</title><style>\
         body{font-family:sans-serif}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:2px 6px}tr:target{background:#ffc}</style>\
         </head><body><h1>Jobs</h1>",
    );
    if let Some(s) = &o.selected {
        table(&mut out, "Selected job", std::slice::from_ref(s), false);
    }
    table(&mut out, "Queued", &o.queued, true);
    table(&mut out, "Claimed", &o.claimed, true);
    table(&mut out, "Running", &o.running, true);
    table(&mut out, "Finished (latest)", &o.finished, true);
    let _ = write!(out, "<h2>Recent errors ({})</h2><table>", o.errors.len());
    out.push_str(
        "<tr><th>at (ms)</th><th>job</th><th>worker</th><th>kind</th><th>message</th></tr>",
    );
    for e in &o.errors {
        let _ = write!(
            out,
            "<tr><td>{}</td><td><a href=\"#job-{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.at_ms,
            e.job_id,
            e.job_id,
            opt(&e.worker),
            if e.transient {
                "transient"
            } else {
                "permanent"
            },
            esc(&e.message)
        );
    }
    let _ = write!(out, "</table><h2>Workers ({})</h2><table>", o.workers.len());
    out.push_str(
        "<tr><th>worker</th><th>task types</th><th>capacity</th><th>holds</th>\
         <th>last seen (ms)</th><th>last heartbeat (ms)</th></tr>",
    );
    for w in &o.workers {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&w.name),
            esc(&w.task_types.join(", ")),
            w.capacity,
            w.holds,
            w.last_seen_ms,
            opt(&w.last_heartbeat_ms)
        );
    }
    out.push_str("</table></body></html>");
    Ok(Html(out))
}
