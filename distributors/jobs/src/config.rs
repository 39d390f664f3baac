//! The `jobs` kind's config and payload types.

use std::path::PathBuf;

use distributor_core::Secret;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

/// Config of one `jobs` distributor instance: where the Jobs API listens, who may call it, and
/// how leases behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Socket address the Jobs API binds, e.g. `127.0.0.1:8089` or `0.0.0.0:8089`.
    pub listen: String,
    /// The workers allowed to call the API. Each presents its token as `Authorization: Bearer
    /// <token>`; the name identifies it on the status page and owns the jobs it claims. Give
    /// every worker process its own entry.
    pub workers: Vec<WorkerCredential>,
    /// SQLite file holding the queue state (created if missing; WAL mode). The queue, claims and
    /// results survive an orchestrator restart through it.
    pub database: PathBuf,
    /// How long a claim is valid without a heartbeat, in milliseconds. A worker heartbeats at a
    /// third of it. Default 30000.
    #[serde(default = "default_lease_ms")]
    #[schemars(range(min = 10))]
    pub lease_ms: u64,
    /// How many times a job is offered again after its first offer, when its lease lapses or
    /// its worker reports a transient error. Past it the execution ends `Crashed` (lease lapsed)
    /// or `Failed` (transient error). Default 3.
    #[serde(default = "default_max_reoffers")]
    pub max_reoffers: u32,
    /// Longest time a claim waits for work before answering "no job", in milliseconds (the
    /// long-poll cap; a worker may ask for less). Default 30000.
    #[serde(default = "default_long_poll_ms")]
    pub long_poll_ms: u64,
    /// Base URL people use to reach this server (for `info_url` links to the status page).
    /// Default `http://<listen>/`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub public_url: Option<Url>,
}

/// One worker allowed to call the Jobs API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerCredential {
    /// The worker's name, shown on the status page; unique within the config.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Its bearer token, a [`Secret`]: `{"env": NAME}`, `{"file": PATH}` or, for tests, the
    /// token itself (redacted from execution snapshots). Read when the server is built; unique
    /// within the config.
    pub token: Secret,
}

fn default_lease_ms() -> u64 {
    30_000
}
fn default_max_reoffers() -> u32 {
    3
}
fn default_long_poll_ms() -> u64 {
    30_000
}

/// A task for the `jobs` kind: what a worker claims.
///
/// `input` is free-form: it is handed to the worker unchanged and its meaning is up to the
/// handler registered for `task_type` (the example worker's `shell` task reads
/// `{"command": "..."}`, `sleep` reads `{"ms": 100}`, `echo` returns the input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobsPayload {
    /// The kind of work; only workers that declare this task type claim it.
    #[schemars(length(min = 1))]
    pub task_type: String,
    /// Input for the worker's handler (any JSON). Default `null`.
    #[serde(default)]
    pub input: Value,
    /// Higher runs first; equal priorities run in submission order. Default 0.
    #[serde(default)]
    pub priority: i32,
}
