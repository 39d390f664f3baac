//! Wall time of N executions of `true` through the local adapter alone (no engine, no store),
//! two at a time, next to `xargs -P2` running the same N in the same run.
//!
//! Run with: `cargo bench -p distributor-local --bench true_vs_xargs`
//! (`LOCAL_BENCH_N` sets N, default 2000; `LOCAL_BENCH_PARALLEL` the parallelism, default 2).
//!
//! The adapter side submits every task with `run` (most wait queued), and is done when the
//! watcher of each has pushed `finished`; each execution gets its state directory, log files,
//! supervisor and exit record, as in production. The engine + SQLite figure of issue 4 is
//! measured by the orchestrator's bench, not here.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use distributor_core::{
    Attempt, AuthToken, BuildContext, DistributorName, ExecutionId, KindConfig, NotificationRoute,
    Notifier, RequestId, TaskDescription, TaskId, Timeouts,
};
use distributor_local::LocalConfig;
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn adapter(n: usize, parallel: usize) -> Duration {
    let state = tempfile::tempdir().expect("tempdir");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = LocalConfig {
        state_dir: state.path().to_path_buf(),
        max_parallel: u32::try_from(parallel).unwrap_or(2),
        ..LocalConfig::default()
    };
    let ctx = BuildContext {
        notifier: Notifier::new(tx),
        ..BuildContext::detached("local")
    };
    let d = config.build(ctx).await.expect("build");
    let t0 = Instant::now();
    for i in 0..n {
        let id = u64::try_from(i).unwrap_or(u64::MAX);
        let task = TaskDescription {
            execution_id: ExecutionId(id),
            task_id: TaskId(id),
            attempt: Attempt(1),
            request_id: RequestId::random(),
            redispatch: false,
            distributor: DistributorName::new("local"),
            payload: json!({ "argv": ["true"] }),
            previous: None,
            notify: NotificationRoute {
                target: None,
                auth_token: AuthToken("bench".into()),
            },
            timeouts: Timeouts::default(),
            labels: Default::default(),
        };
        d.run(&task).await.expect("run");
    }
    let mut done = 0;
    while done < n {
        let (_, push) = rx.recv().await.expect("pushes");
        if push.sequence == Some(2) {
            done += 1;
        }
    }
    t0.elapsed()
}

fn xargs(n: usize, parallel: usize) -> Duration {
    let input: String = (0..n).map(|i| format!("{i}\n")).collect();
    let t0 = Instant::now();
    let mut child = Command::new("xargs")
        .args(["-P", &parallel.to_string(), "-n", "1", "true"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("xargs");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(input.as_bytes()).expect("feed xargs");
    }
    assert!(child.wait().expect("xargs").success());
    t0.elapsed()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a small N then.
    let benching = std::env::args().any(|a| a == "--bench");
    let n = if benching {
        env("LOCAL_BENCH_N", 2000)
    } else {
        20
    };
    let parallel = env("LOCAL_BENCH_PARALLEL", 2).max(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let local = rt.block_on(adapter(n, parallel));
    let x = xargs(n, parallel);
    println!("{n} x `true`, {parallel} at a time");
    println!(
        "  local adapter: {:>8.3} s  ({:.0}/s)",
        local.as_secs_f64(),
        n as f64 / local.as_secs_f64()
    );
    println!(
        "  xargs -P{parallel}:    {:>8.3} s  ({:.0}/s)",
        x.as_secs_f64(),
        n as f64 / x.as_secs_f64()
    );
    println!(
        "  ratio local/xargs: {:.2}x",
        local.as_secs_f64() / x.as_secs_f64()
    );
}
