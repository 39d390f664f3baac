//! What travels over the broker: the work message and the execution record.

use distributor_core::Outcome;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One piece of work, as published on the work queue (JSON). `Nats-Msg-Id` is the request id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    /// The engine's idempotency key; the execution record is keyed by it.
    pub request_id: String,
    /// The execution (one attempt of a task).
    pub execution_id: u64,
    /// Its task.
    pub task_id: u64,
    /// Its attempt number.
    pub attempt: u32,
    /// The task type (the subject's last token by default).
    pub task_type: String,
    /// The handler's input.
    pub input: Value,
    /// The activation token: a worker activates with it before working; the first activation
    /// of a request wins.
    pub activation: String,
    /// The execution's push token, copied into the execution record so that the orchestrator
    /// can authenticate what the worker reports.
    pub auth_token: String,
    /// When it was published (ms since the Unix epoch, the orchestrator's clock).
    pub published_ms: i64,
    /// The work must have started by then (ms since the Unix epoch), if the task has a start
    /// timeout. A worker receiving it later does not start it (the execution ends `Expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_by_ms: Option<i64>,
    /// How long the work may run once started (ms), if the task has a run timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_timeout_ms: Option<u64>,
}

/// The execution record of one request (JSON, in the `<stream>_EXEC` bucket under
/// `exec.<request id>`). Every write is a compare-and-set on its revision, which is how the
/// first activation wins and a superseded worker's late result is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// The execution the record is about.
    pub execution_id: u64,
    /// The execution's push token.
    pub auth_token: String,
    /// Stream sequence of the message whose activation won.
    pub seq: u64,
    /// That message's activation token.
    pub activation: String,
    /// Where the work is.
    #[serde(flatten)]
    pub state: RecordState,
}

/// The state part of an [`ExecRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RecordState {
    /// A worker holds delivery `delivered` of the message and is working.
    Active {
        /// The worker's name.
        worker: String,
        /// The delivery number it holds (1 for the first delivery).
        delivered: u64,
        /// A random id of this activation (tells a worker its own write from another's).
        holder: String,
        /// Progress it reported last, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Value>,
    },
    /// The work ended; nothing changes the record any more.
    Finished {
        /// How it ended.
        outcome: Outcome,
        /// The worker that ended it (none when the orchestrator did: cancel before any worker
        /// took it, deliveries exhausted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<String>,
    },
}

impl ExecRecord {
    /// The record's status as the engine sees it.
    pub fn status(&self) -> distributor_core::Status {
        match &self.state {
            RecordState::Active { .. } => distributor_core::Status::Running,
            RecordState::Finished { outcome, .. } => {
                distributor_core::Status::Finished(outcome.clone())
            }
        }
    }
    /// Whether the work ended.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, RecordState::Finished { .. })
    }
}
