//! One trial's view of the adapter under test: an instance built on the trial's runtime, the
//! pushes it sends, and patient helpers (retry transient errors, poll until a deadline).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use super::Shared;
use super::endpoint::{Endpoint, Received};
use crate::distributor::Distributor;
use crate::error::Result as CoreResult;
use crate::registry::{BuildContext, DeferredQueue, Instance, Notifier};
use crate::state::InstanceState;
use crate::types::{
    AdapterHandle, Attempt, AuthToken, Capabilities, DeferredWork, DistributorName, Execution,
    ExecutionId, Notification, NotificationRoute, Outcome, RequestId, Status, TaskDescription,
    TaskId, Timestamp, Token,
};

/// What a case returns: `Err` is the failure message.
pub(super) type CaseResult = Result<(), String>;

type Pushes = UnboundedReceiver<(ExecutionId, Notification)>;

/// How a push reached the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// Through the build context's [`Notifier`] (in-process).
    Notifier,
    /// POSTed to the HTTP notification target.
    Http,
}

/// What [`Harness::next_push`] saw.
#[derive(Debug)]
pub(super) enum PushEvent {
    /// A push about `ExecutionId`.
    Push(Via, ExecutionId, Notification),
    /// The HTTP endpoint refused a request (described).
    Refused(String),
    /// The deadline passed.
    TimedOut,
    /// Nothing can arrive any more: the adapter dropped its notifier and no HTTP endpoint runs.
    Closed,
}

/// How far along a status is: it MUST never decrease for one execution.
fn rank(s: &Status) -> u8 {
    match s {
        Status::Pending => 0,
        Status::Running => 1,
        Status::Finished(_) => 2,
    }
}

fn phase(s: &Status) -> &'static str {
    match s {
        Status::Pending => "Pending",
        Status::Running => "Running",
        Status::Finished(_) => "Finished",
    }
}

/// The adapter under test, as one trial sees it.
pub(super) struct Harness {
    pub(super) shared: Arc<Shared>,
    /// `None` only between dropping the old instance and building the new one in `restart`.
    instance: Mutex<Option<Instance>>,
    pushes: tokio::sync::Mutex<Pushes>,
    /// Whether the notifier channel of the current instance was seen closed.
    notifier_closed: Mutex<bool>,
    /// The HTTP notification endpoint, when the suite hands one out.
    endpoint: Option<Endpoint>,
    http: tokio::sync::Mutex<UnboundedReceiver<Received>>,
    /// The furthest status seen per execution (from `status`, `status_batch`, `recover`).
    furthest: Mutex<HashMap<ExecutionId, Status>>,
    /// The instance's durable state, kept across [`restart`](Self::restart) as an engine's store
    /// would keep it.
    state: InstanceState,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Execution ids unique within the process and unlikely to repeat across runs (adapters should
/// dedupe on request ids, which are random, but some embed the execution id in job names).
fn next_execution_id() -> ExecutionId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = u64::try_from(Timestamp::now().0).unwrap_or(0) % 1_000_000_000 * 1_000;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    ExecutionId(base + n)
}

impl Harness {
    /// Builds an instance of the kind under test on the current runtime.
    pub(super) async fn build(shared: Arc<Shared>) -> Result<Self, String> {
        let state = InstanceState::in_memory("conformance");
        let (http_tx, http_rx) = mpsc::unbounded_channel();
        let endpoint = if shared.http_notifications {
            Some(Endpoint::start(http_tx).await?)
        } else {
            None
        };
        let (instance, pushes) = Self::build_instance(&shared, &state).await?;
        Ok(Self {
            shared,
            instance: Mutex::new(Some(instance)),
            pushes: tokio::sync::Mutex::new(pushes),
            notifier_closed: Mutex::new(false),
            endpoint,
            http: tokio::sync::Mutex::new(http_rx),
            furthest: Mutex::new(HashMap::new()),
            state,
        })
    }

    async fn build_instance(
        shared: &Shared,
        state: &InstanceState,
    ) -> Result<(Instance, Pushes), String> {
        let name = DistributorName::new("conformance");
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (deferred_tx, deferred_rx) = mpsc::unbounded_channel();
        let ctx = BuildContext {
            name: name.clone(),
            deferred: DeferredQueue::new(name, deferred_tx),
            notifier: Notifier::new(push_tx.clone()),
            state: state.clone(),
            registry: shared.registry.clone(),
        };
        let kind = shared
            .kind
            .as_ref()
            .ok_or("the kind under test is not registered")?;
        let built = tokio::time::timeout(
            shared.timeout,
            kind.build(shared.config.clone(), ctx, shared.hash.clone()),
        )
        .await
        .map_err(|_| format!("building the instance took over {:?}", shared.timeout))?
        .map_err(|e| format!("building the instance failed: {e}"))?;
        // The snapshot every execution stores MUST read back as the same config (the engine
        // rebuilds instances from it); a config type whose Serialize and Deserialize disagree
        // would lose in-flight work after a config change.
        match kind.snapshot(built.config()) {
            Ok(again) if &again == built.config() => {}
            Ok(again) => {
                return Err(format!(
                    "the config snapshot does not read back as itself: {} became {again}",
                    built.config()
                ));
            }
            Err(e) => return Err(format!("the config snapshot does not read back: {e}")),
        }
        tokio::spawn(drive_deferred(
            Arc::downgrade(built.distributor()),
            deferred_rx,
            push_tx,
        ));
        Ok((built, push_rx))
    }

    /// Replaces the instance by a freshly built one, as an orchestrator restart would: the old
    /// instance is dropped first (so one that binds a fixed address can be rebuilt), then the
    /// new one is built; pushes from now on come from the new one.
    pub(super) async fn restart(&self) -> CaseResult {
        let old = lock(&self.instance).take();
        drop(old);
        tokio::task::yield_now().await;
        let (instance, pushes) = Self::build_instance(&self.shared, &self.state)
            .await
            .map_err(|e| format!("after a restart: {e}"))?;
        *lock(&self.instance) = Some(instance);
        *self.pushes.lock().await = pushes;
        *lock(&self.notifier_closed) = false;
        Ok(())
    }

    /// The instance.
    pub(super) fn instance(&self) -> Result<Instance, String> {
        lock(&self.instance)
            .clone()
            .ok_or_else(|| "no instance: rebuilding it failed".to_owned())
    }

    /// The adapter.
    pub(super) fn d(&self) -> Result<Arc<dyn Distributor>, String> {
        self.instance().map(|i| Arc::clone(i.distributor()))
    }

    /// Its capabilities.
    pub(super) fn caps(&self) -> Result<Capabilities, String> {
        self.d().map(|d| d.capabilities())
    }

    /// The per-case deadline for reaching a state.
    pub(super) fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// A fresh task (new ids, random request id and auth token) with `payload`.
    pub(super) fn task(&self, payload: &Value) -> TaskDescription {
        let id = next_execution_id();
        TaskDescription {
            execution_id: id,
            task_id: TaskId(id.0),
            attempt: Attempt(1),
            request_id: RequestId::random(),
            redispatch: false,
            distributor: DistributorName::new("conformance"),
            payload: payload.clone(),
            previous: None,
            notify: NotificationRoute {
                target: self.notify_target().map(str::to_owned),
                auth_token: AuthToken(format!("conformance-{}", uuid::Uuid::new_v4())),
            },
            timeouts: Default::default(),
            labels: [("conformance".to_owned(), "true".to_owned())].into(),
        }
    }

    /// Executions naming tokens this backend never issued: a made-up string and a made-up
    /// number (for backends whose ids are numeric).
    pub(super) fn unknown_executions(&self) -> Vec<Execution> {
        let never = format!("conformance-never-issued-{}", uuid::Uuid::new_v4().simple());
        [never, "2147483646".to_owned()]
            .into_iter()
            .map(|token| {
                let t = self.task(&self.shared.payloads.succeeds);
                Execution {
                    id: t.execution_id,
                    task_id: t.task_id,
                    attempt: t.attempt,
                    request_id: t.request_id,
                    payload: t.payload,
                    token: Token::new(token),
                    handle: AdapterHandle::default(),
                }
            })
            .collect()
    }

    /// Calls the adapter: a panic or a call that outlives the deadline is a failure.
    pub(super) async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = T> + Send,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout(), AssertUnwindSafe(fut).catch_unwind()).await {
            Err(_) => Err(format!("{what} did not return within {:?}", self.timeout())),
            Ok(Err(panic)) => Err(format!("{what} panicked: {}", panic_message(&*panic))),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Calls `f` until it succeeds or fails permanently, retrying transient errors (as the
    /// engine does) until the deadline.
    pub(super) async fn patiently<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = CoreResult<T>> + Send,
    {
        let deadline = Instant::now() + self.timeout();
        loop {
            match self.call(what, f()).await? {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(self.shared.poll_interval).await;
                }
                Err(e) if e.is_transient() => {
                    return Err(format!(
                        "{what} still failed transiently after {:?}: {e}",
                        self.timeout()
                    ));
                }
                Err(e) => return Err(format!("{what} failed permanently: {e}")),
            }
        }
    }

    /// `run`s `task` (retrying transient errors) and returns its execution.
    pub(super) async fn run(&self, task: &TaskDescription) -> Result<Execution, String> {
        let d = self.d()?;
        let launch = self.patiently("run", || d.run(task)).await?;
        Ok(execution_of(task, launch.token, launch.handle))
    }

    /// Starts a task with `payload`.
    pub(super) async fn start(&self, payload: &Value) -> Result<Execution, String> {
        self.run(&self.task(payload)).await
    }

    /// The URL of the HTTP notification endpoint handed to tasks, if the suite serves one.
    pub(super) fn notify_target(&self) -> Option<&str> {
        self.endpoint.as_ref().map(Endpoint::url)
    }

    /// Records `s` as seen for `e` by `what`; fails if it is behind a status seen before
    /// (Running after Finished, Pending after Running): the engine's states only move forward.
    pub(super) fn observe(&self, e: &Execution, what: &str, s: &Status) -> CaseResult {
        let mut furthest = lock(&self.furthest);
        match furthest.get(&e.id) {
            Some(before) if rank(s) < rank(before) => Err(format!(
                "{what} of {} (token {}) went backwards: {} after {before:?}; a status MUST \
                 never move back (Pending → Running → Finished)",
                e.id,
                e.token,
                phase(s)
            )),
            Some(before) if rank(s) == rank(before) => Ok(()),
            _ => {
                furthest.insert(e.id, s.clone());
                Ok(())
            }
        }
    }

    /// `status` once (retrying transient errors).
    pub(super) async fn status(&self, e: &Execution) -> Result<Status, String> {
        let d = self.d()?;
        let s = self.patiently("status", || d.status(e)).await?;
        self.observe(e, "status", &s)?;
        Ok(s)
    }

    /// `cancel` (retrying transient errors): `Ok(())` or the failure.
    pub(super) async fn cancel(&self, e: &Execution) -> CaseResult {
        let d = self.d()?;
        self.patiently("cancel", || d.cancel(e)).await
    }

    /// Polls `status` until `done` accepts it; fails at the deadline naming `what` and the last
    /// status seen.
    pub(super) async fn wait_for(
        &self,
        e: &Execution,
        what: &str,
        done: impl Fn(&Status) -> bool,
    ) -> Result<Status, String> {
        let deadline = Instant::now() + self.timeout();
        let d = self.d()?;
        loop {
            let last = match self.call("status", d.status(e)).await? {
                Ok(s) => {
                    self.observe(e, "status", &s)?;
                    if done(&s) {
                        return Ok(s);
                    }
                    format!("{s:?}")
                }
                Err(err) if err.is_transient() => format!("transient error: {err}"),
                Err(err) => return Err(format!("status failed permanently: {err}")),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} (token {}) did not become {what} within {:?}; last status: {last}",
                    e.id,
                    e.token,
                    self.timeout()
                ));
            }
            tokio::time::sleep(self.shared.poll_interval).await;
        }
    }

    /// Polls until the work finishes and returns its outcome.
    pub(super) async fn wait_finished(&self, e: &Execution) -> Result<Outcome, String> {
        match self
            .wait_for(e, "Finished", |s| matches!(s, Status::Finished(_)))
            .await?
        {
            Status::Finished(o) => Ok(o),
            other => Err(format!("expected Finished, got {other:?}")),
        }
    }

    /// The next push through either path (the notifier, the HTTP endpoint), or a refused
    /// HTTP request, within what is left of `deadline`.
    pub(super) async fn next_push(&self, deadline: Instant) -> PushEvent {
        let mut rx = self.pushes.lock().await;
        let mut http = self.http.lock().await;
        loop {
            let notifier_open = !*lock(&self.notifier_closed);
            if !notifier_open && self.endpoint.is_none() {
                return PushEvent::Closed;
            }
            let got = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    n = rx.recv(), if notifier_open => Some(n.map(|(id, n)| PushEvent::Push(Via::Notifier, id, n))),
                    r = http.recv() => match r {
                        Some(Received::Push(id, n)) => Some(Some(PushEvent::Push(Via::Http, id, n))),
                        Some(Received::Refused(why)) => Some(Some(PushEvent::Refused(why))),
                        None => None,
                    },
                }
            })
            .await;
            match got {
                Err(_) => return PushEvent::TimedOut,
                Ok(Some(Some(event))) => return event,
                // The notifier channel closed: every sender (the build context's notifier and
                // the deferred driver) is gone. Keep waiting for HTTP pushes, if any can come.
                Ok(Some(None)) => *lock(&self.notifier_closed) = true,
                Ok(None) => return PushEvent::Closed,
            }
        }
    }

    /// Whether the adapter dropped every [`Notifier`] of the current instance (seen by
    /// [`next_push`](Self::next_push)).
    pub(super) fn notifier_dropped(&self) -> bool {
        *lock(&self.notifier_closed)
    }

    /// Best-effort stop of long work a case started, so that it does not outlive the suite.
    pub(super) async fn clean_up(&self, e: &Execution) {
        if let Ok(d) = self.d()
            && d.capabilities().cancel
        {
            let _ = self.call("cancel", d.cancel(e)).await;
        }
    }
}

/// The execution record the engine would keep for `task` after `run` returned.
pub(super) fn execution_of(
    task: &TaskDescription,
    token: Token,
    handle: AdapterHandle,
) -> Execution {
    Execution {
        id: task.execution_id,
        task_id: task.task_id,
        attempt: task.attempt,
        request_id: task.request_id.clone(),
        payload: task.payload.clone(),
        token,
        handle,
    }
}

/// The text of a panic payload.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// Plays the engine's durable timer queue for the trial: runs each deferred work item when due
/// and feeds the notifications it returns into the push channel. Holds the adapter weakly, so
/// that dropping the instance (restart) really drops it.
async fn drive_deferred(
    d: Weak<dyn Distributor>,
    mut rx: UnboundedReceiver<(DistributorName, DeferredWork)>,
    pushes: UnboundedSender<(ExecutionId, Notification)>,
) {
    while let Some((_, work)) = rx.recv().await {
        let d = d.clone();
        let pushes = pushes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Timestamp::now().until(work.due)).await;
            let Some(d) = d.upgrade() else {
                return;
            };
            if let Ok(notifications) = d.handle_deferred(&work).await {
                for n in notifications {
                    let _ = pushes.send((work.execution_id, n));
                }
            }
        });
    }
}
