//! Wall time of N executions of `true`, two at a time, through the engine + `SqliteStore` + the
//! local adapter (issue 4's figure), through the local adapter alone, next to `xargs -P2` and GNU
//! `parallel -j2` running the same N in the same run.
//!
//! Run with: `cargo bench -p distributor-local --bench true_vs_xargs`
//! (`LOCAL_BENCH_N` sets N, default 2000; `LOCAL_BENCH_PARALLEL` the parallelism, default 2;
//! `LOCAL_BENCH_ROUNDS` how many rounds, default 1; `LOCAL_BENCH_ONLY` a comma-separated subset
//! of `engine,adapter,spawn,xargs,parallel`, for profiling; `LOCAL_BENCH_DIR` where state goes;
//! `LOCAL_BENCH_STORE=memory` puts the engine on a `MemoryStore`, to see what SQLite costs;
//! `LOCAL_BENCH_COMMIT_DELAY_MS` sets the engine's group-commit delay, default 5 as in
//! `Settings`, 0 to see what it buys; `LOCAL_BENCH_FOLLOW=sequential` waits for the executions
//! one after the other instead of all at once).
//!
//! - engine: one `submit_many` of N tasks `{"argv": ["true"]}` to an engine with a `local`
//!   instance (`max_parallel` = parallelism) and a `SqliteStore` on a temp file, then `wait` on
//!   each, all at once (as `orchestrator run` follows its tasks); every execution must end
//!   `Succeeded`. The time includes the engine's durable writes.
//! - adapter alone: every task is given to `run` (most wait queued); done when the watcher of
//!   each has pushed `finished`.
//! - bare spawn: `tokio::process::Command::new("true")` from this process, two at a time, no
//!   supervisor and no state (std spawns with `posix_spawn`, no copy of this process): what
//!   starting the work costs from a tokio program, the floor for any design that does not fork
//!   the orchestrator per execution.
//! - `xargs -P2 -n1 true`, N lines on stdin.
//! - `parallel -j2 true ::: …` (GNU parallel, arguments from a file with `-a`). When `parallel`
//!   is missing, the bench installs the Debian package (`apt-get install -y parallel`, as root or
//!   through `sudo -n`); if that fails it says so and leaves the column out.
//!
//! Each execution gets its state directory, log files, supervisor records, as in production.
//! The SQLite file goes under `LOCAL_BENCH_STORE_DIR`, default the temp directory (on disk: the
//! store must survive a reboot). The local adapter's state directories go under
//! `LOCAL_BENCH_DIR`, default `/dev/shm` (tmpfs) when it exists: they only need to outlive the
//! orchestrator process (local work does not survive a reboot either), which is what `/run`
//! is for; and on this machine's ext4, creating files within minutes of deleting many is
//! several times slower (the inode allocator scans recently deleted inodes: 75 % of all CPU
//! after an earlier run's cleanup), so a disk figure says more about the previous run than about
//! this one. They are removed when the bench ends. `LOCAL_BENCH_DIR=/tmp` measures on disk.
//!
//! Cargo runs benches with `LD_LIBRARY_PATH` set into the target directory and the toolchain,
//! which makes every exec of `true` (in every column) look for libc there first; the bench
//! removes it, so every column runs `true` as a shell or an orchestrator would.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::store::{MemoryStore, SqliteStore, Store};
use distributor_core::{
    Attempt, AuthToken, BuildContext, DistributorName, DistributorsConfig, Engine, ExecutionId,
    KindConfig, NotificationRoute, Notifier, Registry, RequestId, State, Task, TaskDescription,
    TaskId, Timeouts,
};
use distributor_local::LocalConfig;
use serde_json::json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// N executions through engine + SQLite store + local adapter.
async fn engine(n: usize, parallel: usize) -> (Duration, [tempfile::TempDir; 2]) {
    let dir = state_dir();
    let store_dir = store_dir();
    let registry = Registry::new()
        .register::<LocalConfig>()
        .expect("register local");
    let doc = json!({"distributors": {"local": {
        "kind": "local",
        "state_dir": dir.path().join("local"),
        "max_parallel": parallel,
    }}});
    let config = DistributorsConfig::from_value(&registry, "bench", &doc).expect("config");
    let store: Arc<dyn Store> = if std::env::var("LOCAL_BENCH_STORE").as_deref() == Ok("memory") {
        Arc::new(MemoryStore::new())
    } else {
        Arc::new(
            SqliteStore::open(store_dir.path().join("store.db"))
                .await
                .expect("sqlite"),
        )
    };
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store_arc(store)
        .settings(distributor_core::engine::Settings {
            commit_delay: Duration::from_millis(
                std::env::var("LOCAL_BENCH_COMMIT_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(5),
            ),
            ..Default::default()
        })
        .build()
        .await
        .expect("engine");
    let t0 = Instant::now();
    let ids = engine
        .submit_many(vec![Task::new("local", json!({"argv": ["true"]})); n])
        .await
        .expect("submit");
    if std::env::var("LOCAL_BENCH_FOLLOW").as_deref() == Ok("sequential") {
        for id in ids {
            let r = engine.wait(id).await.expect("wait");
            assert_eq!(r.state, State::Succeeded, "{r:?}");
        }
    } else {
        // As `orchestrator run` follows its tasks: a wait on each, all at once.
        let mut waits = tokio::task::JoinSet::new();
        for id in ids {
            let engine = engine.clone();
            waits.spawn(async move { engine.wait(id).await });
        }
        while let Some(r) = waits.join_next().await {
            let r = r.expect("join").expect("wait");
            assert_eq!(r.state, State::Succeeded, "{r:?}");
        }
    }
    let d = t0.elapsed();
    engine.shutdown().await;
    (d, [dir, store_dir])
}

/// N executions through the local adapter alone (no engine, no store).
async fn adapter(n: usize, parallel: usize) -> (Duration, tempfile::TempDir) {
    let state = state_dir();
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
    (t0.elapsed(), state)
}

/// N `true`s spawned directly by tokio, `parallel` at a time.
async fn bare_spawn(n: usize, parallel: usize) -> Duration {
    let t0 = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..n {
        if running.len() >= parallel {
            running.join_next().await.expect("task").expect("join");
        }
        running.spawn(async {
            let status = tokio::process::Command::new("true")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .expect("spawn true");
            assert!(status.success());
        });
    }
    while let Some(r) = running.join_next().await {
        r.expect("join");
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
        stdin.write_all(input.as_bytes()).expect("feed xargs");
    }
    assert!(child.wait().expect("xargs").success());
    t0.elapsed()
}

fn have_parallel() -> bool {
    Command::new("parallel")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether GNU parallel is available, installing the Debian package when it is not.
fn ensure_parallel() -> Result<(), String> {
    if have_parallel() {
        return Ok(());
    }
    eprintln!("GNU parallel not found: installing the Debian package `parallel`");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let (program, prefix): (&str, &[&str]) = if root {
        ("apt-get", &[])
    } else {
        ("sudo", &["-n", "apt-get"])
    };
    let run = |args: &[&str]| {
        Command::new(program)
            .args(prefix)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("{program}: {e}"))
            .and_then(|s| {
                s.success()
                    .then_some(())
                    .ok_or_else(|| format!("`{program} {}` failed: {s}", args.join(" ")))
            })
    };
    if run(&["install", "-y", "-q", "parallel"]).is_err() {
        run(&["update", "-q"])?;
        run(&["install", "-y", "-q", "parallel"])?;
    }
    if have_parallel() {
        Ok(())
    } else {
        Err("`parallel` still missing after installing the package".into())
    }
}

fn gnu_parallel(n: usize, parallel: usize) -> Duration {
    let mut args = tempfile::NamedTempFile::new().expect("tempfile");
    for i in 0..n {
        writeln!(args, "{i}").expect("write args");
    }
    let t0 = Instant::now();
    let status = Command::new("parallel")
        .args(["--will-cite", "-j", &parallel.to_string(), "-a"])
        .arg(args.path())
        .arg("true")
        .status()
        .expect("parallel");
    assert!(status.success(), "parallel: {status}");
    t0.elapsed()
}

/// User + system CPU time of this process and of its waited-for descendants so far.
fn cpu() -> Duration {
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the struct we own.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut u) } == 0 {
            for t in [u.ru_utime, u.ru_stime] {
                total += Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
                    + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0));
            }
        }
    }
    total
}

/// Runs `f`, returning its wall time and the CPU time it used (with its processes').
fn measured(f: impl FnOnce() -> Duration) -> (Duration, Duration) {
    let c0 = cpu();
    let wall = f();
    (wall, cpu().saturating_sub(c0))
}

fn line(name: &str, (wall, cpu): (Duration, Duration), n: usize) {
    println!(
        "  {name:<28} {:>8.3} s  ({:>5.0}/s)  cpu {:>6.3} s ({:>4.0} us/run)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
}

/// Where the state directories (and the SQLite file) go: `LOCAL_BENCH_DIR`, else `/dev/shm`
/// when it exists, else the temp directory.
fn state_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("LOCAL_BENCH_DIR") {
        return dir.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Where the SQLite file goes: `LOCAL_BENCH_STORE_DIR`, else the temp directory (on disk here:
/// the store must survive a reboot, unlike the local adapter's state).
fn store_dir() -> tempfile::TempDir {
    let root = std::env::var_os("LOCAL_BENCH_STORE_DIR")
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    tempfile::Builder::new()
        .prefix("local-bench-store-")
        .tempdir_in(root)
        .expect("store directory")
}

fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("local-bench-")
        .tempdir_in(state_root())
        .expect("state directory")
}

fn main() {
    // Cargo runs benches with `LD_LIBRARY_PATH` pointing into the target directory and the
    // toolchain: every exec of `true` (in every column, the baselines too) would first look for
    // libc there (53 failed opens each). No orchestrator runs like that: measure without it.
    if std::env::var_os("LD_LIBRARY_PATH").is_some() {
        // SAFETY: first thing in main, before any other thread exists.
        unsafe { std::env::remove_var("LD_LIBRARY_PATH") };
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a small N then.
    let benching = std::env::args().any(|a| a == "--bench");
    let n = if benching {
        env("LOCAL_BENCH_N", 2000)
    } else {
        20
    };
    let parallel = env("LOCAL_BENCH_PARALLEL", 2).max(1);
    let rounds = env("LOCAL_BENCH_ROUNDS", 1).max(1);
    let gnu = if benching {
        ensure_parallel()
    } else {
        Err("not benching".into())
    };
    if let Err(why) = &gnu {
        println!("GNU parallel column left out: {why}");
    }
    println!(
        "local state under {}, SQLite store under {}",
        state_root().display(),
        std::env::var_os("LOCAL_BENCH_STORE_DIR")
            .map_or_else(std::env::temp_dir, std::path::PathBuf::from)
            .display()
    );
    let only = std::env::var("LOCAL_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|w| w.trim() == name);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut keep = Vec::new();
    for round in 1..=rounds {
        let e = want("engine").then(|| {
            measured(|| {
                let (d, dirs) = rt.block_on(engine(n, parallel));
                keep.extend(dirs);
                d
            })
        });
        let a = want("adapter").then(|| {
            measured(|| {
                let (d, dir) = rt.block_on(adapter(n, parallel));
                keep.push(dir);
                d
            })
        });
        let b = want("spawn").then(|| measured(|| rt.block_on(bare_spawn(n, parallel))));
        let x = want("xargs").then(|| measured(|| xargs(n, parallel)));
        let p = (gnu.is_ok() && want("parallel")).then(|| measured(|| gnu_parallel(n, parallel)));
        println!("round {round}/{rounds}: {n} x `true`, {parallel} at a time");
        let columns = [
            ("engine + SQLite + local".to_owned(), e),
            ("local adapter alone".to_owned(), a),
            ("bare tokio spawn of `true`".to_owned(), b),
            (format!("xargs -P{parallel} -n1 true"), x),
            (format!("parallel -j{parallel} true"), p),
        ];
        for (name, d) in &columns {
            if let Some(d) = d {
                line(name, *d, n);
            }
        }
        let ratio = |a: Option<(Duration, Duration)>, b: Option<(Duration, Duration)>| {
            a.zip(b).map(|(a, b)| a.0.as_secs_f64() / b.0.as_secs_f64())
        };
        if let Some(r) = ratio(e, x) {
            println!("  ratio engine/xargs:     {r:.2}x (goal <= 1.25x)");
        }
        if let Some(r) = ratio(p, e) {
            println!("  ratio parallel/engine:  {r:.2}x (goal >= 4x)");
        }
        if let Some(r) = ratio(a, x) {
            println!("  ratio adapter/xargs:    {r:.2}x");
        }
    }
}
