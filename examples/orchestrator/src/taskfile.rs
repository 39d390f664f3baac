//! Task files: the tasks `orchestrator run` submits, in TOML (`[[task]]` tables) or JSON (a list
//! of tasks, or `{"task": [...]}`).
//!
//! ```toml
//! [[task]]
//! name = "hello"                      # unique in the file; shown in progress and summary
//! distributor = "local"               # default "local"
//! payload = { argv = ["echo", "hi"] } # checked against the kind's payload schema
//! timeouts = { run = "10s" }          # start / run / stop, durations with a unit
//! retries = 2                         # new attempts after a retryable abnormal end
//! retry_delay = "1s"
//! labels = { team = "ml" }
//! cancel_after = "3s"                 # the runner cancels the task after this long
//! expect = "cancelled"                # the outcome that counts as right (default "succeeded")
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use distributor_core::{AbnormalKind, Engine, Error, RetryPolicy, State, Task, Timeouts};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::duration::HumanDuration;

/// A parsed task file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    /// The tasks, in file order.
    #[serde(default)]
    pub task: Vec<TaskSpec>,
}

/// One task of a task file (also the body of `POST /v1/executions`, without `name`,
/// `cancel_after` and `expect`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Unique name in the file.
    pub name: String,
    /// The distributor instance (or alias) to run on.
    #[serde(default = "default_distributor")]
    pub distributor: String,
    /// The kind-specific payload.
    pub payload: Value,
    /// Phase time limits.
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    /// New attempts allowed after a retryable abnormal end (failed, crashed, expired,
    /// timed out).
    #[serde(default)]
    pub retries: u32,
    /// Delay before each new attempt.
    #[serde(default)]
    pub retry_delay: Option<HumanDuration>,
    /// Labels attached to every execution of the task.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The runner cancels the task this long after submitting it.
    #[serde(default)]
    pub cancel_after: Option<HumanDuration>,
    /// The terminal state that counts as right; `orchestrator run` exits non-zero when any task
    /// ends otherwise.
    #[serde(default)]
    pub expect: Expect,
}

fn default_distributor() -> String {
    "local".into()
}

/// Per-phase time limits, each a duration with a unit.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// Until the work is seen running (else it ends `expired`).
    #[serde(default)]
    pub start: Option<HumanDuration>,
    /// Until the running work finishes (else it is stopped and ends `timed_out`).
    #[serde(default)]
    pub run: Option<HumanDuration>,
    /// How long stopping may take.
    #[serde(default)]
    pub stop: Option<HumanDuration>,
}

impl From<TimeoutsSpec> for Timeouts {
    fn from(t: TimeoutsSpec) -> Self {
        Timeouts {
            start: t.start.map(|d| d.0),
            run: t.run.map(|d| d.0),
            stop: t.stop.map(|d| d.0),
        }
    }
}

/// The terminal state a task is expected to reach: `succeeded` or an abnormal kind
/// (`failed`, `timed_out`, `cancelled`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expect(pub Option<AbnormalKind>);

impl Expect {
    /// Whether `state` is what was expected.
    pub fn matches(self, state: State) -> bool {
        match self.0 {
            None => state == State::Succeeded,
            Some(k) => state == State::Abnormal(k),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.map_or("succeeded", AbnormalKind::as_str))
    }
}

impl Serialize for Expect {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "succeeded" {
            return Ok(Self(None));
        }
        AbnormalKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .map(|k| Self(Some(k)))
            .ok_or_else(|| {
                let names: Vec<_> = std::iter::once("succeeded")
                    .chain(AbnormalKind::ALL.iter().map(|k| k.as_str()))
                    .collect();
                serde::de::Error::custom(format!(
                    "unknown outcome `{s}`; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

impl TaskSpec {
    /// The engine task: the spec's distributor, payload, timeouts and retry policy, with the
    /// label `task` set to the task's name unless the spec sets it.
    pub fn to_task(&self) -> Task {
        let mut task = Task::new(self.distributor.as_str(), self.payload.clone());
        task.timeouts = self.timeouts.into();
        task.retry = RetryPolicy {
            max_attempts: self.retries.saturating_add(1),
            delay: self.retry_delay.map(|d| d.0),
            ..RetryPolicy::default()
        };
        task.labels = self.labels.clone();
        task.labels
            .entry("task".into())
            .or_insert_with(|| self.name.clone());
        task
    }
}

/// A task file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TaskFileError {
    /// The file.
    pub source_name: String,
    /// Each problem: where (`task "x"` plus a JSON Pointer, or a line) and what.
    pub problems: Vec<String>,
}

impl fmt::Display for TaskFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// A TOML error's text with its message part humanized (the line and caret stay).
fn humanize_toml(text: &str) -> String {
    text.trim_end()
        .lines()
        .map(|l| {
            if l.starts_with("unknown field") || l.starts_with("invalid") {
                humanize(l)
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn json_problem(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    format!(
        "at {} ({}): {}",
        e.path(),
        pointer_of(&e.path().to_string()),
        humanize(&e.inner().to_string())
    )
}

impl TaskFile {
    /// Reads and parses `path`: JSON when it ends in `.json`, TOML otherwise.
    ///
    /// Errors: unreadable file, syntax errors and unknown or mistyped fields (with the line, or
    /// the path of the field).
    pub fn load(path: &Path) -> Result<Self, TaskFileError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TaskFileError {
            source_name: name.clone(),
            problems: vec![format!("cannot read: {e}")],
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json(&name, &text)
        } else {
            Self::from_toml(&name, &text)
        }
    }

    /// Parses TOML (`[[task]]` tables).
    ///
    /// Errors: syntax errors and unknown or mistyped fields, with line and column.
    pub fn from_toml(source_name: &str, text: &str) -> Result<Self, TaskFileError> {
        toml::from_str(text).map_err(|e: toml::de::Error| TaskFileError {
            source_name: source_name.into(),
            problems: vec![humanize_toml(&e.to_string())],
        })
    }

    /// Parses JSON: a list of tasks, or an object with a `task` list.
    ///
    /// Errors: syntax errors and unknown or mistyped fields, with the field's path.
    pub fn from_json(source_name: &str, text: &str) -> Result<Self, TaskFileError> {
        let err = |e: String| TaskFileError {
            source_name: source_name.into(),
            problems: vec![e],
        };
        let mut de = serde_json::Deserializer::from_str(text);
        if text.trim_start().starts_with('[') {
            let task: Vec<TaskSpec> =
                serde_path_to_error::deserialize(&mut de).map_err(|e| err(json_problem(&e)))?;
            Ok(Self { task })
        } else {
            serde_path_to_error::deserialize(&mut de).map_err(|e| err(json_problem(&e)))
        }
    }

    /// Checks what parsing cannot: at least one task, unique non-empty names, distributors the
    /// engine knows, payloads valid for their kind. Reports every problem at once.
    ///
    /// Errors: the list of problems, each naming the task and the JSON Pointer of the field.
    pub fn check(&self, source_name: &str, engine: &Engine) -> Result<(), TaskFileError> {
        let mut problems = Vec::new();
        if self.task.is_empty() {
            problems.push("no tasks: add a [[task]] table (TOML) or a list of tasks (JSON)".into());
        }
        let mut seen = BTreeSet::new();
        for (i, t) in self.task.iter().enumerate() {
            let at = format!("task #{} \"{}\"", i + 1, t.name);
            if t.name.trim().is_empty() {
                problems.push(format!("task #{}: /name: must not be empty", i + 1));
            } else if !seen.insert(t.name.as_str()) {
                problems.push(format!("{at}: /name: duplicate task name"));
            }
            match engine.instance(&t.distributor) {
                Err(e @ Error::UnknownDistributor { .. }) => {
                    problems.push(format!("{at}: /distributor: {e}"));
                }
                Err(e) => problems.push(format!("{at}: {e}")),
                Ok(instance) => {
                    if let Err(v) = instance.validate(&t.payload) {
                        problems.extend(v.violations.iter().map(|v| {
                            let hint = v
                                .suggestion
                                .as_ref()
                                .map(|s| format!(" (did you mean `{s}`?)"))
                                .unwrap_or_default();
                            format!("{at}: /payload{}: {}{hint}", v.pointer, v.message)
                        }));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TaskFileError {
                source_name: source_name.into(),
                problems,
            })
        }
    }
}

/// A `serde_path_to_error` path (`task[0].timeouts.run`, `.` for the root) as a JSON Pointer
/// (`/task/0/timeouts/run`, `""` for the root), with `~` and `/` escaped.
pub fn pointer_of(path: &str) -> String {
    let mut pointer = String::new();
    if path == "." || path.is_empty() {
        return pointer;
    }
    for seg in path.split('.') {
        // Sequence indices are written `[3]`.
        for part in seg.split('[') {
            let part = part.trim_end_matches(']');
            if !part.is_empty() {
                pointer.push('/');
                pointer.push_str(&part.replace('~', "~0").replace('/', "~1"));
            }
        }
    }
    pointer
}

/// A serde message made readable for people who write JSON or TOML, not Rust: type names
/// become JSON words (`struct SubmitRequest with 6 elements` → `an object`, `u32` → `a
/// non-negative integer`, `sequence` → `array`), and an unknown field gets the nearest known
/// one (`payloda` → did you mean `payload`?).
pub fn humanize(msg: &str) -> String {
    let mut out = msg.to_owned();
    // "expected struct X with N elements", "expected struct X", "expected enum X"
    for kw in ["struct ", "enum ", "tuple struct ", "unit struct "] {
        while let Some(i) = out.find(&format!("expected {kw}")) {
            let start = i + "expected ".len();
            let after_kw = start + kw.len();
            let ident_end = out[after_kw..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(out.len(), |j| after_kw + j);
            let mut end = ident_end;
            if let Some(rest) = out[ident_end..].strip_prefix(" with ") {
                let n = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let tail = &rest[n..];
                for word in [" elements", " element"] {
                    if let Some(t) = tail.strip_prefix(word) {
                        end = out.len() - t.len();
                        break;
                    }
                }
            }
            let word = if kw == "enum " {
                "one of the accepted values"
            } else {
                "an object"
            };
            out.replace_range(start..end, word);
        }
    }
    for (from, to) in [
        ("expected a map", "expected an object"),
        ("expected a sequence", "expected an array"),
        ("invalid type: map", "invalid type: object"),
        ("invalid type: sequence", "invalid type: array"),
        ("expected u8", "expected a non-negative integer"),
        ("expected u16", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a string", "expected a string"),
    ] {
        out = out.replace(from, to);
    }
    if let Some(rest) = out.strip_prefix("data did not match any variant of untagged enum ") {
        let _ = rest;
        out = "the value matches none of the accepted forms".into();
    }
    // "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`"
    if let Some(rest) = out.strip_prefix("unknown field `")
        && let Some((field, tail)) = rest.split_once('`')
    {
        let known: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let field = field.to_owned();
        // Fewest edits first (`retry` → `retries`, not `retry_delay`), then Jaro-Winkler.
        let prefix = known
            .iter()
            .map(|k| (strsim::levenshtein(&field, k), *k))
            .filter(|(d, _)| *d <= (field.len() / 2).max(3) && *d < field.len())
            .min_by_key(|(d, _)| *d)
            .map(|(_, k)| k.to_owned());
        let hint = prefix
            .or_else(|| distributor_core::nearest(&field, known.iter().copied()))
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        let list = known
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out = if list.is_empty() {
            format!("unknown field `{field}`{hint}")
        } else {
            format!("unknown field `{field}`{hint}; expected one of {list}")
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_json_types_and_suggest_fields() {
        assert_eq!(
            humanize("invalid type: sequence, expected struct PlainPush with 5 elements"),
            "invalid type: array, expected an object"
        );
        assert_eq!(
            humanize("invalid value: integer `-1`, expected u32"),
            "invalid value: integer `-1`, expected a non-negative integer"
        );
        let m = humanize(
            "unknown field `payloda`, expected one of `distributor`, `payload`, `retries`",
        );
        assert!(m.contains("did you mean `payload`?"), "{m}");
        let m =
            humanize("unknown field `retry`, expected one of `payload`, `retries`, `retry_delay`");
        assert!(m.contains("did you mean `retries`?"), "{m}");
        assert_eq!(pointer_of("."), "");
        assert_eq!(pointer_of("task[0].timeouts.run"), "/task/0/timeouts/run");
        assert_eq!(pointer_of("labels.a/b"), "/labels/a~1b");
    }

    #[test]
    fn toml_and_json_parse_to_the_same_tasks() {
        let toml = r#"
            [[task]]
            name = "t"
            payload = { argv = ["true"] }
            timeouts = { run = "2s" }
            retries = 1
            expect = "timed_out"
        "#;
        let json = r#"[{"name": "t", "payload": {"argv": ["true"]}, "timeouts": {"run": "2s"},
                       "retries": 1, "expect": "timed_out"}]"#;
        let a = TaskFile::from_toml("a", toml).unwrap();
        let b = TaskFile::from_json("b", json).unwrap();
        assert_eq!(a, b);
        let t = &a.task[0];
        assert_eq!(t.distributor, "local");
        assert_eq!(t.expect, Expect(Some(AbnormalKind::TimedOut)));
        let task = t.to_task();
        assert_eq!(task.retry.max_attempts, 2);
        assert_eq!(task.timeouts.run, Some(std::time::Duration::from_secs(2)));
        assert_eq!(task.labels["task"], "t");
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let e = TaskFile::from_toml("f", "[[task]]\nname = \"x\"\npayload = {}\nretires = 2\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `retires`"), "{e}");
        let e = TaskFile::from_json(
            "f",
            r#"[{"name": "x", "payload": {}, "timeouts": {"run": 5}}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("at [0].timeouts.run"), "{e}");
        let e = TaskFile::from_json(
            "f",
            r#"{"task": [{"name": "x", "payload": {}, "expect": "ok"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown outcome `ok`"), "{e}");
    }
}
