//! `orchestrator run`: submit a task file's tasks, follow them live, summarise.

use std::collections::HashMap;
use std::future::Future;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distributor_core::engine::CancelCause;
use distributor_core::{Engine, Error, Event, ExecutionId, ExecutionRecord, Outcome, State};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use url::Url;

use crate::duration::elapsed;
use crate::taskfile::{Expect, TaskFile};

/// How progress is shown while tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Progress {
    /// Live bars on a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Live bars (one line per task, redrawn).
    Bars,
    /// One line per change, for logs and pipes.
    Plain,
    /// Nothing until the summary.
    Quiet,
}

/// How one task ended.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// The task's name.
    pub name: String,
    /// What was expected.
    pub expect: Expect,
    /// The record of its last attempt (terminal unless the run was interrupted).
    pub record: ExecutionRecord,
    /// From submit to the terminal state of the last attempt.
    pub elapsed: Duration,
    /// Where to look at the work of the last attempt.
    pub info_url: Option<Url>,
}

impl TaskResult {
    /// Whether the task ended as expected.
    pub fn as_expected(&self) -> bool {
        self.expect.matches(self.record.state)
    }
}

/// The outcome of a run: one result per task, in file order.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Tasks that reached a terminal state (all of them unless interrupted).
    pub results: Vec<TaskResult>,
    /// Names of tasks still in flight when the run was interrupted.
    pub unfinished: Vec<String>,
}

impl RunReport {
    /// True when every task finished as expected.
    pub fn all_as_expected(&self) -> bool {
        self.unfinished.is_empty() && self.results.iter().all(TaskResult::as_expected)
    }

    /// The summary table (plain text, aligned columns) and a closing line.
    pub fn table(&self) -> String {
        let header = ["", "TASK", "RESULT", "ATTEMPTS", "TIME", "DETAIL", "INFO"].map(String::from);
        let mut rows = vec![header];
        for r in &self.results {
            let mark = if r.as_expected() { "ok" } else { "FAIL" };
            let mut result = r.record.state.to_string();
            if !r.as_expected() {
                result.push_str(&format!(" (expected {})", r.expect));
            }
            rows.push([
                mark.into(),
                r.name.clone(),
                result,
                r.record.attempt.0.to_string(),
                elapsed(r.elapsed),
                detail(r.record.outcome.as_ref()),
                r.info_url.as_ref().map(Url::to_string).unwrap_or_default(),
            ]);
        }
        for name in &self.unfinished {
            rows.push(["--", name, "unfinished", "", "", "still running", ""].map(String::from));
        }
        let mut width = [0usize; 7];
        for row in &rows {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        let bad = self.results.iter().filter(|r| !r.as_expected()).count();
        out.push_str(&match (bad, self.unfinished.len()) {
            (0, 0) => format!("{} tasks, all as expected\n", self.results.len()),
            (b, 0) => format!(
                "{b} of {} tasks did not end as expected\n",
                self.results.len()
            ),
            (_, u) => format!(
                "interrupted: {u} tasks still running; they are re-attached on the next start\n"
            ),
        });
        out
    }
}

/// A short description of an outcome for the summary.
fn detail(outcome: Option<&Outcome>) -> String {
    let text = match outcome {
        None => String::new(),
        Some(Outcome::Abnormal { reason, kind }) => {
            let first = reason.lines().next().unwrap_or("");
            first
                .strip_prefix(&format!("{kind}: "))
                .unwrap_or(first)
                .to_owned()
        }
        Some(Outcome::Succeeded { data }) => match data {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            Value::Object(m) => match (m.get("exit_code"), last_line(m.get("stdout_tail"))) {
                (Some(code), Some(line)) => format!("exit {code}: {line}"),
                (Some(code), None) => format!("exit {code}"),
                _ => data.to_string(),
            },
            other => other.to_string(),
        },
    };
    truncate(&text, 60)
}

fn last_line(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.lines().rev().find(|l| !l.trim().is_empty())?.to_owned(),
        Value::Array(a) => a
            .iter()
            .rev()
            .filter_map(Value::as_str)
            .find(|l| !l.trim().is_empty())?
            .to_owned(),
        _ => return None,
    };
    Some(s)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Live display of task progress.
enum Display {
    Bars {
        _multi: MultiProgress,
        bars: Vec<ProgressBar>,
        done: ProgressStyle,
    },
    Plain {
        start: Instant,
        names: Vec<String>,
        width: usize,
    },
    Quiet,
}

impl Display {
    fn new(mode: Progress, names: &[String]) -> Self {
        let mode = match mode {
            Progress::Auto if std::io::stdout().is_terminal() => Progress::Bars,
            Progress::Auto => Progress::Plain,
            m => m,
        };
        let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(4);
        match mode {
            Progress::Bars => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
                let running = ProgressStyle::with_template(&format!(
                    "{{spinner}} {{prefix:<{width}}}  {{elapsed:>4}}  {{wide_msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
                let done = ProgressStyle::with_template(&format!(
                    "{{prefix:<{}}}  {{wide_msg}}",
                    width + 2
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
                let bars = names
                    .iter()
                    .map(|n| {
                        let b = multi.add(ProgressBar::new_spinner());
                        b.set_style(running.clone());
                        b.set_prefix(n.clone());
                        b.set_message("submitted");
                        b.enable_steady_tick(Duration::from_millis(100));
                        b
                    })
                    .collect();
                Self::Bars {
                    _multi: multi,
                    bars,
                    done,
                }
            }
            Progress::Plain => Self::Plain {
                start: Instant::now(),
                names: names.to_vec(),
                width,
            },
            _ => Self::Quiet,
        }
    }

    fn update(&self, i: usize, msg: String) {
        match self {
            Self::Bars { bars, .. } => {
                if let Some(b) = bars.get(i) {
                    b.set_message(msg);
                }
            }
            Self::Plain {
                start,
                names,
                width,
            } => {
                let t = start.elapsed().as_secs_f64();
                let name = names.get(i).map_or("?", String::as_str);
                println!("[{t:6.2}s] {name:<width$}  {msg}");
            }
            Self::Quiet => {}
        }
    }

    fn finish(&self, i: usize, msg: String, good: bool) {
        match self {
            Self::Bars { bars, done, .. } => {
                if let Some(b) = bars.get(i) {
                    b.set_style(done.clone());
                    b.set_prefix(format!("{} {}", if good { "✔" } else { "✘" }, b.prefix()));
                    b.finish_with_message(msg);
                }
            }
            Self::Plain { .. } => self.update(i, format!("=> {msg}")),
            Self::Quiet => {}
        }
    }

    fn clear(&self) {
        if let Self::Bars { bars, .. } = self {
            for b in bars.iter().filter(|b| !b.is_finished()) {
                b.abandon();
            }
        }
    }
}

fn describe(state: State, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Abnormal { reason, .. } => {
            let first = reason.lines().next().unwrap_or("");
            // The engine's reasons often start with the state's own word ("cancelled: …").
            let first = first.strip_prefix(&format!("{state}: ")).unwrap_or(first);
            format!("{state}: {}", truncate(first, 70))
        }
        Outcome::Succeeded { .. } => {
            let d = detail(Some(outcome));
            if d.is_empty() {
                state.to_string()
            } else {
                format!("{state} ({d})")
            }
        }
    }
}

/// Submits every task of `file` (already [checked](TaskFile::check)) and follows them until each
/// is terminal or `interrupt` completes. Work still running at an interrupt keeps running in its
/// backend; the report lists it as unfinished.
///
/// Errors: a submit failed (the tasks submitted before it keep running).
pub async fn run(
    engine: &Engine,
    file: &TaskFile,
    progress: Progress,
    interrupt: impl Future<Output = ()>,
) -> Result<RunReport, Error> {
    let names: Vec<String> = file.task.iter().map(|t| t.name.clone()).collect();
    let display = Display::new(progress, &names);
    let mut events = engine.subscribe();
    let current: Arc<Mutex<HashMap<usize, ExecutionId>>> = Arc::default();
    let mut attempt_of: HashMap<ExecutionId, (usize, u32)> = HashMap::new();
    let mut task_of = HashMap::new();
    let mut waits = JoinSet::new();
    let mut started = Vec::with_capacity(file.task.len());
    for (i, spec) in file.task.iter().enumerate() {
        let id = match engine.submit(spec.to_task()).await {
            Ok(id) => id,
            Err(e) => {
                display.clear();
                return Err(e);
            }
        };
        started.push(Instant::now());
        task_of.insert(id.0, i);
        attempt_of.insert(id, (i, 1));
        lock(&current).insert(i, id);
        let e = engine.clone();
        waits.spawn(async move { (i, e.wait_task(id).await) });
        if let Some(after) = spec.cancel_after {
            let (e, current) = (engine.clone(), current.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after.0).await;
                let id = lock(&current).get(&i).copied();
                if let Some(id) = id {
                    let _ = e.cancel(id, format!("cancel_after {after} elapsed")).await;
                }
            });
        }
    }
    let mut results: Vec<Option<TaskResult>> = vec![None; file.task.len()];
    tokio::pin!(interrupt);
    let mut remaining = file.task.len();
    while remaining > 0 {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => on_event(ev, &display, &mut attempt_of, &task_of, &current),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(Error::Shutdown),
            },
            joined = waits.join_next() => {
                let Some(Ok((i, rec))) = joined else { continue };
                let rec = rec?;
                remaining -= 1;
                let spec = &file.task[i];
                let r = TaskResult {
                    name: spec.name.clone(),
                    expect: spec.expect,
                    info_url: engine
                        .instance(rec.distributor.as_str())
                        .ok()
                        .and_then(|inst| inst.distributor().info_url(&rec.execution())),
                    elapsed: started[i].elapsed(),
                    record: rec,
                };
                let attempts = if r.record.attempt.0 > 1 {
                    format!(" after {} attempts", r.record.attempt.0)
                } else {
                    String::new()
                };
                let msg = match &r.record.outcome {
                    Some(o) => format!("{}{attempts}", describe(r.record.state, o)),
                    None => r.record.state.to_string(),
                };
                display.finish(i, msg, r.as_expected());
                results[i] = Some(r);
            }
            () = &mut interrupt => {
                display.clear();
                break;
            }
        }
    }
    let unfinished = results
        .iter()
        .zip(&names)
        .filter(|(r, _)| r.is_none())
        .map(|(_, n)| n.clone())
        .collect();
    Ok(RunReport {
        results: results.into_iter().flatten().collect(),
        unfinished,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn on_event(
    ev: Event,
    display: &Display,
    attempt_of: &mut HashMap<ExecutionId, (usize, u32)>,
    task_of: &HashMap<u64, usize>,
    current: &Mutex<HashMap<usize, ExecutionId>>,
) {
    let at = |id: &ExecutionId| attempt_of.get(id).copied();
    match ev {
        Event::Created {
            id,
            task_id,
            attempt,
            ..
        } => {
            if let Some(&i) = task_of.get(&task_id.0) {
                attempt_of.insert(id, (i, attempt));
                lock(current).insert(i, id);
                if attempt > 1 {
                    display.update(i, format!("attempt {attempt}: queued"));
                }
            }
        }
        Event::Dispatched { id, token } => {
            if let Some((i, n)) = at(&id) {
                display.update(i, format!("attempt {n}: dispatched (token {token})"));
            }
        }
        Event::Started { id } => {
            if let Some((i, n)) = at(&id) {
                display.update(i, format!("attempt {n}: running"));
            }
        }
        Event::CancelRequested { id, cause } => {
            if let Some((i, n)) = at(&id) {
                let why = match cause {
                    CancelCause::Requested { reason } => reason,
                    other => other.describe(),
                };
                display.update(i, format!("attempt {n}: stopping ({why})"));
            }
        }
        Event::Finished { id, state, outcome } => {
            if let Some((i, n)) = at(&id) {
                display.update(i, format!("attempt {n}: {}", describe(state, &outcome)));
            }
        }
        Event::Retried { id, .. } => {
            if let Some((i, n)) = at(&id) {
                display.update(i, format!("attempt {n} ended; retrying"));
            }
        }
        _ => {}
    }
}
