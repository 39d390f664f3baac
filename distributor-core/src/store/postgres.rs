//! A PostgreSQL store that several engine instances share (feature `postgres`).
//!
//! sqlx with runtime queries; the migrations are embedded and applied on connect, under an
//! advisory lock so that instances starting together migrate once. Executions are split into
//! shards (execution id modulo the shard count, fixed when the database is created); each
//! engine instance holds some of them through rows of `shard_lease` (owner, expiry, epoch). See
//! [`SharedStore`] for the protocol and the module docs of [`crate::store`] for the contract.
//!
//! **Fencing.** Every batch that writes executions or deferred work first runs
//! `SELECT … FROM shard_lease … FOR SHARE` on the shards it touches, inside its transaction,
//! and commits only if each still carries the epoch this handle acquired it with. Taking a
//! shard over bumps its epoch under `FOR UPDATE`, which waits for such a batch to commit and
//! makes every later one fail: an instance that lost its lease (paused, partitioned, stalled)
//! can never commit a stale transition, whatever its clock says.
//!
//! **One round trip per batch.** The engine's usual batch (every record once, nothing else) is
//! one statement: the fence, inserts, compare-and-set updates, the live set and history as
//! data-modifying CTEs, ending in a division by zero unless every shard was at its epoch and
//! every row written, which aborts all of it. On any failure the batch is retried as a
//! transaction of several statements, which names the stale record or the lost shard.
//!
//! **Commands for other instances** (pushes, cancels, pokes for an execution this instance does
//! not own) go through the `inbox` table; `NOTIFY distributor_inbox` only wakes the owner,
//! which also looks at the table every second, so a lost notification only delays.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};

use super::{LeaseRound, ListFilter, Routed, ShardId, ShardLoad, SharedStore, Store, Write};
use crate::engine::{ExecutionRecord, HistoryEntry};
use crate::error::{Error, Result};
use crate::types::{DeferredWork, DistributorName, ExecutionId};

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/postgres/0001_init.sql")];
/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x0064_6973_7472_6962; // "distrib"
/// The NOTIFY channel of the inbox; the payload is the shard number, or [`MEMBERSHIP`].
const INBOX_CHANNEL: &str = "distributor_inbox";
/// Payload on [`INBOX_CHANNEL`] when an instance joins or leaves.
const MEMBERSHIP: &str = "membership";

/// How to connect.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresOptions {
    /// Shard count, used only when this connect creates the database's tables; afterwards the
    /// count stored in the database wins. Default 64. It bounds how many instances can share
    /// the work (an instance beyond it holds no shard and only forwards).
    pub shards: u32,
    /// Lease lifetime: how long after an instance stops renewing (crash, pause, partition) its
    /// shards may be taken over. Default 10 s.
    pub lease_ttl: Duration,
    /// This instance's id; default a random UUID. Two live handles MUST NOT share one.
    pub instance_id: Option<String>,
    /// Pool size (one connection is kept for LISTEN). Default 8.
    pub max_connections: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            shards: 64,
            lease_ttl: Duration::from_secs(10),
            instance_id: None,
            max_connections: 8,
        }
    }
}

/// A store in a PostgreSQL database, shareable by several engine instances. Cheap to clone;
/// clones are the same instance (one engine per instance).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    shards: u32,
    instance: String,
    ttl: Duration,
    /// Held shards and the epoch each was acquired with.
    held: Mutex<BTreeMap<ShardId, i64>>,
    listener: tokio::sync::Mutex<Option<PgListener>>,
    /// Batches committed as one statement, and through a transaction.
    commits: [std::sync::atomic::AtomicU64; 2],
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("instance", &self.instance)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

fn store_err(what: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| {
        let transient = match &e {
            sqlx::Error::Database(d) => matches!(
                d.code().as_deref(),
                // serialization failure, deadlock, lock timeout, admin shutdown, crash
                // shutdown, cannot connect now, too many connections
                Some("40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300")
            ),
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
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

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PostgresStore {
    /// Connects with default options to `url` (`postgres://user@host:port/database`), creating
    /// the tables if needed.
    ///
    /// Errors: [`Error::Store`] if the URL is invalid, the server unreachable (transient), or
    /// the database's schema is newer than this build knows.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with `opts`. Errors as [`connect`](Self::connect).
    pub async fn connect_with(url: &str, opts: PostgresOptions) -> Result<Self> {
        if opts.shards == 0 {
            return Err(Error::Store {
                message: "shards: must be at least 1".into(),
                transient: false,
                source: None,
            });
        }
        let conn = PgConnectOptions::from_str(url).map_err(store_err("postgres url"))?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(conn)
            .await
            .map_err(store_err("connect"))?;
        let shards = migrate(&pool, opts.shards).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                shards,
                instance: opts
                    .instance_id
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                ttl: opts.lease_ttl.max(Duration::from_millis(100)),
                held: Mutex::new(BTreeMap::new()),
                listener: tokio::sync::Mutex::new(None),
                commits: Default::default(),
            }),
        })
    }

    /// The connection pool (for tools and tests that look at the tables).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Diagnostics: how many batches this handle committed as one statement (the engine's
    /// usual batch: every record once, nothing else) and how many through a transaction of
    /// several statements.
    pub fn commit_counts(&self) -> (u64, u64) {
        let c = &self.inner.commits;
        (
            c[0].load(std::sync::atomic::Ordering::Relaxed),
            c[1].load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// Applies the migrations not yet applied (one transaction, under an advisory lock) and
/// creates the shard rows on first use. Returns the shard count.
async fn migrate(pool: &PgPool, shards: u32) -> Result<u32> {
    let mut tx = pool.begin().await.map_err(store_err("migrate"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(store_err("migrate"))?;
    sqlx::query("CREATE TABLE IF NOT EXISTS distributor_schema (version INTEGER NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(store_err("migrate"))?;
    let current: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM distributor_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(store_err("migrate"))?;
    let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(Error::Store {
            message: format!(
                "the database's schema is version {current}; this build knows up to {}",
                MIGRATIONS.len()
            ),
            transient: false,
            source: None,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(&mut *tx)
            .await
            .map_err(store_err("migrate"))?;
        sqlx::query("INSERT INTO distributor_schema (version) VALUES ($1)")
            .bind(i as i32 + 1)
            .execute(&mut *tx)
            .await
            .map_err(store_err("migrate"))?;
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM shard_lease")
        .fetch_one(&mut *tx)
        .await
        .map_err(store_err("migrate"))?;
    let count = if count == 0 {
        sqlx::query("INSERT INTO shard_lease (shard) SELECT generate_series(0, $1 - 1)")
            .bind(shards as i32)
            .execute(&mut *tx)
            .await
            .map_err(store_err("migrate"))?;
        shards
    } else {
        count as u32
    };
    tx.commit().await.map_err(store_err("migrate"))?;
    Ok(count)
}

impl Inner {
    fn shard_of(&self, id: u64) -> ShardId {
        (id % u64::from(self.shards)) as ShardId
    }

    fn held_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, i64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shards `batch` writes, sorted.
    fn touched(&self, batch: &[Write]) -> Vec<ShardId> {
        let mut s: Vec<ShardId> = batch
            .iter()
            .filter_map(|w| match w {
                Write::Insert { record, .. } | Write::Update { record, .. } => {
                    Some(self.shard_of(record.id.0))
                }
                Write::PutDeferred { id, .. } | Write::DeleteDeferred { id } => {
                    Some(self.shard_of(*id))
                }
                Write::Meta { .. } => None,
            })
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Checks, inside `tx`, that every shard in `shards` is still held at its epoch, and locks
    /// their lease rows against a takeover until the transaction ends.
    async fn fence(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        shards: &[ShardId],
    ) -> Result<()> {
        let epochs: Vec<(i32, i64)> = {
            let held = self.held_map();
            let mut v = Vec::with_capacity(shards.len());
            for s in shards {
                match held.get(s) {
                    Some(e) => v.push((*s as i32, *e)),
                    None => return Err(Error::Fenced { shard: *s }),
                }
            }
            v
        };
        let (ss, es): (Vec<i32>, Vec<i64>) = epochs.iter().copied().unzip();
        let ok: Vec<i32> = sqlx::query_scalar(
            "SELECT l.shard FROM shard_lease l \
             JOIN UNNEST($1::int4[], $2::int8[]) AS h(shard, epoch) ON l.shard = h.shard \
             WHERE l.epoch = h.epoch AND l.owner = $3 FOR SHARE OF l",
        )
        .bind(&ss)
        .bind(&es)
        .bind(&self.instance)
        .fetch_all(&mut **tx)
        .await
        .map_err(store_err("fence"))?;
        if ok.len() == ss.len() {
            return Ok(());
        }
        let ok: HashSet<i32> = ok.into_iter().collect();
        let lost: Vec<(i32, i64)> = epochs
            .into_iter()
            .filter(|(s, _)| !ok.contains(s))
            .collect();
        let mut held = self.held_map();
        for (s, e) in &lost {
            if held.get(&(*s as u32)) == Some(e) {
                held.remove(&(*s as u32));
            }
        }
        tracing::warn!(instance = %self.instance, lost = ?lost, "shard leases lost: a write was fenced off");
        Err(Error::Fenced {
            shard: lost.first().map_or(0, |l| l.0 as u32),
        })
    }

    /// Commits one segment, fenced, as a single statement (no BEGIN or COMMIT round trip): the
    /// fence, inserts, compare-and-set updates, the live set and history as data-modifying
    /// CTEs, and a final division by zero unless every shard was at its epoch and every row
    /// was written, which aborts the whole statement. One round trip instead of eight.
    async fn apply_in_one_statement(&self, shards: &[ShardId], seg: &Segment) -> Result<()> {
        let epochs: Vec<(i32, i64)> = {
            let held = self.held_map();
            let mut v = Vec::with_capacity(shards.len());
            for s in shards {
                match held.get(s) {
                    Some(e) => v.push((*s as i32, *e)),
                    None => return Err(Error::Fenced { shard: *s }),
                }
            }
            v
        };
        let (fs, fe): (Vec<i32>, Vec<i64>) = epochs.into_iter().unzip();
        let ins = Columns::of(&seg.inserts);
        let up = Columns::of(&seg.updates);
        let expected: Vec<i64> = seg.updates.iter().map(|r| r.expected).collect();
        let mut seen = HashSet::new();
        let (mut he, mut hv, mut hj) = (Vec::new(), Vec::new(), Vec::new());
        for h in seg.history.iter().rev() {
            if seen.insert((h.0, h.1)) {
                he.push(h.0);
                hv.push(h.1);
                hj.push(h.2.as_str());
            }
        }
        sqlx::query(
            "WITH f AS ( \
               SELECT l.shard FROM shard_lease l \
               JOIN UNNEST($1::int4[], $2::int8[]) AS h(shard, epoch) ON l.shard = h.shard \
               WHERE l.epoch = h.epoch AND l.owner = $3 FOR SHARE OF l), \
             ins AS ( \
               INSERT INTO executions (id, shard, task_id, state, live, distributor, version, record) \
               SELECT u.id, u.shard, u.task_id, u.state, u.live, u.distributor, u.version, u.record::jsonb \
               FROM UNNEST($4::int8[], $5::int4[], $6::int8[], $7::text[], $8::bool[], $9::text[], $10::int8[], $11::text[]) \
               AS u(id, shard, task_id, state, live, distributor, version, record) \
               ON CONFLICT (id) DO NOTHING RETURNING id, shard, live), \
             li AS (INSERT INTO live_executions (shard, id) SELECT shard, id FROM ins WHERE live), \
             up AS ( \
               UPDATE executions e SET state = u.state, live = u.live, version = u.version, \
               record = u.record::jsonb \
               FROM UNNEST($12::int8[], $13::text[], $14::bool[], $15::int8[], $16::text[], $17::int8[]) \
               AS u(id, state, live, version, record, expected) \
               WHERE e.id = u.id AND e.version = u.expected RETURNING e.id, e.shard, e.live), \
             ld AS (DELETE FROM live_executions l USING up \
               WHERE NOT up.live AND l.shard = up.shard AND l.id = up.id), \
             hi AS (INSERT INTO history (execution_id, version, entry) \
               SELECT u.e, u.v, u.entry::jsonb FROM UNNEST($18::int8[], $19::int8[], $20::text[]) AS u(e, v, entry) \
               ON CONFLICT (execution_id, version) DO UPDATE SET entry = excluded.entry) \
             SELECT 1 / ((SELECT count(*) FROM f) = $21 AND (SELECT count(*) FROM ins) = $22 \
               AND (SELECT count(*) FROM up) = $23)::int",
        )
        .bind(&fs)
        .bind(&fe)
        .bind(&self.instance)
        .bind(&ins.id)
        .bind(&ins.shard)
        .bind(&ins.task_id)
        .bind(&ins.state)
        .bind(&ins.live)
        .bind(&ins.distributor)
        .bind(&ins.version)
        .bind(&ins.json)
        .bind(&up.id)
        .bind(&up.state)
        .bind(&up.live)
        .bind(&up.version)
        .bind(&up.json)
        .bind(&expected)
        .bind(&he)
        .bind(&hv)
        .bind(&hj)
        .bind(fs.len() as i64)
        .bind(ins.id.len() as i64)
        .bind(up.id.len() as i64)
        .execute(&self.pool)
        .await
        .map_err(store_err("one-statement commit"))?;
        Ok(())
    }

    async fn write_segment(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        seg: Segment,
    ) -> Result<()> {
        if !seg.inserts.is_empty() {
            let ids: Vec<i64> = seg.inserts.iter().map(|r| r.id).collect();
            let cols = Columns::of(&seg.inserts);
            let done: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO executions (id, shard, task_id, state, live, distributor, version, record) \
                 SELECT u.id, u.shard, u.task_id, u.state, u.live, u.distributor, u.version, u.record::jsonb \
                 FROM UNNEST($1::int8[], $2::int4[], $3::int8[], $4::text[], $5::bool[], $6::text[], $7::int8[], $8::text[]) \
                 AS u(id, shard, task_id, state, live, distributor, version, record) \
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(&cols.id)
            .bind(&cols.shard)
            .bind(&cols.task_id)
            .bind(&cols.state)
            .bind(&cols.live)
            .bind(&cols.distributor)
            .bind(&cols.version)
            .bind(&cols.json)
            .fetch_all(&mut **tx)
            .await
            .map_err(store_err("insert"))?;
            if done.len() != ids.len() {
                let done: HashSet<i64> = done.into_iter().collect();
                let first = ids.iter().find(|i| !done.contains(i)).copied().unwrap_or(0);
                return Err(Error::Conflict(ExecutionId(first as u64)));
            }
            let (ls, li): (Vec<i32>, Vec<i64>) = seg
                .inserts
                .iter()
                .filter(|r| r.live)
                .map(|r| (r.shard, r.id))
                .unzip();
            if !li.is_empty() {
                sqlx::query(
                    "INSERT INTO live_executions (shard, id) SELECT * FROM UNNEST($1::int4[], $2::int8[])",
                )
                .bind(&ls)
                .bind(&li)
                .execute(&mut **tx)
                .await
                .map_err(store_err("insert"))?;
            }
        }
        if !seg.updates.is_empty() {
            let cols = Columns::of(&seg.updates);
            let expected: Vec<i64> = seg.updates.iter().map(|r| r.expected).collect();
            let done = sqlx::query(
                "UPDATE executions e SET state = u.state, live = u.live, version = u.version, \
                 record = u.record::jsonb \
                 FROM UNNEST($1::int8[], $2::text[], $3::bool[], $4::int8[], $5::text[], $6::int8[]) \
                 AS u(id, state, live, version, record, expected) \
                 WHERE e.id = u.id AND e.version = u.expected",
            )
            .bind(&cols.id)
            .bind(&cols.state)
            .bind(&cols.live)
            .bind(&cols.version)
            .bind(&cols.json)
            .bind(&expected)
            .execute(&mut **tx)
            .await
            .map_err(store_err("update"))?;
            if done.rows_affected() != cols.id.len() as u64 {
                // Compare-and-set lost somewhere: the first row not at its new version.
                let rows = sqlx::query("SELECT id, version FROM executions WHERE id = ANY($1)")
                    .bind(&cols.id)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(store_err("update"))?;
                let mut now = std::collections::HashMap::new();
                for r in rows {
                    let id: i64 = r.try_get("id").map_err(store_err("update"))?;
                    let v: i64 = r.try_get("version").map_err(store_err("update"))?;
                    now.insert(id, v);
                }
                let first = cols
                    .id
                    .iter()
                    .zip(&cols.version)
                    .find(|(id, v)| now.get(*id) != Some(*v))
                    .map_or(cols.id[0], |(id, _)| *id);
                return Err(Error::Conflict(ExecutionId(first as u64)));
            }
            // Terminal states never change back: leaving the live set is a delete.
            let (ds, di): (Vec<i32>, Vec<i64>) = seg
                .updates
                .iter()
                .filter(|r| !r.live)
                .map(|r| (r.shard, r.id))
                .unzip();
            if !di.is_empty() {
                sqlx::query(
                    "DELETE FROM live_executions l USING UNNEST($1::int4[], $2::int8[]) AS d(shard, id) \
                     WHERE l.shard = d.shard AND l.id = d.id",
                )
                .bind(&ds)
                .bind(&di)
                .execute(&mut **tx)
                .await
                .map_err(store_err("update"))?;
            }
        }
        if !seg.history.is_empty() {
            let mut e = Vec::with_capacity(seg.history.len());
            let mut v = Vec::with_capacity(seg.history.len());
            let mut j = Vec::with_capacity(seg.history.len());
            // One row per (execution, version) in a statement: the last one wins.
            let mut seen = HashSet::new();
            for h in seg.history.into_iter().rev() {
                if seen.insert((h.0, h.1)) {
                    e.push(h.0);
                    v.push(h.1);
                    j.push(h.2);
                }
            }
            sqlx::query(
                "INSERT INTO history (execution_id, version, entry) \
                 SELECT u.e, u.v, u.entry::jsonb FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS u(e, v, entry) \
                 ON CONFLICT (execution_id, version) DO UPDATE SET entry = excluded.entry",
            )
            .bind(&e)
            .bind(&v)
            .bind(&j)
            .execute(&mut **tx)
            .await
            .map_err(store_err("history"))?;
        }
        Ok(())
    }

    async fn apply_other(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        w: &Write,
    ) -> Result<()> {
        match w {
            Write::Meta { key, value } => {
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
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
                sqlx::query(
                    "INSERT INTO deferred (id, shard, distributor, work) VALUES ($1, $2, $3, $4::text::jsonb) \
                     ON CONFLICT (id) DO UPDATE SET distributor = excluded.distributor, work = excluded.work",
                )
                .bind(*id as i64)
                .bind(self.shard_of(*id) as i32)
                .bind(distributor.as_str())
                .bind(serde_json::to_string(work).map_err(json_err)?)
                .execute(&mut **tx)
                .await
                .map_err(store_err("deferred"))?;
            }
            Write::DeleteDeferred { id } => {
                sqlx::query("DELETE FROM deferred WHERE id = $1")
                    .bind(*id as i64)
                    .execute(&mut **tx)
                    .await
                    .map_err(store_err("deferred"))?;
            }
            Write::Insert { .. } | Write::Update { .. } => {}
        }
        Ok(())
    }
}

/// One execution row to write.
struct RecordRow {
    id: i64,
    shard: i32,
    task_id: i64,
    state: &'static str,
    live: bool,
    distributor: String,
    version: i64,
    expected: i64,
    json: String,
}

/// A segment's rows as columns, for `UNNEST`.
struct Columns {
    id: Vec<i64>,
    shard: Vec<i32>,
    task_id: Vec<i64>,
    state: Vec<&'static str>,
    live: Vec<bool>,
    distributor: Vec<String>,
    version: Vec<i64>,
    json: Vec<String>,
}

impl Columns {
    fn of(rows: &[RecordRow]) -> Self {
        Self {
            id: rows.iter().map(|r| r.id).collect(),
            shard: rows.iter().map(|r| r.shard).collect(),
            task_id: rows.iter().map(|r| r.task_id).collect(),
            state: rows.iter().map(|r| r.state).collect(),
            live: rows.iter().map(|r| r.live).collect(),
            distributor: rows.iter().map(|r| r.distributor.clone()).collect(),
            version: rows.iter().map(|r| r.version).collect(),
            json: rows.iter().map(|r| r.json.clone()).collect(),
        }
    }
}

/// Writes of a batch in which every record appears at most once (a record changed several
/// times in one batch starts a new segment, so its changes apply in order).
#[derive(Default)]
struct Segment {
    inserts: Vec<RecordRow>,
    updates: Vec<RecordRow>,
    history: Vec<(i64, i64, String)>,
}

fn segments(shards: u32, batch: &[Write]) -> Result<(Vec<Segment>, Vec<&Write>)> {
    let (groups, others) = super::record_segments(batch);
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let mut seg = Segment::default();
        for w in group {
            let record = w.record;
            let row = RecordRow {
                id: record.id.0 as i64,
                shard: (record.id.0 % u64::from(shards)) as i32,
                task_id: record.task_id.0 as i64,
                state: record.state.as_str(),
                live: !record.state.is_terminal(),
                distributor: record.distributor.as_str().to_owned(),
                version: record.version as i64,
                expected: w.expected.unwrap_or(0) as i64,
                json: serde_json::to_string(&**record).map_err(json_err)?,
            };
            match w.expected {
                None => seg.inserts.push(row),
                Some(_) => seg.updates.push(row),
            }
            for h in w.history {
                seg.history.push((
                    h.execution_id.0 as i64,
                    h.version as i64,
                    serde_json::to_string(h).map_err(json_err)?,
                ));
            }
        }
        out.push(seg);
    }
    Ok((out, others))
}

fn decode(row: &sqlx::postgres::PgRow) -> Result<ExecutionRecord> {
    let text: String = row.try_get("record").map_err(store_err("read"))?;
    serde_json::from_str(&text).map_err(json_err)
}

fn decode_deferred(r: &sqlx::postgres::PgRow) -> Result<(u64, DistributorName, DeferredWork)> {
    let id: i64 = r.try_get("id").map_err(store_err("deferred"))?;
    let d: String = r.try_get("distributor").map_err(store_err("deferred"))?;
    let w: String = r.try_get("work").map_err(store_err("deferred"))?;
    Ok((
        id as u64,
        DistributorName::from(d),
        serde_json::from_str(&w).map_err(json_err)?,
    ))
}

#[async_trait]
impl Store for PostgresStore {
    /// Also fails with [`Error::Fenced`] (nothing written) if the batch writes an execution or
    /// deferred work of a shard this handle does not hold at its epoch.
    async fn apply(&self, batch: &[Write]) -> Result<()> {
        let me = &*self.inner;
        let touched = me.touched(batch);
        let (mut segs, others) = segments(me.shards, batch)?;
        // The engine's batches (every record once, nothing else) go as one statement.
        if segs.len() == 1 && others.is_empty() && !touched.is_empty() {
            let seg = segs.pop().unwrap_or_default();
            match me.apply_in_one_statement(&touched, &seg).await {
                Ok(()) => {
                    me.commits[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                // Nothing was written: the transaction below says precisely what failed (the
                // fence, which record), or succeeds if the failure was passing.
                Err(e) => tracing::debug!(error = %e, "one-statement commit failed; retrying"),
            }
            segs.push(seg);
        }
        let mut tx = me.pool.begin().await.map_err(store_err("begin"))?;
        if !touched.is_empty() {
            me.fence(&mut tx, &touched).await?;
        }
        for seg in segs {
            me.write_segment(&mut tx, seg).await?;
        }
        for w in others {
            me.apply_other(&mut tx, w).await?;
        }
        tx.commit().await.map_err(store_err("commit"))?;
        me.commits[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn get(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>> {
        let row = sqlx::query("SELECT record::text AS record FROM executions WHERE id = $1")
            .bind(id.0 as i64)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_err("get"))?;
        row.as_ref().map(decode).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<ExecutionRecord>> {
        let mut sql = String::from("SELECT record::text AS record FROM executions WHERE id > $1");
        let mut n = 1;
        let mut arg = || {
            n += 1;
            format!("${n}")
        };
        if !filter.states.is_empty() {
            sql.push_str(&format!(" AND state = ANY({}::text[])", arg()));
        }
        if filter.distributor.is_some() {
            sql.push_str(&format!(" AND distributor = {}", arg()));
        }
        if filter.task_id.is_some() {
            sql.push_str(&format!(" AND task_id = {}", arg()));
        }
        sql.push_str(" ORDER BY id");
        if filter.labels.is_empty() {
            sql.push_str(&format!(" LIMIT {}", filter.limit()));
        }
        let mut q =
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(filter.after.map_or(0, |a| a.0 as i64));
        if !filter.states.is_empty() {
            q = q.bind(filter.states.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        }
        if let Some(d) = &filter.distributor {
            q = q.bind(d.as_str().to_owned());
        }
        if let Some(t) = filter.task_id {
            q = q.bind(t.0 as i64);
        }
        let rows = q
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_err("list"))?;
        let mut out = Vec::new();
        for row in &rows {
            let r = decode(row)?;
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
        let rows =
            sqlx::query("SELECT e.record::text AS record FROM live_executions l JOIN executions e ON e.id = l.id ORDER BY l.id")
                .fetch_all(&self.inner.pool)
                .await
                .map_err(store_err("live"))?;
        rows.iter().map(decode).collect()
    }

    async fn history(&self, id: ExecutionId) -> Result<Vec<HistoryEntry>> {
        let rows = sqlx::query(
            "SELECT entry::text AS entry FROM history WHERE execution_id = $1 ORDER BY version",
        )
        .bind(id.0 as i64)
        .fetch_all(&self.inner.pool)
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
        let v: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM executions")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err("max_id"))?;
        Ok(v.map_or(0, |v| v as u64))
    }

    async fn meta(&self, key: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_err("meta"))
    }

    async fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        // A range on the primary key (byte-wise, `COLLATE "C"`) rather than LIKE, which would
        // treat `%` and `_` in the prefix as wildcards.
        let rows = sqlx::query(
            "SELECT key, value FROM meta WHERE key >= $1 AND left(key, length($1)) = $1 ORDER BY key",
        )
        .bind(prefix)
        .fetch_all(&self.inner.pool)
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
        let rows =
            sqlx::query("SELECT id, distributor, work::text AS work FROM deferred ORDER BY id")
                .fetch_all(&self.inner.pool)
                .await
                .map_err(store_err("deferred"))?;
        rows.iter().map(decode_deferred).collect()
    }

    async fn meta_init(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query_scalar(
            "WITH i AS (INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING RETURNING value) \
             SELECT value FROM i UNION ALL SELECT value FROM meta WHERE key = $1 LIMIT 1",
        )
        .bind(key)
        .bind(value)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(store_err("meta"))
    }

    fn shared(&self) -> Option<Arc<dyn SharedStore>> {
        Some(self.inner.clone())
    }
}

#[async_trait]
impl SharedStore for Inner {
    fn shard_count(&self) -> u32 {
        self.shards
    }

    fn instance_id(&self) -> &str {
        &self.instance
    }

    fn round_interval(&self) -> Duration {
        self.ttl / 3
    }

    fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    fn held(&self) -> Vec<ShardId> {
        self.held_map().keys().copied().collect()
    }

    async fn round(&self) -> Result<LeaseRound> {
        let ttl = secs(self.ttl);
        let mut tx = self.pool.begin().await.map_err(store_err("lease round"))?;
        // `xmax = 0`: the row was inserted, not updated (this instance joins).
        let joined: bool = sqlx::query_scalar(
            "INSERT INTO instances (id, expires_at) VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at RETURNING (xmax = 0)",
        )
        .bind(&self.instance)
        .bind(ttl)
        .fetch_one(&mut *tx)
        .await
        .map_err(store_err("lease round"))?;
        if joined {
            // The others hand shards over at once instead of at their next round.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(INBOX_CHANNEL)
                .bind(MEMBERSHIP)
                .execute(&mut *tx)
                .await
                .map_err(store_err("lease round"))?;
        }
        let members: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instances WHERE expires_at > now()")
                .fetch_one(&mut *tx)
                .await
                .map_err(store_err("lease round"))?;
        let members = (members.max(1)) as usize;
        let held: Vec<(i32, i64)> = self
            .held_map()
            .iter()
            .map(|(s, e)| (*s as i32, *e))
            .collect();
        let (ss, es): (Vec<i32>, Vec<i64>) = held.iter().copied().unzip();
        let renewed: Vec<i32> = sqlx::query_scalar(
            "UPDATE shard_lease l SET expires_at = now() + make_interval(secs => $3) \
             FROM UNNEST($1::int4[], $2::int8[]) AS h(shard, epoch) \
             WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $4 RETURNING l.shard",
        )
        .bind(&ss)
        .bind(&es)
        .bind(ttl)
        .bind(&self.instance)
        .fetch_all(&mut *tx)
        .await
        .map_err(store_err("lease round"))?;
        let renewed: HashSet<i32> = renewed.into_iter().collect();
        let lost: Vec<ShardId> = ss
            .iter()
            .filter(|s| !renewed.contains(s))
            .map(|s| *s as u32)
            .collect();
        let fair = (self.shards as usize).div_ceil(members);
        let owned = renewed.len();
        let mut gained = Vec::new();
        if owned < fair {
            let rows = sqlx::query(
                "WITH free AS ( \
                   SELECT shard FROM shard_lease WHERE owner IS NULL OR expires_at < now() \
                   ORDER BY owner IS NULL DESC, shard LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE shard_lease l SET owner = $2, epoch = l.epoch + 1, \
                   expires_at = now() + make_interval(secs => $3) \
                 FROM free WHERE l.shard = free.shard RETURNING l.shard, l.epoch",
            )
            .bind((fair - owned) as i64)
            .bind(&self.instance)
            .bind(ttl)
            .fetch_all(&mut *tx)
            .await
            .map_err(store_err("lease round"))?;
            for r in rows {
                let s: i32 = r.try_get("shard").map_err(store_err("lease round"))?;
                let e: i64 = r.try_get("epoch").map_err(store_err("lease round"))?;
                gained.push((s as u32, e));
            }
        }
        tx.commit().await.map_err(store_err("lease round"))?;
        let mut map = self.held_map();
        for s in &lost {
            map.remove(s);
        }
        for (s, e) in &gained {
            map.insert(*s, *e);
        }
        let excess = if map.len() > fair {
            map.keys().rev().take(map.len() - fair).copied().collect()
        } else {
            Vec::new()
        };
        if !lost.is_empty() {
            tracing::warn!(instance = %self.instance, ?lost, "shard leases lost to another instance");
        }
        if !gained.is_empty() {
            tracing::info!(instance = %self.instance, gained = ?gained.iter().map(|g| g.0).collect::<Vec<_>>(), "shards acquired");
        }
        Ok(LeaseRound {
            gained: gained.into_iter().map(|g| g.0).collect(),
            lost,
            excess,
            members,
        })
    }

    async fn release(&self, shards: &[ShardId]) -> Result<()> {
        let pairs: Vec<(i32, i64)> = {
            let mut map = self.held_map();
            shards
                .iter()
                .filter_map(|s| map.remove(s).map(|e| (*s as i32, e)))
                .collect()
        };
        if pairs.is_empty() {
            return Ok(());
        }
        let (ss, es): (Vec<i32>, Vec<i64>) = pairs.into_iter().unzip();
        // The NOTIFY has the instances short of their share take the shards at once.
        sqlx::query(
            "WITH r AS (UPDATE shard_lease l SET owner = NULL, expires_at = now() \
               FROM UNNEST($1::int4[], $2::int8[]) AS h(shard, epoch) \
               WHERE l.shard = h.shard AND l.epoch = h.epoch AND l.owner = $3 RETURNING l.shard) \
             SELECT pg_notify($4, $5) WHERE EXISTS (SELECT 1 FROM r)",
        )
        .bind(&ss)
        .bind(&es)
        .bind(&self.instance)
        .bind(INBOX_CHANNEL)
        .bind(MEMBERSHIP)
        .execute(&self.pool)
        .await
        .map_err(store_err("release"))?;
        tracing::info!(instance = %self.instance, released = ?ss, "shards released");
        Ok(())
    }

    async fn leave(&self) -> Result<()> {
        let all = self.held();
        self.release(&all).await?;
        sqlx::query(
            "WITH d AS (DELETE FROM instances WHERE id = $1 RETURNING id) \
             SELECT pg_notify($2, $3) FROM d",
        )
        .bind(&self.instance)
        .bind(INBOX_CHANNEL)
        .bind(MEMBERSHIP)
        .execute(&self.pool)
        .await
        .map_err(store_err("leave"))?;
        Ok(())
    }

    async fn load(&self, shards: &[ShardId]) -> Result<ShardLoad> {
        let ss: Vec<i32> = shards.iter().map(|s| *s as i32).collect();
        let rows = sqlx::query(
            "SELECT e.record::text AS record FROM live_executions l JOIN executions e ON e.id = l.id \
             WHERE l.shard = ANY($1) ORDER BY l.id",
        )
        .bind(&ss)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err("load"))?;
        let live = rows.iter().map(decode).collect::<Result<Vec<_>>>()?;
        let rows = sqlx::query(
            "SELECT id, distributor, work::text AS work FROM deferred WHERE shard = ANY($1) ORDER BY id",
        )
        .bind(&ss)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err("load"))?;
        let deferred = rows
            .iter()
            .map(decode_deferred)
            .collect::<Result<Vec<_>>>()?;
        // New ids of an acquired shard continue after the highest id stored in any shard
        // (one primary-key lookup, no index per shard): unique within the shard, since the
        // previous owner can no longer commit there, and ids need not be dense.
        let e: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM executions")
            .fetch_one(&self.pool)
            .await
            .map_err(store_err("load"))?;
        let d: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM deferred")
            .fetch_one(&self.pool)
            .await
            .map_err(store_err("load"))?;
        let (e, d) = (e.unwrap_or(0) as u64, d.unwrap_or(0) as u64);
        let max_ids = shards.iter().map(|s| (*s, e, d)).collect();
        Ok(ShardLoad {
            live,
            deferred,
            max_ids,
        })
    }

    async fn post(&self, id: ExecutionId, cmd: &Routed) -> Result<()> {
        sqlx::query(
            "WITH i AS (INSERT INTO inbox (shard, execution_id, cmd) VALUES ($1, $2, $3::text::jsonb) RETURNING shard) \
             SELECT pg_notify($4, shard::text) FROM i",
        )
        .bind(self.shard_of(id.0) as i32)
        .bind(id.0 as i64)
        .bind(serde_json::to_string(cmd).map_err(json_err)?)
        .bind(INBOX_CHANNEL)
        .execute(&self.pool)
        .await
        .map_err(store_err("post"))?;
        Ok(())
    }

    async fn inbox(&self, shards: &[ShardId]) -> Result<Vec<(i64, ExecutionId, Routed)>> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let ss: Vec<i32> = shards.iter().map(|s| *s as i32).collect();
        let rows = sqlx::query(
            "SELECT id, execution_id, cmd::text AS cmd FROM inbox WHERE shard = ANY($1) ORDER BY id LIMIT 1024",
        )
        .bind(&ss)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err("inbox"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get("id").map_err(store_err("inbox"))?;
            let e: i64 = r.try_get("execution_id").map_err(store_err("inbox"))?;
            let c: String = r.try_get("cmd").map_err(store_err("inbox"))?;
            match serde_json::from_str(&c) {
                Ok(cmd) => out.push((id, ExecutionId(e as u64), cmd)),
                Err(err) => {
                    tracing::error!(row = id, error = %err, "unreadable inbox row dropped");
                    self.ack(&[id]).await?;
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM inbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(store_err("ack"))?;
        Ok(())
    }

    async fn wakeup(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut l) => match l.listen(INBOX_CHANNEL).await {
                    Ok(()) => *guard = Some(l),
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed; polling the inbox"),
                },
                Err(e) => tracing::warn!(error = %e, "no LISTEN connection; polling the inbox"),
            }
        }
        let Some(l) = guard.as_mut() else {
            drop(guard);
            tokio::time::sleep_until(deadline).await;
            return false;
        };
        loop {
            match tokio::time::timeout_at(deadline, l.try_recv()).await {
                Err(_) => return false,
                // Connection lost (and re-established): notifications may have been missed.
                Ok(Ok(None)) => return false,
                Ok(Ok(Some(n))) if n.payload() == MEMBERSHIP => return true,
                Ok(Ok(Some(n))) => {
                    let mine = n
                        .payload()
                        .parse::<u32>()
                        .is_ok_and(|s| self.held_map().contains_key(&s));
                    if mine {
                        return false;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "LISTEN connection failed; reconnecting later");
                    *guard = None;
                    return false;
                }
            }
        }
    }
}
