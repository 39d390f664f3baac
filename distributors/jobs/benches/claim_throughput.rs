//! Jobs claimed and completed per second with 16 concurrent workers over loopback HTTP
//! (no-op handlers), and the claim latency percentiles.
//!
//! Run with: `cargo bench -p distributor-jobs --bench claim_throughput`
//! (release profile; `JOBS_BENCH_N` sets the number of jobs, default 40000;
//! `JOBS_BENCH_WORKERS` the number of workers, default 16).
//!
//! The queue is filled first (not timed); then every worker loops claim → complete with its own
//! keep-alive connection until the queue is empty. Every claim and every completion is committed
//! to the SQLite file (WAL) before it is answered, and each pushes a notification into a channel
//! drained by a task, as in an engine.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use distributor_core::{
    Attempt, AuthToken, BuildContext, DeferredQueue, Distributor, DistributorName, ExecutionId,
    NotificationRoute, Notifier, RequestId, TaskDescription, TaskId, Timeouts,
};
use distributor_jobs::{
    ClaimRequest, CompleteRequest, JobsConfig, JobsServer, WorkerClient, WorkerCredential,
};
use serde_json::{Value, json};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux;
/// `None` elsewhere). Clock ticks are 100 per second on Linux.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: then run a small
    // smoke round (the same code path, checked for completeness) instead of the measurement.
    let measuring = std::env::args().any(|a| a == "--bench");
    let n = if measuring {
        env("JOBS_BENCH_N", 40_000)
    } else {
        200
    };
    let workers = env("JOBS_BENCH_WORKERS", 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(n, workers));
}

async fn bench(n: usize, workers: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = JobsConfig {
        listen: "127.0.0.1:0".into(),
        workers: (0..workers)
            .map(|i| WorkerCredential {
                name: format!("w{i}"),
                token: format!("token-{i}").into(),
            })
            .collect(),
        database: dir.path().join("jobs.sqlite"),
        lease_ms: 60_000,
        max_reoffers: 3,
        long_poll_ms: 1_000,
        public_url: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let drain = tokio::spawn(async move {
        let mut pushes = 0u64;
        while rx.recv().await.is_some() {
            pushes += 1;
        }
        pushes
    });
    let ctx = BuildContext {
        name: DistributorName::new("bench"),
        deferred: DeferredQueue::detached(),
        notifier: Notifier::new(tx),
        ..BuildContext::detached("bench")
    };
    let server = JobsServer::start(config, ctx).await.expect("server");

    let fill = Instant::now();
    let mut fills = tokio::task::JoinSet::new();
    let per = n.div_ceil(32);
    for part in 0..32 {
        let server = server.clone();
        fills.spawn(async move {
            for i in part * per..((part + 1) * per).min(n) {
                let t = TaskDescription {
                    execution_id: ExecutionId(i as u64 + 1),
                    task_id: TaskId(i as u64 + 1),
                    attempt: Attempt(1),
                    request_id: RequestId::new(format!("bench-{i}")),
                    redispatch: false,
                    distributor: DistributorName::new("bench"),
                    payload: json!({ "task_type": "noop", "input": i }),
                    previous: None,
                    notify: NotificationRoute {
                        target: None,
                        auth_token: AuthToken("t".into()),
                    },
                    timeouts: Timeouts::default(),
                    labels: BTreeMap::new(),
                };
                server.run(&t).await.expect("run");
            }
        });
    }
    while fills.join_next().await.is_some() {}
    let fill = fill.elapsed();

    let cpu_start = cpu_time();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = WorkerClient::new(server.local_url(), &format!("token-{w}"));
        set.spawn(async move {
            let req = ClaimRequest {
                task_types: vec!["noop".into()],
                capacity: 1,
                wait_ms: Some(0),
            };
            let mut claims = Vec::new();
            let mut completes = Vec::new();
            loop {
                let t = Instant::now();
                let job = client.claim(&req).await.expect("claim");
                claims.push(t.elapsed());
                let Some(job) = job else { break };
                let t = Instant::now();
                client
                    .complete(
                        job.id,
                        &CompleteRequest {
                            lease: job.lease.id,
                            result: Value::Null,
                        },
                    )
                    .await
                    .expect("complete");
                completes.push(t.elapsed());
            }
            (claims, completes)
        });
    }
    let mut claims = Vec::new();
    let mut completes = Vec::new();
    while let Some(r) = set.join_next().await {
        let (c, d) = r.expect("worker");
        claims.extend(c);
        completes.extend(d);
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time().zip(cpu_start).map(|(b, a)| b.saturating_sub(a));
    claims.sort();
    completes.sort();
    let done = completes.len();
    server.shutdown().await;
    drop(server);
    let pushes = drain.await.unwrap_or(0);
    assert_eq!(done, n, "every job completed exactly once");
    let rate = done as f64 / elapsed.as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!("jobs bench: {n} jobs, {workers} workers, {cores} cores");
    println!("  fill (engine run, not timed): {fill:.2?}");
    println!("  claimed+completed: {done} in {elapsed:.2?} = {rate:.0} jobs/s");
    println!(
        "  claim latency:    p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        pct(&claims, 0.50),
        pct(&claims, 0.99),
        pct(&claims, 1.0)
    );
    println!(
        "  complete latency: p50 {:.2?}  p99 {:.2?}",
        pct(&completes, 0.50),
        pct(&completes, 0.99)
    );
    println!("  pushes delivered: {pushes}");
    if let Some(cpu) = cpu.filter(|c| !c.is_zero()) {
        // On a shared machine the wall-clock rate understates what two idle cores do; the CPU
        // this process spent per job gives the CPU-bound rate for `cores` idle cores.
        let per_job = cpu.as_secs_f64() / done as f64;
        println!(
            "  cpu (user+sys) in the timed phase: {cpu:.2?} = {:.0} µs/job; \
             cpu-bound rate on {cores} idle cores ≈ {:.0} jobs/s; share of the machine we got: {:.0}%",
            per_job * 1e6,
            cores as f64 / per_job,
            100.0 * cpu.as_secs_f64() / (elapsed.as_secs_f64() * cores as f64)
        );
    }
}
