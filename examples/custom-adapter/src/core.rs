//! The client side: one GET with the adapter's retry loop, and the in-memory table of work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use distributor_core::push::HttpPush;
use distributor_core::{AbnormalKind, Error, Outcome, RequestId, Status, TaskDescription, Token};
use serde_json::json;
use tokio::task::AbortHandle;

use crate::config::{HttpGetConfig, HttpGetPayload};
use crate::error;

/// Where one piece of work is.
#[derive(Debug)]
enum Work {
    Running(AbortHandle),
    Done(Outcome),
}

/// The in-flight and finished requests of one instance, by token. In memory only: a restarted
/// process no longer knows them, and reports them `Missing`.
#[derive(Debug, Default)]
pub(crate) struct Table {
    work: Mutex<HashMap<Token, Work>>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Token, Work>> {
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `token` and starts `start()` unless the token is known (idempotent `run`).
    pub(crate) fn start_once(
        &self,
        token: &Token,
        start: impl FnOnce() -> tokio::task::JoinHandle<()>,
    ) {
        let mut g = self.lock();
        if !g.contains_key(token) {
            g.insert(token.clone(), Work::Running(start().abort_handle()));
        }
    }

    /// Records how the work ended (unless it was cancelled first); true if it did.
    pub(crate) fn finish(&self, token: &Token, outcome: Outcome) -> bool {
        if let Some(w @ Work::Running(_)) = self.lock().get_mut(token) {
            *w = Work::Done(outcome);
            return true;
        }
        false
    }

    /// The status of `token`; unknown tokens are `Missing`.
    pub(crate) fn status(&self, token: &Token) -> Status {
        match self.lock().get(token) {
            Some(Work::Running(_)) => Status::Running,
            Some(Work::Done(o)) => Status::Finished(o.clone()),
            None => Status::Finished(Outcome::abnormal(
                AbnormalKind::Missing,
                "this process has no record of the request (restarted?)",
            )),
        }
    }

    /// Aborts running work; finished or unknown work is left alone.
    pub(crate) fn cancel(&self, token: &Token) {
        if let Some(w @ Work::Running(_)) = self.lock().get_mut(token) {
            if let Work::Running(h) = w {
                h.abort();
            }
            *w = Work::Done(Outcome::abnormal(
                AbnormalKind::Cancelled,
                "cancelled before the response arrived",
            ));
        }
    }
}

/// What every GET of one instance shares.
#[derive(Debug)]
pub(crate) struct Fetcher {
    pub(crate) client: reqwest::Client,
    pub(crate) config: HttpGetConfig,
    /// The resolved `auth` secret. Never printed: `Debug` of [`Bearer`] hides it.
    pub(crate) bearer: Option<Bearer>,
}

/// A resolved bearer token.
pub(crate) struct Bearer(pub(crate) String);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

/// Tells the engine how the work ended by POSTing the outcome in the HTTP push format to the
/// task's notification target (when the embedder configured one; otherwise the engine polls).
/// Best effort: connection errors and 5xx are retried a few times with backoff, 4xx are not;
/// polling covers a push that never arrives.
pub(crate) async fn push_outcome(client: &reqwest::Client, task: &TaskDescription, o: &Outcome) {
    let Some(target) = &task.notify.target else {
        return;
    };
    let data = serde_json::to_value(o).unwrap_or_default();
    let body = HttpPush::new(task.execution_id, &task.notify.auth_token, data)
        .with_sequence(1)
        .to_body();
    let mut backoff = Duration::from_millis(50);
    for _ in 0..4 {
        let sent = client
            .post(target)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if !r.status().is_server_error() => return,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// GETs the payload's URL, retrying transient failures as configured, and says how it ended.
pub(crate) async fn fetch(
    fetcher: &Fetcher,
    payload: &HttpGetPayload,
    request_id: &RequestId,
) -> Outcome {
    let config = &fetcher.config;
    let mut backoff = Duration::from_millis(config.backoff_ms);
    let mut tries_left = config.retries;
    loop {
        match get_once(fetcher, payload, request_id).await {
            Ok(data) => return Outcome::Succeeded { data },
            Err(e) if e.is_transient() && tries_left > 0 => {
                tries_left -= 1;
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            Err(e) => {
                let tries = config.retries - tries_left + 1;
                return Outcome::abnormal(
                    AbnormalKind::Failed,
                    format!("{e} (after {tries} tries)"),
                );
            }
        }
    }
}

async fn get_once(
    fetcher: &Fetcher,
    payload: &HttpGetPayload,
    request_id: &RequestId,
) -> Result<serde_json::Value, Error> {
    let config = &fetcher.config;
    let mut req = fetcher
        .client
        .get(&payload.url)
        .timeout(Duration::from_millis(config.timeout_ms))
        .header("x-request-id", request_id.as_str());
    if let Some(Bearer(token)) = &fetcher.bearer {
        req = req.bearer_auth(token);
    }
    for (k, v) in &payload.headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.map_err(error::from_reqwest)?;
    let status = resp.status();
    let ok = payload
        .expect_status
        .map_or(status.is_success(), |want| status.as_u16() == want);
    if !ok {
        return Err(error::from_status(status));
    }
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.bytes().await.map_err(error::from_reqwest)?;
    let kept = &body[..body.len().min(config.keep_bytes)];
    Ok(json!({
        "status": status.as_u16(),
        "content_type": content_type,
        "bytes": body.len(),
        "body": String::from_utf8_lossy(kept),
    }))
}
