//! Execution records, the state machine and its transition table.

use crate::types::Payload;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ConfigHash;
use crate::types::{
    AbnormalKind, AdapterHandle, Attempt, Deadlines, DistributorName, Execution, ExecutionId,
    KindName, Labels, Outcome, RequestId, TaskId, Timeouts, Timestamp, Token,
};

/// Where an execution is. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Stored, not yet handed to the adapter.
    Queued,
    /// The intent is stored (with its request id) and `run` is being called.
    Dispatching,
    /// The backend accepted the work; it has not started.
    Pending,
    /// The work is running.
    Running,
    /// Cancellation was requested and `cancel` called; waiting for the work to stop.
    Cancelling,
    /// Terminal: finished with a result.
    Succeeded,
    /// Terminal: ended abnormally, with this kind.
    Abnormal(AbnormalKind),
}

impl State {
    /// Every non-terminal state.
    pub const LIVE: [State; 5] = [
        Self::Queued,
        Self::Dispatching,
        Self::Pending,
        Self::Running,
        Self::Cancelling,
    ];

    /// True for `Succeeded` and `Abnormal(_)`.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Abnormal(_))
    }

    /// The terminal state an outcome leads to.
    pub fn of_outcome(o: &Outcome) -> Self {
        match o {
            Outcome::Succeeded { .. } => Self::Succeeded,
            Outcome::Abnormal { kind, .. } => Self::Abnormal(*kind),
        }
    }

    /// The transition table: whether `self → to` is allowed.
    pub fn can_move_to(self, to: State) -> bool {
        use State::*;
        match self {
            Queued => matches!(to, Dispatching | Abnormal(_)),
            Dispatching => {
                matches!(to, Dispatching | Pending | Running | Cancelling) || to.is_terminal()
            }
            Pending => matches!(to, Running | Cancelling) || to.is_terminal(),
            Running => matches!(to, Cancelling) || to.is_terminal(),
            Cancelling => to.is_terminal(),
            Succeeded | Abnormal(_) => false,
        }
    }

    /// The stable string form used in stores and APIs (`running`, `timed_out`…).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Dispatching => "dispatching",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Succeeded => "succeeded",
            Self::Abnormal(k) => k.as_str(),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::LIVE
            .into_iter()
            .chain([Self::Succeeded])
            .chain(AbnormalKind::ALL.map(Self::Abnormal))
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown state `{s}`"))
    }
}

/// How many new attempts a task may get, per abnormal kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts allowed, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Retries allowed per retryable kind; a kind not listed gets `max_attempts - 1`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_kind: BTreeMap<AbnormalKind, u32>,
    /// Delay before a new attempt starts.
    #[serde(
        default,
        with = "crate::types::opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            per_kind: BTreeMap::new(),
            delay: None,
        }
    }
}

impl RetryPolicy {
    /// At most `max_attempts` attempts in total, the first included, whatever the retryable
    /// kind: `attempts(3)` is the first attempt and up to 2 retries; `attempts(1)` (the
    /// default) never retries.
    ///
    /// ```
    /// use distributor_core::{AbnormalKind, Attempt, RetryPolicy};
    ///
    /// let p = RetryPolicy::attempts(3);
    /// let crashed = AbnormalKind::Crashed;
    /// assert!(p.allows(crashed, Attempt(1), &[crashed]));
    /// assert!(p.allows(crashed, Attempt(2), &[crashed, crashed]));
    /// assert!(!p.allows(crashed, Attempt(3), &[crashed, crashed, crashed]));
    /// ```
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// Whether an execution that ended `kind` after `attempt`, in a task whose earlier attempts
    /// ended with `history` (kinds, oldest first, including this one), may be retried.
    pub fn allows(&self, kind: AbnormalKind, attempt: Attempt, history: &[AbnormalKind]) -> bool {
        if !kind.is_retryable() || attempt.0 >= self.max_attempts {
            return false;
        }
        let budget = self
            .per_kind
            .get(&kind)
            .copied()
            .unwrap_or(self.max_attempts.saturating_sub(1));
        let used = history.iter().filter(|k| **k == kind).count();
        u32::try_from(used).unwrap_or(u32::MAX) <= budget
    }
}

/// What an orchestrator submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The distributor instance (or alias) to run on.
    pub distributor: DistributorName,
    /// The payload, checked against the kind's payload schema at submit; held as compact JSON
    /// text (see [`Payload`]).
    pub payload: Payload,
    /// Phase time limits.
    #[serde(default, skip_serializing_if = "is_default")]
    pub timeouts: Timeouts,
    /// Retries of abnormal outcomes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub retry: RetryPolicy,
    /// Labels, for listing and for the backend.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

impl Task {
    /// A task with defaults (no timeouts, no retries, no labels).
    pub fn new(distributor: impl Into<DistributorName>, payload: Value) -> Self {
        Self {
            distributor: distributor.into(),
            payload: Payload::new(&payload),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            labels: Labels::new(),
        }
    }
}

/// Why an execution is being cancelled: decides the terminal state once the work stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum CancelCause {
    /// Someone asked: ends `Cancelled`.
    Requested {
        /// Their reason.
        reason: String,
    },
    /// Not started by its start deadline: ends `Expired`.
    StartTimeout,
    /// Ran past its run deadline: ends `TimedOut`.
    RunTimeout,
}

impl CancelCause {
    /// The abnormal kind the execution ends with once the work has stopped.
    pub fn kind(&self) -> AbnormalKind {
        match self {
            Self::Requested { .. } => AbnormalKind::Cancelled,
            Self::StartTimeout => AbnormalKind::Expired,
            Self::RunTimeout => AbnormalKind::TimedOut,
        }
    }
    /// Words for the reason.
    pub fn describe(&self) -> String {
        match self {
            Self::Requested { reason } => format!("cancelled: {reason}"),
            Self::StartTimeout => "did not start before its start deadline".into(),
            Self::RunTimeout => "ran past its run deadline".into(),
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The engine's full, versioned record of one execution. Serialized (by stores) without its
/// empty and default fields, which read back as their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// The execution.
    pub id: ExecutionId,
    /// Its task (the id of the task's first execution).
    pub task_id: TaskId,
    /// Attempt number.
    pub attempt: Attempt,
    /// Idempotency key handed to `run`.
    pub request_id: RequestId,
    /// The task as submitted (shared by every copy of the record: it never changes).
    pub task: Arc<Task>,
    /// The resolved instance name (aliases followed).
    pub distributor: DistributorName,
    /// Config snapshot: kind.
    pub kind: KindName,
    /// Config snapshot: the instance config at submit time (shared between the executions of one
    /// instance).
    pub config: Arc<Value>,
    /// Config snapshot: its content hash.
    pub config_hash: ConfigHash,
    /// Where it is.
    pub state: State,
    /// Bumped by every change; writes are compare-and-set on it.
    pub version: u64,
    /// The backend's token, once launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// The adapter's persisted handle.
    #[serde(default, skip_serializing_if = "AdapterHandle::is_empty")]
    pub handle: AdapterHandle,
    /// The outcome, once terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The outcome of the previous attempt, handed to `run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Outcome>,
    /// Absolute deadlines.
    #[serde(default)]
    pub deadlines: Deadlines,
    /// Why it is being cancelled, while `Cancelling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelCause>,
    /// When the engine stops waiting for the work to confirm it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_by: Option<Timestamp>,
    /// Extra status polls made after `cancel_by` passed.
    #[serde(default, skip_serializing_if = "is_default")]
    pub stop_polls: u32,
    /// Consecutive transient errors of the current adapter call kind.
    #[serde(default, skip_serializing_if = "is_default")]
    pub transient_errors: u32,
    /// When the engine next retries a failed adapter call (`run`, `cancel`) or starts a delayed
    /// attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// Whether a `cancel` call has been accepted by the adapter for this execution.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_sent: bool,
    /// How many times `run` has been called for this execution's request id (counted durably
    /// before each call).
    #[serde(default, skip_serializing_if = "is_default")]
    pub run_calls: u32,
    /// Abnormal kinds of this task's earlier attempts, oldest first (for per-kind retry budgets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_kinds: Vec<AbnormalKind>,
    /// When the next status poll is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll: Option<Timestamp>,
    /// Poll interval hint from the adapter.
    #[serde(
        default,
        with = "crate::types::opt_duration_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub poll_interval: Option<Duration>,
    /// Highest notification sequence accepted.
    #[serde(default, skip_serializing_if = "is_default")]
    pub last_sequence: u64,
    /// Recently seen notification message ids (bounded), to drop duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen_messages: Vec<String>,
    /// The attempt that retried this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_by: Option<ExecutionId>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

impl ExecutionRecord {
    /// A new queued attempt of `task`: version 1, a fresh random request id, and the config
    /// snapshot `(instance name, kind, config, config hash)`.
    pub(crate) fn queued(
        id: ExecutionId,
        task_id: TaskId,
        attempt: Attempt,
        task: Arc<Task>,
        snapshot: (DistributorName, KindName, Arc<Value>, ConfigHash),
        now: Timestamp,
    ) -> Self {
        let (distributor, kind, config, config_hash) = snapshot;
        Self {
            id,
            task_id,
            attempt,
            request_id: RequestId::random(),
            task,
            distributor,
            kind,
            config,
            config_hash,
            state: State::Queued,
            version: 1,
            token: None,
            handle: AdapterHandle::default(),
            outcome: None,
            previous: None,
            deadlines: Deadlines::default(),
            cancel: None,
            cancel_by: None,
            stop_polls: 0,
            transient_errors: 0,
            retry_at: None,
            cancel_sent: false,
            run_calls: 0,
            earlier_kinds: Vec::new(),
            next_poll: None,
            poll_interval: None,
            last_sequence: 0,
            seen_messages: Vec::new(),
            retried_by: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// The adapter-facing view (requires a token; before launch the token is empty).
    pub fn execution(&self) -> Execution {
        Execution {
            id: self.id,
            task_id: self.task_id,
            attempt: self.attempt,
            request_id: self.request_id.clone(),
            payload: self.task.payload.to_value(),
            token: self.token.clone().unwrap_or_else(|| Token::new("")),
            handle: self.handle.clone(),
        }
    }
}

/// Who caused a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// The orchestrator's API call (submit, cancel).
    User,
    /// The engine's own logic (dispatch, retry).
    Engine,
    /// A durable timer (deadline, poll).
    Timer,
    /// The adapter's `run`/`status` answer.
    Adapter,
    /// A push notification.
    Notification,
    /// Recovery after a restart.
    Recovery,
}

/// One row of an execution's history: a transition and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The execution.
    pub execution_id: ExecutionId,
    /// The record version this transition produced.
    pub version: u64,
    /// The state before (`None` at creation).
    pub from: Option<State>,
    /// The state after.
    pub to: State,
    /// When.
    pub at: Timestamp,
    /// Who.
    pub actor: Actor,
    /// Why, in words.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_move() {
        let all: Vec<State> = State::LIVE
            .into_iter()
            .chain([State::Succeeded])
            .chain(AbnormalKind::ALL.map(State::Abnormal))
            .collect();
        for from in all.iter().filter(|s| s.is_terminal()) {
            for to in &all {
                assert!(!from.can_move_to(*to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn forward_path_is_allowed_and_backward_is_not() {
        use State::*;
        for (a, b) in [
            (Queued, Dispatching),
            (Dispatching, Pending),
            (Pending, Running),
            (Running, Cancelling),
            (Running, Succeeded),
            (Cancelling, Abnormal(AbnormalKind::Cancelled)),
        ] {
            assert!(a.can_move_to(b), "{a} -> {b}");
        }
        for (a, b) in [
            (Running, Pending),
            (Pending, Dispatching),
            (Cancelling, Running),
            (Queued, Running),
            (Running, Queued),
        ] {
            assert!(!a.can_move_to(b), "{a} -> {b}");
        }
    }

    #[test]
    fn state_strings_round_trip() {
        for s in State::LIVE
            .into_iter()
            .chain([State::Succeeded])
            .chain(AbnormalKind::ALL.map(State::Abnormal))
        {
            assert_eq!(s.as_str().parse::<State>(), Ok(s));
        }
    }

    #[test]
    fn retry_budget_per_kind() {
        let mut p = RetryPolicy::attempts(4);
        p.per_kind.insert(AbnormalKind::Crashed, 1);
        use AbnormalKind::*;
        assert!(p.allows(Failed, Attempt(1), &[Failed]));
        assert!(p.allows(Crashed, Attempt(1), &[Crashed]));
        assert!(!p.allows(Crashed, Attempt(2), &[Crashed, Crashed]));
        assert!(!p.allows(Failed, Attempt(4), &[Failed, Failed, Failed, Failed]));
        assert!(!p.allows(Cancelled, Attempt(1), &[Cancelled]));
        assert!(!RetryPolicy::default().allows(Failed, Attempt(1), &[Failed]));
    }
}
