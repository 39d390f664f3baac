//! End to end through the reference orchestrator's HTTP API, in-process, on the real `local`
//! adapter and a SQLite store: submit → a local process → terminal; forged pushes refused;
//! bad requests named. The SIGKILL-and-restart case needs the `orchestrator` binary and lives in
//! `examples/orchestrator/tests/restart.rs` (Cargo gives the binary's path only to its own
//! package's tests).

use std::time::{Duration, Instant};

use orchestrator::OrchestratorConfig;
use serde_json::{Value, json};

/// The admin bearer token the test's server accepts.
const TOKEN: &str = "e2e-admin-token-0123456789abcdef";

struct Server {
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn serve() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let registry = orchestrator::registry().unwrap();
    let doc = json!({
        "distributors": {"local": {"kind": "local", "state_dir": dir.path().join("local")}},
        "store": {"path": dir.path().join("engine.db")},
        "engine": {"poll_interval": "200ms"},
    });
    let config = OrchestratorConfig::from_value(&registry, "e2e", &doc).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = config
        .engine(registry, Some(format!("http://{addr}/v1/notify")))
        .await
        .unwrap();
    // The API needs a bearer token (issue 15); this test acts as an admin client.
    let security = orchestrator::Security::loopback(orchestrator::ApiTokens::new().with(
        "e2e",
        TOKEN,
        [orchestrator::Scope::Admin],
    ));
    tokio::spawn(orchestrator::serve(
        listener,
        engine,
        security,
        orchestrator::Limits::default(),
        std::future::pending(),
    ));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap(),
        _dir: dir,
    }
}

impl Server {
    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }
    async fn until(&self, id: u64, what: &str, done: impl Fn(&str) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.get(&format!("/v1/executions/{id}")).await;
            if done(v["state"].as_str().unwrap_or("")) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "execution {id} never {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn terminal(s: &str) -> bool {
    !["queued", "dispatching", "pending", "running", "cancelling"].contains(&s)
}

#[tokio::test]
async fn http_submit_local_work_reaches_its_terminal_state() {
    let s = serve().await;
    let (st, v) = s
        .post(
            "/v1/executions",
            &json!({"distributor": "local", "payload": {"argv": ["sh", "-c", "echo e2e; exit 0"]}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let done = s
        .until(v["id"].as_u64().unwrap(), "finished", terminal)
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["outcome"]["data"]["exit_code"], 0, "{done}");
    assert!(done.to_string().contains("e2e"), "{done}");

    let (_, v) = s
        .post(
            "/v1/executions",
            &json!({"distributor": "local", "payload": {"script": "exit 9"}}),
        )
        .await;
    let failed = s
        .until(v["id"].as_u64().unwrap(), "finished", terminal)
        .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("code 9"),
        "{failed}"
    );
}

#[tokio::test]
async fn notify_rejects_forged_tokens_and_changes_nothing() {
    let s = serve().await;
    let (_, v) = s
        .post(
            "/v1/executions",
            &json!({"distributor": "local", "payload": {"argv": ["sleep", "30"]}}),
        )
        .await;
    let id = v["id"].as_u64().unwrap();
    s.until(id, "running", |st| st == "running").await;
    let finished = json!({"local": {"token": "x"}, "status": "finished"});
    for (auth, want) in [(Some("forged-token"), 403), (None, 401)] {
        let mut attributes = json!({"execution_id": id.to_string()});
        if let Some(t) = auth {
            attributes["auth_token"] = json!(t);
        }
        let push = json!({"message": {"data": "", "attributes": attributes, "messageId": "m"},
                          "subscription": "s"});
        // A Pub/Sub push that can never succeed is acknowledged (200, `accepted: false`) so that
        // Pub/Sub stops redelivering it; the refusal is in the body.
        let (st, v) = s.post("/v1/notify", &push).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["accepted"], false, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        let plain = json!({"execution_id": id, "data": finished, "sequence": 99,
                           "attributes": auth.map(|t| json!({"auth_token": t})).unwrap_or(json!({}))});
        // A plain push is answered with the refusal's own status.
        let (st, v) = s.post("/v1/notify", &plain).await;
        assert_eq!(st, want, "{v}");
    }
    assert_eq!(
        s.get(&format!("/v1/executions/{id}")).await["state"],
        "running"
    );
    let (st, _) = s
        .post(
            &format!("/v1/executions/{id}/cancel"),
            &json!({"reason": "e2e"}),
        )
        .await;
    assert_eq!(st, 202);
    let done = s.until(id, "cancelled", terminal).await;
    assert_eq!(done["state"], "cancelled", "{done}");
}

#[tokio::test]
async fn bad_requests_are_4xx_naming_the_field() {
    let s = serve().await;
    for (body, status, field) in [
        (json!({"distributor": "local"}), 400, "/payload"),
        (
            json!({"distributor": "local", "payload": {"argv": ["true"]}, "timeouts": {"run": 5}}),
            400,
            "/timeouts/run",
        ),
        (
            json!({"distributor": "locl", "payload": {"argv": ["true"]}}),
            422,
            "/distributor",
        ),
        (
            json!({"distributor": "local", "payload": {"argv": "true"}}),
            422,
            "/payload/argv",
        ),
    ] {
        let (st, v) = s.post("/v1/executions", &body).await;
        assert_eq!(
            (st, v["error"]["field"].as_str()),
            (status, Some(field)),
            "{body} → {v}"
        );
    }
}
