//! Durable storage of execution records, their history, and engine metadata.
//!
//! The engine is the only writer of a store it uses. It applies changes in batches
//! ([`Store::apply`]): everything in a batch commits together or not at all (group commit, so a
//! burst of transitions costs one fsync), and every record update is a compare-and-set on the
//! record's version. Implementations: [`MemoryStore`] (tests, benchmarks) and [`SqliteStore`] (the
//! embedded default). Both pass one test suite (`store::suite`, feature `testing`).

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::engine::{ExecutionRecord, HistoryEntry, State};
use crate::error::Result;
use crate::types::{DeferredWork, DistributorName, ExecutionId, Labels, TaskId};

mod memory;
mod sqlite;
#[cfg(any(test, feature = "testing"))]
pub mod suite;

pub use memory::MemoryStore;
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
}
