//! Workflows over the distributor engine: steps that depend on steps, from a file, each step
//! one or more engine executions, with results flowing from one step to the next.
//!
//! - [`WorkflowSpec`]: the file (TOML or JSON), checked against a schema derived from these
//!   types and then for meaning (dependencies, cycles, references), every problem with its
//!   JSON Pointer.
//! - [`Workflows`]: starts runs, follows them, and operates on them: cancel, approve, re-run
//!   a failed step and what depends on it, poke. Publishes a [`WorkflowEvent`] for each change.
//! - Durable: a run and its steps are metadata documents in the engine's store ([`run`] lists
//!   the keys), written before they are acted on. A step's task is an execution labelled
//!   `workflow.run`, `workflow.step`, `workflow.unit`, `workflow.gen`; after a crash a
//!   submission that was recorded without its execution id is found by those labels before it
//!   is submitted again, so no step is lost or started twice.
//!
//! Semantics, after relui, Argo and Airflow (research round 2, §4):
//!
//! | feature | behaviour |
//! |---|---|
//! | `depends_on` | a step starts when every dependency succeeded (or failed with `on_failure = "continue"`) |
//! | `payload` templates | `{{ params.x }}`, `{{ steps.s.result.field }}`, `{{ steps.s.state }}`, `{{ item }}`, `{{ run.id }}` ([`template`]) |
//! | `for_each` | one task per item, all submitted in one transaction; result = array of item results (fan-in) |
//! | `retries`, `timeouts` | the engine's per-task retry policy and phase timeouts |
//! | `approval` | waits for [`Workflows::approve`]; its result is `{approved_by, approved_at}` |
//! | `on_failure = "stop"` (default) | nothing new starts, running steps finish, the run fails; the rest is `not_run` |
//! | `on_failure = "continue"` | dependents run (the result is `null`); the run does not fail |
//! | re-run | a failed/cancelled step and its descendants get a new generation; the run resumes |
//! | cancel | pending steps never start, approvals stop, running tasks are cancelled |
//!
//! ```
//! use std::collections::BTreeMap;
//! use distributor_core::testing::FakeConfig;
//! use distributor_core::{DistributorsConfig, Engine, Registry};
//! use distributor_workflow::{RunState, WorkflowSpec, Workflows};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new().register::<FakeConfig>()?;
//! let config = DistributorsConfig::from_toml_str(
//!     &registry, "doc", "[distributors.fake]\nkind = \"fake\"\nbackend = \"wf-doc\"\n")?;
//! let engine = Engine::builder().registry(registry).distributors(config).build().await?;
//! let spec = WorkflowSpec::parse("doc", r#"
//!     name = "hello"
//!     [params.who]
//!     default = "world"
//!     [[steps]]
//!     name = "greet"
//!     distributor = "fake"
//!     payload = { outcome = { outcome = "succeeded", data = { text = "hello {{ params.who }}" } } }
//!     [[steps]]
//!     name = "shout"
//!     distributor = "fake"
//!     depends_on = ["greet"]
//!     for_each = ["!", "!!"]
//!     payload = { outcome = { outcome = "succeeded", data = "{{ steps.greet.result.text }}{{ item }}" } }
//! "#, false)?;
//! let workflows = Workflows::open(engine).await?;
//! let run = workflows.start(spec, BTreeMap::new()).await?;
//! let done = workflows.wait(&run).await?;
//! assert_eq!(done.run.state, RunState::Succeeded);
//! assert_eq!(done.steps["shout"].result, Some(serde_json::json!(["hello world!", "hello world!!"])));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
pub mod run;
mod runner;
mod spec;
pub mod template;

pub use error::WorkflowError;
pub use run::{RunDoc, RunId, RunSnapshot, RunState, StepDoc, StepState, UnitDoc, UnitState};
pub use runner::{
    LABEL_GEN, LABEL_RUN, LABEL_STEP, LABEL_UNIT, RunSummary, WorkflowEvent, Workflows,
};
pub use spec::{
    ApprovalSpec, OnFailure, ParamSpec, StepSpec, TimeoutsSpec, WorkflowSpec, parse_duration,
};
