//! The `Distributor` implementation of the `local` kind and its registration.

use std::sync::Arc;

use distributor_core::reexports::async_trait;
use distributor_core::{
    BuildContext, Capabilities, Distributor, Execution, KindConfig, Launch, Notification, Result,
    Status, TaskDescription, ValidationError,
};
use serde_json::Value;
use url::Url;

use crate::config::{LocalConfig, LocalPayload};
use crate::core::Local;

#[async_trait]
impl KindConfig for LocalConfig {
    const KIND: &'static str = "local";
    type Payload = LocalPayload;

    /// Creates the state directory and re-attaches to the work it holds. Errors: permanent when
    /// the state directory cannot be created or read (permissions, not a directory).
    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        let local = Local::build(self, ctx.notifier)?;
        Ok(Arc::new(LocalDistributor { local }))
    }
}

/// A `local` distributor instance: runs each execution as a supervised process group on this
/// machine. Built from a [`LocalConfig`] through the registry (or [`KindConfig::build`]).
#[derive(Debug, Clone)]
pub struct LocalDistributor {
    local: Arc<Local>,
}

impl LocalDistributor {
    /// The absolute state directory of this instance.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.local.settings().state_dir
    }
}

#[async_trait]
impl Distributor for LocalDistributor {
    /// Records the execution under the state directory and starts it, or queues it (`Pending`)
    /// when `max_parallel` processes are running. Idempotent per request id: a second call
    /// returns the same token and starts nothing. Errors: permanent for a payload that does not
    /// parse, a program that does not exist or cannot be executed (the execution ends
    /// `Rejected`); transient for resource exhaustion (fork `EAGAIN`, `ENOMEM`, `EMFILE`, disk
    /// full).
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        self.local.run(task).await
    }

    /// SIGTERM to the process group now, SIGKILL after the grace period; queued work is
    /// cancelled without starting. `Ok` for finished or unknown work.
    async fn cancel(&self, execution: &Execution) -> Result<()> {
        self.local.cancel(&execution.token)
    }

    /// Reads the state directory: `Pending` while queued, `Running` while the process group
    /// lives, else the outcome. Unknown token → `Missing`.
    async fn status(&self, execution: &Execution) -> Result<Status> {
        self.local.status(&execution.token)
    }

    fn info_url(&self, execution: &Execution) -> Option<Url> {
        self.local.info_url(execution.id, &execution.token)
    }

    /// Pushes from this adapter are pokes: a `{"local": {"token": ..}}` body for this
    /// execution's token is answered with `status`; anything else is ignored (`Ok(None)`).
    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        let Ok(body) = notification.data_json() else {
            return Ok(None);
        };
        let ours = body
            .pointer("/local/token")
            .and_then(Value::as_str)
            .is_some_and(|t| t == execution.token.as_str());
        if !ours {
            return Ok(None);
        }
        let event = body.pointer("/local/event").and_then(Value::as_str);
        self.local
            .status_for_push(&execution.token, event)
            .map(Some)
    }

    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        self.local.validate(payload)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: true,
            cancel: true,
            batch_status: false,
            recover: true,
            deferred: false,
        }
    }

    /// Makes sure this instance follows the execution (watcher or queue), then reports `status`.
    async fn recover(&self, execution: &Execution) -> Result<Status> {
        self.local.recover(&execution.token)
    }
}
