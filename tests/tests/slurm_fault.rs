//! Fault test: slurmrestd stops while jobs run and comes back; through the `Distributor` trait,
//! status calls during the outage are transient errors and, after the restart, each job's true
//! outcome is read (the jobs finished while slurmrestd was down).
//!
//! Needs a cluster from `eval "$(scripts/engines/slurm.sh start)"` (run as root: the test stops
//! and restarts slurmrestd with `scripts/engines/slurm.sh stop-rest|start-rest`). Without
//! `SLURM_URL` the trial reports itself ignored with the reason.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Distributor, Execution, ExecutionId, KindConfig,
    Outcome, RequestId, Status, TaskDescription,
};
use distributor_slurm::SlurmConfig;
use serde_json::{Value, json};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/engines/slurm.sh")
}

fn engine(cmd: &str) -> Result<(), String> {
    let out = Command::new("bash")
        .arg(script())
        .arg(cmd)
        .env_remove("SLURM_JWT")
        .output()
        .map_err(|e| format!("slurm.sh {cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "slurm.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Restarts slurmrestd when dropped, so a failing assertion never leaves the cluster broken.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if let Err(e) = engine("start-rest") {
            eprintln!("{e}");
        }
    }
}

/// The job's state as slurmctld reports it through the CLI (munge, not REST).
fn cli_state(job: &str) -> String {
    Command::new("scontrol")
        .args(["show", "job", job])
        .env_remove("SLURM_JWT")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find_map(|w| w.strip_prefix("JobState=").map(str::to_owned))
        })
        .unwrap_or_default()
}

fn task(payload: Value) -> TaskDescription {
    TaskDescription::new(ExecutionId(1), RequestId::random(), "hpc", payload)
}

async fn start(d: &dyn Distributor, payload: Value) -> Result<Execution, String> {
    let t = task(payload);
    let launch = d.run(&t).await.map_err(|e| format!("run: {e}"))?;
    Ok(Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id,
        payload: t.payload,
        token: launch.token,
        handle: AdapterHandle::default(),
    })
}

/// Polls `check` every 200 ms until it holds or `within` passes.
async fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !check() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn outage() -> Result<(), String> {
    let config: SlurmConfig = serde_json::from_value(json!({
        "url": std::env::var("SLURM_URL").unwrap_or_default(),
        "user": std::env::var("SLURM_USER").unwrap_or_default(),
        "token": { "env": "SLURM_JWT" },
        "working_directory": std::env::var("SLURM_JOB_DIR").unwrap_or_else(|_| "/tmp".into()),
        "request_timeout_secs": 5,
    }))
    .map_err(|e| e.to_string())?;
    let d = config
        .build(BuildContext::detached("hpc"))
        .await
        .map_err(|e| e.to_string())?;
    let ok = start(&*d, json!({ "script": "#!/bin/sh\nsleep 6\nexit 0\n" })).await?;
    let bad = start(&*d, json!({ "script": "#!/bin/sh\nsleep 6\nexit 4\n" })).await?;
    let both = [ok.clone(), bad.clone()];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.status_batch(&both).await;
        if s.iter().all(|r| matches!(r, Ok(Status::Running))) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("jobs not both running: {s:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let restart = RestartOnDrop;
    engine("stop-rest")?;
    for e in &both {
        match d.status(e).await {
            Err(err) if err.is_transient() => {}
            other => return Err(format!("status during the outage: {other:?}")),
        }
    }
    for r in d.status_batch(&both).await {
        if !r.as_ref().is_err_and(|e| e.is_transient()) {
            return Err(format!("status_batch during the outage: {r:?}"));
        }
    }
    match d.run(&task(json!({ "argv": ["true"] }))).await {
        Err(err) if err.is_transient() => {}
        other => return Err(format!("run during the outage: {other:?}")),
    }
    // The work goes on without slurmrestd: wait (via the CLI) until both jobs have ended.
    wait_for(
        "both jobs to end in slurmctld",
        Duration::from_secs(60),
        || cli_state(ok.token.as_str()) == "COMPLETED" && cli_state(bad.token.as_str()) == "FAILED",
    )
    .await?;
    drop(restart); // start-rest waits until slurmrestd answers

    match d.status(&ok).await.map_err(|e| e.to_string())? {
        Status::Finished(Outcome::Succeeded { data }) if data["exit_code"] == 0 => {}
        other => return Err(format!("ok job after the restart: {other:?}")),
    }
    match d.status(&bad).await.map_err(|e| e.to_string())? {
        Status::Finished(Outcome::Abnormal {
            kind: AbnormalKind::Failed,
            reason,
        }) if reason.contains("exit code 4") => {}
        other => return Err(format!("failing job after the restart: {other:?}")),
    }
    let batch = d.status_batch(&both).await;
    for (e, b) in both.iter().zip(batch) {
        let single = d.status(e).await.map_err(|e| e.to_string())?;
        if b.as_ref().ok() != Some(&single) {
            return Err(format!(
                "status_batch {b:?} disagrees with status {single:?}"
            ));
        }
    }
    Ok(())
}

fn run_outage() -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(outage())
}

const NAME: &str = "slurm_fault::slurmrestd_restart_mid_run";

fn main() -> std::process::ExitCode {
    use libtest_mimic::{Arguments, Trial};
    let args = Arguments::from_args();
    let unreachable = std::env::var("SLURM_URL").is_err();
    if unreachable {
        eprintln!(
            "{NAME}: ignored: SLURM_URL not set: no slurmrestd (run `eval \"$(scripts/engines/slurm.sh start)\"` as root)"
        );
    }
    let trial =
        Trial::test(NAME, || run_outage().map_err(Into::into)).with_ignored_flag(unreachable);
    libtest_mimic::run(&args, vec![trial]).exit_code()
}
