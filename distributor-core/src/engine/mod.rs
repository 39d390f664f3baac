//! The engine: drives executions from submit to a terminal state, durably.
//!
//! One actor task owns every live execution. It takes commands (submit, cancel, notify…) and
//! adapter results in batches, applies them to the records in memory as compare-and-set
//! transitions, commits the batch to the [`Store`] in one transaction, and only then acts: calls
//! adapters, answers callers, publishes [`Event`]s. Consequences:
//!
//! - **Intent log.** An execution and its request id are durable before `run` is called. A crash
//!   anywhere leaves either nothing (the submit was never acknowledged) or an intent that recovery
//!   re-dispatches with the same request id, which the adapter dedupes.
//! - **Durable timers.** Deadlines, poll times and retry times are fields of the stored record; the
//!   actor keeps one ordered set of wake-up times for all executions (no task per execution), and
//!   rebuilds it from the store on start.
//! - **No lost or regressed states.** Terminal states never change; pushes are authenticated,
//!   sequence-checked and de-duplicated; a status that would move backwards is ignored.
//!
//! How it stays fast (figures in BENCHMARKS.md):
//!
//! - **Group commit, pipelined.** A batch is written by a task of its own while the actor
//!   computes the next; at most one batch is in flight and batches commit in order. What waits
//!   for a batch still waits for its commit.
//! - **Adapter calls are polled once where they are made.** A call that completes without
//!   waiting (an in-process backend, a cached status) is handled in the actor's next turn with no
//!   task spawned; one that waits runs as a task of its own. Adapter futures therefore MUST NOT
//!   block the thread (the [`Distributor`](crate::Distributor) contract already says so): a
//!   blocking first poll would stall every execution.
//! - **Compact records.** Tasks and names are shared, payloads are compact JSON text
//!   ([`Payload`](crate::Payload)): about 1 KB of memory per live execution.

mod actor;
mod auth;
mod clock;
mod membership;
mod state;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::BroadcastStream;

pub use clock::Clock;
pub use state::{Actor, CancelCause, ExecutionRecord, HistoryEntry, RetryPolicy, State, Task};

use crate::config::DistributorsConfig;
use crate::error::{Error, NotificationRejection, Result, nearest};
use crate::registry::{DeferredQueue, Instance, Notifier, Registry};
use crate::state::InstanceState;
use crate::store::{ListFilter, MemoryStore, Store, Write};
use crate::types::{DistributorName, ExecutionId, Notification, Outcome, TaskId, Token};
use auth::Auth;

/// Tunables of the engine. The defaults follow DM where DM had a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Poll interval for adapters without push and without a hint.
    #[serde(with = "humantime_ms")]
    pub poll_interval: Duration,
    /// Poll interval for adapters with push: the hedge against lost pushes.
    #[serde(with = "humantime_ms")]
    pub hedge_poll_interval: Duration,
    /// How often to poll while waiting for cancelled work to stop.
    #[serde(with = "humantime_ms")]
    pub cancel_poll_interval: Duration,
    /// Stop timeout used when a task sets none.
    #[serde(with = "humantime_ms")]
    pub default_stop_timeout: Duration,
    /// Extra status polls after the stop deadline before giving up (DM: 3).
    pub stop_polls: u32,
    /// Interval between those polls (DM: 30 s).
    #[serde(with = "humantime_ms")]
    pub stop_poll_interval: Duration,
    /// First backoff after a transient adapter error.
    #[serde(with = "humantime_ms")]
    pub backoff_base: Duration,
    /// Largest backoff.
    #[serde(with = "humantime_ms")]
    pub backoff_max: Duration,
    /// Transient `run` errors in a row before the execution ends `Rejected`.
    pub max_transient_run_errors: u32,
    /// Lifetime of notification tokens.
    #[serde(with = "humantime_ms")]
    pub token_ttl: Duration,
    /// Most commands applied in one batch (one store transaction).
    pub max_batch: usize,
    /// Group commit: the longest the engine holds a small batch of changes (under 8 writes)
    /// that nobody awaits (adapter pushes and call results, timers; not a command's answer,
    /// not a change to an execution someone `wait`s for while at most 4 are awaited) before
    /// writing it, so that the changes of the next turns share its transaction instead of
    /// paying one each. It holds only while batches follow each other closely (the last one
    /// less than ten times this ago) and other executions are live; an awaited change or a
    /// full batch ends the hold at once. Nothing is held when the engine is idle or for a lone
    /// execution, and a client following a few executions one at a time is never delayed; one
    /// waiting for many at once (a batch run) sees each result at most this much later.
    /// Adapter calls that follow a held change (a status push's handling, the next dispatch)
    /// wait with it. Zero turns it off. The default, 5 ms, is invisible next to units of work
    /// that take seconds and saves about a third of the store's CPU under steady churn
    /// (BENCHMARKS.md, local adapter: 1, 2, 3 and 5 ms measured).
    #[serde(with = "humantime_ms")]
    pub commit_delay: Duration,
    /// Capacity of the event stream; slow subscribers see a lag error past it.
    pub event_capacity: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(5),
            hedge_poll_interval: Duration::from_secs(30),
            cancel_poll_interval: Duration::from_secs(1),
            default_stop_timeout: Duration::from_secs(60),
            stop_polls: 3,
            stop_poll_interval: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_transient_run_errors: 10,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            max_batch: 4096,
            commit_delay: Duration::from_millis(5),
            event_capacity: 65_536,
        }
    }
}

mod humantime_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Something that happened to an execution, published after it was committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A new execution was stored.
    Created {
        /// It.
        id: ExecutionId,
        /// Its task.
        task_id: TaskId,
        /// Its attempt.
        attempt: u32,
        /// Its distributor instance.
        distributor: DistributorName,
    },
    /// `run` returned a token.
    Dispatched {
        /// The execution.
        id: ExecutionId,
        /// The backend's token.
        token: Token,
    },
    /// The work was seen running.
    Started {
        /// The execution.
        id: ExecutionId,
    },
    /// A terminal state was recorded.
    Finished {
        /// The execution.
        id: ExecutionId,
        /// The terminal state.
        state: State,
        /// The outcome.
        outcome: Outcome,
    },
    /// A new attempt of the same task was created.
    Retried {
        /// The attempt that ended.
        id: ExecutionId,
        /// The new attempt.
        next: ExecutionId,
    },
    /// Cancellation was requested (by a caller or a deadline).
    CancelRequested {
        /// The execution.
        id: ExecutionId,
        /// Why.
        cause: CancelCause,
    },
    /// The distributors config was replaced.
    ConfigReloaded {
        /// The names now configured.
        names: Vec<DistributorName>,
    },
    /// A caller asked for an immediate status poll.
    Poked {
        /// The execution.
        id: ExecutionId,
    },
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// Commands to the actor.
pub(crate) enum Cmd {
    Submit(Vec<(Task, Instance)>, Reply<Vec<ExecutionId>>),
    SubmitKeyed(String, Task, Instance, Reply<(ExecutionId, bool)>),
    Cancel(ExecutionId, String, Reply<()>),
    Poke(ExecutionId, Reply<()>),
    Notify(ExecutionId, Notification, Reply<()>),
    Wait(ExecutionId, oneshot::Sender<Result<ExecutionRecord>>),
    Reload(Catalog, Reply<()>),
    Defer(DistributorName, crate::types::DeferredWork),
    Shards(actor::ShardChange, oneshot::Sender<()>),
    Inbox(ExecutionId, crate::store::Routed, Reply<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Longest idempotency key accepted by [`Engine::submit_idempotent`], in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The metadata key under which an idempotency key's execution id is stored.
pub(crate) fn idempotency_meta_key(key: &str) -> String {
    format!("idempotency/{key}")
}

/// The configured instances by name (aliases included, pointing at their target's instance).
pub(crate) type Catalog = BTreeMap<DistributorName, Instance>;

struct Shared {
    cmd: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<Event>,
    store: Arc<dyn Store>,
    registry: Registry,
    catalog: RwLock<Arc<Catalog>>,
    auth: Auth,
    clock: Clock,
    notifier: Notifier,
    deferred_tx: mpsc::UnboundedSender<(DistributorName, crate::types::DeferredWork)>,
    /// The membership task, on a shared store.
    membership: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    _alive: AliveGuard,
}

/// Stops the actor when the last `Engine` handle is dropped (without a graceful shutdown).
struct AliveGuard(#[allow(dead_code)] tokio::sync::watch::Sender<()>);

/// The engine an orchestrator embeds. Cheap to clone; all clones drive the same executions.
///
/// Dropping every clone stops the engine abruptly (like a crash: nothing committed is lost, and
/// a new engine on the same store recovers everything). [`Engine::shutdown`] stops it gracefully.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Builds an [`Engine`]. Defaults: an empty registry, no distributors, a [`MemoryStore`],
/// default [`Settings`], a secret generated once and kept in the store.
pub struct EngineBuilder {
    registry: Registry,
    config: DistributorsConfig,
    store: Option<Arc<dyn Store>>,
    settings: Settings,
    secret: Option<Vec<u8>>,
    clock: Option<Clock>,
    notify_target: Option<String>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder").finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// The registry of kinds.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }
    /// The distributor instances.
    pub fn distributors(mut self, config: DistributorsConfig) -> Self {
        self.config = config;
        self
    }
    /// The store (default: a [`MemoryStore`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }
    /// A shared store.
    pub fn store_arc(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }
    /// Tunables.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }
    /// The HMAC secret for notification tokens (default: generated once, kept in the store).
    pub fn secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.secret = Some(secret.into());
        self
    }
    /// The clock (tests share one across engine rebuilds).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }
    /// Where backends should push notifications (URL or subject), handed to adapters in
    /// [`NotificationRoute::target`](crate::NotificationRoute).
    pub fn notify_target(mut self, target: impl Into<String>) -> Self {
        self.notify_target = Some(target.into());
        self
    }

    /// Builds the instances, recovers every non-terminal execution in the store, and starts.
    ///
    /// Errors: a factory's error (config unusable, backend unreachable), or a store error.
    pub async fn build(self) -> Result<Engine> {
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        let secret = match self.secret {
            Some(s) => s,
            None => {
                // Made once; every instance sharing the store gets the first one stored.
                let fresh: [u8; 32] = rand::random();
                let stored = store
                    .meta_init("notify_secret", &hex::encode(fresh))
                    .await?;
                hex::decode(stored).map_err(|e| Error::Store {
                    message: format!("corrupt notify_secret: {e}"),
                    transient: false,
                    source: None,
                })?
            }
        };
        // On a shared store: join, taking the free or expired shards up to a fair share.
        let shared_store = store.shared();
        if let Some(sh) = &shared_store {
            sh.round().await?;
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (deferred_tx, deferred_rx) = mpsc::unbounded_channel();
        let clock = self.clock.unwrap_or_default();
        let auth = Auth::new(secret);
        // In-process pushes are authenticated on the pusher's thread and go straight to the
        // actor; the actor answers into a dropped channel (the pusher does not wait for the
        // commit). Refusals are logged here.
        let notifier = {
            let (auth, cmd) = (auth.clone(), cmd_tx.clone());
            Notifier::from_fn(move |id, n| match authenticate(&auth, clock, id, n) {
                Ok(n) => cmd.send(Cmd::Notify(id, n, oneshot::channel().0)).is_ok(),
                Err(e) => {
                    tracing::debug!(execution = %id, error = %e, "in-process notification refused");
                    !cmd.is_closed()
                }
            })
        };
        let dtx = deferred_tx.clone();
        let catalog = self
            .registry
            .build_all_with(
                &self.config,
                |n| DeferredQueue::new(n.clone(), dtx.clone()),
                &notifier,
                |n| InstanceState::in_store(store.clone(), n.as_str()),
            )
            .await?;
        let (events, _) = broadcast::channel(self.settings.event_capacity.max(16));
        let (alive_tx, alive_rx) = tokio::sync::watch::channel(());
        let shared = Arc::new(Shared {
            cmd: cmd_tx,
            events: events.clone(),
            store: store.clone(),
            registry: self.registry.clone(),
            catalog: RwLock::new(Arc::new(catalog.clone())),
            auth,
            clock,
            notifier: notifier.clone(),
            deferred_tx,
            membership: std::sync::Mutex::new(None),
            _alive: AliveGuard(alive_tx),
        });
        let engine = Engine { shared };
        let actor = actor::Actor::recover(actor::Init {
            store,
            registry: self.registry,
            catalog,
            settings: self.settings,
            auth: engine.shared.auth.clone(),
            clock,
            events,
            notifier,
            deferred: engine.shared.deferred_tx.clone(),
            notify_target: self.notify_target,
            cmd_tx: engine.shared.cmd.clone(),
        })
        .await?;
        tokio::spawn(actor.run(cmd_rx, alive_rx));
        if let Some(sh) = shared_store {
            let task = tokio::spawn(membership::run(sh, engine.shared.cmd.clone()));
            *engine
                .shared
                .membership
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
        tokio::spawn(actor::route_deferred(
            engine.shared.cmd.clone(),
            deferred_rx,
        ));
        Ok(engine)
    }
}

/// Checks and strips the `auth_token` attribute of a push about `id`.
fn authenticate(
    auth: &Auth,
    clock: Clock,
    id: ExecutionId,
    mut n: Notification,
) -> Result<Notification> {
    let Some(token) = n.attributes.remove("auth_token") else {
        return Err(Error::NotificationRejected(
            NotificationRejection::MissingToken,
        ));
    };
    auth.verify(&token, id, clock.now())
        .map_err(Error::NotificationRejected)?;
    Ok(n)
}

impl Engine {
    /// Starts building an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            registry: Registry::new(),
            config: DistributorsConfig::default(),
            store: None,
            settings: Settings::default(),
            secret: None,
            clock: None,
            notify_target: None,
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .cmd
            .send(make(tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Submits a task and returns its first execution's id once the execution is durably stored.
    ///
    /// Errors: [`Error::UnknownDistributor`] (listing the configured names and the nearest one),
    /// [`Error::Validation`] (every payload violation with its JSON Pointer), store errors.
    pub async fn submit(&self, task: Task) -> Result<ExecutionId> {
        let mut ids = self.submit_many(vec![task]).await?;
        ids.pop().ok_or(Error::Shutdown)
    }

    /// Submits several tasks in one store transaction: all are validated first (the first invalid
    /// one fails the call and nothing is submitted), then all are stored together and their ids
    /// returned in order. Cheaper than one `submit` per task for bulk work.
    ///
    /// Errors: as [`submit`](Self::submit), for the first task that fails.
    pub async fn submit_many(&self, tasks: Vec<Task>) -> Result<Vec<ExecutionId>> {
        let mut batch = Vec::with_capacity(tasks.len());
        let now = self.shared.clock.now();
        for mut task in tasks {
            let instance = self.instance(task.distributor.as_str())?;
            let payload = task.payload.to_value();
            instance.validate(&payload)?;
            if let Some(prepared) = instance.distributor().prepare(&payload, now) {
                task.payload = crate::types::Payload::new(&prepared);
            }
            batch.push((task, instance));
        }
        metrics::counter!("distributor_submitted_total").increment(batch.len() as u64);
        self.call(|r| Cmd::Submit(batch, r)).await
    }

    /// Submits `task` unless a task was already submitted with the same idempotency `key`, in
    /// which case nothing is submitted and that task's first execution id is returned. Returns
    /// the id and whether this call created it.
    ///
    /// The key is stored with the new execution, in the same store transaction as its insert
    /// (as metadata `idempotency/<key>`), so a client whose answer was lost, or that retries
    /// after the engine restarted, gets the first id back: keys are durable and never expire.
    /// Concurrent calls with one key create one execution. A resubmission is not compared with
    /// the first task: the key alone decides.
    ///
    /// Errors: [`Error::Permanent`] when `key` is empty, longer than [`MAX_IDEMPOTENCY_KEY`]
    /// bytes or has control characters; otherwise as
    /// [`submit`](Self::submit) (validation happens only when a new task is submitted).
    pub async fn submit_idempotent(&self, key: &str, task: Task) -> Result<(ExecutionId, bool)> {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(char::is_control) {
            return Err(Error::Permanent {
                message: format!(
                    "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes without control \
                     characters"
                ),
                source: None,
            });
        }
        if let Some(id) = self.idempotent_id(key).await? {
            return Ok((id, false));
        }
        let mut task = task;
        let now = self.shared.clock.now();
        let instance = self.instance(task.distributor.as_str())?;
        let payload = task.payload.to_value();
        instance.validate(&payload)?;
        if let Some(prepared) = instance.distributor().prepare(&payload, now) {
            task.payload = crate::types::Payload::new(&prepared);
        }
        let r = self
            .call(|r| Cmd::SubmitKeyed(key.to_owned(), task, instance, r))
            .await?;
        if r.1 {
            metrics::counter!("distributor_submitted_total").increment(1);
        }
        Ok(r)
    }

    /// The first execution submitted with idempotency `key`, if one was committed.
    async fn idempotent_id(&self, key: &str) -> Result<Option<ExecutionId>> {
        let Some(v) = self.shared.store.meta(&idempotency_meta_key(key)).await? else {
            return Ok(None);
        };
        v.parse()
            .map(|n| Some(ExecutionId(n)))
            .map_err(|_| Error::Store {
                message: format!("corrupt idempotency record for key `{key}`: `{v}`"),
                transient: false,
                source: None,
            })
    }

    /// The configured instance named `name` (following aliases).
    pub fn instance(&self, name: &str) -> Result<Instance> {
        let catalog = self.catalog();
        catalog
            .get(&DistributorName::from(name))
            .cloned()
            .ok_or_else(|| Error::UnknownDistributor {
                name: name.to_owned(),
                known: catalog.keys().cloned().collect(),
                suggestion: nearest(name, catalog.keys().map(|k| k.as_str())),
            })
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.shared
            .catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configured distributor names (instances and aliases).
    pub fn distributor_names(&self) -> Vec<DistributorName> {
        self.catalog().keys().cloned().collect()
    }

    /// The registry the engine was built with.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The committed record of one execution.
    pub async fn get(&self, id: ExecutionId) -> Result<ExecutionRecord> {
        self.shared
            .store
            .get(id)
            .await?
            .ok_or(Error::UnknownExecution(id))
    }

    /// Committed records matching `filter`.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRecord>> {
        self.shared.store.list(filter).await
    }

    /// An execution's history, oldest first.
    pub async fn history(&self, id: ExecutionId) -> Result<Vec<HistoryEntry>> {
        self.shared.store.history(id).await
    }

    /// Writes metadata entries (`(key, value)`) in one store transaction and returns once they
    /// are durable. For embedders that keep documents of their own next to the executions (a
    /// workflow run and its steps); keys SHOULD start with a prefix of the embedder's own
    /// containing a `/` (the engine's keys have none).
    ///
    /// This goes to the store directly, not through the actor's batches: metadata has no
    /// version and takes part in no compare-and-set, so it cannot conflict with the actor's
    /// writes, and the caller gets its own durability point instead of waiting behind (or
    /// holding up) group commit. Writes from one caller apply in call order; concurrent
    /// writers to one key get last-writer-wins. Both stores serialize writes (SQLite through
    /// its single writer connection), so this never races a batch mid-transaction.
    ///
    /// Errors: store errors ([`Error::Store`], transient when retrying may help).
    pub async fn put_meta(&self, entries: Vec<(String, String)>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let batch: Vec<Write> = entries
            .into_iter()
            .map(|(key, value)| Write::Meta { key, value })
            .collect();
        self.shared.store.apply(&batch).await
    }

    /// A committed metadata value (see [`put_meta`](Self::put_meta)).
    pub async fn meta(&self, key: &str) -> Result<Option<String>> {
        self.shared.store.meta(key).await
    }

    /// Committed metadata entries whose key starts with `prefix`, by ascending key.
    pub async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.shared.store.meta_prefix(prefix).await
    }

    /// Waits until this execution is terminal and returns its record.
    pub async fn wait(&self, id: ExecutionId) -> Result<ExecutionRecord> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .cmd
            .send(Cmd::Wait(id, tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Waits until the task of `id` is over: follows retries to the last attempt and returns its
    /// terminal record.
    pub async fn wait_task(&self, id: ExecutionId) -> Result<ExecutionRecord> {
        let mut rec = self.wait(id).await?;
        while let Some(next) = rec.retried_by {
            rec = self.wait(next).await?;
        }
        Ok(rec)
    }

    /// Requests cancellation. Idempotent: cancelling a finished or already-cancelling execution
    /// is `Ok` and changes nothing. The execution moves to `Cancelling`, the adapter's `cancel` is
    /// called (transient errors retried), and `Cancelled` is recorded once the work is confirmed
    /// stopped, or when the stop deadline passes (with a reason saying so).
    ///
    /// Errors: [`Error::UnknownExecution`].
    pub async fn cancel(&self, id: ExecutionId, reason: impl Into<String>) -> Result<()> {
        let reason = reason.into();
        self.call(|r| Cmd::Cancel(id, reason, r)).await
    }

    /// Sends a runtime control request to the distributor instance `name` (following aliases)
    /// and returns its answer; see [`Distributor::control`](crate::Distributor::control) for the
    /// contract. Control requests go to the instance new executions use; instances rebuilt
    /// from a config snapshot for executions in flight share its durable state.
    ///
    /// Errors: [`Error::UnknownDistributor`]; a permanent error naming the distributor and its
    /// kind if the kind takes no control requests; otherwise the adapter's error.
    pub async fn control(
        &self,
        name: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let instance = self.instance(name)?;
        match instance.distributor().control(request).await {
            Err(Error::Unsupported {
                operation: "control",
            }) => Err(Error::permanent(format!(
                "distributor `{name}` (kind `{}`) takes no control requests",
                instance.kind().name()
            ))),
            other => other,
        }
    }

    /// Polls the backend for this execution now.
    pub async fn poke(&self, id: ExecutionId) -> Result<()> {
        self.call(|r| Cmd::Poke(id, r)).await
    }

    /// Delivers a push about `id` (for embedders that receive pushes themselves). The
    /// notification MUST carry the execution's token in its `auth_token` attribute.
    ///
    /// Errors: [`Error::NotificationRejected`] for a missing, forged, expired or other-execution
    /// token, an unknown or finished execution, or a stale/duplicate update; nothing changes then.
    pub async fn notify(&self, id: ExecutionId, n: Notification) -> Result<()> {
        let n = authenticate(&self.shared.auth, self.shared.clock, id, n)?;
        self.call(|r| Cmd::Notify(id, n, r)).await
    }

    /// Replaces the distributors config. New executions use the new instances; executions in
    /// flight keep the config snapshot they were submitted with.
    ///
    /// Errors: a factory's error; then nothing changes.
    pub async fn reload_config(&self, config: DistributorsConfig) -> Result<()> {
        let dtx = self.shared.deferred_tx.clone();
        let store = self.shared.store.clone();
        let catalog = self
            .shared
            .registry
            .build_all_with(
                &config,
                |n| DeferredQueue::new(n.clone(), dtx.clone()),
                &self.shared.notifier,
                |n| InstanceState::in_store(store.clone(), n.as_str()),
            )
            .await?;
        self.call(|r| Cmd::Reload(catalog.clone(), r)).await?;
        *self
            .shared
            .catalog
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(catalog);
        Ok(())
    }

    /// The event stream. Events are published after they are committed; a subscriber that falls
    /// more than [`Settings::event_capacity`] behind gets a lag error and continues. On a store
    /// shared by several instances, each instance publishes the events of the executions it
    /// owns (a subscriber wanting all of them subscribes to every instance).
    pub fn events(&self) -> BroadcastStream<Event> {
        BroadcastStream::new(self.shared.events.subscribe())
    }

    /// A raw receiver of events (same as [`events`](Self::events), without the `Stream` wrapper).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The engine's clock.
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// Stops gracefully: commits what is pending and stops the actor. Work in the backends keeps
    /// running; a new engine on the same store re-attaches to it.
    ///
    /// On a shared store, the instance then gives its shards up at once, so that the other
    /// instances take its executions over without waiting for the leases to expire.
    pub async fn shutdown(&self) {
        let task = self
            .shared
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = &task {
            t.abort();
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.cmd.send(Cmd::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Some(t) = task {
            let _ = t.await;
            if let Some(sh) = self.shared.store.shared()
                && let Err(e) = sh.leave().await
            {
                tracing::warn!(error = %e, "could not give the shards up; their leases will expire");
            }
        }
    }
}
