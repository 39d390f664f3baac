//! Swarming adapter throughput against the in-process fake (`swarming-fake`, loopback HTTP).
//!
//! Run with: `cargo bench -p distributor-swarming --bench poll`
//!
//! 1. **Submits/s**: `run` for `SWARMING_BENCH_TASKS` (default 1000) tasks, 16 at a time;
//!    baseline: the same number of raw `NewTask` pRPC calls (same body shape, plain reqwest, no
//!    adapter), so the ratio is the adapter's overhead over the wire protocol.
//! 2. **One poll of 1000 tasks**: `status_batch` over 1000 executions (one `BatchGetResult`);
//!    baseline: `status` for each of them, one `GetResult` after another (what an adapter
//!    without batch status costs the engine).
//!
//! Each figure is the median of 5 rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::{
    AdapterHandle, BuildContext, Distributor, Execution, ExecutionId, KindConfig, RequestId,
    TaskDescription,
};
use distributor_swarming::SwarmingConfig;
use serde_json::json;
use swarming_fake::{Behaviour, FakeSwarming, Options};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("SWARMING_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let fake = FakeSwarming::start_with(Options {
        bots: 100_000,
        ..Options::default()
    })
    .await
    .expect("fake");
    fake.set_default_behaviour(Behaviour {
        run_ms: 10,
        ..Behaviour::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "bench").expect("token");
    let config: SwarmingConfig = serde_json::from_value(json!({
        "url": fake.url().as_str(), "token": {"file": token}, "pool": "default"
    }))
    .expect("config");
    let d: Arc<dyn Distributor> = config
        .build(BuildContext::detached("bench"))
        .await
        .expect("build");

    let mut adapter_runs = Vec::new();
    let mut raw_runs = Vec::new();
    let mut executions = Vec::new();
    let http = reqwest::Client::new();
    let url = fake
        .url()
        .join("prpc/swarming.v2.Tasks/NewTask")
        .expect("url");
    for round in 0..5 {
        // Adapter: run().
        let started = Instant::now();
        let mut round_execs = Vec::with_capacity(n);
        let tasks: Vec<TaskDescription> = (0..n)
            .map(|i| {
                TaskDescription::new(
                    ExecutionId((round * n + i) as u64 + 1),
                    RequestId::random(),
                    "bench",
                    json!({"command": ["true"]}),
                )
            })
            .collect();
        for chunk in tasks.chunks(16) {
            let launches = futures_join(chunk.iter().map(|t| {
                let d = Arc::clone(&d);
                let t = t.clone();
                async move { (d.run(&t).await.expect("run"), t) }
            }))
            .await;
            for (l, t) in launches {
                round_execs.push(Execution {
                    id: t.execution_id,
                    task_id: t.task_id,
                    attempt: t.attempt,
                    request_id: t.request_id,
                    payload: t.payload,
                    token: l.token,
                    handle: AdapterHandle::default(),
                });
            }
        }
        adapter_runs.push(started.elapsed());
        executions = round_execs;

        // Baseline: raw NewTask calls.
        let started = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
            futures_join(chunk.iter().map(|i| {
                let http = http.clone();
                let url = url.clone();
                let body = json!({
                    "name": format!("raw-{i}"), "priority": 100,
                    "requestUuid": uuid_like(round, *i),
                    "tags": ["bench:raw"],
                    "taskSlices": [{"expirationSecs": 3600, "properties": {
                        "command": ["true"], "executionTimeoutSecs": 3600,
                        "dimensions": [{"key": "pool", "value": "default"}]}}]
                });
                async move {
                    let r = http
                        .post(url)
                        .header("content-type", "application/json")
                        .header("accept", "application/json")
                        .header("authorization", "Bearer bench")
                        .body(body.to_string())
                        .send()
                        .await
                        .expect("send");
                    assert_eq!(r.headers()["x-prpc-grpc-code"], "0");
                    r.bytes().await.expect("body");
                }
            }))
            .await;
        }
        raw_runs.push(started.elapsed());
    }
    let a = median(adapter_runs);
    let r = median(raw_runs);
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "submits: adapter run {:.0}/s ({n} in {a:?}), raw NewTask {:.0}/s ({r:?}); adapter/raw time ratio {:.2}",
        rate(a),
        rate(r),
        a.as_secs_f64() / r.as_secs_f64()
    );

    let batch: Vec<Execution> = executions.into_iter().take(1000).collect();
    let mut batched = Vec::new();
    let mut single = Vec::new();
    let mut raw_batch = Vec::new();
    let batch_url = fake
        .url()
        .join("prpc/swarming.v2.Tasks/BatchGetResult")
        .expect("url");
    let ids: Vec<&str> = batch.iter().map(|e| e.token.as_str()).collect();
    let batch_body = json!({ "taskIds": ids }).to_string();
    for _ in 0..5 {
        let started = Instant::now();
        let r = http
            .post(batch_url.clone())
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .header("authorization", "Bearer bench")
            .body(batch_body.clone())
            .send()
            .await
            .expect("send");
        let body = r.bytes().await.expect("body");
        raw_batch.push(started.elapsed());
        assert!(body.len() > 1000);
        let started = Instant::now();
        let out = d.status_batch(&batch).await;
        batched.push(started.elapsed());
        assert!(out.iter().all(Result::is_ok), "every status read");
        let started = Instant::now();
        for e in &batch {
            d.status(e).await.expect("status");
        }
        single.push(started.elapsed());
    }
    let b = median(batched);
    let s = median(single);
    let rb = median(raw_batch);
    println!(
        "raw BatchGetResult of {} tasks (no adapter, body not parsed): {rb:?}",
        batch.len()
    );
    println!(
        "poll of {} tasks: one BatchGetResult {b:?}, {} × GetResult {s:?}; batch is {:.1}× faster",
        batch.len(),
        batch.len(),
        s.as_secs_f64() / b.as_secs_f64()
    );
    println!("fake: {:?}", fake.stats());
}

fn uuid_like(round: usize, i: usize) -> String {
    format!("00000000-0000-4000-8000-{:012x}", round * 1_000_000 + i)
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
