//! The `swarming` kind's config and payload types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use distributor_core::reexports::async_trait;
use distributor_core::{BuildContext, Distributor, KindConfig, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::backend::SwarmingDistributor;

/// Config of one `swarming` distributor instance: which server, as whom, in which pool, and
/// where its Pub/Sub pushes come back.
///
/// ```json
/// { "url": "https://chromium-swarm.appspot.com", "token": { "command": ["luci-auth", "token"] },
///   "pool": "ci", "dimensions": { "os": "Linux" }, "realm": "project:ci",
///   "pubsub_topic": "projects/my-project/topics/swarming-updates",
///   "push_listen": "0.0.0.0:8095" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwarmingConfig {
    /// Base URL of the Swarming server (`https://<instance>.appspot.com`); the pRPC endpoints
    /// are under `<url>/prpc/`. `http` and `https` are both accepted by the schema, but this
    /// build's HTTP client has no TLS backend: only `http` URLs (a local proxy, the test fake)
    /// can be reached; an `https` URL fails every call with a permanent transport error.
    #[schemars(with = "String", extend("format" = "uri"))]
    pub url: Url,
    /// Where the OAuth2 bearer token comes from (sent as `Authorization: Bearer`).
    pub token: TokenSource,
    /// The `pool` dimension of every task (Swarming requires exactly one).
    #[schemars(length(min = 1))]
    pub pool: String,
    /// Dimensions every task gets, under the payload's own (`os`, `cpu`…). `pool` is not allowed
    /// here: it is the `pool` field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// Priority used when the payload gives none: 1..255, lower runs first. Default 100.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 1, max = 255))]
    pub priority: u8,
    /// How long a task may stay PENDING, in seconds, when the payload gives none: 30..604800.
    /// Past it the task ends EXPIRED. Default 3600.
    #[serde(default = "default_expiration_secs")]
    #[schemars(range(min = 30, max = 604_800))]
    pub expiration_secs: u32,
    /// Hard run limit in seconds when the payload gives none: 30..604800 (Swarming requires one).
    /// Past it the task ends TIMED_OUT. Default 3600.
    #[serde(default = "default_execution_timeout_secs")]
    #[schemars(range(min = 30, max = 604_800))]
    pub execution_timeout_secs: u32,
    /// The task realm (`<project>:<realm>`), required by servers that enforce realms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
    /// The service account tasks run as (`none`, `bot` or an email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Tags every task gets (`key:value`), besides the adapter's own
    /// (`distributor_execution_id`, `distributor_attempt`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The Pub/Sub topic Swarming publishes task updates to (`projects/<p>/topics/<t>`). When
    /// set (or when the task's notification route names a topic of that form), every task
    /// carries it with the execution's auth token and a userdata naming the execution, and the
    /// instance declares push notifications. The topic's push subscription must reach
    /// `push_listen` (or an endpoint of the embedder that calls
    /// [`decode_push`](crate::decode_push) and hands the result to the engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pubsub_topic: Option<String>,
    /// Socket address of the adapter's own Pub/Sub push endpoint (`POST` any path, Google's push
    /// JSON), e.g. `0.0.0.0:8095`; pushes go to the engine's notifier, which authenticates them.
    /// Without it, pushes must be delivered by the embedder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_listen: Option<String>,
    /// Template of the link shown to people; `{task_id}` and `{url}` (the base URL without a
    /// trailing slash) are substituted. Default `{url}/task?id={task_id}` (Swarming's UI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_url: Option<String>,
    /// How often the engine should poll a task, in seconds (a hint for instances without
    /// push; with push, the engine's hedge interval applies). Default 10.
    #[serde(default = "default_poll_interval_secs")]
    #[schemars(range(min = 1))]
    pub poll_interval_secs: u64,
    /// Timeout of each HTTP request, in seconds. Default 30.
    #[serde(default = "default_request_timeout_secs")]
    #[schemars(range(min = 1))]
    pub request_timeout_secs: u64,
}

fn default_priority() -> u8 {
    100
}
fn default_expiration_secs() -> u32 {
    3600
}
fn default_execution_timeout_secs() -> u32 {
    3600
}
fn default_poll_interval_secs() -> u64 {
    10
}
fn default_request_timeout_secs() -> u64 {
    30
}

/// Where the OAuth2 access token comes from. Exactly one key. No cloud SDK is linked: a
/// command such as `luci-auth token` or `gcloud auth print-access-token` supplies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TokenSource {
    /// A file holding the token (surrounding whitespace ignored). Re-read when the server
    /// answers `UNAUTHENTICATED`, so another process can rotate it.
    File(PathBuf),
    /// A command whose standard output is the token, e.g. `["luci-auth", "token"]`. Run at
    /// start, again after `refresh_secs`, and when the server answers `UNAUTHENTICATED`.
    Command {
        /// The program and its arguments (no shell).
        #[schemars(length(min = 1))]
        argv: Vec<String>,
        /// How long a token is used before the command is run again, in seconds. Default 300
        /// (OAuth2 access tokens live an hour).
        #[serde(default = "default_refresh_secs")]
        #[schemars(range(min = 1))]
        refresh_secs: u64,
    },
}

fn default_refresh_secs() -> u64 {
    300
}

#[async_trait]
impl KindConfig for SwarmingConfig {
    const KIND: &'static str = "swarming";
    type Payload = SwarmingPayload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(SwarmingDistributor::new(self, ctx).await?))
    }
}

/// A task for Swarming: one task slice (`task_slices[0]`) run by a bot of the instance's pool.
///
/// ```json
/// { "command": ["python3", "run_tests.py", "--shard", "3"],
///   "dimensions": { "os": "Ubuntu-22.04", "gpu": "none" },
///   "env": { "SHARD": "3" }, "execution_timeout_secs": 1800, "tags": ["suite:unit"] }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwarmingPayload {
    /// The command the bot runs (no shell): 1..128 arguments.
    #[schemars(length(min = 1, max = 128))]
    pub command: Vec<String>,
    /// Task name shown in Swarming; defaults to `distributor-<execution id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Dimensions the bot must have, over the instance's `dimensions` (`pool` not allowed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// Environment variables of the process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_cwd: Option<String>,
    /// Hard run limit in seconds (30..604800); defaults to the instance's. Past it: TimedOut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 604_800))]
    pub execution_timeout_secs: Option<u32>,
    /// Longest silence on stdout/stderr in seconds (0 = none, else 30..604800). Past it:
    /// TimedOut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 604_800))]
    pub io_timeout_secs: Option<u32>,
    /// Seconds between SIGTERM and SIGKILL when the task is stopped (0..3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3600))]
    pub grace_period_secs: Option<u32>,
    /// How long the task may stay PENDING, in seconds (30..604800); defaults to the instance's.
    /// Past it: Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 604_800))]
    pub expiration_secs: Option<u32>,
    /// Priority 1..255 (lower first); defaults to the instance's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub priority: Option<u8>,
    /// Keep the task PENDING when no bot currently has the dimensions, instead of ending it at
    /// once (NO_RESOURCE, reported Expired). Default false.
    #[serde(default)]
    pub wait_for_capacity: bool,
    /// Tags (`key:value`) besides the instance's and the adapter's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Paths in the run directory the bot archives to CAS when the task ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
}
