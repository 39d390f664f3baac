//! `FakeDistributor`: a scriptable in-process adapter, like Nomad's mock driver.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use url::Url;

use crate::distributor::Distributor;
use crate::error::{Error, Result, ValidationError, Violation};
use crate::registry::{BuildContext, KindConfig, Notifier};
use crate::types::{
    Capabilities, DistributorName, Execution, Launch, Notification, Status, TaskDescription,
};

mod backend;
mod config;
#[cfg(test)]
mod tests;

pub use backend::{Call, FakeBackend};
pub use config::{FakeConfig, FakeOutcome, FakeScript, PushMode};

#[async_trait]
impl KindConfig for FakeConfig {
    const KIND: &'static str = "fake";
    type Payload = FakeScript;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(Arc::new(FakeDistributor::new(self, ctx)))
    }
}

/// The `fake` kind: work that exists only as timestamps in a [`FakeBackend`], scripted by each
/// task's [`FakeScript`] payload.
///
/// Not registered through inventory: register it explicitly with
/// `Registry::new().register::<FakeConfig>()`.
///
/// Capabilities: `push_notifications` as configured ([`FakeConfig::push`]), `cancel`,
/// `batch_status` and `recover` true, `deferred` false. Pushes go through the build context's
/// [`Notifier`]; each carries the JSON of the [`Status`] it reports as its body, the
/// execution's `auth_token` attribute, a `token` attribute, sequence 1 (Running) or 2
/// (Finished), and message id `<token>/<sequence>`.
#[derive(Debug)]
pub struct FakeDistributor {
    name: DistributorName,
    config: FakeConfig,
    backend: FakeBackend,
    notifier: Notifier,
}

impl FakeDistributor {
    /// An instance talking to the backend named in `config`.
    pub fn new(config: FakeConfig, ctx: BuildContext) -> Self {
        Self {
            name: ctx.name,
            backend: FakeBackend::named(&config.backend),
            config,
            notifier: ctx.notifier,
        }
    }

    /// Its backend.
    pub fn backend(&self) -> &FakeBackend {
        &self.backend
    }

    fn script(payload: &Value) -> Result<FakeScript> {
        serde_json::from_value(payload.clone())
            .map_err(|e| Error::permanent_from("fake: the payload is not a FakeScript", e))
    }

    fn pusher(&self) -> Option<Notifier> {
        self.config.push.then(|| self.notifier.clone())
    }
}

#[async_trait]
impl Distributor for FakeDistributor {
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let script = Self::script(&task.payload)?;
        self.backend.run(
            task,
            script,
            self.pusher(),
            self.config.poll_interval_ms.map(Duration::from_millis),
        )
    }

    async fn cancel(&self, execution: &Execution) -> Result<()> {
        self.backend.cancel(&execution.token)
    }

    async fn status(&self, execution: &Execution) -> Result<Status> {
        self.backend.record(backend::Call::Status {
            token: execution.token.clone(),
        });
        self.backend.answer(&execution.token)
    }

    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        self.backend.record(backend::Call::StatusBatch {
            tokens: executions.iter().map(|e| e.token.clone()).collect(),
        });
        executions
            .iter()
            .map(|e| self.backend.answer(&e.token))
            .collect()
    }

    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let mut url = Url::parse("fake://fake/").ok()?;
        url.path_segments_mut()
            .ok()?
            .pop_if_empty()
            .push(self.backend.name())
            .push(execution.token.as_str());
        Some(url)
    }

    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        self.backend.record(backend::Call::Notification {
            token: execution.token.clone(),
        });
        Ok(serde_json::from_slice::<Status>(&notification.data).ok())
    }

    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        let subject = format!("payload for distributor `{}`", self.name);
        let script = Self::script(payload).map_err(|e| ValidationError {
            subject: subject.clone(),
            violations: vec![Violation {
                pointer: String::new(),
                expected: "a fake script".into(),
                message: e.to_string(),
                suggestion: None,
            }],
        })?;
        let mut violations = Vec::new();
        if script.permanent_run_error.as_deref() == Some("") {
            violations.push(Violation {
                pointer: "/permanent_run_error".into(),
                expected: "a non-empty message".into(),
                message: "the permanent run error must not be empty: it becomes the reason".into(),
                suggestion: None,
            });
        }
        if script.hang && script.crash {
            violations.push(Violation {
                pointer: "/crash".into(),
                expected: "false when `hang` is true".into(),
                message: "`crash` has no effect on work that hangs (use FakeBackend::crash)".into(),
                suggestion: None,
            });
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                subject,
                violations,
            })
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: self.config.push,
            cancel: true,
            batch_status: true,
            recover: true,
            deferred: false,
        }
    }

    async fn recover(&self, execution: &Execution) -> Result<Status> {
        self.backend.record(backend::Call::Recover {
            token: execution.token.clone(),
        });
        let status = self.backend.answer(&execution.token)?;
        if let Some(notifier) = self.pusher() {
            self.backend.reattach(&execution.token, notifier);
        }
        Ok(status)
    }
}
