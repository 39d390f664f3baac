//! A worker for the `nats` distributor: pulls work of the task types it serves from the
//! JetStream work queue and runs it.
//!
//! Run with: `cargo run -p nats-worker -- --server nats://127.0.0.1:4222 --task-type shell`
//!
//! Task types it knows:
//! - `noop`: returns `null` at once (benchmarks).
//! - `echo`: returns its input.
//! - `sleep`: `{"ms": 100}`, sleeps, returns `{"slept_ms": 100}`.
//! - `fail`: fails permanently with `{"message": "..."}` or a default message.
//! - `shell`: `{"command": "..."}` runs `sh -c command`; exit 0 → `{"exit_code": 0, "stdout"}`,
//!   else it fails permanently with the exit code and the end of stderr. A cancel kills it.
//!
//! Stops on SIGINT/SIGTERM after the work in hand ends.

use std::time::Duration;

use clap::Parser;
use distributor_nats::{Credentials, JobContext, JobFailure, Worker, WorkerOptions};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "A worker for the `nats` distributor")]
struct Args {
    /// Server URL; repeat for several.
    #[arg(
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    servers: Vec<String>,
    /// The distributor's `stream`.
    #[arg(long, default_value = "DIST_JOBS")]
    stream: String,
    /// The distributor's `subject_prefix`.
    #[arg(long, default_value = "dist")]
    subject_prefix: String,
    /// This worker's name (recorded on the work it activates). Default: nats-worker-<pid>.
    #[arg(long)]
    name: Option<String>,
    /// A task type to serve; repeat for several.
    #[arg(long = "task-type", required = true)]
    task_types: Vec<String>,
    /// How many pieces of work to run at once.
    #[arg(long, default_value_t = 16)]
    capacity: usize,
    /// Server token.
    #[arg(long, env = "NATS_TOKEN", conflicts_with_all = ["user", "nkey_file"])]
    token: Option<String>,
    /// User (with --password).
    #[arg(long, requires = "password")]
    user: Option<String>,
    /// Password.
    #[arg(long, env = "NATS_PASSWORD")]
    password: Option<String>,
    /// Nkey seed file.
    #[arg(long)]
    nkey_file: Option<std::path::PathBuf>,
}

async fn handle(job: JobContext) -> Result<Value, JobFailure> {
    match job.job.task_type.as_str() {
        "noop" => Ok(Value::Null),
        "echo" => Ok(job.input().clone()),
        "sleep" => {
            let ms = job.input().get("ms").and_then(Value::as_u64).unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({ "slept_ms": ms }))
        }
        "fail" => Err(JobFailure::permanent(
            job.input()
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("failing on purpose"),
        )),
        "shell" => shell(job.input()).await,
        other => Err(JobFailure::permanent(format!(
            "this worker does not know task type `{other}`"
        ))),
    }
}

async fn shell(input: &Value) -> Result<Value, JobFailure> {
    let Some(command) = input.get("command").and_then(Value::as_str) else {
        return Err(JobFailure::permanent("`command` (a string) is missing"));
    };
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            JobFailure::transient(format!("cannot run sh: {e}"), Duration::from_secs(1))
        })?;
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let start = s.len().saturating_sub(4096);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[start..].to_string()
    };
    match out.status.code() {
        Some(0) => Ok(json!({ "exit_code": 0, "stdout": tail(&out.stdout) })),
        code => Err(JobFailure::permanent(format!(
            "exit code {}: {}",
            code.map_or("none (signal)".to_string(), |c| c.to_string()),
            tail(&out.stderr)
        ))),
    }
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let credentials = match (&args.token, &args.user, &args.nkey_file) {
        (Some(token), _, _) => Credentials::Token {
            token: token.clone().into(),
        },
        (None, Some(user), _) => Credentials::UserPassword {
            user: user.clone(),
            password: args.password.clone().unwrap_or_default().into(),
        },
        (None, None, Some(path)) => Credentials::NkeyFile { path: path.clone() },
        _ => Credentials::None,
    };
    let options = WorkerOptions {
        servers: args.servers,
        credentials,
        stream: args.stream,
        subject_prefix: args.subject_prefix,
        name: args
            .name
            .unwrap_or_else(|| format!("nats-worker-{}", std::process::id())),
        task_types: args.task_types,
        capacity: args.capacity,
    };
    let worker = match Worker::connect(options, handle).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("nats-worker: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!("nats-worker: serving");
    match worker.run(stop_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nats-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
