//! End-to-end on a real Slurm cluster: `orchestrator run` with a config whose distributor is
//! Slurm runs one task to completion, one to failure with its exit code, one cancelled, and one
//! past its time limit (Slurm TIMEOUT → `timed_out`).
//!
//! Needs `eval "$(scripts/engines/slurm.sh start)"`; without `SLURM_URL` the trial is reported
//! ignored with the reason. Slurm counts time limits in whole minutes, so this takes 1–2 min.

use std::process::Command;

use libtest_mimic::{Arguments, Trial};

const NAME: &str = "e2e::slurm::orchestrator_run_on_slurm";

fn run_on_slurm() -> Result<(), String> {
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} not set"));
    let (url, user) = (env("SLURM_URL")?, env("SLURM_USER")?);
    let job_dir = env("SLURM_JOB_DIR").unwrap_or_else(|_| "/tmp".into());
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = dir.path().join("distributors.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[distributors.hpc]
kind = "slurm"
url = "{url}"
user = "{user}"
token = {{ env = "SLURM_JWT" }}
working_directory = "{job_dir}"
poll_interval_secs = 1

[engine]
poll_interval = "1s"

[store]
path = "{db}"
"#,
            db = dir.path().join("engine.db").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let tasks = dir.path().join("tasks.toml");
    std::fs::write(
        &tasks,
        r##"
[[task]]
name = "completes"
distributor = "hpc"
payload = { argv = ["true"] }

[[task]]
name = "exits-3"
distributor = "hpc"
payload = { script = "#!/bin/sh\nexit 3\n" }
expect = "failed"

[[task]]
name = "cancelled"
distributor = "hpc"
payload = { argv = ["sleep", "600"] }
cancel_after = "3s"
expect = "cancelled"

[[task]]
name = "past-limit"
distributor = "hpc"
payload = { argv = ["sleep", "600"], time_limit_minutes = 1 }
expect = "timed_out"
"##,
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .arg(&tasks)
        .current_dir(dir.path())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = || {
        format!(
            "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status.code()
        )
    };
    if !out.status.success() || !stdout.contains("4 tasks, all as expected") {
        return Err(format!("the run did not end as expected\n{}", report()));
    }
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!(" {name} ")) && l.starts_with("ok"))
            .unwrap_or("")
    };
    if !line("exits-3").contains("failed") || !line("exits-3").contains('3') {
        return Err(format!(
            "the failure does not carry its exit code\n{}",
            report()
        ));
    }
    if !line("past-limit").contains("timed_out") {
        return Err(format!(
            "the time limit was not reported as timed_out\n{}",
            report()
        ));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Arguments::from_args();
    let unreachable = std::env::var("SLURM_URL").is_err();
    if unreachable {
        eprintln!(
            "{NAME}: ignored: SLURM_URL not set: no slurmrestd (run `eval \"$(scripts/engines/slurm.sh start)\"` as root)"
        );
    }
    let trial =
        Trial::test(NAME, || run_on_slurm().map_err(Into::into)).with_ignored_flag(unreachable);
    libtest_mimic::run(&args, vec![trial]).exit_code()
}
