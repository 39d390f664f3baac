//! The store test suite: one set of checks every [`Store`] implementation must pass.
//!
//! ```text
//! distributor_core::store::suite::run_all(&MyStore::new()).await;
//! ```

use serde_json::json;

use super::{ListFilter, Store, Write};
use crate::config::ConfigHash;
use crate::engine::{Actor, ExecutionRecord, HistoryEntry, State, Task};
use crate::error::Error;
use crate::types::*;

/// A record in `state` for tests.
pub fn sample_record(id: u64, state: State) -> ExecutionRecord {
    let mut task = Task::new("local", json!({"argv": ["true"]}));
    task.labels.insert(
        "team".into(),
        if id.is_multiple_of(2) {
            "even".into()
        } else {
            "odd".into()
        },
    );
    let snapshot = (
        DistributorName::new("local"),
        KindName::new("local"),
        std::sync::Arc::new(json!({})),
        ConfigHash::of("local", &json!({})),
    );
    let mut r = ExecutionRecord::queued(
        ExecutionId(id),
        TaskId(id),
        Attempt(1),
        std::sync::Arc::new(task),
        snapshot,
        Timestamp(1),
    );
    r.request_id = RequestId::new(format!("req-{id}"));
    r.state = state;
    r
}

fn history(r: &ExecutionRecord, from: Option<State>) -> HistoryEntry {
    HistoryEntry {
        execution_id: r.id,
        version: r.version,
        from,
        to: r.state,
        at: Timestamp(r.version as i64),
        actor: Actor::Engine,
        reason: format!("to {}", r.state),
    }
}

pub(crate) fn insert(r: &ExecutionRecord) -> Write {
    Write::Insert {
        record: std::sync::Arc::new(r.clone()),
        history: vec![history(r, None)],
    }
}

pub(crate) fn advance(r: &mut ExecutionRecord, to: State) -> Write {
    let from = r.state;
    r.state = to;
    r.version += 1;
    Write::Update {
        record: std::sync::Arc::new(r.clone()),
        expected_version: r.version - 1,
        history: vec![history(r, Some(from))],
    }
}

/// Runs every check against `store`, which MUST be empty. Panics with a message on failure.
pub async fn run_all(store: &dyn Store) {
    insert_get_and_history(store).await;
    compare_and_set(store).await;
    batch_is_atomic(store).await;
    list_filters(store).await;
    live_and_max_id(store).await;
    meta_and_deferred(store).await;
    large_batches(store).await;
}

async fn insert_get_and_history(store: &dyn Store) {
    let mut r = sample_record(1, State::Queued);
    store.apply(&[insert(&r)]).await.expect("insert");
    assert_eq!(store.get(ExecutionId(1)).await.unwrap().as_ref(), Some(&r));
    let w = advance(&mut r, State::Dispatching);
    store.apply(&[w]).await.expect("update");
    let h = store.history(ExecutionId(1)).await.unwrap();
    assert_eq!(
        h.iter().map(|h| (h.from, h.to)).collect::<Vec<_>>(),
        [
            (None, State::Queued),
            (Some(State::Queued), State::Dispatching)
        ]
    );
    assert_eq!(store.get(ExecutionId(99)).await.unwrap(), None);
}

async fn compare_and_set(store: &dyn Store) {
    let mut r = sample_record(2, State::Queued);
    store.apply(&[insert(&r)]).await.unwrap();
    let mut stale = r.clone();
    store
        .apply(&[advance(&mut r, State::Dispatching)])
        .await
        .unwrap();
    // A writer that did not see version 2 loses.
    let err = store
        .apply(&[advance(
            &mut stale,
            State::Abnormal(AbnormalKind::Cancelled),
        )])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(ExecutionId(2))), "{err}");
    assert_eq!(
        store.get(ExecutionId(2)).await.unwrap().unwrap().state,
        State::Dispatching
    );
    // Inserting an existing id is a conflict too.
    assert!(matches!(
        store
            .apply(&[insert(&sample_record(2, State::Queued))])
            .await,
        Err(Error::Conflict(_))
    ));
}

async fn batch_is_atomic(store: &dyn Store) {
    let mut a = sample_record(3, State::Queued);
    let b = sample_record(4, State::Queued);
    store.apply(&[insert(&a)]).await.unwrap();
    let mut stale_b = b.clone();
    stale_b.version = 8; // an update of a record that does not exist
    let batch = [
        advance(&mut a, State::Dispatching),
        Write::Update {
            record: std::sync::Arc::new(stale_b),
            expected_version: 7,
            history: vec![],
        },
    ];
    assert!(store.apply(&batch).await.is_err());
    assert_eq!(
        store.get(ExecutionId(3)).await.unwrap().unwrap().state,
        State::Queued,
        "partial batch applied"
    );
    assert_eq!(store.history(ExecutionId(3)).await.unwrap().len(), 1);
    // Several changes to one record in one batch chain their versions.
    let mut c = sample_record(5, State::Queued);
    let w1 = insert(&c);
    let w2 = advance(&mut c, State::Dispatching);
    let w3 = advance(&mut c, State::Pending);
    store.apply(&[w1, w2, w3]).await.expect("chained batch");
    assert_eq!(store.get(ExecutionId(5)).await.unwrap().unwrap().version, 3);
}

/// Batches far larger than one statement's worth of rows (stores may write many rows per
/// statement): one record changed several times among hundreds of others keeps its order, and
/// one stale row deep in the batch fails the whole batch with its id.
async fn large_batches(store: &dyn Store) {
    let mut recs: Vec<ExecutionRecord> = (1000..1300)
        .map(|i| sample_record(i, State::Queued))
        .collect();
    let mut batch: Vec<Write> = recs.iter().map(insert).collect();
    let mut chained = sample_record(1300, State::Queued);
    batch.push(insert(&chained));
    for to in [State::Dispatching, State::Pending, State::Running] {
        batch.push(advance(&mut chained, to));
    }
    store.apply(&batch).await.expect("large batch");
    let stored = store.get(ExecutionId(1300)).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.version), (State::Running, 4));
    assert_eq!(store.history(ExecutionId(1300)).await.unwrap().len(), 4);
    // 300 updates, the 290th with a stale expected version.
    let mut batch: Vec<Write> = recs
        .iter_mut()
        .map(|r| advance(r, State::Dispatching))
        .collect();
    if let Write::Update {
        expected_version, ..
    } = &mut batch[289]
    {
        *expected_version = 7;
    }
    let err = store.apply(&batch).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(ExecutionId(1289))), "{err}");
    for id in [1000, 1288, 1299] {
        assert_eq!(
            store.get(ExecutionId(id)).await.unwrap().unwrap().state,
            State::Queued,
            "partial batch applied ({id})"
        );
    }
    // 300 inserts, one of an existing id.
    let mut batch: Vec<Write> = (1400..1700)
        .map(|i| insert(&sample_record(i, State::Queued)))
        .collect();
    batch[150] = insert(&sample_record(1150, State::Queued));
    let err = store.apply(&batch).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(ExecutionId(1150))), "{err}");
    assert_eq!(store.get(ExecutionId(1400)).await.unwrap(), None);
}

async fn list_filters(store: &dyn Store) {
    let mut batch = Vec::new();
    for id in 10..20 {
        let mut r = sample_record(
            id,
            if id < 15 {
                State::Running
            } else {
                State::Succeeded
            },
        );
        if id >= 18 {
            r.distributor = DistributorName::new("hpc");
        }
        batch.push(insert(&r));
    }
    store.apply(&batch).await.unwrap();
    let ids = |v: Vec<ExecutionRecord>| v.into_iter().map(|r| r.id.0).collect::<Vec<_>>();
    let f = ListFilter {
        states: vec![State::Running],
        after: Some(ExecutionId(9)),
        ..Default::default()
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), [10, 11, 12, 13, 14]);
    let f = ListFilter {
        distributor: Some(DistributorName::new("hpc")),
        ..Default::default()
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), [18, 19]);
    let mut f = ListFilter {
        after: Some(ExecutionId(9)),
        limit: Some(3),
        ..Default::default()
    };
    f.labels.insert("team".into(), "odd".into());
    assert_eq!(ids(store.list(&f).await.unwrap()), [11, 13, 15]);
    let f = ListFilter {
        task_id: Some(TaskId(12)),
        ..Default::default()
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), [12]);
}

async fn live_and_max_id(store: &dyn Store) {
    let live: Vec<u64> = store
        .live()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.0)
        .collect();
    assert!(live.contains(&10) && live.contains(&2), "{live:?}");
    assert!(
        !live.contains(&15),
        "terminal record listed as live: {live:?}"
    );
    assert_eq!(store.max_id().await.unwrap(), 19);
}

async fn meta_and_deferred(store: &dyn Store) {
    assert_eq!(store.meta("secret").await.unwrap(), None);
    store
        .apply(&[Write::Meta {
            key: "secret".into(),
            value: "a".into(),
        }])
        .await
        .unwrap();
    store
        .apply(&[Write::Meta {
            key: "secret".into(),
            value: "b".into(),
        }])
        .await
        .unwrap();
    assert_eq!(store.meta("secret").await.unwrap().as_deref(), Some("b"));
    // Prefix listing: by ascending key, only keys with that prefix, `%` and `_` literal.
    let kv = |k: &str, v: &str| Write::Meta {
        key: k.into(),
        value: v.into(),
    };
    store
        .apply(&[
            kv("wf/run/2", "two"),
            kv("wf/run/1", "one"),
            kv("wf/run_x", "not a run"),
            kv("wf/runs", "not a run"),
            kv("wf/r%n/1", "percent"),
            kv("wg/run/3", "other prefix"),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.meta_prefix("wf/run/").await.unwrap(),
        vec![
            ("wf/run/1".to_owned(), "one".to_owned()),
            ("wf/run/2".to_owned(), "two".to_owned())
        ]
    );
    assert_eq!(
        store.meta_prefix("wf/r%").await.unwrap(),
        vec![("wf/r%n/1".to_owned(), "percent".to_owned())]
    );
    assert!(store.meta_prefix("nothing/").await.unwrap().is_empty());
    assert!(store.meta_prefix("").await.unwrap().len() >= 7);
    let work = DeferredWork {
        execution_id: ExecutionId(1),
        due: Timestamp(5),
        data: json!({"x": 1}),
    };
    store
        .apply(&[Write::PutDeferred {
            id: 1,
            distributor: "local".into(),
            work: work.clone(),
        }])
        .await
        .unwrap();
    assert_eq!(
        store.deferred().await.unwrap(),
        vec![(1, DistributorName::new("local"), work)]
    );
    store
        .apply(&[Write::DeleteDeferred { id: 1 }])
        .await
        .unwrap();
    assert!(store.deferred().await.unwrap().is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SqliteStore};

    #[tokio::test]
    async fn memory_store_passes_the_suite() {
        run_all(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn sqlite_store_passes_the_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db")).await.unwrap();
        run_all(&store).await;
        // And the data is durable across a reopen.
        drop(store);
        let store = SqliteStore::open(dir.path().join("s.db")).await.unwrap();
        assert_eq!(store.max_id().await.unwrap(), 1300);
        assert_eq!(store.meta("secret").await.unwrap().as_deref(), Some("b"));
    }
}
