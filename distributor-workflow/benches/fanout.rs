//! A 1,000-step fan-out workflow on the fake distributor, next to the same 1,000 executions
//! submitted directly (`submit_many` + a wait on each), in the same run; prints steps/s, the
//! engine overhead per step of each, and the ratio. Run with:
//!
//! ```text
//! cargo bench -p distributor-workflow --bench fanout
//! ```
//!
//! `WF_BENCH_STEPS` (default 1000) and `WF_BENCH_ROUNDS` (default 5; the median is printed)
//! change the size. Both stores: memory, and SQLite in a temporary directory (the default store
//! of the orchestrator, where the workflow's own documents cost writes too).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::store::{MemoryStore, SqliteStore, Store};
use distributor_core::testing::FakeConfig;
use distributor_core::{DistributorsConfig, Engine, Registry, Task};
use distributor_workflow::{RunState, WorkflowSpec, Workflows};
use serde_json::json;

async fn engine(store: Arc<dyn Store>, backend: &str) -> Engine {
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": backend}}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).unwrap();
    Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store)
        .build()
        .await
        .unwrap()
}

async fn store(kind: &str, dir: &std::path::Path, n: usize) -> Arc<dyn Store> {
    match kind {
        "memory" => Arc::new(MemoryStore::new()),
        _ => Arc::new(
            SqliteStore::open(dir.join(format!("b{n}.db")))
                .await
                .unwrap(),
        ),
    }
}

async fn direct(e: &Engine, n: usize) -> Duration {
    let t0 = Instant::now();
    let tasks: Vec<Task> = (0..n)
        .map(|i| {
            Task::new(
                "fake",
                json!({"outcome": {"outcome": "succeeded", "data": i}}),
            )
        })
        .collect();
    let ids = e.submit_many(tasks).await.unwrap();
    let waits: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let e = e.clone();
            tokio::spawn(async move { e.wait_task(id).await.unwrap() })
        })
        .collect();
    for w in waits {
        w.await.unwrap();
    }
    t0.elapsed()
}

async fn workflow(e: &Engine, n: usize) -> Duration {
    let spec = WorkflowSpec::from_value(
        "bench",
        &json!({
            "name": "fanout",
            "params": {"items": {}},
            "steps": [{
                "name": "fan",
                "distributor": "fake",
                "for_each": "{{ params.items }}",
                "payload": {"outcome": {"outcome": "succeeded", "data": "{{ item }}"}}
            }]
        }),
    )
    .unwrap();
    let w = Workflows::open(e.clone()).await.unwrap();
    let mut params = BTreeMap::new();
    params.insert("items".to_owned(), json!((0..n).collect::<Vec<_>>()));
    let t0 = Instant::now();
    let run = w.start(spec, params).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    let t = t0.elapsed();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.units["fan"].len(), n);
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("WF_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rounds: usize = std::env::var("WF_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut k = 0;
        println!("fan-out of {n} steps on the fake, median of {rounds} rounds");
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>14} {:>14} {:>7}",
            "store", "direct", "workflow", "steps/s", "direct/step", "workflow/step", "ratio"
        );
        for kind in ["memory", "sqlite"] {
            let (mut ds, mut ws) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                // Alternate the order so neither side always runs on a warmer process.
                k += 1;
                let e1 = engine(store(kind, dir.path(), k).await, &format!("bench-d{k}")).await;
                k += 1;
                let e2 = engine(store(kind, dir.path(), k).await, &format!("bench-w{k}")).await;
                if r % 2 == 0 {
                    ds.push(direct(&e1, n).await);
                    ws.push(workflow(&e2, n).await);
                } else {
                    ws.push(workflow(&e2, n).await);
                    ds.push(direct(&e1, n).await);
                }
                e1.shutdown().await;
                e2.shutdown().await;
            }
            let (d, w) = (median(ds), median(ws));
            let per = |t: Duration| format!("{:.1} µs", t.as_secs_f64() * 1e6 / n as f64);
            println!(
                "{:<8} {:>12} {:>12} {:>12.0} {:>14} {:>14} {:>7.2}",
                kind,
                format!("{:.1} ms", d.as_secs_f64() * 1e3),
                format!("{:.1} ms", w.as_secs_f64() * 1e3),
                n as f64 / w.as_secs_f64(),
                per(d),
                per(w),
                w.as_secs_f64() / d.as_secs_f64()
            );
        }
    });
}
