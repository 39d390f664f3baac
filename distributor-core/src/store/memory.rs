//! An in-memory store, for tests and benchmarks. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ListFilter, Store, Write};
use crate::engine::{ExecutionRecord, HistoryEntry};
use crate::error::{Error, Result};
use crate::types::{DeferredWork, DistributorName, ExecutionId};

#[derive(Debug, Default)]
struct Inner {
    records: BTreeMap<ExecutionId, Arc<ExecutionRecord>>,
    history: HashMap<ExecutionId, Vec<HistoryEntry>>,
    meta: BTreeMap<String, String>,
    deferred: BTreeMap<u64, (DistributorName, DeferredWork)>,
    keep_history: bool,
}

/// A store in a `Mutex<BTreeMap>`. Same contract as every store; nothing is durable.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                keep_history: true,
                ..Inner::default()
            }),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that drops history rows (for benchmarks measuring the engine alone).
    pub fn without_history() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn apply(&self, batch: &[Write]) -> Result<()> {
        let mut g = self.lock();
        // Check every compare-and-set first, so a conflict applies nothing.
        let mut versions: HashMap<ExecutionId, u64> = HashMap::new();
        for w in batch {
            match w {
                Write::Insert { record, .. } => {
                    if g.records.contains_key(&record.id) || versions.contains_key(&record.id) {
                        return Err(Error::Conflict(record.id));
                    }
                    versions.insert(record.id, record.version);
                }
                Write::Update {
                    record,
                    expected_version,
                    ..
                } => {
                    let current = versions
                        .get(&record.id)
                        .copied()
                        .or_else(|| g.records.get(&record.id).map(|r| r.version));
                    if current != Some(*expected_version) {
                        return Err(Error::Conflict(record.id));
                    }
                    versions.insert(record.id, record.version);
                }
                _ => {}
            }
        }
        for w in batch {
            match w {
                Write::Insert { record, history }
                | Write::Update {
                    record, history, ..
                } => {
                    g.records.insert(record.id, Arc::clone(record));
                    if g.keep_history && !history.is_empty() {
                        g.history
                            .entry(record.id)
                            .or_default()
                            .extend(history.iter().cloned());
                    }
                }
                Write::Meta { key, value } => {
                    g.meta.insert(key.clone(), value.clone());
                }
                Write::PutDeferred {
                    id,
                    distributor,
                    work,
                } => {
                    g.deferred.insert(*id, (distributor.clone(), work.clone()));
                }
                Write::DeleteDeferred { id } => {
                    g.deferred.remove(id);
                }
            }
        }
        Ok(())
    }

    async fn get(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>> {
        Ok(self
            .lock()
            .records
            .get(&id)
            .map(|r| ExecutionRecord::clone(r)))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRecord>> {
        let g = self.lock();
        Ok(g.records
            .values()
            .filter(|r| filter.matches(r))
            .take(filter.limit())
            .map(|r| ExecutionRecord::clone(r))
            .collect())
    }

    async fn live(&self) -> Result<Vec<ExecutionRecord>> {
        Ok(self
            .lock()
            .records
            .values()
            .filter(|r| !r.state.is_terminal())
            .map(|r| ExecutionRecord::clone(r))
            .collect())
    }

    async fn history(&self, id: ExecutionId) -> Result<Vec<HistoryEntry>> {
        Ok(self.lock().history.get(&id).cloned().unwrap_or_default())
    }

    async fn max_id(&self) -> Result<u64> {
        Ok(self.lock().records.keys().next_back().map_or(0, |id| id.0))
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self.lock().meta.get(key).cloned())
    }

    async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .lock()
            .meta
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn deferred(&self) -> Result<Vec<(u64, DistributorName, DeferredWork)>> {
        Ok(self
            .lock()
            .deferred
            .iter()
            .map(|(id, (d, w))| (*id, d.clone(), w.clone()))
            .collect())
    }
}
