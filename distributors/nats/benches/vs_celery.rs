//! End-to-end tasks/s: the engine + `SqliteStore` + the `nats` adapter + 2 worker processes
//! running no-op tasks, next to Celery 5 + Redis (`--concurrency 2`) running the same number
//! of no-op tasks, in the same run. Prints both and the ratio.
//!
//! Run with: `cargo bench -p distributor-nats --bench vs_celery` (by hand, not in CI).
//!
//! - `NATS_BENCH_N` tasks (default 10000); `NATS_URL` (default `nats://127.0.0.1:4222`);
//!   `NATS_BENCH_CAPACITY` handler slots per worker process (default 256);
//!   `NATS_BENCH_ONLY=nats|celery` runs one side.
//! - nats side: an engine with a `nats` instance (a stream of its own, deleted at the end) and a
//!   SQLite store on a temp file; the bench starts 2 worker processes (itself, re-executed in
//!   worker mode); one `submit_many` of N `{"task_type": "noop"}` tasks, then a `wait` on each,
//!   all at once; every execution must end `Succeeded`. The clock runs from the submit to the
//!   last result.
//! - Celery side: a venv under `target/celery-bench-venv` (created with `python3 -m venv` and
//!   `pip install 'celery[redis]>=5,<6'` if missing), Redis at `CELERY_BENCH_REDIS` (default
//!   `redis://127.0.0.1:6379/13`, a DB of its own, flushed first) as broker and result backend,
//!   one `celery worker --concurrency 2` (prefork), and a driver that sends N no-op tasks as one
//!   `group` and waits for all results (`join_native`). The clock runs from the first send to
//!   the last result, measured by the driver.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::store::{SqliteStore, Store};
use distributor_core::{DistributorsConfig, Engine, Registry, State, Task};
use distributor_nats::{JobContext, JobFailure, NatsConfig, Worker, WorkerOptions, async_nats};
use serde_json::{Value, json};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Worker mode: serve `noop` until killed.
fn worker_main(stream: String, prefix: String, name: String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut o = WorkerOptions::new(vec![nats_url()], name, vec!["noop".into()]);
        o.stream = stream;
        o.subject_prefix = prefix;
        o.capacity = env_usize("NATS_BENCH_CAPACITY", 256);
        let w = Worker::connect(o, |_job: JobContext| async move {
            Ok::<Value, JobFailure>(Value::Null)
        })
        .await
        .expect("worker connect");
        w.run(std::future::pending()).await.expect("worker");
    });
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn nats_side(n: usize) -> Duration {
    let id = format!("{}", std::process::id());
    let stream = format!("BENCH_{id}");
    let prefix = format!("bench{id}");
    let store_dir = tempfile::tempdir().expect("temp dir");
    let registry = Registry::new()
        .register::<NatsConfig>()
        .expect("register nats");
    let doc = json!({"distributors": {"nats": {
        "kind": "nats",
        "servers": [nats_url()],
        "stream": stream,
        "subject_prefix": prefix,
        "max_ack_pending": 10000,
        "task_types": { "noop": {} },
    }}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).expect("config");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(store_dir.path().join("store.db"))
            .await
            .expect("sqlite"),
    );
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store)
        .build()
        .await
        .expect("engine (is nats-server running?)");
    let exe = std::env::current_exe().expect("current exe");
    let workers = Kill(
        (0..2)
            .map(|i| {
                Command::new(&exe)
                    .env(
                        "NATS_BENCH_WORKER",
                        format!("{stream} {prefix} bench-worker-{i}"),
                    )
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("spawn a worker process")
            })
            .collect(),
    );
    let t0 = Instant::now();
    let ids = engine
        .submit_many(vec![Task::new("nats", json!({ "task_type": "noop" })); n])
        .await
        .expect("submit");
    let mut waits = tokio::task::JoinSet::new();
    for id in ids {
        let engine = engine.clone();
        waits.spawn(async move { engine.wait(id).await });
    }
    while let Some(r) = waits.join_next().await {
        let r = r.expect("join").expect("wait");
        assert_eq!(r.state, State::Succeeded, "{r:?}");
    }
    let d = t0.elapsed();
    drop(workers);
    engine.shutdown().await;
    if let Ok(c) = async_nats::connect(nats_url()).await {
        let js = async_nats::jetstream::new(c);
        let _ = js.delete_stream(&stream).await;
        let _ = js.delete_key_value(format!("{stream}_EXEC")).await;
    }
    d
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<(), String> {
    let st = cmd.status().map_err(|e| format!("{what}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{what}: {st}"))
    }
}

const TASKS_PY: &str = r#"
import os
from celery import Celery
url = os.environ["CELERY_BENCH_REDIS"]
app = Celery("bench", broker=url, backend=url)
app.conf.update(worker_hijack_root_logger=False, result_expires=600)

@app.task
def noop():
    return None
"#;

const DRIVER_PY: &str = r#"
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis
from celery import group
from tasks import app, noop
n = int(sys.argv[1])
# Wait until the worker answers.
deadline = time.time() + 60
while not app.control.inspect(timeout=1).ping():
    if time.time() > deadline:
        sys.exit("celery worker did not come up")
t0 = time.perf_counter()
res = group(noop.s() for _ in range(n)).apply_async()
res.join_native(timeout=600)
print(f"{time.perf_counter() - t0:.6f}")
"#;

fn celery_side(n: usize) -> Result<Duration, String> {
    let redis_url =
        std::env::var("CELERY_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/13".into());
    let base = target_dir().join("celery-bench-venv");
    let py = base.join("bin/python");
    if !py.exists() {
        eprintln!(
            "celery: creating {} (pip install 'celery[redis]>=5,<6')",
            base.display()
        );
        run_ok(
            Command::new("python3").args(["-m", "venv"]).arg(&base),
            "python3 -m venv",
        )?;
        run_ok(
            Command::new(&py).args(["-m", "pip", "install", "-q", "celery[redis]>=5,<6"]),
            "pip install celery[redis]",
        )?;
    }
    let app_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::write(app_dir.path().join("tasks.py"), TASKS_PY).map_err(|e| e.to_string())?;
    std::fs::write(app_dir.path().join("driver.py"), DRIVER_PY).map_err(|e| e.to_string())?;
    // A DB of its own, empty.
    run_ok(
        Command::new(&py)
            .args([
                "-c",
                "import redis,sys; redis.Redis.from_url(sys.argv[1]).flushdb()",
            ])
            .arg(&redis_url),
        "flush the celery redis db",
    )?;
    let worker = Command::new(base.join("bin/celery"))
        .args([
            "-A",
            "tasks",
            "worker",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
        ])
        .current_dir(app_dir.path())
        .env("CELERY_BENCH_REDIS", &redis_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("celery worker: {e}"))?;
    let _worker = Kill(vec![worker]);
    let out = Command::new(&py)
        .arg(app_dir.path().join("driver.py"))
        .arg(n.to_string())
        .current_dir(app_dir.path())
        .env("CELERY_BENCH_REDIS", &redis_url)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("celery driver: {e}"))?;
    if !out.status.success() {
        return Err(format!("celery driver: {}", out.status));
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("celery driver output: {e}"))?;
    Ok(Duration::from_secs_f64(secs))
}

fn main() {
    if let Ok(spec) = std::env::var("NATS_BENCH_WORKER") {
        let mut parts = spec.splitn(3, ' ').map(str::to_owned);
        let (Some(s), Some(p), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            eprintln!("bad NATS_BENCH_WORKER");
            std::process::exit(2);
        };
        worker_main(s, p, name);
        return;
    }
    // `cargo test --benches` runs benches in test mode: do nothing there.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let n = env_usize("NATS_BENCH_N", 10_000);
    let only = std::env::var("NATS_BENCH_ONLY").unwrap_or_default();
    let mut nats = None;
    if only.is_empty() || only == "nats" {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let d = rt.block_on(nats_side(n));
        println!(
            "engine + SQLite + nats + 2 worker processes: {n} no-op tasks in {:.2} s = {:.0} tasks/s",
            d.as_secs_f64(),
            n as f64 / d.as_secs_f64()
        );
        nats = Some(d);
    }
    if only.is_empty() || only == "celery" {
        match celery_side(n) {
            Ok(c) => {
                println!(
                    "celery 5 + redis, --concurrency 2:            {n} no-op tasks in {:.2} s = {:.0} tasks/s",
                    c.as_secs_f64(),
                    n as f64 / c.as_secs_f64()
                );
                if let Some(d) = nats {
                    println!(
                        "ratio: {:.2}x celery's tasks/s (goal >= 5x)",
                        c.as_secs_f64() / d.as_secs_f64()
                    );
                }
            }
            Err(e) => println!("celery: not measured: {e}"),
        }
    }
}
