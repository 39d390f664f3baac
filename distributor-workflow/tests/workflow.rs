//! Workflow behaviour on the fake distributor, under tokio's paused clock (no real sleeps).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use distributor_core::engine::Clock;
use distributor_core::store::{ListFilter, MemoryStore, Store};
use distributor_core::testing::{FakeBackend, FakeConfig};
use distributor_core::{DistributorsConfig, Engine, Labels, Outcome, Registry};
use distributor_workflow::{
    LABEL_RUN, LABEL_STEP, RunId, RunSnapshot, RunState, StepState, UnitState, WorkflowError,
    WorkflowSpec, Workflows,
};
use serde_json::{Value, json};

fn registry() -> Registry {
    Registry::new().register::<FakeConfig>().unwrap()
}

async fn engine_on(backend: &str, store: Arc<dyn Store>, clock: Clock) -> Engine {
    let doc = json!({"distributors": {"fake": {"kind": "fake", "backend": backend}}});
    let config = DistributorsConfig::from_value(&registry(), "test", &doc).unwrap();
    Engine::builder()
        .registry(registry())
        .distributors(config)
        .store_arc(store)
        .clock(clock)
        .build()
        .await
        .unwrap()
}

async fn setup(backend: &str) -> (Workflows, FakeBackend) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let e = engine_on(backend, store, Clock::new()).await;
    (
        Workflows::open(e).await.unwrap(),
        FakeBackend::named(backend),
    )
}

fn spec(toml: &str) -> WorkflowSpec {
    WorkflowSpec::parse("test", toml, false).unwrap()
}

/// A fake payload that runs `ms` and succeeds with `data`.
fn ok(ms: u64, data: Value) -> String {
    json!({"run_for_ms": ms, "outcome": {"outcome": "succeeded", "data": data}}).to_string()
}

async fn until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..5_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn step_state(w: &Workflows, run: &RunId, step: &str) -> StepState {
    w.get(run).await.unwrap().steps[step].state
}

async fn executions(w: &Workflows, run: &RunId, step: &str) -> usize {
    let filter = ListFilter {
        labels: Labels::from([
            (LABEL_RUN.to_owned(), run.0.clone()),
            (LABEL_STEP.to_owned(), step.to_owned()),
        ]),
        ..ListFilter::default()
    };
    w.engine().list(&filter).await.unwrap().len()
}

#[tokio::test(start_paused = true)]
async fn steps_run_in_dependency_order_and_results_flow() {
    let (w, _) = setup("wf-dag").await;
    let s = spec(&format!(
        r#"
name = "dag"
[params.version]
default = "1.2"
[[steps]]
name = "fetch"
distributor = "fake"
payload = {}
[[steps]]
name = "build"
distributor = "fake"
depends_on = ["fetch"]
payload = {{ run_for_ms = 300, outcome = {{ outcome = "succeeded", data = {{ artifact = "app-{{{{ params.version }}}}.tgz", from = "{{{{ steps.fetch.result.rev }}}}" }} }} }}
[[steps]]
name = "docs"
distributor = "fake"
depends_on = ["fetch"]
payload = {}
[[steps]]
name = "test"
distributor = "fake"
depends_on = ["build", "docs"]
payload = {{ outcome = {{ outcome = "succeeded", data = {{ tested = "{{{{ steps.build.result.artifact }}}}", rev = "{{{{ steps.build.result.from }}}}", pages = "{{{{ steps.docs.result.pages }}}}" }} }} }}
"#,
        ok(100, json!({"rev": "abc123"}))
            .replace(':', " = ")
            .replace("\"run_for_ms\"", "run_for_ms")
            .replace("\"outcome\"", "outcome")
            .replace("\"data\"", "data")
            .replace("\"rev\"", "rev"),
        ok(50, json!({"pages": 12}))
            .replace(':', " = ")
            .replace("\"run_for_ms\"", "run_for_ms")
            .replace("\"outcome\"", "outcome")
            .replace("\"data\"", "data")
            .replace("\"pages\"", "pages"),
    ));
    let run = w.start(s, BTreeMap::new()).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded, "{done:#?}");
    assert_eq!(
        done.steps["test"].result,
        Some(json!({"tested": "app-1.2.tgz", "rev": "abc123", "pages": 12}))
    );
    // Each step started only after every dependency finished.
    let st = |n: &str| done.steps[n].started_at.unwrap();
    let fin = |n: &str| done.steps[n].finished_at.unwrap();
    assert!(st("build") >= fin("fetch") && st("docs") >= fin("fetch"));
    assert!(st("test") >= fin("build") && st("test") >= fin("docs"));
    // build and docs ran in parallel: docs finished before build did.
    assert!(fin("docs") < fin("build"));
    for step in ["fetch", "build", "docs", "test"] {
        assert_eq!(executions(&w, &run, step).await, 1, "{step}");
    }
}

#[tokio::test(start_paused = true)]
async fn fan_out_runs_one_task_per_item_and_fans_in_the_results() {
    let (w, _) = setup("wf-fan").await;
    let s = spec(
        r#"
name = "fan"
[params.targets]
default = ["linux", "darwin", "windows"]
[[steps]]
name = "build"
distributor = "fake"
for_each = "{{ params.targets }}"
payload = { run_for_ms = 100, outcome = { outcome = "succeeded", data = { bin = "app-{{ item }}" } } }
[[steps]]
name = "package"
distributor = "fake"
depends_on = ["build"]
payload = { outcome = { outcome = "succeeded", data = "{{ steps.build.result }}" } }
"#,
    );
    let mut params = BTreeMap::new();
    params.insert("targets".to_owned(), json!(["a", "b", "c", "d"]));
    let run = w.start(s, params).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.units["build"].len(), 4);
    assert_eq!(executions(&w, &run, "build").await, 4);
    let fan_in = json!([{"bin": "app-a"}, {"bin": "app-b"}, {"bin": "app-c"}, {"bin": "app-d"}]);
    assert_eq!(done.steps["build"].result, Some(fan_in.clone()));
    assert_eq!(done.steps["package"].result, Some(fan_in));
    // All four ran at once: each took 100 ms and the step took about that long, not 400.
    let d = done.steps["build"]
        .started_at
        .unwrap()
        .until(done.steps["build"].finished_at.unwrap());
    assert!(d < Duration::from_millis(300), "{d:?}");
}

const FAIL: &str = r#"{ outcome = { outcome = "abnormal", kind = "failed", reason = "exit 3" } }"#;

#[tokio::test(start_paused = true)]
async fn a_failure_stops_the_run_or_is_tolerated_with_continue() {
    let (w, _) = setup("wf-fail").await;
    let text = |on_failure: &str| {
        format!(
            r#"
name = "fail"
[[steps]]
name = "lint"
distributor = "fake"
on_failure = "{on_failure}"
payload = {FAIL}
[[steps]]
name = "slow"
distributor = "fake"
payload = {{ run_for_ms = 500 }}
[[steps]]
name = "after_slow"
distributor = "fake"
depends_on = ["slow"]
payload = {{}}
[[steps]]
name = "report"
distributor = "fake"
depends_on = ["lint"]
payload = {{ outcome = {{ outcome = "succeeded", data = "lint was {{{{ steps.lint.state }}}}: {{{{ steps.lint.result }}}}" }} }}
"#
        )
    };
    // stop: the running step finishes, nothing new starts, the run fails.
    let run = w.start(spec(&text("stop")), BTreeMap::new()).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Failed);
    assert_eq!(done.steps["lint"].state, StepState::Failed);
    assert!(
        done.steps["lint"]
            .error
            .as_deref()
            .unwrap()
            .contains("exit 3"),
        "{:?}",
        done.steps["lint"].error
    );
    assert_eq!(done.steps["slow"].state, StepState::Succeeded);
    assert_eq!(done.steps["after_slow"].state, StepState::NotRun);
    assert_eq!(done.steps["report"].state, StepState::NotRun);
    assert_eq!(executions(&w, &run, "after_slow").await, 0);

    // continue: dependents run and see the failure; the run succeeds.
    let run = w
        .start(spec(&text("continue")), BTreeMap::new())
        .await
        .unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.steps["lint"].state, StepState::Failed);
    assert_eq!(done.steps["after_slow"].state, StepState::Succeeded);
    assert_eq!(
        done.steps["report"].result,
        Some(json!("lint was failed: null"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_step_is_re_run_with_what_depends_on_it() {
    let (w, fake) = setup("wf-rerun").await;
    let s = spec(
        r#"
name = "rerun"
[[steps]]
name = "prepare"
distributor = "fake"
payload = { outcome = { outcome = "succeeded", data = 1 } }
[[steps]]
name = "flaky"
distributor = "fake"
depends_on = ["prepare"]
payload = { hang = true }
[[steps]]
name = "after"
distributor = "fake"
depends_on = ["flaky"]
payload = { outcome = { outcome = "succeeded", data = "{{ steps.flaky.result }}" } }
"#,
    );
    let run = w.start(s, BTreeMap::new()).await.unwrap();
    let token_of = |snap: &RunSnapshot| {
        let id = snap.units["flaky"][0].execution.unwrap();
        (id, snap.clone())
    };
    until("flaky running", || async {
        let s = w.get(&run).await.unwrap();
        s.units
            .get("flaky")
            .is_some_and(|u| u[0].state == UnitState::Running)
    })
    .await;
    let (id, _) = token_of(&w.get(&run).await.unwrap());
    let rec = w.engine().get(id).await.unwrap();
    until("dispatched", || async {
        w.engine().get(id).await.unwrap().token.is_some()
    })
    .await;
    let token = w.engine().get(id).await.unwrap().token.unwrap();
    assert!(fake.finish(
        &token,
        Outcome::abnormal(distributor_core::AbnormalKind::Failed, "flake")
    ));
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Failed);
    assert_eq!(done.steps["after"].state, StepState::NotRun);
    // Re-running a step that did not fail is refused.
    assert!(matches!(
        w.rerun(&run, "prepare").await,
        Err(WorkflowError::Conflict(_))
    ));
    assert!(matches!(
        w.rerun(&run, "nope").await,
        Err(WorkflowError::UnknownStep { .. })
    ));
    w.rerun(&run, "flaky").await.unwrap();
    assert_eq!(w.get(&run).await.unwrap().run.state, RunState::Running);
    until("flaky running again", || async {
        let s = w.get(&run).await.unwrap();
        s.steps["flaky"].generation == 1
            && s.units
                .get("flaky")
                .is_some_and(|u| u[0].state == UnitState::Running)
    })
    .await;
    let id2 = w.get(&run).await.unwrap().units["flaky"][0]
        .execution
        .unwrap();
    assert_ne!(id2, id);
    until("dispatched", || async {
        w.engine().get(id2).await.unwrap().token.is_some()
    })
    .await;
    let token2 = w.engine().get(id2).await.unwrap().token.unwrap();
    assert!(fake.finish(
        &token2,
        Outcome::Succeeded {
            data: json!("fixed")
        }
    ));
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.steps["after"].result, Some(json!("fixed")));
    // prepare was not run again; flaky ran twice (one per generation).
    assert_eq!(executions(&w, &run, "prepare").await, 1);
    assert_eq!(executions(&w, &run, "flaky").await, 2);
    assert_eq!(rec.task.labels["workflow.gen"], "0");
}

#[tokio::test(start_paused = true)]
async fn an_approval_step_waits_for_a_person() {
    let (w, _) = setup("wf-approve").await;
    let s = spec(
        r#"
name = "approve"
[[steps]]
name = "build"
distributor = "fake"
payload = {}
[[steps]]
name = "approve"
depends_on = ["build"]
approval = { prompt = "ship it?" }
[[steps]]
name = "publish"
distributor = "fake"
depends_on = ["approve"]
payload = { outcome = { outcome = "succeeded", data = "{{ steps.approve.result.approved_by }}" } }
"#,
    );
    let run = w.start(s, BTreeMap::new()).await.unwrap();
    assert!(matches!(
        w.approve(&run, "publish", "ann").await,
        Err(WorkflowError::Conflict(_))
    ));
    until("awaiting approval", || async {
        step_state(&w, &run, "approve").await == StepState::AwaitingApproval
    })
    .await;
    // Nothing moves while it waits.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(step_state(&w, &run, "publish").await, StepState::Waiting);
    assert_eq!(executions(&w, &run, "publish").await, 0);
    w.approve(&run, "approve", "ann").await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.steps["publish"].result, Some(json!("ann")));
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_run_cancels_its_running_steps() {
    let (w, _) = setup("wf-cancel").await;
    let s = spec(
        r#"
name = "cancel"
[[steps]]
name = "long"
distributor = "fake"
for_each = [1, 2]
payload = { hang = true }
[[steps]]
name = "gate"
approval = {}
[[steps]]
name = "after"
distributor = "fake"
depends_on = ["long"]
payload = {}
"#,
    );
    let run = w.start(s, BTreeMap::new()).await.unwrap();
    until("running", || async {
        let s = w.get(&run).await.unwrap();
        s.units
            .get("long")
            .is_some_and(|u| u.iter().all(|u| u.state == UnitState::Running))
            && s.steps["gate"].state == StepState::AwaitingApproval
    })
    .await;
    let mut events = w.subscribe();
    w.cancel(&run).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Cancelled);
    assert_eq!(done.steps["long"].state, StepState::Cancelled);
    assert_eq!(done.steps["gate"].state, StepState::Cancelled);
    assert_eq!(done.steps["after"].state, StepState::NotRun);
    for u in &done.units["long"] {
        let rec = w.engine().get(u.execution.unwrap()).await.unwrap();
        assert_eq!(rec.state.as_str(), "cancelled");
    }
    let mut saw = Vec::new();
    while let Ok(e) = events.try_recv() {
        saw.push(
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(saw.contains(&"run_changed".to_owned()), "{saw:?}");
    assert!(saw.contains(&"step_changed".to_owned()), "{saw:?}");
    assert_eq!(saw.last().map(String::as_str), Some("finished"), "{saw:?}");
    assert!(matches!(
        w.cancel(&run).await,
        Err(WorkflowError::Conflict(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_restart_mid_workflow_resumes_and_starts_each_step_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Clock::new();
    let fake = FakeBackend::named("wf-restart");
    let e1 = engine_on("wf-restart", store.clone(), clock).await;
    let w1 = Workflows::open(e1.clone()).await.unwrap();
    let s = spec(
        r#"
name = "restart"
[[steps]]
name = "a"
distributor = "fake"
payload = { run_for_ms = 100, outcome = { outcome = "succeeded", data = "A" } }
[[steps]]
name = "b"
distributor = "fake"
depends_on = ["a"]
for_each = [1, 2, 3]
payload = { run_for_ms = 5000, outcome = { outcome = "succeeded", data = "{{ steps.a.result }}{{ item }}" } }
[[steps]]
name = "c"
distributor = "fake"
depends_on = ["b"]
payload = { outcome = { outcome = "succeeded", data = "{{ steps.b.result }}" } }
"#,
    );
    let run = w1.start(s, BTreeMap::new()).await.unwrap();
    until("b running", || async {
        RunSnapshot::load(&e1, &run)
            .await
            .unwrap()
            .units
            .get("b")
            .is_some_and(|u| u.iter().all(|u| u.state == UnitState::Running))
    })
    .await;
    drop(w1);
    drop(e1); // crash: no shutdown of either
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e2 = engine_on("wf-restart", store.clone(), clock).await;
    let w2 = Workflows::open(e2).await.unwrap();
    let done = w2.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded, "{done:#?}");
    assert_eq!(done.steps["c"].result, Some(json!(["A1", "A2", "A3"])));
    for (step, n) in [("a", 1), ("b", 3), ("c", 1)] {
        assert_eq!(executions(&w2, &run, step).await, n, "{step}");
    }
    for u in done.units.values().flatten() {
        let rec = w2.engine().get(u.execution.unwrap()).await.unwrap();
        assert_eq!(fake.starts(&rec.request_id), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_recording_and_storing_the_ids_does_not_submit_twice() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = Clock::new();
    let e1 = engine_on("wf-window", store.clone(), clock).await;
    let w1 = Workflows::open(e1.clone()).await.unwrap();
    let s = spec(
        r#"
name = "window"
[[steps]]
name = "a"
distributor = "fake"
for_each = [1, 2]
payload = { run_for_ms = 1000, outcome = { outcome = "succeeded", data = "{{ item }}" } }
"#,
    );
    let run = w1.start(s, BTreeMap::new()).await.unwrap();
    until("a running", || async {
        RunSnapshot::load(&e1, &run)
            .await
            .unwrap()
            .units
            .get("a")
            .is_some_and(|u| u.iter().all(|u| u.state == UnitState::Running))
    })
    .await;
    drop(w1);
    drop(e1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Put the store back where a crash right after the submit left it: the units recorded as
    // submitting, their execution ids not yet written.
    let snap = {
        let e = engine_on("wf-window", store.clone(), clock).await;
        let snap = RunSnapshot::load(&e, &run).await.unwrap();
        let mut writes = Vec::new();
        for u in &snap.units["a"] {
            let mut u = u.clone();
            u.execution = None;
            u.state = UnitState::Submitting;
            writes.push((
                format!("workflow/units/{run}/a/{:06}", u.index),
                serde_json::to_string(&u).unwrap(),
            ));
        }
        e.put_meta(writes).await.unwrap();
        e.shutdown().await;
        snap
    };
    let e2 = engine_on("wf-window", store.clone(), clock).await;
    let w2 = Workflows::open(e2).await.unwrap();
    let done = w2.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.steps["a"].result, Some(json!([1, 2])));
    assert_eq!(
        executions(&w2, &run, "a").await,
        2,
        "found by label, not resubmitted"
    );
    let before: Vec<_> = snap.units["a"].iter().map(|u| u.execution).collect();
    let after: Vec<_> = done.units["a"].iter().map(|u| u.execution).collect();
    assert_eq!(before, after);
}

#[tokio::test(start_paused = true)]
async fn runs_are_listed_newest_first_and_bad_parameters_named() {
    let (w, _) = setup("wf-list").await;
    let s = spec(
        r#"
name = "p"
[params.need]
[[steps]]
name = "a"
distributor = "fake"
payload = { outcome = { outcome = "succeeded", data = "{{ params.need }}" } }
"#,
    );
    let err = w.start(s.clone(), BTreeMap::new()).await.unwrap_err();
    let WorkflowError::Invalid(v) = err else {
        panic!("{err}")
    };
    assert_eq!(v.violations[0].pointer, "/params/need");
    let mut p = BTreeMap::new();
    p.insert("need".to_owned(), json!(1));
    p.insert("nede".to_owned(), json!(1));
    let WorkflowError::Invalid(v) = w.start(s.clone(), p.clone()).await.unwrap_err() else {
        panic!()
    };
    assert_eq!(v.violations[0].pointer, "/params/nede");
    p.remove("nede");
    let r1 = w.start(s.clone(), p.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r2 = w.start(s, p).await.unwrap();
    let list = w.list().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![r2.clone(), r1]
    );
    assert!(matches!(
        w.get(&RunId("nope".into())).await,
        Err(WorkflowError::UnknownRun(_))
    ));
    let mut bad = spec(
        r#"
name = "d"
[[steps]]
name = "a"
distributor = "fakee"
"#,
    );
    bad.name = "d".into();
    let WorkflowError::Invalid(v) = w.start(bad, BTreeMap::new()).await.unwrap_err() else {
        panic!()
    };
    assert_eq!(v.violations[0].pointer, "/steps/0/distributor");
}

#[test]
fn workflow_files_are_checked_with_json_pointers() {
    let check = |text: &str| match WorkflowSpec::parse("t", text, false) {
        Ok(_) => vec![],
        Err(WorkflowError::Invalid(v)) => v
            .violations
            .into_iter()
            .map(|x| format!("{} {}", x.pointer, x.message))
            .collect::<Vec<_>>(),
        Err(e) => vec![e.to_string()],
    };
    let v = check(
        r#"
name = "x"
[[steps]]
name = "build"
distributor = "d"
payload = { a = "{{ steps.fetch.result }}", b = "{{ params.nope }}", c = "{{ item }}" }
depends_on = ["biuld", "fetch"]
[[steps]]
name = "fetch"
distributor = "d"
depends_on = ["build"]
timeouts = { run = "10 minutes" }
[[steps]]
name = "gate"
approval = {}
payload = {}
[[steps]]
name = "nothing"
retries = "two"
"#,
    );
    let joined = v.join("\n");
    for want in [
        "/steps/1/timeouts/run value does not match",
        "/steps/3/retries expected an integer",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
    // The schema pass stops at shape errors; fix them and the meaning checks report.
    let v = check(
        r#"
name = "x"
[[steps]]
name = "build"
distributor = "d"
payload = { a = "{{ steps.fetch.result }}", b = "{{ params.nope }}", c = "{{ item }}" }
depends_on = ["biuld"]
[[steps]]
name = "fetch"
distributor = "d"
depends_on = ["build"]
timeouts = { run = "10m" }
[[steps]]
name = "gate"
approval = {}
payload = {}
[[steps]]
name = "nothing"
[[steps]]
name = "build"
distributor = "d"
"#,
    );
    let joined = v.join("\n");
    for want in [
        "/steps/0/depends_on/0 unknown step `biuld`; did you mean `build`?",
        "/steps/0/payload/a `fetch` is referenced but not in `depends_on`",
        "/steps/0/payload/b unknown parameter `nope`",
        "/steps/0/payload/c `{{ item }}` needs `for_each`",
        "/steps/2/payload an approval step takes no `payload`",
        "/steps/3/distributor step `nothing` needs `distributor`",
        "/steps/4/name duplicate step `build`",
    ] {
        assert!(joined.contains(want), "missing {want:?} in:\n{joined}");
    }
    let v = check(
        r#"
name = "cycle"
[[steps]]
name = "a"
distributor = "d"
depends_on = ["b"]
[[steps]]
name = "b"
distributor = "d"
depends_on = ["a"]
"#,
    );
    assert!(
        v.iter().any(|m| m.contains("dependency cycle among a, b")),
        "{v:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_recording_but_before_the_submit_submits_once_on_resume() {
    use distributor_workflow::{RunDoc, StepDoc, UnitDoc};
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let e = engine_on("wf-before", store.clone(), Clock::new()).await;
    // What a crash between "units recorded as submitting" and the engine's submit leaves: the
    // run's documents, and no execution.
    let s = spec(
        r#"
name = "before"
[[steps]]
name = "a"
distributor = "fake"
for_each = ["x", "y"]
payload = { outcome = { outcome = "succeeded", data = "{{ item }}" } }
"#,
    );
    let run = RunId("0000000000001-beef".into());
    let now = e.clock().now();
    let doc = RunDoc {
        id: run.clone(),
        spec: s,
        params: BTreeMap::new(),
        state: RunState::Running,
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    let step = StepDoc {
        state: StepState::Running,
        generation: 0,
        units: 2,
        started_at: Some(now),
        finished_at: None,
        result: None,
        error: None,
    };
    let unit = |i: u32, item: &str| UnitDoc {
        index: i,
        generation: 0,
        item: Some(json!(item)),
        state: UnitState::Submitting,
        execution: None,
        last_execution: None,
        result: None,
        error: None,
        started_at: Some(now),
        finished_at: None,
    };
    e.put_meta(vec![
        (
            format!("workflow/runs/{run}"),
            serde_json::to_string(&doc).unwrap(),
        ),
        (
            format!("workflow/steps/{run}/a"),
            serde_json::to_string(&step).unwrap(),
        ),
        (
            format!("workflow/units/{run}/a/000000"),
            serde_json::to_string(&unit(0, "x")).unwrap(),
        ),
        (
            format!("workflow/units/{run}/a/000001"),
            serde_json::to_string(&unit(1, "y")).unwrap(),
        ),
    ])
    .await
    .unwrap();
    let w = Workflows::open(e).await.unwrap();
    let done = w.wait(&run).await.unwrap();
    assert_eq!(done.run.state, RunState::Succeeded);
    assert_eq!(done.steps["a"].result, Some(json!(["x", "y"])));
    assert_eq!(
        executions(&w, &run, "a").await,
        2,
        "each unit submitted once"
    );
}

#[test]
fn the_demo_workflow_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workflows/release.toml");
    let s = WorkflowSpec::load(&path).unwrap();
    assert_eq!(
        s.topological(),
        ["fetch", "build", "test", "approve", "publish"]
    );
    assert!(s.step("approve").unwrap().approval.is_some());
}
