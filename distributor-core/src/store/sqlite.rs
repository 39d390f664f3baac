//! The embedded default store: one SQLite file in WAL mode, through sqlx with runtime queries.
//!
//! Migrations are embedded in the binary and applied on open (tracked with `PRAGMA
//! user_version`). A batch is one transaction, so durability costs one WAL sync per batch, not
//! per transition. With [`Synchronous::Normal`] (the default) a committed batch survives a
//! process crash; [`Synchronous::Full`] also survives power loss, at a higher cost per batch.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{ListFilter, Store, Write};
use crate::engine::{ExecutionRecord, HistoryEntry};
use crate::error::{Error, Result};
use crate::types::{DeferredWork, DistributorName, ExecutionId};

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_init.sql")];

/// How hard SQLite syncs each commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process crash (WAL + `synchronous=NORMAL`).
    #[default]
    Normal,
    /// Also survives power loss (`synchronous=FULL`).
    Full,
}

/// A store in one SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads (several connections, concurrent with writes under WAL).
    pool: SqlitePool,
    /// Every write goes through this one connection: its page cache stays valid from one
    /// transaction to the next (a connection whose file another connection changed must drop
    /// its cache and read the pages again), and writes never wait on each other for the lock.
    writer: SqlitePool,
}

fn store_err(what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| {
        let transient = match &e {
            sqlx::Error::Database(d) => {
                let m = d.message();
                m.contains("locked") || m.contains("busy")
            }
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
            _ => false,
        };
        Error::Store {
            message: format!("{what}: {e}"),
            transient,
            source: Some(Box::new(e)),
        }
    }
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Store {
        message: format!("corrupt row: {e}"),
        transient: false,
        source: Some(Box::new(e)),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, with default durability.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Synchronous::default()).await
    }

    /// Opens the file at `path` with the given durability.
    pub async fn open_with(path: impl AsRef<Path>, sync: Synchronous) -> Result<Self> {
        if let Some(dir) = path.as_ref().parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Store {
                message: format!("cannot create {}: {e}", dir.display()),
                transient: false,
                source: Some(Box::new(e)),
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(std::time::Duration::from_secs(5));
        // No ping before each acquire: the database is a local file, and a ping is one more
        // round trip to sqlx's SQLite thread per transaction and per read.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(opts.clone())
            .await
            .map_err(store_err("open"))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(opts)
            .await
            .map_err(store_err("open"))?;
        let store = Self { pool, writer };
        store.migrate().await?;
        Ok(store)
    }

    /// An in-memory database (for tests of SQL behaviour without a file).
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:").map_err(store_err("open"))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(store_err("open"))?;
        // One connection for both: every connection to `:memory:` is a database of its own.
        let store = Self {
            writer: pool.clone(),
            pool,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.writer.begin().await.map_err(store_err("migrate"))?;
        let current: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(store_err("migrate"))?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(current).unwrap_or(0))
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(store_err("migrate"))?;
            let bump = format!("PRAGMA user_version = {}", i + 1);
            sqlx::raw_sql(sqlx::AssertSqlSafe(bump))
                .execute(&mut *tx)
                .await
                .map_err(store_err("migrate"))?;
        }
        tx.commit().await.map_err(store_err("migrate"))
    }

    fn decode(row: &sqlx::sqlite::SqliteRow) -> Result<ExecutionRecord> {
        let text: String = row.try_get("record").map_err(store_err("read"))?;
        serde_json::from_str(&text).map_err(json_err)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn apply(&self, batch: &[Write]) -> Result<()> {
        // Records and history rows go to SQLite as multi-row statements (a few per batch, not
        // one per row): every statement is a round trip to sqlx's SQLite thread, and those
        // round trips, not SQLite's own work, dominated the cost of a commit. A small batch (the
        // common case when work trickles in) goes as one text holding the whole transaction:
        // one round trip. A batch is cut into segments in which every record appears once, so
        // that changes to one record within a batch still apply in order.
        let rows_only = batch
            .iter()
            .all(|w| matches!(w, Write::Insert { .. } | Write::Update { .. }));
        if rows_only && batch.len() <= ONE_TRIP_ROWS {
            match self.apply_in_one_trip(batch).await {
                Ok(()) => return Ok(()),
                // Rolled back: the statement-by-statement path below says precisely what failed
                // (which record is stale or exists), or succeeds if the failure was passing.
                Err(e) => tracing::debug!(error = %e, "one-trip commit failed; retrying"),
            }
        }
        let mut tx = self.writer.begin().await.map_err(store_err("begin"))?;
        let (segments, others) = segments(batch)?;
        for mut seg in segments {
            seg.write(&mut tx).await?;
        }
        for w in others {
            apply_other(&mut tx, w).await?;
        }
        tx.commit().await.map_err(store_err("commit"))
    }

    async fn get(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>> {
        let row = sqlx::query("SELECT record FROM executions WHERE id = ?")
            .bind(id.0 as i64)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_err("get"))?;
        row.as_ref().map(Self::decode).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRecord>> {
        let mut sql = String::from("SELECT record FROM executions WHERE id > ?");
        if !filter.states.is_empty() {
            sql.push_str(&format!(
                " AND state IN ({})",
                vec!["?"; filter.states.len()].join(",")
            ));
        }
        if filter.distributor.is_some() {
            sql.push_str(" AND distributor = ?");
        }
        if filter.task_id.is_some() {
            sql.push_str(" AND task_id = ?");
        }
        sql.push_str(" ORDER BY id");
        if filter.labels.is_empty() {
            sql.push_str(&format!(" LIMIT {}", filter.limit()));
        }
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(filter.after.map_or(0, |a| a.0 as i64));
        for s in &filter.states {
            q = q.bind(s.as_str());
        }
        if let Some(d) = &filter.distributor {
            q = q.bind(d.as_str());
        }
        if let Some(t) = filter.task_id {
            q = q.bind(t.0 as i64);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(store_err("list"))?;
        let mut out = Vec::new();
        for row in &rows {
            let r = Self::decode(row)?;
            if filter.matches(&r) {
                out.push(r);
                if out.len() >= filter.limit() {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn live(&self) -> Result<Vec<ExecutionRecord>> {
        let rows = sqlx::query("SELECT record FROM executions WHERE live = 1 ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(store_err("live"))?;
        rows.iter().map(Self::decode).collect()
    }

    async fn history(&self, id: ExecutionId) -> Result<Vec<HistoryEntry>> {
        let rows = sqlx::query("SELECT entry FROM history WHERE execution_id = ? ORDER BY version")
            .bind(id.0 as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(store_err("history"))?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get("entry").map_err(store_err("history"))?;
                serde_json::from_str(&text).map_err(json_err)
            })
            .collect()
    }

    async fn max_id(&self) -> Result<u64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM executions")
            .fetch_one(&self.pool)
            .await
            .map_err(store_err("max_id"))?;
        Ok(v.map_or(0, |v| v as u64))
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(store_err("meta"))
    }

    async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        // A range on the primary key rather than LIKE (which treats `%` and `_` in the prefix
        // as wildcards and, case-insensitive, cannot use the index); `substr` compares bytes.
        let rows = sqlx::query(
            "SELECT key, value FROM meta WHERE key >= ?1 AND substr(key, 1, length(?1)) = ?1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err("meta_prefix"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("key").map_err(store_err("meta_prefix"))?,
                    r.try_get("value").map_err(store_err("meta_prefix"))?,
                ))
            })
            .collect()
    }

    async fn deferred(&self) -> Result<Vec<(u64, DistributorName, DeferredWork)>> {
        let rows = sqlx::query("SELECT id, distributor, work FROM deferred ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(store_err("deferred"))?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.try_get("id").map_err(store_err("deferred"))?;
                let d: String = r.try_get("distributor").map_err(store_err("deferred"))?;
                let w: String = r.try_get("work").map_err(store_err("deferred"))?;
                Ok((
                    id as u64,
                    DistributorName::from(d),
                    serde_json::from_str(&w).map_err(json_err)?,
                ))
            })
            .collect()
    }
}

/// Rows of a batch in which every record appears at most once.
#[derive(Default)]
struct Segment {
    inserts: Vec<RecordRow>,
    updates: Vec<RecordRow>,
    history: Vec<HistoryRow>,
}

/// Batches of at most this many record writes (and nothing else) are committed in one round
/// trip to SQLite's thread.
const ONE_TRIP_ROWS: usize = 16;

/// Fails the statement (integer overflow) unless the previous statement changed `?` rows: the
/// compare-and-set check of the one-trip path.
const CHANGED_EXACTLY: &str = "SELECT abs(-9223372036854775807 - 1 + (changes() = ?));\n";

/// Cuts a batch into segments in which every record appears once (in batch order), and the
/// other writes, as SQLite rows ([`super::record_segments`]).
fn segments(batch: &[Write]) -> Result<(Vec<Segment>, Vec<&Write>)> {
    let (groups, others) = super::record_segments(batch);
    let mut segments = Vec::with_capacity(groups.len());
    for group in groups {
        let mut seg = Segment::default();
        for w in group {
            match w.expected {
                None => seg.inserts.push(RecordRow::of(w.record, 0)?),
                Some(v) => seg.updates.push(RecordRow::of(w.record, v)?),
            }
            for h in w.history {
                seg.history.push(HistoryRow::of(h)?);
            }
        }
        segments.push(seg);
    }
    Ok((segments, others))
}

impl SqliteStore {
    /// Commits a small batch of record writes as one SQL text (`BEGIN IMMEDIATE; …; COMMIT`):
    /// one round trip. On any error the transaction is rolled back (the connection is closed
    /// if even that fails) and the error returned.
    async fn apply_in_one_trip(&self, batch: &[Write]) -> Result<()> {
        let (segments, _) = segments(batch)?;
        let mut sql = String::from("BEGIN IMMEDIATE;\n");
        for seg in &segments {
            seg.push_sql(&mut sql);
        }
        sql.push_str("COMMIT;");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for seg in segments {
            q = seg.bind_all(q);
        }
        let mut conn = self.writer.acquire().await.map_err(store_err("acquire"))?;
        if let Err(e) = q.execute(&mut *conn).await {
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                conn.close_on_drop();
            }
            return Err(store_err("one-trip commit")(e));
        }
        Ok(())
    }
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

const INSERT_HEAD: &str =
    "INSERT INTO executions (id, task_id, state, live, distributor, version, record) VALUES ";
const INSERT_ROW: &str = "(?, ?, ?, ?, ?, ?, ?)";
const UPDATE_HEAD: &str = "WITH u (id, state, live, version, record, expected) AS (VALUES ";
const UPDATE_ROW: &str = "(?, ?, ?, ?, ?, ?)";
const UPDATE_TAIL: &str = ") UPDATE executions SET state = u.state, live = u.live, version = u.version, \
     record = u.record FROM u WHERE executions.id = u.id AND executions.version = u.expected";
const HISTORY_HEAD: &str = "INSERT OR REPLACE INTO history (execution_id, version, entry) VALUES ";
const HISTORY_ROW: &str = "(?, ?, ?)";

impl RecordRow {
    fn bind_insert(self, q: SqliteQuery<'_>) -> SqliteQuery<'_> {
        q.bind(self.id)
            .bind(self.task_id)
            .bind(self.state)
            .bind(self.live)
            .bind(self.distributor)
            .bind(self.version)
            .bind(self.json)
    }

    fn bind_update(self, q: SqliteQuery<'_>) -> SqliteQuery<'_> {
        q.bind(self.id)
            .bind(self.state)
            .bind(self.live)
            .bind(self.version)
            .bind(self.json)
            .bind(self.expected)
    }
}

/// One history row: execution id, version, entry JSON.
struct HistoryRow(i64, i64, String);

impl HistoryRow {
    fn of(h: &HistoryEntry) -> Result<Self> {
        Ok(Self(
            h.execution_id.0 as i64,
            h.version as i64,
            serde_json::to_string(h).map_err(json_err)?,
        ))
    }
}

impl Segment {
    /// Appends the segment's statements for the one-trip path: inserts, compare-and-set
    /// updates followed by their check, history. Binds go in the same order ([`Self::bind_all`]).
    fn push_sql(&self, sql: &mut String) {
        if !self.inserts.is_empty() {
            sql.push_str(&multi_row(
                INSERT_HEAD,
                INSERT_ROW,
                self.inserts.len(),
                ";\n",
            ));
        }
        if !self.updates.is_empty() {
            sql.push_str(&multi_row(
                UPDATE_HEAD,
                UPDATE_ROW,
                self.updates.len(),
                UPDATE_TAIL,
            ));
            sql.push_str(";\n");
            sql.push_str(CHANGED_EXACTLY);
        }
        if !self.history.is_empty() {
            sql.push_str(&multi_row(
                HISTORY_HEAD,
                HISTORY_ROW,
                self.history.len(),
                ";\n",
            ));
        }
    }

    /// Binds the segment's values in the order of [`Self::push_sql`].
    fn bind_all(self, mut q: SqliteQuery<'_>) -> SqliteQuery<'_> {
        for r in self.inserts {
            q = r.bind_insert(q);
        }
        if !self.updates.is_empty() {
            let n = self.updates.len() as i64;
            for r in self.updates {
                q = r.bind_update(q);
            }
            q = q.bind(n);
        }
        for HistoryRow(e, v, entry) in self.history {
            q = q.bind(e).bind(v).bind(entry);
        }
        q
    }

    /// Writes and empties the segment: inserts, then compare-and-set updates, then history.
    async fn write(&mut self, tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<()> {
        while !self.inserts.is_empty() {
            let chunk: Vec<RecordRow> = self
                .inserts
                .drain(..chunk_len(self.inserts.len()))
                .collect();
            let ids: Vec<i64> = chunk.iter().map(|r| r.id).collect();
            let sql = multi_row(INSERT_HEAD, INSERT_ROW, chunk.len(), "");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = r.bind_insert(q);
            }
            if let Err(e) = q.execute(&mut **tx).await {
                return Err(match &e {
                    sqlx::Error::Database(d) if d.is_unique_violation() => {
                        Error::Conflict(first_existing(tx, &ids).await?)
                    }
                    _ => store_err("insert")(e),
                });
            }
        }
        while !self.updates.is_empty() {
            let chunk: Vec<RecordRow> = self
                .updates
                .drain(..chunk_len(self.updates.len()))
                .collect();
            let expect: Vec<(i64, i64)> = chunk.iter().map(|r| (r.id, r.version)).collect();
            // Compare-and-set on every row: a row whose stored version is not the expected one
            // is not updated, and the count falls short.
            let sql = multi_row(UPDATE_HEAD, UPDATE_ROW, chunk.len(), UPDATE_TAIL);
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = r.bind_update(q);
            }
            let done = q.execute(&mut **tx).await.map_err(store_err("update"))?;
            if done.rows_affected() != expect.len() as u64 {
                return Err(Error::Conflict(first_stale(tx, &expect).await?));
            }
        }
        while !self.history.is_empty() {
            let n = chunk_len(self.history.len());
            let sql = multi_row(HISTORY_HEAD, HISTORY_ROW, n, "");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for HistoryRow(e, v, entry) in self.history.drain(..n) {
                q = q.bind(e).bind(v).bind(entry);
            }
            q.execute(&mut **tx).await.map_err(store_err("history"))?;
        }
        Ok(())
    }
}

/// One execution row to write.
struct RecordRow {
    id: i64,
    task_id: i64,
    state: &'static str,
    live: bool,
    distributor: String,
    version: i64,
    expected: i64,
    json: String,
}

impl RecordRow {
    fn of(r: &ExecutionRecord, expected: u64) -> Result<Self> {
        Ok(Self {
            id: r.id.0 as i64,
            task_id: r.task_id.0 as i64,
            state: r.state.as_str(),
            live: !r.state.is_terminal(),
            distributor: r.distributor.as_str().to_owned(),
            version: r.version as i64,
            expected: expected as i64,
            json: serde_json::to_string(r).map_err(json_err)?,
        })
    }
}

/// Rows per multi-row statement: a few fixed sizes, so that sqlx's statement cache holds a
/// handful of prepared statements, and well under SQLite's 32,766 bound parameters.
const CHUNKS: [usize; 4] = [256, 32, 4, 1];

/// How many of `left` rows the next statement takes.
fn chunk_len(left: usize) -> usize {
    CHUNKS.into_iter().find(|c| *c <= left).unwrap_or(1)
}

fn multi_row(head: &str, row: &str, n: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + (row.len() + 2) * n + tail.len());
    sql.push_str(head);
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql.push_str(tail);
    sql
}

/// After a short update count: the first `(id, new version)` whose row does not carry
/// its new version (it was not at the expected one, or does not exist).
async fn first_stale(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    expect: &[(i64, i64)],
) -> Result<ExecutionId> {
    for (id, version) in expect {
        let v: Option<i64> = sqlx::query_scalar("SELECT version FROM executions WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_err("update"))?;
        if v != Some(*version) {
            return Ok(ExecutionId(*id as u64));
        }
    }
    Ok(ExecutionId(expect.first().map_or(0, |e| e.0) as u64))
}

/// After a unique violation: the first of `ids` already stored.
async fn first_existing(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    ids: &[i64],
) -> Result<ExecutionId> {
    for id in ids {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM executions WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(store_err("insert"))?;
        if found.is_some() {
            return Ok(ExecutionId(*id as u64));
        }
    }
    Ok(ExecutionId(ids.first().copied().unwrap_or(0) as u64))
}

async fn apply_other(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, w: &Write) -> Result<()> {
    match w {
        Write::Meta { key, value } => {
            sqlx::query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .bind(key)
                .bind(value)
                .execute(&mut **tx)
                .await
                .map_err(store_err("meta"))?;
        }
        Write::PutDeferred {
            id,
            distributor,
            work,
        } => {
            sqlx::query("INSERT OR REPLACE INTO deferred (id, distributor, work) VALUES (?, ?, ?)")
                .bind(*id as i64)
                .bind(distributor.as_str())
                .bind(serde_json::to_string(work).map_err(json_err)?)
                .execute(&mut **tx)
                .await
                .map_err(store_err("deferred"))?;
        }
        Write::DeleteDeferred { id } => {
            sqlx::query("DELETE FROM deferred WHERE id = ?")
                .bind(*id as i64)
                .execute(&mut **tx)
                .await
                .map_err(store_err("deferred"))?;
        }
        Write::Insert { .. } | Write::Update { .. } => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::State;
    use crate::store::suite::{advance, insert, sample_record};

    async fn version(store: &SqliteStore, id: u64) -> Option<u64> {
        store.get(ExecutionId(id)).await.unwrap().map(|r| r.version)
    }

    /// The one-trip path commits for real (the fallback would hide it failing every time), and
    /// a failure anywhere in it leaves nothing written and the store usable.
    #[tokio::test]
    async fn small_batches_commit_in_one_trip_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db")).await.unwrap();
        let mut a = sample_record(1, State::Queued);
        let b = sample_record(2, State::Queued);
        // Inserts, then a change to a record inserted in the same batch (a second segment).
        let batch = [insert(&a), insert(&b), advance(&mut a, State::Dispatching)];
        store.apply_in_one_trip(&batch).await.expect("one trip");
        assert_eq!(version(&store, 1).await, Some(a.version));
        assert_eq!(version(&store, 2).await, Some(b.version));

        // A stale update after a good one: the whole batch is refused.
        let before = a.version;
        let mut stale = b.clone();
        stale.version += 5;
        let batch = [
            advance(&mut a, State::Pending),
            advance(&mut stale, State::Pending),
        ];
        assert!(store.apply_in_one_trip(&batch).await.is_err());
        assert_eq!(version(&store, 1).await, Some(before));
        // Through `apply`, the same batch names the stale record.
        match store.apply(&batch).await {
            Err(Error::Conflict(id)) => assert_eq!(id, ExecutionId(2)),
            other => panic!("expected a conflict on 2, got {other:?}"),
        }
        assert_eq!(version(&store, 1).await, Some(before));

        // A duplicate insert after a new one: nothing is written.
        let c = sample_record(3, State::Queued);
        assert!(
            store
                .apply_in_one_trip(&[insert(&c), insert(&b)])
                .await
                .is_err()
        );
        assert_eq!(version(&store, 3).await, None);

        // The store still works, in one trip.
        a.version = before;
        store
            .apply_in_one_trip(&[advance(&mut a, State::Pending), insert(&c)])
            .await
            .expect("after failures");
        assert_eq!(version(&store, 1).await, Some(before + 1));
        assert_eq!(version(&store, 3).await, Some(c.version));
    }
}
