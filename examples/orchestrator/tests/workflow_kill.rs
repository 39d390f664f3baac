//! `orchestrator workflow run` killed with SIGKILL mid-workflow, then `orchestrator workflow
//! resume`: the run finishes and every step's work was started exactly once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn killed_mid_workflow_and_resumed_each_step_started_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "[distributors.local]\nkind = \"local\"\nstate_dir = \"{d}/local\"\n\
             grace_period_ms = 1000\nmax_parallel = 8\n\n[store]\npath = \"{d}/engine.db\"\n\n\
             [engine]\npoll_interval = \"200ms\"\n"
        ),
    )
    .unwrap();
    let wf = dir.path().join("wf.toml");
    std::fs::write(
        &wf,
        format!(
            r#"
name = "kill"
[params.suffix]
default = "x"
[[steps]]
name = "fetch"
distributor = "local"
payload = {{ script = "echo fetch >> {d}/starts" }}
[[steps]]
name = "build"
distributor = "local"
depends_on = ["fetch"]
for_each = ["a", "b", "c"]
payload = {{ script = "echo build-{{{{ item }}}}-{{{{ params.suffix }}}} >> {d}/starts; while [ ! -e {d}/go ]; do sleep 0.05; done" }}
[[steps]]
name = "test"
distributor = "local"
depends_on = ["build"]
payload = {{ script = "echo test >> {d}/starts" }}
"#
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_orchestrator");
    let mut first = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["workflow", "run"])
        .arg(&wf)
        .args(["--param", "suffix=k"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let starts = dir.path().join("starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(&starts)
        .iter()
        .filter(|l| l.starts_with("build-"))
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "builds never all started: {:?}",
            lines(&starts)
        );
        assert!(first.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    std::fs::write(dir.path().join("go"), "").unwrap();

    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["workflow", "resume"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "resume failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("): succeeded"), "{stdout}");
    let mut got = lines(&starts);
    got.sort();
    assert_eq!(
        got,
        ["build-a-k", "build-b-k", "build-c-k", "fetch", "test"],
        "each step's work started exactly once\n{stdout}"
    );
}
