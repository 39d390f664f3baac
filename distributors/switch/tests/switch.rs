//! The switch in an engine, over two fakes: routing on both sides of a cutover, refusals,
//! durability across a restart, and calls going to the side that ran an execution.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use distributor_core::store::{ListFilter, MemoryStore, SqliteStore, Store};
use distributor_core::testing::{Call, FakeBackend, FakeConfig};
use distributor_core::{
    AbnormalKind, DistributorsConfig, Engine, Error, Event, ExecutionRecord, Outcome, Registry,
    State, Task,
};
use distributor_switch::{SwitchConfig, format_time};
use serde_json::{Value, json};

/// 2026-12-02T15:00:00Z.
const T0: i64 = 1_796_223_600_000;
const MIN: i64 = 60_000;
const STEP: i64 = 15_000;

fn registry() -> Registry {
    Registry::new()
        .register::<SwitchConfig>()
        .unwrap()
        .register::<FakeConfig>()
        .unwrap()
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "switch-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

struct Rig {
    engine: Engine,
    before: FakeBackend,
    after: FakeBackend,
}

fn config(before: &str, after: &str, extra: Value) -> DistributorsConfig {
    let mut sw = json!({
        "kind": "switch",
        "grid_secs": 60,
        "before": { "kind": "fake", "backend": before },
        "after": { "kind": "fake", "backend": after },
    });
    if let (Some(o), Some(e)) = (sw.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let doc = json!({ "distributors": { "sw": sw, "plain": { "kind": "fake" } } });
    DistributorsConfig::from_value(&registry(), "test", &doc).unwrap()
}

async fn engine_on(names: &(String, String), store: Arc<dyn Store>, extra: Value) -> Engine {
    Engine::builder()
        .registry(registry())
        .distributors(config(&names.0, &names.1, extra))
        .store_arc(store)
        .build()
        .await
        .unwrap()
}

async fn rig_with(prefix: &str, extra: Value) -> Rig {
    let names = (
        unique(&format!("{prefix}-before")),
        unique(&format!("{prefix}-after")),
    );
    let engine = engine_on(&names, Arc::new(MemoryStore::new()), extra).await;
    Rig {
        engine,
        before: FakeBackend::named(&names.0),
        after: FakeBackend::named(&names.1),
    }
}

async fn rig(prefix: &str) -> Rig {
    rig_with(prefix, json!({})).await
}

fn interval_task(start: i64, len: i64, inner: Value) -> Task {
    Task::new(
        "sw",
        json!({ "interval_start": format_time(start), "interval_ms": len, "payload": inner }),
    )
}

fn quick(start: i64) -> Task {
    interval_task(start, STEP, json!({ "run_for_ms": 10 }))
}

fn set(cutover: impl Into<Value>, why: &str) -> Value {
    json!({ "op": "set", "cutover": cutover.into(), "who": "ana", "why": why })
}

impl Rig {
    async fn control(&self, request: Value) -> Result<Value, Error> {
        self.engine.control("sw", &request).await
    }

    async fn show(&self) -> Value {
        self.control(json!({ "op": "show" })).await.unwrap()
    }

    /// Submits the tasks, waits for all of them, and returns their final records.
    async fn run_all(&self, tasks: Vec<Task>) -> Vec<ExecutionRecord> {
        let ids = self.engine.submit_many(tasks).await.unwrap();
        let mut out = Vec::new();
        for id in ids {
            out.push(self.engine.wait_task(id).await.unwrap());
        }
        out
    }

    /// How many times each side started the work of `rec`: (before, after).
    fn starts(&self, rec: &ExecutionRecord) -> (usize, usize) {
        (
            self.before.starts(&rec.request_id),
            self.after.starts(&rec.request_id),
        )
    }
}

fn start_of(rec: &ExecutionRecord) -> i64 {
    let v = rec.task.payload.to_value();
    match &v["interval_start"] {
        Value::String(s) => parse(s),
        Value::Number(n) => n.as_i64().unwrap(),
        other => panic!("no interval_start: {other}"),
    }
}

/// RFC 3339 (as written by `format_time`) back to ms, by search (the tests only need whole
/// seconds near T0).
fn parse(s: &str) -> i64 {
    (-3600..3600)
        .map(|k| T0 + k * 1000)
        .find(|t| format_time(*t) == s)
        .unwrap_or_else(|| panic!("{s} is not within an hour of T0"))
}

fn pointer_of(e: &Error) -> String {
    match e {
        Error::Validation(v) => v.violations[0].pointer.clone(),
        other => panic!("not a validation error: {other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn intervals_on_both_sides_of_a_cutover_each_run_exactly_once_with_no_gap() {
    let r = rig("both").await;
    // Noop mode of the new side: no cutover, everything goes to `before`.
    let first = r
        .run_all((0..4).map(|k| quick(T0 + k * STEP)).collect())
        .await;
    assert_eq!(r.show().await["mode"], "before_only");
    // The operator schedules the switch at 15:02, while 15:01–15:02 is still to come.
    let cutover = T0 + 2 * MIN;
    let state = r
        .control(set(format_time(cutover), "go exporter verified"))
        .await
        .unwrap();
    assert_eq!(state["mode"], "switching");
    assert_eq!(state["cutover"], "2026-12-02T15:02:00Z");
    let second = r
        .run_all((4..16).map(|k| quick(T0 + k * STEP)).collect())
        .await;

    let mut all: Vec<_> = first.into_iter().chain(second).collect();
    all.sort_by_key(start_of);
    let mut covered_until = T0;
    for rec in &all {
        let start = start_of(rec);
        assert_eq!(start, covered_until, "a gap or an overlap before {start}");
        covered_until = start + STEP;
        assert_eq!(rec.state, State::Succeeded, "{rec:?}");
        let expected = if start < cutover { (1, 0) } else { (0, 1) };
        assert_eq!(
            r.starts(rec),
            expected,
            "interval at {} ran on the wrong side or not exactly once",
            format_time(start)
        );
    }
    assert_eq!(covered_until, T0 + 4 * MIN);
    // Later calls went to the side that ran each execution: the after side was only ever
    // asked about work it ran.
    let after_tokens: Vec<_> = all
        .iter()
        .filter(|r| start_of(r) >= cutover)
        .filter_map(|r| r.token.clone())
        .collect();
    for call in r.after.calls() {
        if let Call::Status { token } | Call::Cancel { token } | Call::Notification { token } = call
        {
            assert!(after_tokens.contains(&token), "after asked about {token}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_cutover_off_the_grid_is_refused_and_changes_nothing() {
    let r = rig("offgrid").await;
    let e = r
        .control(set(format_time(T0 + 90_000), "typo"))
        .await
        .unwrap_err();
    assert_eq!(pointer_of(&e), "/cutover");
    let text = e.to_string();
    assert!(
        text.contains("not on the 60-second grid")
            && text.contains("2026-12-02T15:01:00Z")
            && text.contains("2026-12-02T15:02:00Z"),
        "{text}"
    );
    // Also as milliseconds.
    let e = r.control(set(T0 + 1, "typo")).await.unwrap_err();
    assert_eq!(pointer_of(&e), "/cutover");
    let state = r.show().await;
    assert_eq!(state["cutover"], Value::Null);
    assert_eq!(state["history"], json!([]));
    // Nothing moved: work still goes to `before`.
    let rec = r.run_all(vec![quick(T0 + 2 * MIN)]).await.remove(0);
    assert_eq!(r.starts(&rec), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_cutover_that_would_move_dispatched_work_is_refused() {
    let r = rig("dispatched").await;
    r.run_all((0..4).map(|k| quick(T0 + k * STEP)).collect())
        .await;
    // 15:00 falls before [15:00:45, 15:01:00), already run by `before`.
    let e = r
        .control(set(format_time(T0), "too early"))
        .await
        .unwrap_err();
    assert!(!e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("already dispatched to `before`")
            && text.contains("at or after 2026-12-02T15:01:00Z"),
        "{text}"
    );
    r.control(set(
        format_time(T0 + MIN),
        "right after the last python interval",
    ))
    .await
    .unwrap();
    // Setting the same cutover again changes nothing and records nothing.
    let state = r
        .control(set(format_time(T0 + MIN), "again"))
        .await
        .unwrap();
    assert_eq!(state["history"].as_array().unwrap().len(), 1);
    let rec = r.run_all(vec![quick(T0 + MIN)]).await.remove(0);
    assert_eq!(r.starts(&rec), (0, 1));
    // `after` has run 15:01: neither a later cutover nor clearing may hand it back.
    let e = r
        .control(set(format_time(T0 + 2 * MIN), "later"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("already dispatched to `after`"),
        "{e}"
    );
    let e = r
        .control(json!({ "op": "clear", "who": "ana", "why": "rollback" }))
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with("clearing the cutover refused"),
        "{e}"
    );
    assert_eq!(r.show().await["cutover"], "2026-12-02T15:01:00Z");
}

#[tokio::test(start_paused = true)]
async fn an_interval_containing_the_cutover_is_rejected_and_runs_nowhere() {
    let r = rig("straddle").await;
    r.control(set(format_time(T0 + MIN), "switch"))
        .await
        .unwrap();
    let rec = r
        .run_all(vec![interval_task(
            T0 + 45_000,
            30_000,
            json!({ "run_for_ms": 10 }),
        )])
        .await
        .remove(0);
    assert_eq!(rec.state, State::Abnormal(AbnormalKind::Rejected));
    let Some(Outcome::Abnormal { kind, reason }) = &rec.outcome else {
        panic!("{rec:?}");
    };
    assert_eq!(*kind, AbnormalKind::Rejected);
    assert!(reason.contains("belongs to neither side"), "{reason}");
    assert_eq!(r.starts(&rec), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn clearing_before_the_new_side_ran_hands_everything_back() {
    let r = rig("clear").await;
    r.control(set(format_time(T0 + MIN), "switch"))
        .await
        .unwrap();
    let state = r
        .control(json!({ "op": "clear", "who": "bo", "why": "go exporter misconfigured" }))
        .await
        .unwrap();
    assert_eq!(state["mode"], "before_only");
    let last = &state["history"][1];
    assert_eq!(last["who"], "bo");
    assert_eq!(last["why"], "go exporter misconfigured");
    assert_eq!(last["from"], "2026-12-02T15:01:00Z");
    assert_eq!(last["to"], Value::Null);
    let rec = r.run_all(vec![quick(T0 + 5 * MIN)]).await.remove(0);
    assert_eq!(r.starts(&rec), (1, 0));
}

#[tokio::test]
async fn the_cutover_its_history_and_the_dispatched_work_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("engine.db");
    let names = (unique("restart-before"), unique("restart-after"));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let engine = engine_on(&names, store, json!({})).await;
    let id = engine.submit(quick(T0)).await.unwrap();
    engine.wait(id).await.unwrap();
    engine
        .control(
            "sw",
            &set(format_time(T0 + MIN), "python exports end at 15:01"),
        )
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
    let engine = engine_on(&names, store, json!({})).await;
    let state = engine
        .control("sw", &json!({ "op": "show" }))
        .await
        .unwrap();
    assert_eq!(state["cutover"], "2026-12-02T15:01:00Z");
    assert_eq!(state["history"][0]["who"], "ana");
    assert_eq!(state["history"][0]["why"], "python exports end at 15:01");
    assert_eq!(
        state["dispatched"]["before_latest"]["end"],
        "2026-12-02T15:00:15Z"
    );
    // The watermark survived: a cutover before the work `before` already ran is refused.
    let e = engine
        .control("sw", &set(format_time(T0), "oops"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("already dispatched to `before`"),
        "{e}"
    );
    // And the cutover routes new work.
    let id = engine.submit(quick(T0 + MIN)).await.unwrap();
    let rec = engine.wait(id).await.unwrap();
    assert_eq!(rec.state, State::Succeeded);
    assert_eq!(FakeBackend::named(&names.1).starts(&rec.request_id), 1);
    assert_eq!(FakeBackend::named(&names.0).starts(&rec.request_id), 0);
    engine.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_without_an_interval_start_covers_its_submit_time_on_every_attempt() {
    let r = rig("submit-time").await;
    let before_submit = r.engine.clock().now().0;
    let id = r
        .engine
        .submit(Task::new("sw", json!({ "payload": { "run_for_ms": 10 } })))
        .await
        .unwrap();
    let rec = r.engine.wait(id).await.unwrap();
    let stamped = rec.task.payload.to_value()["interval_start"]
        .as_i64()
        .unwrap();
    assert!(stamped >= before_submit && stamped <= r.engine.clock().now().0);
    assert_eq!(r.starts(&rec), (1, 0));

    // A cutover two minutes from now: a task submitted now still goes to `before`, even when
    // its attempts run after the cutover; one submitted after it goes to `after`.
    let state = r
        .control(json!({ "op": "set", "cutover": "+2m", "who": "ana", "why": "soon" }))
        .await
        .unwrap();
    let cutover = state["cutover_ms"].as_i64().unwrap();
    assert_eq!(cutover % MIN, 0);
    let mut retried = Task::new(
        "sw",
        json!({ "payload": { "pending_for_ms": 200_000, "outcome": { "outcome": "abnormal", "kind": "crashed" } } }),
    );
    retried.retry.max_attempts = 2;
    let early = r.engine.submit(retried).await.unwrap();
    let early = r.engine.wait_task(early).await.unwrap();
    assert!(
        r.engine.clock().now().0 > cutover,
        "the retry ran after the cutover"
    );
    assert_eq!(early.attempt.0, 2, "{early:?}");
    let attempts = r
        .engine
        .list(&ListFilter {
            task_id: Some(early.task_id),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2);
    for rec in &attempts {
        assert_eq!(
            r.starts(rec),
            (1, 0),
            "attempt {} left `before`",
            rec.attempt.0
        );
    }
    let late = r
        .run_all(vec![Task::new("sw", json!({ "payload": {} }))])
        .await
        .remove(0);
    assert_eq!(r.starts(&late), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn the_history_records_who_and_why_and_is_bounded() {
    let r = rig_with("history", json!({ "history_limit": 2 })).await;
    for (k, why) in ["one", "two", "three"].iter().enumerate() {
        r.control(set(format_time(T0 + (k as i64 + 1) * MIN), why))
            .await
            .unwrap();
    }
    let h = r.show().await["history"].clone();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["why"], "two");
    assert_eq!(h[1]["why"], "three");
    assert_eq!(h[1]["from"], "2026-12-02T15:02:00Z");
    assert_eq!(h[1]["to"], "2026-12-02T15:03:00Z");
    assert_eq!(h[1]["who"], "ana");
    // who and why are required for a change.
    let e = r
        .control(json!({ "op": "set", "cutover": format_time(T0), "why": "x" }))
        .await
        .unwrap_err();
    assert_eq!(pointer_of(&e), "/who");
}

#[tokio::test(start_paused = true)]
async fn payloads_are_checked_against_both_sides_with_pointers() {
    let r = rig("payload").await;
    let e = r
        .engine
        .submit(Task::new(
            "sw",
            json!({ "payload": { "run_for_ms": "soon" } }),
        ))
        .await
        .unwrap_err();
    assert_eq!(pointer_of(&e), "/payload/run_for_ms");
    let Error::Validation(v) = &e else { panic!() };
    assert_eq!(v.violations.len(), 1, "one problem, reported once: {e}");
    let e = r
        .engine
        .submit(Task::new(
            "sw",
            json!({ "interval_start": "yesterday", "payload": {} }),
        ))
        .await
        .unwrap_err();
    assert_eq!(pointer_of(&e), "/interval_start");
    let e = r
        .engine
        .submit(Task::new("sw", json!({ "payload": {}, "interval": 1 })))
        .await
        .unwrap_err();
    assert_eq!(pointer_of(&e), "/interval");
}

#[test]
fn each_side_is_validated_against_its_kind_at_load_with_pointers_under_the_side() {
    let doc = r#"
        [distributors.sw]
        kind = "switch"
        grid_secs = 0
        before = { kind = "fake", pushs = true }
        after = { kind = "fak" }
    "#;
    let Err(Error::Config(e)) = DistributorsConfig::from_toml_str(&registry(), "t.toml", doc)
    else {
        panic!("accepted");
    };
    let pointers: Vec<_> = e.problems.iter().map(|p| p.pointer.as_str()).collect();
    assert!(pointers.contains(&"/grid_secs"), "{e}");
    // The schema problem stops the deeper checks; fix it and they run.
    let doc = doc.replace("grid_secs = 0", "grid_secs = 60");
    let Err(Error::Config(e)) = DistributorsConfig::from_toml_str(&registry(), "t.toml", &doc)
    else {
        panic!("accepted");
    };
    let pointers: Vec<_> = e.problems.iter().map(|p| p.pointer.as_str()).collect();
    assert_eq!(pointers, ["/before/pushs", "/after/kind"], "{e}");
    assert!(e.to_string().contains("did you mean `fake`"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn control_requests_to_other_kinds_and_unknown_names_are_refused_clearly() {
    let r = rig("control").await;
    let e = r
        .engine
        .control("plain", &json!({ "op": "show" }))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "distributor `plain` (kind `fake`) takes no control requests"
    );
    let e = r
        .engine
        .control("sww", &json!({ "op": "show" }))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownDistributor { .. }), "{e}");
    let e = r.control(json!({ "op": "flip" })).await.unwrap_err();
    assert_eq!(pointer_of(&e), "/op");
}

#[tokio::test(start_paused = true)]
async fn cancel_goes_to_the_side_that_ran_the_execution() {
    let r = rig("cancel").await;
    r.control(set(format_time(T0 + MIN), "switch"))
        .await
        .unwrap();
    let long = |start| interval_task(start, STEP, json!({ "hang": true }));
    let mut events = r.engine.subscribe();
    let ids = r
        .engine
        .submit_many(vec![long(T0), long(T0 + MIN)])
        .await
        .unwrap();
    // Wait until both are dispatched (each side has a token), then cancel them.
    let mut dispatched = Vec::new();
    while dispatched.len() < ids.len() {
        let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("both executions are dispatched")
            .unwrap();
        if let Event::Dispatched { id, .. } = event {
            dispatched.push(id);
        }
    }
    for id in &ids {
        r.engine.cancel(*id, "test").await.unwrap();
    }
    let mut recs = Vec::new();
    for id in ids {
        recs.push(r.engine.wait(id).await.unwrap());
    }
    for (rec, backend, other) in [
        (&recs[0], &r.before, &r.after),
        (&recs[1], &r.after, &r.before),
    ] {
        assert_eq!(
            rec.state,
            State::Abnormal(AbnormalKind::Cancelled),
            "{rec:?}"
        );
        let token = rec.token.clone().unwrap();
        assert!(backend.calls().contains(&Call::Cancel {
            token: token.clone()
        }));
        assert!(!other.calls().contains(&Call::Cancel { token }));
    }
}

/// A kind with a secret, registered through inventory like a real adapter.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SecretiveConfig {
    token: distributor_core::Secret,
}

#[distributor_core::reexports::async_trait]
impl distributor_core::KindConfig for SecretiveConfig {
    const KIND: &'static str = "switch-test-secretive";
    type Payload = Value;
    async fn build(
        self,
        _: distributor_core::BuildContext,
    ) -> distributor_core::Result<Arc<dyn distributor_core::Distributor>> {
        Err(Error::permanent("never built"))
    }
}

distributor_core::reexports::inventory::submit!(distributor_core::Registration::of::<
    SecretiveConfig,
>());

#[test]
fn a_sides_secret_literal_is_redacted_in_the_config_snapshot() {
    let registry = Registry::from_inventory().unwrap();
    let kind = registry.kind("switch").unwrap();
    let config = json!({
        "before": { "kind": "switch-test-secretive", "token": "hunter2" },
        "after": { "kind": "switch-test-secretive", "token": { "env": "GO_TOKEN" } },
    });
    kind.validate_config_in(&registry, "test", &config).unwrap();
    let snapshot = kind.snapshot(&config).unwrap();
    assert!(!snapshot.to_string().contains("hunter2"), "{snapshot}");
    assert_eq!(snapshot["before"]["token"], json!({ "redacted": true }));
    assert_eq!(snapshot["before"]["kind"], "switch-test-secretive");
    assert_eq!(snapshot["after"]["token"], json!({ "env": "GO_TOKEN" }));
}
