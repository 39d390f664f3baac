//! Engine throughput and memory, each printed next to a baseline measured in the same run.
//!
//! Run with: `cargo bench -p distributor-core --bench engine` (add `-- --quick` for a short run).
//!
//! (a) Full lifecycles per second (submit → run → push Running → push Finished → terminal) with
//!     the fake distributor and `MemoryStore`, next to a bare tokio mpsc + HashMap loop doing the
//!     same number of state changes.
//! (b) The same with `SqliteStore` on a temp file, next to raw SQLite (sqlx) inserting and
//!     updating the same number of rows in transactions of the same size.
//! (c) RSS per pending execution with 100k executions pending (engine + a stateless adapter).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use distributor_core::store::{MemoryStore, SqliteStore, Store};
use distributor_core::testing::FakeConfig;
use distributor_core::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const TRANSITIONS_PER_LIFECYCLE: usize = 5; // queued, dispatching, pending, running, succeeded

/// The system allocator, counting live heap bytes while `COUNTING` is set (for (c): the heap the
/// engine really holds, as opposed to RSS, which also has the allocator's free lists in it).
struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            LIVE.fetch_add(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size() as i64, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if COUNTING.load(std::sync::atomic::Ordering::Relaxed) {
            LIVE.fetch_add(
                new as i64 - layout.size() as i64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn lifecycles(store: Arc<dyn Store>, n: usize, backend: &str) -> Duration {
    let registry = Registry::new()
        .register::<FakeConfig>()
        .unwrap()
        .register::<NullConfig>()
        .unwrap();
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": backend}}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).unwrap();
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store)
        .build()
        .await
        .unwrap();
    // 16 submitters, each submitting chunks of 64 and keeping up to 4 chunks in flight (as an
    // orchestrator feeding a queue with a bounded window would): up to 4,096 executions in
    // flight, each waited for.
    let workers = 16;
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for w in 0..workers {
        let e = engine.clone();
        let per = n / workers + usize::from(w < n % workers);
        joins.push(tokio::spawn(async move {
            let mut window = std::collections::VecDeque::new();
            let mut left = per;
            while left > 0 || !window.is_empty() {
                if left > 0 && window.len() < 4 {
                    let k = left.min(64);
                    left -= k;
                    window.push_back(
                        e.submit_many(vec![Task::new("fake", json!({})); k])
                            .await
                            .unwrap(),
                    );
                    continue;
                }
                for id in window.pop_front().unwrap_or_default() {
                    let r = e.wait(id).await.unwrap();
                    assert_eq!(r.state, State::Succeeded);
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let d = t0.elapsed();
    engine.shutdown().await;
    d
}

/// The baseline for (a): one task owning a HashMap, fed by an mpsc channel, making the same
/// number of state changes per lifecycle, with a oneshot reply per submit like the engine's API.
async fn bare_loop(n: usize) -> Duration {
    enum Msg {
        Submit(u64, tokio::sync::oneshot::Sender<()>),
        Advance(u64),
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Msg>();
    let tx2 = tx.clone();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let actor = tokio::spawn(async move {
        let mut states: HashMap<u64, (u8, u64)> = HashMap::new();
        while let Some(m) = rx.recv().await {
            match m {
                Msg::Submit(id, reply) => {
                    states.insert(id, (1, 1));
                    let _ = reply.send(());
                    let _ = tx2.send(Msg::Advance(id));
                }
                Msg::Advance(id) => {
                    let s = states.get_mut(&id).unwrap();
                    s.0 += 1;
                    s.1 += 1;
                    if usize::from(s.0) < TRANSITIONS_PER_LIFECYCLE {
                        let _ = tx2.send(Msg::Advance(id));
                    } else {
                        states.remove(&id);
                        let _ = done_tx.send(id);
                    }
                }
            }
        }
    });
    let t0 = Instant::now();
    for id in 0..n as u64 {
        let (r, w) = tokio::sync::oneshot::channel();
        tx.send(Msg::Submit(id, r)).unwrap();
        w.await.unwrap();
    }
    for _ in 0..n {
        done_rx.recv().await.unwrap();
    }
    let d = t0.elapsed();
    drop(tx);
    actor.abort();
    d
}

/// A WAL, `synchronous=NORMAL` database at `path` with the baselines' one table.
async fn raw_pool(path: &std::path::Path) -> sqlx::SqlitePool {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, state TEXT, version INTEGER, record TEXT)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

/// The baseline for (b): raw sqlx inserts and updates of the same rows, batched like the engine.
async fn raw_sqlite(n: usize, path: &std::path::Path) -> Duration {
    let pool = raw_pool(path).await;
    let record = "x".repeat(900); // about the size of a serialized execution record
    let batch = 512;
    let t0 = Instant::now();
    for chunk in (0..n as i64).collect::<Vec<_>>().chunks(batch) {
        let mut tx = pool.begin().await.unwrap();
        for id in chunk {
            sqlx::query("INSERT INTO t VALUES (?, 'queued', 1, ?)")
                .bind(id)
                .bind(&record)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        for v in 2..=TRANSITIONS_PER_LIFECYCLE as i64 {
            let mut tx = pool.begin().await.unwrap();
            for id in chunk {
                sqlx::query("UPDATE t SET state = 's', version = ?, record = ? WHERE id = ? AND version = ?")
                    .bind(v)
                    .bind(&record)
                    .bind(id)
                    .bind(v - 1)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
    t0.elapsed()
}

/// A stronger baseline for (b): the same rows written with multi-row statements (256 rows per
/// statement, as the store writes them), one transaction per state change of a chunk.
async fn raw_sqlite_batched(n: usize, path: &std::path::Path) -> Duration {
    let pool = raw_pool(path).await;
    let record = "x".repeat(900);
    let rows = |n: usize, row: &str| vec![row; n].join(", ");
    let t0 = Instant::now();
    for chunk in (0..n as i64).collect::<Vec<_>>().chunks(256) {
        let mut tx = pool.begin().await.unwrap();
        let sql = format!(
            "INSERT INTO t VALUES {}",
            rows(chunk.len(), "(?, 'queued', 1, ?)")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id).bind(record.clone());
        }
        q.execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        for v in 2..=TRANSITIONS_PER_LIFECYCLE as i64 {
            let mut tx = pool.begin().await.unwrap();
            let sql = format!(
                "WITH u (id, version, record, expected) AS (VALUES {}) UPDATE t SET state = 's', \
                 version = u.version, record = u.record FROM u WHERE t.id = u.id \
                 AND t.version = u.expected",
                rows(chunk.len(), "(?, ?, ?, ?)")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(*id).bind(v).bind(record.clone()).bind(v - 1);
            }
            let done = q.execute(&mut *tx).await.unwrap();
            assert_eq!(done.rows_affected(), chunk.len() as u64);
            tx.commit().await.unwrap();
        }
    }
    t0.elapsed()
}

// A stateless adapter for the memory measurement: the work is "pending" forever, and the adapter
// keeps nothing per execution, so the RSS growth is the engine's.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
struct NullConfig {}

#[derive(Debug)]
struct Null;

#[async_trait]
impl KindConfig for NullConfig {
    const KIND: &'static str = "null";
    type Payload = Value;
    async fn build(self, _: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(Null))
    }
}

#[async_trait]
impl Distributor for Null {
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        Ok(Launch::new(task.request_id.as_str()))
    }
    async fn cancel(&self, _: &Execution) -> Result<()> {
        Ok(())
    }
    async fn status(&self, _: &Execution) -> Result<Status> {
        Ok(Status::Pending)
    }
    fn info_url(&self, _: &Execution) -> Option<url::Url> {
        None
    }
    async fn handle_notification(&self, _: &Execution, _: &Notification) -> Result<Option<Status>> {
        Ok(None)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: true,
            ..Capabilities::default()
        }
    }
}

async fn rss_per_pending(n: usize) -> (f64, f64, u64) {
    let registry = Registry::new().register::<NullConfig>().unwrap();
    let doc = json!({"distributors": {"null": {"kind": "null"}}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).unwrap();
    // The embedded default store: the engine's live records are then the only copy in memory.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("rss.db")).await.unwrap());
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store.clone())
        .build()
        .await
        .unwrap();
    let payload = if std::env::var("EMPTY").is_ok() {
        json!({})
    } else {
        json!({"argv": ["sleep", "3600"], "env": {"A": "1"}})
    };
    let before = rss_bytes();
    COUNTING.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(
            engine
                .submit(Task::new("null", payload.clone()))
                .await
                .unwrap(),
        );
    }
    // Let every dispatch settle into Pending. Checked on the last one only (dispatches are
    // handled in submission order), so that the check itself does not load 100k records into
    // memory before RSS is read; every record is checked once RSS has been read.
    let last = *ids.last().expect("n > 0");
    while engine.get(last).await.unwrap().state != State::Pending {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_bytes();
    COUNTING.store(false, std::sync::atomic::Ordering::Relaxed);
    // Frees of blocks allocated before counting started make this an underestimate by at most
    // those blocks; counting starts on an idle engine, so there are few.
    let heap = LIVE.load(std::sync::atomic::Ordering::Relaxed).max(0) as f64 / n as f64;
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let pending = store
        .live()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.state == State::Pending)
        .count();
    assert_eq!(pending, n, "every execution pending when RSS was read");
    engine.shutdown().await;
    (per, heap, after - before)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 100_000 };
    // `--only=a`, `--only=b`, `--only=c` (or a combination such as `--only=ab`) runs a subset.
    let only = std::env::args()
        .find_map(|a| a.strip_prefix("--only=").map(str::to_owned))
        .unwrap_or_else(|| "abc".to_owned());
    // `--engine-only` skips the baselines (for profiling the engine).
    let engine_only = std::env::args().any(|a| a == "--engine-only");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("engine bench: {n} lifecycles per measurement, 2 runs each, best kept\n");
        if only.contains('a') {
        // (a) memory
        let mut best_engine = Duration::MAX;
        let mut best_bare = Duration::MAX;
        for run in 0..2 {
            best_engine = best_engine.min(lifecycles(Arc::new(MemoryStore::new()), n, &format!("bench-mem-{run}")).await);
            if !engine_only {
                best_bare = best_bare.min(bare_loop(n).await);
            }
        }
        let eps = n as f64 / best_engine.as_secs_f64();
        let bps = n as f64 / best_bare.as_secs_f64();
        println!("(a) MemoryStore : {:>10.0} lifecycles/s  ({:.2?} for {n})", eps, best_engine);
        println!("    bare loop   : {:>10.0} lifecycles/s  ({:.2?})   engine/bare time ratio {:.1}x", bps, best_bare, best_engine.as_secs_f64() / best_bare.as_secs_f64());
        }
        if only.contains('b') {
        // (b) sqlite
        let m = n / 2;
        let mut best_engine = Duration::MAX;
        let mut best_raw = Duration::MAX;
        let mut best_batched = Duration::MAX;
        for run in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path().join("engine.db")).await.unwrap();
            best_engine = best_engine.min(lifecycles(Arc::new(store), m, &format!("bench-sql-{run}")).await);
            if !engine_only {
                best_raw = best_raw.min(raw_sqlite(m, &dir.path().join("raw.db")).await);
                best_batched = best_batched.min(raw_sqlite_batched(m, &dir.path().join("batched.db")).await);
            }
        }
        println!(
            "(b) SqliteStore : {:>10.0} lifecycles/s  ({:.2?} for {m})",
            m as f64 / best_engine.as_secs_f64(),
            best_engine
        );
        println!(
            "    raw SQLite, one statement per row   : {:>10.0} rows/s (1 insert + 4 updates each)  ({:.2?})   engine/raw time ratio {:.1}x",
            m as f64 / best_raw.as_secs_f64(),
            best_raw,
            best_engine.as_secs_f64() / best_raw.as_secs_f64()
        );
        println!(
            "    raw SQLite, 256 rows per statement  : {:>10.0} rows/s (1 insert + 4 updates each)  ({:.2?})   engine/raw time ratio {:.1}x",
            m as f64 / best_batched.as_secs_f64(),
            best_batched,
            best_engine.as_secs_f64() / best_batched.as_secs_f64()
        );
        }
        if only.contains('c') {
        // (c) memory per pending execution
        let (per, heap, total) = rss_per_pending(100_000).await;
        println!("(c) RSS: {:.0} bytes per pending execution at 100k pending ({:.1} MiB total); live heap: {:.0} bytes per pending execution", per, total as f64 / 1048576.0, heap);
        }
    });
}
