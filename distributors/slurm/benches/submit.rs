//! Submission cost: 200 trivial jobs through the adapter next to 200 `sbatch --wrap` from the
//! CLI, interleaved (so both see the same cluster load and job-list size), then the time of one
//! batched status poll of the 200 adapter jobs, then 200 adapter runs 8 at a time. A third
//! column submits the same job with a bare `POST /job/submit` (no idempotency lookup).
//!
//! Run with: `eval "$(scripts/engines/slurm.sh start)"; cargo bench -p distributor-slurm --bench submit`
//! (`BENCH_JOBS=N` changes the count). Without `--bench` (as under `cargo test`) it does nothing.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use distributor_core::{
    AdapterHandle, BuildContext, Execution, ExecutionId, KindConfig, RequestId, TaskDescription,
};
use distributor_slurm::SlurmConfig;
use futures_lite::run_concurrently;
use serde_json::json;

mod futures_lite {
    //! A tiny bounded-concurrency helper (no extra dependency).
    use std::future::Future;

    use tokio::task::JoinSet;

    /// Runs `n` futures made by `make`, at most `limit` at a time.
    pub async fn run_concurrently<F, Fut>(n: usize, limit: usize, make: F) -> usize
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let mut set = JoinSet::new();
        let mut ok = 0;
        for i in 0..n {
            if set.len() >= limit
                && let Some(Ok(true)) = set.join_next().await
            {
                ok += 1;
            }
            set.spawn(make(i));
        }
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(true)) {
                ok += 1;
            }
        }
        ok
    }
}

fn task(payload: serde_json::Value) -> TaskDescription {
    TaskDescription::new(ExecutionId(1), RequestId::random(), "bench", payload)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let Ok(url) = std::env::var("SLURM_URL") else {
        eprintln!(
            "submit bench skipped: SLURM_URL not set (eval \"$(scripts/engines/slurm.sh start)\")"
        );
        return ExitCode::SUCCESS;
    };
    let n: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let job_dir = std::env::var("SLURM_JOB_DIR").unwrap_or_else(|_| "/tmp".into());
    let job_dir_raw = job_dir.clone();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let config: SlurmConfig = match serde_json::from_value(json!({
            "url": url,
            "user": std::env::var("SLURM_USER").unwrap_or_default(),
            "token": { "env": "SLURM_JWT" },
            "working_directory": job_dir,
        })) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("config: {e}");
                return ExitCode::FAILURE;
            }
        };
        let d = match config.build(BuildContext::detached("bench")).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("build: {e}");
                return ExitCode::FAILURE;
            }
        };
        let payload = json!({ "argv": ["true"], "stdout": "/dev/null" });
        // The bare REST submission the adapter makes after its idempotency lookup.
        let http = reqwest::Client::new();
        let submit_url = format!(
            "{}/slurm/v0.0.38/job/submit",
            std::env::var("SLURM_URL").unwrap_or_default().trim_end_matches('/')
        );
        let user = std::env::var("SLURM_USER").unwrap_or_default();
        let jwt = std::env::var("SLURM_JWT").unwrap_or_default();
        let body = json!({
            "script": "#!/bin/sh\nexec true\n",
            "job": { "name": "bench-raw", "environment": { "PATH": "/usr/bin:/bin" },
                     "current_working_directory": job_dir_raw, "standard_output": "/dev/null" }
        });
        let mut adapter = Duration::ZERO;
        let mut cli = Duration::ZERO;
        let mut raw = Duration::ZERO;
        let mut execs = Vec::with_capacity(n);
        for _ in 0..n {
            let t = task(payload.clone());
            let start = Instant::now();
            let launch = match d.run(&t).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("run: {e}");
                    return ExitCode::FAILURE;
                }
            };
            adapter += start.elapsed();
            execs.push(Execution {
                id: t.execution_id,
                task_id: t.task_id,
                attempt: t.attempt,
                request_id: t.request_id,
                payload: t.payload,
                token: launch.token,
                handle: AdapterHandle::default(),
            });

            let start = Instant::now();
            let reply = http
                .post(&submit_url)
                .header("X-SLURM-USER-NAME", &user)
                .header("X-SLURM-USER-TOKEN", &jwt)
                .json(&body)
                .send()
                .await;
            let ok = match reply {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            raw += start.elapsed();
            if !ok {
                eprintln!("raw REST submit failed");
                return ExitCode::FAILURE;
            }

            let start = Instant::now();
            // sbatch authenticates with munge; a SLURM_JWT in its environment would switch it
            // to JWT auth (engines.md pitfall 4).
            let status = Command::new("sbatch")
                .args(["--parsable", "--quiet", "--output=/dev/null", "--wrap", "true"])
                .env_remove("SLURM_JWT")
                .stdout(Stdio::null())
                .status();
            cli += start.elapsed();
            if !status.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("sbatch failed: {status:?}");
                return ExitCode::FAILURE;
            }
        }
        println!("submit {n} jobs, sequential, interleaved:");
        println!(
            "  adapter run (lookup + submit): {:8.1} ms total, {:6.2} ms/job",
            ms(adapter),
            ms(adapter) / n as f64
        );
        println!(
            "  sbatch --wrap (CLI)          : {:8.1} ms total, {:6.2} ms/job",
            ms(cli),
            ms(cli) / n as f64
        );
        println!(
            "  bare REST POST /job/submit   : {:8.1} ms total, {:6.2} ms/job",
            ms(raw),
            ms(raw) / n as f64
        );
        println!(
            "  ratio bare REST/sbatch       : {:.2}",
            raw.as_secs_f64() / cli.as_secs_f64()
        );
        println!(
            "  ratio adapter/sbatch         : {:.2}",
            adapter.as_secs_f64() / cli.as_secs_f64()
        );

        let mut polls = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let results = d.status_batch(&execs).await;
            polls.push(start.elapsed());
            if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
                eprintln!("status_batch: {e}");
                return ExitCode::FAILURE;
            }
        }
        polls.sort();
        println!(
            "status_batch of {n} jobs (one GET /jobs): median {:.1} ms (min {:.1}, max {:.1}, 5 polls)",
            ms(polls[2]),
            ms(polls[0]),
            ms(polls[4])
        );

        let start = Instant::now();
        let d2 = d.clone();
        let ok = run_concurrently(n, 8, move |_| {
            let d = d2.clone();
            let t = task(payload.clone());
            async move { d.run(&t).await.is_ok() }
        })
        .await;
        let conc = start.elapsed();
        println!(
            "adapter run, 8 concurrent: {ok}/{n} ok in {:.1} ms ({:.2} ms/job; lookups shared)",
            ms(conc),
            ms(conc) / n as f64
        );
        ExitCode::SUCCESS
    })
}
