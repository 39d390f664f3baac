//! The workflow HTTP API and pages (`orchestrator::workflow_http::routes`) over an engine with
//! the fake distributor.

use std::time::{Duration, Instant};

use distributor_core::testing::FakeConfig;
use distributor_core::{DistributorsConfig, Engine, Registry};
use serde_json::{Value, json};

async fn server() -> String {
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let config = DistributorsConfig::from_value(
        &registry,
        "test",
        &json!({"distributors": {"fake": {"kind": "fake", "backend": "wf-http"}}}),
    )
    .unwrap();
    let engine = Engine::builder()
        .registry(registry)
        .distributors(config)
        .build()
        .await
        .unwrap();
    let app = orchestrator::workflow_http::routes(engine);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap()
}

async fn until(base: &str, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = get(base, &format!("/v1/workflows/runs/{id}")).await;
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "run never {what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn start_follow_approve_and_errors_over_http() {
    let base = server().await;
    // A bad workflow: every violation with its pointer under /workflow.
    let (s, v) = post(
        &base,
        "/v1/workflows/runs",
        json!({"workflow": {"name": "x", "steps": [{"name": "a", "distributor": "fake", "depends_on": ["b"]}]}}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["field"], "/workflow/steps/0/depends_on/0", "{v}");
    // Not JSON of the right shape: 400 naming the field.
    let (s, v) = post(&base, "/v1/workflows/runs", json!({"workflw": {}})).await;
    assert_eq!(s, 400, "{v}");
    let wf = json!({
        "name": "gated",
        "params": {"who": {}},
        "steps": [
            {"name": "build", "distributor": "fake",
             "payload": {"run_for_ms": 50, "outcome": {"outcome": "succeeded", "data": {"by": "{{ params.who }}"}}}},
            {"name": "gate", "depends_on": ["build"], "approval": {"prompt": "ship {{ params.who }}?"}},
            {"name": "ship", "distributor": "fake", "depends_on": ["gate", "build"],
             "payload": {"outcome": {"outcome": "succeeded", "data": "{{ steps.build.result.by }}"}}}
        ]
    });
    // A missing parameter.
    let (s, v) = post(&base, "/v1/workflows/runs", json!({"workflow": wf})).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (422, Some("/params/who")),
        "{v}"
    );
    let (s, started) = post(
        &base,
        "/v1/workflows/runs",
        json!({"workflow": wf, "params": {"who": "ann"}}),
    )
    .await;
    assert_eq!(s, 201, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    let run = until(&base, &id, "awaiting approval", |v| {
        step(v, "gate")["state"] == "awaiting_approval"
    })
    .await;
    assert_eq!(step(&run, "gate")["approval"], "ship ann?");
    assert_eq!(step(&run, "build")["state"], "succeeded");
    assert_eq!(
        step(&run, "build")["executions"][0]["url"]
            .as_str()
            .map(|u| u.starts_with("/v1/executions/")),
        Some(true)
    );
    assert_eq!(step(&run, "ship")["state"], "waiting");
    // Approving a step that is not waiting is a conflict; an unknown one is 404.
    let (s, _) = post(
        &base,
        &format!("/v1/workflows/runs/{id}/steps/ship/approve"),
        json!({}),
    )
    .await;
    assert_eq!(s, 409);
    let (s, _) = post(
        &base,
        &format!("/v1/workflows/runs/{id}/steps/nope/approve"),
        json!({}),
    )
    .await;
    assert_eq!(s, 404);
    let (s, v) = post(
        &base,
        &format!("/v1/workflows/runs/{id}/steps/gate/approve"),
        json!({"by": "bob"}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let run = until(&base, &id, "succeeded", |v| v["state"] == "succeeded").await;
    assert_eq!(step(&run, "ship")["result"], "ann");
    assert_eq!(step(&run, "gate")["result"]["approved_by"], "bob");
    // Over: cancel and re-run of a step that succeeded are conflicts.
    let (s, _) = post(&base, &format!("/v1/workflows/runs/{id}/cancel"), json!({})).await;
    assert_eq!(s, 409);
    let (s, _) = post(
        &base,
        &format!("/v1/workflows/runs/{id}/steps/ship/rerun"),
        json!({}),
    )
    .await;
    assert_eq!(s, 409);
    let (s, _) = get(&base, "/v1/workflows/runs/nope").await;
    assert_eq!(s, 404);
    let (s, list) = get(&base, "/v1/workflows/runs").await;
    assert_eq!(s, 200);
    assert_eq!(list["runs"][0]["id"], id.as_str());
    // The pages.
    let html = reqwest::get(format!("{base}/workflows"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(&format!("/workflows/{id}")), "{html}");
    let html = reqwest::get(format!("{base}/workflows/{id}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("id=run-data") && html.contains("\"name\":\"ship\""),
        "{html}"
    );
    let (s, schema) = get(&base, "/v1/workflows/schema").await;
    assert_eq!(s, 200);
    assert!(schema["properties"]["steps"].is_object(), "{schema}");
}

#[tokio::test]
async fn cancel_over_http_cancels_running_steps() {
    let base = server().await;
    let wf = json!({"name": "long", "steps": [
        {"name": "hang", "distributor": "fake", "for_each": [1, 2], "payload": {"hang": true}}
    ]});
    let (s, started) = post(&base, "/v1/workflows/runs", json!({"workflow": wf})).await;
    assert_eq!(s, 201);
    let id = started["id"].as_str().unwrap().to_owned();
    until(&base, &id, "running", |v| {
        step(v, "hang")["units"]["running"] == 2
    })
    .await;
    let (s, v) = post(&base, &format!("/v1/workflows/runs/{id}/cancel"), json!({})).await;
    assert_eq!(s, 202, "{v}");
    let run = until(&base, &id, "cancelled", |v| v["state"] == "cancelled").await;
    assert_eq!(step(&run, "hang")["state"], "cancelled");
    for x in step(&run, "hang")["executions"].as_array().unwrap() {
        assert_eq!(x["state"], "cancelled");
    }
    // A cancelled step can be re-run (it hangs again; the run is running again).
    let (s, v) = post(
        &base,
        &format!("/v1/workflows/runs/{id}/steps/hang/rerun"),
        json!({}),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["state"], "running");
}
