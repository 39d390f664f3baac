//! The suite itself: it passes an honest adapter, and each contract violation fails exactly the
//! cases that check it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use super::*;
use crate::distributor::Distributor;
use crate::error::{Error, Result, ValidationError};
use crate::registry::{BuildContext, Notifier};
use crate::testing::{FakeConfig, FakeDistributor, FakeScript};
use crate::types::{
    AuthToken, Capabilities, Execution, Launch, Notification, RequestId, Status, TaskDescription,
};

/// One way to break the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Flaw {
    /// None: the plain fake.
    Honest,
    /// `run` ignores the request id: every call starts new work.
    RunIgnoresRequestId,
    /// `status` of unknown work is an error instead of Missing.
    UnknownStatusIsError,
    /// `cancel` of unknown work is an error.
    CancelUnknownFails,
    /// `cancel` says Ok but stops nothing.
    CancelStopsNothing,
    /// `handle_notification` panics on garbage.
    PanicsOnGarbage,
    /// `info_url` changes every call.
    ImpureInfoUrl,
    /// `status_batch` answers in reverse order.
    BatchReversed,
    /// Pushes lose their `auth_token` attribute.
    PushWithoutAuth,
    /// `validate` skips the semantic checks.
    ValidatesNothing,
    /// Honest, but two instances cannot be alive at once (like one binding a fixed address).
    Exclusive,
    /// Honest, but its pushes are POSTed to the task's notification target in the HTTP push
    /// format instead of going through the notifier (a backend that calls back).
    PushOverHttp,
    /// Pushes are POSTed with the execution id under the wrong name (`executionId`).
    PushOverHttpMisnamed,
    /// Keeps no notifier (and no HTTP target is handed out): nothing can ever arrive.
    DropsNotifier,
    /// Once work runs, every other `status` says Pending again.
    StatusGoesBackwards,
}

/// Notification targets by execution, as `run` saw them (for [`Flaw::PushOverHttp`]).
type Targets = Arc<std::sync::Mutex<std::collections::HashMap<ExecutionId, String>>>;

/// POSTs `body` to `url` over a plain HTTP/1.1 connection and returns the status code.
async fn post(url: &str, body: &[u8]) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = url::Url::parse(url).map_err(std::io::Error::other)?;
    let host = format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(80)
    );
    let mut s = tokio::net::TcpStream::connect(&host).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        u.path(),
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let line = String::from_utf8_lossy(&resp);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {line:?}")))
}

/// Live `Exclusive` instances.
static EXCLUSIVE_LIVE: AtomicU64 = AtomicU64::new(0);

/// A fake with one flaw.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FlawedConfig {
    backend: String,
    flaw: Flaw,
}

#[async_trait]
impl KindConfig for FlawedConfig {
    const KIND: &'static str = "flawed";
    type Payload = FakeScript;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        let mut inner_ctx = ctx.clone();
        let targets = Targets::default();
        if matches!(self.flaw, Flaw::PushOverHttp | Flaw::PushOverHttpMisnamed) {
            let (tx, mut rx) = mpsc::unbounded_channel::<(ExecutionId, Notification)>();
            let targets = Arc::clone(&targets);
            let misnamed = self.flaw == Flaw::PushOverHttpMisnamed;
            tokio::spawn(async move {
                while let Some((id, n)) = rx.recv().await {
                    let Some(url) = targets.lock().unwrap().get(&id).cloned() else {
                        continue;
                    };
                    let token = AuthToken(n.attributes["auth_token"].clone());
                    let data: Value = serde_json::from_slice(&n.data).unwrap_or(Value::Null);
                    let mut push = crate::push::HttpPush::new(id, &token, data);
                    push.sequence = n.sequence;
                    let mut body = serde_json::to_value(&push).unwrap();
                    if misnamed {
                        let id = body["execution_id"].take();
                        body.as_object_mut().unwrap().remove("execution_id");
                        body["executionId"] = id;
                    }
                    let _ = post(&url, body.to_string().as_bytes()).await;
                }
            });
            inner_ctx.notifier = Notifier::new(tx);
        }
        if self.flaw == Flaw::DropsNotifier {
            inner_ctx.notifier = Notifier::detached();
            inner_ctx.deferred = crate::registry::DeferredQueue::detached();
        }
        if self.flaw == Flaw::PushWithoutAuth {
            let (tx, mut rx) = mpsc::unbounded_channel::<(ExecutionId, Notification)>();
            let outer = ctx.notifier.clone();
            tokio::spawn(async move {
                while let Some((id, mut n)) = rx.recv().await {
                    n.attributes.remove("auth_token");
                    outer.send(id, n);
                }
            });
            inner_ctx.notifier = Notifier::new(tx);
        }
        if self.flaw == Flaw::Exclusive && EXCLUSIVE_LIVE.fetch_add(1, Ordering::SeqCst) > 0 {
            EXCLUSIVE_LIVE.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::permanent("address already in use"));
        }
        let config = FakeConfig {
            backend: self.backend,
            ..FakeConfig::default()
        };
        Ok(Arc::new(Flawed {
            fake: FakeDistributor::new(config, inner_ctx),
            flaw: self.flaw,
            calls: AtomicU64::new(0),
            targets,
        }))
    }
}

use crate::types::ExecutionId;

#[derive(Debug)]
struct Flawed {
    fake: FakeDistributor,
    flaw: Flaw,
    calls: AtomicU64,
    targets: Targets,
}

impl Drop for Flawed {
    fn drop(&mut self) {
        if self.is(Flaw::Exclusive) {
            EXCLUSIVE_LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Flawed {
    fn is(&self, flaw: Flaw) -> bool {
        self.flaw == flaw
    }
    fn unknown(&self, e: &Execution) -> bool {
        self.fake.backend().status_of(&e.token).is_none()
    }
}

#[async_trait]
impl Distributor for Flawed {
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        if self.is(Flaw::RunIgnoresRequestId) {
            let mut fresh = task.clone();
            fresh.request_id = RequestId::random();
            return self.fake.run(&fresh).await;
        }
        if let Some(t) = &task.notify.target {
            self.targets
                .lock()
                .unwrap()
                .insert(task.execution_id, t.clone());
        }
        self.fake.run(task).await
    }

    async fn cancel(&self, e: &Execution) -> Result<()> {
        if self.is(Flaw::CancelUnknownFails) && self.unknown(e) {
            return Err(Error::permanent("no such job"));
        }
        if self.is(Flaw::CancelStopsNothing) {
            return Ok(());
        }
        self.fake.cancel(e).await
    }

    async fn status(&self, e: &Execution) -> Result<Status> {
        if self.is(Flaw::UnknownStatusIsError) && self.unknown(e) {
            return Err(Error::permanent("no such job"));
        }
        let s = self.fake.status(e).await?;
        if self.is(Flaw::StatusGoesBackwards)
            && s == Status::Running
            && self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 1
        {
            return Ok(Status::Pending);
        }
        Ok(s)
    }

    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        let mut out = self.fake.status_batch(executions).await;
        if self.is(Flaw::BatchReversed) {
            out.reverse();
        }
        out
    }

    fn info_url(&self, e: &Execution) -> Option<url::Url> {
        let url = self.fake.info_url(e)?;
        if self.is(Flaw::ImpureInfoUrl) {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            return url::Url::parse(&format!("{url}?n={n}")).ok();
        }
        Some(url)
    }

    async fn handle_notification(&self, e: &Execution, n: &Notification) -> Result<Option<Status>> {
        let r = self.fake.handle_notification(e, n).await?;
        if self.is(Flaw::PanicsOnGarbage) && r.is_none() {
            panic!("cannot parse the push");
        }
        Ok(r)
    }

    fn validate(&self, payload: &Value) -> std::result::Result<(), ValidationError> {
        if self.is(Flaw::ValidatesNothing) {
            return Ok(());
        }
        self.fake.validate(payload)
    }

    fn capabilities(&self) -> Capabilities {
        self.fake.capabilities()
    }

    async fn recover(&self, e: &Execution) -> Result<Status> {
        self.fake.recover(e).await
    }
}

fn payloads() -> Payloads {
    Payloads {
        succeeds: json!({"run_for_ms": 20, "outcome": {"outcome": "succeeded", "data": 1}}),
        fails: Some(
            json!({"run_for_ms": 20, "outcome": {"outcome": "abnormal", "kind": "failed"}}),
        ),
        runs_long: json!({"hang": true}),
        invalid: vec![
            (json!({"run_for_ms": -1}), "/run_for_ms".into()),
            (
                json!({"permanent_run_error": ""}),
                "/permanent_run_error".into(),
            ),
        ],
    }
}

fn backend() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("conformance-unit-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn suite(flaw: Flaw) -> Suite {
    Suite::new::<FlawedConfig>(json!({"backend": backend(), "flaw": flaw}))
        .payloads(payloads())
        .timeout(Duration::from_millis(1500))
        .poll_interval(Duration::from_millis(5))
}

/// Runs every case of `suite` directly and returns (failed cases with messages, ignored cases).
fn outcomes(suite: Suite) -> (Vec<(&'static str, String)>, BTreeSet<&'static str>) {
    outcomes_of(&suite.into_shared())
}

fn outcomes_of(shared: &Arc<Shared>) -> (Vec<(&'static str, String)>, BTreeSet<&'static str>) {
    let mut failed = Vec::new();
    let mut ignored = BTreeSet::new();
    for case in CASES {
        match run_trial(shared, *case) {
            Ok(Completion::Completed) => {}
            Ok(Completion::Ignored { .. }) => {
                ignored.insert(case.name);
            }
            Err(f) => failed.push((case.name, f.message().unwrap_or_default().to_owned())),
        }
    }
    (failed, ignored)
}

fn failed_names(f: &[(&'static str, String)]) -> BTreeSet<&'static str> {
    f.iter().map(|(n, _)| *n).collect()
}

#[test]
fn an_honest_adapter_passes_every_case() {
    let (failed, ignored) = outcomes(suite(Flaw::Honest));
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(ignored.is_empty(), "{ignored:?}");
}

#[test]
fn each_flaw_fails_the_cases_that_check_it() {
    let expect: &[(Flaw, &[&str])] = &[
        (
            Flaw::RunIgnoresRequestId,
            &["run_is_idempotent_per_request_id"],
        ),
        (
            Flaw::UnknownStatusIsError,
            &["status_unknown_is_missing", "status_batch_matches_status"],
        ),
        (Flaw::CancelUnknownFails, &["cancel_unknown_is_ok"]),
        (
            Flaw::CancelStopsNothing,
            &["cancel_running_ends_cancelled", "recover_reports_status"],
        ),
        (
            Flaw::PanicsOnGarbage,
            &["handle_notification_survives_garbage"],
        ),
        (Flaw::ImpureInfoUrl, &["info_url_is_pure"]),
        (Flaw::BatchReversed, &["status_batch_matches_status"]),
        (Flaw::PushWithoutAuth, &["push_notifications_arrive"]),
        (Flaw::PushOverHttpMisnamed, &["push_notifications_arrive"]),
        (Flaw::DropsNotifier, &["push_notifications_arrive"]),
        (Flaw::ValidatesNothing, &["validate_rejects_bad_payloads"]),
    ];
    for (flaw, cases) in expect {
        let (failed, _) = outcomes(suite(*flaw));
        let want: BTreeSet<&str> = cases.iter().copied().collect();
        assert_eq!(failed_names(&failed), want, "{flaw:?}: {failed:#?}");
    }
}

#[test]
fn pushes_over_http_to_the_notification_target_pass() {
    let (failed, ignored) = outcomes(suite(Flaw::PushOverHttp));
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(ignored.is_empty(), "{ignored:?}");
}

#[test]
fn http_push_failures_say_what_the_endpoint_refused() {
    let (failed, _) = outcomes(suite(Flaw::PushOverHttpMisnamed));
    let msg = &failed[0].1;
    assert!(
        msg.contains("refused (400: invalid push body at `/executionId`: unknown field"),
        "{msg}"
    );
    assert!(msg.contains("http://127.0.0.1:"), "{msg}");
}

#[test]
fn a_closed_notifier_is_reported_as_such_not_as_a_timeout() {
    let (failed, _) = outcomes(suite(Flaw::DropsNotifier).http_notifications(false));
    let msg = &failed
        .iter()
        .find(|(n, _)| *n == "push_notifications_arrive")
        .expect("the push case fails")
        .1;
    assert!(msg.contains("keeps no Notifier"), "{msg}");
    assert!(msg.contains("had no notification target"), "{msg}");
    assert!(!msg.contains("within 1.5s"), "{msg}");
    // With the HTTP endpoint served, the case waits for it until the deadline and says so.
    let (failed, _) = outcomes(suite(Flaw::DropsNotifier));
    let msg = &failed[0].1;
    assert!(
        msg.contains("within 1.5s") && msg.contains("every Notifier"),
        "{msg}"
    );
}

#[test]
fn a_status_going_backwards_fails() {
    let (failed, _) = outcomes(suite(Flaw::StatusGoesBackwards));
    let names = failed_names(&failed);
    assert!(names.contains("status_never_goes_backwards"), "{failed:#?}");
    for (name, msg) in &failed {
        assert!(
            msg.contains("went backwards: Pending after Running"),
            "{name}: {msg}"
        );
    }
}

#[test]
fn restart_drops_the_old_instance_before_building_the_new_one() {
    let (failed, _) = outcomes(suite(Flaw::Exclusive));
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(EXCLUSIVE_LIVE.load(Ordering::SeqCst), 0);
}

#[test]
fn failure_messages_say_what_went_wrong() {
    let (failed, _) = outcomes(suite(Flaw::PanicsOnGarbage));
    assert!(
        failed[0].1.contains("panicked: cannot parse the push"),
        "{failed:?}"
    );
    let (failed, _) = outcomes(suite(Flaw::RunIgnoresRequestId));
    assert!(
        failed[0].1.contains("a second run with request id"),
        "{failed:?}"
    );
}

#[test]
fn missing_capabilities_and_payloads_are_reported_ignored() {
    let s =
        Suite::new::<FakeConfig>(json!({"backend": backend(), "push": false})).payloads(Payloads {
            fails: None,
            ..payloads()
        });
    let (failed, ignored) = outcomes(s);
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(
        ignored,
        BTreeSet::from(["push_notifications_arrive", "run_failure_is_failed"])
    );
}

#[test]
fn unreachable_marks_every_trial_ignored_with_the_reason() {
    let trials = suite(Flaw::Honest)
        .unreachable(Some("no backend here".into()))
        .trials();
    assert_eq!(trials.len(), CASES.len());
    for t in &trials {
        assert!(t.has_ignored_flag(), "{}", t.name());
        assert!(
            t.name().starts_with("conformance::flawed::"),
            "{}",
            t.name()
        );
    }
    // Forced to run anyway (`--include-ignored`), a trial ignores itself with the reason.
    let shared = suite(Flaw::Honest)
        .unreachable(Some("no backend here".into()))
        .into_shared();
    match run_trial(&shared, CASES[0]) {
        Ok(Completion::Ignored { reason }) => {
            assert_eq!(reason.as_deref(), Some("unreachable: no backend here"));
        }
        other => panic!("expected ignored, got {:?}", other.is_ok()),
    }
}

#[test]
fn a_bad_config_or_no_payloads_fails_every_trial() {
    let s = Suite::new::<FakeConfig>(json!({"bakend": "x"})).payloads(payloads());
    let (failed, _) = outcomes(s);
    assert_eq!(failed.len(), CASES.len());
    assert!(failed[0].1.contains("/bakend"), "{failed:?}");
    let (failed, _) = outcomes(Suite::new::<FakeConfig>(json!({})));
    assert_eq!(failed.len(), CASES.len());
    assert!(failed[0].1.contains("Suite::payloads"), "{failed:?}");
}

#[test]
fn setup_runs_once_and_its_tasks_outlive_it() {
    let runs = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let counter = Arc::clone(&runs);
    let s = suite(Flaw::Honest).setup(move || async move {
        counter.fetch_add(1, Ordering::SeqCst);
        // A task spawned by setup keeps running while the trials run.
        tokio::spawn(async move {
            loop {
                if tx.send(()).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Ok(())
    });
    let shared = s.into_shared();
    let (failed, _) = outcomes_of(&shared);
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(rx.try_iter().count() > 0);
    // Still alive after the trials: the setup runtime lives as long as the suite's trials.
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
    // Dropping the suite shuts it down.
    drop(shared);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(()) => assert!(
                std::time::Instant::now() < deadline,
                "setup task outlived the suite"
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("setup task neither ran nor stopped: {e}"),
        }
    }
}

#[test]
fn a_failing_setup_fails_every_trial() {
    let s = suite(Flaw::Honest).setup(|| async { Err("worker would not start".into()) });
    let (failed, _) = outcomes(s);
    assert_eq!(failed.len(), CASES.len());
    assert!(
        failed
            .iter()
            .all(|(_, m)| m.contains("worker would not start")),
        "{failed:?}"
    );
}

#[tokio::test]
async fn the_http_endpoint_answers_as_the_push_format_says() {
    use super::endpoint::{Endpoint, Received};
    let (tx, mut rx) = mpsc::unbounded_channel();
    let ep = Endpoint::start(tx).await.unwrap();
    let url = ep.url().to_owned();
    let ok = br#"{"execution_id": 7, "attributes": {"auth_token": "t"}, "data": {"a": 1}}"#;
    assert_eq!(post(&url, ok).await.unwrap(), 200);
    match rx.recv().await {
        Some(Received::Push(id, n)) => {
            assert_eq!(id, ExecutionId(7));
            assert_eq!(n.data, br#"{"a":1}"#);
            assert_eq!(n.attributes["auth_token"], "t");
        }
        other => panic!("expected a push, got {other:?}"),
    }
    let refused = |rx: &mut mpsc::UnboundedReceiver<Received>| match rx.try_recv() {
        Ok(Received::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(post(&url, br#"{"execution_id": 7}"#).await.unwrap(), 401);
    assert!(refused(&mut rx).contains("/attributes/auth_token"));
    assert_eq!(post(&url, br#"{"execution_id": "7"}"#).await.unwrap(), 400);
    assert!(refused(&mut rx).contains("`/execution_id`"));
    let elsewhere = url.replace("/conformance/notify", "/v1/notify");
    assert_eq!(post(&elsewhere, ok).await.unwrap(), 404);
    assert!(refused(&mut rx).starts_with("404: POST /v1/notify"));
}
