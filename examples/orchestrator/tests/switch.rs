//! `orchestrator switch …` and `/v1/switch/{name}` against a server with a `switch` over two
//! fakes.

use distributor_core::store::MemoryStore;
use distributor_core::testing::FakeConfig;
use distributor_core::{DistributorsConfig, Engine, Registry};
use distributor_switch::SwitchConfig;
use orchestrator::{ApiTokens, Scope, Security};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADMIN: &str = "switch-admin-token-0123456789";
const READER: &str = "switch-read-token-0123456789";

struct Server {
    base: String,
    http: reqwest::Client,
}

async fn server() -> Server {
    let registry = Registry::new()
        .register::<FakeConfig>()
        .unwrap()
        .register::<SwitchConfig>()
        .unwrap();
    let doc = json!({"distributors": {
        "export": {
            "kind": "switch",
            "before": {"kind": "fake", "backend": "orchestrator-switch-python"},
            "after": {"kind": "fake", "backend": "orchestrator-switch-go"},
        },
        "plain": {"kind": "fake"},
    }});
    let config = DistributorsConfig::from_value(&registry, "test", &doc).unwrap();
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let tokens =
        ApiTokens::new()
            .with("admin", ADMIN, [Scope::Admin])
            .with("reader", READER, [Scope::Read]);
    let app = orchestrator::router(engine, Security::loopback(tokens));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn call(&self, token: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let req = match body {
            Some(b) => self.http.post(url).json(&b),
            None => self.http.get(url),
        };
        let r = req.bearer_auth(token).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn set(cutover: &str) -> Value {
    json!({"op": "set", "cutover": cutover, "who": "ana", "why": "go exporter verified"})
}

#[tokio::test]
async fn the_route_shows_sets_and_refuses_with_the_field_and_scope() {
    let s = server().await;
    let (st, v) = s.call(READER, "/v1/switch/export", None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["mode"], "before_only");
    assert_eq!(v["before"], "fake");
    // Changing the cutover needs the admin scope.
    let (st, _) = s
        .call(
            READER,
            "/v1/switch/export",
            Some(set("2026-12-02T15:05:00Z")),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = s
        .call(
            ADMIN,
            "/v1/switch/export",
            Some(set("2026-12-02T15:05:00Z")),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["cutover"], "2026-12-02T15:05:00Z");
    assert_eq!(v["history"][0]["who"], "ana");
    let (st, v) = s
        .call(
            ADMIN,
            "/v1/switch/export",
            Some(set("2026-12-02T15:05:30Z")),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["field"], "/cutover");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not on the 60-second grid"),
        "{v}"
    );
    let (st, v) = s
        .call(ADMIN, "/v1/switch/plain", Some(json!({"op": "show"})))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "refused");
    let (st, _) = s.call(READER, "/v1/switch/nope", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_switch_command_sets_shows_and_reports_refusals() {
    let s = server().await;
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
        c.args(["--server", &s.base, "switch"])
            .args(args)
            .env("ORCHESTRATOR_TOKEN", ADMIN);
        c
    };
    let out = cli(&[
        "set",
        "export",
        "2026-12-02T15:05:00Z",
        "--who",
        "ana",
        "--why",
        "go exporter verified",
    ])
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("cutover: 2026-12-02T15:05:00Z"), "{stdout}");
    assert!(
        stdout.contains("ana: none → 2026-12-02T15:05:00Z"),
        "{stdout}"
    );

    let out = cli(&["set", "export", "2026-12-02T15:05:30Z", "--why", "typo"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not on the 60-second grid"), "{stderr}");

    let out = cli(&["show", "export", "--json"]).output().await.unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cutover"], "2026-12-02T15:05:00Z");
    assert_eq!(v["history"].as_array().unwrap().len(), 1);
}
