//! The HTTP API in-process, over an engine with the fake distributor (real time, short scripts):
//! submit → terminal, every kind of bad request naming its field, push authentication, and the
//! read-only endpoints.

use std::time::{Duration, Instant};

use base64::Engine as _;
use distributor_core::store::MemoryStore;
use distributor_core::testing::{FakeBackend, FakeConfig};
use distributor_core::{DistributorsConfig, Engine, Registry, Settings};
use orchestrator::{ApiTokens, Scope, Security};
use reqwest::StatusCode;
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";
const READER: &str = "test-read-token-0123456789";

struct Server {
    base: String,
    http: reqwest::Client,
    engine: Engine,
}

async fn server(backend: &str) -> Server {
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let doc = json!({"distributors": {
        "fake": {"kind": "fake", "backend": backend},
        "default": {"alias": "fake"},
    }});
    let config = DistributorsConfig::from_value(&registry, "test", &doc).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store(MemoryStore::new())
        .settings(Settings {
            poll_interval: Duration::from_millis(50),
            hedge_poll_interval: Duration::from_millis(100),
            ..Settings::default()
        })
        .notify_target(format!("http://{addr}/v1/notify"))
        .build()
        .await
        .unwrap();
    let tokens =
        ApiTokens::new()
            .with("admin", TOKEN, [Scope::Admin])
            .with("reader", READER, [Scope::Read]);
    let mut security = Security::loopback(tokens);
    security.body_limit = 64 * 1024;
    let app = orchestrator::router(engine.clone(), security);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        engine,
    }
}

impl Server {
    async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }
    async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let (s, t) = self.get(path).await;
        (s, serde_json::from_str(&t).unwrap_or(Value::Null))
    }
    /// Polls `GET /v1/executions/{id}` until its state is terminal (deadline 20 s).
    async fn until_terminal(&self, id: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, v) = self.get_json(&format!("/v1/executions/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let st = v["state"].as_str().unwrap_or("").to_owned();
            if !["queued", "dispatching", "pending", "running", "cancelling"].contains(&st.as_str())
            {
                return v;
            }
            assert!(Instant::now() < deadline, "execution {id} still {st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn field(v: &Value) -> &str {
    v["error"]["field"].as_str().unwrap_or("<none>")
}

#[tokio::test]
async fn submit_runs_to_a_terminal_state_and_is_listed() {
    let s = server("http-submit").await;
    let (st, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"run_for_ms": 50,
                "outcome": {"outcome": "succeeded", "data": {"answer": 42}}},
                "labels": {"team": "a"}, "timeouts": {"run": "10s"}}"#,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["id"].as_u64().unwrap();
    assert_eq!(v["url"], format!("/v1/executions/{id}"));
    let done = s.until_terminal(id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["outcome"]["data"]["answer"], 42);
    let states: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["to"].as_str())
        .collect();
    assert_eq!(states.first(), Some(&"queued"));
    assert_eq!(states.last(), Some(&"succeeded"));

    // A failing one, then filters: by state, by label, by distributor.
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "default", "payload": {"outcome": {"outcome": "abnormal", "kind": "failed", "reason": "exit 3"}}}"#,
        )
        .await;
    let failed = s.until_terminal(v["id"].as_u64().unwrap()).await;
    assert_eq!(failed["state"], "failed");
    let ids = |v: &Value| -> Vec<u64> {
        v["executions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["id"].as_u64())
            .collect()
    };
    let (_, l) = s.get_json("/v1/executions?state=failed").await;
    assert_eq!(ids(&l), [failed["id"].as_u64().unwrap()]);
    let (_, l) = s.get_json("/v1/executions?label=team%3Da").await;
    assert_eq!(ids(&l), [id]);
    let (_, l) = s
        .get_json("/v1/executions?distributor=fake&state=succeeded,failed")
        .await;
    assert_eq!(ids(&l).len(), 2);
}

#[tokio::test]
async fn cancel_and_poke_over_http() {
    let s = server("http-cancel").await;
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"hang": true}}"#,
        )
        .await;
    let id = v["id"].as_u64().unwrap();
    let (st, _) = s.post(&format!("/v1/executions/{id}/poke"), "").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, v) = s
        .post(
            &format!("/v1/executions/{id}/cancel"),
            r#"{"reason": "test"}"#,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let done = s.until_terminal(id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        done["outcome"]["reason"].as_str().unwrap().contains("test"),
        "{done}"
    );
}

#[tokio::test]
async fn bad_requests_get_4xx_naming_the_field() {
    let s = server("http-bad").await;
    let cases: [(&str, &str, StatusCode, &str); 7] = [
        (
            "/v1/executions",
            r#"{"distributor": "fake"}"#,
            StatusCode::BAD_REQUEST,
            "/payload",
        ),
        (
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}, "retires": 1}"#,
            StatusCode::BAD_REQUEST,
            "/retires",
        ),
        (
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}, "timeouts": {"run": "5"}}"#,
            StatusCode::BAD_REQUEST,
            "/timeouts/run",
        ),
        (
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}, "retries": -1}"#,
            StatusCode::BAD_REQUEST,
            "/retries",
        ),
        ("/v1/executions", "not json", StatusCode::BAD_REQUEST, ""),
        (
            "/v1/executions",
            r#"{"distributor": "fkae", "payload": {}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "/distributor",
        ),
        (
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"run_for_ms": "soon"}}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "/payload/run_for_ms",
        ),
    ];
    for (path, body, status, want) in cases {
        let (st, v) = s.post(path, body).await;
        assert_eq!(st, status, "{body} → {v}");
        assert_eq!(field(&v), want, "{body} → {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{v}"
        );
    }
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fkae", "payload": {}}"#,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `fake`"),
        "{v}"
    );
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"run_for_ms": "soon", "pushs": 1}}"#,
        )
        .await;
    let pointers: Vec<&str> = v["error"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["pointer"].as_str())
        .collect();
    assert_eq!(pointers, ["/payload/pushs", "/payload/run_for_ms"], "{v}");

    let param = |v: &Value| {
        v["error"]["parameter"]
            .as_str()
            .unwrap_or("<none>")
            .to_owned()
    };
    let (st, v) = s.get_json("/v1/executions/abc").await;
    assert_eq!(
        (st, param(&v).as_str()),
        (StatusCode::BAD_REQUEST, "id"),
        "{v}"
    );
    let (st, v) = s.get_json("/v1/executions/999").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    let (st, v) = s.get_json("/v1/executions?state=runnin").await;
    assert_eq!(
        (st, param(&v).as_str()),
        (StatusCode::BAD_REQUEST, "state"),
        "{v}"
    );
    let (st, v) = s.get_json("/v1/executions?colour=red").await;
    assert_eq!(
        (st, param(&v).as_str()),
        (StatusCode::BAD_REQUEST, "colour"),
        "{v}"
    );
    let (st, v) = s.post("/v1/executions/1/cancel", r#"{"why": "x"}"#).await;
    assert_eq!((st, field(&v)), (StatusCode::BAD_REQUEST, "/why"), "{v}");
    let (st, _) = s.get_json("/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn notify_rejects_forged_and_missing_tokens_and_accepts_real_ones() {
    let backend = "http-notify";
    let s = server(backend).await;
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"hang": true}}"#,
        )
        .await;
    let id = v["id"].as_u64().unwrap();
    // Wait until the fake has pushed (Running) so that we hold a real token for this execution.
    let deadline = Instant::now() + Duration::from_secs(10);
    let real = loop {
        let pushes = FakeBackend::named(backend).pushes();
        if let Some((_, n)) = pushes.iter().find(|(e, _)| e.0 == id) {
            break n.attributes["auth_token"].clone();
        }
        assert!(Instant::now() < deadline, "no push for {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pubsub = |token: Option<&str>, seq: u64| {
        let mut attrs = json!({"execution_id": id.to_string(), "sequence": seq.to_string()});
        if let Some(t) = token {
            attrs["auth_token"] = json!(t);
        }
        json!({
            "message": {
                "data": base64::engine::general_purpose::STANDARD.encode(br#"{"status": "running"}"#),
                "attributes": attrs,
                "messageId": format!("m{seq}"),
            },
            "subscription": "projects/p/subscriptions/s",
        })
        .to_string()
    };
    let forged = format!("{}x", &real[..real.len() - 1]);
    // Pub/Sub pushes that can never pass are acknowledged (200) so that Pub/Sub stops
    // redelivering them, with the refusal in the body.
    let (st, v) = s.post("/v1/notify", &pubsub(Some(&forged), 100)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], false, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
    assert_eq!(field(&v), "/attributes/auth_token");
    let (st, v) = s.post("/v1/notify", &pubsub(Some("garbage"), 101)).await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (StatusCode::OK, &json!("forbidden")),
        "{v}"
    );
    let (st, v) = s.post("/v1/notify", &pubsub(None, 102)).await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (StatusCode::OK, &json!("unauthorized")),
        "{v}"
    );
    let plain = json!({"execution_id": id, "data": {"status": "running"}, "attributes": {"auth_token": forged}, "sequence": 103});
    let (st, _) = s.post("/v1/notify", &plain.to_string()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = s
        .post(
            "/v1/notify",
            &json!({"execution_id": id, "data": {}}).to_string(),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // The forged pushes changed nothing.
    let (_, rec) = s.get_json(&format!("/v1/executions/{id}")).await;
    assert_eq!(rec["state"], "running", "{rec}");
    // A genuine token passes authentication (accepted, or acknowledged as stale).
    let (st, v) = s.post("/v1/notify", &pubsub(Some(&real), 1_000)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(v.get("accepted").is_some(), "{v}");
    s.engine
        .cancel(distributor_core::ExecutionId(id), "end of test")
        .await
        .unwrap();
    // A genuine push while the engine is stopped is transient: 503, so that Pub/Sub
    // redelivers it.
    s.engine.shutdown().await;
    let (st, v) = s.post("/v1/notify", &pubsub(Some(&real), 2_000)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
}

#[tokio::test]
async fn kinds_metrics_health_and_status_page() {
    let s = server("http-misc").await;
    let (st, v) = s.get_json("/healthz").await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (st, v) = s.get_json("/v1/kinds").await;
    assert_eq!(st, StatusCode::OK);
    let fake = v["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "fake")
        .unwrap()
        .clone();
    assert!(
        fake["payload_schema"]["properties"]["run_for_ms"].is_object(),
        "{fake}"
    );
    assert!(
        fake["config_schema"]["properties"]["backend"].is_object(),
        "{fake}"
    );
    assert_eq!(fake["distributors"], json!(["default", "fake"]));

    let (_, v) = s
        .post("/v1/executions", r#"{"distributor": "fake", "payload": {"outcome": {"outcome": "abnormal", "kind": "failed", "reason": "disk <full>"}}}"#)
        .await;
    s.until_terminal(v["id"].as_u64().unwrap()).await;
    let (st, text) = s.get("/metrics").await;
    assert_eq!(st, StatusCode::OK);
    assert!(text.contains("distributor_submitted_total"), "{text}");
    let (st, html) = s.get("/").await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        html.contains("Executions by state") && html.contains("Recent failures"),
        "{html}"
    );
    assert!(
        html.contains("disk &lt;full&gt;"),
        "reasons are shown, escaped: {html}"
    );
}

#[tokio::test]
async fn every_refusal_is_json_and_scopes_cookies_and_limits_hold() {
    let s = server("http-guard").await;
    let url = |p: &str| format!("{}{p}", s.base);
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let json_of = |r: reqwest::Response| async move {
        let st = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(
            ct.starts_with("application/json"),
            "{st}: content-type {ct}"
        );
        (st, r.json::<Value>().await.unwrap())
    };
    // 405 names the method and what is allowed.
    let r = raw
        .delete(url("/v1/kinds"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let (st, v) = json_of(r).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"]["code"], "method_not_allowed");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("GET"),
        "{v}"
    );
    // 413 names the limit.
    let big = format!(
        r#"{{"distributor": "fake", "payload": {{"x": "{}"}}}}"#,
        "a".repeat(70_000)
    );
    let r = raw
        .post(url("/v1/executions"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let (st, v) = json_of(r).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes"),
        "{v}"
    );
    // …but an oversized Pub/Sub push is acknowledged, or Pub/Sub would redeliver it forever.
    let r = raw
        .post(url("/v1/notify"))
        .header("content-type", "application/json")
        .header("user-agent", "CloudPubSub-Google")
        .body(big)
        .send()
        .await
        .unwrap();
    let (st, v) = json_of(r).await;
    assert_eq!((st, &v["accepted"]), (StatusCode::OK, &json!(false)), "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    // A Pub/Sub body without `message` says so.
    let (st, v) = s
        .post(
            "/v1/notify",
            r#"{"subscription": "projects/p/subscriptions/s"}"#,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(field(&v), "/message", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs `message`"),
        "{v}"
    );
    // No Rust type names; JSON Pointers only.
    let (st, v) = s.post("/v1/notify", "[1, 2]").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(!m.contains("struct") && !m.contains("PlainPush"), "{m}");
    assert_eq!(field(&v), "", "{v}");
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payloda": {}}"#,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `payload`"),
        "{v}"
    );
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}, "retry": 2}"#,
        )
        .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `retries`"),
        "{v}"
    );
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}, "timeouts": {"run": "-5s"}}"#,
        )
        .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("negative"),
        "{v}"
    );

    // Scopes: a read token reads but cannot submit or cancel.
    let r = raw
        .get(url("/v1/executions"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = raw
        .post(url("/v1/executions"))
        .bearer_auth(READER)
        .json(&json!({"distributor": "fake", "payload": {}}))
        .send()
        .await
        .unwrap();
    let (st, v) = json_of(r).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs scope `submit`"),
        "{v}"
    );
    let r = raw
        .get(url("/v1/executions"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Same-origin browser requests pass the Origin check.
    let r = raw
        .post(url("/v1/executions"))
        .bearer_auth(TOKEN)
        .header("origin", &s.base)
        .json(&json!({"distributor": "fake", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Browsers: an HTML page without a token goes to the login form; the form sets the cookie;
    // the cookie opens the page. `?token=` does the same exchange.
    let r = raw
        .get(url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/login?next=%2F");
    let r = raw.get(url("/login?next=/")).send().await.unwrap();
    assert!(r.text().await.unwrap().contains("name=\"token\""));
    let r = raw
        .post(url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", &s.base)
        .body(format!("token={TOKEN}&next=%2F"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = raw
        .get(url("/"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("Executions by state"));
    let r = raw
        .post(url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=nope&next=%2F")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/login?error=1&next=%2F");
    let r = raw
        .get(url(&format!("/v1/executions?token={TOKEN}&state=failed")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/v1/executions?state=failed");
    assert!(r.headers().contains_key("set-cookie"));
}

#[tokio::test]
async fn an_idempotency_key_makes_a_resubmission_answer_the_first_id() {
    let s = server("http-idem").await;
    let body = json!({"distributor": "fake", "payload": {"hang": true}}).to_string();
    let send = |key: &'static str, body: String| {
        let r = s
            .http
            .post(format!("{}/v1/executions", s.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body);
        async move {
            let r = r.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, first) = send("k-1", body.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{first}");
    let (st, again) = send("k-1", body.clone()).await;
    assert_eq!(st, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"]);
    // `request_id` in the body is the same key.
    let (st, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {"hang": true}, "request_id": "k-1"}"#,
        )
        .await;
    assert_eq!((st, &v["id"]), (StatusCode::OK, &first["id"]), "{v}");
    let with_other = json!({"distributor": "fake", "payload": {}, "request_id": "k-2"});
    let (st, v) = send("k-3", with_other.to_string()).await;
    assert_eq!(
        (st, field(&v)),
        (StatusCode::BAD_REQUEST, "/request_id"),
        "{v}"
    );
    let (_, l) = s.get_json("/v1/executions").await;
    assert_eq!(l["executions"].as_array().unwrap().len(), 1, "{l}");
    let id = first["id"].as_u64().unwrap();
    s.engine
        .cancel(distributor_core::ExecutionId(id), "end of test")
        .await
        .unwrap();
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token_and_describes_the_answers() {
    let s = server("http-openapi").await;
    let r = reqwest::get(format!("{}/v1/openapi.json", s.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/executions",
        "/v1/executions/{id}",
        "/v1/executions/{id}/cancel",
        "/v1/executions/{id}/poke",
        "/v1/notify",
        "/v1/kinds",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    // The view's fields are those the server answers with.
    let (_, v) = s
        .post(
            "/v1/executions",
            r#"{"distributor": "fake", "payload": {}}"#,
        )
        .await;
    let done = s.until_terminal(v["id"].as_u64().unwrap()).await;
    let props = doc["components"]["schemas"]["ExecutionView"]["properties"]
        .as_object()
        .unwrap();
    for k in done.as_object().unwrap().keys() {
        assert!(props.contains_key(k), "`{k}` is in the document");
    }
}

#[tokio::test]
async fn half_sent_headers_are_cut_off_and_connections_beyond_the_limit_wait() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": "http-limits"}}});
    let config = DistributorsConfig::from_value(&registry, "test", &doc).unwrap();
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .store(MemoryStore::new())
        .build()
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = orchestrator::router(engine, Security::loopback(ApiTokens::new()));
    let limits = orchestrator::Limits {
        header_timeout: Duration::from_millis(300),
        max_connections: 1,
        shutdown_grace: Duration::from_secs(1),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(orchestrator::serve::serve_app(
        listener,
        app,
        limits,
        async {
            let _ = stopped.await;
        },
    ));
    // A client that never finishes its headers holds the only slot…
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    // …until the header timeout closes it; then the next connection is served.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf))
        .await
        .expect("the half-sent request was cut off")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(!answer.contains("200 OK"), "{answer}");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::get(format!("http://{addr}/healthz")),
    )
    .await
    .expect("served once the slot is free")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stopped within the grace")
        .unwrap();
}
