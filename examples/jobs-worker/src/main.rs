//! A worker for the `jobs` distributor: claims jobs of the task types it knows and runs them.
//!
//! Run with: cargo run -p jobs-worker -- --server http://127.0.0.1:8089/ --token s3cret
//!
//! Built-in task types (the job payload's `task_type`; `input` as shown):
//!
//! | task type | input | result |
//! |---|---|---|
//! | `echo` | anything | the input |
//! | `sleep` | `{"ms": 500}` | `{"slept_ms": 500}`, reporting progress as it goes |
//! | `shell` | `{"command": "ls -l", "env": {"K": "v"}}` | `{"exit_code", "stdout", "stderr"}`; a non-zero exit fails the job |
//! | `fail` | `{"message": "boom", "permanent": true}` | always fails (for trying retries) |
//!
//! Start the orchestrator with a `jobs` distributor listening on `--server`, whose `workers`
//! list this worker's token, then start one or more of these workers (each with its own token)
//! and watch the jobs on `<server>/status`. Ctrl-C stops claiming and finishes (or, with
//! `--on-shutdown release`, gives back) the jobs in hand.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use distributor_jobs::{JobContext, JobFailure, ShutdownPolicy, Worker, WorkerClient};
use serde_json::{Value, json};
use url::Url;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnShutdown {
    Finish,
    Release,
}

/// A worker for the `jobs` distributor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Base URL of the Jobs API.
    #[arg(long, env = "JOBS_SERVER", default_value = "http://127.0.0.1:8089/")]
    server: Url,
    /// This worker's bearer token (from the distributor's `workers` config).
    #[arg(long, env = "JOBS_TOKEN")]
    token: String,
    /// Task types to claim (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "echo,sleep,shell,fail")]
    task_types: Vec<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// What to do with running jobs on Ctrl-C.
    #[arg(long, value_enum, default_value = "finish")]
    on_shutdown: OnShutdown,
    /// How long one claim waits for work, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    claim_wait_ms: u64,
    /// One claim and one report per job (`/v1/claim`, `/v1/jobs/{id}/complete`) instead of the
    /// batch endpoints (used by default; a server without them is detected and gets this).
    #[arg(long)]
    unbatched: bool,
}

const OUTPUT_LIMIT: usize = 64 * 1024;

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_LIMIT);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

async fn handle(job: JobContext) -> Result<Value, JobFailure> {
    let input = job.input().clone();
    match job.job.task_type.as_str() {
        "echo" => Ok(input),
        "sleep" => {
            let ms = input.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                JobFailure::permanent("`sleep` needs input {\"ms\": <milliseconds>}")
            })?;
            let step = Duration::from_millis(ms / 10);
            for i in 1..=10u32 {
                tokio::time::sleep(step).await;
                let _ = job
                    .update(Some("sleeping"), Some(f64::from(i) / 10.0), None)
                    .await;
            }
            Ok(json!({ "slept_ms": ms }))
        }
        "shell" => shell(&input).await,
        "fail" => {
            let message = input
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("failed on purpose")
                .to_owned();
            Err(JobFailure {
                message,
                permanent: input
                    .get("permanent")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            })
        }
        other => Err(JobFailure::permanent(format!(
            "this worker has no handler for task type `{other}`"
        ))),
    }
}

async fn shell(input: &Value) -> Result<Value, JobFailure> {
    let command = input
        .get("command")
        .and_then(Value::as_str)
        .ok_or_else(|| JobFailure::permanent("`shell` needs input {\"command\": \"...\"}"))?;
    let env: BTreeMap<String, String> = input
        .get("env")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| JobFailure::permanent(format!("`env` must map names to strings: {e}")))?
        .unwrap_or_default();
    // kill_on_drop: a cancelled job drops this future, which kills the command.
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| JobFailure::transient(format!("cannot start `sh`: {e}")))?;
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| JobFailure::transient(format!("waiting for the command: {e}")))?;
    let code = out.status.code();
    let result = json!({
        "exit_code": code,
        "stdout": tail(&out.stdout),
        "stderr": tail(&out.stderr),
    });
    if out.status.success() {
        Ok(result)
    } else {
        let stderr = tail(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        Err(JobFailure::permanent(match code {
            Some(c) => format!("command exited with {c}: {last}"),
            None => format!("command killed by a signal: {last}"),
        }))
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    tracing::info!(server = %args.server, task_types = ?args.task_types, capacity = args.capacity, "jobs-worker: starting");
    let worker = Worker::new(
        WorkerClient::new(args.server, &args.token),
        args.task_types,
        handle,
    )
    .capacity(args.capacity)
    .batched(!args.unbatched)
    .claim_wait(Duration::from_millis(args.claim_wait_ms))
    .on_shutdown(match args.on_shutdown {
        OnShutdown::Finish => ShutdownPolicy::Finish,
        OnShutdown::Release => ShutdownPolicy::Release,
    });
    worker
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("jobs-worker: shutting down");
        })
        .await;
}
