//! Identifiers and values passed between the engine and adapters.
//!
//! Everything here is typed (newtypes and enums, never bare strings for state) and serde-ready,
//! because all of it is stored by the engine or sent over the wire.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

macro_rules! int_id {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

macro_rules! str_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Wraps a string. Clones share it (a reference count, no copy).
            pub fn new(s: impl Into<String>) -> Self {
                Self(std::sync::Arc::from(s.into()))
            }
            /// The string form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(std::sync::Arc::from(s))
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(std::sync::Arc::from(s))
            }
        }
    };
}

int_id!(
    /// One execution (one attempt of a task). Assigned by the store, unique within it.
    ExecutionId(u64)
);
int_id!(
    /// A task: the unit the orchestrator asked for. Its executions share it; it equals the id of
    /// the task's first execution.
    TaskId(u64)
);
int_id!(
    /// Attempt number of an execution within its task, starting at 1.
    Attempt(u32)
);

str_id!(
    /// Idempotency key of one execution, stored before `run` is called and handed to the
    /// adapter. Globally unique (a random UUID), so that two orchestrators sharing one backend
    /// never collide. Adapters dedupe `run` on it.
    RequestId
);
str_id!(
    /// The backend's opaque id for an execution's work (Slurm job id, pid, worker job id…).
    Token
);
str_id!(
    /// The name of a configured distributor instance (`hpc`, `local`, …).
    DistributorName
);
str_id!(
    /// A kind: an adapter's config type name and registry key (`local`, `slurm`, `fake`…).
    KindName
);

impl RequestId {
    /// A fresh random request id (a version 4 UUID from the thread's CSPRNG, so no system
    /// call per id).
    pub fn random() -> Self {
        let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        Self(uuid.to_string().into())
    }
}

/// Milliseconds since the Unix epoch. The engine's durable timers and deadlines use this, so
/// they survive restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The wall clock now.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
    /// This instant plus `d` (saturating).
    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
    /// Time from `self` until `later` (zero if `later` is not after `self`).
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(later.0.saturating_sub(self.0)).unwrap_or(0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        let ms = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Self(ms)
    }
}

/// Per-phase time limits of a task (DM's start/run/stop timeouts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// From dispatch until the work is seen running; past it the execution ends `Expired`.
    #[serde(
        default,
        with = "opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub start: Option<Duration>,
    /// From running until finished; past it the engine cancels the work and it ends `TimedOut`.
    #[serde(
        default,
        with = "opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub run: Option<Duration>,
    /// How long cancellation may take before the engine stops waiting for confirmation.
    #[serde(
        default,
        with = "opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop: Option<Duration>,
}

/// Absolute deadlines of one execution, derived from its task's [`Timeouts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// The work must be seen running by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_by: Option<Timestamp>,
    /// The work must finish by then (set when it starts running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_by: Option<Timestamp>,
}

/// Free-form labels an orchestrator attaches to a task (for listing and for the backend).
pub type Labels = BTreeMap<String, String>;

/// How far past the last accepted sequence a push's [`Notification::sequence`] may jump
/// (2^32). A larger jump is refused ([`NotificationRejection::SequenceJump`](crate::NotificationRejection::SequenceJump)):
/// accepting `u64::MAX` once would make every later genuine update stale.
pub const MAX_SEQUENCE_JUMP: u64 = 1 << 32;

/// Where an adapter's backend should push notifications for one execution, and the secret the
/// push must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRoute {
    /// The URL (HTTP push) or subject (message bus) to push to; `None` when the embedder did not
    /// configure one (the adapter then relies on polling).
    pub target: Option<String>,
    /// The per-execution token the push MUST carry in the `auth_token` attribute.
    pub auth_token: AuthToken,
}

/// A per-execution HMAC token authenticating pushes. Opaque to adapters.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AuthToken(pub String);

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(..)")
    }
}

/// What `run` receives: everything an adapter needs to start one execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDescription {
    /// The execution being started.
    pub execution_id: ExecutionId,
    /// The task it belongs to.
    pub task_id: TaskId,
    /// Its attempt number.
    pub attempt: Attempt,
    /// The idempotency key: `run` MUST start at most one piece of work per request id.
    pub request_id: RequestId,
    /// False on the first `run` call for this request id; true when the engine repeats it
    /// (after a transient error, or after a restart found the execution still dispatching), so
    /// work may already exist. An adapter whose backend cannot dedupe cheaply MAY skip its
    /// look-up for existing work when this is false; it MUST do the look-up when it is true.
    #[serde(default)]
    pub redispatch: bool,
    /// The distributor instance it runs on.
    pub distributor: DistributorName,
    /// The payload, already validated against the kind's payload schema.
    pub payload: Value,
    /// The outcome of the previous attempt, if this is a retry.
    pub previous: Option<Outcome>,
    /// Where to push notifications.
    pub notify: NotificationRoute,
    /// The phase timeouts asked for.
    pub timeouts: Timeouts,
    /// Labels of the task.
    pub labels: Labels,
}

impl TaskDescription {
    /// A first attempt of a one-execution task (`task_id` = `execution_id`, attempt 1), with no
    /// notification target, an empty auth token, no timeouts and no labels; set the public
    /// fields for anything else. For adapter tests and tools that call `run` without an engine.
    pub fn new(
        execution_id: ExecutionId,
        request_id: RequestId,
        distributor: impl Into<DistributorName>,
        payload: Value,
    ) -> Self {
        Self {
            execution_id,
            task_id: TaskId(execution_id.0),
            attempt: Attempt(1),
            request_id,
            redispatch: false,
            distributor: distributor.into(),
            payload,
            previous: None,
            notify: NotificationRoute {
                target: None,
                auth_token: AuthToken(String::new()),
            },
            timeouts: Timeouts::default(),
            labels: Labels::new(),
        }
    }
}

/// A JSON value held as compact JSON text. The engine keeps one per live execution (a task's
/// payload): a few dozen bytes where a `serde_json::Value` tree of the same payload takes
/// kilobytes. Built from a [`Value`] (keys sorted, no whitespace), so equal values give equal
/// payloads; serialized verbatim into JSON.
#[derive(Clone)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// The payload of `value`.
    pub fn new(value: &Value) -> Self {
        // Serializing a `Value` cannot fail, and its output is valid JSON.
        let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
        Self(serde_json::value::RawValue::from_string(text).unwrap_or_else(|_| Self::null_raw()))
    }
    fn null_raw() -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string("null".to_owned())
            .unwrap_or_else(|_| unreachable!("null is JSON"))
    }
    /// The value, parsed (each call parses the text again).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
    /// The compact JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Self::new(&value)
    }
}

impl Default for Payload {
    fn default() -> Self {
        Self(Self::null_raw())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(|v| Self::new(&v))
    }
}

/// Versioned, adapter-private state persisted with the execution (Nomad's task handle).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterHandle {
    /// Version of the `data` layout, so an adapter can read handles written by older versions.
    pub version: u32,
    /// Adapter data (pid file path, job id, lease…).
    pub data: Value,
}

impl AdapterHandle {
    /// Whether this is the default, empty handle (version 0, no data).
    pub fn is_empty(&self) -> bool {
        self.version == 0 && self.data.is_null()
    }
}

/// What a successful `run` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// The backend's id for the work.
    pub token: Token,
    /// State to persist and hand back in later calls.
    pub handle: AdapterHandle,
    /// How often the engine should poll `status`; `None` uses the engine's default.
    #[serde(default, with = "opt_duration_ms")]
    pub poll_interval: Option<Duration>,
}

impl Launch {
    /// A launch with only a token.
    pub fn new(token: impl Into<Token>) -> Self {
        Self {
            token: token.into(),
            handle: AdapterHandle::default(),
            poll_interval: None,
        }
    }
}

/// The adapter-facing view of a dispatched execution, passed to `cancel`, `status`,
/// `info_url` and `handle_notification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    /// The execution.
    pub id: ExecutionId,
    /// Its task.
    pub task_id: TaskId,
    /// Its attempt number.
    pub attempt: Attempt,
    /// Its idempotency key.
    pub request_id: RequestId,
    /// The payload it was started with.
    pub payload: Value,
    /// The token `run` returned.
    pub token: Token,
    /// The handle `run` returned (or the last one the adapter updated).
    pub handle: AdapterHandle,
}

/// Why an execution ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbnormalKind {
    /// The work ran and reported failure (non-zero exit…). Retryable.
    Failed,
    /// The work died without reporting (killed, node lost, worker vanished). Retryable.
    Crashed,
    /// The work never started before its start deadline. Retryable.
    Expired,
    /// The work ran past its run deadline and was stopped. Retryable.
    TimedOut,
    /// Someone cancelled it. Not retried.
    Cancelled,
    /// The adapter refused it (permanent `run` error). Not retried.
    Rejected,
    /// The backend no longer knows the work. Not retried.
    Missing,
    /// The work finished but its result could not be read. Not retried.
    ResultMalformed,
}

impl AbnormalKind {
    /// Every kind, in declaration order.
    pub const ALL: [AbnormalKind; 8] = [
        Self::Failed,
        Self::Crashed,
        Self::Expired,
        Self::TimedOut,
        Self::Cancelled,
        Self::Rejected,
        Self::Missing,
        Self::ResultMalformed,
    ];

    /// Whether a new attempt may be started for this kind (if the task's budget allows):
    /// true for Failed, Crashed, Expired and TimedOut.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Crashed | Self::Expired | Self::TimedOut
        )
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Crashed => "crashed",
            Self::Expired => "expired",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Missing => "missing",
            Self::ResultMalformed => "result_malformed",
        }
    }
}

impl fmt::Display for AbnormalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// It finished and produced `data`.
    Succeeded {
        /// The result (exit code, output, …), adapter-defined JSON.
        data: Value,
    },
    /// It ended without a result.
    Abnormal {
        /// Why.
        kind: AbnormalKind,
        /// A human-readable explanation, never empty in practice.
        reason: String,
    },
}

impl Outcome {
    /// An abnormal outcome.
    pub fn abnormal(kind: AbnormalKind, reason: impl Into<String>) -> Self {
        Self::Abnormal {
            kind,
            reason: reason.into(),
        }
    }
    /// The abnormal kind, if any.
    pub fn abnormal_kind(&self) -> Option<AbnormalKind> {
        match self {
            Self::Succeeded { .. } => None,
            Self::Abnormal { kind, .. } => Some(*kind),
        }
    }
    /// True for `Succeeded`.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Succeeded { .. })
    }
}

/// What the backend says about one execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Accepted, not yet running.
    Pending,
    /// Running.
    Running,
    /// Finished, with its outcome.
    Finished(Outcome),
}

impl Status {
    /// The outcome, when finished.
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Self::Finished(o) => Some(o),
            _ => None,
        }
    }
}

/// A push from a backend about one execution (DM's Notification), already authenticated by the
/// engine (the `auth_token` attribute is removed before the adapter sees it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The body, as sent.
    #[serde(default)]
    pub data: Vec<u8>,
    /// String attributes (Pub/Sub attributes, NATS headers…).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The transport's message id, used to drop duplicates.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The sender's update sequence for this execution; pushes whose sequence is not greater
    /// than the last one accepted are dropped, so a late push can never regress a state. A
    /// sequence more than [`MAX_SEQUENCE_JUMP`](crate::MAX_SEQUENCE_JUMP) past the last one
    /// accepted (0 before the first) is refused: senders MUST count up in small steps.
    #[serde(default)]
    pub sequence: Option<u64>,
}

impl Notification {
    /// A notification whose body is `data` serialized as JSON.
    pub fn json(data: &Value) -> Self {
        Self {
            data: serde_json::to_vec(data).unwrap_or_default(),
            ..Self::default()
        }
    }
    /// The body parsed as JSON.
    pub fn data_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }
}

/// What an adapter can do. Data, not ifs: the engine enforces it and the conformance suite
/// chooses its cases from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The backend pushes notifications; the engine still polls as a hedge, less often.
    pub push_notifications: bool,
    /// `cancel` really stops work. Without it the engine records cancellation without calling.
    pub cancel: bool,
    /// `status_batch` is cheaper than one `status` per execution.
    pub batch_status: bool,
    /// Work survives an orchestrator restart and a rebuilt instance's `recover` reports it
    /// (see [`Distributor::recover`](crate::Distributor::recover) for when to declare it).
    pub recover: bool,
    /// The adapter schedules deferred work (`handle_deferred`).
    pub deferred: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            push_notifications: false,
            cancel: true,
            batch_status: false,
            recover: false,
            deferred: false,
        }
    }
}

/// Work an adapter scheduled on the engine's durable timer queue (DM's task queue task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeferredWork {
    /// The execution it concerns.
    pub execution_id: ExecutionId,
    /// When it becomes due.
    pub due: Timestamp,
    /// Adapter-defined data.
    pub data: Value,
}

/// A link a person can open to look at the work.
pub type InfoUrl = Url;

/// Serde helper: `Option<Duration>` as integer milliseconds.
pub mod opt_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }
    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_kinds_are_exactly_the_four() {
        let retryable: Vec<_> = AbnormalKind::ALL
            .into_iter()
            .filter(|k| k.is_retryable())
            .collect();
        assert_eq!(
            retryable,
            [
                AbnormalKind::Failed,
                AbnormalKind::Crashed,
                AbnormalKind::Expired,
                AbnormalKind::TimedOut
            ]
        );
    }

    #[test]
    fn outcome_round_trips_through_json() {
        let o = Outcome::abnormal(AbnormalKind::TimedOut, "ran 3s, limit 2s");
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["outcome"], "abnormal");
        assert_eq!(v["kind"], "timed_out");
        assert_eq!(serde_json::from_value::<Outcome>(v).unwrap(), o);
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp(1_000);
        assert_eq!(t.plus(Duration::from_millis(500)), Timestamp(1_500));
        assert_eq!(t.until(Timestamp(400)), Duration::ZERO);
        assert_eq!(
            Timestamp(i64::MAX - 1).plus(Duration::from_secs(10)),
            Timestamp(i64::MAX)
        );
    }
}
