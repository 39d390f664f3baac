//! The workflow file: parameters and steps, validated against a schema derived from these types.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use distributor_core::{SchemaValidator, ValidationError, Violation};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::WorkflowError;
use crate::template::{self, Reference};

/// A workflow definition, as written in a workflow file (TOML or JSON).
///
/// ```toml
/// name = "release"
/// [params.version]
/// default = "1.0.0"
///
/// [[steps]]
/// name = "build"
/// distributor = "local"
/// for_each = ["linux", "darwin"]
/// payload = { argv = ["echo", "{{ params.version }} {{ item }}"] }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// The workflow's name, shown in run lists.
    pub name: String,
    /// One line about what it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Parameters a run is started with, by name; `{{ params.<name> }}` in payloads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, ParamSpec>,
    /// The steps. Names are unique; order does not matter (`depends_on` does).
    pub steps: Vec<StepSpec>,
}

/// One parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// Used when the run gives no value; without a default the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// What it means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One step: a task on a distributor (optionally once per item of a list), or a manual approval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique name: letters, digits, `_` and `-`; `{{ steps.<name>.result }}` refers to its result.
    pub name: String,
    /// The distributor (instance or alias) the step's task runs on. Required unless `approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributor: Option<String>,
    /// The task's payload. Strings may contain `{{ params.x }}`, `{{ steps.s.result.field }}`,
    /// `{{ steps.s.state }}`, `{{ item }}`, `{{ run.id }}`; a string that is exactly one
    /// `{{ … }}` becomes the referenced JSON value (number, object…), otherwise text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Steps that must end before this one starts. Every step referenced in `payload` or
    /// `for_each` must be listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Fan-out: one task per item of this list (a JSON array, or one `{{ … }}` naming an array).
    /// The step succeeds when every item does; its result is the array of item results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<Value>,
    /// New attempts after a retryable failure (crashed, expired, missing…), per task.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    /// Time limits of the step's tasks.
    #[serde(default, skip_serializing_if = "TimeoutsSpec::is_empty")]
    pub timeouts: TimeoutsSpec,
    /// Makes this a manual approval step: it waits until a person approves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    /// What a failure of this step does to the run.
    #[serde(default, skip_serializing_if = "OnFailure::is_stop")]
    pub on_failure: OnFailure,
    /// Extra labels on the step's executions (the engine adds `workflow.*` labels itself).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A manual approval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// The question shown next to the Approve button.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

/// Time limits, as `"90s"`, `"15m"`, `"2h"`, `"500ms"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// From dispatch until the work runs (then the task ends `expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub start: Option<String>,
    /// From running until finished (then the task is cancelled and ends `timed_out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub run: Option<String>,
}

impl TimeoutsSpec {
    fn is_empty(&self) -> bool {
        self.start.is_none() && self.run.is_none()
    }
}

/// Parses `"90s"`-style durations (`ms`, `s`, `m`, `h`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// What a step's failure does to the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails: no step starts after it (steps already running finish), and the steps
    /// that depend on it are never run. A re-run of the step resumes the run.
    #[default]
    Stop,
    /// The failure is tolerated: dependents run (its `result` is `null`, its `state` says how
    /// it ended), and it does not fail the run.
    Continue,
}

impl OnFailure {
    fn is_stop(&self) -> bool {
        *self == Self::Stop
    }
}

impl WorkflowSpec {
    /// Reads a workflow file: JSON when the name ends `.json`, TOML otherwise.
    ///
    /// Errors: [`WorkflowError::Io`], [`WorkflowError::Parse`], and [`WorkflowError::Invalid`]
    /// with every problem and its JSON Pointer.
    pub fn load(path: &Path) -> Result<Self, WorkflowError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkflowError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let json = path.extension().is_some_and(|e| e == "json");
        Self::parse(&path.display().to_string(), &text, json)
    }

    /// Parses workflow text (`json` says which syntax) and checks it ([`from_value`](Self::from_value)).
    pub fn parse(source: &str, text: &str, json: bool) -> Result<Self, WorkflowError> {
        let doc: Value = if json {
            serde_json::from_str(text).map_err(|e| WorkflowError::Parse {
                source_name: source.to_owned(),
                message: e.to_string(),
            })?
        } else {
            let t: toml::Value = toml::from_str(text).map_err(|e| WorkflowError::Parse {
                source_name: source.to_owned(),
                message: e.to_string(),
            })?;
            serde_json::to_value(t).map_err(|e| WorkflowError::Parse {
                source_name: source.to_owned(),
                message: e.to_string(),
            })?
        };
        Self::from_value(source, &doc)
    }

    /// Checks a workflow document against the schema of [`WorkflowSpec`] and then its meaning
    /// (unique names, known dependencies, no cycles, references only to dependencies and
    /// declared parameters, durations), reporting every problem with its JSON Pointer.
    pub fn from_value(source: &str, doc: &Value) -> Result<Self, WorkflowError> {
        static SCHEMA: std::sync::OnceLock<SchemaValidator> = std::sync::OnceLock::new();
        let subject = format!("workflow {source}");
        SCHEMA
            .get_or_init(SchemaValidator::of::<WorkflowSpec>)
            .validate(&subject, doc)?;
        let spec: WorkflowSpec =
            serde_json::from_value(doc.clone()).map_err(|e| WorkflowError::Parse {
                source_name: source.to_owned(),
                message: e.to_string(),
            })?;
        let problems = spec.check();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(ValidationError {
                subject,
                violations: problems,
            }
            .into())
        }
    }

    /// The JSON Schema of workflow files.
    pub fn schema() -> Value {
        serde_json::to_value(schemars::schema_for!(WorkflowSpec)).unwrap_or(Value::Null)
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&StepSpec> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Step names in an order where every step comes after its dependencies.
    pub fn topological(&self) -> Vec<&str> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut order = Vec::with_capacity(self.steps.len());
        while order.len() < self.steps.len() {
            let before = order.len();
            for s in &self.steps {
                if !done.contains(s.name.as_str())
                    && s.depends_on.iter().all(|d| done.contains(d.as_str()))
                {
                    done.insert(&s.name);
                    order.push(s.name.as_str());
                }
            }
            if order.len() == before {
                break; // a cycle; `check` reports it
            }
        }
        order
    }

    /// The depth of each step (0 for steps without dependencies), for drawing the graph.
    pub fn levels(&self) -> BTreeMap<String, usize> {
        let mut lv: BTreeMap<String, usize> = BTreeMap::new();
        for name in self.topological() {
            let s = self.step(name).expect("topological names exist");
            let l = s
                .depends_on
                .iter()
                .filter_map(|d| lv.get(d))
                .map(|l| l + 1)
                .max()
                .unwrap_or(0);
            lv.insert(name.to_owned(), l);
        }
        lv
    }

    /// Every step that depends on `name`, directly or not.
    pub fn descendants(&self, name: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut frontier = vec![name.to_owned()];
        while let Some(n) = frontier.pop() {
            for s in &self.steps {
                if s.depends_on.contains(&n) && out.insert(s.name.clone()) {
                    frontier.push(s.name.clone());
                }
            }
        }
        out
    }

    fn check(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        let mut bad = |pointer: String, expected: &str, message: String| {
            v.push(Violation {
                pointer,
                expected: expected.to_owned(),
                message,
                suggestion: None,
            })
        };
        if self.steps.is_empty() {
            bad(
                "/steps".into(),
                "at least one step",
                "a workflow needs steps".into(),
            );
        }
        let names: BTreeSet<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        let mut seen = BTreeSet::new();
        for (i, s) in self.steps.iter().enumerate() {
            let at = |f: &str| format!("/steps/{i}{f}");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bad(
                    at("/name"),
                    "letters, digits, `_` and `-`",
                    format!("step name `{}` must be letters, digits, `_` or `-`", s.name),
                );
            }
            if !seen.insert(s.name.as_str()) {
                bad(
                    at("/name"),
                    "a unique name",
                    format!("duplicate step `{}`", s.name),
                );
            }
            match (&s.approval, &s.distributor) {
                (Some(_), Some(_)) => bad(
                    at("/distributor"),
                    "no distributor on an approval step",
                    "an approval step runs nothing: remove `distributor` or `approval`".into(),
                ),
                (Some(_), None) => {
                    for (f, set) in [
                        ("/payload", s.payload.is_some()),
                        ("/for_each", s.for_each.is_some()),
                    ] {
                        if set {
                            bad(
                                at(f),
                                "nothing",
                                format!("an approval step takes no `{}`", &f[1..]),
                            );
                        }
                    }
                }
                (None, None) => bad(
                    at("/distributor"),
                    "a distributor name",
                    format!("step `{}` needs `distributor` (or `approval`)", s.name),
                ),
                (None, Some(_)) => {}
            }
            for (j, d) in s.depends_on.iter().enumerate() {
                if !names.contains(d.as_str()) {
                    let message = match distributor_core::nearest(d, names.iter().copied()) {
                        Some(sug) => format!("unknown step `{d}`; did you mean `{sug}`?"),
                        None => format!("unknown step `{d}`"),
                    };
                    bad(at(&format!("/depends_on/{j}")), "a step name", message);
                } else if d == &s.name {
                    bad(
                        at(&format!("/depends_on/{j}")),
                        "another step",
                        "a step cannot depend on itself".into(),
                    );
                }
            }
            for (f, d) in [
                ("/timeouts/start", &s.timeouts.start),
                ("/timeouts/run", &s.timeouts.run),
            ] {
                if let Some(d) = d
                    && parse_duration(d).is_none()
                {
                    bad(
                        at(f),
                        "a duration like 90s",
                        format!("`{d}` is not a duration"),
                    );
                }
            }
            let mut refs: Vec<(String, Reference)> = Vec::new();
            if let Some(p) = &s.payload {
                template::references(p, &at("/payload"), &mut refs);
            }
            if let Some(fe) = &s.for_each {
                template::references(fe, &at("/for_each"), &mut refs);
                if !fe.is_array() && template::whole(fe).is_none() {
                    bad(
                        at("/for_each"),
                        "an array or one {{ … }} naming an array",
                        "`for_each` must be a list or a single `{{ … }}` reference".into(),
                    );
                }
            }
            for (pointer, r) in refs {
                match r {
                    Reference::Invalid(msg) => bad(pointer, "a valid {{ … }} reference", msg),
                    Reference::Param(p) if !self.params.contains_key(&p) => bad(
                        pointer,
                        "a declared parameter",
                        format!("unknown parameter `{p}` (declare it under [params])"),
                    ),
                    Reference::Step(st) if !s.depends_on.contains(&st) => bad(
                        pointer,
                        "a step listed in depends_on",
                        format!(
                            "`{st}` is referenced but not in `depends_on` of `{}`",
                            s.name
                        ),
                    ),
                    Reference::Item if s.for_each.is_none() && !pointer.contains("/for_each") => {
                        bad(
                            pointer,
                            "`item` only in a step with for_each",
                            "`{{ item }}` needs `for_each`".into(),
                        )
                    }
                    _ => {}
                }
            }
        }
        let order = self.topological();
        // A step with an unknown dependency is never ordered; that is not a cycle.
        let all_known = self
            .steps
            .iter()
            .all(|s| s.depends_on.iter().all(|d| names.contains(d.as_str())));
        if order.len() < self.steps.len() && seen.len() == self.steps.len() && all_known {
            let in_cycle: Vec<&str> = self
                .steps
                .iter()
                .map(|s| s.name.as_str())
                .filter(|n| !order.contains(n))
                .collect();
            if let Some(i) = self.steps.iter().position(|s| s.name == in_cycle[0]) {
                bad(
                    format!("/steps/{i}/depends_on"),
                    "no cycle",
                    format!("dependency cycle among {}", in_cycle.join(", ")),
                );
            }
        }
        v.sort_by(|a, b| a.pointer.cmp(&b.pointer));
        v
    }

    /// Resolves run parameters against the declared ones: fills defaults, rejects unknown and
    /// missing ones (pointer `/params/<name>`).
    pub fn resolve_params(
        &self,
        given: &BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, ValidationError> {
        let mut out = BTreeMap::new();
        let mut v = Vec::new();
        for k in given.keys() {
            if !self.params.contains_key(k) {
                v.push(Violation {
                    pointer: format!("/params/{k}"),
                    expected: "a declared parameter".into(),
                    message: format!("unknown parameter `{k}`"),
                    suggestion: distributor_core::nearest(
                        k,
                        self.params.keys().map(String::as_str),
                    ),
                });
            }
        }
        for (k, p) in &self.params {
            match given.get(k).or(p.default.as_ref()) {
                Some(val) => {
                    out.insert(k.clone(), val.clone());
                }
                None => v.push(Violation {
                    pointer: format!("/params/{k}"),
                    expected: "a value".into(),
                    message: format!("parameter `{k}` is required (it has no default)"),
                    suggestion: None,
                }),
            }
        }
        if v.is_empty() {
            Ok(out)
        } else {
            Err(ValidationError {
                subject: format!("parameters of workflow {}", self.name),
                violations: v,
            })
        }
    }
}
