//! The HTML status page at `/`: executions by state, recent failures with reasons, info links.

use std::fmt::Write as _;

use axum::extract::State as AxState;
use axum::response::Html;
use distributor_core::store::ListFilter;
use distributor_core::{AbnormalKind, ExecutionRecord, Outcome, State};

use crate::api::ExecutionView;
use crate::serve::{ApiError, AppState};

/// Most records counted per state (the page says "N+" past it).
const COUNT_CAP: usize = 10_000;
/// Rows in each table.
const ROWS: usize = 20;

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn all_states() -> Vec<State> {
    State::LIVE
        .into_iter()
        .chain([State::Succeeded])
        .chain(AbnormalKind::ALL.map(State::Abnormal))
        .collect()
}

/// Renders the page. Counting walks the store per state (capped), which is fine for the
/// reference orchestrator's scale; a production one would keep counters.
pub(crate) async fn index(AxState(s): AxState<AppState>) -> Result<Html<String>, ApiError> {
    let engine = s.engine();
    let mut counts = Vec::new();
    let mut recent_failures: Vec<ExecutionRecord> = Vec::new();
    let mut live: Vec<ExecutionRecord> = Vec::new();
    for st in all_states() {
        let recs = engine
            .list(&ListFilter {
                states: vec![st],
                limit: Some(COUNT_CAP),
                ..ListFilter::default()
            })
            .await?;
        counts.push((st, recs.len()));
        match st {
            State::Abnormal(_) => recent_failures.extend(recs.into_iter().rev().take(ROWS)),
            st if !st.is_terminal() => live.extend(recs.into_iter().rev().take(ROWS)),
            _ => {}
        }
    }
    recent_failures.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
    recent_failures.truncate(ROWS);
    live.sort_by_key(|r| std::cmp::Reverse(r.id));
    live.truncate(ROWS);

    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>distributor</title>\
         <meta http-equiv=\"refresh\" content=\"5\"><style>\
         body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin-bottom:2em}\
         td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
         th{background:#f4f4f4}.n{text-align:right}.bad{color:#b00}.ok{color:#070}\
         code{font-size:12px}</style></head><body><h1>distributor</h1>",
    );
    h.push_str("<h2>Executions by state</h2><table><tr><th>state</th><th class=n>count</th></tr>");
    for (st, n) in &counts {
        let cls = match st {
            State::Succeeded => "ok",
            State::Abnormal(_) => "bad",
            _ => "",
        };
        let n = if *n >= COUNT_CAP {
            format!("{n}+")
        } else {
            n.to_string()
        };
        let _ = write!(
            h,
            "<tr><td class={cls}><a href=\"/v1/executions?state={st}\">{st}</a></td>\
             <td class=n>{n}</td></tr>"
        );
    }
    h.push_str("</table>");
    section(&mut h, "In flight", &live, &s);
    section(&mut h, "Recent failures", &recent_failures, &s);
    h.push_str(
        "<p>API: <a href=\"/v1/executions\">/v1/executions</a> · \
         <a href=\"/v1/kinds\">/v1/kinds</a> · <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/healthz\">/healthz</a></p></body></html>",
    );
    Ok(Html(h))
}

fn section(h: &mut String, title: &str, recs: &[ExecutionRecord], s: &AppState) {
    let _ = write!(h, "<h2>{}</h2>", esc(title));
    if recs.is_empty() {
        h.push_str("<p>none</p>");
        return;
    }
    h.push_str(
        "<table><tr><th>id</th><th>task</th><th>distributor</th><th>attempt</th>\
         <th>state</th><th>reason</th><th>info</th></tr>",
    );
    for r in recs {
        let v = ExecutionView::of(s.engine(), r);
        let reason = match &r.outcome {
            Some(Outcome::Abnormal { reason, .. }) => reason.as_str(),
            _ => "",
        };
        let task = r.task.labels.get("task").map_or(String::new(), |t| esc(t));
        let info = v
            .info_url
            .as_deref()
            .map(|u| format!("<a href=\"{0}\"><code>{0}</code></a>", esc(u)))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td><a href=\"/v1/executions/{id}\">{id}</a></td><td>{task}</td><td>{d}</td>\
             <td>{a}</td><td>{st}</td><td>{reason}</td><td>{info}</td></tr>",
            id = r.id,
            d = esc(r.distributor.as_str()),
            a = r.attempt,
            st = r.state,
            reason = esc(reason),
        );
    }
    h.push_str("</table>");
}
