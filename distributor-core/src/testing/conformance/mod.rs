//! The conformance suite: checks an adapter against the [`Distributor`](crate::Distributor)
//! contract, one [libtest-mimic](libtest_mimic) trial per contract sentence.
//!
//! Run it from a `harness = false` test target of the adapter crate:
//!
//! ```toml
//! [dev-dependencies]
//! distributor-core = { version = "…", features = ["testing"] }
//! serde_json = "1"
//!
//! [[test]]
//! name = "conformance"
//! harness = false
//! ```
//!
//! ```no_run
//! // tests/conformance.rs
//! use distributor_core::testing::FakeConfig;
//! use distributor_core::testing::conformance::{Payloads, Suite};
//! use serde_json::json;
//!
//! fn main() -> std::process::ExitCode {
//!     // Say why the backend cannot be reached, or None when it can.
//!     let unreachable = std::env::var("FAKE_OFF").ok().map(|_| "FAKE_OFF is set".to_string());
//!     Suite::new::<FakeConfig>(json!({ "backend": "conformance" })) // your config type
//!         .payloads(Payloads {
//!             succeeds: json!({ "run_for_ms": 50 }),
//!             fails: Some(json!({ "outcome": { "outcome": "abnormal", "kind": "failed" } })),
//!             runs_long: json!({ "hang": true }),
//!             invalid: vec![(json!({ "run_for_ms": "soon" }), "/run_for_ms".into())],
//!         })
//!         .unreachable(unreachable)
//!         .timeout(std::time::Duration::from_secs(60))
//!         .run_main()
//! }
//! ```
//!
//! # What runs
//!
//! Trials are named `conformance::<kind>::<case>`; every one runs on its own tokio runtime
//! (multi-threaded, 2 workers) against an instance built for it (so pushes are attributed to the
//! trial that caused them; trials run in parallel unless [`Suite::test_threads`] says 1), in
//! real time: states are awaited by polling `status` every
//! [`Suite::poll_interval`] until the [`Suite::timeout`] deadline, never by fixed sleeps.
//! Transient errors are retried until the deadline, as the engine would.
//!
//! | case | checks |
//! |---|---|
//! | `run_reaches_terminal` | the `succeeds` payload reaches `Finished(Succeeded)` |
//! | `run_failure_is_failed` | the `fails` payload reaches `Finished(Abnormal Failed)` |
//! | `run_is_idempotent_per_request_id` | runs with one request id (again after it finished) give one token; with [`Suite::count_starts`], one piece of work |
//! | `cancel_is_idempotent` | cancelling running work twice is `Ok` twice |
//! | `cancel_unknown_is_ok` | cancelling tokens the backend never issued is `Ok` |
//! | `cancel_finished_is_ok` | cancelling finished work is `Ok` and it stays finished |
//! | `cancel_running_ends_cancelled` | (capability `cancel`) cancelled `runs_long` work reaches `Finished(Abnormal Cancelled)` |
//! | `status_never_goes_backwards` | a run's status, polled to the end, only moves forward (Pending → Running → Finished) and stays Finished; every other case checks every status it sees the same way |
//! | `status_unknown_is_missing` | tokens never issued are `Finished(Abnormal Missing)`, not errors |
//! | `info_url_is_pure` | the same answer twice, no panic, for real and unknown tokens |
//! | `handle_notification_survives_garbage` | garbage gives `Ok(_)` or a permanent error, never a panic or a transient error |
//! | `validate_rejects_bad_payloads` | each invalid payload is refused with a violation at its pointer; the others pass |
//! | `status_batch_matches_status` | one result per input, in order, agreeing with `status` |
//! | `push_notifications_arrive` | (capability `push_notifications`) a push with the execution's `auth_token` arrives, through the build context's notifier or POSTed to the task's HTTP notification target, and `handle_notification` makes it a status |
//! | `recover_reports_status` | (capability `recover`) after a rebuilt instance, `recover` reports finished work's outcome and long work as unfinished |
//!
//! A case whose capability the adapter does not declare (or that needs `Payloads::fails` when
//! it is `None`) is left out of the trial list and named once on stderr
//! (`conformance::<kind>::<case>: left out (not applicable: …)`): the suite probes the
//! capabilities by building one instance before listing. If that probe cannot build an instance,
//! every case is listed and such a case reports itself ignored as not applicable when it runs.
//!
//! Long work started by a case is cancelled at its end when the adapter can cancel.
//!
//! Every instance a trial builds is also checked for its config snapshot (what each execution
//! stores, see [`Kind::build`]): it MUST read back as itself, or the trial fails.
//!
//! # Notifications
//!
//! Each trial serves an HTTP notification endpoint on `127.0.0.1` (a port of its own) and
//! hands its URL to every task as [`NotificationRoute::target`](crate::NotificationRoute), the
//! way an engine built with [`notify_target`](crate::EngineBuilder::notify_target) does. It
//! accepts exactly what the [HTTP push format](crate::push) specifies, at exactly that URL,
//! and answers as an embedder does (200, or 400 naming the field, 401 without `auth_token`,
//! 404 for another path); what it refuses is named in `push_notifications_arrive`'s failure
//! message. An adapter may push either way: in process through
//! [`BuildContext::notifier`](crate::BuildContext), or by having its backend POST to the
//! target. [`Suite::http_notifications`]`(false)` hands out no target.
//!
//! # Unreachable backends
//!
//! With [`Suite::unreachable`]`(Some(reason))` every trial is marked ignored
//! (`Trial::with_ignored_flag`), so it is counted as ignored by `cargo test` and by nextest,
//! never as passed, and [`Suite::run_main`] prints the reason once to stderr before the trials:
//!
//! ```text
//! conformance::slurm: every trial is ignored: SLURM_URL not set: no slurmrestd
//! running 14 tests
//! test conformance::slurm::cancel_finished_is_ok ... ignored
//! ```
//!
//! libtest-mimic prints no reason for trials ignored up front; a trial forced to run anyway
//! (`--include-ignored`) reports itself ignored at run time with the reason on its own line
//! (`ignored (unreachable: …)`) instead of failing against a backend that is not there.

use std::fmt;
use std::future::Future;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use serde_json::Value;

use crate::config::ConfigHash;
use crate::error::BoxError;
use crate::registry::{Kind, KindConfig, Registry};
use crate::types::RequestId;

mod cases;
mod endpoint;
mod harness;

use cases::{CASES, Case};
use harness::Harness;

/// The payloads the suite runs, all valid for the kind under test unless in `invalid`.
#[derive(Debug, Clone, PartialEq)]
pub struct Payloads {
    /// Finishes `Succeeded` well within the suite timeout.
    pub succeeds: Value,
    /// Finishes `Abnormal { kind: Failed }`; `None` if the kind cannot express failing work:
    /// `run_failure_is_failed` is then left out of the trial list (and named on stderr), like a
    /// case whose capability is not declared.
    pub fails: Option<Value>,
    /// Keeps running for at least 60 s unless cancelled.
    pub runs_long: Value,
    /// Payloads validation MUST refuse, each with the JSON Pointer a violation MUST name.
    pub invalid: Vec<(Value, String)>,
}

type Setup = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), BoxError>> + Send>;
type CountStarts = Arc<dyn Fn(RequestId) -> BoxFuture<'static, usize> + Send + Sync>;

/// A conformance run for one kind. Build with [`Suite::new`], finish with
/// [`run_main`](Suite::run_main) (or [`trials`](Suite::trials) to run them yourself).
pub struct Suite {
    kind_name: &'static str,
    kind: Result<Kind, String>,
    registry: Result<Registry, String>,
    config: Value,
    config_error: Option<String>,
    payloads: Option<Payloads>,
    unreachable: Option<String>,
    timeout: Duration,
    poll_interval: Duration,
    setup: Option<Setup>,
    count_starts: Option<CountStarts>,
    test_threads: Option<usize>,
    http_notifications: bool,
}

impl fmt::Debug for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Suite")
            .field("kind", &self.kind_name)
            .field("config", &self.config)
            .field("unreachable", &self.unreachable)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Suite {
    /// A suite for config type `C` with the instance config `config` (without `kind`).
    ///
    /// The config is checked against `C`'s schema here; if it does not conform, every trial
    /// fails with the violations (unless the suite is [`unreachable`](Self::unreachable)).
    pub fn new<C: KindConfig>(config: Value) -> Self {
        let registry = Registry::new().register::<C>().map_err(|e| e.to_string());
        let kind = registry
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|r| r.kind(C::KIND).cloned().map_err(|e| e.to_string()));
        Self {
            kind_name: C::KIND,
            kind,
            registry,
            config,
            config_error: None,
            payloads: None,
            unreachable: None,
            timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(100),
            setup: None,
            count_starts: None,
            test_threads: None,
            http_notifications: true,
        }
    }

    /// Also registers kind `K`, for a kind under test that builds instances of other kinds
    /// inside itself (from [`BuildContext::registry`](crate::BuildContext)); the config is
    /// validated against the kind under test with every registered kind known.
    pub fn with_kind<K: KindConfig>(mut self) -> Self {
        self.registry = self
            .registry
            .and_then(|r| r.register::<K>().map_err(|e| e.to_string()));
        self
    }

    /// The payloads to run. Required: without them every trial fails saying so.
    pub fn payloads(mut self, payloads: Payloads) -> Self {
        self.payloads = Some(payloads);
        self
    }

    /// `Some(reason)`: the backend cannot be reached, so every trial is reported ignored with
    /// `reason` (see the module docs). `None`: run them.
    pub fn unreachable(mut self, reason: Option<String>) -> Self {
        self.unreachable = reason;
        self
    }

    /// The deadline for each state a case waits for and for each adapter call (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often cases poll `status` while waiting (default 100 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// An async hook run once, before the first trial that runs (for example to start an
    /// in-test worker). It runs on a runtime that lives until every trial has finished, so
    /// tasks it spawns keep running. If it fails, every trial fails with its error.
    pub fn setup<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.setup = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// A probe of the backend: how many pieces of work it really started for a request id.
    /// When given, `run_is_idempotent_per_request_id` also asserts that it is exactly 1 (the
    /// MUST), not only that the token repeats (the SHOULD).
    pub fn count_starts<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(RequestId) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = usize> + Send + 'static,
    {
        self.count_starts = Some(Arc::new(move |r| Box::pin(f(r))));
        self
    }

    /// How many trials [`run_main`](Self::run_main) runs at once when the command line does not
    /// say (`--test-threads`); default: libtest's (one per CPU). Every trial builds its own
    /// instance, so an adapter whose instances cannot coexist in one process (a fixed listen
    /// address) sets 1.
    pub fn test_threads(mut self, threads: usize) -> Self {
        self.test_threads = Some(threads.max(1));
        self
    }

    /// Whether each trial serves an HTTP notification endpoint on a loopback port and hands its
    /// URL to every task as [`NotificationRoute::target`](crate::NotificationRoute), as an
    /// engine with [`EngineBuilder::notify_target`](crate::EngineBuilder::notify_target) does
    /// (default `true`). Pushes POSTed there in the [HTTP push format](crate::push) count for
    /// `push_notifications_arrive` like pushes through the notifier. Turn it off for an adapter
    /// that reads the target as something else (a message-bus subject) and is tested with
    /// its own.
    pub fn http_notifications(mut self, on: bool) -> Self {
        self.http_notifications = on;
        self
    }

    /// The reason given to [`unreachable`](Self::unreachable), if any.
    pub fn unreachable_reason(&self) -> Option<&str> {
        self.unreachable.as_deref()
    }

    /// The trials, named `conformance::<kind>::<case>`, in case order.
    ///
    /// Cases that cannot apply to this adapter (a capability it does not declare, or no `fails`
    /// payload) are left out and named once on stderr, so that every listed trial either runs
    /// or is ignored because the backend is unreachable.
    pub fn trials(self) -> Vec<Trial> {
        let kind_name = self.kind_name;
        let shared = self.into_shared();
        let ignored = shared.unreachable.is_some();
        let caps = probe_capabilities(&shared);
        CASES
            .iter()
            .filter(|case| {
                let Some(caps) = &caps else { return true };
                match case.needs.unmet(caps, shared.payloads.fails.is_some()) {
                    Some(reason) => {
                        eprintln!("{}: left out ({reason})", trial_name(kind_name, case));
                        false
                    }
                    None => true,
                }
            })
            .map(|case| {
                let shared = Arc::clone(&shared);
                let case = *case;
                Trial::ignorable_test(trial_name(kind_name, &case), move || {
                    run_trial(&shared, case)
                })
                .with_ignored_flag(ignored)
            })
            .collect()
    }

    fn into_shared(mut self) -> Arc<Shared> {
        if let (Ok(k), Ok(r)) = (&self.kind, &self.registry) {
            self.config_error = k
                .validate_config_in(
                    r,
                    &format!("config of kind `{}`", self.kind_name),
                    &self.config,
                )
                .err()
                .map(|e| e.to_string());
        }
        let broken = match (&self.kind, &self.config_error, &self.payloads) {
            (Err(e), _, _) => Some(format!("the kind cannot be registered: {e}")),
            (Ok(_), _, _) if self.registry.is_err() => Some(format!(
                "a kind cannot be registered: {}",
                self.registry.as_ref().err().cloned().unwrap_or_default()
            )),
            (Ok(_), Some(e), _) => Some(e.clone()),
            (Ok(_), None, None) => Some("no payloads: call Suite::payloads".to_owned()),
            _ => None,
        };
        Arc::new(Shared {
            hash: ConfigHash::of(self.kind_name, &self.config),
            kind: self.kind.ok(),
            registry: self.registry.unwrap_or_default(),
            config: self.config,
            payloads: self.payloads.unwrap_or(Payloads {
                succeeds: Value::Null,
                fails: None,
                runs_long: Value::Null,
                invalid: Vec::new(),
            }),
            broken,
            unreachable: self.unreachable,
            timeout: self.timeout,
            poll_interval: self.poll_interval,
            setup: Mutex::new(self.setup),
            setup_done: OnceLock::new(),
            count_starts: self.count_starts,
            http_notifications: self.http_notifications,
        })
    }

    /// Parses the libtest arguments, runs the trials and returns the exit code. Prints the
    /// unreachable reason (if any) to stderr first.
    pub fn run_main(self) -> ExitCode {
        let mut args = Arguments::from_args();
        if args.test_threads.is_none() {
            args.test_threads = self.test_threads;
        }
        if let Some(reason) = &self.unreachable
            && !args.list
        {
            eprintln!(
                "conformance::{}: every trial is ignored: {reason}",
                self.kind_name
            );
        }
        libtest_mimic::run(&args, self.trials()).exit_code()
    }
}

fn trial_name(kind: &str, case: &Case) -> String {
    format!("conformance::{kind}::{}", case.name)
}

/// What every trial of one suite shares.
struct Shared {
    /// `None` only if registration failed, and then `broken` says why.
    kind: Option<Kind>,
    /// Every kind registered for the suite (the one under test and [`Suite::with_kind`]'s).
    registry: Registry,
    config: Value,
    hash: ConfigHash,
    payloads: Payloads,
    broken: Option<String>,
    unreachable: Option<String>,
    timeout: Duration,
    poll_interval: Duration,
    setup: Mutex<Option<Setup>>,
    setup_done: OnceLock<Result<SetupRuntime, String>>,
    count_starts: Option<CountStarts>,
    /// Serve an HTTP notification endpoint per trial.
    http_notifications: bool,
}

/// The runtime the setup hook ran on, kept alive for the tasks it spawned.
struct SetupRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SetupRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Shared {
    /// Runs the setup hook once (the first caller runs it, the others wait for it).
    fn ensure_setup(&self) -> Result<(), String> {
        let done = self.setup_done.get_or_init(|| {
            let hook = self
                .setup
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            let Some(hook) = hook else {
                return Ok(SetupRuntime(None));
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("setup: cannot build a runtime: {e}"))?;
            rt.block_on(hook())
                .map_err(|e| format!("setup failed: {e}"))?;
            Ok(SetupRuntime(Some(rt)))
        });
        done.as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

/// The adapter's capabilities, from one instance built and dropped before the trials run;
/// `None` if the backend is unreachable or the instance cannot be built (every case is then
/// listed, and each decides when it runs).
fn probe_capabilities(shared: &Arc<Shared>) -> Option<crate::Capabilities> {
    if shared.unreachable.is_some() || shared.broken.is_some() {
        return None;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let inner = Arc::clone(shared);
    let caps = rt.block_on(async move { Harness::build(inner).await.ok()?.caps().ok() });
    rt.shutdown_timeout(Duration::from_secs(1));
    caps
}

fn run_trial(shared: &Arc<Shared>, case: Case) -> Result<Completion, Failed> {
    if let Some(reason) = &shared.unreachable {
        return Ok(Completion::ignored_with(format!("unreachable: {reason}")));
    }
    if let Some(broken) = &shared.broken {
        return Err(broken.as_str().into());
    }
    shared.ensure_setup()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    let inner = Arc::clone(shared);
    let result = rt.block_on(async move {
        let h = Harness::build(inner).await?;
        let caps = h.caps()?;
        if let Some(reason) = case.needs.unmet(&caps, h.shared.payloads.fails.is_some()) {
            return Ok(Completion::ignored_with(reason));
        }
        (case.run)(&h).await.map(|()| Completion::Completed)
    });
    // Do not wait for tasks the adapter left behind (supervisors, pushers).
    rt.shutdown_timeout(Duration::from_secs(1));
    result.map_err(Failed::from)
}

#[cfg(test)]
mod tests;
