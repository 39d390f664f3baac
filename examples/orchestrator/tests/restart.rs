//! The orchestrator binary killed with SIGKILL (and stopped with SIGTERM) while local work runs:
//! the work keeps running, a restarted orchestrator re-attaches to it and records its true exit
//! status, and the work was started exactly once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A client sending the API token (`token` in the test's server setup, or the generated one).
fn authed(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// A running `orchestrator serve`; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

thread_local! {
    static TOKEN_FILE: std::cell::RefCell<Option<std::path::PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// The token the server generated in the test's state directory (set by `setup`).
fn token(_base: &str) -> String {
    let path = TOKEN_FILE.with(|t| t.borrow().clone()).expect("setup ran");
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

fn start(config: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--config")
        .arg(config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn orchestrator");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("orchestrator did not start");
    let base = line
        .trim()
        .strip_prefix("orchestrator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    Server { child, base }
}

async fn get(base: &str, id: u64) -> Value {
    authed(&token(base))
        .get(format!("{base}/v1/executions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls until `f` holds for the execution (deadline 30 s).
async fn until(base: &str, id: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(base, id).await;
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "execution {id} never became {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn setup(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "[distributors.local]\nkind = \"local\"\nstate_dir = \"{0}/local\"\n\
             grace_period_ms = 1000\n\n[store]\npath = \"{0}/engine.db\"\n\n\
             [engine]\npoll_interval = \"200ms\"\n",
            dir.display()
        ),
    )
    .unwrap();
    TOKEN_FILE.with(|t| *t.borrow_mut() = Some(dir.join("api-token")));
    config
}

/// Submits work that records its start, waits for `<dir>/go`, then exits 7.
async fn submit_waiting_work(base: &str, dir: &Path) -> u64 {
    let d = dir.display();
    let script = format!(
        "echo started >> {d}/starts; while [ ! -e {d}/go ]; do sleep 0.05; done; \
         echo done > {d}/finished; exit 7"
    );
    let r = authed(&token(base))
        .post(format!("{base}/v1/executions"))
        .json(&json!({"distributor": "local", "payload": {"script": script}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["id"].as_u64().unwrap()
}

async fn survives(stop: impl FnOnce(&mut Server)) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let mut first = start(&config);
    let id = submit_waiting_work(&first.base, dir.path()).await;
    until(&first.base, id, "running", |v| v["state"] == "running").await;
    eprintln!("{:?} running", t0.elapsed());
    stop(&mut first);
    drop(first);
    eprintln!("{:?} stopped", t0.elapsed());

    // The orchestrator is gone; the work is not: it has not seen `go` yet.
    assert!(!dir.path().join("finished").exists());
    let second = start(&config);
    eprintln!("{:?} restarted", t0.elapsed());
    std::fs::write(dir.path().join("go"), "").unwrap();
    let done = until(&second.base, id, "terminal", |v| {
        !["queued", "dispatching", "pending", "running", "cancelling"]
            .contains(&v["state"].as_str().unwrap_or(""))
    })
    .await;
    eprintln!("{:?} terminal", t0.elapsed());
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["outcome"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("code 7"),
        "the true exit status is recorded: {done}"
    );
    assert_eq!(done["attempt"], 1, "{done}");
    assert!(
        dir.path().join("finished").exists(),
        "the original process ran to its end"
    );
    let starts = std::fs::read_to_string(dir.path().join("starts")).unwrap();
    assert_eq!(
        starts.lines().count(),
        1,
        "started exactly once: {starts:?}"
    );
}

#[tokio::test]
async fn sigkill_of_the_orchestrator_keeps_work_running_and_restart_reattaches() {
    survives(|s| s.child.kill().expect("SIGKILL")).await;
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_and_restart_reattaches() {
    survives(|s| {
        let pid = s.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok);
        let status = s.child.wait().expect("wait");
        assert!(status.success(), "graceful shutdown exits 0: {status}");
    })
    .await;
}
