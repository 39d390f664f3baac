//! Browser test of the workflow run page: Debian's chromium, headless, driven over the
//! WebDriver protocol (chromedriver, plain HTTP with reqwest; nothing is downloaded). It loads
//! the page of a live run, checks that the step states it shows change as the run progresses,
//! clicks Approve, sees the run finish, and saves screenshots under `target/` (for the notes).
//!
//! Reported ignored, with the reason, when `/usr/bin/chromium` or `/usr/bin/chromedriver` is
//! missing (`.ci/run` installs both from Debian).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use distributor_core::testing::FakeConfig;
use distributor_core::{DistributorsConfig, Engine, Registry};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn main() {
    let args = Arguments::from_args();
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    let name = "workflow_page::live_states_approve_and_screenshot";
    let trial = if missing.is_empty() {
        Trial::test(name, || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Failed::from(e.to_string()))?
                .block_on(browser_test())
        })
    } else {
        eprintln!(
            "{name}: ignored: {} not installed (apt-get install chromium chromium-driver)",
            missing.join(" and ")
        );
        Trial::test(name, || Ok(())).with_ignored_flag(true)
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// A WebDriver session.
struct Driver {
    http: reqwest::Client,
    base: String,
}

impl Driver {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failed> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| Failed::from(e.to_string()))?;
        let status = r.status();
        let v: Value = r.json().await.map_err(|e| Failed::from(e.to_string()))?;
        if !status.is_success() {
            return Err(format!("webdriver {path}: {status}: {v}").into());
        }
        Ok(v["value"].clone())
    }
    async fn script(&self, js: &str) -> Result<Value, Failed> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .await
    }
    async fn screenshot(&self, file: &Path) -> Result<(), Failed> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| Failed::from(e.to_string()))?;
        std::fs::create_dir_all(file.parent().unwrap()).map_err(|e| Failed::from(e.to_string()))?;
        std::fs::write(file, png).map_err(|e| Failed::from(e.to_string()))?;
        eprintln!("screenshot: {}", file.display());
        Ok(())
    }
    /// The step states the page shows, by step name.
    async fn states(&self) -> Result<BTreeMap<String, String>, Failed> {
        let v = self
            .script(
                "return Array.from(document.querySelectorAll('.step'))\
                 .map(e => [e.dataset.step, e.dataset.state]);",
            )
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect())
    }
}

async fn browser_test() -> Result<(), Failed> {
    // The orchestrator side: the workflow routes over an engine with a fake distributor whose
    // work takes real time.
    let registry = Registry::new()
        .register::<FakeConfig>()
        .map_err(|e| Failed::from(e.to_string()))?;
    let config = DistributorsConfig::from_value(
        &registry,
        "test",
        &json!({"distributors": {"fake": {"kind": "fake", "backend": "wf-browser"}}}),
    )
    .map_err(|e| Failed::from(e.to_string()))?;
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .build()
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let app = orchestrator::workflow_http::routes(engine.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let slow = |ms: u64, data: Value| json!({"run_for_ms": ms, "outcome": {"outcome": "succeeded", "data": data}});
    let workflow = json!({
        "name": "release",
        "params": {"version": {"default": "1.4.0"}},
        "steps": [
            {"name": "fetch", "distributor": "fake", "payload": slow(1500, json!({"rev": "abc123"}))},
            {"name": "build", "distributor": "fake", "depends_on": ["fetch"],
             "for_each": ["linux", "darwin", "windows"],
             "payload": slow(1500, json!("app-{{ item }}-{{ steps.fetch.result.rev }}"))},
            {"name": "test", "distributor": "fake", "depends_on": ["build"], "payload": slow(1500, json!("ok"))},
            {"name": "approve", "depends_on": ["test"], "approval": {"prompt": "Publish {{ params.version }}?"}},
            {"name": "publish", "distributor": "fake", "depends_on": ["approve"], "payload": slow(800, json!("published"))}
        ]
    });
    // The browser side.
    let port = free_port();
    let _chromedriver = Kill(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failed::from(format!("chromedriver: {e}")))?,
    );
    let wd = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = async {
            let v: Value = http
                .get(format!("{wd}/status"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["value"]["ready"].as_bool()
        }
        .await;
        if ready == Some(true) {
            break;
        }
        if Instant::now() > deadline {
            return Err("chromedriver did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let caps = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1500,700",
                     format!("--user-data-dir={}", profile.path().display())]
        }
    }}});
    let s: Value = http
        .post(format!("{wd}/session"))
        .json(&caps)
        .send()
        .await
        .map_err(|e| Failed::from(e.to_string()))?
        .json()
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    let session = s["value"]["sessionId"]
        .as_str()
        .ok_or_else(|| Failed::from(format!("no session: {s}")))?
        .to_owned();
    // The run starts once the browser is up, so that the page sees its first steps run.
    let r = http
        .post(format!("{base}/v1/workflows/runs"))
        .json(&json!({"workflow": workflow}))
        .send()
        .await
        .map_err(|e| Failed::from(e.to_string()))?;
    if r.status() != 201 {
        return Err(format!(
            "start: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        )
        .into());
    }
    let started: Value = r.json().await.unwrap();
    let page = format!("{base}{}", started["page"].as_str().unwrap());

    let d = Driver {
        http: http.clone(),
        base: format!("{wd}/session/{session}"),
    };
    let result = drive(&d, &page).await;
    let _ = d.call(reqwest::Method::DELETE, "", None).await;
    engine.shutdown().await;
    result
}

async fn drive(d: &Driver, page: &str) -> Result<(), Failed> {
    d.call(reqwest::Method::POST, "/url", Some(json!({"url": page})))
        .await?;
    let shots = target_dir();
    // Follow the states the page shows; every step must be seen in more than one state, in
    // order, without reloading the page.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states = d.states().await?;
        for (k, v) in &states {
            let e = seen.entry(k.clone()).or_default();
            if e.last() != Some(v) {
                e.push(v.clone());
            }
        }
        if states.get("approve").map(String::as_str) == Some("awaiting_approval") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("approval never shown; saw {seen:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = |step: &str| seen.get(step).cloned().unwrap_or_default();
    if order("fetch") != ["running", "succeeded"] || !order("build").contains(&"running".into()) {
        return Err(format!("the page did not show the steps progress live: {seen:?}").into());
    }
    if order("publish") != ["waiting"] {
        return Err(format!("publish ran before approval: {seen:?}").into());
    }
    d.screenshot(&shots.join("workflow-run-awaiting-approval.png"))
        .await?;
    let el = d
        .call(
            reqwest::Method::POST,
            "/element",
            Some(json!({"using": "css selector", "value": "#step-approve button[data-action=approve]"})),
        )
        .await?;
    let id = el
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .ok_or_else(|| Failed::from(format!("no approve button: {el}")))?
        .to_owned();
    d.call(
        reqwest::Method::POST,
        &format!("/element/{id}/click"),
        Some(json!({})),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = d.states().await?;
        let run = d
            .script("return document.getElementById('run-state').textContent;")
            .await?;
        if let Some(v) = states.get("publish") {
            let e = seen.entry("publish".into()).or_default();
            if e.last() != Some(v) {
                e.push(v.clone());
            }
        }
        if run == "succeeded" {
            if states.values().any(|s| s != "succeeded") {
                return Err(format!("run succeeded but steps show {states:?}").into());
            }
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("run never shown succeeded after approve; {states:?} run={run}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let approve_seen = seen.get("approve").cloned().unwrap_or_default();
    if approve_seen.last().map(String::as_str) != Some("awaiting_approval")
        || seen["publish"].last().map(String::as_str) != Some("succeeded")
    {
        return Err(format!("unexpected progression: {seen:?}").into());
    }
    d.screenshot(&shots.join("workflow-run-succeeded.png"))
        .await?;
    Ok(())
}
