//! What the switch costs per task, next to the same tasks on a bare `fake` in the same run.
//!
//! Run with: `cargo bench -p distributor-switch --bench dispatch` (`SWITCH_BENCH_TASKS=N` to
//! change the number of tasks, default 2000).
//!
//! For each store (`MemoryStore`, then `SqliteStore` on a temp file) one engine has two
//! distributors: `fake` (a bare fake, the baseline) and `sw` (a switch over two fakes with its
//! cutover in the middle of the intervals, so half the tasks go to each side). Each column
//! submits N tasks that succeed at once in one `submit_many` and waits for all of them; it
//! prints tasks per second and the ratio switch / baseline. Every switch dispatch reads the
//! routing state from the store and, for tasks going to `before` in rising interval order, writes
//! its watermark before calling the side: that write is outside the engine's group commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::store::{MemoryStore, SqliteStore, Store};
use distributor_core::testing::FakeConfig;
use distributor_core::{DistributorsConfig, Engine, Registry, Task};
use distributor_switch::{SwitchConfig, format_time};
use serde_json::json;

/// 2026-12-02T15:00:00Z.
const T0: i64 = 1_796_223_600_000;
const STEP: i64 = 15_000;

async fn engine(store: Arc<dyn Store>, tag: &str) -> Engine {
    let registry = Registry::new()
        .register::<SwitchConfig>()
        .unwrap()
        .register::<FakeConfig>()
        .unwrap();
    let doc = json!({ "distributors": {
        "fake": { "kind": "fake", "backend": format!("bench-{tag}-bare"), "push": true },
        "sw": {
            "kind": "switch",
            "before": { "kind": "fake", "backend": format!("bench-{tag}-before") },
            "after": { "kind": "fake", "backend": format!("bench-{tag}-after") },
        },
    }});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).unwrap();
    Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store)
        .build()
        .await
        .unwrap()
}

async fn column(engine: &Engine, tasks: Vec<Task>) -> Duration {
    let t = Instant::now();
    let ids = engine.submit_many(tasks).await.unwrap();
    for id in ids {
        let rec = engine.wait(id).await.unwrap();
        assert!(rec.outcome.is_some_and(|o| o.is_success()));
    }
    t.elapsed()
}

async fn run(name: &str, store: Arc<dyn Store>, n: usize) {
    let e = engine(store, name).await;
    let cutover = T0 + (n as i64 / 2) * STEP;
    let cutover = cutover - cutover.rem_euclid(60_000);
    e.control(
        "sw",
        &json!({ "op": "set", "cutover": cutover, "who": "bench", "why": "half and half" }),
    )
    .await
    .unwrap();
    let bare: Vec<_> = (0..n).map(|_| Task::new("fake", json!({}))).collect();
    let switched: Vec<_> = (0..n)
        .map(|k| {
            Task::new(
                "sw",
                json!({
                    "interval_start": format_time(T0 + k as i64 * STEP),
                    "interval_ms": STEP,
                    "payload": {},
                }),
            )
        })
        .collect();
    let base = column(&e, bare).await;
    let sw = column(&e, switched).await;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "{name:<8} {n} tasks: bare fake {:>8.0} tasks/s ({:.1} µs/task) | switch {:>8.0} tasks/s ({:.1} µs/task) | ratio switch/bare time {:.2}",
        rate(base),
        base.as_secs_f64() * 1e6 / n as f64,
        rate(sw),
        sw.as_secs_f64() * 1e6 / n as f64,
        sw.as_secs_f64() / base.as_secs_f64()
    );
    e.shutdown().await;
}

fn main() {
    let n: usize = std::env::var("SWITCH_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        run("memory", Arc::new(MemoryStore::new()), n).await;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("bench.db"))
            .await
            .unwrap();
        run("sqlite", Arc::new(store), n).await;
    });
}
