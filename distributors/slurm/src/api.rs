//! The seam between the adapter and one slurmrestd OpenAPI version.
//!
//! Paths are the same in every version this adapter knows (`/slurm/<version>/job/submit`,
//! `/jobs`, `/job/{id}`); bodies differ (v0.0.40 takes the environment as a list and reports
//! exit codes and states as objects). Each version implements [`RestApi`] in its own module;
//! [`for_version`] picks one.

use std::fmt::Debug;

use crate::config::ApiVersion;
use crate::error::SlurmError;
use crate::job::{JobId, JobInfo, JobSpec};

/// The `errors` of a reply, plus its typed content when it has one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply<T> {
    pub errors: Vec<SlurmError>,
    pub value: T,
}

/// One slurmrestd API version's request building and response parsing. Pure: no I/O.
pub(crate) trait RestApi: Send + Sync + Debug {
    /// The version.
    fn version(&self) -> ApiVersion;
    /// The JSON body of `POST /slurm/<v>/job/submit`.
    fn submit_body(&self, spec: &JobSpec) -> serde_json::Value;
    /// Parses a job submission reply; the job id is `None` when the reply carries none.
    fn parse_submit(&self, body: &[u8]) -> Result<Reply<Option<JobId>>, serde_json::Error>;
    /// Parses a `GET /jobs` or `GET /job/{id}` reply.
    fn parse_jobs(&self, body: &[u8]) -> Result<Reply<Vec<JobInfo>>, serde_json::Error>;
    /// Parses only the `errors` of any reply (the body of a failed request, a `DELETE` reply).
    fn parse_errors(&self, body: &[u8]) -> Result<Vec<SlurmError>, serde_json::Error>;
}

/// The implementation for `version`.
pub(crate) fn for_version(version: ApiVersion) -> Box<dyn RestApi> {
    match version {
        ApiVersion::V0038 => Box::new(crate::v0038::V0038),
    }
}
