//! The HTTP API's request and response bodies (shared by the server and the client commands).

use std::collections::BTreeMap;

use distributor_core::engine::HistoryEntry;
use distributor_core::{
    Engine, ExecutionRecord, Outcome, RetryPolicy, State, Task, Timestamp, Violation,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::HumanDuration;
use crate::taskfile::{TaskSpec, TimeoutsSpec};

/// Body of `POST /v1/executions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The distributor instance (or alias).
    pub distributor: String,
    /// The kind-specific payload.
    pub payload: Value,
    /// Phase time limits, durations with a unit (`"30s"`).
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    /// New attempts allowed after a retryable abnormal end.
    #[serde(default)]
    pub retries: u32,
    /// Delay before each new attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<HumanDuration>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// An idempotency key (also accepted as the `Idempotency-Key` header): a resubmission with
    /// the same key creates nothing and answers the first submission's id (200 instead of 201).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl SubmitRequest {
    /// The engine task.
    pub fn to_task(&self) -> Task {
        let mut t = Task::new(self.distributor.as_str(), self.payload.clone());
        t.timeouts = self.timeouts.into();
        t.retry = RetryPolicy {
            max_attempts: self.retries.saturating_add(1),
            delay: self.retry_delay.map(|d| d.0),
            ..RetryPolicy::default()
        };
        t.labels = self.labels.clone();
        t
    }
}

impl From<&TaskSpec> for SubmitRequest {
    fn from(t: &TaskSpec) -> Self {
        let mut labels = t.labels.clone();
        labels
            .entry("task".into())
            .or_insert_with(|| t.name.clone());
        Self {
            distributor: t.distributor.clone(),
            payload: t.payload.clone(),
            timeouts: t.timeouts,
            retries: t.retries,
            retry_delay: t.retry_delay,
            labels,
            request_id: None,
        }
    }
}

/// Answer to a submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Submitted {
    /// The first execution's id (also the task id).
    pub id: u64,
    /// Where to follow it.
    pub url: String,
}

/// What the API shows of one execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecutionView {
    /// The execution.
    pub id: u64,
    /// Its task (the first execution's id).
    pub task_id: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The distributor instance it runs on.
    pub distributor: String,
    /// Its kind.
    pub kind: String,
    /// Where it is (`running`, `succeeded`, `timed_out`…).
    #[serde(with = "state_str")]
    #[schemars(with = "String")]
    pub state: State,
    /// The outcome, once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Map<String, Value>>")]
    pub outcome: Option<Outcome>,
    /// The backend's token, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The payload.
    pub payload: Value,
    /// The next attempt, when this one was retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_by: Option<u64>,
    /// Where a person can look at the work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_url: Option<String>,
    /// Creation time, milliseconds since the epoch.
    #[schemars(with = "i64")]
    pub created_at: Timestamp,
    /// Last change, milliseconds since the epoch.
    #[schemars(with = "i64")]
    pub updated_at: Timestamp,
    /// Transitions, oldest first (only in single-execution answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<serde_json::Map<String, Value>>")]
    pub history: Vec<HistoryEntry>,
}

impl ExecutionView {
    /// The view of `r`, with its info URL from the engine's instance.
    pub fn of(engine: &Engine, r: &ExecutionRecord) -> Self {
        let info_url = r.token.as_ref().and_then(|_| {
            engine
                .instance(r.distributor.as_str())
                .ok()
                .and_then(|i| i.distributor().info_url(&r.execution()))
                .map(|u| u.to_string())
        });
        Self {
            id: r.id.0,
            task_id: r.task_id.0,
            attempt: r.attempt.0,
            distributor: r.distributor.to_string(),
            kind: r.kind.to_string(),
            state: r.state,
            outcome: r.outcome.clone(),
            token: r.token.as_ref().map(ToString::to_string),
            labels: r.task.labels.clone(),
            payload: r.task.payload.to_value(),
            retried_by: r.retried_by.map(|i| i.0),
            info_url,
            created_at: r.created_at,
            updated_at: r.updated_at,
            history: Vec::new(),
        }
    }
}

/// Every error answer: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// What went wrong, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code: `invalid_request` (400), `invalid_payload` and
    /// `unknown_distributor` (422), `not_found` (404), `method_not_allowed` (405),
    /// `request_timeout` (408), `payload_too_large` (413), `unsupported_media_type` (415),
    /// `unauthorized` (401), `forbidden`, `forbidden_host`, `cross_origin` (403),
    /// `unavailable` (503), `internal` (500).
    pub code: String,
    /// What went wrong, in words.
    pub message: String,
    /// The body field at fault, as a JSON Pointer (RFC 6901: `""` for the whole body, else
    /// starting with `/`), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The query or path parameter at fault (`state`, `id`), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// Every payload violation (for `invalid_payload`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<serde_json::Map<String, Value>>")]
    pub violations: Vec<Violation>,
}

/// `State` as its flat string (`"timed_out"`), as the list filter takes it.
mod state_str {
    use distributor_core::State;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &State, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.as_str())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<State, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
