//! A small client of the HTTP API, used by `orchestrator submit|status|cancel|list`.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use crate::api::{ErrorBody, ErrorResponse, ExecutionView, SubmitRequest, Submitted};
use crate::duration::elapsed;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server URL is not usable.
    #[error("bad server URL `{0}`: {1}")]
    Url(String, url::ParseError),
    /// The server could not be reached or answered garbage.
    #[error("cannot talk to {url}: {source}")]
    Http {
        /// The URL asked.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{status}: {}", describe(.body))]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
}

fn describe(b: &ErrorBody) -> String {
    let mut s = b.message.clone();
    if let Some(f) = &b.field {
        s.push_str(&format!(" [field {f}]"));
    }
    if let Some(p) = &b.parameter {
        s.push_str(&format!(" [parameter {p}]"));
    }
    s
}

/// A client of one orchestrator server.
#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `server` (`http://127.0.0.1:8080`).
    ///
    /// Errors: [`ClientError::Url`] when `server` is not a URL.
    pub fn new(server: &str) -> Result<Self, ClientError> {
        let base = Url::parse(server).map_err(|e| ClientError::Url(server.into(), e))?;
        Ok(Self {
            base,
            http: reqwest::Client::new(),
            token: None,
        })
    }

    /// Sends `token` as `Authorization: Bearer` with every call.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path)
            .map_err(|e| ClientError::Url(path.into(), e))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut url = self.url(path)?;
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let http = |source| ClientError::Http {
            url: url.to_string(),
            source,
        };
        let mut req = self.http.request(method, url.clone());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(http)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(http);
        }
        let text = resp.text().await.map_err(http)?;
        let body = serde_json::from_str::<ErrorResponse>(&text)
            .map(|e| e.error)
            .unwrap_or(ErrorBody {
                code: "http".into(),
                message: text,
                field: None,
                parameter: None,
                violations: Vec::new(),
            });
        Err(ClientError::Api {
            status: status.as_u16(),
            body,
        })
    }

    /// Submits a task.
    ///
    /// Errors: transport errors, or the server's 4xx/5xx answer.
    ///
    /// Without a `request_id` one is generated, so that the call can be repeated safely: when
    /// the server cannot be reached or the answer is lost, it is sent again (up to 3 times in
    /// all) with the same key, and the server answers the first submission's id instead of
    /// creating a second execution.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<Submitted, ClientError> {
        let mut req = req.clone();
        if req.request_id.is_none() {
            req.request_id = Some(format!("cli-{}", hex::encode(rand::random::<[u8; 16]>())));
        }
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .call(reqwest::Method::POST, "/v1/executions", &[], Some(&req))
                .await
            {
                Err(ClientError::Http { .. }) if tries < 3 => continue,
                r => return r,
            }
        }
    }

    /// One execution with its history.
    ///
    /// Errors: transport errors; 404 for an unknown id.
    pub async fn get(&self, id: u64) -> Result<ExecutionView, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/executions/{id}"),
            &[],
            None::<&()>,
        )
        .await
    }

    /// Requests cancellation.
    ///
    /// Errors: transport errors; 404 for an unknown id.
    pub async fn cancel(
        &self,
        id: u64,
        reason: Option<&str>,
    ) -> Result<ExecutionView, ClientError> {
        let body = serde_json::json!({ "reason": reason });
        self.call(
            reqwest::Method::POST,
            &format!("/v1/executions/{id}/cancel"),
            &[],
            Some(&body),
        )
        .await
    }

    /// Executions matching `query` (`state`, `distributor`, `label`, …).
    ///
    /// Errors: transport errors; 400 naming a bad parameter.
    pub async fn list(&self, query: &[(&str, String)]) -> Result<Vec<ExecutionView>, ClientError> {
        let v: Value = self
            .call(reqwest::Method::GET, "/v1/executions", query, None::<&()>)
            .await?;
        serde_json::from_value(v["executions"].clone()).map_err(|e| ClientError::Api {
            status: 200,
            body: ErrorBody {
                code: "bad_response".into(),
                message: e.to_string(),
                field: None,
                parameter: None,
                violations: Vec::new(),
            },
        })
    }
}

/// Prints a one-execution summary for people.
#[derive(Debug)]
pub struct Pretty<'a>(pub &'a ExecutionView);

impl fmt::Display for Pretty<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        writeln!(
            f,
            "execution {} (task {}, attempt {})",
            v.id, v.task_id, v.attempt
        )?;
        writeln!(f, "  distributor  {} ({})", v.distributor, v.kind)?;
        writeln!(f, "  state        {}", v.state)?;
        if let Some(o) = &v.outcome {
            writeln!(
                f,
                "  outcome      {}",
                serde_json::to_string(o).unwrap_or_default()
            )?;
        }
        if let Some(u) = &v.info_url {
            writeln!(f, "  info         {u}")?;
        }
        if let Some(n) = v.retried_by {
            writeln!(f, "  retried by   {n}")?;
        }
        for h in &v.history {
            let at = v.created_at.until(h.at);
            writeln!(
                f,
                "  +{:<8} {:<12} {}",
                elapsed(at),
                h.to.to_string(),
                h.reason
            )?;
        }
        Ok(())
    }
}
