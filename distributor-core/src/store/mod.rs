//! Durable storage of execution records, their history, and engine metadata.
//!
//! The engine is the only writer of a store it uses. It applies changes in batches
//! ([`Store::apply`]): everything in a batch commits together or not at all (group commit, so a
//! burst of transitions costs one fsync), and every record update is a compare-and-set on the
//! record's version. Implementations: [`MemoryStore`] (tests, benchmarks), [`SqliteStore`] (the
//! embedded default) and, with feature `postgres`, [`PostgresStore`] (several engine instances on
//! one database). All pass one test suite (`store::suite`, feature `testing`).
//!
//! # Shared stores
//!
//! A store that several engine instances use at once answers [`Store::shared`] with its
//! [`SharedStore`] handle. Executions are then split into a fixed number of shards (execution id
//! modulo the shard count); each live instance owns a set of shards through a lease with an
//! expiry and an epoch (a fencing token), and the store refuses ([`Error::Fenced`]) every write
//! of an execution whose shard this handle does not hold at the epoch it acquired, checked
//! inside the write's own transaction. Stores with one writer (memory, SQLite) return `None`:
//! their engine owns everything, forever.
//!
//! [`Error::Fenced`]: crate::Error::Fenced

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::engine::{ExecutionRecord, HistoryEntry, State};
use crate::error::Result;
use crate::types::{DeferredWork, DistributorName, ExecutionId, Labels, TaskId};

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod suite;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteStore, Synchronous};

/// One change in a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A new record with its history rows.
    Insert {
        /// The record.
        record: Arc<ExecutionRecord>,
        /// Its history rows.
        history: Vec<HistoryEntry>,
    },
    /// A changed record. Fails the whole batch with [`Error::Conflict`](crate::Error::Conflict) if
    /// the stored version is not `expected_version`.
    Update {
        /// The record, version already bumped.
        record: Arc<ExecutionRecord>,
        /// The version the writer read.
        expected_version: u64,
        /// History rows of the transitions since then.
        history: Vec<HistoryEntry>,
    },
    /// Sets a metadata value.
    Meta {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Adds deferred work for a distributor instance.
    PutDeferred {
        /// Its id (engine-assigned).
        id: u64,
        /// The instance.
        distributor: DistributorName,
        /// The work.
        work: DeferredWork,
    },
    /// Removes handled deferred work.
    DeleteDeferred {
        /// Its id.
        id: u64,
    },
}

/// One record write of a batch, as the stores' SQL builders see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordWrite<'a> {
    /// The record as it is after the write.
    pub record: &'a Arc<ExecutionRecord>,
    /// The version the writer read (`None` for an insert).
    pub expected: Option<u64>,
    /// Its history rows.
    pub history: &'a [HistoryEntry],
}

/// Cuts a batch into segments in which every record appears once (in batch order; a record
/// written twice starts a new segment), and the other writes. There is always at least one
/// segment, possibly empty. Shared by the SQL stores, which write a segment's records as
/// multi-row statements.
pub(crate) fn record_segments(batch: &[Write]) -> (Vec<Vec<RecordWrite<'_>>>, Vec<&Write>) {
    let mut segments = Vec::new();
    let mut seg = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut others = Vec::new();
    for w in batch {
        let write = match w {
            Write::Insert { record, history } => RecordWrite {
                record,
                expected: None,
                history,
            },
            Write::Update {
                record,
                expected_version,
                history,
            } => RecordWrite {
                record,
                expected: Some(*expected_version),
                history,
            },
            other => {
                others.push(other);
                continue;
            }
        };
        if !ids.insert(write.record.id) {
            segments.push(std::mem::take(&mut seg));
            ids.clear();
            ids.insert(write.record.id);
        }
        seg.push(write);
    }
    segments.push(seg);
    (segments, others)
}

/// Which records [`Store::list`] returns. All set fields must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Any of these states.
    #[serde(default)]
    pub states: Vec<State>,
    /// This distributor instance.
    #[serde(default)]
    pub distributor: Option<DistributorName>,
    /// Every one of these labels.
    #[serde(default)]
    pub labels: Labels,
    /// This task.
    #[serde(default)]
    pub task_id: Option<TaskId>,
    /// Only ids greater than this (pagination).
    #[serde(default)]
    pub after: Option<ExecutionId>,
    /// At most this many (default 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl ListFilter {
    /// Whether `r` matches (for stores that filter in memory).
    pub fn matches(&self, r: &ExecutionRecord) -> bool {
        (self.states.is_empty() || self.states.contains(&r.state))
            && self
                .distributor
                .as_ref()
                .is_none_or(|d| *d == r.distributor)
            && self.task_id.is_none_or(|t| t == r.task_id)
            && self.after.is_none_or(|a| r.id > a)
            && self
                .labels
                .iter()
                .all(|(k, v)| r.task.labels.get(k) == Some(v))
    }
    /// The effective limit.
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(1000)
    }
}

/// Storage for the engine. See the module docs for the batch and compare-and-set contract.
#[async_trait]
pub trait Store: Send + Sync + Debug + 'static {
    /// Applies a batch atomically. On a version conflict nothing is applied and
    /// [`Error::Conflict`](crate::Error::Conflict) names the record. I/O failures are
    /// [`Error::Store`](crate::Error::Store), transient when retrying may help.
    async fn apply(&self, batch: &[Write]) -> Result<()>;
    /// One record.
    async fn get(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>>;
    /// Records matching `filter`, by ascending id.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRecord>>;
    /// Every non-terminal record (for recovery).
    async fn live(&self) -> Result<Vec<ExecutionRecord>>;
    /// An execution's history, oldest first.
    async fn history(&self, id: ExecutionId) -> Result<Vec<HistoryEntry>>;
    /// The highest execution id ever stored (0 if none).
    async fn max_id(&self) -> Result<u64>;
    /// A metadata value.
    async fn meta(&self, key: &str) -> Result<Option<String>>;
    /// Every metadata entry whose key starts with `prefix` (byte-wise), as `(key, value)` by
    /// ascending key. An empty prefix lists everything. Embedders keep their own durable
    /// documents under a prefix of their own (workflow runs use `workflow/`); the engine's own
    /// keys (`notify_secret`) have no `/`.
    async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// All pending deferred work: (id, instance, work).
    async fn deferred(&self) -> Result<Vec<(u64, DistributorName, DeferredWork)>>;
    /// Stores `value` under `key` unless a value is already stored, and returns the stored one.
    /// Several engine instances starting at once on a shared store MUST all get the same value
    /// (the notification secret is made this way). The default (read, then write) is right for
    /// stores with one writer.
    async fn meta_init(&self, key: &str, value: &str) -> Result<String> {
        if let Some(v) = self.meta(key).await? {
            return Ok(v);
        }
        self.apply(&[Write::Meta {
            key: key.to_owned(),
            value: value.to_owned(),
        }])
        .await?;
        Ok(value.to_owned())
    }
    /// The membership handle of a store that several engine instances share, or `None` (the
    /// default) for a store with one writer, whose engine owns every execution.
    fn shared(&self) -> Option<Arc<dyn SharedStore>> {
        None
    }
}

/// A shard number, `0..shard_count`.
pub type ShardId = u32;

/// What one round of [`SharedStore::round`] changed in the shards this handle holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRound {
    /// Newly acquired (already held for writes): load and recover their executions.
    pub gained: Vec<ShardId>,
    /// No longer held (the lease was taken over): drop their executions at once.
    pub lost: Vec<ShardId>,
    /// Held beyond this instance's fair share while other instances have too few: commit what
    /// is pending for them, drop them, then [`SharedStore::release`] them.
    pub excess: Vec<ShardId>,
    /// Live instances sharing the store, this one included.
    pub members: usize,
}

/// The durable state of some shards, read when they are acquired.
#[derive(Debug, Clone, Default)]
pub struct ShardLoad {
    /// Their non-terminal executions.
    pub live: Vec<ExecutionRecord>,
    /// Their pending deferred work: (id, instance, work).
    pub deferred: Vec<(u64, DistributorName, DeferredWork)>,
    /// Per shard, an execution id and a deferred-work id at least as high as any stored in it
    /// (0 if none), so that the new owner allocates ids after them.
    pub max_ids: Vec<(ShardId, u64, u64)>,
}

/// A command about an execution, carried to the instance that owns it through the store
/// ([`SharedStore::post`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Routed {
    /// An authenticated push (its `auth_token` already checked and stripped by the instance
    /// that received it).
    Notify {
        /// The push.
        notification: crate::types::Notification,
    },
    /// A cancellation request.
    Cancel {
        /// Why.
        reason: String,
    },
    /// A request for an immediate status poll.
    Poke,
}

/// The membership side of a store several engine instances share. See the module docs.
///
/// One handle belongs to one engine instance; the engine calls [`round`](Self::round) every
/// [`round_interval`](Self::round_interval).
#[async_trait]
pub trait SharedStore: Send + Sync + Debug + 'static {
    /// Number of shards, fixed when the database was created.
    fn shard_count(&self) -> u32;
    /// This instance's id (unique among the instances sharing the store).
    fn instance_id(&self) -> &str;
    /// How often [`round`](Self::round) MUST be called for the leases to stay held.
    fn round_interval(&self) -> std::time::Duration;
    /// The lease lifetime: a lease not renewed for this long may be taken over.
    fn lease_ttl(&self) -> std::time::Duration;
    /// The shards this handle holds now.
    fn held(&self) -> Vec<ShardId>;
    /// Heartbeat: renews this instance's membership and its leases, notices leases lost, and
    /// acquires free or expired shards up to the fair share (shard count divided by live
    /// instances, rounded up). A shard is acquired by bumping its epoch; from then on writes
    /// fenced with an older epoch fail.
    async fn round(&self) -> Result<LeaseRound>;
    /// Gives up shards (after the engine committed and dropped their executions): they are
    /// free for another instance at once. They are no longer held when this returns, even if
    /// the database could not be told (the lease then expires).
    async fn release(&self, shards: &[ShardId]) -> Result<()>;
    /// Gives up every shard and the membership (graceful shutdown).
    async fn leave(&self) -> Result<()>;
    /// The durable state of `shards` (held by this handle).
    async fn load(&self, shards: &[ShardId]) -> Result<ShardLoad>;
    /// Queues a command for the owner of `id`'s shard, durably, and wakes it.
    async fn post(&self, id: ExecutionId, cmd: &Routed) -> Result<()>;
    /// Queued commands for `shards`, oldest first: (queue id, execution, command). They stay
    /// queued until [`ack`](Self::ack)ed, so a command whose owner dies before applying it is
    /// applied by the next owner (commands are idempotent: pushes are de-duplicated by
    /// sequence, cancelling twice is a no-op).
    async fn inbox(&self, shards: &[ShardId]) -> Result<Vec<(i64, ExecutionId, Routed)>>;
    /// Removes applied commands from the queue.
    async fn ack(&self, ids: &[i64]) -> Result<()>;
    /// Waits until a command may have been queued for this instance, or the membership
    /// changed (an instance joined or left), or `timeout`. Returns true for a membership change:
    /// the caller SHOULD run a [`round`](Self::round) now rather than at its next interval. A
    /// wake-up MAY be missed (the connection that receives them was lost): callers MUST also
    /// look at the [`inbox`](Self::inbox) every so often, and rounds still run on their interval.
    async fn wakeup(&self, timeout: std::time::Duration) -> bool;
}
