//! The actor that owns every live execution. See the module docs of [`crate::engine`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument;

use super::auth::Auth;
use super::state::{Actor as Who, CancelCause, ExecutionRecord, HistoryEntry, State};
use super::{Catalog, Clock, Cmd, Event, Settings};
use crate::config::ConfigHash;
use crate::error::{Error, NotificationRejection, Result};
use crate::registry::{BuildContext, DeferredQueue, Instance, Notifier, Registry};
use crate::store::{Routed, ShardId, SharedStore, Store, Write};
use crate::types::*;

/// The actor's maps are keyed by ids the engine assigned and by configured names, not by
/// request data, so a fast (randomly seeded) non-cryptographic hasher is enough; SipHash
/// showed up in profiles.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// How many recently finished records the actor keeps for `wait`.
const RECENT: usize = 4096;
/// Batches with fewer writes than this are "small" for [`Settings::commit_delay`].
const SMALL_BATCH: usize = 8;
/// While at most this many executions are awaited (`wait`), their changes are never held for
/// group commit ([`Settings::commit_delay`]).
const FEW_WAITED: usize = 4;

/// What the actor needs to start.
pub(crate) struct Init {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub catalog: Catalog,
    pub settings: Settings,
    pub auth: Auth,
    pub clock: Clock,
    pub events: broadcast::Sender<Event>,
    pub notifier: Notifier,
    pub deferred: mpsc::UnboundedSender<(DistributorName, DeferredWork)>,
    pub notify_target: Option<String>,
    pub cmd_tx: mpsc::UnboundedSender<Cmd>,
}

/// The shards this instance owns, when the store is shared by several engine instances
/// ([`Store::shared`]). Execution ids are `seq * count + shard`: an instance allocates ids in
/// the shards it owns, from the highest id stored in each when it acquired it (only the owner
/// writes a shard, and the store fences every write, so ids never collide).
pub(crate) struct Sharding {
    shared: Arc<dyn SharedStore>,
    count: u64,
    owned: BTreeSet<ShardId>,
    /// Next sequence number of execution ids, per owned shard.
    next_seq: HashMap<ShardId, u64>,
    /// Next sequence number of deferred-work ids, per owned shard.
    next_dseq: HashMap<ShardId, u64>,
    /// Round-robin cursor over the owned shards for new tasks.
    cursor: usize,
    /// Submits that came while this instance owned no shard.
    parked: Vec<Cmd>,
}

impl Sharding {
    fn shard_of(&self, id: u64) -> ShardId {
        (id % self.count) as ShardId
    }

    fn seq_after(&self, max_id: u64) -> u64 {
        if max_id == 0 {
            1
        } else {
            max_id / self.count + 1
        }
    }

    fn take(next: &mut HashMap<ShardId, u64>, count: u64, shard: ShardId) -> Option<u64> {
        let seq = next.get_mut(&shard)?;
        let id = *seq * count + u64::from(shard);
        *seq += 1;
        Some(id)
    }

    /// A new execution id: in the shard of `near` when this instance owns it (a retry stays
    /// with its task), else in the next owned shard.
    fn alloc(&mut self, near: Option<ExecutionId>) -> Option<u64> {
        if let Some(n) = near {
            let s = self.shard_of(n.0);
            if self.owned.contains(&s) {
                return Self::take(&mut self.next_seq, self.count, s);
            }
        }
        let s = *self
            .owned
            .iter()
            .nth(self.cursor % self.owned.len().max(1))?;
        self.cursor = self.cursor.wrapping_add(1);
        Self::take(&mut self.next_seq, self.count, s)
    }
}

/// A change of the shards an instance owns, from its membership task.
pub(crate) enum ShardChange {
    /// Load and recover the executions of these newly acquired shards.
    Gain(Vec<ShardId>),
    /// Drop these shards' executions from memory; `graceful`: commit what is pending first
    /// (a hand-over), else they were lost (nothing of theirs can commit any more).
    Drop {
        shards: Vec<ShardId>,
        graceful: bool,
    },
}

/// Results of adapter calls, fed back to the actor.
enum Done {
    Run(ExecutionId, Result<Launch>),
    Status(ExecutionId, Result<Status>, Who),
    Cancel(ExecutionId, Result<()>),
    Notification(ExecutionId, Result<Option<Status>>),
    Deferred(u64, ExecutionId, Result<Vec<Notification>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TimerKey {
    Exec(ExecutionId),
    Deferred(u64),
}

#[derive(Debug, Default, Clone, Copy)]
struct Busy {
    run: bool,
    poll: bool,
    cancel: bool,
}

struct Dirty {
    inserted: bool,
    base_version: u64,
    history: Vec<HistoryEntry>,
}

type ReplyFn = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

enum Effect {
    Run(ExecutionId),
    Poll(ExecutionId, Who),
    Recover(ExecutionId),
    Cancel(ExecutionId),
    Notification(ExecutionId, Notification),
    Deferred(u64),
    Event(Event),
    Reply(ReplyFn),
    Waiters(ExecutionId),
}

pub(crate) struct Actor {
    store: Arc<dyn Store>,
    registry: Registry,
    settings: Settings,
    auth: Auth,
    clock: Clock,
    events: broadcast::Sender<Event>,
    notifier: Notifier,
    deferred_tx: mpsc::UnboundedSender<(DistributorName, DeferredWork)>,
    notify_target: Option<String>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: Option<mpsc::UnboundedReceiver<Done>>,
    snapshots: HashMap<(DistributorName, ConfigHash), Instance>,
    /// Live records behind `Arc`s: the map's slack costs 16 bytes a slot, and a committed
    /// batch shares the records with the store instead of copying them (changes copy on write,
    /// and only while a store still holds the old version).
    live: HashMap<ExecutionId, Arc<ExecutionRecord>>,
    timers: BTreeSet<(Timestamp, TimerKey)>,
    wake_of: HashMap<TimerKey, Timestamp>,
    busy: HashMap<ExecutionId, Busy>,
    waiters: HashMap<ExecutionId, Vec<oneshot::Sender<Result<ExecutionRecord>>>>,
    deferred: HashMap<u64, (DistributorName, DeferredWork)>,
    next_id: u64,
    next_deferred: u64,
    dirty: HashMap<ExecutionId, Dirty>,
    dirty_order: Vec<ExecutionId>,
    extra_writes: Vec<Write>,
    /// Idempotency keys submitted by this process (committed or not): concurrent keyed
    /// submissions that the store does not know yet resolve here.
    keyed: HashMap<String, ExecutionId>,
    effects: Vec<Effect>,
    dispatch_started: HashMap<ExecutionId, tokio::time::Instant>,
    finished: Vec<ExecutionId>,
    held: HashMap<ExecutionId, Vec<Notification>>,
    /// Results of adapter calls that answered without waiting, handled in the next turn.
    ready: Vec<Done>,
    /// The last [`RECENT`] committed terminal records, so that waiting for work that just
    /// finished (the common case) is answered without a store read.
    recent: HashMap<ExecutionId, Arc<ExecutionRecord>>,
    recent_order: std::collections::VecDeque<ExecutionId>,
    /// The batch being committed, if any (at most one: batches commit in order).
    inflight: Option<InFlight>,
    /// Told (with the batch's number) when a batch's write is over.
    committed_tx: mpsc::UnboundedSender<u64>,
    committed_rx: Option<mpsc::UnboundedReceiver<u64>>,
    /// Number of the next batch handed to the store.
    next_batch: u64,
    /// When the last batch was handed to the store (for [`Settings::commit_delay`]).
    last_flush: Option<tokio::time::Instant>,
    /// While set, this turn's changes are held (not yet flushed) until then, so that the next
    /// turns' changes share their transaction ([`Settings::commit_delay`]).
    hold_until: Option<tokio::time::Instant>,
    /// Set when the store is shared by several instances.
    sharding: Option<Sharding>,
    /// Shard changes received this turn, handled (they need the store) before the turn ends.
    shard_changes: Vec<(ShardChange, oneshot::Sender<()>)>,
}

/// A batch handed to the store and what waits for it.
struct InFlight {
    batch: u64,
    write: tokio::task::JoinHandle<(Result<()>, Vec<Write>)>,
    effects: Vec<Effect>,
    finished: Vec<ExecutionId>,
}

pub(crate) async fn route_deferred(
    cmd: mpsc::UnboundedSender<Cmd>,
    mut rx: mpsc::UnboundedReceiver<(DistributorName, DeferredWork)>,
) {
    while let Some((name, work)) = rx.recv().await {
        if cmd.send(Cmd::Defer(name, work)).is_err() {
            return;
        }
    }
}

fn backoff(settings: &Settings, n: u32) -> Duration {
    let exp = settings.backoff_base.saturating_mul(1u32 << n.min(16));
    let capped = exp.min(settings.backoff_max);
    // Jitter: between half and all of the capped delay.
    let f: f64 = 0.5 + rand::random::<f64>() * 0.5;
    capped.mul_f64(f)
}

impl Actor {
    /// Loads every live execution from the store and prepares to resume it.
    pub(crate) async fn recover(init: Init) -> Result<Self> {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        let _ = &init.cmd_tx;
        let shared = init.store.shared();
        let mut a = Actor {
            store: init.store,
            registry: init.registry,
            settings: init.settings,
            auth: init.auth,
            clock: init.clock,
            events: init.events,
            notifier: init.notifier,
            deferred_tx: init.deferred,
            notify_target: init.notify_target,
            done_tx,
            done_rx: Some(done_rx),
            snapshots: HashMap::default(),
            live: HashMap::default(),
            timers: BTreeSet::new(),
            wake_of: HashMap::default(),
            busy: HashMap::default(),
            waiters: HashMap::default(),
            deferred: HashMap::default(),
            next_id: 1,
            next_deferred: 1,
            dirty: HashMap::default(),
            dirty_order: Vec::new(),
            extra_writes: Vec::new(),
            keyed: HashMap::default(),
            effects: Vec::new(),
            dispatch_started: HashMap::default(),
            finished: Vec::new(),
            held: HashMap::default(),
            ready: Vec::new(),
            recent: HashMap::default(),
            recent_order: std::collections::VecDeque::new(),
            inflight: None,
            committed_tx,
            committed_rx: Some(committed_rx),
            next_batch: 0,
            last_flush: None,
            hold_until: None,
            sharding: shared.map(|shared| Sharding {
                count: u64::from(shared.shard_count().max(1)),
                shared,
                owned: BTreeSet::new(),
                next_seq: HashMap::default(),
                next_dseq: HashMap::default(),
                cursor: 0,
                parked: Vec::new(),
            }),
            shard_changes: Vec::new(),
        };
        for inst in init.catalog.values() {
            a.snapshots.insert(
                (inst.name().clone(), inst.config_hash().clone()),
                inst.clone(),
            );
        }
        let (live, deferred) = match &a.sharding {
            Some(sh) => {
                let held = sh.shared.held();
                let load = sh.shared.load(&held).await?;
                a.own(&held, &load.max_ids);
                (load.live, load.deferred)
            }
            None => {
                a.next_id = a.store.max_id().await? + 1;
                (a.store.live().await?, a.store.deferred().await?)
            }
        };
        a.adopt(live, deferred).await;
        Ok(a)
    }

    /// Records newly owned shards and where their ids continue.
    fn own(&mut self, shards: &[ShardId], max_ids: &[(ShardId, u64, u64)]) {
        let Some(sh) = self.sharding.as_mut() else {
            return;
        };
        for s in shards {
            sh.owned.insert(*s);
            sh.next_seq.insert(*s, 1);
            sh.next_dseq.insert(*s, 1);
        }
        for (s, e, d) in max_ids {
            let (e, d) = (sh.seq_after(*e), sh.seq_after(*d));
            sh.next_seq.insert(*s, e);
            sh.next_dseq.insert(*s, d);
        }
    }

    /// Takes over executions read from the store, as a restart does: re-arms their timers,
    /// re-dispatches `Dispatching` ones with the same request id, re-attaches to running work
    /// through the adapter, resumes cancellations.
    async fn adopt(
        &mut self,
        live: Vec<ExecutionRecord>,
        deferred: Vec<(u64, DistributorName, DeferredWork)>,
    ) {
        let a = self;
        for (id, name, work) in deferred {
            a.next_deferred = a.next_deferred.max(id + 1);
            a.arm(TimerKey::Deferred(id), Some(work.due));
            a.deferred.insert(id, (name, work));
        }
        let recovered = live.len();
        for rec in live {
            let key = (rec.distributor.clone(), rec.config_hash.clone());
            if !a.snapshots.contains_key(&key) {
                match a.build_snapshot(&rec).await {
                    Ok(inst) => {
                        a.snapshots.insert(key, inst);
                    }
                    Err(e) => {
                        tracing::error!(execution = %rec.id, error = %e, "cannot rebuild the distributor of a live execution; leaving it untouched");
                        continue;
                    }
                }
            }
            let id = rec.id;
            let state = rec.state;
            metrics::gauge!("distributor_executions", "state" => state.as_str()).increment(1.0);
            a.live.insert(id, Arc::new(rec));
            match state {
                State::Dispatching => {
                    a.note(
                        id,
                        Who::Recovery,
                        "re-dispatching after restart with the same request id",
                    );
                    a.spawn_run(id);
                }
                State::Pending | State::Running => {
                    a.busy.entry(id).or_default().poll = true;
                    a.effects.push(Effect::Recover(id));
                }
                State::Cancelling => {
                    let r = &a.live[&id];
                    if r.token.is_some() && !r.cancel_sent {
                        a.spawn_cancel(id);
                    }
                }
                _ => {}
            }
            a.rearm(id);
        }
        if recovered > 0 {
            tracing::info!(recovered, "engine recovered live executions");
        }
    }

    /// Whether this instance owns `id`'s shard (always, with a store of its own).
    fn owns(&self, id: u64) -> bool {
        self.sharding
            .as_ref()
            .is_none_or(|sh| sh.owned.contains(&sh.shard_of(id)))
    }

    /// Handles the shard changes received this turn.
    async fn on_shard_changes(&mut self) {
        for (change, done) in std::mem::take(&mut self.shard_changes) {
            match change {
                ShardChange::Gain(shards) => {
                    // Whatever memory of them is left from an earlier ownership is stale.
                    self.flush().await;
                    self.settle().await;
                    self.drop_shards(&shards);
                    let Some(shared) = self.sharding.as_ref().map(|s| s.shared.clone()) else {
                        continue;
                    };
                    match shared.load(&shards).await {
                        Ok(load) => {
                            self.own(&shards, &load.max_ids);
                            tracing::info!(shards = ?shards, live = load.live.len(), "taking over shards");
                            self.adopt(load.live, load.deferred).await;
                            let parked = self
                                .sharding
                                .as_mut()
                                .map(|s| std::mem::take(&mut s.parked))
                                .unwrap_or_default();
                            for cmd in parked {
                                self.on_cmd(cmd);
                            }
                        }
                        Err(e) => {
                            // Not adopted: give them back (their lease expires or is released).
                            tracing::error!(error = %e, shards = ?shards, "cannot load acquired shards; releasing them");
                            let _ = shared.release(&shards).await;
                        }
                    }
                }
                ShardChange::Drop { shards, graceful } => {
                    if graceful {
                        self.flush().await;
                        self.settle().await;
                    }
                    self.drop_shards(&shards);
                }
            }
            let _ = done.send(());
        }
    }

    /// Forgets the executions and deferred work of `shards` (no adapter call: their work goes
    /// on, and their new owner re-attaches to it). Waiters keep waiting, on the store.
    fn drop_shards(&mut self, shards: &[ShardId]) {
        let Some(sh) = self.sharding.as_mut() else {
            return;
        };
        let set: BTreeSet<ShardId> = shards.iter().copied().collect();
        for s in &set {
            sh.owned.remove(s);
            sh.next_seq.remove(s);
            sh.next_dseq.remove(s);
        }
        let count = sh.count;
        let gone = |id: u64| set.contains(&((id % count) as ShardId));
        let ids: Vec<ExecutionId> = self.live.keys().copied().filter(|i| gone(i.0)).collect();
        for id in &ids {
            if let Some(rec) = self.live.remove(id)
                && !rec.state.is_terminal()
            {
                metrics::gauge!("distributor_executions", "state" => rec.state.as_str())
                    .decrement(1.0);
            }
            self.dirty.remove(id);
            self.busy.remove(id);
            self.held.remove(id);
            self.dispatch_started.remove(id);
            self.arm(TimerKey::Exec(*id), None);
            for w in self.waiters.remove(id).unwrap_or_default() {
                self.wait_elsewhere(*id, w);
            }
        }
        let dirty = &self.dirty;
        self.dirty_order.retain(|id| dirty.contains_key(id));
        let dids: Vec<u64> = self.deferred.keys().copied().filter(|d| gone(*d)).collect();
        for d in dids {
            self.deferred.remove(&d);
            self.arm(TimerKey::Deferred(d), None);
        }
        self.extra_writes.retain(|w| match w {
            Write::PutDeferred { id, .. } | Write::DeleteDeferred { id } => !gone(*id),
            _ => true,
        });
        self.effects.retain(|e| match e {
            Effect::Run(id)
            | Effect::Poll(id, _)
            | Effect::Recover(id)
            | Effect::Cancel(id)
            | Effect::Notification(id, _) => !gone(id.0),
            _ => true,
        });
        self.finished.retain(|id| !gone(id.0));
        if !ids.is_empty() {
            tracing::info!(shards = ?shards, executions = ids.len(), "dropped shards");
        }
    }

    /// Waits, on the store, for an execution another instance owns (or that is unknown).
    fn wait_elsewhere(
        &mut self,
        id: ExecutionId,
        mut tx: oneshot::Sender<Result<ExecutionRecord>>,
    ) {
        if self.sharding.is_none() {
            return self.answer_for_unknown(id, tx, Ok);
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(10);
            loop {
                match store.get(id).await {
                    Ok(Some(rec)) if rec.state.is_terminal() => {
                        let _ = tx.send(Ok(rec));
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let _ = tx.send(Err(Error::UnknownExecution(id)));
                        return;
                    }
                    Err(e) if e.is_transient() => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        });
    }

    /// Answers a command about an execution that is not live here. With a store of its own,
    /// or for a shard this instance owns, as [`Self::answer_for_unknown`]; for another
    /// instance's execution, the command is queued for its owner through the store
    /// ([`SharedStore::post`]) and the answer is `Ok` once it is durably queued.
    fn forward(
        &mut self,
        id: ExecutionId,
        cmd: Routed,
        reply: oneshot::Sender<Result<()>>,
        ok: impl FnOnce(ExecutionRecord) -> Result<()> + Send + 'static,
    ) {
        let shared = match &self.sharding {
            Some(sh) if !sh.owned.contains(&sh.shard_of(id.0)) => sh.shared.clone(),
            _ => return self.answer_for_unknown(id, reply, ok),
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let r = match store.get(id).await {
                Ok(Some(rec)) if rec.state.is_terminal() => ok(rec),
                Ok(Some(_)) => shared.post(id, &cmd).await,
                Ok(None) => Err(Error::UnknownExecution(id)),
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        });
    }

    /// Builds the distributor instance of a record's config snapshot. Not a method borrowing
    /// the actor across the await: the actor is `Send` but not `Sync`.
    fn build_snapshot(
        &self,
        rec: &ExecutionRecord,
    ) -> impl std::future::Future<Output = Result<Instance>> + Send + 'static {
        let kind = self.registry.kind(rec.kind.as_str()).cloned();
        let ctx = BuildContext {
            name: rec.distributor.clone(),
            deferred: DeferredQueue::new(rec.distributor.clone(), self.deferred_tx.clone()),
            notifier: self.notifier.clone(),
            state: crate::state::InstanceState::in_store(
                self.store.clone(),
                rec.distributor.as_str(),
            ),
            registry: self.registry.clone(),
        };
        let (config, hash) = ((*rec.config).clone(), rec.config_hash.clone());
        async move { kind?.build(config, ctx, hash).await }
    }

    pub(crate) async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut alive: watch::Receiver<()>,
    ) {
        let (Some(mut done_rx), Some(mut committed_rx)) =
            (self.done_rx.take(), self.committed_rx.take())
        else {
            return;
        };
        self.flush().await;
        loop {
            let timer = self.timers.first().map(|(t, _)| self.clock.instant_of(*t));
            let wake = match (timer, self.hold_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut stop = None;
            if !self.ready.is_empty() {
                // Results of calls that answered inline: handle them with whatever else is
                // queued, without waiting, so they share one commit.
                for d in std::mem::take(&mut self.ready) {
                    self.on_done(d);
                }
                stop = self.take_queued(&mut cmds, &mut done_rx, 0);
                if timer.is_some_and(|w| w <= tokio::time::Instant::now()) {
                    self.fire_timers();
                }
                if self.end_turn(stop).await {
                    return;
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = alive.changed() => return,
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => {
                        stop = self.on_cmd(cmd);
                        if stop.is_none() {
                            stop = self.take_queued(&mut cmds, &mut done_rx, 1);
                        }
                    }
                    None => return,
                },
                d = done_rx.recv() => {
                    if let Some(d) = d {
                        self.on_done(d);
                        let mut n = 1;
                        while n < self.settings.max_batch {
                            match done_rx.try_recv() {
                                Ok(d) => self.on_done(d),
                                Err(_) => break,
                            }
                            n += 1;
                        }
                    }
                }
                Some(batch) = committed_rx.recv() => {
                    // The notice may be for a batch already settled by a later flush. For the
                    // batch in flight, its task is returning: settling waits for no I/O.
                    if self.inflight.as_ref().is_some_and(|f| f.batch == batch) {
                        self.settle().await;
                    }
                    continue;
                }
                _ = async { match wake { Some(w) => tokio::time::sleep_until(w).await, None => std::future::pending().await } } => {
                    if timer.is_some_and(|w| w <= tokio::time::Instant::now()) {
                        self.fire_timers();
                    }
                }
            }
            if self.end_turn(stop).await {
                return;
            }
        }
    }

    /// Ends a turn. On shutdown (`stop`), commits everything, answers the shutdown and returns
    /// true: the actor stops. Otherwise flushes, or holds the changes for group commit.
    async fn end_turn(&mut self, stop: Option<oneshot::Sender<()>>) -> bool {
        if !self.shard_changes.is_empty() {
            self.on_shard_changes().await;
        }
        if let Some(tx) = stop {
            self.flush().await;
            self.settle().await;
            let _ = tx.send(());
            return true;
        }
        self.flush_or_hold().await;
        false
    }

    /// Handles, without waiting, the commands already queued (up to the batch size, `taken`
    /// of which the caller has handled) and every queued adapter result. Returns the shutdown
    /// reply if a shutdown came.
    fn take_queued(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        done_rx: &mut mpsc::UnboundedReceiver<Done>,
        taken: usize,
    ) -> Option<oneshot::Sender<()>> {
        let mut stop = None;
        let mut n = taken;
        while stop.is_none() && n < self.settings.max_batch {
            match cmds.try_recv() {
                Ok(cmd) => stop = self.on_cmd(cmd),
                Err(_) => break,
            }
            n += 1;
        }
        while let Ok(d) = done_rx.try_recv() {
            self.on_done(d);
        }
        stop
    }

    // ----- record bookkeeping -------------------------------------------------------------

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn mark(&mut self, id: ExecutionId) -> Option<&mut ExecutionRecord> {
        let rec = Arc::make_mut(self.live.get_mut(&id)?);
        if let std::collections::hash_map::Entry::Vacant(v) = self.dirty.entry(id) {
            v.insert(Dirty {
                inserted: false,
                base_version: rec.version,
                history: Vec::new(),
            });
            self.dirty_order.push(id);
        }
        rec.version += 1;
        rec.updated_at = self.clock.now();
        Some(rec)
    }

    /// Moves `id` to `to` if the transition table allows it, with a history row.
    fn transition(
        &mut self,
        id: ExecutionId,
        to: State,
        who: Who,
        reason: impl Into<String>,
    ) -> bool {
        let Some(from) = self.live.get(&id).map(|r| r.state) else {
            return false;
        };
        if !from.can_move_to(to) {
            tracing::debug!(execution = %id, %from, %to, "transition refused by the table");
            return false;
        }
        let now = self.now();
        let Some(rec) = self.mark(id) else {
            return false;
        };
        rec.state = to;
        let entry = HistoryEntry {
            execution_id: id,
            version: rec.version,
            from: Some(from),
            to,
            at: now,
            actor: who,
            reason: reason.into(),
        };
        if let Some(d) = self.dirty.get_mut(&id) {
            d.history.push(entry);
        }
        if from != to {
            metrics::gauge!("distributor_executions", "state" => from.as_str()).decrement(1.0);
            if !to.is_terminal() {
                metrics::gauge!("distributor_executions", "state" => to.as_str()).increment(1.0);
            }
        }
        true
    }

    /// A history row without a state change (a retried error, a refused cancel).
    fn note(&mut self, id: ExecutionId, who: Who, reason: impl Into<String>) {
        let now = self.now();
        let Some(rec) = self.mark(id) else { return };
        let entry = HistoryEntry {
            execution_id: id,
            version: rec.version,
            from: Some(rec.state),
            to: rec.state,
            at: now,
            actor: who,
            reason: reason.into(),
        };
        if let Some(d) = self.dirty.get_mut(&id) {
            d.history.push(entry);
        }
    }

    fn instance(&self, id: ExecutionId) -> Option<Instance> {
        let rec = self.live.get(&id)?;
        self.snapshots
            .get(&(rec.distributor.clone(), rec.config_hash.clone()))
            .cloned()
    }

    fn poll_interval(&self, id: ExecutionId) -> Duration {
        let Some(rec) = self.live.get(&id) else {
            return self.settings.poll_interval;
        };
        let push = self
            .instance(id)
            .is_some_and(|i| i.distributor().capabilities().push_notifications);
        match rec.state {
            State::Cancelling => self.settings.cancel_poll_interval,
            _ if push => self.settings.hedge_poll_interval,
            _ => rec.poll_interval.unwrap_or(self.settings.poll_interval),
        }
    }

    fn compute_wake(&self, rec: &ExecutionRecord) -> Option<Timestamp> {
        let d = &rec.deadlines;
        let cands: [Option<Timestamp>; 3] = match rec.state {
            State::Queued => [Some(rec.retry_at.unwrap_or(rec.created_at)), None, None],
            State::Dispatching => [
                rec.retry_at.filter(|_| !self.busy_of(rec.id).run),
                d.start_by,
                None,
            ],
            State::Pending => [rec.next_poll, d.start_by, None],
            State::Running => [rec.next_poll, d.finish_by, None],
            State::Cancelling => [rec.next_poll, rec.cancel_by, rec.retry_at],
            State::Succeeded | State::Abnormal(_) => [None, None, None],
        };
        cands.into_iter().flatten().min()
    }

    fn busy_of(&self, id: ExecutionId) -> Busy {
        self.busy.get(&id).copied().unwrap_or_default()
    }

    fn arm(&mut self, key: TimerKey, at: Option<Timestamp>) {
        if let Some(old) = self.wake_of.remove(&key) {
            self.timers.remove(&(old, key));
        }
        if let Some(at) = at {
            self.timers.insert((at, key));
            self.wake_of.insert(key, at);
        }
    }

    fn rearm(&mut self, id: ExecutionId) {
        let at = self.live.get(&id).and_then(|r| self.compute_wake(r));
        self.arm(TimerKey::Exec(id), at);
    }

    fn emit(&mut self, e: Event) {
        self.effects.push(Effect::Event(e));
    }

    // ----- commands ---------------------------------------------------------------------

    fn on_cmd(&mut self, cmd: Cmd) -> Option<oneshot::Sender<()>> {
        match cmd {
            Cmd::Submit(batch, reply)
                if self.sharding.as_ref().is_some_and(|s| s.owned.is_empty()) =>
            {
                // No shard to put new executions in yet (this instance just joined, or lost
                // its shards): they wait for the next acquisition.
                if let Some(sh) = self.sharding.as_mut() {
                    sh.parked.push(Cmd::Submit(batch, reply));
                }
            }
            Cmd::Submit(batch, reply) => {
                let ids: Vec<ExecutionId> =
                    batch.into_iter().map(|(t, i)| self.submit(t, i)).collect();
                self.effects.push(Effect::Reply(Box::new(move |r| {
                    let _ = reply.send(r.map(|()| ids).map_err(store_failed));
                })));
            }
            Cmd::SubmitKeyed(key, task, instance, reply) => {
                let (id, created) = match self.keyed.get(&key) {
                    Some(id) => (*id, false),
                    None => {
                        let id = self.submit(task, instance);
                        self.extra_writes.push(Write::Meta {
                            key: super::idempotency_meta_key(&key),
                            value: id.0.to_string(),
                        });
                        self.keyed.insert(key, id);
                        (id, true)
                    }
                };
                self.effects.push(Effect::Reply(Box::new(move |r| {
                    let _ = reply.send(r.map(|()| (id, created)).map_err(store_failed));
                })));
            }
            Cmd::Cancel(id, reason, reply) => self.on_cancel(id, reason, reply),
            Cmd::Poke(id, reply) => self.on_poke(id, reply),
            Cmd::Notify(id, n, reply) => self.on_notify(id, n, reply),
            Cmd::Wait(id, tx) => match (self.live.get(&id), self.recent.get(&id)) {
                (Some(_), _) => self.waiters.entry(id).or_default().push(tx),
                (None, Some(rec)) => {
                    let _ = tx.send(Ok(ExecutionRecord::clone(rec)));
                }
                (None, None) => self.wait_elsewhere(id, tx),
            },
            Cmd::Shards(change, done) => self.shard_changes.push((change, done)),
            Cmd::Inbox(id, routed, reply) => {
                if !self.live.contains_key(&id) && !self.owns(id.0) {
                    // Not ours (any more): left queued for the owner.
                    let shard = self.sharding.as_ref().map_or(0, |s| s.shard_of(id.0));
                    let _ = reply.send(Err(Error::Fenced { shard }));
                } else {
                    match routed {
                        Routed::Notify { notification } => self.on_notify(id, notification, reply),
                        Routed::Cancel { reason } => self.on_cancel(id, reason, reply),
                        Routed::Poke => self.on_poke(id, reply),
                    }
                }
            }
            Cmd::Reload(catalog, reply) => {
                for inst in catalog.values() {
                    self.snapshots.insert(
                        (inst.name().clone(), inst.config_hash().clone()),
                        inst.clone(),
                    );
                }
                let names = catalog.keys().cloned().collect();
                self.emit(Event::ConfigReloaded { names });
                self.reply_after_commit(reply);
            }
            Cmd::Defer(name, work) => {
                let id = match self.sharding.as_mut() {
                    None => {
                        self.next_deferred += 1;
                        self.next_deferred - 1
                    }
                    Some(sh) => {
                        let shard = sh.shard_of(work.execution_id.0);
                        match Sharding::take(&mut sh.next_dseq, sh.count, shard) {
                            Some(id) => id,
                            None => {
                                tracing::warn!(execution = %work.execution_id, "deferred work for an execution another instance owns; dropped");
                                return None;
                            }
                        }
                    }
                };
                self.extra_writes.push(Write::PutDeferred {
                    id,
                    distributor: name.clone(),
                    work: work.clone(),
                });
                self.arm(TimerKey::Deferred(id), Some(work.due));
                self.deferred.insert(id, (name, work));
            }
            Cmd::Shutdown(tx) => return Some(tx),
        }
        None
    }

    fn reply_after_commit(&mut self, reply: oneshot::Sender<Result<()>>) {
        if reply.is_closed() {
            // Nobody listens (an in-process push): nothing to answer, and nobody awaits the
            // commit (see `Settings::commit_delay`).
            return;
        }
        self.effects.push(Effect::Reply(Box::new(move |r| {
            let _ = reply.send(r.map_err(store_failed));
        })));
    }

    /// Answers a command about an execution that is not live, from the store: `ok` if it
    /// exists (finished), `UnknownExecution` otherwise. At once when the store answers without
    /// waiting (memory), else from a task of its own.
    fn answer_for_unknown<T: Send + 'static>(
        &mut self,
        id: ExecutionId,
        reply: oneshot::Sender<Result<T>>,
        ok: impl FnOnce(ExecutionRecord) -> Result<T> + Send + 'static,
    ) {
        let store = self.store.clone();
        let fut = async move {
            let r = match store.get(id).await {
                Ok(Some(rec)) => ok(rec),
                Ok(None) => Err(Error::UnknownExecution(id)),
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        };
        if let Err(fut) = poll_once(fut) {
            tokio::spawn(fut);
        }
    }

    /// A new execution id (see [`Sharding`]), near `near`'s shard when given.
    fn alloc_id(&mut self, near: Option<ExecutionId>) -> ExecutionId {
        if let Some(id) = self.sharding.as_mut().and_then(|sh| sh.alloc(near)) {
            return ExecutionId(id);
        }
        // With a store of its own; callers check a shared store's instance owns a shard.
        self.next_id += 1;
        ExecutionId(self.next_id - 1)
    }

    fn submit(&mut self, task: super::Task, instance: Instance) -> ExecutionId {
        let id = self.alloc_id(None);
        let now = self.now();
        let name = instance.name().clone();
        let hash = instance.config_hash().clone();
        self.snapshots
            .entry((name.clone(), hash.clone()))
            .or_insert_with(|| instance.clone());
        let snapshot = (
            name.clone(),
            instance.kind().name(),
            instance.shared_config(),
            hash,
        );
        let rec =
            ExecutionRecord::queued(id, TaskId(id.0), Attempt(1), Arc::new(task), snapshot, now);
        self.insert(rec, Who::User, "submitted");
        self.dispatch(id);
        id
    }

    fn insert(&mut self, rec: ExecutionRecord, who: Who, reason: &str) {
        let id = rec.id;
        let entry = HistoryEntry {
            execution_id: id,
            version: rec.version,
            from: None,
            to: rec.state,
            at: rec.created_at,
            actor: who,
            reason: reason.into(),
        };
        self.emit(Event::Created {
            id,
            task_id: rec.task_id,
            attempt: rec.attempt.0,
            distributor: rec.distributor.clone(),
        });
        metrics::gauge!("distributor_executions", "state" => rec.state.as_str()).increment(1.0);
        self.dirty.insert(
            id,
            Dirty {
                inserted: true,
                base_version: 0,
                history: vec![entry],
            },
        );
        self.dirty_order.push(id);
        self.live.insert(id, Arc::new(rec));
    }

    fn dispatch(&mut self, id: ExecutionId) {
        let now = self.now();
        let (request_id, start) = match self.live.get(&id) {
            Some(r) => (r.request_id.clone(), r.task.timeouts.start),
            None => return,
        };
        if !self.transition(
            id,
            State::Dispatching,
            Who::Engine,
            format!("dispatching with request id {request_id}"),
        ) {
            return;
        }
        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
            rec.retry_at = None;
            if rec.deadlines.start_by.is_none() {
                rec.deadlines.start_by = start.map(|d| now.plus(d));
            }
        }
        self.dispatch_started
            .insert(id, tokio::time::Instant::now());
        self.spawn_run(id);
        self.rearm(id);
    }

    fn on_poke(&mut self, id: ExecutionId, reply: oneshot::Sender<Result<()>>) {
        match self.live.get(&id) {
            Some(rec) if rec.token.is_some() && !rec.state.is_terminal() => {
                self.start_poll(id, Who::User);
                self.emit(Event::Poked { id });
                self.reply_after_commit(reply);
            }
            Some(_) => self.reply_after_commit(reply),
            None => self.forward(id, Routed::Poke, reply, |_| Ok(())),
        }
    }

    fn on_cancel(&mut self, id: ExecutionId, reason: String, reply: oneshot::Sender<Result<()>>) {
        let Some(state) = self.live.get(&id).map(|r| r.state) else {
            return self.forward(id, Routed::Cancel { reason }, reply, |_| Ok(()));
        };
        if !state.is_terminal() && state != State::Cancelling {
            self.begin_cancel(id, CancelCause::Requested { reason });
        }
        self.reply_after_commit(reply);
    }

    fn on_notify(&mut self, id: ExecutionId, n: Notification, reply: oneshot::Sender<Result<()>>) {
        let Some(rec) = self.live.get(&id) else {
            return self.forward(id, Routed::Notify { notification: n }, reply, |_| {
                Err(Error::NotificationRejected(NotificationRejection::Terminal))
            });
        };
        if rec.state.is_terminal() {
            let _ = reply.send(Err(Error::NotificationRejected(
                NotificationRejection::Terminal,
            )));
            return;
        }
        if rec.token.is_none() {
            // The work pushed before `run` returned its token (adapters that report from inside
            // `run` race with it). Hold the push, without consuming its sequence, until the
            // launch is recorded; if the engine dies first, polling finds the state instead.
            self.held.entry(id).or_default().push(n);
            return self.reply_after_commit(reply);
        }
        match self.accept_push(id, n) {
            Ok(()) => self.reply_after_commit(reply),
            Err(r) => {
                let _ = reply.send(Err(Error::NotificationRejected(r)));
            }
        }
    }

    /// Drops stale and duplicate pushes; records the sequence of the others and hands them to
    /// the adapter.
    fn accept_push(
        &mut self,
        id: ExecutionId,
        n: Notification,
    ) -> Result<(), NotificationRejection> {
        let Some(rec) = self.live.get(&id) else {
            return Err(NotificationRejection::UnknownExecution);
        };
        if n.sequence.is_some_and(|s| s <= rec.last_sequence)
            || n.message_id
                .as_ref()
                .is_some_and(|m| rec.seen_messages.contains(m))
        {
            return Err(NotificationRejection::Stale);
        }
        if n.sequence
            .is_some_and(|s| s - rec.last_sequence > crate::MAX_SEQUENCE_JUMP)
        {
            return Err(NotificationRejection::SequenceJump);
        }
        // Recorded in memory at once (a later stale or duplicate push is refused from now on)
        // but not written on its own: it is persisted with the transition the push causes, in
        // the same commit. A push that changes nothing costs no write; if the engine dies
        // before its next write, a replayed copy is handled again, which cannot regress a
        // state (terminal states never change, and states only move forward).
        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
            if let Some(s) = n.sequence {
                rec.last_sequence = s;
            }
            if let Some(m) = &n.message_id {
                rec.seen_messages.push(m.clone());
                if rec.seen_messages.len() > 32 {
                    rec.seen_messages.remove(0);
                }
            }
        }
        self.effects.push(Effect::Notification(id, n));
        Ok(())
    }

    // ----- adapter results --------------------------------------------------------------

    fn on_done(&mut self, d: Done) {
        match d {
            Done::Run(id, r) => self.on_run_done(id, r),
            Done::Status(id, r, who) => {
                if let Some(b) = self.busy.get_mut(&id) {
                    b.poll = false;
                }
                self.on_status(id, r, who);
            }
            Done::Cancel(id, r) => self.on_cancel_done(id, r),
            Done::Notification(id, r) => match r {
                Ok(Some(st)) => self.apply_status(id, st, Who::Notification),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(execution = %id, error = %e, "adapter could not handle a notification")
                }
            },
            Done::Deferred(did, exec, r) => match r {
                Ok(ns) => {
                    self.deferred.remove(&did);
                    self.extra_writes.push(Write::DeleteDeferred { id: did });
                    for n in ns {
                        if self.live.contains_key(&exec) {
                            self.effects.push(Effect::Notification(exec, n));
                        }
                    }
                }
                Err(e) if e.is_transient() => {
                    let at = self.clock.after(backoff(&self.settings, 1));
                    self.arm(TimerKey::Deferred(did), Some(at));
                }
                Err(e) => {
                    tracing::warn!(execution = %exec, error = %e, "deferred work failed permanently; dropped");
                    self.deferred.remove(&did);
                    self.extra_writes.push(Write::DeleteDeferred { id: did });
                }
            },
        }
    }

    fn on_run_done(&mut self, id: ExecutionId, r: Result<Launch>) {
        if let Some(b) = self.busy.get_mut(&id) {
            b.run = false;
        }
        let Some(state) = self.live.get(&id).map(|r| r.state) else {
            return;
        };
        if state.is_terminal() {
            return;
        }
        let now = self.now();
        match r {
            Ok(launch) => {
                let token = launch.token.clone();
                let interval = launch.poll_interval;
                if let Some(rec) = self.mark(id) {
                    rec.token = Some(launch.token);
                    rec.handle = launch.handle;
                    rec.poll_interval = interval;
                    rec.transient_errors = 0;
                    rec.retry_at = None;
                }
                for n in self.held.remove(&id).unwrap_or_default() {
                    if let Err(r) = self.accept_push(id, n) {
                        tracing::debug!(execution = %id, reason = %r, "held push dropped");
                    }
                }
                if let Some(t0) = self.dispatch_started.remove(&id) {
                    metrics::histogram!("distributor_dispatch_seconds")
                        .record(t0.elapsed().as_secs_f64());
                }
                self.emit(Event::Dispatched {
                    id,
                    token: token.clone(),
                });
                match state {
                    State::Dispatching => {
                        self.transition(
                            id,
                            State::Pending,
                            Who::Adapter,
                            format!("launched as {token}"),
                        );
                        let iv = self.poll_interval(id);
                        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
                            rec.next_poll = Some(now.plus(iv));
                        }
                    }
                    State::Cancelling => self.send_cancel_or_finish(id),
                    _ => {}
                }
            }
            Err(e) if state == State::Cancelling => {
                self.end_by_cause(
                    id,
                    &format!(" before the work was launched (run: {e})"),
                    Who::Adapter,
                );
            }
            Err(e) if e.is_transient() => {
                let n = self.live.get(&id).map_or(0, |r| r.transient_errors) + 1;
                if n > self.settings.max_transient_run_errors {
                    self.finish(
                        id,
                        Outcome::abnormal(
                            AbnormalKind::Rejected,
                            format!("gave up after {} transient run errors; last: {e}", n - 1),
                        ),
                        Who::Adapter,
                    );
                } else {
                    let delay = backoff(&self.settings, n - 1);
                    if let Some(rec) = self.mark(id) {
                        rec.transient_errors = n;
                        rec.retry_at = Some(now.plus(delay));
                    }
                    self.note(
                        id,
                        Who::Adapter,
                        format!("run failed transiently ({n}): {e}; retrying in {delay:.1?}"),
                    );
                }
            }
            Err(e) => self.finish(
                id,
                Outcome::abnormal(AbnormalKind::Rejected, e.to_string()),
                Who::Adapter,
            ),
        }
        self.rearm(id);
    }

    fn on_status(&mut self, id: ExecutionId, r: Result<Status>, who: Who) {
        let Some(state) = self.live.get(&id).map(|r| r.state) else {
            return;
        };
        if state.is_terminal() {
            return;
        }
        match r {
            Ok(st) => self.apply_status(id, st, who),
            Err(e) if e.is_transient() => {
                let now = self.now();
                let iv = self.poll_interval(id);
                let settings = self.settings.clone();
                if let Some(rec) = self.mark(id) {
                    rec.transient_errors += 1;
                    rec.next_poll =
                        Some(now.plus(backoff(&settings, rec.transient_errors).min(iv)));
                }
                tracing::debug!(execution = %id, error = %e, "status failed transiently");
                self.rearm(id);
            }
            Err(e) => {
                let outcome = match self.live.get(&id).and_then(|r| r.cancel.clone()) {
                    Some(c) => {
                        Outcome::abnormal(c.kind(), format!("{}; status failed: {e}", c.describe()))
                    }
                    None => Outcome::abnormal(AbnormalKind::Crashed, format!("status failed: {e}")),
                };
                self.finish(id, outcome, who);
            }
        }
    }

    fn apply_status(&mut self, id: ExecutionId, st: Status, who: Who) {
        let Some(rec) = self.live.get(&id) else {
            return;
        };
        let state = rec.state;
        if state.is_terminal() {
            return;
        }
        let now = self.now();
        match st {
            Status::Pending => {}
            Status::Running => {
                if matches!(state, State::Dispatching | State::Pending) {
                    let run = rec.task.timeouts.run;
                    self.transition(id, State::Running, who, "running");
                    if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
                        rec.deadlines.finish_by = run.map(|d| now.plus(d));
                        rec.transient_errors = 0;
                    }
                    self.emit(Event::Started { id });
                }
            }
            Status::Finished(outcome) => {
                let outcome = match (&rec.cancel, state, outcome) {
                    (_, _, o @ Outcome::Succeeded { .. }) => o,
                    (Some(c), State::Cancelling, Outcome::Abnormal { reason, .. }) => {
                        Outcome::abnormal(c.kind(), format!("{}; backend: {reason}", c.describe()))
                    }
                    (_, _, o) => o,
                };
                self.finish(id, outcome, who);
                return;
            }
        }
        let iv = self.poll_interval(id);
        if let Some(rec) = self
            .live
            .get_mut(&id)
            .filter(|r| r.token.is_some())
            .map(Arc::make_mut)
        {
            rec.next_poll = Some(now.plus(iv));
        }
        self.rearm(id);
    }

    fn on_cancel_done(&mut self, id: ExecutionId, r: Result<()>) {
        if let Some(b) = self.busy.get_mut(&id) {
            b.cancel = false;
        }
        if self
            .live
            .get(&id)
            .is_none_or(|r| r.state != State::Cancelling)
        {
            return;
        }
        let now = self.now();
        match r {
            Ok(()) => {
                if let Some(rec) = self.mark(id) {
                    rec.cancel_sent = true;
                    rec.retry_at = None;
                }
            }
            Err(e) if e.is_transient() => {
                let settings = self.settings.clone();
                if let Some(rec) = self.mark(id) {
                    rec.transient_errors += 1;
                    rec.retry_at = Some(now.plus(backoff(&settings, rec.transient_errors)));
                }
                self.note(id, Who::Adapter, format!("cancel failed transiently: {e}"));
            }
            Err(e) => {
                if let Some(rec) = self.mark(id) {
                    rec.retry_at = None;
                }
                self.note(
                    id,
                    Who::Adapter,
                    format!("cancel refused: {e}; waiting for the stop deadline"),
                );
            }
        }
        self.rearm(id);
    }

    // ----- decisions --------------------------------------------------------------------

    fn begin_cancel(&mut self, id: ExecutionId, cause: CancelCause) {
        let Some(rec) = self.live.get(&id) else {
            return;
        };
        let state = rec.state;
        let stop = rec
            .task
            .timeouts
            .stop
            .unwrap_or(self.settings.default_stop_timeout);
        let has_token = rec.token.is_some();
        let run_in_flight = self.busy_of(id).run;
        self.emit(Event::CancelRequested {
            id,
            cause: cause.clone(),
        });
        metrics::counter!("distributor_cancel_requested_total").increment(1);
        match state {
            State::Queued => {
                self.finish(
                    id,
                    Outcome::abnormal(
                        cause.kind(),
                        format!("{} before dispatch", cause.describe()),
                    ),
                    Who::Engine,
                );
                return;
            }
            State::Dispatching if !run_in_flight && !has_token => {
                self.finish(
                    id,
                    Outcome::abnormal(
                        cause.kind(),
                        format!("{} before the work was launched", cause.describe()),
                    ),
                    Who::Engine,
                );
                return;
            }
            _ => {}
        }
        let now = self.now();
        let why = cause.describe();
        if !self.transition(id, State::Cancelling, Who::User, why) {
            return;
        }
        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
            rec.cancel = Some(cause);
            rec.cancel_by = Some(now.plus(stop));
            rec.stop_polls = 0;
            rec.transient_errors = 0;
            rec.retry_at = None;
            rec.next_poll = Some(now.plus(self.settings.cancel_poll_interval));
        }
        if has_token {
            self.send_cancel_or_finish(id);
        }
        self.rearm(id);
    }

    /// Ends a cancelling execution as its cancel cause decides (`Cancelled`, `Expired` or
    /// `TimedOut`), the cause's words followed by `note`.
    fn end_by_cause(&mut self, id: ExecutionId, note: &str, who: Who) {
        let cause = self.live.get(&id).and_then(|r| r.cancel.clone());
        let kind = cause
            .as_ref()
            .map_or(AbnormalKind::Cancelled, CancelCause::kind);
        let why = cause.map(|c| c.describe()).unwrap_or_default();
        self.finish(id, Outcome::abnormal(kind, format!("{why}{note}")), who);
    }

    /// Calls the adapter's cancel, or records the end at once for adapters that cannot cancel.
    fn send_cancel_or_finish(&mut self, id: ExecutionId) {
        let can_cancel = self
            .instance(id)
            .is_some_and(|i| i.distributor().capabilities().cancel);
        if can_cancel {
            self.spawn_cancel(id);
        } else {
            let note = "; this distributor cannot cancel, so the work may still be running";
            self.end_by_cause(id, note, Who::Engine);
        }
    }

    fn finish(&mut self, id: ExecutionId, outcome: Outcome, who: Who) {
        let to = State::of_outcome(&outcome);
        let reason = match &outcome {
            Outcome::Succeeded { .. } => "succeeded".to_owned(),
            Outcome::Abnormal { reason, .. } => reason.clone(),
        };
        if !self.transition(id, to, who, reason) {
            return;
        }
        metrics::counter!("distributor_finished_total", "state" => to.as_str()).increment(1);
        self.finished.push(id);
        let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) else {
            return;
        };
        rec.outcome = Some(outcome.clone());
        rec.next_poll = None;
        rec.retry_at = None;
        // A new attempt, if the task's budget allows (decided before cloning anything).
        let retry_kind = outcome.abnormal_kind().filter(|k| {
            let mut kinds = rec.earlier_kinds.clone();
            kinds.push(*k);
            rec.task.retry.allows(*k, rec.attempt, &kinds)
        });
        self.emit(Event::Finished {
            id,
            state: to,
            outcome: outcome.clone(),
        });
        self.effects.push(Effect::Waiters(id));
        self.arm(TimerKey::Exec(id), None);
        let Some(k) = retry_kind else { return };
        let Some(rec) = self.live.get(&id) else {
            return;
        };
        let (task, attempt, mut kinds) = (rec.task.clone(), rec.attempt, rec.earlier_kinds.clone());
        kinds.push(k);
        let task_id = rec.task_id;
        let snapshot = (
            rec.distributor.clone(),
            rec.kind.clone(),
            rec.config.clone(),
            rec.config_hash.clone(),
        );
        let next = self.alloc_id(Some(id));
        let now = self.now();
        let delay = task.retry.delay;
        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
            rec.retried_by = Some(next);
        }
        let mut new =
            ExecutionRecord::queued(next, task_id, Attempt(attempt.0 + 1), task, snapshot, now);
        new.previous = Some(outcome);
        new.retry_at = delay.map(|d| now.plus(d));
        new.earlier_kinds = kinds;
        self.insert(new, Who::Engine, &format!("retry of {id} ({k})"));
        self.emit(Event::Retried { id, next });
        if delay.is_none() {
            self.dispatch(next);
        } else {
            self.rearm(next);
        }
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        let mut due = Vec::new();
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.wake_of.remove(&key);
            due.push(key);
        }
        for key in due {
            match key {
                TimerKey::Exec(id) => self.on_wake(id, now),
                TimerKey::Deferred(did) => {
                    if self.deferred.contains_key(&did) {
                        self.effects.push(Effect::Deferred(did));
                    }
                }
            }
        }
    }

    fn on_wake(&mut self, id: ExecutionId, now: Timestamp) {
        let Some(rec) = self.live.get(&id) else {
            return;
        };
        let passed = |t: Option<Timestamp>| t.is_some_and(|t| t <= now);
        let busy = self.busy_of(id);
        match rec.state {
            State::Queued => {
                if rec.retry_at.is_none_or(|t| t <= now) {
                    self.dispatch(id);
                }
            }
            State::Dispatching => {
                if passed(rec.deadlines.start_by) {
                    self.begin_cancel(id, CancelCause::StartTimeout);
                } else if passed(rec.retry_at) && !busy.run {
                    if let Some(rec) = self.mark(id) {
                        rec.retry_at = None;
                    }
                    self.spawn_run(id);
                }
            }
            State::Pending => {
                if passed(rec.deadlines.start_by) {
                    self.begin_cancel(id, CancelCause::StartTimeout);
                } else if passed(rec.next_poll) {
                    self.start_poll(id, Who::Timer);
                }
            }
            State::Running => {
                if passed(rec.deadlines.finish_by) {
                    self.begin_cancel(id, CancelCause::RunTimeout);
                } else if passed(rec.next_poll) {
                    self.start_poll(id, Who::Timer);
                }
            }
            State::Cancelling => {
                if passed(rec.cancel_by) {
                    if rec.stop_polls < self.settings.stop_polls && rec.token.is_some() {
                        let iv = self.settings.stop_poll_interval;
                        if let Some(rec) = self.mark(id) {
                            rec.stop_polls += 1;
                            rec.cancel_by = Some(now.plus(iv));
                        }
                        self.start_poll(id, Who::Timer);
                    } else {
                        let stop = rec
                            .task
                            .timeouts
                            .stop
                            .unwrap_or(self.settings.default_stop_timeout);
                        let polls = rec.stop_polls;
                        let note = format!(
                            "; the work was not confirmed stopped within {stop:?} and {polls} more polls"
                        );
                        self.end_by_cause(id, &note, Who::Timer);
                        return;
                    }
                } else {
                    if passed(rec.retry_at)
                        && !rec.cancel_sent
                        && !busy.cancel
                        && rec.token.is_some()
                    {
                        if let Some(rec) = self.mark(id) {
                            rec.retry_at = None;
                        }
                        self.spawn_cancel(id);
                    }
                    if self.live.get(&id).is_some_and(|r| passed(r.next_poll)) {
                        self.start_poll(id, Who::Timer);
                    }
                }
            }
            State::Succeeded | State::Abnormal(_) => return,
        }
        self.rearm(id);
    }

    fn start_poll(&mut self, id: ExecutionId, who: Who) {
        let iv = self.poll_interval(id);
        let now = self.now();
        if let Some(rec) = self.live.get_mut(&id).map(Arc::make_mut) {
            rec.next_poll = Some(now.plus(iv));
        }
        let b = self.busy.entry(id).or_default();
        if b.poll || self.live.get(&id).is_none_or(|r| r.token.is_none()) {
            self.rearm(id);
            return;
        }
        b.poll = true;
        self.effects.push(Effect::Poll(id, who));
        self.rearm(id);
    }

    fn spawn_run(&mut self, id: ExecutionId) {
        // Counted in the batch that precedes the call, so a restart knows a call may have
        // happened and tells the adapter (`TaskDescription::redispatch`).
        if let Some(rec) = self.mark(id) {
            rec.run_calls += 1;
        }
        self.busy.entry(id).or_default().run = true;
        self.effects.push(Effect::Run(id));
    }

    fn spawn_cancel(&mut self, id: ExecutionId) {
        let b = self.busy.entry(id).or_default();
        if b.cancel {
            return;
        }
        b.cancel = true;
        self.effects.push(Effect::Cancel(id));
    }

    // ----- commit and act ---------------------------------------------------------------

    /// Group commit ([`Settings::commit_delay`]): whether to hold this turn's changes for the
    /// next turns instead of flushing them now. Only small batches of changes nobody awaits
    /// (no command's answer, no execution someone `wait`s for) are held, only while batches
    /// follow each other closely and other executions are live (they may change meanwhile),
    /// and never past the delay.
    fn should_hold(&self, now: tokio::time::Instant) -> bool {
        let delay = self.settings.commit_delay;
        if delay.is_zero() || self.hold_until.is_some_and(|t| now >= t) {
            return false;
        }
        let writes = self.dirty_order.len() + self.extra_writes.len();
        if writes == 0 || writes >= SMALL_BATCH || self.live.len() <= 2 * writes {
            return false;
        }
        // A client following a few executions one at a time is slowed by any hold; one that
        // waits for many at once (a batch run) only sees each result up to the delay later.
        let awaited = self.effects.iter().any(|e| matches!(e, Effect::Reply(_)))
            || (!self.waiters.is_empty()
                && self.waiters.len() <= FEW_WAITED
                && self
                    .dirty_order
                    .iter()
                    .any(|id| self.waiters.contains_key(id)));
        !awaited
            && self
                .last_flush
                .is_some_and(|t| now.duration_since(t) < delay * 10)
    }

    /// Flushes, unless [`Self::should_hold`] says to hold the changes a little longer.
    async fn flush_or_hold(&mut self) {
        let now = tokio::time::Instant::now();
        if self.should_hold(now) {
            if self.hold_until.is_none() {
                self.hold_until = Some(now + self.settings.commit_delay);
            }
            return;
        }
        self.flush().await;
    }

    /// Commits what this turn changed. The batch is written by a task of its own while the
    /// actor goes on with the next turn (the store works while the actor computes), but
    /// nothing waiting for the batch (replies, events, adapter calls, waiters) happens before
    /// it is committed, and batches commit one at a time, in order: the previous one is
    /// settled first.
    async fn flush(&mut self) {
        if self.dirty_order.is_empty() && self.extra_writes.is_empty() && self.effects.is_empty() {
            return;
        }
        self.hold_until = None;
        self.last_flush = Some(tokio::time::Instant::now());
        self.settle().await;
        let mut writes = Vec::with_capacity(self.dirty_order.len() + self.extra_writes.len());
        for id in self.dirty_order.drain(..) {
            let (Some(d), Some(rec)) = (self.dirty.remove(&id), self.live.get(&id)) else {
                continue;
            };
            writes.push(if d.inserted {
                Write::Insert {
                    record: Arc::clone(rec),
                    history: d.history,
                }
            } else {
                Write::Update {
                    record: Arc::clone(rec),
                    expected_version: d.base_version,
                    history: d.history,
                }
            });
        }
        writes.append(&mut self.extra_writes);
        let effects = std::mem::take(&mut self.effects);
        let finished = std::mem::take(&mut self.finished);
        if writes.is_empty() {
            self.after_commit(Ok(()), &[], effects, finished).await;
            return;
        }
        let store = self.store.clone();
        let settings = self.settings.clone();
        let committed = self.committed_tx.clone();
        let batch = self.next_batch;
        self.next_batch += 1;
        let write = tokio::spawn(async move {
            let mut attempt = 0;
            let result = loop {
                match store.apply(&writes).await {
                    Ok(()) => break Ok(()),
                    Err(e) if e.is_transient() && attempt < 8 => {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "store write failed; retrying");
                        tokio::time::sleep(backoff(&settings, attempt)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            let _ = committed.send(batch);
            (result, writes)
        });
        self.inflight = Some(InFlight {
            batch,
            write,
            effects,
            finished,
        });
    }

    /// Waits for the batch being committed, if any, then carries out what waited for it.
    async fn settle(&mut self) {
        let Some(f) = self.inflight.take() else {
            return;
        };
        let (result, writes) = match f.write.await {
            Ok(r) => r,
            Err(e) => (
                Err(store_failed(format!("store writer task failed: {e}"))),
                Vec::new(),
            ),
        };
        self.after_commit(result, &writes, f.effects, f.finished)
            .await;
    }

    async fn after_commit(
        &mut self,
        result: Result<()>,
        writes: &[Write],
        effects: Vec<Effect>,
        finished: Vec<ExecutionId>,
    ) {
        match result {
            Ok(()) => self.act(effects),
            Err(e) => {
                let msg = e.to_string();
                for eff in effects {
                    if let Effect::Reply(f) = eff {
                        f(Err(msg.clone()));
                    }
                }
                // Shards whose lease was lost (the write was fenced off): forget them; their
                // new owner has them.
                let lost: Vec<ShardId> = match &self.sharding {
                    Some(sh) => {
                        let held: BTreeSet<ShardId> = sh.shared.held().into_iter().collect();
                        sh.owned.difference(&held).copied().collect()
                    }
                    None => Vec::new(),
                };
                if lost.is_empty() {
                    tracing::error!(error = %e, "store write failed; resynchronising from the store");
                } else {
                    tracing::warn!(error = %e, shards = ?lost, "shards lost to another instance; dropping them");
                    self.drop_shards(&lost);
                }
                self.resync(writes).await;
            }
        }
        // Terminal records leave memory once committed.
        for id in finished {
            if self.live.get(&id).is_some_and(|r| r.state.is_terminal()) {
                if let Some(rec) = self.live.remove(&id) {
                    self.recent.insert(id, rec);
                    self.recent_order.push_back(id);
                    if self.recent_order.len() > RECENT
                        && let Some(old) = self.recent_order.pop_front()
                    {
                        self.recent.remove(&old);
                    }
                }
                self.held.remove(&id);
                self.busy.remove(&id);
                self.dispatch_started.remove(&id);
                self.arm(TimerKey::Exec(id), None);
            }
        }
    }

    async fn resync(&mut self, writes: &[Write]) {
        for w in writes {
            let id = match w {
                Write::Insert { record, .. } | Write::Update { record, .. } => record.id,
                _ => continue,
            };
            if !self.owns(id.0) {
                continue;
            }
            match self.store.get(id).await {
                Ok(Some(rec)) => {
                    self.live.insert(id, Arc::new(rec));
                    self.rearm(id);
                }
                _ => {
                    self.live.remove(&id);
                    self.arm(TimerKey::Exec(id), None);
                }
            }
        }
    }

    fn act(&mut self, effects: Vec<Effect>) {
        let mut polls: HashMap<(DistributorName, ConfigHash), Vec<(Execution, Who)>> =
            HashMap::default();
        for eff in effects {
            match eff {
                Effect::Event(e) => {
                    let _ = self.events.send(e);
                }
                Effect::Reply(f) => f(Ok(())),
                Effect::Waiters(id) => {
                    if let (Some(ws), Some(rec)) = (self.waiters.remove(&id), self.live.get(&id)) {
                        for w in ws {
                            let _ = w.send(Ok(ExecutionRecord::clone(rec)));
                        }
                    }
                }
                Effect::Run(id) => self.call_run(id),
                Effect::Poll(id, who) => {
                    if let Some(rec) = self.live.get(&id) {
                        polls
                            .entry((rec.distributor.clone(), rec.config_hash.clone()))
                            .or_default()
                            .push((rec.execution(), who));
                    }
                }
                Effect::Recover(id) => self.call(id, |d, e, id| async move {
                    Done::Status(id, d.recover(&e).await, Who::Recovery)
                }),
                Effect::Cancel(id) => self.call(id, |d, e, id| async move {
                    Done::Cancel(id, d.cancel(&e).await)
                }),
                Effect::Notification(id, n) => self.call(id, move |d, e, id| async move {
                    Done::Notification(id, d.handle_notification(&e, &n).await)
                }),
                Effect::Deferred(did) => {
                    let Some((name, work)) = self.deferred.get(&did).cloned() else {
                        continue;
                    };
                    let inst = self
                        .snapshots
                        .iter()
                        .find(|((n, _), _)| *n == name)
                        .map(|(_, i)| i.clone());
                    match inst {
                        Some(inst) => {
                            let span = tracing::debug_span!("deferred", distributor = %name);
                            self.start(
                                async move {
                                    let r = inst.distributor().handle_deferred(&work).await;
                                    vec![Done::Deferred(did, work.execution_id, r)]
                                },
                                span,
                            );
                        }
                        None => {
                            tracing::warn!(distributor = %name, "deferred work for an unknown distributor")
                        }
                    }
                }
            }
        }
        for ((name, hash), batch) in polls {
            let Some(inst) = self.snapshots.get(&(name, hash)).cloned() else {
                continue;
            };
            let span = tracing::debug_span!("poll", distributor = %inst.name(), n = batch.len());
            self.start(
                async move {
                    let d = inst.distributor();
                    if batch.len() > 1 && d.capabilities().batch_status {
                        let execs: Vec<Execution> = batch.iter().map(|(e, _)| e.clone()).collect();
                        let mut results = d.status_batch(&execs).await.into_iter();
                        batch
                            .into_iter()
                            .map(|(e, who)| {
                                let r = results.next().unwrap_or_else(|| {
                                    Err(Error::permanent("status_batch returned too few results"))
                                });
                                Done::Status(e.id, r, who)
                            })
                            .collect()
                    } else {
                        let calls = batch.into_iter().map(|(e, who)| {
                            let d = d.clone();
                            async move { Done::Status(e.id, d.status(&e).await, who) }
                        });
                        futures::future::join_all(calls).await
                    }
                },
                span,
            );
        }
    }

    fn span(rec: &ExecutionRecord) -> tracing::Span {
        tracing::info_span!("execution", id = %rec.id, distributor = %rec.distributor, kind = %rec.kind, attempt = rec.attempt.0)
    }

    /// Starts an adapter call. The call is polled once right here: an adapter that answers
    /// without waiting (an in-process backend, a cached status) is handled in this actor turn,
    /// with no task spawned and no thread woken. A call that has to wait is moved to its own
    /// task, and its result comes back through the done channel.
    fn start<Fut>(&mut self, fut: Fut, span: tracing::Span)
    where
        Fut: std::future::Future<Output = Vec<Done>> + Send + 'static,
    {
        match poll_once(fut.instrument(span)) {
            Ok(done) => self.ready.extend(done),
            Err(fut) => {
                let tx = self.done_tx.clone();
                tokio::spawn(async move {
                    for d in fut.await {
                        let _ = tx.send(d);
                    }
                });
            }
        }
    }

    fn call<F, Fut>(&mut self, id: ExecutionId, f: F)
    where
        F: FnOnce(Arc<dyn crate::Distributor>, Execution, ExecutionId) -> Fut,
        Fut: std::future::Future<Output = Done> + Send + 'static,
    {
        let (Some(rec), Some(inst)) = (self.live.get(&id), self.instance(id)) else {
            return;
        };
        let fut = f(inst.distributor().clone(), rec.execution(), id);
        let span = Self::span(rec);
        self.start(async move { vec![fut.await] }, span);
    }

    fn call_run(&mut self, id: ExecutionId) {
        let (Some(rec), Some(inst)) = (self.live.get(&id), self.instance(id)) else {
            if self.live.contains_key(&id) {
                tracing::error!(execution = %id, "no distributor instance for a dispatch");
            }
            return;
        };
        let expiry = self.now().plus(self.settings.token_ttl);
        let desc = TaskDescription {
            execution_id: id,
            task_id: rec.task_id,
            attempt: rec.attempt,
            request_id: rec.request_id.clone(),
            redispatch: rec.run_calls > 1,
            distributor: rec.distributor.clone(),
            payload: rec.task.payload.to_value(),
            previous: rec.previous.clone(),
            notify: NotificationRoute {
                target: self.notify_target.clone(),
                auth_token: self.auth.sign(id, expiry),
            },
            timeouts: rec.task.timeouts,
            labels: rec.task.labels.clone(),
        };
        let d = inst.distributor().clone();
        let span = Self::span(rec);
        self.start(async move { vec![Done::Run(id, d.run(&desc).await)] }, span);
    }
}

/// Polls `fut` once: its output if it finished without waiting, else the pinned future, to be
/// spawned (its first poll in the task registers the task's waker in place of the no-op one).
fn poll_once<F: std::future::Future>(
    fut: F,
) -> std::result::Result<F::Output, std::pin::Pin<Box<F>>> {
    let mut fut = Box::pin(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => Err(fut),
    }
}

fn store_failed(msg: String) -> Error {
    Error::Store {
        message: msg,
        transient: true,
        source: None,
    }
}
