//! The `slurm` kind's config and payload types.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use distributor_core::reexports::async_trait;
use distributor_core::{BuildContext, Distributor, Error, KindConfig, Result, Secret};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::backend::SlurmDistributor;

/// Config of one `slurm` distributor instance: where slurmrestd is and who to talk to it as.
///
/// ```json
/// { "url": "http://127.0.0.1:6820", "user": "ci", "token": { "env": "SLURM_JWT" },
///   "partition": "debug", "working_directory": "/srv/jobs" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// Base URL of slurmrestd, e.g. `http://127.0.0.1:6820` (without the `/slurm/v0.0.38` part).
    #[schemars(with = "String", extend("format" = "uri"))]
    pub url: Url,
    /// The Slurm user the JWT belongs to (sent as `X-SLURM-USER-NAME`). Jobs run as this user.
    /// MUST NOT be root: slurmrestd rejects root tokens.
    pub user: String,
    /// Where the JWT comes from (sent as `X-SLURM-USER-TOKEN`): a [`Secret`].
    pub token: Secret,
    /// The slurmrestd OpenAPI version to speak.
    #[serde(default)]
    pub api_version: ApiVersion,
    /// Partition used when the payload names none; `None` uses the cluster's default partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Working directory used when the payload names none. Jobs write `slurm-<id>.out` there
    /// unless the payload sets output paths, so the job's user MUST be able to write it. Without
    /// it (and without one in the payload) slurmrestd uses its own working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Environment every job gets, under the payload's own `environment`. When neither sets
    /// `PATH`, `PATH=/usr/local/bin:/usr/bin:/bin` is added (Slurm's REST API needs a non-empty
    /// environment).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Template of the link shown to people for a job; `{job_id}`, `{user}` and `{url}` (the
    /// base URL without a trailing slash) are substituted. Defaults to the REST job URL,
    /// `{url}/slurm/<api_version>/job/{job_id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_url: Option<String>,
    /// How often the engine should poll a job's status, in seconds (a hint). Default 5.
    #[serde(default = "default_poll_interval_secs")]
    #[schemars(range(min = 1))]
    pub poll_interval_secs: u64,
    /// Timeout of each HTTP request to slurmrestd, in seconds. Default 30.
    #[serde(default = "default_request_timeout_secs")]
    #[schemars(range(min = 1))]
    pub request_timeout_secs: u64,
}

fn default_poll_interval_secs() -> u64 {
    5
}

fn default_request_timeout_secs() -> u64 {
    30
}

/// Where the JWT for slurmrestd comes from: a [`Secret`] (`{"env": "SLURM_JWT"}`,
/// `{"file": "/run/secrets/slurm-jwt"}`, or the token itself for tests, which is redacted from
/// execution snapshots). A file is re-read when slurmrestd answers 401, so a token can be
/// rotated without a restart.
pub type TokenSource = Secret;

/// Reads the token from `source`: surrounding whitespace is ignored and a `SLURM_JWT=` prefix,
/// as printed by `scontrol token`, is stripped. Errors are permanent: the config cannot work as
/// it stands.
pub(crate) fn resolve_token(source: &Secret) -> Result<String> {
    let raw = source
        .resolve()
        .map_err(|e| Error::permanent(format!("slurm token: {e}")))?;
    let token = raw.trim();
    let token = token.strip_prefix("SLURM_JWT=").unwrap_or(token);
    if token.is_empty() {
        return Err(Error::permanent(format!(
            "slurm token: {} is empty",
            source.describe()
        )));
    }
    Ok(token.to_owned())
}

/// The slurmrestd OpenAPI version spoken. Each version's request and response mapping lives in
/// its own module, so a new one is added without touching the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    /// `openapi/v0.0.38`, served by Slurm 21.08 and 22.05 (Debian 12).
    #[default]
    #[serde(rename = "v0.0.38")]
    V0038,
}

impl ApiVersion {
    /// The version as it appears in URLs (`v0.0.38`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0038 => "v0.0.38",
        }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[async_trait]
impl KindConfig for SlurmConfig {
    const KIND: &'static str = "slurm";
    type Payload = SlurmPayload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(SlurmDistributor::new(self, ctx.name)?))
    }
}

/// A task for Slurm: one batch job. Give exactly one of `script` and `argv`.
///
/// ```json
/// { "argv": ["python3", "train.py", "--epochs", "3"], "cpus": 4, "memory_mb": 8192,
///   "time_limit_minutes": 120, "environment": { "SEED": "7" } }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmPayload {
    /// The batch script, starting with `#!` and an interpreter (as for `sbatch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// A command to run instead of a script: the adapter writes a `#!/bin/sh` script that
    /// `exec`s it, with every argument quoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub argv: Option<Vec<String>>,
    /// Job name (`--job-name`); defaults to `distributor-<execution id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Partition (`--partition`); defaults to the instance's `partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// CPUs per task (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cpus: Option<u32>,
    /// Memory per node in MiB (`--mem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_mb: Option<u64>,
    /// Wall-clock limit in minutes (`--time`; Slurm's granularity is one minute). Past it Slurm
    /// ends the job `TIMEOUT`, reported as `TimedOut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub time_limit_minutes: Option<u32>,
    /// Environment variables of the job, over the instance's `environment`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Working directory (`--chdir`); defaults to the instance's `working_directory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// Standard output path (`--output`, `%j` is the job id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Standard error path (`--error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Further `sbatch` options, typed.
    #[serde(default, skip_serializing_if = "SbatchOptions::is_empty")]
    pub options: SbatchOptions,
}

/// Further `sbatch` options. Every field is optional and maps to one `sbatch` flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SbatchOptions {
    /// `--account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// `--qos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// `--reservation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// `--constraint` (node features, e.g. `avx512&ib`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
    /// `--nodes` (node count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub nodes: Option<u32>,
    /// `--ntasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tasks: Option<u32>,
    /// `--ntasks-per-node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tasks_per_node: Option<u32>,
    /// `--mem-per-cpu` in MiB (instead of `memory_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_per_cpu_mb: Option<u64>,
    /// `--gres` (e.g. `gpu:2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gres: Option<String>,
    /// `--exclusive`: no other job shares the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,
    /// `--requeue` / `--no-requeue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeue: Option<bool>,
    /// `--nice` (positive lowers the priority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
}

impl SbatchOptions {
    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
