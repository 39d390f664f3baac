//! The conformance suite over the `nats` adapter, on the real nats-server (JetStream) at
//! `NATS_URL` (default `nats://127.0.0.1:4222`), with an in-test worker.
//!
//! The run uses a stream, bucket and subject prefix of its own and deletes them at the end.
//! The worker serves `succeed` (returns its input), `fail` (fails permanently) and `long`
//! (runs until cancelled, which it learns from the bucket's cancel requests). When no server
//! answers, every trial is reported ignored with the reason.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_nats::{JobContext, JobFailure, NatsConfig, Worker, WorkerOptions};
use serde_json::{Value, json};

/// How many times the worker started each request's work.
static STARTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();

fn starts() -> &'static Mutex<HashMap<String, usize>> {
    STARTS.get_or_init(Mutex::default)
}

async fn handle(job: JobContext) -> Result<Value, JobFailure> {
    *starts()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(job.job.request_id.clone())
        .or_default() += 1;
    match job.job.task_type.as_str() {
        "succeed" => Ok(job.input().clone()),
        "fail" => Err(JobFailure::permanent("failing on purpose")),
        _ => std::future::pending().await,
    }
}

fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Why the server cannot be used, if it cannot.
fn unreachable(url: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let client = match tokio::time::timeout(
            Duration::from_secs(3),
            distributor_nats::async_nats::connect(url),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Some(format!("no nats-server at {url}: {e}")),
            Err(_) => return Some(format!("no nats-server at {url}: connect timed out")),
        };
        let js = distributor_nats::async_nats::jetstream::new(client);
        match js.get_stream("NO_SUCH_STREAM_PROBE").await {
            Err(e) if e.to_string().contains("not found") => None,
            Ok(_) => None,
            Err(e) => Some(format!("nats-server at {url} has no JetStream: {e}")),
        }
    })
}

fn clean_up(url: &str, stream: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        if let Ok(client) = distributor_nats::async_nats::connect(url).await {
            let js = distributor_nats::async_nats::jetstream::new(client);
            let _ = js.delete_stream(stream).await;
            let _ = js.delete_key_value(format!("{stream}_EXEC")).await;
        }
    });
}

fn main() -> ExitCode {
    let url = url();
    let id = format!("{}_{}", std::process::id(), rand_suffix());
    let stream = format!("CONF_{id}");
    let prefix = format!("conf{id}");
    let config = json!({
        "servers": [url],
        "stream": stream,
        "subject_prefix": prefix,
        "ack_wait_ms": 5000,
        "task_types": { "succeed": {}, "fail": {}, "long": {} },
        "poll_interval_ms": 200,
    });
    let reason = unreachable(&url);
    let (worker_url, worker_stream, worker_prefix) = (url.clone(), stream.clone(), prefix.clone());
    let code = Suite::new::<NatsConfig>(config)
        .payloads(Payloads {
            succeeds: json!({ "task_type": "succeed", "input": { "answer": 42 } }),
            fails: Some(json!({ "task_type": "fail" })),
            runs_long: json!({ "task_type": "long" }),
            invalid: vec![
                (json!({ "input": 1 }), "/task_type".into()),
                (json!({ "task_type": 5 }), "/task_type".into()),
                (json!({ "task_type": "has space" }), "/task_type".into()),
                (json!({ "task_type": "a.b" }), "/task_type".into()),
                (
                    json!({ "task_type": "succeed", "inptu": 1 }),
                    "/inptu".into(),
                ),
            ],
        })
        .unreachable(reason)
        .timeout(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(20))
        .count_starts(|request_id| async move {
            starts()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(request_id.as_str())
                .copied()
                .unwrap_or(0)
        })
        .setup(move || async move {
            let mut options = WorkerOptions::new(
                vec![worker_url],
                "conformance-worker",
                vec!["succeed".into(), "fail".into(), "long".into()],
            );
            options.stream = worker_stream;
            options.subject_prefix = worker_prefix;
            options.capacity = 64;
            let worker = Worker::connect(options, handle).await?;
            tokio::spawn(worker.run(std::future::pending()));
            Ok(())
        })
        .run_main();
    clean_up(&url, &stream);
    code
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}
