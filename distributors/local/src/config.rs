//! The `local` kind's config and payload types (serde + schemars; the JSON Schemas are derived
//! from these, so every field's doc comment is also its schema description).

use std::collections::BTreeMap;
use std::path::PathBuf;

use distributor_core::{ValidationError, Violation};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use url::Url;

/// Config of a `local` distributor instance.
///
/// Every field has a default, so `{}` is a valid config: state under `.distributor/local`, as
/// many parallel processes as the machine has CPUs, 10 s of grace between SIGTERM and SIGKILL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Directory holding one sub-directory per execution (spec, pid, exit status, logs). A
    /// relative path is resolved against the orchestrator's working directory when the instance
    /// is built. Created if missing. Instances may share a directory: each follows the work
    /// it started, and work whose orchestrator process has died is adopted by the next instance
    /// built on the directory (or asked to `recover` it).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How many processes this instance runs at once. Further work waits, reported `Pending`,
    /// and starts in submission order as slots free up. Defaults to the number of CPUs.
    #[serde(default = "default_max_parallel")]
    #[schemars(range(min = 1))]
    pub max_parallel: u32,
    /// Milliseconds between SIGTERM and SIGKILL when stopping work (cancel or time limit).
    #[serde(default = "default_grace_period_ms")]
    pub grace_period_ms: u64,
    /// Base URL of the orchestrator's web UI. When set, `info_url` is
    /// `{info_base_url}/executions/{execution id}/log`; otherwise it is the `file://` URL of the
    /// execution's stdout log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_base_url: Option<Url>,
    /// How many trailing lines of stdout and of stderr a finished execution reports in its result
    /// data (`stdout_tail`, `stderr_tail`) and in failure reasons.
    #[serde(default = "default_tail_lines")]
    pub tail_lines: u32,
    /// Milliseconds the engine should wait between status polls. Pushes are the main path; polls
    /// are the hedge for lost ones.
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 1))]
    pub poll_interval_ms: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            max_parallel: default_max_parallel(),
            grace_period_ms: default_grace_period_ms(),
            info_base_url: None,
            tail_lines: default_tail_lines(),
            poll_interval_ms: default_poll_interval_ms(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".distributor/local")
}

fn default_max_parallel() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

fn default_grace_period_ms() -> u64 {
    10_000
}

fn default_tail_lines() -> u32 {
    10
}

fn default_poll_interval_ms() -> u64 {
    1_000
}

/// What one `local` task runs: a program with arguments (`argv`), or a shell `script`. Exactly
/// one of the two MUST be given.
///
/// ```json
/// {"argv": ["python3", "train.py", "--epochs", "3"], "env": {"SEED": "1"}, "time_limit_ms": 60000}
/// {"script": "make -j2 && ./run-tests | tee report.txt", "cwd": "/srv/build"}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalPayload {
    /// The program and its arguments, executed directly (no shell). `argv[0]` is looked up in
    /// `PATH` when it contains no `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub argv: Option<Vec<String>>,
    /// A script run by `/bin/sh -c`. Use it only when you need the shell (pipes, `&&`, globs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Environment variables set for the process, on top of the orchestrator's environment (or
    /// of an empty one with `clear_env`). The process also gets `DISTRIBUTOR_EXECUTION_ID`,
    /// `DISTRIBUTOR_TASK_ID`, `DISTRIBUTOR_ATTEMPT`, `DISTRIBUTOR_REQUEST_ID` and
    /// `DISTRIBUTOR_STATE_DIR` (its directory under the state directory), which `env` may
    /// override.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Start from an empty environment instead of the orchestrator's (only `env` is set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear_env: bool,
    /// Working directory of the process; defaults to the orchestrator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Data written to the process's standard input (which is otherwise `/dev/null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// The work's own time limit in milliseconds, counted from its start. Past it the process
    /// group gets SIGTERM, then SIGKILL after the grace period, and the execution ends
    /// `TimedOut`. Independent of the engine's run timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub time_limit_ms: Option<u64>,
}

impl LocalPayload {
    /// A payload running `argv` directly.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: Some(argv.into_iter().map(Into::into).collect()),
            ..Self::script_or_argv_empty()
        }
    }

    /// A payload running `script` with `/bin/sh -c`.
    pub fn script(script: impl Into<String>) -> Self {
        Self {
            script: Some(script.into()),
            ..Self::script_or_argv_empty()
        }
    }

    fn script_or_argv_empty() -> Self {
        Self {
            argv: None,
            script: None,
            env: BTreeMap::new(),
            clear_env: false,
            cwd: None,
            stdin: None,
            time_limit_ms: None,
        }
    }

    /// The argv to execute: `argv`, or `["/bin/sh", "-c", script]`.
    pub(crate) fn command_line(&self) -> Vec<String> {
        match (&self.argv, &self.script) {
            (Some(argv), _) => argv.clone(),
            (None, Some(script)) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
            (None, None) => Vec::new(),
        }
    }

    /// Checks what the schema cannot express: exactly one of `argv`/`script`, no NUL bytes (they
    /// cannot be passed to `execve`), environment names without `=`.
    pub(crate) fn check(&self) -> Result<(), ValidationError> {
        let mut violations = Vec::new();
        let mut bad = |pointer: String, expected: &str, message: String| {
            violations.push(Violation {
                pointer,
                expected: expected.to_owned(),
                message,
                suggestion: None,
            });
        };
        match (&self.argv, &self.script) {
            (None, None) => bad(
                "/argv".into(),
                "a value (`argv` or `script` is required)",
                "missing required field `argv` (or `script`)".into(),
            ),
            (Some(_), Some(_)) => bad(
                "/script".into(),
                "no `script` when `argv` is given",
                "`argv` and `script` are mutually exclusive".into(),
            ),
            _ => {}
        }
        if let Some(argv) = &self.argv {
            if argv.is_empty() {
                bad(
                    "/argv".into(),
                    "a non-empty array",
                    "expected at least one element (the program)".into(),
                );
            }
            for (i, a) in argv.iter().enumerate() {
                if a.contains('\0') {
                    bad(
                        format!("/argv/{i}"),
                        "a string without NUL bytes",
                        "contains a NUL byte".into(),
                    );
                }
            }
            if argv.first().is_some_and(String::is_empty) {
                bad(
                    "/argv/0".into(),
                    "a program name",
                    "the program name is empty".into(),
                );
            }
        }
        if self.script.as_deref().is_some_and(|s| s.contains('\0')) {
            bad(
                "/script".into(),
                "a string without NUL bytes",
                "contains a NUL byte".into(),
            );
        }
        for (k, v) in &self.env {
            let p = format!("/env/{}", k.replace('~', "~0").replace('/', "~1"));
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                bad(
                    p,
                    "a variable name without `=` or NUL",
                    format!("invalid environment variable name `{k}`"),
                );
            } else if v.contains('\0') {
                bad(
                    p,
                    "a string without NUL bytes",
                    "contains a NUL byte".into(),
                );
            }
        }
        if self
            .cwd
            .as_ref()
            .is_some_and(|c| c.as_os_str().is_empty() || c.to_string_lossy().contains('\0'))
        {
            bad(
                "/cwd".into(),
                "a directory path",
                "invalid working directory".into(),
            );
        }
        if self.time_limit_ms == Some(0) {
            bad(
                "/time_limit_ms".into(),
                "an integer >= 1",
                "expected an integer >= 1, found 0".into(),
            );
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                subject: "payload for kind `local`".into(),
                violations,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointers(p: &LocalPayload) -> Vec<String> {
        p.check()
            .err()
            .map(|e| e.violations.into_iter().map(|v| v.pointer).collect())
            .unwrap_or_default()
    }

    #[test]
    fn argv_or_script_exactly_one() {
        assert!(LocalPayload::argv(["true"]).check().is_ok());
        assert!(LocalPayload::script("true | true").check().is_ok());
        let mut both = LocalPayload::argv(["true"]);
        both.script = Some("x".into());
        assert_eq!(pointers(&both), ["/script"]);
        let neither: LocalPayload = serde_json::from_str("{}").unwrap();
        assert_eq!(pointers(&neither), ["/argv"]);
    }

    #[test]
    fn nul_bytes_and_bad_env_names_are_named() {
        let mut p = LocalPayload::argv(["echo", "a\0b"]);
        p.env.insert("A=B".into(), "x".into());
        assert_eq!(pointers(&p), ["/argv/1", "/env/A=B"]);
    }

    #[test]
    fn script_becomes_sh_c() {
        assert_eq!(
            LocalPayload::script("echo hi").command_line(),
            ["/bin/sh", "-c", "echo hi"]
        );
    }

    #[test]
    fn empty_config_gets_defaults() {
        let c: LocalConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.state_dir, PathBuf::from(".distributor/local"));
        assert!(c.max_parallel >= 1);
        assert_eq!(c.grace_period_ms, 10_000);
    }
}
