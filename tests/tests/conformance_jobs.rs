//! The conformance suite over the `jobs` adapter, with an in-test worker pool.
//!
//! `setup` starts one `jobs` instance that lives for the whole run (every trial's instance
//! joins its server, since they share the config and queue file) and a worker that claims the
//! suite's task types: `succeed` (returns its input), `fail` (fails permanently) and `long`
//! (runs until cancelled, which it learns from its heartbeat).

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use distributor_core::BuildContext;
use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_jobs::{JobContext, JobFailure, JobsConfig, JobsServer, Worker, WorkerClient};
use serde_json::{Value, json};

const TOKEN: &str = "conformance-worker-token";

/// Keeps the server up between trials.
static KEEPER: OnceLock<Arc<JobsServer>> = OnceLock::new();

async fn handle(job: JobContext) -> Result<Value, JobFailure> {
    match job.job.task_type.as_str() {
        "succeed" => Ok(job.input().clone()),
        "fail" => Err(JobFailure::permanent("failing on purpose")),
        _ => std::future::pending().await,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn main() -> ExitCode {
    let dir = std::env::temp_dir().join(format!("conformance-jobs-{}", std::process::id()));
    let port = free_port();
    let config = json!({
        "listen": format!("127.0.0.1:{port}"),
        "workers": [{ "name": "conformance", "token": TOKEN }],
        "database": dir.join("jobs.sqlite"),
        "lease_ms": 1000,
        "long_poll_ms": 1000,
    });
    let keeper_config: Option<JobsConfig> = serde_json::from_value(config.clone()).ok();
    let base = format!("http://127.0.0.1:{port}/");
    let code = Suite::new::<JobsConfig>(config)
        .payloads(Payloads {
            succeeds: json!({ "task_type": "succeed", "input": { "answer": 42 } }),
            fails: Some(json!({ "task_type": "fail" })),
            runs_long: json!({ "task_type": "long" }),
            invalid: vec![
                (json!({ "input": 1 }), "/task_type".into()),
                (json!({ "task_type": 5 }), "/task_type".into()),
                (json!({ "task_type": "   " }), "/task_type".into()),
                (
                    json!({ "task_type": "succeed", "priority": "high" }),
                    "/priority".into(),
                ),
                (
                    json!({ "task_type": "succeed", "inptu": 1 }),
                    "/inptu".into(),
                ),
            ],
        })
        .timeout(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(20))
        .setup(move || async move {
            let config = keeper_config.ok_or("the conformance config is not a JobsConfig")?;
            let keeper = JobsServer::start(config, BuildContext::detached("conformance")).await?;
            let _ = KEEPER.set(keeper);
            let client = WorkerClient::with_base(&base, TOKEN)?;
            let worker = Worker::new(
                client,
                vec!["succeed".into(), "fail".into(), "long".into()],
                handle,
            )
            .capacity(32)
            .claim_wait(Duration::from_secs(1));
            tokio::spawn(worker.run(std::future::pending()));
            Ok(())
        })
        .run_main();
    let _ = std::fs::remove_dir_all(&dir);
    code
}
