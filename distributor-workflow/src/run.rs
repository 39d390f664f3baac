//! A run's durable documents and their keys in the engine's metadata.
//!
//! | key | document |
//! |---|---|
//! | `workflow/runs/<run>` | [`RunDoc`]: the workflow, parameters, run state |
//! | `workflow/steps/<run>/<step>` | [`StepDoc`]: state, generation, approval, result |
//! | `workflow/units/<run>/<step>/<index>` | [`UnitDoc`]: one task of a step (one per fan-out item): its execution id |
//!
//! Every change is written (with [`Engine::put_meta`]) before it is acted on or published.

use std::collections::BTreeMap;
use std::fmt;

use distributor_core::{Engine, ExecutionId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::WorkflowError;
use crate::spec::WorkflowSpec;

/// A run's id: sortable by creation time (`<ms since epoch, 13 digits>-<4 hex>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub String);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl RunId {
    pub(crate) fn new(now: Timestamp) -> Self {
        Self(format!("{:013}-{:04x}", now.0, rand::random::<u16>()))
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Steps are running or waiting (for their dependencies or an approval).
    Running,
    /// Cancellation was asked for; running steps are being cancelled.
    Cancelling,
    /// Every step succeeded (or failed with `on_failure = "continue"`).
    Succeeded,
    /// A step failed with `on_failure = "stop"`.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl RunState {
    /// Succeeded, Failed or Cancelled. A re-run moves a Failed or Cancelled run back to Running.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Cancelling => "cancelling",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Waiting for its dependencies.
    Waiting,
    /// Its tasks are submitted and running.
    Running,
    /// An approval step waiting for a person.
    AwaitingApproval,
    /// Done, with a result.
    Succeeded,
    /// A task failed (or its payload could not be rendered or was refused).
    Failed,
    /// Cancelled with the run.
    Cancelled,
    /// Never ran: the run stopped or was cancelled first.
    NotRun,
}

impl StepState {
    /// Whether the step is over (for this generation).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::NotRun
        )
    }
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::NotRun => "not_run",
        }
    }
}

/// Where one task of a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitState {
    /// Recorded, being submitted (no execution id known yet).
    Submitting,
    /// Its execution is live.
    Running,
    /// Its execution succeeded.
    Succeeded,
    /// Its execution ended abnormally.
    Failed,
    /// Its execution was cancelled.
    Cancelled,
}

/// The run document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDoc {
    /// Its id.
    pub id: RunId,
    /// The workflow, as started (later edits of the file do not change a run).
    pub spec: WorkflowSpec,
    /// Resolved parameters.
    pub params: BTreeMap<String, Value>,
    /// Where it is.
    pub state: RunState,
    /// When it was started.
    pub created_at: Timestamp,
    /// When it last changed state.
    pub updated_at: Timestamp,
    /// When it ended (cleared by a re-run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// One step's document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDoc {
    /// Where it is.
    pub state: StepState,
    /// Generation: 0, plus one per re-run. Executions carry it in the label `workflow.gen`.
    pub generation: u32,
    /// How many tasks this generation has (fan-out items; 1 otherwise, 0 for approvals).
    pub units: u32,
    /// When this generation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The result (fan-out: the array of item results; approval: who and when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StepDoc {
    pub(crate) fn new() -> Self {
        Self {
            state: StepState::Waiting,
            generation: 0,
            units: 0,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
        }
    }
}

/// One task of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitDoc {
    /// Index in the step (the fan-out item's position).
    pub index: u32,
    /// The step generation it belongs to.
    pub generation: u32,
    /// The fan-out item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    /// Where it is.
    pub state: UnitState,
    /// Its (first) execution; the engine's retries follow `retried_by` from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<ExecutionId>,
    /// The execution that ended the unit (the last attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_execution: Option<ExecutionId>,
    /// Result data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

pub(crate) const RUNS: &str = "workflow/runs/";

pub(crate) fn run_key(run: &RunId) -> String {
    format!("{RUNS}{run}")
}
pub(crate) fn step_key(run: &RunId, step: &str) -> String {
    format!("workflow/steps/{run}/{step}")
}
pub(crate) fn unit_key(run: &RunId, step: &str, index: u32) -> String {
    format!("workflow/units/{run}/{step}/{index:06}")
}

/// A run with every step and the current generation's units, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    /// The run.
    pub run: RunDoc,
    /// Steps by name (every step of the workflow).
    pub steps: BTreeMap<String, StepDoc>,
    /// Units of each step's current generation, by step name, in index order.
    pub units: BTreeMap<String, Vec<UnitDoc>>,
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &str,
) -> Result<T, WorkflowError> {
    serde_json::from_str(value).map_err(|e| WorkflowError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("run documents serialize")
}

impl RunSnapshot {
    /// Loads a run from the engine's store.
    pub async fn load(engine: &Engine, run: &RunId) -> Result<Self, WorkflowError> {
        let key = run_key(run);
        let text = engine
            .meta(&key)
            .await?
            .ok_or_else(|| WorkflowError::UnknownRun(run.0.clone()))?;
        let doc: RunDoc = decode(&key, &text)?;
        let mut steps: BTreeMap<String, StepDoc> = BTreeMap::new();
        let prefix = format!("workflow/steps/{run}/");
        for (k, v) in engine.meta_prefix(&prefix).await? {
            steps.insert(k[prefix.len()..].to_owned(), decode(&k, &v)?);
        }
        for s in &doc.spec.steps {
            steps.entry(s.name.clone()).or_insert_with(StepDoc::new);
        }
        let mut units: BTreeMap<String, Vec<UnitDoc>> = BTreeMap::new();
        let prefix = format!("workflow/units/{run}/");
        for (k, v) in engine.meta_prefix(&prefix).await? {
            let Some((step, _)) = k[prefix.len()..].split_once('/') else {
                continue;
            };
            let u: UnitDoc = decode(&k, &v)?;
            if let Some(sd) = steps.get(step)
                && u.generation == sd.generation
                && u.index < sd.units
            {
                units.entry(step.to_owned()).or_default().push(u);
            }
        }
        Ok(Self {
            run: doc,
            steps,
            units,
        })
    }
}
