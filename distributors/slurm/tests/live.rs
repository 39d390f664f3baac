//! Live tests against a real slurmrestd: `eval "$(scripts/engines/slurm.sh start)"` first.
//! Without `SLURM_URL` every trial is reported ignored with the reason.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Distributor, Execution, ExecutionId, KindConfig,
    Outcome, RequestId, Status, TaskDescription, Token,
};
use distributor_slurm::SlurmConfig;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use serde_json::{Value, json};

type TestResult = Result<(), Failed>;

/// One live case: runs to completion on its own runtime.
type Case = fn() -> TestResult;

fn config() -> Value {
    json!({
        "url": std::env::var("SLURM_URL").unwrap_or_default(),
        "user": std::env::var("SLURM_USER").unwrap_or_default(),
        "token": { "env": "SLURM_JWT" },
        "working_directory": std::env::var("SLURM_JOB_DIR").unwrap_or_else(|_| "/tmp".into()),
        "poll_interval_secs": 1,
    })
}

async fn distributor() -> Result<Arc<dyn Distributor>, Failed> {
    let c: SlurmConfig = serde_json::from_value(config()).map_err(|e| e.to_string())?;
    Ok(c.build(BuildContext::detached("hpc"))
        .await
        .map_err(|e| e.to_string())?)
}

fn task(request_id: &RequestId, payload: Value) -> TaskDescription {
    TaskDescription::new(ExecutionId(1), request_id.clone(), "hpc", payload)
}

fn execution(t: &TaskDescription, token: Token) -> Execution {
    Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token,
        handle: AdapterHandle::default(),
    }
}

/// Runs `payload` and returns the execution.
async fn start(d: &dyn Distributor, payload: Value) -> Result<Execution, Failed> {
    let t = task(&RequestId::random(), payload);
    let launch = d.run(&t).await.map_err(|e| format!("run: {e}"))?;
    Ok(execution(&t, launch.token))
}

/// Polls `status` until `done` holds or `within` passes; returns the last status.
async fn poll_until(
    d: &dyn Distributor,
    e: &Execution,
    within: Duration,
    done: impl Fn(&Status) -> bool,
) -> Result<Status, Failed> {
    let deadline = Instant::now() + within;
    loop {
        let s = d.status(e).await.map_err(|e| format!("status: {e}"))?;
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("job {} still {s:?} after {within:?}", e.token).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn finish(d: &dyn Distributor, e: &Execution, within: Duration) -> Result<Outcome, Failed> {
    let s = poll_until(d, e, within, |s| s.outcome().is_some()).await?;
    s.outcome().cloned().ok_or_else(|| "no outcome".into())
}

fn abnormal(o: &Outcome, want: AbnormalKind) -> Result<String, Failed> {
    match o {
        Outcome::Abnormal { kind, reason } if *kind == want => Ok(reason.clone()),
        other => Err(format!("expected {want}, got {other:?}").into()),
    }
}

fn block_on(f: impl Future<Output = TestResult>) -> TestResult {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

const QUICK: Duration = Duration::from_secs(60);

async fn completed_job_succeeds() -> TestResult {
    let d = distributor().await?;
    let e = start(&*d, json!({ "argv": ["echo", "hello from slurm"] })).await?;
    match finish(&*d, &e, QUICK).await? {
        Outcome::Succeeded { data } => {
            assert_eq!(data["exit_code"], 0);
            assert_eq!(data["job_id"].to_string(), e.token.as_str());
            Ok(())
        }
        other => Err(format!("expected success, got {other:?}").into()),
    }
}

async fn exit_3_fails_with_code_3() -> TestResult {
    let d = distributor().await?;
    let e = start(&*d, json!({ "script": "#!/bin/sh\nexit 3\n" })).await?;
    let reason = abnormal(&finish(&*d, &e, QUICK).await?, AbnormalKind::Failed)?;
    if !reason.contains("exit code 3") {
        return Err(format!("reason lacks the exit code: {reason}").into());
    }
    Ok(())
}

async fn cancel_ends_cancelled_and_is_idempotent() -> TestResult {
    let d = distributor().await?;
    let e = start(&*d, json!({ "argv": ["sleep", "300"] })).await?;
    poll_until(&*d, &e, QUICK, |s| *s == Status::Running).await?;
    d.cancel(&e).await.map_err(|e| format!("cancel: {e}"))?;
    d.cancel(&e)
        .await
        .map_err(|e| format!("second cancel: {e}"))?;
    abnormal(&finish(&*d, &e, QUICK).await?, AbnormalKind::Cancelled)?;
    d.cancel(&e)
        .await
        .map_err(|e| format!("cancel after the end: {e}"))?;
    Ok(())
}

async fn time_limit_ends_timed_out() -> TestResult {
    let d = distributor().await?;
    let e = start(
        &*d,
        json!({ "argv": ["sleep", "600"], "time_limit_minutes": 1 }),
    )
    .await?;
    // One minute of limit plus slurmctld's periodic time-limit check (every 30 s or so).
    let reason = abnormal(
        &finish(&*d, &e, Duration::from_secs(180)).await?,
        AbnormalKind::TimedOut,
    )?;
    if !reason.contains("TIMEOUT") {
        return Err(format!("reason: {reason}").into());
    }
    Ok(())
}

async fn run_is_idempotent_across_instances() -> TestResult {
    let d = distributor().await?;
    let t = task(&RequestId::random(), json!({ "argv": ["sleep", "1"] }));
    let first = d.run(&t).await.map_err(|e| e.to_string())?;
    let again = d.run(&t).await.map_err(|e| e.to_string())?;
    // A fresh instance has no memory of the launch: on a repeated dispatch (what the engine
    // marks after a crash) it must find the job in Slurm.
    let fresh = distributor().await?;
    let mut repeated = t.clone();
    repeated.redispatch = true;
    let after_crash = fresh.run(&repeated).await.map_err(|e| e.to_string())?;
    assert_eq!(first.token, again.token);
    assert_eq!(first.token, after_crash.token);
    // Concurrent runs of one new request id submit once.
    let t2 = task(&RequestId::random(), json!({ "argv": ["true"] }));
    let (a, b) = tokio::join!(fresh.run(&t2), fresh.run(&t2));
    assert_eq!(
        a.map_err(|e| e.to_string())?.token,
        b.map_err(|e| e.to_string())?.token
    );
    Ok(())
}

async fn batch_status_matches_status() -> TestResult {
    let d = distributor().await?;
    let mut execs = Vec::new();
    for i in 0..4 {
        execs.push(start(&*d, json!({ "script": format!("#!/bin/sh\nexit {i}\n") })).await?);
    }
    // Plus one job id Slurm never issued and one token that is not a job id.
    let t = task(&RequestId::random(), json!({}));
    execs.push(execution(&t, Token::new("987654321")));
    execs.push(execution(&t, Token::new("bogus")));
    let deadline = Instant::now() + QUICK;
    let batch = loop {
        let batch = d.status_batch(&execs).await;
        if batch.iter().all(|r| matches!(r, Ok(Status::Finished(_)))) {
            break batch;
        }
        if Instant::now() > deadline {
            return Err(format!("not all finished: {batch:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for (e, b) in execs.iter().zip(&batch) {
        let single = d.status(e).await.map_err(|e| e.to_string())?;
        let b = b.as_ref().map_err(|e| e.to_string())?;
        assert_eq!(&single, b, "token {}", e.token);
    }
    let kinds: Vec<_> = batch
        .iter()
        .map(|r| {
            r.as_ref()
                .ok()
                .and_then(Status::outcome)
                .and_then(Outcome::abnormal_kind)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            None,
            Some(AbnormalKind::Failed),
            Some(AbnormalKind::Failed),
            Some(AbnormalKind::Failed),
            Some(AbnormalKind::Missing),
            Some(AbnormalKind::Missing),
        ]
    );
    Ok(())
}

async fn unknown_job_is_missing() -> TestResult {
    let d = distributor().await?;
    let t = task(&RequestId::random(), json!({}));
    let s = d
        .status(&execution(&t, Token::new("987654321")))
        .await
        .map_err(|e| e.to_string())?;
    abnormal(s.outcome().ok_or("not finished")?, AbnormalKind::Missing)?;
    // A real job that belongs to another request id is not this execution's work either.
    let other = start(&*d, json!({ "argv": ["true"] })).await?;
    let s = d
        .status(&execution(&t, other.token.clone()))
        .await
        .map_err(|e| e.to_string())?;
    abnormal(s.outcome().ok_or("not finished")?, AbnormalKind::Missing)?;
    d.cancel(&execution(&t, other.token))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn invalid_partition_is_rejected_permanently() -> TestResult {
    let d = distributor().await?;
    let t = task(
        &RequestId::random(),
        json!({ "argv": ["true"], "partition": "no-such-partition" }),
    );
    let e = d
        .run(&t)
        .await
        .err()
        .ok_or("run accepted a bad partition")?;
    if e.is_transient() || !e.to_string().contains("2000") {
        return Err(format!("expected a permanent slurm error 2000, got {e}").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let unreachable = std::env::var("SLURM_URL").is_err().then_some(
        "SLURM_URL not set: start a cluster with `eval \"$(scripts/engines/slurm.sh start)\"`",
    );
    let cases: Vec<(&str, Case)> = vec![
        ("completed_job_succeeds", || {
            block_on(completed_job_succeeds())
        }),
        ("exit_3_fails_with_code_3", || {
            block_on(exit_3_fails_with_code_3())
        }),
        ("cancel_ends_cancelled_and_is_idempotent", || {
            block_on(cancel_ends_cancelled_and_is_idempotent())
        }),
        ("time_limit_ends_timed_out", || {
            block_on(time_limit_ends_timed_out())
        }),
        ("run_is_idempotent_across_instances", || {
            block_on(run_is_idempotent_across_instances())
        }),
        ("batch_status_matches_status", || {
            block_on(batch_status_matches_status())
        }),
        ("unknown_job_is_missing", || {
            block_on(unknown_job_is_missing())
        }),
        ("invalid_partition_is_rejected_permanently", || {
            block_on(invalid_partition_is_rejected_permanently())
        }),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, f)| {
            // Without a cluster the trial reports itself ignored, with the reason.
            Trial::ignorable_test(format!("live::slurm::{name}"), move || match unreachable {
                Some(reason) => Ok(Completion::ignored_with(reason)),
                None => f().map(|()| Completion::Completed),
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
