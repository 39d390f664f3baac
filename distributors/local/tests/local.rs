//! Behaviour of the `local` adapter through the `Distributor` trait: outcomes, cancellation,
//! queueing, idempotency, and re-attaching after an orchestrator restart or SIGKILL.
//!
//! No test sleeps to wait for something: each polls the state it expects with a deadline.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distributor_core::{
    AbnormalKind, AuthToken, BuildContext, Distributor, Execution, ExecutionId, KindConfig, Launch,
    Notification, Notifier, Outcome, Registry, RequestId, Status, TaskDescription,
};
use distributor_local::{LocalConfig, LocalPayload};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const DEADLINE: Duration = Duration::from_secs(20);

type Pushes = UnboundedReceiver<(ExecutionId, Notification)>;

fn config(state: &Path) -> LocalConfig {
    LocalConfig {
        state_dir: state.to_path_buf(),
        max_parallel: 4,
        grace_period_ms: 5_000,
        ..LocalConfig::default()
    }
}

async fn build(config: LocalConfig) -> (Arc<dyn Distributor>, Pushes) {
    let (tx, rx) = unbounded_channel();
    let ctx = BuildContext {
        notifier: Notifier::new(tx),
        ..BuildContext::detached("local")
    };
    (config.build(ctx).await.expect("build"), rx)
}

fn task(id: u64, rid: &str, payload: Value) -> TaskDescription {
    let mut t = TaskDescription::new(ExecutionId(id), RequestId::new(rid), "local", payload);
    t.notify.auth_token = AuthToken(format!("secret-{id}"));
    t
}

fn execution(t: &TaskDescription, launch: &Launch) -> Execution {
    Execution {
        id: t.execution_id,
        task_id: t.task_id,
        attempt: t.attempt,
        request_id: t.request_id.clone(),
        payload: t.payload.clone(),
        token: launch.token.clone(),
        handle: launch.handle.clone(),
    }
}

async fn start(d: &Arc<dyn Distributor>, id: u64, payload: Value) -> Execution {
    let t = task(id, &format!("req-{id}"), payload);
    let launch = d.run(&t).await.expect("run");
    execution(&t, &launch)
}

/// Polls `status` until `done` holds, failing after `DEADLINE`.
async fn poll_until(
    d: &Arc<dyn Distributor>,
    e: &Execution,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let end = Instant::now() + DEADLINE;
    loop {
        let s = d.status(e).await.expect("status");
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; last: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finished(d: &Arc<dyn Distributor>, e: &Execution) -> Outcome {
    match poll_until(d, e, "finished", |s| matches!(s, Status::Finished(_))).await {
        Status::Finished(o) => o,
        _ => unreachable!(),
    }
}

/// Polls until `path` exists.
async fn file_appears(path: &Path) {
    let end = Instant::now() + DEADLINE;
    while !path.exists() {
        assert!(Instant::now() < end, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn abnormal(o: &Outcome) -> (AbnormalKind, &str) {
    match o {
        Outcome::Abnormal { kind, reason } => (*kind, reason.as_str()),
        Outcome::Succeeded { data } => panic!("expected abnormal, got success {data}"),
    }
}

/// A script that waits until `gate` exists, then exits with `code`.
fn gated(gate: &Path, code: i32) -> Value {
    json!({ "script": format!(
        "while [ ! -e '{}' ]; do sleep 0.02; done; exit {code}",
        gate.display()
    )})
}

#[tokio::test]
async fn success_captures_output_and_pushes() {
    let state = tempfile::tempdir().unwrap();
    let (d, mut pushes) = build(config(state.path())).await;
    let e = start(
        &d,
        1,
        json!({"argv": ["sh", "-c", "echo first; echo hello; echo oops >&2"]}),
    )
    .await;
    let Outcome::Succeeded { data } = finished(&d, &e).await else {
        panic!("expected success");
    };
    assert_eq!(data["exit_code"], 0);
    assert_eq!(data["stdout_tail"], json!(["first", "hello"]));
    assert_eq!(data["stderr_tail"], json!(["oops"]));
    let stdout = PathBuf::from(data["stdout"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(&stdout).unwrap(), "first\nhello\n");
    assert!(
        stdout.starts_with(state.path().canonicalize().unwrap())
            || stdout.starts_with(state.path())
    );

    // Pushes: running (1) then finished (2), each with the execution's auth token, and each
    // turns into a status through handle_notification.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (id, n) = tokio::time::timeout(DEADLINE, pushes.recv())
            .await
            .expect("push in time")
            .expect("channel open");
        assert_eq!(id, ExecutionId(1));
        assert_eq!(n.attributes["auth_token"], "secret-1");
        let status = d.handle_notification(&e, &n).await.unwrap();
        assert!(status.is_some(), "push for this execution yields a status");
        seen.push(n.sequence.unwrap());
    }
    assert_eq!(seen, [1, 2]);
    // A push about another token is ignored.
    let other = Notification::json(&json!({"local": {"token": "req-999", "event": "finished"}}));
    assert_eq!(d.handle_notification(&e, &other).await.unwrap(), None);
}

#[tokio::test]
async fn remembered_final_status_matches_the_state_directory() {
    let state = tempfile::tempdir().unwrap();
    let (d, mut pushes) = build(config(state.path())).await;
    let e = start(
        &d,
        1,
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]}),
    )
    .await;
    // After the `finished` push the instance answers from the status its watcher derived.
    loop {
        let (_, n) = tokio::time::timeout(DEADLINE, pushes.recv())
            .await
            .expect("push in time")
            .expect("channel open");
        if n.sequence == Some(2) {
            break;
        }
    }
    let remembered = d.status(&e).await.unwrap();
    let (kind, reason) = match &remembered {
        Status::Finished(o) => abnormal(o),
        other => panic!("expected finished, got {other:?}"),
    };
    assert_eq!(kind, AbnormalKind::Failed);
    assert!(
        reason.contains("code 3") && reason.contains("err"),
        "{reason}"
    );
    // A fresh instance reads the same from the directory.
    let (fresh, _) = build(config(state.path())).await;
    assert_eq!(fresh.status(&e).await.unwrap(), remembered);
    // One start record: the work's pid (its process group) and its supervisor's.
    let record = std::fs::read_to_string(state.path().join("req-1/pid")).unwrap();
    let pids: Vec<i32> = record
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{record:?}");
    assert_ne!(pids[0], pids[1]);
    assert!(!state.path().join("req-1/supervisor").exists());
}

#[tokio::test]
async fn nonzero_exit_is_failed_with_code() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(&d, 2, json!({"script": "echo broken >&2; exit 3"})).await;
    let o = finished(&d, &e).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Failed);
    assert!(reason.contains("code 3"), "{reason}");
    assert!(reason.contains("broken"), "{reason}");
}

#[tokio::test]
async fn foreign_signal_is_crashed() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(&d, 3, json!({"script": "kill -USR1 $$; sleep 5"})).await;
    let o = finished(&d, &e).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Crashed);
    assert!(reason.contains("SIGUSR1"), "{reason}");
}

#[tokio::test]
async fn stdin_env_and_cwd_are_applied() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(
        &d,
        4,
        json!({"script": "cat; echo \"$GREETING\"; pwd; echo \"$DISTRIBUTOR_EXECUTION_ID $DISTRIBUTOR_REQUEST_ID\"", "stdin": "from stdin\n",
               "env": {"GREETING": "hi there"}, "cwd": work.path()}),
    )
    .await;
    let Outcome::Succeeded { data } = finished(&d, &e).await else {
        panic!("expected success");
    };
    let cwd = work.path().canonicalize().unwrap();
    assert_eq!(
        data["stdout_tail"],
        json!(["from stdin", "hi there", cwd.to_str().unwrap(), "4 req-4"])
    );
}

#[tokio::test]
async fn clear_env_leaves_only_the_payload_and_distributor_variables() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    // `env` runs from the payload's PATH (looked up there, as std does), in an environment of
    // only the payload's variables and the DISTRIBUTOR_* ones.
    let e = start(
        &d,
        41,
        json!({"argv": ["env"], "clear_env": true, "env": {"PATH": "/usr/bin:/bin", "ONLY": "me"}}),
    )
    .await;
    let Outcome::Succeeded { data } = finished(&d, &e).await else {
        panic!("expected success");
    };
    let stdout = std::fs::read_to_string(data["stdout"].as_str().unwrap()).unwrap();
    let mut names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "DISTRIBUTOR_ATTEMPT",
            "DISTRIBUTOR_EXECUTION_ID",
            "DISTRIBUTOR_REQUEST_ID",
            "DISTRIBUTOR_STATE_DIR",
            "DISTRIBUTOR_TASK_ID",
            "ONLY",
            "PATH"
        ]
    );
    assert!(stdout.contains("ONLY=me\n"), "{stdout}");
}

#[tokio::test]
async fn argv_is_not_interpreted_by_a_shell() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(&d, 5, json!({"argv": ["echo", "$HOME", "a;b", "*"]})).await;
    let Outcome::Succeeded { data } = finished(&d, &e).await else {
        panic!("expected success");
    };
    assert_eq!(data["stdout_tail"], json!(["$HOME a;b *"]));
}

#[tokio::test]
async fn cancel_terminates_the_whole_group() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let marker = state.path().join("bg.pid");
    let e = start(
        &d,
        6,
        json!({"script": format!("sleep 30 & echo $! > '{}'; wait", marker.display())}),
    )
    .await;
    file_appears(&marker).await;
    poll_until(&d, &e, "running", |s| *s == Status::Running).await;
    let bg: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    d.cancel(&e).await.unwrap();
    d.cancel(&e).await.unwrap();
    let o = finished(&d, &e).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Cancelled);
    assert!(reason.contains("SIGTERM"), "{reason}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "SIGTERM sufficed, no grace wait"
    );
    // SAFETY: kill with signal 0 only probes for existence.
    let alive = unsafe { libc::kill(bg, 0) } == 0;
    assert!(!alive, "the background child in the group was stopped too");
    // Cancelling finished work is fine and changes nothing.
    d.cancel(&e).await.unwrap();
    assert_eq!(d.status(&e).await.unwrap(), Status::Finished(o));
}

#[tokio::test]
async fn cancel_kills_after_grace_when_term_is_ignored() {
    let state = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(600);
    let (d, _p) = build(LocalConfig {
        grace_period_ms: 600,
        ..config(state.path())
    })
    .await;
    let ready = state.path().join("ready");
    let e = start(
        &d,
        7,
        json!({"script": format!(
            "trap '' TERM; touch '{}'; while :; do sleep 0.05; done",
            ready.display()
        )}),
    )
    .await;
    file_appears(&ready).await;
    let t0 = Instant::now();
    d.cancel(&e).await.unwrap();
    // Still running during the grace period: TERM was ignored, KILL not sent yet.
    assert_eq!(d.status(&e).await.unwrap(), Status::Running);
    let o = finished(&d, &e).await;
    let elapsed = t0.elapsed();
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Cancelled);
    assert!(reason.contains("SIGKILL"), "{reason}");
    assert!(
        elapsed >= grace,
        "killed only after the grace period ({elapsed:?})"
    );
    assert!(
        elapsed < grace + Duration::from_secs(5),
        "killed soon after grace ({elapsed:?})"
    );
}

#[tokio::test]
async fn own_time_limit_ends_timed_out() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(
        &d,
        8,
        json!({"argv": ["sleep", "30"], "time_limit_ms": 200}),
    )
    .await;
    let o = finished(&d, &e).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::TimedOut);
    assert!(reason.contains("200 ms"), "{reason}");
}

#[tokio::test]
async fn extra_work_waits_pending_until_a_slot_frees() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(LocalConfig {
        max_parallel: 1,
        ..config(state.path())
    })
    .await;
    let gate = state.path().join("gate");
    let a = start(&d, 9, gated(&gate, 0)).await;
    let b = start(&d, 10, json!({"argv": ["true"]})).await;
    let c = start(&d, 11, json!({"argv": ["true"]})).await;
    assert_eq!(d.status(&a).await.unwrap(), Status::Running);
    assert_eq!(d.status(&b).await.unwrap(), Status::Pending);
    assert_eq!(d.status(&c).await.unwrap(), Status::Pending);
    // Cancelling queued work ends it at once, without ever starting it.
    d.cancel(&c).await.unwrap();
    let (kind, _) = abnormal(&finished(&d, &c).await);
    assert_eq!(kind, AbnormalKind::Cancelled);
    assert_eq!(d.status(&b).await.unwrap(), Status::Pending);
    std::fs::write(&gate, "").unwrap();
    assert!(finished(&d, &a).await.is_success());
    assert!(finished(&d, &b).await.is_success());
    assert!(
        !state.path().join("req-11/pid").exists(),
        "cancelled work never ran"
    );
}

#[tokio::test]
async fn run_is_idempotent_per_request_id() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let counter = state.path().join("count");
    let payload = json!({"script": format!("echo run >> '{}'", counter.display())});
    let t = task(12, "same-request", payload);
    let (l1, l2) = tokio::join!(d.run(&t), d.run(&t));
    let (l1, l2) = (l1.unwrap(), l2.unwrap());
    let l3 = d.run(&t).await.unwrap();
    assert_eq!(l1.token, l2.token);
    assert_eq!(l1.token, l3.token);
    let e = execution(&t, &l1);
    assert!(finished(&d, &e).await.is_success());
    let l4 = d.run(&t).await.unwrap();
    assert_eq!(l4.token, l1.token);
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
}

#[tokio::test]
async fn missing_program_is_rejected_permanently_and_repeatably() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let t = task(
        13,
        "no-such-program",
        json!({"argv": ["/nonexistent/program"]}),
    );
    let err = d.run(&t).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    let again = d.run(&t).await.unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
}

#[tokio::test]
async fn missing_working_directory_is_named_not_the_program() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let cwd = state.path().join("no-such-dir");
    let t = task(15, "no-such-cwd", json!({"argv": ["true"], "cwd": cwd}));
    let err = d.run(&t).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("working directory `{}`", cwd.display())),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_tokens_are_missing_and_cancel_is_ok() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    for token in ["never-issued", "../../etc/passwd", ""] {
        let t = task(14, "x", json!({"argv": ["true"]}));
        let mut e = execution(&t, &Launch::new(token));
        e.token = token.into();
        let s = d.status(&e).await.unwrap();
        assert_eq!(
            s.outcome().and_then(Outcome::abnormal_kind),
            Some(AbnormalKind::Missing),
            "{token}: {s:?}"
        );
        d.cancel(&e).await.unwrap();
        assert_eq!(d.info_url(&e), d.info_url(&e));
    }
}

#[tokio::test]
async fn info_url_points_at_the_log() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let t = task(15, "req-15", json!({"argv": ["true"]}));
    let e = execution(&t, &Launch::new("req-15"));
    let url = d.info_url(&e).unwrap();
    assert_eq!(url.scheme(), "file");
    assert!(url.path().ends_with("/req-15/stdout"), "{url}");
    let (d2, _p2) = build(LocalConfig {
        info_base_url: Some("http://127.0.0.1:8080/ui/".parse().unwrap()),
        ..config(state.path())
    })
    .await;
    assert_eq!(
        d2.info_url(&e).unwrap().as_str(),
        "http://127.0.0.1:8080/ui/executions/15/log"
    );
}

#[tokio::test]
async fn registry_validates_payloads_with_pointers() {
    let registry = Registry::new().register::<LocalConfig>().unwrap();
    let kind = registry.kind("local").unwrap();
    // The schema alone catches type errors and unknown fields.
    let err = kind
        .validate_payload(&json!({"argv": "true", "timeout": 3}))
        .unwrap_err();
    let pointers: Vec<_> = err.violations.iter().map(|v| v.pointer.as_str()).collect();
    assert_eq!(pointers, ["/argv", "/timeout"], "{err}");
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let cases = [
        (json!({"argv": "true"}), "/argv"),
        (json!({"argv": []}), "/argv"),
        (json!({"argv": ["true"], "timeout": 3}), "/timeout"),
        (
            json!({"argv": ["true"], "time_limit_ms": 0}),
            "/time_limit_ms",
        ),
        (json!({}), "/argv"),
        (json!({"argv": ["true"], "script": "true"}), "/script"),
        (json!({"argv": ["true"], "env": {"A=B": "x"}}), "/env/A=B"),
    ];
    for (payload, pointer) in cases {
        let err = d.validate(&payload).unwrap_err();
        assert!(
            err.violations.iter().any(|v| v.pointer == pointer),
            "{payload}: {err}"
        );
    }
    assert!(d.validate(&json!({"argv": ["true"]})).is_ok());
    assert!(d.validate(&json!({"script": "true | true"})).is_ok());
    let p: LocalPayload = serde_json::from_value(json!({"argv": ["true"]})).unwrap();
    assert_eq!(p, LocalPayload::argv(["true"]));
}

/// Simulated restart: the first instance's runtime goes away while its work runs; a fresh
/// instance on the same state directory re-attaches and reports the true exit status.
#[tokio::test]
async fn fresh_instance_reattaches_and_gets_true_exit_status() {
    let state = tempfile::tempdir().unwrap();
    let gate = state.path().join("gate");
    let cfg = config(state.path());
    let t = task(16, "survivor", gated(&gate, 7));
    let first = {
        let (cfg, t) = (cfg.clone(), t.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let launch = rt.block_on(async {
                let (d, _p) = build(cfg).await;
                let l = d.run(&t).await.unwrap();
                let e = execution(&t, &l);
                poll_until(&d, &e, "running", |s| *s == Status::Running).await;
                l
            });
            rt.shutdown_background();
            launch
        })
        .join()
        .unwrap()
    };
    let (d, mut pushes) = build(cfg).await;
    let e = execution(&t, &first);
    assert_eq!(d.recover(&e).await.unwrap(), Status::Running);
    std::fs::write(&gate, "").unwrap();
    let (kind, reason) = {
        let o = finished(&d, &e).await;
        let (k, r) = abnormal(&o);
        (k, r.to_owned())
    };
    assert_eq!(kind, AbnormalKind::Failed);
    assert!(reason.contains("code 7"), "{reason}");
    // The new instance's watcher pushes the finish.
    let (id, n) = tokio::time::timeout(DEADLINE, pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id, n.sequence), (ExecutionId(16), Some(2)));
    assert_eq!(n.attributes["auth_token"], "secret-16");
    // Running it again after the restart starts nothing new.
    assert_eq!(d.run(&t).await.unwrap().token, first.token);
}

/// Starts [`helper_orchestrator`] as a separate orchestrator process (in its own process group,
/// like a shell job) running `scenario`, waits until it says its work is in place, and kills its
/// whole process group with SIGKILL (what a terminal's hang-up or an OOM kill of the job does).
async fn orchestrator_killed_after(scenario: &str, state: &Path, gate: &Path) {
    let ready = state.join(format!("{scenario}-ready"));
    let mut orchestrator = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_orchestrator", "--ignored", "--nocapture"])
        .env("LOCAL_TEST_SCENARIO", scenario)
        .env("LOCAL_TEST_STATE", state)
        .env("LOCAL_TEST_GATE", gate)
        .env("LOCAL_TEST_READY", &ready)
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let end = Instant::now() + DEADLINE;
    while !ready.exists() {
        if let Some(status) = orchestrator.try_wait().unwrap() {
            panic!("helper orchestrator exited early: {status}");
        }
        assert!(Instant::now() < end, "helper orchestrator never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let group = i32::try_from(orchestrator.id()).unwrap();
    // SAFETY: killpg on the helper's own process group (its pid, by process_group(0)).
    assert_eq!(unsafe { libc::killpg(group, libc::SIGKILL) }, 0);
    orchestrator.wait().unwrap();
}

/// The real thing: an orchestrator process is killed with SIGKILL while its work runs; the work
/// keeps running, and a new instance adopts it and gets its true exit status.
#[tokio::test]
async fn orchestrator_sigkill_does_not_kill_the_work() {
    let state = tempfile::tempdir().unwrap();
    let gate = state.path().join("gate");
    orchestrator_killed_after("orphan", state.path(), &gate).await;

    let (d, mut pushes) = build(config(state.path())).await;
    let t = task(19, "orphaned", gated(&gate, 9));
    let e = execution(&t, &Launch::new("orphaned"));
    assert_eq!(
        d.status(&e).await.unwrap(),
        Status::Running,
        "work outlived its orchestrator"
    );
    std::fs::write(&gate, "").unwrap();
    let o = finished(&d, &e).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Failed);
    assert!(reason.contains("code 9"), "{reason}");
    // Adopted at build (no recover call needed): the new instance's watcher pushes the finish.
    let (id, n) = tokio::time::timeout(DEADLINE, pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((id, n.sequence), (ExecutionId(19), Some(2)));
}

/// Queued work survives an orchestrator's death: the next instance rebuilds the queue from the
/// state directory, counts the adopted running work against `max_parallel`, and starts the
/// queued work when it finishes.
#[tokio::test]
async fn queue_is_rebuilt_from_the_state_directory() {
    let state = tempfile::tempdir().unwrap();
    let gate = state.path().join("gate");
    orchestrator_killed_after("queue", state.path(), &gate).await;

    let (d, _p) = build(LocalConfig {
        max_parallel: 1,
        ..config(state.path())
    })
    .await;
    let ta = task(21, "first", gated(&gate, 0));
    let tb = task(22, "second", second_payload(state.path()));
    let (a, b) = (
        execution(&ta, &Launch::new("first")),
        execution(&tb, &Launch::new("second")),
    );
    assert_eq!(d.status(&a).await.unwrap(), Status::Running);
    assert_eq!(d.status(&b).await.unwrap(), Status::Pending);
    std::fs::write(&gate, "").unwrap();
    assert!(finished(&d, &a).await.is_success());
    assert!(finished(&d, &b).await.is_success());
    // The killed orchestrator had already handed `second` to its supervisor (one ahead of the
    // running work); that supervisor dropped it unstarted, and only this instance ran it.
    let runs = std::fs::read_to_string(state.path().join("second-runs")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "second ran {} times",
        runs.lines().count()
    );
}

/// The queued work of the queue scenario: appends a line to `second-runs` each time it runs.
fn second_payload(state: &Path) -> Value {
    json!({ "script": format!("echo ran >> '{}'", state.join("second-runs").display()) })
}

/// Not a test: the orchestrator process that `orchestrator_killed_after` starts and kills.
/// Starts the scenario's work, says it is ready, then waits to be killed.
#[tokio::test]
#[ignore = "helper process of the orchestrator-SIGKILL tests"]
async fn helper_orchestrator() {
    let (Ok(scenario), Some(state), Some(gate), Some(ready)) = (
        std::env::var("LOCAL_TEST_SCENARIO"),
        std::env::var_os("LOCAL_TEST_STATE"),
        std::env::var_os("LOCAL_TEST_GATE"),
        std::env::var_os("LOCAL_TEST_READY"),
    ) else {
        return;
    };
    let (state, gate) = (Path::new(&state), Path::new(&gate));
    match scenario.as_str() {
        "orphan" => {
            let (d, _p) = build(config(state)).await;
            let t = task(19, "orphaned", gated(gate, 9));
            let l = d.run(&t).await.unwrap();
            poll_until(&d, &execution(&t, &l), "running", |s| *s == Status::Running).await;
        }
        "queue" => {
            let (d, _p) = build(LocalConfig {
                max_parallel: 1,
                ..config(state)
            })
            .await;
            let ta = task(21, "first", gated(gate, 0));
            let tb = task(22, "second", second_payload(state));
            let la = d.run(&ta).await.unwrap();
            let lb = d.run(&tb).await.unwrap();
            poll_until(&d, &execution(&ta, &la), "running", |s| {
                *s == Status::Running
            })
            .await;
            assert_eq!(
                d.status(&execution(&tb, &lb)).await.unwrap(),
                Status::Pending
            );
        }
        other => panic!("unknown scenario {other}"),
    }
    std::fs::write(&ready, "").unwrap();
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn instances_come_from_the_registry() {
    let registry = Registry::new().register::<LocalConfig>().unwrap();
    let state = tempfile::tempdir().unwrap();
    let kind = registry.kind("local").unwrap();
    let cfg = json!({"state_dir": state.path(), "max_parallel": 2});
    kind.validate_config("config", &cfg).unwrap();
    let bad = kind
        .validate_config("config", &json!({"max_paralel": 2}))
        .unwrap_err();
    assert_eq!(bad.violations[0].pointer, "/max_paralel");
    assert_eq!(
        bad.violations[0].suggestion.as_deref(),
        Some("max_parallel")
    );
    let inst = kind
        .build(
            cfg.clone(),
            BuildContext::detached("local"),
            distributor_core::ConfigHash::of("local", &cfg),
        )
        .await
        .unwrap();
    let t = task(20, "via-registry", json!({"argv": ["true"]}));
    inst.validate(&t.payload).unwrap();
    let d = inst.distributor().clone();
    let e = execution(&t, &d.run(&t).await.unwrap());
    assert!(finished(&d, &e).await.is_success());
}

/// Several live instances in one process may share a state directory: work another live
/// instance has claimed (and is starting) is left to it by a newly built instance, never started
/// a second time. (Regression: this process's own pid once counted as a dead claimer.)
#[tokio::test]
async fn a_new_instance_never_starts_work_claimed_by_a_live_one() {
    let state = tempfile::tempdir().unwrap();
    let gate = state.path().join("gate");
    let (a, _pa) = build(LocalConfig {
        max_parallel: 1,
        ..config(state.path())
    })
    .await;
    let blocker = start(&a, 30, gated(&gate, 0)).await;
    let queued = start(&a, 31, json!({"argv": ["true"]})).await;
    assert_eq!(a.status(&queued).await.unwrap(), Status::Pending);
    // Another live instance of this process claims it, as it does right before spawning.
    let dir = state.path().join(queued.token.as_str());
    std::fs::write(dir.join("claim"), format!("start {}\n", std::process::id())).unwrap();
    // A new instance's rescan sees it claimed by a live process and leaves it alone.
    let (b, _pb) = build(LocalConfig {
        max_parallel: 4,
        ..config(state.path())
    })
    .await;
    assert_eq!(b.status(&queued).await.unwrap(), Status::Pending);
    assert!(!dir.join("pid").exists(), "started by the new instance");
    std::fs::write(&gate, "").unwrap();
    assert!(finished(&a, &blocker).await.is_success());
    assert_eq!(b.recover(&queued).await.unwrap(), Status::Pending);
    assert!(!dir.join("pid").exists(), "started despite the live claim");
}

/// The supervisor holds work ahead of a free slot (so that it starts the moment one frees); a
/// cancel that comes first still wins: the work ends `Cancelled` and never runs.
#[tokio::test]
async fn cancelling_work_handed_ahead_to_the_supervisor_never_starts_it() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(LocalConfig {
        max_parallel: 1,
        ..config(state.path())
    })
    .await;
    let gate = state.path().join("gate");
    let marker = state.path().join("ran");
    let a = start(&d, 31, gated(&gate, 0)).await;
    let script = format!("touch '{}'", marker.display());
    let b = start(&d, 32, json!({ "script": script })).await;
    assert_eq!(d.status(&a).await.unwrap(), Status::Running);
    assert_eq!(d.status(&b).await.unwrap(), Status::Pending);
    d.cancel(&b).await.unwrap();
    let (kind, _) = abnormal(&finished(&d, &b).await);
    assert_eq!(kind, AbnormalKind::Cancelled);
    std::fs::write(&gate, "").unwrap();
    assert!(finished(&d, &a).await.is_success());
    // The next work starts in the freed slot, so the supervisor has passed `b` by.
    let c = start(&d, 33, json!({"argv": ["true"]})).await;
    assert!(finished(&d, &c).await.is_success());
    assert!(!marker.exists(), "cancelled work ran");
    assert!(!state.path().join("req-32/pid").exists());
}

/// If the supervisor is killed, the work it started keeps running but its exit status is lost:
/// the execution ends `Crashed` once the work is gone (never `Running` forever, never a made-up
/// status), and the instance starts a new supervisor for the next work.
#[tokio::test]
async fn killed_supervisor_ends_its_work_crashed_and_is_replaced() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let gate = state.path().join("gate");
    let a = start(&d, 41, gated(&gate, 0)).await;
    assert_eq!(d.status(&a).await.unwrap(), Status::Running);
    let record = std::fs::read_to_string(state.path().join("req-41/pid")).unwrap();
    let supervisor: i32 = record.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: kill on the supervisor's pid, read from its own record.
    assert_eq!(unsafe { libc::kill(supervisor, libc::SIGKILL) }, 0);
    std::fs::write(&gate, "").unwrap();
    let o = finished(&d, &a).await;
    let (kind, reason) = abnormal(&o);
    assert_eq!(kind, AbnormalKind::Crashed, "{reason}");
    assert!(reason.contains("without recording"), "{reason}");
    let b = start(&d, 42, json!({"argv": ["true"]})).await;
    assert!(finished(&d, &b).await.is_success());
    let record = std::fs::read_to_string(state.path().join("req-42/pid")).unwrap();
    let next: i32 = record.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_ne!(next, supervisor, "a new supervisor started the next work");
}

/// The supervisor blocks SIGCHLD for itself; the work must not inherit that (a shell that waits
/// for its own children would hang).
#[tokio::test]
async fn work_starts_with_no_blocked_signals() {
    let state = tempfile::tempdir().unwrap();
    let (d, _p) = build(config(state.path())).await;
    let e = start(
        &d,
        51,
        json!({"script": "grep '^SigBlk' /proc/self/status"}),
    )
    .await;
    let o = finished(&d, &e).await;
    let Outcome::Succeeded { data } = &o else {
        panic!("{o:?}");
    };
    let line = data["stdout_tail"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(line.ends_with("0000000000000000"), "{line}");
}
