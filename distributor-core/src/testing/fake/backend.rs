//! The fake's backend: process-global, shared by every instance naming it, recording every call.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until};

use super::config::{FakeScript, PushMode};
use crate::error::{Error, Result};
use crate::registry::Notifier;
use crate::types::{AbnormalKind, ExecutionId, Outcome, RequestId, Status, TaskDescription, Token};
use crate::types::{Launch, Notification};

/// One call the engine (or a test) made into a fake instance, in call order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// `run`, whatever it returned.
    Run {
        /// The request id it carried.
        request_id: RequestId,
        /// The execution it was for.
        execution_id: ExecutionId,
    },
    /// `cancel`.
    Cancel {
        /// The token it named.
        token: Token,
    },
    /// `status`.
    Status {
        /// The token it named.
        token: Token,
    },
    /// `status_batch`, with every token in input order.
    StatusBatch {
        /// The tokens it named.
        tokens: Vec<Token>,
    },
    /// `recover`.
    Recover {
        /// The token it named.
        token: Token,
    },
    /// `handle_notification`.
    Notification {
        /// The token of the execution it was routed to.
        token: Token,
    },
}

/// The state behind every `fake` instance naming one backend: the pieces of work, the calls
/// made, and the knobs a test turns.
///
/// Backends live in a process-global map, so they survive dropping and rebuilding an engine in
/// the same process (crash-recovery tests). Cloning gives another handle to the same backend.
///
/// Work is modelled by timestamps on tokio's clock (`started_at + pending_for`,
/// `+ run_for`): `status` computes the state from the clock, so under `tokio::time::pause`
/// everything is deterministic.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    name: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    works: HashMap<Token, Work>,
    run_attempts: HashMap<RequestId, u32>,
    starts: HashMap<RequestId, usize>,
    calls: Vec<Call>,
    pushes: Vec<(ExecutionId, Notification)>,
    fail_runs: u32,
    fail_statuses: u32,
    fail_cancels: u32,
}

#[derive(Debug)]
struct Work {
    execution_id: ExecutionId,
    auth_token: String,
    script: FakeScript,
    running_at: Instant,
    /// When the script ends the work by itself (`None`: `hang`).
    scripted_end: Option<Instant>,
    /// An end imposed by cancel or by hand, before the scripted one.
    stop: Option<End>,
    cancel_attempts: u32,
    forgotten: bool,
    pusher: Option<AbortHandle>,
    changed: watch::Sender<()>,
}

/// How and when a piece of work ended.
#[derive(Debug, Clone)]
struct End {
    at: Instant,
    outcome: Outcome,
    /// Whether the work pushes a Finished update (a crashed one does not).
    reported: bool,
}

impl Work {
    fn end(&self) -> Option<End> {
        if let Some(stop) = &self.stop {
            return Some(stop.clone());
        }
        let at = self.scripted_end?;
        Some(if self.script.crash {
            End {
                at,
                outcome: Outcome::abnormal(AbnormalKind::Crashed, "the fake work crashed"),
                reported: false,
            }
        } else {
            End {
                at,
                outcome: self.script.outcome.clone().into(),
                reported: true,
            }
        })
    }

    fn finished_at(&self, now: Instant) -> Option<End> {
        self.end().filter(|e| now >= e.at)
    }

    fn status(&self, now: Instant) -> Status {
        let forgotten = self.forgotten;
        match self.finished_at(now) {
            _ if forgotten => missing("the fake backend forgot this work"),
            Some(_) if self.script.forget => missing("the fake backend forgot this work"),
            Some(end) => Status::Finished(end.outcome),
            None if now >= self.running_at => Status::Running,
            None => Status::Pending,
        }
    }

    /// Ends the work now unless it has already ended. Returns whether it did.
    fn stop(&mut self, outcome: Outcome, reported: bool) -> bool {
        let now = Instant::now();
        if self.finished_at(now).is_some() {
            return false;
        }
        self.stop = Some(End {
            at: now,
            outcome,
            reported,
        });
        self.changed.send_replace(());
        true
    }
}

fn missing(reason: &str) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

fn registry() -> &'static Mutex<HashMap<String, FakeBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<String, FakeBackend>>> = OnceLock::new();
    BACKENDS.get_or_init(Mutex::default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeBackend {
    /// The backend named `name`, created empty on first use. Every handle to one name shares
    /// one state for the life of the process.
    pub fn named(name: &str) -> Self {
        lock(registry())
            .entry(name.to_owned())
            .or_insert_with(|| Self {
                name: Arc::from(name),
                inner: Arc::default(),
            })
            .clone()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token the fake issues for `request_id`. Deterministic, so `run` is idempotent.
    pub fn token_for(request_id: &RequestId) -> Token {
        Token::new(format!("fake-{request_id}"))
    }

    /// Every call made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.inner).calls.clone()
    }

    /// How many pieces of work were really started for `request_id` (the idempotency check:
    /// it MUST stay at most 1).
    pub fn starts(&self, request_id: &RequestId) -> usize {
        lock(&self.inner)
            .starts
            .get(request_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every push sent so far (including those no engine was listening for), in send order.
    pub fn pushes(&self) -> Vec<(ExecutionId, Notification)> {
        lock(&self.inner).pushes.clone()
    }

    /// The status of `token` now, as `status` would report it, without recording a call or
    /// consuming an injected failure. `None` if the backend never issued the token.
    pub fn status_of(&self, token: &Token) -> Option<Status> {
        let now = Instant::now();
        lock(&self.inner).works.get(token).map(|w| w.status(now))
    }

    /// Ends the work of `token` now with `outcome` (its Finished update is pushed as scripted).
    /// Returns false if the token is unknown or the work had already ended.
    pub fn finish(&self, token: &Token, outcome: Outcome) -> bool {
        lock(&self.inner)
            .works
            .get_mut(token)
            .is_some_and(|w| w.stop(outcome, true))
    }

    /// Kills the work of `token` now: it ends `Crashed` and pushes nothing more. Returns false
    /// if the token is unknown or the work had already ended.
    pub fn crash(&self, token: &Token) -> bool {
        lock(&self.inner).works.get_mut(token).is_some_and(|w| {
            w.stop(
                Outcome::abnormal(AbnormalKind::Crashed, "the fake work was killed"),
                false,
            )
        })
    }

    /// Makes the backend forget `token`: from now on `status` reports it `Missing`. `run` with
    /// its request id still starts nothing. Returns false if the token is unknown.
    pub fn forget(&self, token: &Token) -> bool {
        lock(&self.inner).works.get_mut(token).is_some_and(|w| {
            w.forgotten = true;
            w.changed.send_replace(());
            true
        })
    }

    /// The next `n` `run` calls (any request id, before any scripted error) fail transiently.
    pub fn fail_next_runs(&self, n: u32) {
        lock(&self.inner).fail_runs = n;
    }

    /// The next `n` status answers (`status`, `recover` and each entry of `status_batch`) fail
    /// transiently.
    pub fn fail_next_statuses(&self, n: u32) {
        lock(&self.inner).fail_statuses = n;
    }

    /// The next `n` `cancel` calls (any token) fail transiently.
    pub fn fail_next_cancels(&self, n: u32) {
        lock(&self.inner).fail_cancels = n;
    }

    /// Forgets everything: work (its pushes stop), calls, counters and knobs.
    pub fn reset(&self) {
        let mut inner = lock(&self.inner);
        for w in inner.works.values() {
            if let Some(p) = &w.pusher {
                p.abort();
            }
        }
        *inner = Inner::default();
    }

    pub(super) fn record(&self, call: Call) {
        lock(&self.inner).calls.push(call);
    }

    /// `run`: dedupe on the request id, then injected errors, then start the work.
    pub(super) fn run(
        &self,
        task: &TaskDescription,
        script: FakeScript,
        pusher: Option<Notifier>,
        poll_interval: Option<Duration>,
    ) -> Result<Launch> {
        let token = Self::token_for(&task.request_id);
        let mut launch = Launch::new(token.clone());
        launch.poll_interval = poll_interval;
        let mut inner = lock(&self.inner);
        inner.calls.push(Call::Run {
            request_id: task.request_id.clone(),
            execution_id: task.execution_id,
        });
        if inner.works.contains_key(&token) {
            return Ok(launch);
        }
        if inner.fail_runs > 0 {
            inner.fail_runs -= 1;
            return Err(Error::transient("fake: injected transient run error"));
        }
        let attempts = inner
            .run_attempts
            .entry(task.request_id.clone())
            .or_insert(0);
        *attempts += 1;
        if *attempts <= script.transient_run_errors {
            return Err(Error::transient(format!(
                "fake: scripted transient run error {} of {}",
                attempts, script.transient_run_errors
            )));
        }
        if let Some(message) = &script.permanent_run_error {
            return Err(Error::permanent(message.clone()));
        }
        let started_at = Instant::now();
        let running_at = started_at + Duration::from_millis(script.pending_for_ms);
        let scripted_end =
            (!script.hang).then(|| running_at + Duration::from_millis(script.run_for_ms));
        let push = pusher.filter(|_| !script.poll_only && script.pushes != PushMode::Drop);
        inner.works.insert(
            token.clone(),
            Work {
                execution_id: task.execution_id,
                auth_token: task.notify.auth_token.0.clone(),
                script,
                running_at,
                scripted_end,
                stop: None,
                cancel_attempts: 0,
                forgotten: false,
                pusher: None,
                changed: watch::channel(()).0,
            },
        );
        *inner.starts.entry(task.request_id.clone()).or_insert(0) += 1;
        drop(inner);
        if let Some(notifier) = push {
            self.spawn_pusher(&token, notifier);
        }
        Ok(launch)
    }

    /// `cancel`: idempotent; unknown or finished work is `Ok`.
    pub(super) fn cancel(&self, token: &Token) -> Result<()> {
        let mut inner = lock(&self.inner);
        inner.calls.push(Call::Cancel {
            token: token.clone(),
        });
        if inner.fail_cancels > 0 {
            inner.fail_cancels -= 1;
            return Err(Error::transient("fake: injected transient cancel error"));
        }
        let Some(work) = inner.works.get_mut(token) else {
            return Ok(());
        };
        if work.cancel_attempts < work.script.cancel_transient_errors {
            work.cancel_attempts += 1;
            return Err(Error::transient(format!(
                "fake: scripted transient cancel error {} of {}",
                work.cancel_attempts, work.script.cancel_transient_errors
            )));
        }
        if !work.script.ignore_cancel {
            work.stop(
                Outcome::abnormal(AbnormalKind::Cancelled, "cancelled by request"),
                true,
            );
        }
        Ok(())
    }

    /// One status answer, consuming an injected failure if any. Does not record a call.
    pub(super) fn answer(&self, token: &Token) -> Result<Status> {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        if inner.fail_statuses > 0 {
            inner.fail_statuses -= 1;
            return Err(Error::transient("fake: injected transient status error"));
        }
        Ok(match inner.works.get(token) {
            Some(w) => w.status(now),
            None => missing("the fake backend never issued this token"),
        })
    }

    /// Re-attaches the pusher of unfinished work to `notifier` (the instance of a rebuilt
    /// engine), replacing the old one.
    pub(super) fn reattach(&self, token: &Token, notifier: Notifier) {
        let now = Instant::now();
        let wanted = lock(&self.inner).works.get(token).is_some_and(|w| {
            w.finished_at(now).is_none() && !w.script.poll_only && w.script.pushes != PushMode::Drop
        });
        if wanted {
            self.spawn_pusher(token, notifier);
        }
    }

    fn spawn_pusher(&self, token: &Token, notifier: Notifier) {
        let handle = tokio::spawn(push_loop(self.clone(), token.clone(), notifier)).abort_handle();
        let mut inner = lock(&self.inner);
        match inner.works.get_mut(token) {
            Some(w) => {
                if let Some(old) = w.pusher.replace(handle) {
                    old.abort();
                }
            }
            None => handle.abort(),
        }
    }

    fn snapshot(&self, token: &Token) -> Option<Snapshot> {
        let inner = lock(&self.inner);
        let w = inner.works.get(token)?;
        Some(Snapshot {
            execution_id: w.execution_id,
            auth_token: w.auth_token.clone(),
            mode: w.script.pushes,
            delay: Duration::from_millis(w.script.push_delay_ms),
            running_at: w.running_at,
            end: w.end(),
            changed: w.changed.subscribe(),
        })
    }

    fn send(&self, notifier: &Notifier, snap: &Snapshot, token: &Token, status: &Status, seq: u64) {
        let copies = if snap.mode == PushMode::Duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let n = Notification {
                data: serde_json::to_vec(status).unwrap_or_default(),
                attributes: BTreeMap::from([
                    ("auth_token".to_owned(), snap.auth_token.clone()),
                    ("token".to_owned(), token.to_string()),
                ]),
                message_id: Some(format!("{token}/{seq}")),
                sequence: Some(seq),
            };
            lock(&self.inner)
                .pushes
                .push((snap.execution_id, n.clone()));
            notifier.send(snap.execution_id, n);
        }
    }
}

struct Snapshot {
    execution_id: ExecutionId,
    auth_token: String,
    mode: PushMode,
    delay: Duration,
    running_at: Instant,
    end: Option<End>,
    changed: watch::Receiver<()>,
}

/// Sleeps until `at`, or not at all when it has passed (no timer registered, no wake-up).
async fn sleep_until_due(at: Instant) {
    if Instant::now() < at {
        sleep_until(at).await;
    }
}

/// Sequence numbers of the two updates of one execution.
const RUNNING: u64 = 1;
const FINISHED: u64 = 2;

/// Pushes the Running and Finished updates of one piece of work as its script says, each
/// `push_delay_ms` after the change it reports. Wakes at the scripted instants and whenever the
/// work is changed by hand (cancel, finish, crash).
async fn push_loop(backend: FakeBackend, token: Token, notifier: Notifier) {
    let mut running_sent = false;
    loop {
        let Some(mut snap) = backend.snapshot(&token) else {
            return;
        };
        let now = Instant::now();
        if let Some(end) = snap.end.clone().filter(|e| now >= e.at) {
            let ran = snap.running_at < end.at;
            let send_running = ran && !running_sent;
            if snap.mode == PushMode::Reorder {
                if end.reported {
                    sleep_until_due(end.at + snap.delay).await;
                    backend.send(
                        &notifier,
                        &snap,
                        &token,
                        &Status::Finished(end.outcome),
                        FINISHED,
                    );
                }
                if send_running {
                    backend.send(&notifier, &snap, &token, &Status::Running, RUNNING);
                }
            } else {
                if send_running {
                    sleep_until_due(snap.running_at + snap.delay).await;
                    backend.send(&notifier, &snap, &token, &Status::Running, RUNNING);
                }
                if end.reported {
                    sleep_until_due(end.at + snap.delay).await;
                    backend.send(
                        &notifier,
                        &snap,
                        &token,
                        &Status::Finished(end.outcome),
                        FINISHED,
                    );
                }
            }
            return;
        }
        if now >= snap.running_at && !running_sent && snap.mode != PushMode::Reorder {
            sleep_until_due(snap.running_at + snap.delay).await;
            backend.send(&notifier, &snap, &token, &Status::Running, RUNNING);
            running_sent = true;
            continue;
        }
        let next = if now < snap.running_at {
            Some(snap.running_at)
        } else {
            snap.end.as_ref().map(|e| e.at)
        };
        tokio::select! {
            () = sleep_until(next.unwrap_or(now)), if next.is_some() => {}
            changed = snap.changed.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
