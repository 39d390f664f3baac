//! The `switch` kind's config ([`SwitchConfig`]) and payload ([`SwitchPayload`]) types.

use std::sync::{Arc, OnceLock};

use distributor_core::reexports::async_trait;
use distributor_core::{
    BuildContext, Distributor, KindConfig, Registry, Result, ValidationError, Violation,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::backend::SwitchDistributor;

/// Config of one `switch` distributor instance: the two distributors it hands tasks to and the
/// grid its cutover time lies on.
///
/// ```toml
/// [distributors.bq-export]
/// kind = "switch"
/// grid_secs = 60
/// before = { kind = "slurm", url = "http://127.0.0.1:6820", user = "ci", token = { env = "JWT" } }
/// after = { kind = "jobs", listen = "127.0.0.1:8700" }
/// ```
///
/// `before` and `after` are whole distributor configs, `kind` included, validated against
/// their kinds when the file is loaded (problems are named under `/before/…` and `/after/…`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The distributor that runs every task whose interval starts before the cutover, and every
    /// task while no cutover is set (the old path).
    pub before: InnerConfig,
    /// The distributor that runs every task whose interval starts at or after the cutover (the
    /// new path; it runs nothing until a cutover is set).
    pub after: InnerConfig,
    /// The grid, in seconds: a cutover MUST be a whole multiple of it since the Unix epoch
    /// (60: on the minute). Tasks' intervals SHOULD be aligned to it too, so that no interval
    /// contains a possible cutover. Default 60.
    #[serde(default = "default_grid_secs")]
    #[schemars(range(min = 1))]
    pub grid_secs: u64,
    /// How many cutover changes the history keeps (oldest dropped first). Default 100.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 10000))]
    pub history_limit: u32,
}

fn default_grid_secs() -> u64 {
    60
}

fn default_history_limit() -> u32 {
    100
}

/// One side of a switch: a distributor config with its `kind`, as it would appear in the
/// `distributors` table.
///
/// It serializes as its kind's config type serializes it ([`Kind::snapshot`]
/// (distributor_core::Kind::snapshot), for kinds registered through inventory), so secret
/// literals of a side never reach an execution's config snapshot in clear text.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
pub struct InnerConfig {
    /// The kind of this side (any registered kind, `switch` included).
    pub kind: String,
    /// The rest of the config, validated against the kind's config schema.
    #[serde(flatten)]
    pub config: Map<String, Value>,
}

impl InnerConfig {
    /// The config without `kind`, as its kind's factory takes it.
    pub fn config_value(&self) -> Value {
        Value::Object(self.config.clone())
    }
}

impl Serialize for InnerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        static LINKED: OnceLock<Option<Registry>> = OnceLock::new();
        let linked = LINKED.get_or_init(|| Registry::from_inventory().ok());
        let snapshot = linked
            .as_ref()
            .and_then(|r| r.kind(&self.kind).ok())
            .and_then(|k| k.snapshot(&self.config_value()).ok());
        let mut m = match snapshot {
            Some(Value::Object(m)) => m,
            _ => self.config.clone(),
        };
        m.insert("kind".into(), Value::String(self.kind.clone()));
        m.serialize(s)
    }
}

/// Checks one side (`kind` and the rest of its config) against its kind, pushing problems with
/// pointers under `/<side>`.
pub(crate) fn check_side(
    side: Side,
    kind: &str,
    rest: &Map<String, Value>,
    registry: &Registry,
    violations: &mut Vec<Violation>,
) {
    let k = match registry.kind(kind) {
        Ok(k) => k,
        Err(e) => {
            violations.push(Violation {
                pointer: format!("/{side}/kind"),
                expected: "a registered kind".into(),
                message: e.to_string(),
                suggestion: None,
            });
            return;
        }
    };
    if let Err(e) = k.validate_config_in(
        registry,
        &format!("{side} side"),
        &Value::Object(rest.clone()),
    ) {
        violations.extend(e.violations.into_iter().map(|mut v| {
            v.pointer = format!("/{side}{}", v.pointer);
            v
        }));
    }
}

/// The two sides, by the name the config gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// `before`: the old path.
    Before,
    /// `after`: the new path.
    After,
}

impl Side {
    /// Both sides, `before` first.
    pub const BOTH: [Side; 2] = [Side::Before, Side::After];

    /// The config field name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Before => "before",
            Side::After => "after",
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SwitchConfig {
    /// The config of one side.
    pub fn side(&self, side: Side) -> &InnerConfig {
        match side {
            Side::Before => &self.before,
            Side::After => &self.after,
        }
    }
}

#[async_trait]
impl KindConfig for SwitchConfig {
    const KIND: &'static str = "switch";
    type Payload = SwitchPayload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(SwitchDistributor::build(self, ctx).await?))
    }

    /// Each side against its own kind, with pointers under `/before` and `/after`.
    fn validate_config(config: &Value, registry: &Registry) -> Result<(), ValidationError> {
        let mut violations = Vec::new();
        for side in Side::BOTH {
            let Some(inner) = config.get(side.as_str()).and_then(Value::as_object) else {
                continue; // the schema check already reported it
            };
            let Some(kind) = inner.get("kind").and_then(Value::as_str) else {
                continue;
            };
            let mut rest = inner.clone();
            rest.remove("kind");
            check_side(side, kind, &rest, registry, &mut violations);
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                subject: String::new(),
                violations,
            })
        }
    }
}

/// The payload of a `switch` task: the interval it covers and the payload for whichever side
/// runs it.
///
/// ```json
/// { "interval_start": "2026-12-02T15:04:00Z", "interval_ms": 15000,
///   "payload": { "table": "task_requests" } }
/// ```
///
/// The side is chosen from `interval_start` (the task's own logical time, never the time it
/// happens to be dispatched): before the cutover → `before`, at or after it → `after`. Without
/// `interval_start` the task covers its submit time, which the engine fills in at submit (see
/// `Distributor::prepare`), so every attempt of the task goes to the same side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchPayload {
    /// Start of the interval the task covers: an RFC 3339 time (`2026-12-02T15:04:00Z`, any
    /// offset, fractions of a second allowed) or milliseconds since the Unix epoch. Absent: the
    /// submit time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_start: Option<TimeSpec>,
    /// Length of the interval in milliseconds (0: the task covers an instant). An interval that
    /// contains the cutover is refused at dispatch: it belongs to neither side.
    #[serde(default)]
    pub interval_ms: u64,
    /// The payload of the side that runs the task. It MUST be valid for both sides' kinds
    /// (which side runs it is decided at dispatch); problems are named under `/payload/…`.
    pub payload: Value,
}

/// A point in time as written in payloads and control requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TimeSpec {
    /// Milliseconds since the Unix epoch.
    Millis(i64),
    /// An RFC 3339 time, e.g. `2026-12-02T15:04:00Z`.
    Text(String),
}
