//! The `Distributor` implementation and the kind's capabilities.

use std::sync::Arc;

use distributor_core::reexports::async_trait;
use distributor_core::{
    BuildContext, Capabilities, Distributor, Error, Execution, KindConfig, Launch, Notification,
    Outcome, Result, Status, TaskDescription, Token, ValidationError,
};
use serde_json::Value;
use url::Url;

use crate::config::{HttpGetConfig, HttpGetPayload};
use crate::core::{Bearer, Fetcher, Table, fetch, push_outcome};

/// An `http-get` instance: each execution is one GET (with retries) run on the engine's runtime.
#[derive(Debug)]
pub struct HttpGetDistributor {
    fetcher: Arc<Fetcher>,
    table: Arc<Table>,
}

#[async_trait]
impl KindConfig for HttpGetConfig {
    const KIND: &'static str = "http-get";
    type Payload = HttpGetPayload;

    /// Errors (permanent; the engine names the instance): the `auth` secret cannot be read, or
    /// the HTTP client cannot be built.
    async fn build(self, _ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        let bearer = match &self.auth {
            Some(secret) => Some(Bearer(
                secret
                    .resolve()
                    .map_err(|e| Error::permanent(format!("`auth`: {e}")))?,
            )),
            None => None,
        };
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| Error::permanent_from("cannot build the HTTP client", e))?;
        Ok(Arc::new(HttpGetDistributor {
            fetcher: Arc::new(Fetcher {
                client,
                config: self,
                bearer,
            }),
            table: Arc::default(),
        }))
    }
}

fn payload_of(v: &Value) -> Result<HttpGetPayload> {
    serde_json::from_value(v.clone())
        .map_err(|e| Error::permanent(format!("invalid payload for kind `http-get`: {e}")))
}

#[async_trait]
impl Distributor for HttpGetDistributor {
    /// Starts the GET in the background. The token is the request id, so a repeated `run` finds
    /// the same work and starts nothing. The server receives the request id as `x-request-id`.
    /// When the work ends, its outcome is pushed to the task's notification target.
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let payload = payload_of(&task.payload)?;
        payload.parsed_url()?;
        let token = Token::new(task.request_id.as_str());
        let (fetcher, table) = (self.fetcher.clone(), self.table.clone());
        let (t, task) = (token.clone(), task.clone());
        self.table.start_once(&token, move || {
            tokio::spawn(async move {
                let outcome = fetch(&fetcher, &payload, &task.request_id).await;
                if table.finish(&t, outcome.clone()) {
                    push_outcome(&fetcher.client, &task, &outcome).await;
                }
            })
        });
        let mut launch = Launch::new(token);
        launch.poll_interval = Some(std::time::Duration::from_millis(100));
        Ok(launch)
    }

    async fn cancel(&self, execution: &Execution) -> Result<()> {
        self.table.cancel(&execution.token);
        Ok(())
    }

    async fn status(&self, execution: &Execution) -> Result<Status> {
        Ok(self.table.status(&execution.token))
    }

    /// The URL being fetched.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        payload_of(&execution.payload).ok()?.parsed_url().ok()
    }

    /// A push carries the outcome as JSON (see `core::push_outcome`); anything else is
    /// ignored.
    async fn handle_notification(&self, _: &Execution, n: &Notification) -> Result<Option<Status>> {
        Ok(serde_json::from_slice::<Outcome>(&n.data)
            .ok()
            .map(Status::Finished))
    }

    /// Beyond the schema: the URL must parse and be `http`.
    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        match payload_of(payload) {
            Ok(p) => p.parsed_url().map(|_| ()),
            Err(_) => Ok(()), // the schema has already reported it
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: true,
            cancel: true,
            batch_status: false,
            recover: false,
            deferred: false,
        }
    }
}
