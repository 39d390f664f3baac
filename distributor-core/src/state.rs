//! Durable state of one distributor instance: small named values kept in the engine's store.
//!
//! Most adapters keep their per-execution state in the [`AdapterHandle`](crate::AdapterHandle)
//! the engine persists with each execution. Some need state of the *instance*, set at runtime and
//! surviving restarts (a cutover time set by an operator, a migration watermark). [`InstanceState`] is that:
//! a handle in the [`BuildContext`](crate::BuildContext) that reads and writes metadata values in
//! the engine's [`Store`] under the key `distributor/<instance name>/<key>`
//! ([`Write::Meta`] and [`Store::meta`], so every store supports it without a new method).
//!
//! # Contract
//!
//! - [`put`](InstanceState::put) returns `Ok` only once the value is durable (committed by the
//!   store); a later [`get`](InstanceState::get) on any instance built with the same name over
//!   the same store (after a restart, a reload, a config-snapshot rebuild) returns it.
//! - Values are strings (use [`put_json`](InstanceState::put_json) for structured ones). There
//!   is no delete: write a value that means "none" (for example JSON `null`).
//! - Writes go to the store directly, outside the engine's batches: they are not ordered with
//!   execution transitions and there is no compare-and-set. An adapter that needs a
//!   read-modify-write to be atomic serialises it itself (one instance per process holds a
//!   lock); several engine processes sharing one store MUST NOT write the same key concurrently.
//! - Keep values small (metadata rows, read whole): bound any list kept in them.
//! - Outside an engine ([`InstanceState::in_memory`], used by
//!   [`BuildContext::detached`](crate::BuildContext::detached)) values live in memory and are
//!   shared by the clones of the handle only.
//!
//! Errors are the store's ([`Error::Store`], transient when retrying may help); a value that
//! does not parse in [`get_json`](InstanceState::get_json) is a permanent `Error::Store`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::store::{Store, Write};

/// A handle to one distributor instance's durable values. Cheap to clone; clones share the
/// values. See the [module docs](self) for the contract.
#[derive(Clone)]
pub struct InstanceState {
    prefix: String,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<Mutex<BTreeMap<String, String>>>),
    Store(Arc<dyn Store>),
}

impl fmt::Debug for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match &self.backend {
            Backend::Memory(_) => "memory",
            Backend::Store(_) => "store",
        };
        f.debug_struct("InstanceState")
            .field("prefix", &self.prefix)
            .field("backend", &backend)
            .finish()
    }
}

impl InstanceState {
    /// The state of instance `name` in `store` (the engine's side).
    pub fn in_store(store: Arc<dyn Store>, name: &str) -> Self {
        Self {
            prefix: format!("distributor/{name}/"),
            backend: Backend::Store(store),
        }
    }

    /// State of instance `name` kept in memory (outside an engine: tests, tools). Nothing
    /// survives the last clone.
    pub fn in_memory(name: &str) -> Self {
        Self {
            prefix: format!("distributor/{name}/"),
            backend: Backend::Memory(Arc::default()),
        }
    }

    /// A handle to the values under `<this prefix><scope>/`: for an instance an adapter builds
    /// inside itself (the two sides of a migration), so their keys cannot collide with its own.
    pub fn scoped(&self, scope: &str) -> Self {
        Self {
            prefix: format!("{}{scope}/", self.prefix),
            backend: self.backend.clone(),
        }
    }

    /// The full store key of `key`: `distributor/<name>/[<scope>/…]<key>`.
    pub fn store_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value of `key`, if one was ever written.
    pub async fn get(&self, key: &str) -> Result<Option<String>> {
        let full = self.store_key(key);
        match &self.backend {
            Backend::Memory(m) => Ok(lock(m).get(&full).cloned()),
            Backend::Store(s) => s.meta(&full).await,
        }
    }

    /// Writes `value` under `key`; `Ok` once it is durable.
    pub async fn put(&self, key: &str, value: impl Into<String>) -> Result<()> {
        let full = self.store_key(key);
        let value = value.into();
        match &self.backend {
            Backend::Memory(m) => {
                lock(m).insert(full, value);
                Ok(())
            }
            Backend::Store(s) => s.apply(&[Write::Meta { key: full, value }]).await,
        }
    }

    /// The value of `key` parsed as JSON into `T`.
    ///
    /// Errors: a permanent [`Error::Store`] if the stored value is not a `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(text) = self.get(key).await? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Store {
                message: format!("corrupt value of `{}`: {e}", self.store_key(key)),
                transient: false,
                source: Some(Box::new(e)),
            })
    }

    /// Writes `value` as JSON under `key`.
    pub async fn put_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let text = serde_json::to_string(value)
            .map_err(|e| Error::permanent_from(format!("cannot encode `{key}`"), e))?;
        self.put(key, text).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn values_are_namespaced_and_survive_a_new_handle_on_the_same_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = InstanceState::in_store(store.clone(), "sw");
        a.put("cutover", "1").await.unwrap();
        a.scoped("before").put("cutover", "2").await.unwrap();
        assert_eq!(
            store
                .meta("distributor/sw/cutover")
                .await
                .unwrap()
                .as_deref(),
            Some("1")
        );
        assert_eq!(
            store
                .meta("distributor/sw/before/cutover")
                .await
                .unwrap()
                .as_deref(),
            Some("2")
        );
        let again = InstanceState::in_store(store.clone(), "sw");
        assert_eq!(again.get("cutover").await.unwrap().as_deref(), Some("1"));
        let other = InstanceState::in_store(store, "other");
        assert_eq!(other.get("cutover").await.unwrap(), None);
    }

    #[tokio::test]
    async fn json_values_round_trip_and_garbage_is_a_permanent_error() {
        let s = InstanceState::in_memory("x");
        s.put_json("v", &vec![1, 2]).await.unwrap();
        assert_eq!(s.get_json::<Vec<u32>>("v").await.unwrap(), Some(vec![1, 2]));
        s.put("v", "{not json").await.unwrap();
        let e = s.get_json::<Vec<u32>>("v").await.unwrap_err();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("distributor/x/v"), "{e}");
        assert_eq!(s.get_json::<u32>("absent").await.unwrap(), None);
    }
}
