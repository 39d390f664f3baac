//! The `nats` kind's config and payload types, and the names derived from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use distributor_core::Secret;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

/// Config of one `nats` distributor instance: which broker, which stream, and how deliveries
/// behave. Workers (the [`worker`](crate::worker) SDK) MUST be given the same `stream` and
/// `subject_prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, e.g. `["nats://127.0.0.1:4222"]`; the client connects to one and fails over
    /// to the others (and reconnects without limit).
    #[schemars(length(min = 1))]
    pub servers: Vec<String>,
    /// How the client authenticates. Default: none.
    #[serde(default)]
    pub credentials: Credentials,
    /// Name of the WorkQueue stream holding the work (created if missing). The results bucket
    /// is the KV bucket `<stream>_EXEC`. Letters, digits, `_` and `-`. Default `DIST_JOBS`.
    #[serde(default = "default_stream")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub stream: String,
    /// First token(s) of every subject: work goes to `<subject_prefix>.jobs.<task_type>`.
    /// Default `dist`.
    #[serde(default = "default_prefix")]
    #[schemars(
        length(min = 1),
        regex(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    )]
    pub subject_prefix: String,
    /// How long a worker holds a delivery without a sign of life before the broker redelivers
    /// it to another worker (the lease), in milliseconds. Workers report progress at a third of
    /// it. Default 30000.
    #[serde(default = "default_ack_wait_ms")]
    #[schemars(range(min = 100))]
    pub ack_wait_ms: u64,
    /// How many times a piece of work is delivered at most. When the last delivery's lease
    /// lapses, the execution ends `Crashed` and its message is removed. Default 3.
    #[serde(default = "default_max_deliver")]
    #[schemars(range(min = 1))]
    pub max_deliver: u32,
    /// How many deliveries may be unacknowledged at once across all workers of one task type:
    /// the pool-wide concurrency cap. Default 1000.
    #[serde(default = "default_max_ack_pending")]
    #[schemars(range(min = 1))]
    pub max_ack_pending: u32,
    /// How long the broker remembers a request id to drop a repeated publish, in milliseconds
    /// (`duplicate_window` of the stream). Outside it a repeated publish is stored, and the
    /// workers' activation keeps it from running twice. Default 600000 (10 minutes).
    #[serde(default = "default_duplicate_window_ms")]
    #[schemars(range(min = 1000))]
    pub duplicate_window_ms: u64,
    /// How long execution records (results, cancel requests) are kept in the bucket, in
    /// milliseconds; 0 keeps them forever. Default 604800000 (7 days).
    #[serde(default = "default_record_max_age_ms")]
    pub record_max_age_ms: u64,
    /// Task types known in advance, each with optional settings. Their consumers are created
    /// when the instance is built (others when their first task is run), so workers can bind
    /// at once. An empty map accepts every task type.
    #[serde(default)]
    pub task_types: BTreeMap<String, TaskTypeConfig>,
    /// Refuse payloads whose task type is not in `task_types`. Default false.
    #[serde(default)]
    pub only_listed_task_types: bool,
    /// Base URL of a page about executions (for `info_url`: `<base>?request_id=<id>`).
    /// Default: none.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub info_base_url: Option<Url>,
    /// How often the engine polls `status` as the hedge for lost pushes, in milliseconds.
    /// Default 5000.
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 10))]
    pub poll_interval_ms: u64,
}

/// How the client authenticates to the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credentials {
    /// No authentication.
    #[default]
    None,
    /// A server token (`authorization { token: … }`).
    Token {
        /// The token: a [`Secret`] (`"…"`, `{"env": NAME}` or `{"file": PATH}`), redacted from
        /// execution snapshots.
        token: Secret,
    },
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password: a [`Secret`], redacted from execution snapshots.
        password: Secret,
    },
    /// An nkey seed file (a file holding one `SU…` seed).
    NkeyFile {
        /// Path of the seed file.
        path: PathBuf,
    },
}

/// Settings of one task type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskTypeConfig {
    /// The subject its work is published on; it MUST lie under `<subject_prefix>.jobs.`.
    /// Default `<subject_prefix>.jobs.<task_type>`.
    #[serde(default)]
    pub subject: Option<String>,
}

fn default_stream() -> String {
    "DIST_JOBS".into()
}
fn default_prefix() -> String {
    "dist".into()
}
fn default_ack_wait_ms() -> u64 {
    30_000
}
fn default_max_deliver() -> u32 {
    3
}
fn default_max_ack_pending() -> u32 {
    1000
}
fn default_duplicate_window_ms() -> u64 {
    600_000
}
fn default_record_max_age_ms() -> u64 {
    7 * 24 * 3600 * 1000
}
fn default_poll_interval_ms() -> u64 {
    5000
}

/// A task for the `nats` kind: what a worker receives.
///
/// `input` is free-form: it is handed to the worker unchanged and its meaning is up to the
/// handler for `task_type` (the example worker's `noop` returns nothing, `sleep` reads
/// `{"ms": 100}`, `echo` returns the input, `fail` fails permanently).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsPayload {
    /// The kind of work: one subject token (letters, digits, `_`, `-`). Only workers that
    /// serve this task type receive it.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub task_type: String,
    /// Input for the worker's handler (any JSON). Default `null`.
    #[serde(default)]
    pub input: Value,
}

/// Whether `s` is a non-empty run of letters, digits, `_` and `-` (a subject token, a stream,
/// consumer or bucket name).
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The names one stream and prefix use, shared by the adapter and the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The work queue stream.
    pub stream: String,
    /// The subject prefix.
    pub prefix: String,
}

impl Layout {
    /// The layout of `stream` and `prefix`.
    pub fn new(stream: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            prefix: prefix.into(),
        }
    }
    /// The stream's subjects: `<prefix>.jobs.>`.
    pub fn stream_subjects(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }
    /// The default subject of a task type: `<prefix>.jobs.<task_type>`.
    pub fn default_subject(&self, task_type: &str) -> String {
        format!("{}.jobs.{task_type}", self.prefix)
    }
    /// The durable consumer of a task type (shared by every worker serving it).
    pub fn consumer(&self, task_type: &str) -> String {
        format!("w-{task_type}")
    }
    /// The KV bucket of execution records and cancel requests.
    pub fn bucket(&self) -> String {
        format!("{}_EXEC", self.stream)
    }
    /// The subject of the broker's MaxDeliver advisories for this stream's consumers.
    pub fn max_deliveries_advisory(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            self.stream
        )
    }
}

/// The KV key part of a request id: the id itself when it is made of letters, digits, `_` and
/// `-` (request ids are UUIDs), else `x` and its hex.
pub(crate) fn request_key(request_id: &str) -> String {
    if is_name(request_id) {
        request_id.to_owned()
    } else {
        format!("x{}", hex::encode(request_id))
    }
}

/// The key of a request's execution record.
pub(crate) fn record_key(request_id: &str) -> String {
    format!("exec.{}", request_key(request_id))
}

/// The key of a request's cancel request.
pub(crate) fn cancel_key(request_id: &str) -> String {
    format!("cancel.{}", request_key(request_id))
}
