//! The cases: one contract sentence of the `Distributor` trait each.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::time::Instant;

use super::harness::{CaseResult, Harness, PushEvent, Via, execution_of};
use crate::error::Result as CoreResult;
use crate::types::{AbnormalKind, Capabilities, Execution, Notification, Outcome, Status};

/// What a case needs beyond the basics; without it the trial is reported ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Needs {
    /// Nothing.
    Nothing,
    /// `Payloads::fails`.
    FailingPayload,
    /// `capabilities.cancel`.
    Cancel,
    /// `capabilities.push_notifications`.
    Push,
    /// `capabilities.recover`.
    Recover,
}

impl Needs {
    /// Why the case does not apply to this adapter, if it does not.
    pub(super) fn unmet(self, caps: &Capabilities, has_failing_payload: bool) -> Option<String> {
        let (met, what) = match self {
            Self::Nothing => (true, ""),
            Self::FailingPayload => (has_failing_payload, "Payloads::fails is None"),
            Self::Cancel => (caps.cancel, "capabilities.cancel is false"),
            Self::Push => (
                caps.push_notifications,
                "capabilities.push_notifications is false",
            ),
            Self::Recover => (caps.recover, "capabilities.recover is false"),
        };
        (!met).then(|| format!("not applicable: {what}"))
    }
}

type CaseFn = for<'a> fn(&'a Harness) -> BoxFuture<'a, CaseResult>;

/// One case of the suite.
#[derive(Clone, Copy)]
pub(super) struct Case {
    /// The trial name's last segment.
    pub(super) name: &'static str,
    /// What it needs.
    pub(super) needs: Needs,
    /// The check.
    pub(super) run: CaseFn,
}

/// Every case, in report order.
pub(super) const CASES: &[Case] = &[
    case("run_reaches_terminal", Needs::Nothing, |h| {
        Box::pin(run_reaches_terminal(h))
    }),
    case("run_failure_is_failed", Needs::FailingPayload, |h| {
        Box::pin(run_failure_is_failed(h))
    }),
    case("run_is_idempotent_per_request_id", Needs::Nothing, |h| {
        Box::pin(run_is_idempotent_per_request_id(h))
    }),
    case("cancel_is_idempotent", Needs::Nothing, |h| {
        Box::pin(cancel_is_idempotent(h))
    }),
    case("cancel_unknown_is_ok", Needs::Nothing, |h| {
        Box::pin(cancel_unknown_is_ok(h))
    }),
    case("cancel_finished_is_ok", Needs::Nothing, |h| {
        Box::pin(cancel_finished_is_ok(h))
    }),
    case("cancel_running_ends_cancelled", Needs::Cancel, |h| {
        Box::pin(cancel_running_ends_cancelled(h))
    }),
    case("status_never_goes_backwards", Needs::Nothing, |h| {
        Box::pin(status_never_goes_backwards(h))
    }),
    case("status_unknown_is_missing", Needs::Nothing, |h| {
        Box::pin(status_unknown_is_missing(h))
    }),
    case("info_url_is_pure", Needs::Nothing, |h| {
        Box::pin(info_url_is_pure(h))
    }),
    case(
        "handle_notification_survives_garbage",
        Needs::Nothing,
        |h| Box::pin(handle_notification_survives_garbage(h)),
    ),
    case("validate_rejects_bad_payloads", Needs::Nothing, |h| {
        Box::pin(validate_rejects_bad_payloads(h))
    }),
    case("status_batch_matches_status", Needs::Nothing, |h| {
        Box::pin(status_batch_matches_status(h))
    }),
    case("push_notifications_arrive", Needs::Push, |h| {
        Box::pin(push_notifications_arrive(h))
    }),
    case("recover_reports_status", Needs::Recover, |h| {
        Box::pin(recover_reports_status(h))
    }),
];

const fn case(name: &'static str, needs: Needs, run: CaseFn) -> Case {
    Case { name, needs, run }
}

fn is_abnormal(o: &Outcome, kind: AbnormalKind) -> bool {
    o.abnormal_kind() == Some(kind)
}

fn unfinished(s: &Status) -> bool {
    !matches!(s, Status::Finished(_))
}

/// "Reports where the work is: `Pending`, `Running` or `Finished(outcome)`": the `succeeds`
/// payload reaches `Finished(Succeeded)`.
async fn run_reaches_terminal(h: &Harness) -> CaseResult {
    let e = h.start(&h.shared.payloads.succeeds).await?;
    match h.wait_finished(&e).await? {
        Outcome::Succeeded { .. } => Ok(()),
        other => Err(format!(
            "the `succeeds` payload ended {other:?}, expected Succeeded"
        )),
    }
}

/// `AbnormalKind::Failed`, "the work ran and reported failure": the `fails` payload reaches
/// `Finished(Abnormal { kind: Failed })`.
async fn run_failure_is_failed(h: &Harness) -> CaseResult {
    let Some(fails) = &h.shared.payloads.fails else {
        return Err("Payloads::fails is None".into());
    };
    let e = h.start(fails).await?;
    let o = h.wait_finished(&e).await?;
    if is_abnormal(&o, AbnormalKind::Failed) {
        Ok(())
    } else {
        Err(format!(
            "the `fails` payload ended {o:?}, expected Abnormal Failed"
        ))
    }
}

/// "`run` MUST be idempotent per `task.request_id`: a second call with the same request id MUST
/// NOT start a second piece of work and SHOULD return the same token" — also after the work
/// finished (the engine repeats `run` after a crash).
async fn run_is_idempotent_per_request_id(h: &Harness) -> CaseResult {
    let task = h.task(&h.shared.payloads.succeeds);
    let d = h.d()?;
    let first = h.patiently("run", || d.run(&task)).await?;
    // The engine marks repeated calls; an adapter MUST dedupe on them.
    let mut task = task;
    task.redispatch = true;
    let second = h.patiently("second run", || d.run(&task)).await?;
    if second.token != first.token {
        return Err(format!(
            "a second run with request id {} returned token {} after {}: a second piece of \
             work was probably started (same request id SHOULD give the same token)",
            task.request_id, second.token, first.token
        ));
    }
    let e = execution_of(&task, first.token.clone(), first.handle);
    h.wait_finished(&e).await?;
    let third = h.patiently("run after finish", || d.run(&task)).await?;
    if third.token != first.token {
        return Err(format!(
            "run repeated after the work finished returned token {} instead of {}",
            third.token, first.token
        ));
    }
    if let Some(count) = &h.shared.count_starts {
        let n = h
            .call("count_starts", count(task.request_id.clone()))
            .await?;
        if n != 1 {
            return Err(format!(
                "three runs with request id {} started {n} pieces of work, expected 1",
                task.request_id
            ));
        }
    }
    Ok(())
}

/// "`cancel` MUST be idempotent: cancelling work that … was already cancelled … returns
/// `Ok(())`": cancel of running work, twice, is `Ok` both times.
async fn cancel_is_idempotent(h: &Harness) -> CaseResult {
    let e = h.start(&h.shared.payloads.runs_long).await?;
    let result = async {
        h.cancel(&e).await.map_err(|m| format!("first {m}"))?;
        h.cancel(&e).await.map_err(|m| format!("second {m}"))
    }
    .await;
    h.clean_up(&e).await;
    result
}

/// "`cancel` … work that … is unknown to the backend returns `Ok(())`."
async fn cancel_unknown_is_ok(h: &Harness) -> CaseResult {
    for e in h.unknown_executions() {
        h.cancel(&e)
            .await
            .map_err(|m| format!("token {} the backend never issued: {m}", e.token))?;
    }
    Ok(())
}

/// "`cancel` … work that already finished … returns `Ok(())`."
async fn cancel_finished_is_ok(h: &Harness) -> CaseResult {
    let e = h.start(&h.shared.payloads.succeeds).await?;
    h.wait_finished(&e).await?;
    h.cancel(&e)
        .await
        .map_err(|m| format!("on finished work: {m}"))?;
    let after = h.status(&e).await?;
    match after {
        Status::Finished(_) => Ok(()),
        other => Err(format!(
            "finished work reported {other:?} after a cancel; finished is final"
        )),
    }
}

/// "`cancel` asks the backend to stop the work … the engine records `Cancelled` once `status`
/// reports the work finished": running work, cancelled, reaches `Finished(Abnormal Cancelled)`.
async fn cancel_running_ends_cancelled(h: &Harness) -> CaseResult {
    let e = h.start(&h.shared.payloads.runs_long).await?;
    let result = async {
        h.wait_for(&e, "Running", |s| {
            matches!(s, Status::Running | Status::Finished(_))
        })
        .await?;
        h.cancel(&e).await?;
        let o = h.wait_finished(&e).await?;
        if is_abnormal(&o, AbnormalKind::Cancelled) {
            Ok(())
        } else {
            Err(format!(
                "cancelled `runs_long` work ended {o:?}, expected Abnormal Cancelled"
            ))
        }
    }
    .await;
    h.clean_up(&e).await;
    result
}

/// "A status MUST never move back": polled from `run` to the end, the `succeeds` payload's
/// status only moves forward (Pending → Running → Finished), and stays Finished. (Every other
/// case checks the same of every status it sees; this one polls a whole run for it.)
async fn status_never_goes_backwards(h: &Harness) -> CaseResult {
    let e = h.start(&h.shared.payloads.succeeds).await?;
    h.wait_finished(&e).await?;
    for _ in 0..3 {
        h.status(&e).await?;
    }
    Ok(())
}

/// "Work the backend does not know (any more) MUST be reported as
/// `Finished(Abnormal { kind: Missing, .. })`, not as an error."
async fn status_unknown_is_missing(h: &Harness) -> CaseResult {
    for e in h.unknown_executions() {
        let s = h
            .status(&e)
            .await
            .map_err(|m| format!("token {}: {m}", e.token))?;
        match &s {
            Status::Finished(o) if is_abnormal(o, AbnormalKind::Missing) => {}
            other => {
                return Err(format!(
                    "token {} the backend never issued: status {other:?}, expected Abnormal \
                     Missing",
                    e.token
                ));
            }
        }
    }
    Ok(())
}

/// "`info_url` MUST be pure and local: no I/O, the same answer for the same execution every
/// time, and it MUST NOT fail for tokens it does not recognise."
async fn info_url_is_pure(h: &Harness) -> CaseResult {
    let mut executions = h.unknown_executions();
    executions.push(h.start(&h.shared.payloads.succeeds).await?);
    let d = h.d()?;
    for e in &executions {
        let ask = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.info_url(e)))
                .map_err(|p| format!("info_url panicked on token {}: {}", e.token, msg(&*p)))
        };
        let (a, b) = (ask()?, ask()?);
        if a != b {
            return Err(format!(
                "info_url gave {a:?} then {b:?} for token {}",
                e.token
            ));
        }
    }
    Ok(())
}

fn msg(p: &(dyn std::any::Any + Send)) -> String {
    super::harness::panic_message(p)
}

/// Inputs no adapter should understand, with a label for the failure message.
fn garbage() -> Vec<(&'static str, Notification)> {
    let body = |data: &[u8]| Notification {
        data: data.to_vec(),
        ..Notification::default()
    };
    let nested = format!("{}{}", "[".repeat(64), "]".repeat(64));
    vec![
        ("an empty notification", Notification::default()),
        ("invalid UTF-8", body(&[0xff, 0xfe, 0x00, 0xc3])),
        ("JSON null", body(b"null")),
        ("an empty JSON object", body(b"{}")),
        ("an empty JSON array", body(b"[]")),
        ("truncated JSON", body(b"{\"status\": \"runn")),
        (
            "JSON with wrongly typed fields",
            body(br#"{"status": 5, "state": [], "outcome": {"kind": null}, "exit_code": "x"}"#),
        ),
        ("a deeply nested JSON array", body(nested.as_bytes())),
        ("1 MiB of text", body(&vec![b'a'; 1 << 20])),
        (
            "odd attributes, message id and sequence",
            Notification {
                data: b"\x00".to_vec(),
                attributes: BTreeMap::from([
                    (String::new(), String::new()),
                    ("token".into(), "\u{0}".into()),
                    ("sequence".into(), "-1".into()),
                ]),
                message_id: Some(String::new()),
                sequence: Some(u64::MAX),
            },
        ),
    ]
}

/// "`handle_notification` MUST NOT panic on any input: garbage is `Ok(None)` or a permanent
/// error" (`Ok(Some(_))` is accepted too: an adapter MAY treat any push as a poke and call
/// `status`).
async fn handle_notification_survives_garbage(h: &Harness) -> CaseResult {
    let mut executions = h.unknown_executions();
    executions.push(h.start(&h.shared.payloads.succeeds).await?);
    let d = h.d()?;
    for e in &executions {
        for (label, n) in garbage() {
            let what = format!("handle_notification with {label} (token {})", e.token);
            let r: CoreResult<Option<Status>> = h.call(&what, d.handle_notification(e, &n)).await?;
            if let Err(err) = r
                && err.is_transient()
            {
                return Err(format!(
                    "{what} failed transiently ({err}); garbage must be Ok(None) or a \
                     permanent error, since retrying cannot help"
                ));
            }
        }
    }
    Ok(())
}

/// "`Instance::validate`: the kind's schema first (every violation, with pointers), then the
/// adapter's own semantic checks": each invalid payload is refused with a violation at its
/// pointer; the valid payloads are accepted.
async fn validate_rejects_bad_payloads(h: &Harness) -> CaseResult {
    let instance = h.instance()?;
    let p = &h.shared.payloads;
    let mut valid: Vec<(&str, &Value)> =
        vec![("succeeds", &p.succeeds), ("runs_long", &p.runs_long)];
    if let Some(f) = &p.fails {
        valid.push(("fails", f));
    }
    for (name, payload) in valid {
        instance
            .validate(payload)
            .map_err(|e| format!("the `{name}` payload was refused: {e}"))?;
    }
    for (i, (payload, pointer)) in p.invalid.iter().enumerate() {
        match instance.validate(payload) {
            Ok(()) => return Err(format!("invalid[{i}] {payload} was accepted")),
            Err(e) if e.violations.iter().any(|v| &v.pointer == pointer) => {}
            Err(e) => {
                return Err(format!(
                    "invalid[{i}] {payload} was refused, but with no violation at `{pointer}`: {e}"
                ));
            }
        }
    }
    Ok(())
}

/// How two answers about one execution are compared: phase, success data, abnormal kind
/// (reasons may legitimately differ, e.g. carry a time).
fn shape(s: &Status) -> String {
    match s {
        Status::Pending | Status::Running => "unfinished".into(),
        Status::Finished(Outcome::Succeeded { data }) => format!("succeeded {data}"),
        Status::Finished(Outcome::Abnormal { kind, .. }) => format!("abnormal {kind}"),
    }
}

/// "`status_batch` reports the status of many executions of this distributor at once, one
/// result per input in the same order."
async fn status_batch_matches_status(h: &Harness) -> CaseResult {
    let d = h.d()?;
    let empty = h.call("status_batch", d.status_batch(&[])).await?;
    if !empty.is_empty() {
        return Err(format!(
            "status_batch of no executions gave {} results",
            empty.len()
        ));
    }
    let ok = h.start(&h.shared.payloads.succeeds).await?;
    h.wait_finished(&ok).await?;
    let mut inputs: Vec<Execution> = vec![ok.clone()];
    if let Some(fails) = &h.shared.payloads.fails {
        let failed = h.start(fails).await?;
        h.wait_finished(&failed).await?;
        inputs.push(failed);
    }
    inputs.extend(h.unknown_executions().into_iter().take(1));
    let long = h.start(&h.shared.payloads.runs_long).await?;
    inputs.push(long.clone());
    inputs.push(ok);
    let result = async {
        let deadline = Instant::now() + h.timeout();
        let batch = loop {
            let batch = h.call("status_batch", d.status_batch(&inputs)).await?;
            if batch.len() != inputs.len() {
                return Err(format!(
                    "status_batch of {} executions gave {} results",
                    inputs.len(),
                    batch.len()
                ));
            }
            let transient = batch
                .iter()
                .any(|r| r.as_ref().is_err_and(|e| e.is_transient()));
            if !transient || Instant::now() >= deadline {
                break batch;
            }
            tokio::time::sleep(h.shared.poll_interval).await;
        };
        for (i, (e, from_batch)) in inputs.iter().zip(batch).enumerate() {
            let from_batch = from_batch
                .map_err(|err| format!("status_batch[{i}] (token {}) failed: {err}", e.token))?;
            h.observe(e, &format!("status_batch[{i}]"), &from_batch)?;
            let single = h.status(e).await?;
            if shape(&from_batch) != shape(&single) {
                return Err(format!(
                    "status_batch[{i}] (token {}) is {from_batch:?} but status says {single:?}",
                    e.token
                ));
            }
        }
        Ok(())
    }
    .await;
    h.clean_up(&long).await;
    result
}

/// "`Capabilities::push_notifications`: the backend pushes notifications", which "MUST carry
/// the execution's `auth_token` attribute", and `handle_notification` turns them into a status.
/// A push may come either way an adapter can send one: through the build context's
/// [`Notifier`](crate::Notifier), or POSTed in the [HTTP push format](crate::push) to the
/// task's notification target (the harness serves one on loopback, unless
/// [`Suite::http_notifications`](super::Suite::http_notifications) is off).
async fn push_notifications_arrive(h: &Harness) -> CaseResult {
    let task = h.task(&h.shared.payloads.succeeds);
    let e = h.run(&task).await?;
    let started = Instant::now();
    let deadline = started + h.timeout();
    let d = h.d()?;
    let mut seen = Vec::new();
    let ended = loop {
        let (via, id, mut n) = match h.next_push(deadline).await {
            PushEvent::Push(via, id, n) => (via, id, n),
            PushEvent::Refused(why) => {
                seen.push(format!("a request the HTTP endpoint refused ({why})"));
                continue;
            }
            PushEvent::TimedOut => break format!("within {:?}", h.timeout()),
            PushEvent::Closed => {
                break format!(
                    "before every notifier of the instance was dropped, {:?} after run (the \
                     adapter keeps no Notifier from its BuildContext, and no HTTP endpoint is \
                     served)",
                    started.elapsed()
                );
            }
        };
        let path = match via {
            Via::Notifier => "through the notifier",
            Via::Http => "over HTTP",
        };
        if id != e.id {
            seen.push(format!("a push {path} for another execution {id}"));
            continue;
        }
        match n.attributes.remove("auth_token") {
            Some(t) if t == task.notify.auth_token.0 => {}
            Some(_) => {
                return Err(format!(
                    "a push {path} carried the wrong auth_token attribute"
                ));
            }
            None => return Err(format!("a push {path} carried no auth_token attribute")),
        }
        match h
            .call("handle_notification", d.handle_notification(&e, &n))
            .await?
        {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => seen.push(format!("a push {path} handle_notification ignored")),
            Err(err) if err.is_transient() => {
                seen.push(format!("a push {path} gave a transient error: {err}"))
            }
            Err(err) => {
                return Err(format!(
                    "handle_notification refused an authentic push ({path}): {err}"
                ));
            }
        }
    };
    let target = match h.notify_target() {
        Some(url) => format!("; the task's notification target was {url}"),
        None => "; the task had no notification target".into(),
    };
    let dropped = if h.notifier_dropped() {
        "; every Notifier of the instance was dropped"
    } else {
        ""
    };
    Err(format!(
        "no push for {} became a status {ended} (seen: {}){target}{dropped}",
        e.id,
        if seen.is_empty() {
            "nothing".into()
        } else {
            seen.join("; ")
        }
    ))
}

/// "`recover` re-attaches to work started before an orchestrator restart, using the persisted
/// handle, and reports its status": after a rebuild, finished work reports its outcome and
/// long work reports unfinished (and can still be cancelled).
async fn recover_reports_status(h: &Harness) -> CaseResult {
    let done = h.start(&h.shared.payloads.succeeds).await?;
    let outcome = h.wait_finished(&done).await?;
    let long = h.start(&h.shared.payloads.runs_long).await?;
    h.wait_for(&long, "Pending or Running", |_| true).await?;
    h.restart().await?;
    let d = h.d()?;
    let result = async {
        let s = h.patiently("recover", || d.recover(&done)).await?;
        h.observe(&done, "recover", &s)?;
        let expected = Status::Finished(outcome);
        if shape(&s) != shape(&expected) {
            return Err(format!(
                "recover of finished work reported {s:?}, before the restart it was {expected:?}"
            ));
        }
        let s = h.patiently("recover", || d.recover(&long)).await?;
        h.observe(&long, "recover", &s)?;
        if !unfinished(&s) {
            return Err(format!(
                "recover of `runs_long` work reported {s:?}, expected Pending or Running"
            ));
        }
        if h.caps()?.cancel {
            h.cancel(&long).await?;
            h.wait_finished(&long).await?;
        }
        Ok(())
    }
    .await;
    h.clean_up(&long).await;
    result
}
