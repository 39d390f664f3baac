//! The fake kind's config ([`FakeConfig`]) and payload ([`FakeScript`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{AbnormalKind, Outcome};

/// Config of a `fake` distributor instance.
///
/// `{}` is valid: backend `default`, pushes on, the engine's default poll interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    /// Name of the process-global [`FakeBackend`](super::FakeBackend) this instance talks to.
    /// Instances (and engines rebuilt in the same process) naming the same backend see the same
    /// work. Tests use a unique name and hold `FakeBackend::named(name)` to assert on it.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Whether the instance declares [`Capabilities::push_notifications`](crate::Capabilities)
    /// and pushes updates through the build context's notifier. `false` makes it poll-only.
    #[serde(default = "default_true")]
    pub push: bool,
    /// Poll interval hint returned in every `Launch`, in milliseconds; absent uses the engine's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            push: true,
            poll_interval_ms: None,
        }
    }
}

fn default_backend() -> String {
    "default".into()
}

fn default_true() -> bool {
    true
}

/// The payload of a `fake` task: a script of what the fake work does.
///
/// Every field has a default, so `{}` is valid and means "succeed immediately with `null` data".
/// Time is tokio's clock: under `tokio::time::pause` the script plays out deterministically.
///
/// ```json
/// { "pending_for_ms": 100, "run_for_ms": 500,
///   "outcome": { "outcome": "abnormal", "kind": "failed", "reason": "exit 1" },
///   "pushes": "reorder" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FakeScript {
    /// How long the work stays `Pending` after `run` starts it, in milliseconds.
    pub pending_for_ms: u64,
    /// How long the work stays `Running` before it finishes, in milliseconds.
    pub run_for_ms: u64,
    /// How the work ends when it finishes by itself.
    pub outcome: FakeOutcome,
    /// The first N `run` calls for one request id fail with a transient error; the next one
    /// proceeds.
    pub transient_run_errors: u32,
    /// `run` fails with this permanent error (after any transient ones) and starts nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permanent_run_error: Option<String>,
    /// How the Running and Finished pushes are delivered.
    pub pushes: PushMode,
    /// Delay of every push after the state change it reports, in milliseconds.
    pub push_delay_ms: u64,
    /// Send no pushes at all for this work (the engine must poll), even on a push-capable
    /// instance.
    pub poll_only: bool,
    /// Once the work has finished, the backend forgets it: `status` reports
    /// `Finished(Abnormal Missing)`. Combine with `pushes: "drop"` or `poll_only` so that the
    /// engine learns the outcome only by polling.
    pub forget: bool,
    /// When its run time is up, the work dies instead of finishing: `status` reports
    /// `Finished(Abnormal Crashed)` and no Finished push is sent (dead work reports nothing).
    pub crash: bool,
    /// The first N `cancel` calls for this work fail with a transient error.
    pub cancel_transient_errors: u32,
    /// `cancel` returns `Ok` but the work never stops (for the engine's unconfirmed-cancel path).
    pub ignore_cancel: bool,
    /// The work never finishes by itself: it runs until cancelled or finished by hand
    /// ([`FakeBackend::finish`](super::FakeBackend::finish)). `run_for_ms`, `outcome` and
    /// `crash` are then unused.
    pub hang: bool,
}

impl Default for FakeScript {
    fn default() -> Self {
        Self {
            pending_for_ms: 0,
            run_for_ms: 0,
            outcome: FakeOutcome::default(),
            transient_run_errors: 0,
            permanent_run_error: None,
            pushes: PushMode::Deliver,
            push_delay_ms: 0,
            poll_only: false,
            forget: false,
            crash: false,
            cancel_transient_errors: 0,
            ignore_cancel: false,
            hang: false,
        }
    }
}

/// How the fake work ends when its run time is up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, tag = "outcome", rename_all = "snake_case")]
pub enum FakeOutcome {
    /// It succeeds and produces `data`.
    Succeeded {
        /// The result data (any JSON; `null` if absent).
        #[serde(default)]
        data: Value,
    },
    /// It ends without a result.
    Abnormal {
        /// Why (`failed`, `crashed`, `result_malformed`…).
        #[schemars(with = "AbnormalKindSchema")]
        kind: AbnormalKind,
        /// The human-readable explanation.
        #[serde(default = "default_reason")]
        reason: String,
    },
}

impl Default for FakeOutcome {
    fn default() -> Self {
        Self::Succeeded { data: Value::Null }
    }
}

impl From<FakeOutcome> for Outcome {
    fn from(o: FakeOutcome) -> Self {
        match o {
            FakeOutcome::Succeeded { data } => Outcome::Succeeded { data },
            FakeOutcome::Abnormal { kind, reason } => Outcome::Abnormal { kind, reason },
        }
    }
}

fn default_reason() -> String {
    "scripted by the fake".into()
}

/// Schema twin of [`AbnormalKind`] (which does not derive `JsonSchema`).
#[derive(JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum AbnormalKindSchema {
    Failed,
    Crashed,
    Expired,
    TimedOut,
    Cancelled,
    Rejected,
    Missing,
    ResultMalformed,
}

/// How the fake delivers its Running and Finished pushes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PushMode {
    /// Each update is pushed once, in order.
    #[default]
    Deliver,
    /// Nothing is pushed (lost pushes: the engine must poll).
    Drop,
    /// Each update is pushed twice, with the same message id and sequence.
    Duplicate,
    /// The Finished update is pushed before the Running one (Running is held back until the
    /// work has finished).
    Reorder,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::SchemaValidator;

    #[test]
    fn empty_script_is_valid_and_succeeds_at_once() {
        SchemaValidator::of::<FakeScript>()
            .validate("payload", &json!({}))
            .unwrap();
        let s: FakeScript = serde_json::from_value(json!({})).unwrap();
        assert_eq!(s, FakeScript::default());
        assert_eq!(
            Outcome::from(s.outcome),
            Outcome::Succeeded { data: Value::Null }
        );
    }

    #[test]
    fn schema_and_serde_agree_on_the_abnormal_outcome() {
        let v = json!({"outcome": {"outcome": "abnormal", "kind": "timed_out", "reason": "r"}});
        SchemaValidator::of::<FakeScript>()
            .validate("payload", &v)
            .unwrap();
        let s: FakeScript = serde_json::from_value(v).unwrap();
        assert_eq!(
            Outcome::from(s.outcome),
            Outcome::abnormal(AbnormalKind::TimedOut, "r")
        );
        let bad = json!({"outcome": {"outcome": "abnormal", "kind": "faild"}});
        let e = SchemaValidator::of::<FakeScript>()
            .validate("payload", &bad)
            .unwrap_err();
        // The pointer is `/outcome` rather than `/outcome/kind` for now: the schema validator
        // reads an enum miss on a tagged variant's field as a tag miss.
        assert!(
            e.violations
                .iter()
                .any(|v| v.pointer.starts_with("/outcome")),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_a_suggestion() {
        let e = SchemaValidator::of::<FakeScript>()
            .validate("payload", &json!({"run_for": 5}))
            .unwrap_err();
        assert_eq!(e.violations[0].pointer, "/run_for");
        assert_eq!(e.violations[0].suggestion.as_deref(), Some("run_for_ms"));
        let e = SchemaValidator::of::<FakeConfig>()
            .validate("config", &json!({"bakend": "x"}))
            .unwrap_err();
        assert_eq!(e.violations[0].suggestion.as_deref(), Some("backend"));
    }
}
