//! Version-neutral job model: what we submit ([`JobSpec`]), what we read back ([`JobInfo`]),
//! and how a Slurm job state becomes a [`Status`].

use std::collections::BTreeMap;
use std::fmt;

use distributor_core::{AbnormalKind, Outcome, RequestId, Status};
use serde_json::json;

use crate::config::SbatchOptions;

/// A Slurm job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl JobId {
    /// Parses a token; `None` for anything that is not a plain job id.
    pub(crate) fn parse(token: &str) -> Option<Self> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        token.parse().ok().map(Self)
    }
}

/// The job comment that marks a job as started for one request id. `run` looks for it before
/// submitting, `status` checks it so a reused job id is not mistaken for ours.
pub(crate) fn request_marker(request_id: &RequestId) -> String {
    format!("distributor:request_id={request_id}")
}

/// Everything a job submission carries, independent of the API version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JobSpec {
    pub script: String,
    pub name: String,
    pub comment: String,
    pub partition: Option<String>,
    pub cpus_per_task: Option<u32>,
    pub memory_per_node_mb: Option<u64>,
    pub time_limit_minutes: Option<u32>,
    pub environment: BTreeMap<String, String>,
    pub working_directory: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub options: SbatchOptions,
}

/// A Slurm job state (the base state, or the flag state Slurm reports in its place, such as
/// `COMPLETING`). `Other` keeps names this adapter does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobState {
    Pending,
    Running,
    Suspended,
    Completed,
    Cancelled,
    Failed,
    Timeout,
    NodeFail,
    Preempted,
    BootFail,
    Deadline,
    OutOfMemory,
    Completing,
    Configuring,
    Resizing,
    Requeued,
    RequeueFed,
    RequeueHold,
    SpecialExit,
    Stopped,
    Revoked,
    ResvDelHold,
    Signaling,
    StageOut,
    Other(String),
}

impl JobState {
    /// Parses Slurm's state name (`job_state_string()`), case-insensitively.
    pub(crate) fn parse(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "PENDING" => Self::Pending,
            "RUNNING" => Self::Running,
            "SUSPENDED" => Self::Suspended,
            "COMPLETED" => Self::Completed,
            "CANCELLED" => Self::Cancelled,
            "FAILED" => Self::Failed,
            "TIMEOUT" => Self::Timeout,
            "NODE_FAIL" => Self::NodeFail,
            "PREEMPTED" => Self::Preempted,
            "BOOT_FAIL" => Self::BootFail,
            "DEADLINE" => Self::Deadline,
            "OUT_OF_MEMORY" => Self::OutOfMemory,
            "COMPLETING" => Self::Completing,
            "CONFIGURING" => Self::Configuring,
            "RESIZING" => Self::Resizing,
            "REQUEUED" => Self::Requeued,
            "REQUEUE_FED" => Self::RequeueFed,
            "REQUEUE_HOLD" => Self::RequeueHold,
            "SPECIAL_EXIT" => Self::SpecialExit,
            "STOPPED" => Self::Stopped,
            "REVOKED" => Self::Revoked,
            "RESV_DEL_HOLD" => Self::ResvDelHold,
            "SIGNALING" => Self::Signaling,
            "STAGE_OUT" => Self::StageOut,
            _ => Self::Other(s.to_owned()),
        }
    }

    /// Slurm's name of the state.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Suspended => "SUSPENDED",
            Self::Completed => "COMPLETED",
            Self::Cancelled => "CANCELLED",
            Self::Failed => "FAILED",
            Self::Timeout => "TIMEOUT",
            Self::NodeFail => "NODE_FAIL",
            Self::Preempted => "PREEMPTED",
            Self::BootFail => "BOOT_FAIL",
            Self::Deadline => "DEADLINE",
            Self::OutOfMemory => "OUT_OF_MEMORY",
            Self::Completing => "COMPLETING",
            Self::Configuring => "CONFIGURING",
            Self::Resizing => "RESIZING",
            Self::Requeued => "REQUEUED",
            Self::RequeueFed => "REQUEUE_FED",
            Self::RequeueHold => "REQUEUE_HOLD",
            Self::SpecialExit => "SPECIAL_EXIT",
            Self::Stopped => "STOPPED",
            Self::Revoked => "REVOKED",
            Self::ResvDelHold => "RESV_DEL_HOLD",
            Self::Signaling => "SIGNALING",
            Self::StageOut => "STAGE_OUT",
            Self::Other(s) => s,
        }
    }
}

/// A raw wait status as Slurm stores it in `exit_code` (`exit 3` is 768, SIGTERM is 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaitStatus(pub u32);

/// A decoded [`WaitStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Termination {
    /// The process exited with this code.
    Exited(u8),
    /// The process was killed by this signal.
    Signaled { signal: u8, core_dumped: bool },
}

impl WaitStatus {
    /// Decodes it as POSIX `WIFEXITED`/`WEXITSTATUS`/`WTERMSIG` do.
    pub(crate) fn decode(self) -> Termination {
        let low = (self.0 & 0x7f) as u8;
        if low == 0 {
            Termination::Exited(((self.0 >> 8) & 0xff) as u8)
        } else {
            Termination::Signaled {
                signal: low,
                core_dumped: self.0 & 0x80 != 0,
            }
        }
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exit code {code}"),
            Self::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {signal}")?;
                if *core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// What we read back about one job, independent of the API version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobInfo {
    pub job_id: JobId,
    pub name: String,
    pub comment: String,
    pub user_name: String,
    pub state: JobState,
    /// Slurm's `state_reason` (`None` is mapped to the empty string).
    pub reason: String,
    pub exit: Option<WaitStatus>,
    /// Epoch seconds; 0 until set.
    pub start_time: i64,
    pub end_time: i64,
    pub nodes: String,
    pub standard_output: String,
}

impl JobInfo {
    /// Maps the job to a [`Status`]. Every Slurm state is covered:
    ///
    /// | Slurm state | status |
    /// |---|---|
    /// | PENDING, CONFIGURING, REQUEUED, REQUEUE_FED, REQUEUE_HOLD, RESV_DEL_HOLD, SPECIAL_EXIT | Pending |
    /// | RUNNING, COMPLETING, SIGNALING, STAGE_OUT, SUSPENDED, STOPPED, RESIZING | Running |
    /// | COMPLETED | Succeeded (exit 0) |
    /// | FAILED, OUT_OF_MEMORY | Failed (exit code or signal in the reason) |
    /// | CANCELLED | Cancelled |
    /// | TIMEOUT | TimedOut |
    /// | DEADLINE | Expired if it never started, else TimedOut |
    /// | NODE_FAIL, BOOT_FAIL, PREEMPTED | Crashed |
    /// | REVOKED (federation: ran on a sibling cluster) | Missing |
    /// | anything else | Running (not terminal: timeouts still apply) |
    ///
    /// COMPLETING stays Running because the job's processes may not have stopped yet.
    pub(crate) fn to_status(&self) -> Status {
        use JobState as S;
        let abnormal =
            |kind: AbnormalKind| Status::Finished(Outcome::abnormal(kind, self.reason_text()));
        match &self.state {
            S::Pending
            | S::Configuring
            | S::Requeued
            | S::RequeueFed
            | S::RequeueHold
            | S::ResvDelHold
            | S::SpecialExit => Status::Pending,
            S::Running
            | S::Completing
            | S::Signaling
            | S::StageOut
            | S::Suspended
            | S::Stopped
            | S::Resizing => Status::Running,
            S::Completed => Status::Finished(Outcome::Succeeded {
                data: self.result_data(),
            }),
            S::Failed | S::OutOfMemory => abnormal(AbnormalKind::Failed),
            S::Cancelled => abnormal(AbnormalKind::Cancelled),
            S::Timeout => abnormal(AbnormalKind::TimedOut),
            S::Deadline if self.start_time == 0 => abnormal(AbnormalKind::Expired),
            S::Deadline => abnormal(AbnormalKind::TimedOut),
            S::NodeFail | S::BootFail | S::Preempted => abnormal(AbnormalKind::Crashed),
            S::Revoked => abnormal(AbnormalKind::Missing),
            S::Other(name) => {
                tracing::warn!(job_id = %self.job_id, state = %name, "unknown slurm job state; treated as running");
                Status::Running
            }
        }
    }

    /// The human-readable reason of an abnormal end: state, decoded exit, Slurm's reason.
    pub(crate) fn reason_text(&self) -> String {
        let mut s = format!("slurm job {} {}", self.job_id, self.state.as_str());
        if let Some(w) = self.exit {
            s.push_str(&format!(", {}", w.decode()));
        }
        if !self.reason.is_empty() {
            s.push_str(&format!(", reason {}", self.reason));
        }
        s
    }

    /// The result of a COMPLETED job.
    fn result_data(&self) -> serde_json::Value {
        let exit_code = match self.exit.map(WaitStatus::decode) {
            Some(Termination::Exited(c)) => c,
            _ => 0,
        };
        json!({
            "job_id": self.job_id.0,
            "exit_code": exit_code,
            "nodes": self.nodes,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "standard_output": self.standard_output,
        })
    }
}

/// Quotes `s` for a POSIX shell (single quotes, `'` as `'\''`).
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script that runs `argv`.
pub(crate) fn argv_script(argv: &[String]) -> String {
    let words: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    format!("#!/bin/sh\nexec {}\n", words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, exit: u32, start_time: i64) -> JobInfo {
        JobInfo {
            job_id: JobId(7),
            name: "n".into(),
            comment: String::new(),
            user_name: "ci".into(),
            state: JobState::parse(state),
            reason: "SomeReason".into(),
            exit: Some(WaitStatus(exit)),
            start_time,
            end_time: 0,
            nodes: "vm".into(),
            standard_output: String::new(),
        }
    }

    fn kind(s: &Status) -> Option<AbnormalKind> {
        s.outcome().and_then(Outcome::abnormal_kind)
    }

    #[test]
    fn wait_status_decodes_exit_codes_and_signals() {
        assert_eq!(WaitStatus(0).decode(), Termination::Exited(0));
        assert_eq!(WaitStatus(768).decode(), Termination::Exited(3));
        assert_eq!(WaitStatus(255 << 8).decode(), Termination::Exited(255));
        assert_eq!(
            WaitStatus(15).decode(),
            Termination::Signaled {
                signal: 15,
                core_dumped: false
            }
        );
        assert_eq!(
            WaitStatus(0x80 | 11).decode(),
            Termination::Signaled {
                signal: 11,
                core_dumped: true
            }
        );
        assert_eq!(
            WaitStatus(0x80 | 11).decode().to_string(),
            "killed by signal 11 (core dumped)"
        );
    }

    #[test]
    fn every_state_maps() {
        let pending = [
            "PENDING",
            "CONFIGURING",
            "REQUEUED",
            "REQUEUE_FED",
            "REQUEUE_HOLD",
            "RESV_DEL_HOLD",
            "SPECIAL_EXIT",
        ];
        for s in pending {
            assert_eq!(job(s, 0, 0).to_status(), Status::Pending, "{s}");
        }
        let running = [
            "RUNNING",
            "COMPLETING",
            "SIGNALING",
            "STAGE_OUT",
            "SUSPENDED",
            "STOPPED",
            "RESIZING",
            "SOMETHING_NEW",
        ];
        for s in running {
            assert_eq!(job(s, 0, 1).to_status(), Status::Running, "{s}");
        }
        let finished = [
            ("FAILED", AbnormalKind::Failed),
            ("OUT_OF_MEMORY", AbnormalKind::Failed),
            ("CANCELLED", AbnormalKind::Cancelled),
            ("TIMEOUT", AbnormalKind::TimedOut),
            ("NODE_FAIL", AbnormalKind::Crashed),
            ("BOOT_FAIL", AbnormalKind::Crashed),
            ("PREEMPTED", AbnormalKind::Crashed),
            ("REVOKED", AbnormalKind::Missing),
        ];
        for (s, k) in finished {
            assert_eq!(kind(&job(s, 0, 1).to_status()), Some(k), "{s}");
        }
        assert_eq!(
            kind(&job("DEADLINE", 0, 0).to_status()),
            Some(AbnormalKind::Expired)
        );
        assert_eq!(
            kind(&job("DEADLINE", 0, 5).to_status()),
            Some(AbnormalKind::TimedOut)
        );
        assert!(
            job("COMPLETED", 0, 1)
                .to_status()
                .outcome()
                .is_some_and(Outcome::is_success)
        );
        // Slurm's names round-trip.
        for s in pending.iter().chain(&running[..7]) {
            assert_eq!(JobState::parse(s).as_str(), *s);
        }
    }

    #[test]
    fn failure_reason_carries_exit_code_signal_and_slurm_reason() {
        let Status::Finished(Outcome::Abnormal { reason, .. }) = job("FAILED", 768, 1).to_status()
        else {
            panic!("not abnormal")
        };
        assert_eq!(reason, "slurm job 7 FAILED, exit code 3, reason SomeReason");
        let Status::Finished(Outcome::Abnormal { reason, .. }) =
            job("CANCELLED", 15, 1).to_status()
        else {
            panic!("not abnormal")
        };
        assert!(reason.contains("killed by signal 15"), "{reason}");
    }

    #[test]
    fn job_ids_parse_strictly() {
        assert_eq!(JobId::parse("42"), Some(JobId(42)));
        for bad in ["", "-1", "4 2", "abc", "1_2", "99999999999999999999999"] {
            assert_eq!(JobId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn argv_becomes_a_quoted_exec() {
        let argv = [
            "echo".to_string(),
            "it's a $test".into(),
            "plain-word".into(),
        ];
        assert_eq!(
            argv_script(&argv),
            "#!/bin/sh\nexec echo 'it'\\''s a $test' plain-word\n"
        );
        assert_eq!(shell_quote(""), "''");
    }
}
