//! The fake's wire format, pinned against request/response shapes of the public protos
//! (`swarming/proto/api_v2/swarming.proto`) and the pRPC framing of `grpc/prpc`: raw HTTP
//! requests in, raw bodies and headers checked.

use std::time::Duration;

use serde_json::{Value, json};
use swarming_fake::{Behaviour, End, FakeSwarming, Options, TaskState};

struct Reply {
    status: u16,
    code: Option<String>,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        let text = self
            .body
            .strip_prefix(")]}'\n")
            .unwrap_or_else(|| panic!("no )]}}' prefix in {:?}", self.body));
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

async fn call_as(fake: &FakeSwarming, token: &str, method: &str, body: &Value) -> Reply {
    let r = reqwest::Client::new()
        .post(
            fake.url()
                .join(&format!("prpc/swarming.v2.Tasks/{method}"))
                .unwrap(),
        )
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let code = r
        .headers()
        .get("x-prpc-grpc-code")
        .map(|v| v.to_str().unwrap().to_owned());
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.text().await.unwrap();
    Reply {
        status,
        code,
        content_type,
        body,
    }
}

async fn call(fake: &FakeSwarming, method: &str, body: &Value) -> Reply {
    call_as(fake, "alice", method, body).await
}

/// A NewTaskRequest as the proto names its fields (snake_case).
fn request(uuid: &str) -> Value {
    json!({
        "name": "wire-test",
        "priority": 100,
        "tags": ["purpose:wire"],
        "request_uuid": uuid,
        "task_slices": [{
            "expiration_secs": 300,
            "wait_for_capacity": false,
            "properties": {
                "command": ["python3", "-c", "print(1)"],
                "dimensions": [{"key": "pool", "value": "default"}],
                "env": [{"key": "A", "value": "1"}],
                "execution_timeout_secs": 60,
                "grace_period_secs": 30,
                "secret_bytes": "c2VjcmV0"
            }
        }]
    })
}

async fn wait_state(fake: &FakeSwarming, id: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = call(fake, "GetResult", &json!({"task_id": id}))
            .await
            .json();
        if r["state"] == want {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {want}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn new_task_reply_is_prefixed_camel_case_json_with_code_zero() {
    let fake = FakeSwarming::start().await.unwrap();
    fake.set_default_behaviour(Behaviour {
        run_ms: 10,
        end: End::Exit(0),
        ..Behaviour::default()
    });
    let r = call(&fake, "NewTask", &request("u-1")).await;
    assert_eq!(
        (r.status, r.code.as_deref()),
        (200, Some("0")),
        "{}",
        r.body
    );
    assert_eq!(r.content_type, "application/json");
    let v = r.json();
    let id = v["taskId"].as_str().unwrap().to_owned();
    assert!(id.ends_with('0'), "summary ids end in 0: {id}");
    assert!(u64::from_str_radix(&id[..id.len() - 1], 16).is_ok());
    // TaskRequestMetadataResponse {task_id, request, task_result}, lowerCamelCase.
    assert_eq!(v["request"]["taskId"], id.as_str());
    assert_eq!(v["request"]["authenticated"], "user:alice");
    let props = &v["request"]["taskSlices"][0]["properties"];
    assert_eq!(props["executionTimeoutSecs"], 60);
    assert!(
        props.get("secretBytes").is_none(),
        "secret bytes are write-only"
    );
    assert_eq!(v["taskResult"]["state"], "PENDING");
    assert!(v.get("task_id").is_none(), "proto names are not emitted");
    let tags: Vec<&str> = v["request"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tags.contains(&"pool:default") && tags.contains(&"purpose:wire"));

    let done = wait_state(&fake, &id, "COMPLETED").await;
    // exit code 0, failure false: defaults are omitted (protojson).
    assert!(
        done.get("exitCode").is_none() && done.get("failure").is_none(),
        "{done}"
    );
    assert!(done["runId"].as_str().unwrap().ends_with('1'));
    assert!(done["botId"].as_str().unwrap().starts_with("fake-bot-"));
    assert!(done["completedTs"].as_str().unwrap().ends_with('Z'));
    // GetResult takes the run id too.
    let run = call(&fake, "GetResult", &json!({"taskId": done["runId"]})).await;
    assert_eq!(run.json()["state"], "COMPLETED");
}

#[tokio::test]
async fn non_zero_exit_codes_are_int64_strings() {
    let fake = FakeSwarming::start().await.unwrap();
    fake.set_default_behaviour(Behaviour {
        run_ms: 1,
        end: End::Exit(3),
        ..Behaviour::default()
    });
    let id = call(&fake, "NewTask", &request("")).await.json()["taskId"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = wait_state(&fake, &id, "COMPLETED").await;
    assert_eq!(r["exitCode"], "3");
    assert_eq!(r["failure"], true);
}

#[tokio::test]
async fn request_uuid_dedupes_per_caller_without_comparing_bodies() {
    let fake = FakeSwarming::start().await.unwrap();
    let a = call(&fake, "NewTask", &request("same")).await.json();
    let mut other = request("same");
    other["name"] = json!("a different body");
    let again = call(&fake, "NewTask", &other).await.json();
    assert_eq!(a["taskId"], again["taskId"]);
    assert_eq!(again["request"]["name"], "wire-test", "the stored request");
    let bob = call_as(&fake, "bob", "NewTask", &request("same"))
        .await
        .json();
    assert_ne!(
        a["taskId"], bob["taskId"],
        "dedup is keyed by caller identity"
    );
    assert_eq!(fake.stats().tasks_created, 2);
    assert_eq!(fake.stats().new_task_calls, 3);
}

#[tokio::test]
async fn new_task_validation_follows_the_go_server() {
    let fake = FakeSwarming::start().await.unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "x", "priority": 1, "properties": {"command": ["a"]}}),
            "properties is deprecated, use task_slices instead",
        ),
        (
            {
                let mut r = request("");
                r["priority"] = json!(0);
                r
            },
            "priority",
        ),
        (
            {
                let mut r = request("");
                r["name"] = json!("");
                r
            },
            "name is required",
        ),
        (
            {
                let mut r = request("");
                r["task_slices"] = json!([]);
                r
            },
            "between 1 and 8",
        ),
        (
            {
                let mut r = request("");
                r["task_slices"][0]["properties"]["execution_timeout_secs"] = json!(10);
                r
            },
            "execution_timeout_secs",
        ),
        (
            {
                let mut r = request("");
                r["task_slices"][0]["expiration_secs"] = json!(5);
                r
            },
            "expiration_secs",
        ),
        (
            {
                let mut r = request("");
                r["task_slices"][0]["properties"]["dimensions"] = json!([]);
                r
            },
            "pool",
        ),
        (
            {
                let mut r = request("");
                r["task_slices"][0]["properties"]["env"] =
                    json!([{"key":"A","value":"1"},{"key":"A","value":"2"}]);
                r
            },
            "repeated",
        ),
        (
            {
                let mut r = request("");
                r["tags"] = json!(["nocolon"]);
                r
            },
            "key:value",
        ),
        (
            {
                let mut r = request("");
                r["pubsub_topic"] = json!("https://x/y");
                r
            },
            "projects/",
        ),
        (
            {
                let mut r = request("");
                r["pubsub_auth_token"] = json!("t");
                r
            },
            "require pubsub_topic",
        ),
        (
            {
                let mut r = request("");
                r["pubsub_topic"] = json!("projects/p/topics/t");
                r["pubsub_userdata"] = json!("x".repeat(1025));
                r
            },
            "1024",
        ),
    ];
    for (body, needle) in cases {
        let r = call(&fake, "NewTask", &body).await;
        assert_eq!(
            (r.status, r.code.as_deref()),
            (400, Some("3")),
            "{body}: {}",
            r.body
        );
        assert!(r.body.contains(needle), "{needle:?} not in {:?}", r.body);
        assert!(!r.body.starts_with(")]}'"), "errors are plain text");
    }
    assert_eq!(fake.stats().tasks_created, 0);
    // evaluate_only validates without creating.
    let mut r = request("");
    r["evaluate_only"] = json!(true);
    let v = call(&fake, "NewTask", &r).await.json();
    assert!(v.get("taskId").is_none() && v["request"]["name"] == "wire-test");
    assert_eq!(fake.stats().tasks_created, 0);
}

#[tokio::test]
async fn camel_case_input_and_unknown_fields_are_accepted() {
    let fake = FakeSwarming::start().await.unwrap();
    let body = json!({
        "name": "camel", "priority": "20", "requestUuid": "c-1", "someFutureField": {"x": 1},
        "taskSlices": [{"expirationSecs": "60", "properties": {
            "command": ["true"], "dimensions": [{"key": "pool", "value": "default"}],
            "executionTimeoutSecs": 30}}]
    });
    let r = call(&fake, "NewTask", &body).await;
    assert_eq!(r.code.as_deref(), Some("0"), "{}", r.body);
}

#[tokio::test]
async fn no_matching_bot_is_no_resource_at_once_unless_waiting_for_capacity() {
    let fake = FakeSwarming::start().await.unwrap();
    let mut r = request("");
    r["task_slices"][0]["properties"]["dimensions"] =
        json!([{"key": "pool", "value": "default"}, {"key": "os", "value": "Windows"}]);
    let v = call(&fake, "NewTask", &r).await.json();
    assert_eq!(v["taskResult"]["state"], "NO_RESOURCE");
    r["task_slices"][0]["wait_for_capacity"] = json!(true);
    let v = call(&fake, "NewTask", &r).await.json();
    assert_eq!(v["taskResult"]["state"], "PENDING");
}

#[tokio::test]
async fn batch_get_result_limits_and_per_item_errors() {
    let fake = FakeSwarming::start().await.unwrap();
    let id = call(&fake, "NewTask", &request("")).await.json()["taskId"].clone();
    let r = call(
        &fake,
        "BatchGetResult",
        &json!({"task_ids": [id, "7ffffffffffffffa0", "bogus"]}),
    )
    .await
    .json();
    let items = r["results"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["taskId"], id);
    assert!(items[0]["result"]["state"].is_string());
    assert_eq!(items[1]["error"]["code"], 5, "unknown → NOT_FOUND item");
    assert_eq!(items[2]["error"]["code"], 3);
    for bad in [json!({"task_ids": []}), json!({"task_ids": [id, id]})] {
        let r = call(&fake, "BatchGetResult", &bad).await;
        assert_eq!(r.code.as_deref(), Some("3"), "{bad}");
    }
    let many: Vec<String> = (0..1001).map(|i| format!("{:x}0", i + 1)).collect();
    let r = call(&fake, "BatchGetResult", &json!({"task_ids": many})).await;
    assert_eq!((r.status, r.code.as_deref()), (400, Some("3")));
    let r = call(&fake, "GetResult", &json!({"task_id": "7ffffffffffffffa0"})).await;
    assert_eq!((r.status, r.code.as_deref()), (404, Some("5")));
}

#[tokio::test]
async fn cancel_pending_running_and_finished() {
    let fake = FakeSwarming::start_with(Options {
        bots: 1,
        ..Options::default()
    })
    .await
    .unwrap();
    fake.set_default_behaviour(Behaviour {
        end: End::Hang,
        ..Behaviour::default()
    });
    let running = call(&fake, "NewTask", &request("")).await.json()["taskId"].clone();
    let running = running.as_str().unwrap().to_owned();
    wait_state(&fake, &running, "RUNNING").await;
    // One bot, busy: this one stays pending.
    let pending = call(&fake, "NewTask", &request("")).await.json()["taskId"].clone();
    let c = call(
        &fake,
        "CancelTask",
        &json!({"task_id": pending, "kill_running": true}),
    )
    .await;
    assert_eq!(c.json(), json!({"canceled": true}));
    assert_eq!(
        fake.task_state(pending.as_str().unwrap()),
        Some(TaskState::Canceled)
    );
    // Running without kill_running: not cancelled, still a success.
    let c = call(&fake, "CancelTask", &json!({"task_id": running})).await;
    assert_eq!(c.json(), json!({"wasRunning": true}));
    let c = call(
        &fake,
        "CancelTask",
        &json!({"task_id": running, "kill_running": true}),
    )
    .await;
    assert_eq!(c.json(), json!({"canceled": true, "wasRunning": true}));
    let killed = wait_state(&fake, &running, "KILLED").await;
    assert!(killed["abandonedTs"].is_string());
    let c = call(
        &fake,
        "CancelTask",
        &json!({"task_id": running, "kill_running": true}),
    )
    .await;
    assert_eq!(c.json(), json!({}), "already final: canceled=false");
    let c = call(
        &fake,
        "CancelTask",
        &json!({"task_id": "7ffffffffffffffa0"}),
    )
    .await;
    assert_eq!(c.code.as_deref(), Some("5"));
}

#[tokio::test]
async fn framing_errors_auth_and_unknown_methods() {
    let fake = FakeSwarming::start().await.unwrap();
    let url = fake.url().join("prpc/swarming.v2.Tasks/GetResult").unwrap();
    let http = reqwest::Client::new();
    // No Accept: the real server would answer binary protobuf.
    let r = http
        .post(url.clone())
        .header("content-type", "application/json")
        .header("authorization", "Bearer t")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-prpc-grpc-code"], "3");
    let r = http
        .post(url.clone())
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-prpc-grpc-code"].to_str().unwrap()
        ),
        (401, "16")
    );
    fake.accept_token("good", "user:ci@example.com");
    let r = call_as(&fake, "bad", "GetResult", &json!({})).await;
    assert_eq!(r.code.as_deref(), Some("16"));
    let r = call_as(&fake, "good", "ListTasks", &json!({})).await;
    assert_eq!((r.status, r.code.as_deref()), (501, Some("12")));
    fake.fail_next(2, swarming_fake::prpc::Code::Unavailable);
    for _ in 0..2 {
        let r = call_as(&fake, "good", "GetResult", &json!({"task_id": "10"})).await;
        assert_eq!((r.status, r.code.as_deref()), (503, Some("14")));
    }
    let r = call_as(&fake, "good", "GetResult", &json!({"task_id": "10"})).await;
    assert_eq!(r.code.as_deref(), Some("5"));
}

#[tokio::test]
async fn pushes_are_google_push_json_with_task_id_and_userdata_only() {
    use axum::routing::post;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let app = axum::Router::new().route(
        "/push",
        post(move |body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(serde_json::from_str::<Value>(&body).unwrap());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let fake = FakeSwarming::start().await.unwrap();
    fake.subscribe(
        "projects/p/topics/t",
        format!("http://{addr}/push").parse().unwrap(),
    );
    let mut r = request("");
    r["pubsub_topic"] = json!("projects/p/topics/t");
    r["pubsub_auth_token"] = json!("tok");
    r["pubsub_userdata"] = json!("{\"execution_id\":\"7\"}");
    let id = call(&fake, "NewTask", &r).await.json()["taskId"].clone();
    // Claim and completion: two pushes (creation of a pending task sends none).
    for _ in 0..2 {
        let push = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let m = &push["message"];
        assert_eq!(m["attributes"], json!({"auth_token": "tok"}));
        assert!(m["messageId"].is_string() && m["publishTime"].is_string());
        assert_eq!(push["subscription"], "projects/p/subscriptions/t-push");
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD
            .decode(m["data"].as_str().unwrap())
            .unwrap();
        let text = String::from_utf8(data).unwrap();
        assert!(text.contains('\n'), "indented JSON");
        let data: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            data,
            json!({"task_id": id, "userdata": "{\"execution_id\":\"7\"}"})
        );
    }
    // The fake counts a push once the subscriber's answer is in, just after it was sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.stats().pushes_delivered < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", fake.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn bots_are_a_limited_resource_and_expire_pending_work() {
    let fake = FakeSwarming::start_with(Options {
        bots: 0,
        ..Options::default()
    })
    .await
    .unwrap();
    let v = call(&fake, "NewTask", &request("")).await.json();
    assert_eq!(v["taskResult"]["state"], "NO_RESOURCE", "no bot at all");
    let fake = FakeSwarming::start().await.unwrap();
    fake.behave_for_tag(
        "purpose:wire",
        Behaviour {
            pending_ms: 5,
            end: End::Expire,
            ..Behaviour::default()
        },
    );
    let id = call(&fake, "NewTask", &request("")).await.json()["taskId"].clone();
    let r = wait_state(&fake, id.as_str().unwrap(), "EXPIRED").await;
    assert!(r.get("botId").is_none() && r.get("runId").is_none());
}

#[tokio::test]
async fn two_fakes_are_two_servers_with_distinct_task_ids() {
    let a = FakeSwarming::start().await.unwrap();
    let b = FakeSwarming::start().await.unwrap();
    assert_ne!(a.url(), b.url());
    let ta = call(&a, "NewTask", &request("u")).await.json()["taskId"].clone();
    let tb = call(&b, "NewTask", &request("u")).await.json()["taskId"].clone();
    assert_ne!(ta, tb);
    let r = call(&b, "GetResult", &json!({"task_id": ta})).await;
    assert_eq!(r.code.as_deref(), Some("5"), "b does not know a's task");
}
