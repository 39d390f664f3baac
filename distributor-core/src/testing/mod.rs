//! The testing kit (feature `testing`): a scriptable fake adapter and the conformance suite.
//!
//! - [`FakeDistributor`] (kind `fake`) plays a backend in-process, scripted per task by its
//!   [`FakeScript`] payload: how long it stays pending and runs, how it ends, transient and
//!   permanent `run` errors, lost/duplicated/reordered/delayed pushes, poll-only work, work the
//!   backend forgets, work that crashes, hangs, or ignores `cancel`. Its [`FakeBackend`] records
//!   every call and lets a test end work by hand. Time is tokio's clock, so tests under
//!   `tokio::time::pause` (enabled by this feature) are deterministic and never sleep for real.
//! - [`conformance`] checks an adapter against the [`Distributor`](crate::Distributor) contract,
//!   one libtest-mimic trial per contract sentence.
//!
//! The fake is not registered through inventory; register it explicitly:
//!
//! ```
//! use distributor_core::testing::{FakeBackend, FakeConfig};
//! use distributor_core::{
//!     AuthToken, BuildContext, ConfigHash, NotificationRoute, Outcome, Registry, RequestId, Status,
//! };
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new().register::<FakeConfig>()?;
//! let kind = registry.kind("fake")?;
//! let config = json!({ "backend": "doc-example" });
//! let fake = kind
//!     .build(config.clone(), BuildContext::detached("f"), ConfigHash::of("fake", &config))
//!     .await?;
//!
//! // A task that is pending for 1 s, runs for 2 s, then fails.
//! let payload = json!({
//!     "pending_for_ms": 1000, "run_for_ms": 2000,
//!     "outcome": { "outcome": "abnormal", "kind": "failed", "reason": "exit 3" },
//! });
//! fake.validate(&payload)?;
//! # let task = distributor_core::TaskDescription {
//! #     execution_id: distributor_core::ExecutionId(1), task_id: distributor_core::TaskId(1),
//! #     attempt: distributor_core::Attempt(1), request_id: RequestId::new("doc-1"),
//! #     redispatch: false,
//! #     distributor: "f".into(), payload, previous: None,
//! #     notify: NotificationRoute { target: None, auth_token: AuthToken("t".into()) },
//! #     timeouts: Default::default(), labels: Default::default(),
//! # };
//! let launch = fake.distributor().run(&task).await?;
//! # let execution = distributor_core::Execution {
//! #     id: task.execution_id, task_id: task.task_id, attempt: task.attempt,
//! #     request_id: task.request_id.clone(), payload: task.payload.clone(),
//! #     token: launch.token.clone(), handle: launch.handle.clone(),
//! # };
//! let d = fake.distributor();
//! assert_eq!(d.status(&execution).await?, Status::Pending);
//! tokio::time::advance(std::time::Duration::from_millis(1500)).await;
//! assert_eq!(d.status(&execution).await?, Status::Running);
//! tokio::time::advance(std::time::Duration::from_millis(2000)).await;
//! let Status::Finished(Outcome::Abnormal { reason, .. }) = d.status(&execution).await? else {
//!     panic!("not finished");
//! };
//! assert_eq!(reason, "exit 3");
//!
//! // The backend saw one start for the request id, whatever the engine retried.
//! assert_eq!(FakeBackend::named("doc-example").starts(&task.request_id), 1);
//! # Ok(())
//! # }
//! ```
//!
//! A conformance run for an adapter lives in a `harness = false` test target; see
//! [`conformance`].

pub mod conformance;
mod fake;
#[cfg(feature = "postgres")]
pub mod postgres;

pub use fake::{Call, FakeBackend, FakeConfig, FakeDistributor, FakeOutcome, FakeScript, PushMode};
