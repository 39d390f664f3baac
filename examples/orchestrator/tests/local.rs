//! The HTTP API in-process over the orchestrator's own config loading and the real `local`
//! adapter: submit → a local process → terminal, with its output, info URL and status page.

use std::time::{Duration, Instant};

use orchestrator::OrchestratorConfig;
use serde_json::{Value, json};

/// A client sending the API token (`token` in the test's server setup, or the generated one).
const TOKEN: &str = "local-test-token-0123456789";

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

async fn start(dir: &std::path::Path) -> String {
    let registry = orchestrator::registry().unwrap();
    let doc: Value = toml::from_str(&format!(
        "[distributors.local]\nkind = \"local\"\nstate_dir = \"{}\"\n\
         [store]\npath = \":memory:\"\n[engine]\npoll_interval = \"200ms\"\n",
        dir.join("local").display()
    ))
    .unwrap();
    let config = OrchestratorConfig::from_value(&registry, "test", &doc).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = config
        .engine(registry, Some(format!("http://{addr}/v1/notify")))
        .await
        .unwrap();
    let security = orchestrator::Security::loopback(orchestrator::ApiTokens::new().with(
        "test",
        TOKEN,
        [orchestrator::Scope::Admin],
    ));
    tokio::spawn(
        async move { axum::serve(listener, orchestrator::router(engine, security)).await },
    );
    format!("http://{addr}")
}

async fn until_terminal(base: &str, id: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = authed(TOKEN)
            .get(format!("{base}/v1/executions/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let st = v["state"].as_str().unwrap_or("");
        if !["queued", "dispatching", "pending", "running", "cancelling"].contains(&st) {
            return v;
        }
        assert!(Instant::now() < deadline, "still {st}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_submit_runs_a_local_process_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = start(dir.path()).await;
    let http = authed(TOKEN);
    let submit = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/v1/executions");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = submit(json!({"distributor": "local",
        "payload": {"argv": ["sh", "-c", "echo hello from $GREETER"], "env": {"GREETER": "http"}},
        "labels": {"suite": "local"}}))
    .await;
    assert_eq!(st, 201, "{v}");
    let ok = until_terminal(&base, v["id"].as_u64().unwrap()).await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
    assert_eq!(ok["outcome"]["data"]["exit_code"], 0, "{ok}");
    assert!(
        ok.to_string().contains("hello from http"),
        "the output is in the result: {ok}"
    );
    let info = ok["info_url"].as_str().unwrap();
    assert!(info.starts_with("file://"), "{ok}");

    let (_, v) = submit(json!({"distributor": "local", "payload": {"script": "exit 4"}})).await;
    let failed = until_terminal(&base, v["id"].as_u64().unwrap()).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("code 4"),
        "{failed}"
    );

    // The local kind's own payload rules come back as 422 with pointers under /payload.
    let (st, v) =
        submit(json!({"distributor": "local", "payload": {"argv": ["true"], "script": "x"}})).await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(v["error"]["field"], "/payload/script", "{v}");

    let page = authed(TOKEN)
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("exited with code 4"),
        "failure reasons on the page: {page}"
    );
}

#[tokio::test]
async fn cancelling_a_retried_attempt_cancels_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let base = start(dir.path()).await;
    let m = dir.path().join("marker");
    let script = format!(
        "if [ -e {0} ]; then sleep 30; else touch {0}; exit 1; fi",
        m.display()
    );
    let http = authed(TOKEN);
    let r = http
        .post(format!("{base}/v1/executions"))
        .json(&json!({"distributor": "local", "payload": {"script": script}, "retries": 1}))
        .send()
        .await
        .unwrap();
    let first = r.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    let failed = until_terminal(&base, first).await;
    let second = failed["retried_by"].as_u64().expect("retried");
    let r = http
        .post(format!("{base}/v1/executions/{first}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"].as_u64(), Some(second), "{v}");
    let done = until_terminal(&base, second).await;
    assert_eq!(done["state"], "cancelled", "{done}");
}
