//! slurmrestd `openapi/v0.0.38` (Slurm 21.08, 22.05): request and response mapping.
//!
//! Quirks of this version, all checked against a live 22.05.8 slurmrestd (the replies are
//! recorded in `tests/fixtures/v0038_*.json`):
//! - `job.environment` is required and is an object (`{"K": "V"}`).
//! - `exit_code` is the raw wait status (`exit 3` is 768; a cancelled job shows 15).
//! - Errors carry their Slurm number as `error_number` in GET/DELETE replies but as
//!   `error_code` in submit replies.
//! - An unknown job id is HTTP 500 with error 2017.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{Reply, RestApi};
use crate::config::ApiVersion;
use crate::error::SlurmError;
use crate::job::{JobId, JobInfo, JobSpec, JobState, WaitStatus};

/// The v0.0.38 mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct V0038;

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    error_number: Option<i64>,
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

impl From<WireError> for SlurmError {
    fn from(e: WireError) -> Self {
        let message = match (e.error, e.description) {
            (Some(err), Some(d)) if !d.is_empty() => format!("{err}: {d}"),
            (Some(err), _) => err,
            (None, Some(d)) => d,
            (None, None) => "unspecified error".to_owned(),
        };
        SlurmError {
            number: e.error_number.or(e.error_code),
            message,
        }
    }
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<WireError>,
}

#[derive(Deserialize)]
struct SubmitReply {
    #[serde(default)]
    errors: Vec<WireError>,
    #[serde(default)]
    job_id: Option<u64>,
}

#[derive(Deserialize)]
struct JobsReply {
    #[serde(default)]
    errors: Vec<WireError>,
    #[serde(default)]
    jobs: Vec<WireJob>,
}

#[derive(Deserialize)]
struct WireJob {
    job_id: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    user_name: Option<String>,
    job_state: String,
    #[serde(default)]
    state_reason: Option<String>,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    start_time: Option<i64>,
    #[serde(default)]
    end_time: Option<i64>,
    #[serde(default)]
    nodes: Option<String>,
    #[serde(default)]
    standard_output: Option<String>,
}

impl From<WireJob> for JobInfo {
    fn from(j: WireJob) -> Self {
        let reason = j.state_reason.unwrap_or_default();
        JobInfo {
            job_id: JobId(j.job_id),
            name: j.name.unwrap_or_default(),
            comment: j.comment.unwrap_or_default(),
            user_name: j.user_name.unwrap_or_default(),
            state: JobState::parse(&j.job_state),
            reason: if reason == "None" {
                String::new()
            } else {
                reason
            },
            exit: j
                .exit_code
                .and_then(|c| u32::try_from(c).ok())
                .map(WaitStatus),
            start_time: j.start_time.unwrap_or(0),
            end_time: j.end_time.unwrap_or(0),
            nodes: j.nodes.unwrap_or_default(),
            standard_output: j.standard_output.unwrap_or_default(),
        }
    }
}

fn put<T: Into<Value>>(m: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        m.insert(key.to_owned(), v.into());
    }
}

impl RestApi for V0038 {
    fn version(&self) -> ApiVersion {
        ApiVersion::V0038
    }

    fn submit_body(&self, spec: &JobSpec) -> Value {
        let mut job = Map::new();
        job.insert("name".into(), spec.name.clone().into());
        job.insert("comment".into(), spec.comment.clone().into());
        job.insert("environment".into(), json!(spec.environment));
        put(&mut job, "partition", spec.partition.clone());
        put(&mut job, "cpus_per_task", spec.cpus_per_task);
        put(&mut job, "memory_per_node", spec.memory_per_node_mb);
        put(&mut job, "time_limit", spec.time_limit_minutes);
        put(
            &mut job,
            "current_working_directory",
            spec.working_directory.clone(),
        );
        put(&mut job, "standard_output", spec.stdout.clone());
        put(&mut job, "standard_error", spec.stderr.clone());
        let o = &spec.options;
        put(&mut job, "account", o.account.clone());
        put(&mut job, "qos", o.qos.clone());
        put(&mut job, "reservation", o.reservation.clone());
        put(&mut job, "constraints", o.constraint.clone());
        // v0.0.38 takes `nodes` as [min, max].
        put(&mut job, "nodes", o.nodes.map(|n| json!([n, n])));
        put(&mut job, "tasks", o.tasks);
        put(&mut job, "tasks_per_node", o.tasks_per_node);
        put(&mut job, "memory_per_cpu", o.memory_per_cpu_mb);
        put(&mut job, "gres", o.gres.clone());
        // `exclusive` is a string in v0.0.38 ("user", "mcs" or anything else for exclusive).
        if o.exclusive == Some(true) {
            job.insert("exclusive".into(), "true".into());
        }
        put(&mut job, "requeue", o.requeue);
        put(&mut job, "nice", o.nice);
        json!({ "script": spec.script, "job": job })
    }

    fn parse_submit(&self, body: &[u8]) -> Result<Reply<Option<JobId>>, serde_json::Error> {
        let r: SubmitReply = serde_json::from_slice(body)?;
        Ok(Reply {
            errors: r.errors.into_iter().map(Into::into).collect(),
            value: r.job_id.map(JobId),
        })
    }

    fn parse_jobs(&self, body: &[u8]) -> Result<Reply<Vec<JobInfo>>, serde_json::Error> {
        let r: JobsReply = serde_json::from_slice(body)?;
        Ok(Reply {
            errors: r.errors.into_iter().map(Into::into).collect(),
            value: r.jobs.into_iter().map(Into::into).collect(),
        })
    }

    fn parse_errors(&self, body: &[u8]) -> Result<Vec<SlurmError>, serde_json::Error> {
        let r: Errors = serde_json::from_slice(body)?;
        Ok(r.errors.into_iter().map(Into::into).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use distributor_core::{AbnormalKind, Outcome, Status};

    use super::*;
    use crate::config::SbatchOptions;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn one_job(name: &str) -> JobInfo {
        let r = V0038.parse_jobs(&fixture(name)).expect("parses");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.value.len(), 1);
        r.value.into_iter().next().expect("one job")
    }

    fn abnormal(s: Status) -> (AbnormalKind, String) {
        match s {
            Status::Finished(Outcome::Abnormal { kind, reason }) => (kind, reason),
            other => panic!("not abnormal: {other:?}"),
        }
    }

    #[test]
    fn submit_body_has_the_v0038_shape() {
        let spec = JobSpec {
            script: "#!/bin/sh\ntrue\n".into(),
            name: "n".into(),
            comment: "distributor:request_id=r".into(),
            partition: Some("debug".into()),
            cpus_per_task: Some(2),
            memory_per_node_mb: Some(100),
            time_limit_minutes: Some(5),
            environment: BTreeMap::from([("PATH".to_string(), "/bin".to_string())]),
            working_directory: Some("/tmp".into()),
            stdout: Some("/tmp/o-%j".into()),
            stderr: None,
            options: SbatchOptions {
                nodes: Some(1),
                exclusive: Some(true),
                requeue: Some(false),
                ..SbatchOptions::default()
            },
        };
        assert_eq!(
            V0038.submit_body(&spec),
            json!({
                "script": "#!/bin/sh\ntrue\n",
                "job": {
                    "name": "n", "comment": "distributor:request_id=r",
                    "environment": {"PATH": "/bin"}, "partition": "debug",
                    "cpus_per_task": 2, "memory_per_node": 100, "time_limit": 5,
                    "current_working_directory": "/tmp", "standard_output": "/tmp/o-%j",
                    "nodes": [1, 1], "exclusive": "true", "requeue": false
                }
            })
        );
    }

    #[test]
    fn submit_reply_gives_the_job_id() {
        let r = V0038
            .parse_submit(&fixture("v0038_submit_ok.json"))
            .expect("parses");
        assert!(r.errors.is_empty());
        assert!(r.value.is_some());
    }

    #[test]
    fn submit_errors_read_error_code() {
        let r = V0038
            .parse_submit(&fixture("v0038_submit_no_environment_400.json"))
            .expect("parses");
        assert_eq!(r.value, None);
        assert_eq!(r.errors[0].number, Some(2127));
        assert_eq!(r.errors[0].message, "environment must be set");
        let e = V0038
            .parse_errors(&fixture("v0038_submit_bad_partition.json"))
            .expect("parses");
        assert_eq!(e[0].number, Some(2000));
    }

    #[test]
    fn completed_job_succeeds_with_its_data() {
        let j = one_job("v0038_job_completed.json");
        assert_eq!(j.state, JobState::Completed);
        assert_eq!(j.reason, "");
        match j.to_status() {
            Status::Finished(Outcome::Succeeded { data }) => {
                assert_eq!(data["exit_code"], 0);
                assert_eq!(data["job_id"], j.job_id.0);
                assert_eq!(data["nodes"], "vm");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_3_is_failed_with_code_3() {
        let (kind, reason) = abnormal(one_job("v0038_job_failed_exit3.json").to_status());
        assert_eq!(kind, AbnormalKind::Failed);
        assert!(reason.contains("exit code 3"), "{reason}");
        assert!(reason.contains("NonZeroExitCode"), "{reason}");
    }

    #[test]
    fn killed_batch_shell_is_failed_with_its_signal() {
        let (kind, reason) = abnormal(one_job("v0038_job_failed_signal9.json").to_status());
        assert_eq!(kind, AbnormalKind::Failed);
        assert!(reason.contains("killed by signal 9"), "{reason}");
    }

    #[test]
    fn cancelled_timeout_running_pending() {
        let (kind, _) = abnormal(one_job("v0038_job_cancelled.json").to_status());
        assert_eq!(kind, AbnormalKind::Cancelled);
        let (kind, reason) = abnormal(one_job("v0038_job_timeout.json").to_status());
        assert_eq!(kind, AbnormalKind::TimedOut);
        assert!(reason.contains("TimeLimit"), "{reason}");
        assert_eq!(
            one_job("v0038_job_running.json").to_status(),
            Status::Running
        );
        let held = one_job("v0038_job_pending_held.json");
        assert_eq!(held.to_status(), Status::Pending);
        assert_eq!(held.reason, "JobHeldUser");
    }

    #[test]
    fn job_list_carries_comments_and_users() {
        let r = V0038
            .parse_jobs(&fixture("v0038_jobs.json"))
            .expect("parses");
        assert!(r.value.len() >= 5);
        assert!(r.value.iter().all(|j| j.user_name == "distributor"));
        assert!(
            r.value
                .iter()
                .any(|j| j.comment.starts_with("distributor:"))
        );
    }

    #[test]
    fn unknown_job_and_unreachable_controller_are_errors() {
        let r = V0038
            .parse_jobs(&fixture("v0038_job_unknown_500.json"))
            .expect("parses");
        assert!(r.value.is_empty());
        assert_eq!(r.errors[0].number, Some(2017));
        let r = V0038
            .parse_jobs(&fixture("v0038_job_controller_down_500.json"))
            .expect("parses");
        assert_eq!(r.errors[0].number, Some(-1));
        let e = V0038
            .parse_errors(&fixture("v0038_submit_controller_down_500.json"))
            .expect("parses");
        assert_eq!(e[0].number, Some(1800));
    }

    #[test]
    fn delete_replies() {
        assert!(
            V0038
                .parse_errors(&fixture("v0038_delete_finished.json"))
                .expect("parses")
                .is_empty()
        );
        let e = V0038
            .parse_errors(&fixture("v0038_delete_unknown.json"))
            .expect("parses");
        assert_eq!(e[0].number, Some(2017));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(V0038.parse_jobs(b"Unable find requested URL").is_err());
        assert!(V0038.parse_jobs(br#"{"jobs":[{"job_id":"x"}]}"#).is_err());
    }
}
