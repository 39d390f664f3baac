//! The workflow pages: the runs list, and one run's live graph of steps.
//!
//! Server-rendered HTML with one small inline script (no build step, nothing fetched from
//! elsewhere). The run page embeds the run's JSON, draws the graph from it (one column per
//! depth, edges in SVG, a colour per state), and polls `/v1/workflows/runs/{id}` every second
//! while the run is not over. Buttons call the JSON API: Cancel, Approve, Re-run.

use std::fmt::Write as _;

use distributor_core::Timestamp;
use distributor_workflow::RunSummary;

use crate::workflow_http::RunView;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #f7f8fa; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; } a { color: #1f5fbf; }
table { border-collapse: collapse; background: #fff; } td, th { padding: .35rem .7rem; border-bottom: 1px solid #e3e6eb; text-align: left; }
.badge { display: inline-block; padding: .1rem .5rem; border-radius: .7rem; font-size: .8rem; color: #fff; background: #8a93a3; }
.s-running, .s-cancelling { background: #2f7de1; } .s-succeeded { background: #2e9d57; }
.s-failed { background: #d43d3d; } .s-cancelled { background: #8a5a00; } .s-awaiting_approval { background: #c98a00; }
.s-waiting { background: #8a93a3; } .s-not_run { background: #b9bfca; }
#graph { position: relative; display: flex; gap: 4rem; align-items: flex-start; margin-top: 1.2rem; }
#edges { position: absolute; left: 0; top: 0; pointer-events: none; overflow: visible; }
.col { display: flex; flex-direction: column; gap: 1.2rem; z-index: 1; }
.step { background: #fff; border: 1px solid #d5d9e0; border-left: .45rem solid #8a93a3; border-radius: .4rem; padding: .55rem .7rem; min-width: 13rem; max-width: 19rem; box-shadow: 0 1px 2px #0001; }
.step.st-running { border-left-color: #2f7de1; } .step.st-succeeded { border-left-color: #2e9d57; }
.step.st-failed { border-left-color: #d43d3d; } .step.st-cancelled { border-left-color: #8a5a00; }
.step.st-awaiting_approval { border-left-color: #c98a00; background: #fffaf0; } .step.st-not_run { opacity: .6; }
.step .name { font-weight: 600; } .step .meta { font-size: .8rem; color: #5b6475; margin: .2rem 0; }
.step .err { font-size: .8rem; color: #b02a2a; white-space: pre-wrap; word-break: break-word; }
.step .links { font-size: .78rem; } .step .links a { margin-right: .4rem; }
button { font: inherit; font-size: .85rem; padding: .25rem .7rem; border-radius: .3rem; border: 1px solid #8a93a3; background: #fff; cursor: pointer; margin-top: .3rem; }
button.primary { background: #2e9d57; border-color: #2e9d57; color: #fff; } button.danger { border-color: #d43d3d; color: #b02a2a; }
#msg { color: #b02a2a; margin-top: .5rem; min-height: 1.2rem; }
"#;

fn ms(d: i64) -> String {
    if d < 1000 {
        format!("{d} ms")
    } else if d < 120_000 {
        format!("{:.1} s", d as f64 / 1000.0)
    } else {
        format!("{} min", d / 60_000)
    }
}

/// The runs list.
pub(crate) fn runs(runs: &[RunSummary], now: Timestamp) -> String {
    let mut h = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Workflow runs</title>\
         <style>{STYLE}</style></head><body><h1>Workflow runs</h1>\
         <p><a href=\"/\">executions</a></p>"
    );
    if runs.is_empty() {
        h.push_str("<p>No runs yet. Start one with <code>POST /v1/workflows/runs</code>.</p>");
    } else {
        h.push_str("<table><tr><th>run</th><th>workflow</th><th>state</th><th>duration</th></tr>");
        for r in runs {
            let d = r
                .finished_at
                .unwrap_or(now)
                .0
                .saturating_sub(r.created_at.0);
            let _ = write!(
                h,
                "<tr><td><a href=\"/workflows/{id}\">{id}</a></td><td>{wf}</td>\
                 <td><span class=\"badge s-{st}\">{st}</span></td><td>{d}</td></tr>",
                id = esc(&r.id.0),
                wf = esc(&r.workflow),
                st = r.state.as_str(),
                d = ms(d),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>");
    h
}

/// One run's page.
pub(crate) fn run(v: &RunView) -> String {
    let json = serde_json::to_string(v)
        .unwrap_or_else(|_| "null".into())
        .replace("</", "<\\/");
    let mut noscript = String::from("<noscript><table><tr><th>step</th><th>state</th></tr>");
    for s in &v.steps {
        let _ = write!(
            noscript,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            s.state.as_str()
        );
    }
    noscript.push_str("</table></noscript>");
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{STYLE}</style></head><body>\
<p><a href=\"/workflows\">&larr; runs</a></p>\
<h1>{title} <span id=run-state class=\"badge s-{state}\">{state}</span></h1>\
<div class=meta>run <code>{id}</code> &middot; <span id=run-duration></span> <span id=run-params></span></div>\
<div><button id=cancel class=danger>Cancel run</button></div><div id=msg></div>\
{noscript}<div id=graph><svg id=edges></svg></div>\
<script id=run-data type=\"application/json\">{json}</script>\
<script>{SCRIPT}</script></body></html>",
        title = esc(&v.workflow),
        state = esc(&v.state),
        id = esc(&v.id),
    )
}

const SCRIPT: &str = r#"
(function () {
  let run = JSON.parse(document.getElementById('run-data').textContent);
  const api = '/v1/workflows/runs/' + encodeURIComponent(run.id);
  const terminal = s => ['succeeded', 'failed', 'cancelled'].includes(s);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const k of kids) if (k != null) e.append(k);
    return e;
  };
  const fmt = d => d == null ? '' : d < 1000 ? d + ' ms' : d < 120000 ? (d / 1000).toFixed(1) + ' s' : Math.round(d / 60000) + ' min';
  async function op(path, body) {
    document.getElementById('msg').textContent = '';
    const r = await fetch(api + path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body || {}), credentials: 'same-origin' });
    const j = await r.json().catch(() => null);
    if (!r.ok) { document.getElementById('msg').textContent = (j && j.error && j.error.message) || ('HTTP ' + r.status); return; }
    if (j) { run = j; draw(); }
    schedule();
  }
  function stepCard(s) {
    const meta = [s.distributor ? 'on ' + s.distributor : 'approval', fmt(s.duration_ms)];
    if (s.units.total > 1) meta.push(s.units.total + ' tasks: ' + (s.units.succeeded || 0) + ' ok, ' + (s.units.running || 0) + ' running, ' + (s.units.failed || 0) + ' failed');
    if (s.generation > 0) meta.push('re-run ' + s.generation);
    if (s.approval && s.result && s.result.approved_by) meta.push('approved by ' + s.result.approved_by);
    const card = el('div', { class: 'step st-' + s.state, id: 'step-' + s.name, 'data-step': s.name, 'data-state': s.state },
      el('div', { class: 'name' }, s.name + ' ', el('span', { class: 'badge s-' + s.state, 'data-role': 'state' }, s.state.replace('_', ' '))),
      el('div', { class: 'meta' }, meta.filter(Boolean).join(' · ')));
    if (s.state === 'awaiting_approval' && s.approval) card.append(el('div', { class: 'meta' }, s.approval));
    if (s.error) card.append(el('div', { class: 'err' }, s.error));
    if (s.executions.length) {
      const links = el('div', { class: 'links' });
      for (const x of s.executions) {
        const label = s.executions.length > 1 ? '#' + x.unit : 'execution ' + x.id;
        links.append(el('a', { href: x.url, title: x.state }, label));
        if (x.info_url) links.append(el('a', { href: x.info_url }, 'info/log'));
      }
      card.append(links);
    }
    if (s.state === 'awaiting_approval') {
      const b = el('button', { class: 'primary', 'data-action': 'approve' }, 'Approve');
      b.onclick = () => op('/steps/' + encodeURIComponent(s.name) + '/approve', { by: 'web' });
      card.append(b);
    }
    if ((s.state === 'failed' || s.state === 'cancelled') && run.state !== 'cancelling') {
      const b = el('button', { 'data-action': 'rerun' }, 'Re-run');
      b.onclick = () => op('/steps/' + encodeURIComponent(s.name) + '/rerun');
      card.append(b);
    }
    return card;
  }
  function draw() {
    const rs = document.getElementById('run-state');
    rs.textContent = run.state; rs.className = 'badge s-' + run.state;
    document.getElementById('run-duration').textContent = fmt(run.duration_ms);
    const p = Object.entries(run.params || {}).map(([k, v]) => k + '=' + JSON.stringify(v)).join(' ');
    document.getElementById('run-params').textContent = p ? '· ' + p : '';
    document.getElementById('cancel').style.display = terminal(run.state) || run.state === 'cancelling' ? 'none' : '';
    const g = document.getElementById('graph');
    const svg = document.getElementById('edges');
    g.querySelectorAll('.col').forEach(c => c.remove());
    const cols = [];
    for (const s of run.steps) {
      while (cols.length <= s.level) { const c = el('div', { class: 'col' }); cols.push(c); g.append(c); }
      cols[s.level].append(stepCard(s));
    }
    const box = g.getBoundingClientRect();
    svg.setAttribute('width', g.scrollWidth); svg.setAttribute('height', g.scrollHeight);
    svg.innerHTML = '';
    for (const s of run.steps) for (const d of s.depends_on) {
      const a = document.getElementById('step-' + d), b = document.getElementById('step-' + s.name);
      if (!a || !b) continue;
      const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
      const x1 = ra.right - box.left, y1 = ra.top + ra.height / 2 - box.top, x2 = rb.left - box.left, y2 = rb.top + rb.height / 2 - box.top;
      const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
      const mx = (x1 + x2) / 2;
      path.setAttribute('d', `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`);
      path.setAttribute('fill', 'none'); path.setAttribute('stroke', '#9aa3b2'); path.setAttribute('stroke-width', '1.5');
      svg.append(path);
    }
  }
  let timer = null;
  function schedule() {
    if (timer) clearTimeout(timer);
    timer = setTimeout(poll, 1000);
  }
  async function poll() {
    try {
      const r = await fetch(api, { credentials: 'same-origin' });
      if (r.ok) { run = await r.json(); draw(); }
    } catch (e) { /* the server restarts: keep polling */ }
    if (!terminal(run.state)) schedule(); else timer = setTimeout(poll, 5000);
  }
  document.getElementById('cancel').onclick = () => { if (confirm('Cancel this run?')) op('/cancel'); };
  draw();
  schedule();
})();
"#;
