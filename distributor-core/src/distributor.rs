//! The `Distributor` trait: the contract every adapter implements.
//!
//! # Lifecycle
//!
//! 1. The orchestrator submits a task to the engine, naming a distributor instance.
//! 2. The engine validates the payload against the kind's schema, stores the execution and its
//!    [`RequestId`](crate::RequestId) (the intent log), then calls [`Distributor::run`].
//! 3. The work reports back by push ([`Distributor::handle_notification`], after the engine has
//!    authenticated it) or the engine pulls ([`Distributor::status`]) at the adapter's poll hint.
//!    Polling is also the hedge for lost pushes.
//! 4. On a restart the engine calls [`Distributor::recover`] for every execution still in flight.
//! 5. On cancel or a run timeout the engine calls [`Distributor::cancel`] and then polls until the
//!    work is confirmed stopped.
//!
//! # Retries
//!
//! Every method returning [`Result`] follows one rule: an error for which
//! [`Error::is_transient`](crate::Error::is_transient) is true MAY be retried by the engine, with
//! exponential backoff, as many times as its policy allows; any other error is final for that
//! call. After a permanent error or a success the engine makes a best effort not to repeat the call,
//! but does not guarantee it: every method MUST therefore be safe to call again.
//!
//! # Blocking
//!
//! The engine polls each call's future once where it makes the call (so a call that completes at
//! once costs no task) and runs it on a task of its own only if it has to wait. The futures MUST
//! NOT block the thread: blocking I/O or long CPU work belongs in `tokio::task::spawn_blocking`,
//! or it stalls every execution the engine drives.

use std::fmt::Debug;

use async_trait::async_trait;
use serde_json::Value;
use url::Url;

use crate::error::{Error, Result, ValidationError};
use crate::types::{
    Capabilities, DeferredWork, Execution, Launch, Notification, Status, TaskDescription, Timestamp,
};

/// An execution backend adapter. Dyn-compatible; the engine holds it as `Arc<dyn Distributor>`.
#[async_trait]
pub trait Distributor: Send + Sync + Debug + 'static {
    /// Starts the work for one execution.
    ///
    /// MUST be idempotent per `task.request_id`: a second call with the same request id MUST NOT
    /// start a second piece of work and SHOULD return the same token. Adapters dedupe in the
    /// backend where it can (a job name or comment, a message id, a pid file), because the engine
    /// repeats `run` after a crash between storing its intent and recording the launch.
    ///
    /// Errors: transient → the engine retries with backoff; permanent → the execution ends
    /// `Rejected` with the error text as the reason.
    async fn run(&self, task: &TaskDescription) -> Result<Launch>;

    /// Asks the backend to stop the work.
    ///
    /// MUST be idempotent: cancelling work that already finished, was already cancelled, or is
    /// unknown to the backend returns `Ok(())`. Returning `Ok` does not mean the work has stopped.
    /// Once cancelled work has stopped, `status` MUST report
    /// `Finished(Abnormal { kind: Cancelled, .. })` (work that finished before the cancel took
    /// effect keeps the outcome it reached; finished is final); the conformance case
    /// `cancel_running_ends_cancelled` checks it. The engine itself records the cancel's cause
    /// (`Cancelled`, or `TimedOut` for a run timeout) once `status` reports the work finished
    /// abnormally, whatever kind the adapter reported, or when the stop deadline passes.
    /// Transient errors are retried until the stop deadline.
    async fn cancel(&self, execution: &Execution) -> Result<()>;

    /// Reports where the work is: `Pending`, `Running` or `Finished(outcome)`.
    ///
    /// Work the backend does not know (any more) MUST be reported as
    /// `Finished(Abnormal { kind: Missing, .. })`, not as an error. Transient errors are retried
    /// at the next poll; a permanent error ends the execution `Crashed` with its text.
    async fn status(&self, execution: &Execution) -> Result<Status>;

    /// Reports the status of many executions of this distributor at once, one result per input
    /// in the same order. The default loops over [`status`](Self::status); adapters whose backend
    /// can answer for many jobs in one request override it and set
    /// [`Capabilities::batch_status`].
    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        let mut out = Vec::with_capacity(executions.len());
        for e in executions {
            out.push(self.status(e).await);
        }
        out
    }

    /// Where a person can look at the work. MUST be pure and local: no I/O, the same answer for
    /// the same execution every time, and it MUST NOT fail for tokens it does not recognise.
    fn info_url(&self, execution: &Execution) -> Option<Url>;

    /// Interprets a push that the engine has already authenticated (its `auth_token` attribute
    /// removed, its sequence checked).
    ///
    /// `Ok(None)` means "nothing to record" (ignore it). It MUST NOT panic on any input: garbage
    /// is `Ok(None)` or a permanent error. It MAY treat the push as a poke and call `status`.
    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>>;

    /// Semantic payload checks beyond the kind's JSON Schema, which the registry has already
    /// applied (see [`Instance::validate`](crate::Instance::validate)). The default accepts
    /// everything the schema accepts. Runs at submit, synchronously: no I/O.
    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        let _ = payload;
        Ok(())
    }

    /// Completes a payload at submit, after it validated: returns the payload to store instead
    /// (for example with a default that depends on the submit time filled in), or `None` to
    /// keep it as it is. The engine calls it once per task, before the task is stored, so what
    /// it returns is part of the intent log and every `run` of every attempt sees the same
    /// value. MUST be pure and local (no I/O), and its result MUST still validate. The default
    /// keeps the payload.
    fn prepare(&self, payload: &Value, submitted_at: Timestamp) -> Option<Value> {
        let _ = (payload, submitted_at);
        None
    }

    /// Handles a runtime control request addressed to this instance (an operator setting a
    /// cutover time), through [`Engine::control`](crate::Engine::control). The request
    /// and the answer are JSON documents whose shape each kind documents; a kind that takes
    /// control requests MUST refuse a malformed one with a permanent error (or
    /// [`Error::Validation`] naming the bad field by JSON Pointer), MUST make any change it
    /// accepts durable (in [`BuildContext::state`](crate::BuildContext)) before answering `Ok`,
    /// and SHOULD answer with its state after the request. A request that only reads MUST NOT
    /// change anything. Transient errors mean nothing changed and the caller may repeat it.
    ///
    /// The default refuses with [`Error::Unsupported`] (operation `control`); the engine reports
    /// that as "distributor `x` (kind `y`) takes no control requests".
    async fn control(&self, request: &Value) -> Result<Value> {
        let _ = request;
        Err(Error::Unsupported {
            operation: "control",
        })
    }

    /// What this adapter can do. MUST be constant for the instance's lifetime.
    fn capabilities(&self) -> Capabilities;

    /// Re-attaches to work started before an orchestrator restart (Nomad's RecoverTask), using
    /// the persisted handle, and reports its status. The engine calls it for every execution
    /// still in flight after a restart, whatever the capabilities. The default asks `status`;
    /// adapters that keep per-execution state in memory (watchers, supervisors) override it to
    /// rebuild that state first.
    ///
    /// Declare [`Capabilities::recover`] when work survives a restart of the orchestrator
    /// process and a freshly built instance reports it correctly (finished work's outcome,
    /// running work as unfinished and still cancellable), whether through an override or the
    /// default; leave it `false` when work lives in the orchestrator process and is lost with
    /// it (it is then reported `Missing`). The flag selects the conformance case
    /// `recover_reports_status`, which checks exactly that.
    async fn recover(&self, execution: &Execution) -> Result<Status> {
        self.status(execution).await
    }

    /// Handles work this adapter scheduled earlier on the engine's durable timer queue (DM's
    /// HandleTaskQueueTask). Returns notifications, which the engine routes through
    /// `handle_notification` for `work.execution_id`. The default refuses: adapters that never
    /// schedule deferred work need not implement it.
    async fn handle_deferred(&self, work: &DeferredWork) -> Result<Vec<Notification>> {
        let _ = work;
        Err(Error::Unsupported {
            operation: "handle_deferred",
        })
    }
}
