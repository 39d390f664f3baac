//! The state directory and the life of a local execution: what `run`, `status` and `cancel` do,
//! the start queue, and the watchers that push updates.
//!
//! # The state directory: the truth
//!
//! One sub-directory per execution, named after its token (the request id when it is a plain
//! name, else `_` + its hex encoding). A directory appears atomically (staged under `.tmp-…` and
//! renamed into place, which fails if it exists: that is the per-request-id dedupe record and
//! lock). Files, each written atomically (temporary file + rename, or + hard link where the first
//! writer must win):
//!
//! | file | written by | content |
//! |---|---|---|
//! | `spec.json` | `run` | request id, execution id, push token, payload, queue time (mode 0600) |
//! | `stdin` | `run` | the payload's stdin data, if any |
//! | `claim` | the supervisor, before it starts the work / `cancel` | `start <orchestrator pid>` or `cancelled` (first wins) |
//! | `pid` | the supervisor, once the work runs | `<its pid> <supervisor pid>`; its pid is its process group id; the file's mtime is the start time |
//! | `exit` | the supervisor | `exited N`, `signaled N` or `unknown` |
//! | `stop` | `cancel` / time limit | `cancel <ms>` or `time_limit <ms>` (first wins): signals after it are ours |
//! | `error.json` | the instance | why the work could not start |
//! | `stdout`, `stderr` | the work | its output |
//!
//! `status` derives everything from these files (plus "is the process group alive"), so a fresh
//! instance on the same directory knows exactly what an earlier one knew.
//!
//! # Slots and the supervisor
//!
//! An instance runs at most `max_parallel` executions; the rest wait in its queue, oldest first.
//! Starting is the supervisor's job (`supervisor.rs`): the instance sends it start requests, up to
//! `max_parallel` ahead of the running ones, and it starts each one as soon as one of its
//! children ends. A slot is given back when the supervisor reports the exit; the execution's
//! watcher then derives the outcome and pushes `finished`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use distributor_core::{
    AbnormalKind, AdapterHandle, Attempt, AuthToken, Error, ExecutionId, Launch, Notification,
    Notifier, Outcome, RequestId, Result, SchemaValidator, Status, TaskDescription, TaskId,
    Timestamp, Token, ValidationError, Violation,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use url::Url;

use crate::config::{LocalConfig, LocalPayload};
use crate::error::classify;
use crate::supervisor::{
    ExitRecord, Hooks, Skip, Start, StartFailure, Supervisor, group_alive, process_alive,
    signal_group, signal_name,
};

const SPEC: &str = "spec.json";
const STDIN: &str = "stdin";
const CLAIM: &str = "claim";
/// Where layouts before the single `pid` record kept the supervisor's pid.
const OLD_SUPERVISOR: &str = "supervisor";
const PID: &str = "pid";
const EXIT: &str = "exit";
const STOP: &str = "stop";
const ERROR: &str = "error.json";
const STDOUT: &str = "stdout";
const STDERR: &str = "stderr";
const STAGING_PREFIX: &str = ".tmp-";

/// Layout version of `spec.json` and of the adapter handle.
const SPEC_VERSION: u32 = 1;
/// Longest poll step of a re-attached watcher.
const MAX_POLL: Duration = Duration::from_millis(500);
/// How often a watcher of work started by this instance's supervisor checks the state directory
/// when no report came (the supervisor reports every exit: this only guards against a lost one).
const SUPERVISED_POLL: Duration = Duration::from_secs(5);
/// How many bytes at the end of a log file are searched for its last lines.
const TAIL_BYTES: u64 = 64 * 1024;
/// How many finished statuses an instance keeps in memory (answers to the pushes and polls that
/// follow an execution's end, without reading its directory again).
const FINISHED_CACHE: usize = 4096;

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// The resolved config of an instance.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) state_dir: PathBuf,
    pub(crate) max_parallel: usize,
    pub(crate) grace: Duration,
    pub(crate) info_base_url: Option<Url>,
    pub(crate) tail_lines: usize,
    pub(crate) poll_interval: Duration,
}

/// One `local` instance: settings, the start queue, and the running executions it watches.
#[derive(Debug)]
pub(crate) struct Local {
    settings: Settings,
    notifier: Notifier,
    payload_schema: SchemaValidator,
    inner: Mutex<Inner>,
    /// The supervisor that starts this instance's work (forked at the first start; replaced if
    /// it dies).
    supervisor: Mutex<Option<Arc<Supervisor>>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Executions holding a slot (starting or running and watched), with their watcher's wake-up.
    slots: HashMap<Token, Arc<Notify>>,
    /// Executions in `slots` whose main process has ended (the supervisor reported it): their
    /// slot is free for the next work while their watcher finishes up.
    ended: HashSet<Token>,
    /// Executions in `slots` followed through their files (started by an earlier supervisor).
    adopted: HashSet<Token>,
    /// Exit records reported by the supervisor, until the execution's watcher takes them.
    exits: HashMap<Token, ExitRecord>,
    /// Executions waiting for a slot, oldest first, with their spec when this instance queued
    /// them (else it is read when they start).
    queue: VecDeque<(Token, Option<Spec>)>,
    /// Final statuses derived by watchers, most recent last (at most [`FINISHED_CACHE`]). A
    /// finished execution's files no longer change, so these equal what `status` would read.
    finished: HashMap<Token, Status>,
    finished_order: VecDeque<Token>,
}

impl Inner {
    /// Slots taken: executions starting or running.
    fn busy(&self) -> usize {
        self.slots.len() - self.ended.len()
    }

    fn is_queued(&self, token: &Token) -> bool {
        self.queue.iter().any(|(t, _)| t == token)
    }

    fn remember_finished(&mut self, token: &Token, status: Status) {
        if self.finished.insert(token.clone(), status).is_none() {
            self.finished_order.push_back(token.clone());
        }
        while self.finished_order.len() > FINISHED_CACHE {
            if let Some(old) = self.finished_order.pop_front() {
                self.finished.remove(&old);
            }
        }
    }
}

/// What `run` records before anything starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    version: u32,
    request_id: RequestId,
    execution_id: ExecutionId,
    task_id: TaskId,
    attempt: Attempt,
    auth_token: AuthToken,
    payload: LocalPayload,
    queued_at: Timestamp,
}

/// Who owns the right to start an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    /// An orchestrator process (pid) is starting or has started it.
    Start(u32),
    /// It was cancelled before it started: nobody may start it.
    Cancelled,
}

impl Claim {
    fn encode(&self) -> String {
        match self {
            Self::Start(pid) => format!("start {pid}\n"),
            Self::Cancelled => "cancelled\n".into(),
        }
    }
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s == "cancelled" {
            return Some(Self::Cancelled);
        }
        s.strip_prefix("start ")?.parse().ok().map(Self::Start)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancel,
    TimeLimit,
}

/// The adapter decided to stop the work (and signals after `at` are its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stop {
    reason: StopReason,
    at: Timestamp,
}

impl Stop {
    fn encode(&self) -> String {
        let word = match self.reason {
            StopReason::Cancel => "cancel",
            StopReason::TimeLimit => "time_limit",
        };
        format!("{word} {}\n", self.at.0)
    }
    fn parse(s: &str) -> Option<Self> {
        let (word, at) = s.trim().split_once(' ')?;
        let reason = match word {
            "cancel" => StopReason::Cancel,
            "time_limit" => StopReason::TimeLimit,
            _ => return None,
        };
        Some(Self {
            reason,
            at: Timestamp(at.parse().ok()?),
        })
    }
}

/// Why the work could not be started.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartError {
    kind: AbnormalKind,
    message: String,
}

/// Everything the state directory says about one execution, read in one go.
#[derive(Debug)]
struct Snapshot {
    spec: Spec,
    error: Option<StartError>,
    claim: Option<Claim>,
    pid: Option<i32>,
    started_at: Option<Timestamp>,
    supervisor: Option<i32>,
    exit: Option<Option<ExitRecord>>,
    stop: Option<Stop>,
}

/// The two pushes of an execution, with their update sequence numbers (fixed per event, so they
/// keep increasing across orchestrator restarts).
#[derive(Debug, Clone, Copy)]
enum Event {
    Running,
    Finished,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Finished => "finished",
        }
    }
    fn sequence(self) -> u64 {
        match self {
            Self::Running => 1,
            Self::Finished => 2,
        }
    }
}

/// What [`Local::enforce`] did.
#[derive(Debug, Default)]
struct Enforced {
    /// When the next time limit or kill falls due.
    next: Option<Timestamp>,
    /// Whether it recorded a stop (the snapshot is stale).
    changed: bool,
}

/// How a watcher learns that the work's state changed (besides its wake-up).
enum Waiter {
    /// Started by this instance's supervisor, which reports the exit through the wake-up: check
    /// now and then only in case a report is lost; poll once the supervisor is gone.
    Supervised(Arc<Supervisor>),
    /// Re-attached (or the supervisor is gone): poll the state directory with a growing step.
    Poll(Duration),
}

impl Waiter {
    async fn wait(&mut self) {
        match self {
            Self::Supervised(s) => {
                if s.is_lost() {
                    *self = Self::Poll(Duration::from_millis(20));
                } else {
                    tokio::time::sleep(SUPERVISED_POLL).await;
                }
            }
            Self::Poll(step) => {
                tokio::time::sleep(*step).await;
                *step = (*step * 2).min(MAX_POLL);
            }
        }
    }
}

/// A start request sent: the supervisor's answer will come on the receiver.
type Asked = (
    oneshot::Receiver<crate::supervisor::Started>,
    Arc<Supervisor>,
);

impl Local {
    /// Resolves `config`, creates the state directory, and re-attaches to what it holds: running
    /// work gets a watcher, queued work goes back in the queue (oldest first) and starts as
    /// slots allow.
    pub(crate) fn build(config: LocalConfig, notifier: Notifier) -> Result<Arc<Self>> {
        let state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| classify(format!("state directory {}", config.state_dir.display()), e))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|e| classify(format!("creating {}", state_dir.display()), e))?;
        let settings = Settings {
            state_dir,
            max_parallel: usize::try_from(config.max_parallel.max(1)).unwrap_or(usize::MAX),
            grace: Duration::from_millis(config.grace_period_ms),
            info_base_url: config.info_base_url,
            tail_lines: usize::try_from(config.tail_lines).unwrap_or(usize::MAX),
            poll_interval: Duration::from_millis(config.poll_interval_ms.max(1)),
        };
        let local = Arc::new(Self {
            settings,
            notifier,
            payload_schema: SchemaValidator::of::<LocalPayload>(),
            inner: Mutex::new(Inner::default()),
            supervisor: Mutex::new(None),
        });
        local.rescan()?;
        Ok(local)
    }

    /// The resolved settings.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory of `token`, or `None` for a string that is not a token of this adapter
    /// (so that no token can point outside the state directory).
    fn dir_of(&self, token: &Token) -> Option<PathBuf> {
        valid_token(token.as_str()).then(|| self.settings.state_dir.join(token.as_str()))
    }

    fn path(&self, token: &Token) -> PathBuf {
        self.settings.state_dir.join(token.as_str())
    }

    fn launch(&self, token: Token) -> Launch {
        let dir = self.path(&token);
        Launch {
            token,
            handle: AdapterHandle {
                version: SPEC_VERSION,
                data: json!({ "dir": dir }),
            },
            poll_interval: Some(self.settings.poll_interval),
        }
    }

    /// Schema, then semantic checks of a payload.
    pub(crate) fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        self.payload_schema
            .validate("payload for kind `local`", payload)?;
        match serde_json::from_value::<LocalPayload>(payload.clone()) {
            Ok(p) => p.check(),
            Err(e) => Err(ValidationError {
                subject: "payload for kind `local`".into(),
                violations: vec![Violation {
                    pointer: String::new(),
                    expected: "a local payload".into(),
                    message: e.to_string(),
                    suggestion: None,
                }],
            }),
        }
    }

    /// Records the execution and starts it, or queues it when every slot is taken.
    pub(crate) async fn run(self: &Arc<Self>, task: &TaskDescription) -> Result<Launch> {
        let payload: LocalPayload = serde_json::from_value(task.payload.clone())
            .map_err(|e| Error::permanent(format!("invalid payload for kind `local`: {e}")))?;
        payload.check()?;
        let token = token_for(&task.request_id)?;
        let dir = self.path(&token);
        let spec = Spec {
            version: SPEC_VERSION,
            request_id: task.request_id.clone(),
            execution_id: task.execution_id,
            task_id: task.task_id,
            attempt: task.attempt,
            auth_token: task.notify.auth_token.clone(),
            payload,
            queued_at: Timestamp::now(),
        };
        let staging = self.settings.state_dir.join(format!(
            "{STAGING_PREFIX}{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        if let Err(e) = stage(&staging, &spec) {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        if let Err(e) = fs::rename(&staging, &dir) {
            let _ = fs::remove_dir_all(&staging);
            return match e.raw_os_error() {
                Some(libc::ENOTEMPTY | libc::EEXIST) => self.existing(token),
                _ => Err(classify(format!("creating {}", dir.display()), e)),
            };
        }
        let start_now = {
            let mut g = self.lock();
            if g.busy() < self.settings.max_parallel && g.queue.is_empty() {
                g.slots.insert(token.clone(), Arc::new(Notify::new()));
                true
            } else {
                g.queue.push_back((token.clone(), Some(spec.clone())));
                false
            }
        };
        if start_now {
            match self.start(&token, &spec, true).await {
                Ok(true) => {}
                Ok(false) => self.release(&token),
                Err(e) => {
                    self.release(&token);
                    return Err(e);
                }
            }
        }
        Ok(self.launch(token))
    }

    /// The answer to a repeated `run`: the same token, or the same refusal.
    fn existing(&self, token: Token) -> Result<Launch> {
        if let Some(err) = read_error(&self.path(&token))?
            && err.kind == AbnormalKind::Rejected
        {
            return Err(Error::permanent(err.message));
        }
        Ok(self.launch(token))
    }

    /// The running supervisor, forked now if there is none (or the last one is gone).
    fn supervisor(self: &Arc<Self>) -> io::Result<Arc<Supervisor>> {
        let mut slot = self
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slot.as_ref()
            && !s.is_lost()
        {
            return Ok(Arc::clone(s));
        }
        let (on_exit, on_lost) = (Arc::downgrade(self), Arc::downgrade(self));
        let s = Supervisor::spawn(
            &self.settings.state_dir,
            self.settings.max_parallel,
            Hooks {
                exited: Box::new(move |token, record| {
                    if let Some(local) = on_exit.upgrade() {
                        local.ended(&Token::new(token), record);
                    }
                }),
                lost: Box::new(move || {
                    if let Some(local) = on_lost.upgrade() {
                        for wake in local.lock().slots.values() {
                            wake.notify_one();
                        }
                    }
                }),
            },
        )?;
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }

    /// Asks the supervisor to start a recorded execution (it takes the claim when it does).
    fn begin(self: &Arc<Self>, token: &Token) -> Result<Asked> {
        let supervisor = self
            .supervisor()
            .map_err(|e| classify("starting the supervisor", e))?;
        Ok((supervisor.request(token.as_str()), supervisor))
    }

    /// Starts a recorded execution whose slot the caller has reserved. `Ok(true)`: a watcher
    /// now holds the slot; `Ok(false)`: nothing to run (cancelled, or another live instance is
    /// starting it), the caller frees the slot. On error the failure is recorded in `error.json`
    /// (or, for a transient failure inside `run` after which nothing runs, the directory is
    /// removed so a retry starts afresh) and the caller frees the slot.
    async fn start(self: &Arc<Self>, token: &Token, spec: &Spec, from_run: bool) -> Result<bool> {
        match self.begin(token) {
            Ok((reply, supervisor)) => self.finish(token, spec, from_run, reply, supervisor).await,
            Err(e) => Err(self.failed_start(token, spec, from_run, e, true)),
        }
    }

    /// The second half of [`Self::start`]: awaits the supervisor's answer, then follows the
    /// work (or records why it did not start).
    async fn finish(
        self: &Arc<Self>,
        token: &Token,
        spec: &Spec,
        from_run: bool,
        reply: oneshot::Receiver<crate::supervisor::Started>,
        supervisor: Arc<Supervisor>,
    ) -> Result<bool> {
        let dir = self.path(token);
        let program = spec
            .payload
            .command_line()
            .first()
            .cloned()
            .unwrap_or_default();
        match reply.await {
            Ok(Ok(Start::Skipped(Skip::Cancelled | Skip::Owned))) => Ok(false),
            Ok(Ok(Start::Skipped(Skip::Adopt))) => {
                self.attach(token, Waiter::Poll(Duration::from_millis(20)));
                Ok(true)
            }
            Ok(Ok(Start::Running(pid))) => {
                self.push(spec, token, Event::Running);
                // A cancel that raced with this start may have found no pid to signal.
                if read_stop(&dir).is_some() {
                    let _ = signal_group(pid, libc::SIGTERM);
                }
                self.attach_with(
                    token,
                    Waiter::Supervised(supervisor),
                    Some((spec.clone(), pid)),
                );
                Ok(true)
            }
            Ok(Err(StartFailure::NotStarted(e))) => {
                // A missing working directory fails the spawn with the same errno as a missing
                // program: name the directory, or the user hunts for the wrong file.
                let what = match spec.payload.cwd.as_deref() {
                    Some(cwd) if !cwd.is_dir() => format!(
                        "starting `{program}`: working directory `{}` does not exist or is not \
                         a directory",
                        cwd.display()
                    ),
                    Some(cwd) => format!("starting `{program}` in `{}`", cwd.display()),
                    None => format!("starting `{program}`"),
                };
                let err = classify(what, e);
                Err(self.failed_start(token, spec, from_run, err, true))
            }
            Ok(Err(StartFailure::Lost)) | Err(_) => {
                if read_pid(&dir, PID).is_some() {
                    // It started before the supervisor went away: follow it through the files.
                    self.push(spec, token, Event::Running);
                    self.attach(token, Waiter::Poll(Duration::from_millis(20)));
                    return Ok(true);
                }
                match read_claim(&dir) {
                    Ok(None) if !dir.join(CLAIM).exists() => {
                        // Never claimed, so never started: it waits again, first in line.
                        self.lock()
                            .queue
                            .push_front((token.clone(), Some(spec.clone())));
                        return Ok(false);
                    }
                    // A cancel came first: it has ended the execution.
                    Ok(Some(Claim::Cancelled)) => return Ok(false),
                    _ => {}
                }
                let err = Error::transient(format!(
                    "the supervisor (pid {}) exited before starting `{program}`",
                    supervisor.pid()
                ));
                // It may have started without a record: never start it a second time.
                Err(self.failed_start(token, spec, from_run, err, false))
            }
        }
    }

    /// Records why an execution could not start and returns the error for the caller. A
    /// transient failure inside `run` after which nothing runs (`retry_safe`) removes the
    /// directory instead, so that the engine's retry starts afresh.
    fn failed_start(
        &self,
        token: &Token,
        spec: &Spec,
        from_run: bool,
        err: Error,
        retry_safe: bool,
    ) -> Error {
        let dir = self.path(token);
        if from_run && retry_safe && err.is_transient() {
            let _ = fs::remove_dir_all(&dir);
            return err;
        }
        let record = StartError {
            kind: if err.is_transient() {
                AbnormalKind::Crashed
            } else {
                AbnormalKind::Rejected
            },
            message: err.to_string(),
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = write_atomic(&dir, ERROR, &body) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot record start failure");
        }
        if !from_run {
            self.push(spec, token, Event::Finished);
        }
        err
    }

    /// The supervisor reported that `token`'s main process ended: its slot goes to the next
    /// queued work now, and its watcher wakes to derive the outcome and push it.
    fn ended(self: &Arc<Self>, token: &Token, record: Option<ExitRecord>) {
        let freed = {
            let mut g = self.lock();
            match g.slots.get(token).cloned() {
                Some(wake) => {
                    if let Some(record) = record {
                        g.exits.insert(token.clone(), record);
                    }
                    wake.notify_one();
                    g.ended.insert(token.clone())
                }
                None => false,
            }
        };
        if freed {
            self.pump();
        }
    }

    /// Frees `token`'s slot and starts queued work into free slots.
    fn release(self: &Arc<Self>, token: &Token) {
        {
            let mut g = self.lock();
            g.slots.remove(token);
            g.ended.remove(token);
            g.adopted.remove(token);
            g.exits.remove(token);
        }
        self.pump();
    }

    /// Starts queued executions while slots are free: takes each one's claim and asks the
    /// supervisor here; the answer is awaited on a task of its own.
    fn pump(self: &Arc<Self>) {
        loop {
            let next = {
                let mut g = self.lock();
                // The supervisor gets up to `max_parallel` executions ahead of the running ones,
                // so that it starts the next one as soon as a slot frees; not while work started
                // elsewhere runs (the supervisor only counts its own children).
                let ahead = if g.adopted.is_empty() {
                    self.settings.max_parallel
                } else {
                    0
                };
                if g.busy() >= self.settings.max_parallel.saturating_add(ahead) {
                    None
                } else {
                    let next = g.queue.pop_front();
                    if let Some((t, _)) = &next {
                        g.slots.insert(t.clone(), Arc::new(Notify::new()));
                    }
                    next
                }
            };
            let Some((token, spec)) = next else { break };
            let spec = match spec {
                Some(spec) => Ok(Some(spec)),
                None => read_spec(&self.path(&token)),
            };
            let spec = match spec {
                Ok(Some(spec)) => spec,
                Ok(None) => {
                    self.lock().slots.remove(&token);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(token = %token, error = %e, "queued work has no readable spec");
                    self.lock().slots.remove(&token);
                    continue;
                }
            };
            match self.begin(&token) {
                Ok((reply, supervisor)) => {
                    let this = Arc::clone(self);
                    tokio::spawn(async move {
                        match this.finish(&token, &spec, false, reply, supervisor).await {
                            Ok(true) => {}
                            Ok(false) => this.release(&token),
                            Err(e) => {
                                tracing::warn!(token = %token, error = %e, "queued work could not start");
                                this.release(&token);
                            }
                        }
                    });
                }
                Err(e) => {
                    let e = self.failed_start(&token, &spec, false, e, true);
                    tracing::warn!(token = %token, error = %e, "queued work could not start");
                    self.lock().slots.remove(&token);
                }
            }
        }
    }

    /// Spawns the watcher of `token` (its slot is already held).
    fn attach(self: &Arc<Self>, token: &Token, waiter: Waiter) {
        self.attach_with(token, waiter, None);
    }

    /// Spawns the watcher of `token`; `fresh` is the spec of work this instance has just started
    /// (its state is known: the watcher skips reading it until something happens).
    fn attach_with(self: &Arc<Self>, token: &Token, waiter: Waiter, fresh: Option<(Spec, i32)>) {
        let wake = {
            let mut g = self.lock();
            if matches!(waiter, Waiter::Poll(_)) {
                g.adopted.insert(token.clone());
            }
            g.slots
                .entry(token.clone())
                .or_insert_with(|| Arc::new(Notify::new()))
                .clone()
        };
        let this = Arc::clone(self);
        let token = token.clone();
        tokio::spawn(async move { this.watch(token, waiter, wake, fresh).await });
    }

    /// Follows one execution until it is finished: enforces its time limit and the kill after
    /// the grace period, then frees the slot and pushes `finished`.
    async fn watch(
        self: Arc<Self>,
        token: Token,
        mut waiter: Waiter,
        wake: Arc<Notify>,
        mut fresh: Option<(Spec, i32)>,
    ) {
        let dir = self.path(&token);
        let mut spec = None;
        // For work this instance started: its pid and its supervisor's.
        let mut known: Option<(i32, Option<i32>)> = None;
        loop {
            if let Some((started, pid)) = fresh.take() {
                known = Some((
                    pid,
                    match &waiter {
                        Waiter::Supervised(s) => Some(s.pid()),
                        Waiter::Poll(_) => None,
                    },
                ));
                // Just started by this instance: running, no stop recorded (a cancel that raced
                // with the start was signalled by the starter and wakes us). The time limit
                // counts from the `pid` record, written before the spawn returned: a limit from
                // now is at most a few milliseconds late, and exact once re-read.
                let deadline = started
                    .payload
                    .time_limit_ms
                    .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
                spec = Some(started);
                next_change(&mut waiter, &wake, deadline).await;
                continue;
            }
            let ended = match (known, &spec) {
                (Some((pid, supervisor)), Some(spec)) => {
                    let reported = self.lock().exits.remove(&token);
                    ended_snapshot(&dir, spec, pid, supervisor, reported)
                }
                _ => None,
            };
            let snap = match ended.map_or_else(|| read_snapshot(&dir), |s| Ok(Some(s))) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read state");
                    waiter = Waiter::Poll(MAX_POLL);
                    waiter.wait().await;
                    continue;
                }
            };
            let enforced = self.enforce(&dir, &snap);
            let next = enforced.next;
            let status = if enforced.changed {
                // A stop was just recorded: the snapshot is stale; next round reads again.
                Ok(Status::Running)
            } else {
                self.derive(&dir, &snap)
            };
            spec = Some(snap.spec);
            if let Ok(status @ Status::Finished(_)) = status {
                self.lock().remember_finished(&token, status);
                break;
            }
            let deadline = next.map(instant_of);
            next_change(&mut waiter, &wake, deadline).await;
        }
        self.release(&token);
        if let Some(spec) = spec {
            self.push(&spec, &token, Event::Finished);
        }
    }

    /// Pushes `event` for the execution through the notifier (best effort).
    fn push(&self, spec: &Spec, token: &Token, event: Event) {
        let body = json!({ "local": { "token": token.as_str(), "event": event.as_str() } });
        let mut n = Notification::json(&body);
        n.attributes
            .insert("auth_token".into(), spec.auth_token.0.clone());
        n.sequence = Some(event.sequence());
        n.message_id = Some(format!("local/{token}/{}", event.as_str()));
        self.notifier.send(spec.execution_id, n);
    }

    /// Reads the status from the state directory, applying due time limits and kills first.
    pub(crate) fn status(&self, token: &Token) -> Result<Status> {
        let Some(dir) = self.dir_of(token) else {
            return Ok(missing(token, "is not a token of the local distributor"));
        };
        if let Some(done) = self.lock().finished.get(token) {
            return Ok(done.clone());
        }
        let Some(snap) = read_snapshot(&dir)? else {
            return Ok(missing(
                token,
                &format!("has no state under {}", self.settings.state_dir.display()),
            ));
        };
        if self.enforce(&dir, &snap).changed {
            // Enforcing recorded a stop: derive from the new state.
            if let Some(fresh) = read_snapshot(&dir)? {
                return self.derive(&dir, &fresh);
            }
        }
        self.derive(&dir, &snap)
    }

    /// The answer to a push of `event` for `token`: `Running` without reading the directory for
    /// the `running` push of work this instance watches (its `finished` push follows), else
    /// [`Self::status`].
    pub(crate) fn status_for_push(&self, token: &Token, event: Option<&str>) -> Result<Status> {
        if event == Some(Event::Running.as_str()) {
            let g = self.lock();
            if g.slots.contains_key(token) && !g.finished.contains_key(token) {
                return Ok(Status::Running);
            }
        }
        self.status(token)
    }

    /// `status`, and make sure running or queued work is followed by this instance.
    pub(crate) fn recover(self: &Arc<Self>, token: &Token) -> Result<Status> {
        let status = self.status(token)?;
        let Some(dir) = self.dir_of(token) else {
            return Ok(status);
        };
        match status {
            Status::Running => {
                let watched = self.lock().slots.contains_key(token);
                if !watched {
                    self.attach(token, Waiter::Poll(Duration::from_millis(20)));
                }
            }
            Status::Pending => {
                if !dir.join(CLAIM).exists() {
                    {
                        let mut g = self.lock();
                        if !g.slots.contains_key(token) && !g.is_queued(token) {
                            g.queue.push_back((token.clone(), None));
                        }
                    }
                    self.pump();
                }
            }
            Status::Finished(_) => {}
        }
        Ok(status)
    }

    /// Asks the work to stop: queued work is cancelled outright; running work gets SIGTERM now
    /// and SIGKILL after the grace period. Finished or unknown work: nothing to do.
    pub(crate) fn cancel(self: &Arc<Self>, token: &Token) -> Result<()> {
        let Some(dir) = self.dir_of(token) else {
            return Ok(());
        };
        let Some(snap) = read_snapshot(&dir)? else {
            return Ok(());
        };
        if snap.error.is_some() {
            return Ok(());
        }
        let io = |what: &str, e: io::Error| classify(format!("{what} {}", dir.display()), e);
        let Some(pid) = snap.pid else {
            let prior = claim(&dir, &Claim::Cancelled).map_err(|e| io("cancelling", e))?;
            let won = match prior {
                None => true,
                Some(Claim::Cancelled) => false,
                Some(Claim::Start(owner)) => {
                    if !pid_alive(owner) {
                        // The starter died before starting it: nobody will; cancel outright.
                        write_atomic(&dir, CLAIM, Claim::Cancelled.encode().as_bytes())
                            .map_err(|e| io("cancelling", e))?;
                        true
                    } else {
                        // Being started right now: the starter signals it once it runs.
                        write_stop(&dir, StopReason::Cancel).map_err(|e| io("cancelling", e))?;
                        if let Some(pid) = read_pid(&dir, PID) {
                            signal_group(pid, libc::SIGTERM).map_err(|e| io("signalling", e))?;
                        }
                        false
                    }
                }
            };
            if won {
                self.lock().queue.retain(|(t, _)| t != token);
                self.push(&snap.spec, token, Event::Finished);
            }
            return Ok(());
        };
        let finished = match snap.exit {
            Some(_) => snap.stop.is_none() || !group_alive(pid),
            None => false,
        };
        if finished {
            return Ok(());
        }
        write_stop(&dir, StopReason::Cancel).map_err(|e| io("cancelling", e))?;
        signal_group(pid, libc::SIGTERM).map_err(|e| io("signalling", e))?;
        if let Some(wake) = self.lock().slots.get(token) {
            wake.notify_one();
        }
        Ok(())
    }

    /// Applies what is due: the time limit (record the stop, SIGTERM) and the kill after the
    /// grace period (SIGKILL).
    fn enforce(&self, dir: &Path, snap: &Snapshot) -> Enforced {
        let Some(pid) = snap.pid else {
            return Enforced::default();
        };
        if snap.error.is_some() {
            return Enforced::default();
        }
        let now = Timestamp::now();
        let mut next: Option<Timestamp> = None;
        let mut changed = false;
        let mut stop = snap.stop;
        if stop.is_none()
            && snap.exit.is_none()
            && let (Some(limit), Some(started)) = (snap.spec.payload.time_limit_ms, snap.started_at)
        {
            let due = started.plus(Duration::from_millis(limit));
            if now >= due {
                match write_stop(dir, StopReason::TimeLimit) {
                    Ok(s) => {
                        stop = Some(s);
                        changed = true;
                        if let Err(e) = signal_group(pid, libc::SIGTERM) {
                            tracing::warn!(pid, error = %e, "cannot stop work past its time limit");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot record time limit")
                    }
                }
            } else {
                next = Some(due);
            }
        }
        if let Some(stop) = stop
            && group_alive(pid)
        {
            let due = stop.at.plus(self.settings.grace);
            if now >= due {
                if let Err(e) = signal_group(pid, libc::SIGKILL) {
                    tracing::warn!(pid, error = %e, "cannot kill work after its grace period");
                }
                // Check again shortly for the group to be gone.
                next = Some(now.plus(Duration::from_millis(20)));
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        Enforced { next, changed }
    }

    /// The status the files say, without side effects.
    fn derive(&self, dir: &Path, snap: &Snapshot) -> Result<Status> {
        if let Some(err) = &snap.error {
            return Ok(Status::Finished(Outcome::abnormal(
                err.kind,
                err.message.clone(),
            )));
        }
        let Some(pid) = snap.pid else {
            return Ok(match snap.claim {
                Some(Claim::Cancelled) => Status::Finished(Outcome::abnormal(
                    AbnormalKind::Cancelled,
                    "cancelled before it started",
                )),
                _ => Status::Pending,
            });
        };
        // `Some(record)` once the main process is gone (`Some(None)`: without a record).
        let ended: Option<Option<ExitRecord>> = match snap.exit {
            Some(record) => Some(record),
            None => {
                if group_alive(pid) || snap.supervisor.is_some_and(process_alive) {
                    None
                } else {
                    // The supervisor may have written the record after our first read.
                    Some(
                        match read_opt(&dir.join(EXIT)).map_err(|e| io_err(dir, e))? {
                            Some(s) => ExitRecord::parse(&s),
                            None => None,
                        },
                    )
                }
            }
        };
        let Some(record) = ended else {
            return Ok(Status::Running);
        };
        if let Some(stop) = snap.stop {
            if group_alive(pid) {
                return Ok(Status::Running);
            }
            let how = match record {
                Some(ExitRecord::Signaled(libc::SIGKILL)) => format!(
                    "killed by SIGKILL after the {} ms grace period",
                    self.settings.grace.as_millis()
                ),
                Some(ExitRecord::Signaled(s)) => format!("terminated by {}", signal_name(s)),
                Some(ExitRecord::Exited(c)) => format!("exited with code {c} after SIGTERM"),
                Some(ExitRecord::Unknown) | None => "stopped".into(),
            };
            return Ok(Status::Finished(match stop.reason {
                StopReason::Cancel => {
                    Outcome::abnormal(AbnormalKind::Cancelled, format!("cancelled: {how}"))
                }
                StopReason::TimeLimit => Outcome::abnormal(
                    AbnormalKind::TimedOut,
                    format!(
                        "exceeded its time limit of {} ms: {how}",
                        snap.spec.payload.time_limit_ms.unwrap_or_default()
                    ),
                ),
            }));
        }
        let hint = || {
            tail(&dir.join(STDERR), 1)
                .pop()
                .map(|l| format!("; stderr: {}", truncate(&l, 200)))
                .unwrap_or_default()
        };
        Ok(Status::Finished(match record {
            Some(ExitRecord::Exited(0)) => Outcome::Succeeded {
                data: json!({
                    "exit_code": 0,
                    "stdout": dir.join(STDOUT),
                    "stderr": dir.join(STDERR),
                    "stdout_tail": tail(&dir.join(STDOUT), self.settings.tail_lines),
                    "stderr_tail": tail(&dir.join(STDERR), self.settings.tail_lines),
                }),
            },
            Some(ExitRecord::Exited(code)) => Outcome::abnormal(
                AbnormalKind::Failed,
                format!("exited with code {code}{}", hint()),
            ),
            Some(ExitRecord::Signaled(s)) => Outcome::abnormal(
                AbnormalKind::Crashed,
                format!(
                    "killed by {} (signal {s}), not sent by the distributor{}",
                    signal_name(s),
                    hint()
                ),
            ),
            Some(ExitRecord::Unknown) => Outcome::abnormal(
                AbnormalKind::Crashed,
                "its supervisor could not collect the exit status",
            ),
            None => match snap.exit {
                Some(None) => Outcome::abnormal(
                    AbnormalKind::ResultMalformed,
                    format!("unreadable exit record in {}", dir.join(EXIT).display()),
                ),
                _ => Outcome::abnormal(
                    AbnormalKind::Crashed,
                    format!(
                        "its supervisor{} ended without recording an exit status",
                        snap.supervisor
                            .map(|p| format!(" (pid {p})"))
                            .unwrap_or_default()
                    ),
                ),
            },
        }))
    }

    /// The link to the execution's log: `{info_base_url}/executions/{id}/log`, or the `file://`
    /// URL of its stdout. Pure.
    pub(crate) fn info_url(&self, id: ExecutionId, token: &Token) -> Option<Url> {
        match &self.settings.info_base_url {
            Some(base) => Url::parse(&format!(
                "{}/executions/{id}/log",
                base.as_str().trim_end_matches('/')
            ))
            .ok(),
            None => self
                .dir_of(token)
                .and_then(|d| Url::from_file_path(d.join(STDOUT)).ok()),
        }
    }

    /// Re-attaches to the state directory: watchers for running work, the queue for waiting
    /// work; removes staging directories left by a crash.
    fn rescan(self: &Arc<Self>) -> Result<()> {
        let dir = &self.settings.state_dir;
        let entries = fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        let mut queued: Vec<(Timestamp, Token)> = Vec::new();
        let mut running: Vec<Token> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(STAGING_PREFIX) {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(60));
                if stale {
                    let _ = fs::remove_dir_all(&path);
                }
                continue;
            }
            if !valid_token(&name) {
                continue;
            }
            let token = Token::new(name);
            let snap = match read_snapshot(&path) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "skipping unreadable execution");
                    continue;
                }
            };
            if snap.error.is_some() {
                continue;
            }
            match (&snap.claim, snap.pid) {
                (Some(Claim::Cancelled), _) => {}
                // Started or being started by a live orchestrator process: theirs to follow.
                (Some(Claim::Start(owner)), _) if pid_alive(*owner) => {}
                (_, Some(_)) => {
                    if !matches!(self.derive(&path, &snap), Ok(Status::Finished(_))) {
                        running.push(token);
                    }
                }
                (_, None) => queued.push((snap.spec.queued_at, token)),
            }
        }
        queued.sort();
        {
            let mut g = self.lock();
            for t in &running {
                g.slots.insert(t.clone(), Arc::new(Notify::new()));
            }
            g.queue.extend(queued.into_iter().map(|(_, t)| (t, None)));
        }
        for t in &running {
            self.attach(t, Waiter::Poll(Duration::from_millis(20)));
        }
        self.pump();
        Ok(())
    }
}

/// Writes the spec (and stdin data) into a fresh staging directory.
fn stage(staging: &Path, spec: &Spec) -> Result<()> {
    let io = |e| classify(format!("staging {}", staging.display()), e);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(staging)
        .map_err(io)?;
    let body =
        serde_json::to_vec(spec).map_err(|e| Error::permanent(format!("encoding spec: {e}")))?;
    write_new(&staging.join(SPEC), &body).map_err(io)?;
    if let Some(data) = &spec.payload.stdin {
        write_new(&staging.join(STDIN), data.as_bytes()).map_err(io)?;
    }
    Ok(())
}

/// Runs in the supervisor: takes the execution's claim for its orchestrator (`start
/// <orchestrator pid>`: the process that follows the work; a restarted orchestrator adopts work
/// whose claim names a dead one), starts it from its `spec.json` in its own process group, and
/// records `<its pid> <supervisor pid>` in `pid`.
/// Skips it when the claim says so: cancelled, held by a live starter, or started by a dead one
/// (adopt). Errors: an invalid token, an unreadable spec, the claim's, the spawn's (`ENOENT`,
/// `EACCES`, `EAGAIN`…), or the `pid` record's (the work is then killed: untracked work must not
/// run).
pub(crate) fn start_work(
    state_dir: &Path,
    token: &str,
    supervisor: i32,
    orchestrator: u32,
) -> io::Result<Start> {
    if !valid_token(token) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{token}` is not a token"),
        ));
    }
    let dir = state_dir.join(token);
    let spec = read_spec(&dir)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no spec.json"))?;
    match claim(&dir, &Claim::Start(orchestrator))? {
        None => {}
        Some(Claim::Cancelled) => return Ok(Start::Skipped(Skip::Cancelled)),
        Some(Claim::Start(owner)) => {
            // A live orchestrator process (another one, or ours for a repeated request)
            // follows it.
            if pid_alive(owner) {
                return Ok(Start::Skipped(Skip::Owned));
            }
            // Its starter died: adopt it if it runs, else start it.
            if read_pid(&dir, PID).is_some() {
                return Ok(Start::Skipped(Skip::Adopt));
            }
            write_atomic(&dir, CLAIM, Claim::Start(orchestrator).encode().as_bytes())?;
        }
    }
    let child = command(&dir, &spec)?.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("process id out of range"))?;
    if let Err(e) = write_atomic(&dir, PID, format!("{pid} {supervisor}\n").as_bytes()) {
        let _ = signal_group(pid, libc::SIGKILL);
        return Err(e);
    }
    Ok(Start::Running(pid))
}

/// Runs in the supervisor: records how the work of `token` ended.
pub(crate) fn write_exit(state_dir: &Path, token: &str, record: ExitRecord) -> io::Result<()> {
    write_atomic(&state_dir.join(token), EXIT, record.encode().as_bytes())
}

/// The command for an execution, with its stdio wired to the execution's files, its own process
/// group, and the `DISTRIBUTOR_*` variables set (the payload's `env` may override them).
fn command(dir: &Path, spec: &Spec) -> io::Result<std::process::Command> {
    let p = &spec.payload;
    let argv = p.command_line();
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty command line",
        ));
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).process_group(0);
    if p.clear_env {
        cmd.env_clear();
    }
    cmd.env("DISTRIBUTOR_EXECUTION_ID", spec.execution_id.to_string())
        .env("DISTRIBUTOR_TASK_ID", spec.task_id.to_string())
        .env("DISTRIBUTOR_ATTEMPT", spec.attempt.to_string())
        .env("DISTRIBUTOR_REQUEST_ID", spec.request_id.as_str())
        .env("DISTRIBUTOR_STATE_DIR", dir);
    cmd.envs(&p.env);
    if let Some(cwd) = &p.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(match &p.stdin {
        Some(_) => Stdio::from(File::open(dir.join(STDIN))?),
        None => Stdio::null(),
    });
    let log = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(name))
    };
    cmd.stdout(log(STDOUT)?);
    cmd.stderr(log(STDERR)?);
    Ok(cmd)
}

fn missing(token: &Token, why: &str) -> Status {
    Status::Finished(Outcome::abnormal(
        AbnormalKind::Missing,
        format!("execution `{token}` {why}"),
    ))
}

fn io_err(path: &Path, e: io::Error) -> Error {
    classify(format!("reading {}", path.display()), e)
}

/// A request id as a directory name: itself when plain, else `_` + hex.
fn token_for(rid: &RequestId) -> Result<Token> {
    let s = rid.as_str();
    if is_plain(s) {
        Ok(Token::new(s))
    } else if s.len() <= 100 {
        let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
        Ok(Token::new(format!("_{hex}")))
    } else {
        Err(Error::permanent(format!(
            "request id of {} bytes with characters other than [A-Za-z0-9._-]: at most 100 allowed",
            s.len()
        )))
    }
}

fn is_plain(s: &str) -> bool {
    (1..=200).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_token(s: &str) -> bool {
    is_plain(s)
        || s.strip_prefix('_').is_some_and(|h| {
            !h.is_empty()
                && h.len() <= 200
                && h.len() % 2 == 0
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_spec(dir: &Path) -> Result<Option<Spec>> {
    let Some(body) = read_opt(&dir.join(SPEC)).map_err(|e| io_err(dir, e))? else {
        return Ok(None);
    };
    serde_json::from_str(&body)
        .map(Some)
        .map_err(|e| Error::permanent(format!("corrupt {}: {e}", dir.join(SPEC).display())))
}

fn read_error(dir: &Path) -> Result<Option<StartError>> {
    let Some(body) = read_opt(&dir.join(ERROR)).map_err(|e| io_err(dir, e))? else {
        return Ok(None);
    };
    Ok(Some(serde_json::from_str(&body).unwrap_or(StartError {
        kind: AbnormalKind::Crashed,
        message: body,
    })))
}

/// The `pid` record: the work's pid (= its process group) and, when recorded, its supervisor's.
fn read_pids(dir: &Path) -> (Option<i32>, Option<i32>) {
    read_numbers(dir, PID)
}

/// The first pid recorded in file `name` (a `pid` record, or an old-layout `supervisor` file).
fn read_pid(dir: &Path, name: &str) -> Option<i32> {
    read_numbers(dir, name).0
}

/// The first two pids (numbers above 1) in file `name`.
fn read_numbers(dir: &Path, name: &str) -> (Option<i32>, Option<i32>) {
    let Some(body) = read_opt(&dir.join(name)).ok().flatten() else {
        return (None, None);
    };
    let mut it = body
        .split_whitespace()
        .map(|w| w.parse::<i32>().ok().filter(|p| *p > 1));
    (it.next().flatten(), it.next().flatten())
}

/// The `claim` record, if there is a readable one.
fn read_claim(dir: &Path) -> io::Result<Option<Claim>> {
    Ok(read_opt(&dir.join(CLAIM))?.and_then(|s| Claim::parse(&s)))
}

fn read_stop(dir: &Path) -> Option<Stop> {
    read_opt(&dir.join(STOP))
        .ok()
        .flatten()
        .and_then(|s| Stop::parse(&s))
}

fn read_snapshot(dir: &Path) -> Result<Option<Snapshot>> {
    let Some(spec) = read_spec(dir)? else {
        return Ok(None);
    };
    let error = read_error(dir)?;
    let claim = read_claim(dir).map_err(|e| io_err(dir, e))?;
    let (pid, supervisor) = read_pids(dir);
    let started_at = pid.and_then(|_| {
        fs::metadata(dir.join(PID))
            .and_then(|m| m.modified())
            .ok()
            .map(Timestamp::from)
    });
    let supervisor = match (pid, supervisor) {
        (Some(_), None) => read_pid(dir, OLD_SUPERVISOR),
        _ => supervisor,
    };
    let exit = read_opt(&dir.join(EXIT))
        .map_err(|e| io_err(dir, e))?
        .map(|s| ExitRecord::parse(&s));
    let stop = read_stop(dir);
    Ok(Some(Snapshot {
        spec,
        error,
        claim,
        pid,
        started_at,
        supervisor,
        exit,
        stop,
    }))
}

/// The snapshot of work this instance started (its spec and pids are known: no `error.json`, the
/// claim is ours) once its `exit` record exists (`reported`: as the supervisor reported it after
/// writing it): one or two reads instead of the whole directory. `None` while it runs (the full
/// snapshot then says when its time limit falls due).
fn ended_snapshot(
    dir: &Path,
    spec: &Spec,
    pid: i32,
    supervisor: Option<i32>,
    reported: Option<ExitRecord>,
) -> Option<Snapshot> {
    let exit = match reported {
        Some(record) => Some(record),
        None => ExitRecord::parse(&read_opt(&dir.join(EXIT)).ok().flatten()?),
    };
    Some(Snapshot {
        spec: spec.clone(),
        error: None,
        claim: None,
        pid: Some(pid),
        started_at: None,
        supervisor,
        exit: Some(exit),
        stop: read_stop(dir),
    })
}

/// Takes `claim` for the execution in `dir` if nobody holds one; else returns the holder's.
fn claim(dir: &Path, claim: &Claim) -> io::Result<Option<Claim>> {
    match link_new(dir, CLAIM, claim.encode().as_bytes())? {
        true => Ok(None),
        false => Ok(read_claim(dir)?.or(Some(Claim::Cancelled))),
    }
}

/// Records that the adapter is stopping the work (first stop wins) and returns the one in force.
fn write_stop(dir: &Path, reason: StopReason) -> io::Result<Stop> {
    let stop = Stop {
        reason,
        at: Timestamp::now(),
    };
    if link_new(dir, STOP, stop.encode().as_bytes())? {
        return Ok(stop);
    }
    Ok(read_stop(dir).unwrap_or(stop))
}

/// Creates `dir/name` with `data` atomically, only if it does not exist. True if created.
fn link_new(dir: &Path, name: &str, data: &[u8]) -> io::Result<bool> {
    let tmp = dir.join(format!(
        ".{name}.{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    write_new(&tmp, data)?;
    let r = fs::hard_link(&tmp, dir.join(name));
    let _ = fs::remove_file(&tmp);
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Replaces `dir/name` with `data` atomically.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(
        ".{name}.{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    write_new(&tmp, data)?;
    fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// Whether the orchestrator process `pid` (a claim's owner) is alive; this process always is.
fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || i32::try_from(pid).is_ok_and(process_alive)
}

/// The last `n` lines of a log file (at most the last 64 KiB are read), lossily decoded.
fn tail(path: &Path, n: usize) -> Vec<String> {
    if n == 0 {
        return Vec::new();
    }
    // One `stat` for the common empty log, instead of open + fstat + read + close.
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Vec::new();
    }
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(TAIL_BYTES).read_to_end(&mut buf).is_err()
    {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    lines[skip..]
        .iter()
        .map(|l| truncate(l, 1000).to_owned())
        .collect()
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Waits until a watcher has something to look at: its waiter fires (an exit may be recorded),
/// its wake-up is notified (a report or a cancel), or `deadline` (a time limit, a kill) passes.
async fn next_change(waiter: &mut Waiter, wake: &Notify, deadline: Option<tokio::time::Instant>) {
    tokio::select! {
        () = waiter.wait() => {}
        () = wake.notified() => {}
        () = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        } => {}
    }
}

fn instant_of(t: Timestamp) -> tokio::time::Instant {
    tokio::time::Instant::now() + Timestamp::now().until(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_request_ids_are_their_own_token() {
        let t = token_for(&RequestId::new("0f8a-uuid_like.1")).unwrap();
        assert_eq!(t.as_str(), "0f8a-uuid_like.1");
        assert!(valid_token(t.as_str()));
    }

    #[test]
    fn other_request_ids_are_hex_encoded_and_cannot_escape() {
        let t = token_for(&RequestId::new("../etc")).unwrap();
        assert_eq!(t.as_str(), "_2e2e2f657463");
        assert!(valid_token(t.as_str()));
        for bad in ["../x", "", ".hidden", "a/b", "_zz", "_1", "-x"] {
            assert!(!valid_token(bad), "{bad}");
        }
        assert!(token_for(&RequestId::new("/".repeat(101))).is_err());
    }

    #[test]
    fn records_round_trip() {
        for c in [Claim::Start(42), Claim::Cancelled] {
            assert_eq!(Claim::parse(&c.encode()), Some(c));
        }
        let s = Stop {
            reason: StopReason::TimeLimit,
            at: Timestamp(7),
        };
        assert_eq!(Stop::parse(&s.encode()), Some(s));
        assert_eq!(ExitRecord::parse("exited 3\n"), Some(ExitRecord::Exited(3)));
        assert_eq!(
            ExitRecord::parse("signaled 9\n"),
            Some(ExitRecord::Signaled(9))
        );
        assert_eq!(ExitRecord::parse("garbage"), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), ["b", "c"]);
        assert_eq!(tail(&p, 10), ["a", "b", "c"]);
        assert!(tail(&d.path().join("none"), 3).is_empty());
    }
}
