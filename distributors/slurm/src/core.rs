//! The slurmrestd client: authenticated requests, and the version-neutral calls the backend
//! makes (submit, one job, all jobs, cancel).

use std::sync::RwLock;
use std::time::Duration;

use distributor_core::{Error, Result};
use reqwest::{Method, StatusCode};

use crate::api::{RestApi, for_version};
use crate::config::{SlurmConfig, TokenSource, resolve_token};
use crate::error::{Class, Failure, SlurmError, TransportKind};
use crate::job::{JobId, JobInfo, JobSpec};

/// A slurmrestd client for one user and API version.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// `<url>/slurm/<version>` without a trailing slash.
    prefix: String,
    api: Box<dyn RestApi>,
    user: String,
    token_source: TokenSource,
    token: RwLock<String>,
}

impl Client {
    /// Builds a client; reads the token now. Errors are permanent (bad token source).
    pub(crate) fn new(config: &SlurmConfig) -> Result<Self> {
        let token = resolve_token(&config.token)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::permanent_from("building the slurmrestd http client", e))?;
        let api = for_version(config.api_version);
        Ok(Self {
            http,
            prefix: format!(
                "{}/slurm/{}",
                config.url.as_str().trim_end_matches('/'),
                api.version()
            ),
            api,
            user: config.user.clone(),
            token_source: config.token.clone(),
            token: RwLock::new(token),
        })
    }

    fn current_token(&self) -> String {
        match self.token.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the token from its source; true if it changed.
    fn reload_token(&self) -> bool {
        let Ok(fresh) = resolve_token(&self.token_source) else {
            return false;
        };
        let mut t = match self.token.write() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        if *t == fresh {
            return false;
        }
        *t = fresh;
        true
    }

    /// Sends one request; on HTTP 401 re-reads the token and, if it changed, tries once more.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), Failure> {
        let mut retried = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}/{path}", self.prefix))
                .header("X-SLURM-USER-NAME", &self.user)
                .header("X-SLURM-USER-TOKEN", self.current_token());
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(transport)?;
            if status == StatusCode::UNAUTHORIZED && !retried && self.reload_token() {
                retried = true;
                continue;
            }
            return Ok((status, bytes.to_vec()));
        }
    }

    /// The failure for an unsuccessful reply.
    fn rest_failure(&self, status: StatusCode, body: &[u8]) -> Failure {
        let errors = self.api.parse_errors(body).unwrap_or_default();
        Failure::Rest {
            status: status.as_u16(),
            body: if errors.is_empty() {
                snippet(body)
            } else {
                String::new()
            },
            errors,
        }
    }

    /// Submits a job and returns its id.
    pub(crate) async fn submit(&self, spec: &JobSpec) -> Result<JobId, Failure> {
        let body = self.api.submit_body(spec);
        let (status, bytes) = self.send(Method::POST, "job/submit", Some(&body)).await?;
        if !status.is_success() {
            return Err(self.rest_failure(status, &bytes));
        }
        let reply = self.api.parse_submit(&bytes).map_err(Failure::Decode)?;
        match reply.value {
            Some(id) => Ok(id),
            None => Err(Failure::Rest {
                status: status.as_u16(),
                errors: reply.errors,
                body: "submit reply without a job id".into(),
            }),
        }
    }

    /// One job; `None` when slurmctld does not know it.
    pub(crate) async fn job(&self, id: JobId) -> Result<Option<JobInfo>, Failure> {
        let (status, bytes) = self.send(Method::GET, &format!("job/{id}"), None).await?;
        if !status.is_success() {
            let f = self.rest_failure(status, &bytes);
            return match f.class() {
                Class::UnknownJob => Ok(None),
                _ => Err(f),
            };
        }
        let reply = self.api.parse_jobs(&bytes).map_err(Failure::Decode)?;
        Ok(reply.value.into_iter().find(|j| j.job_id == id))
    }

    /// Every job slurmctld knows (one request).
    pub(crate) async fn jobs(&self) -> Result<Vec<JobInfo>, Failure> {
        let (status, bytes) = self.send(Method::GET, "jobs", None).await?;
        if !status.is_success() {
            return Err(self.rest_failure(status, &bytes));
        }
        let reply = self.api.parse_jobs(&bytes).map_err(Failure::Decode)?;
        Ok(reply.value)
    }

    /// Cancels a job (`DELETE`, which sends SIGKILL). Unknown and finished jobs are Ok.
    pub(crate) async fn cancel(&self, id: JobId) -> Result<(), Failure> {
        let (status, bytes) = self
            .send(Method::DELETE, &format!("job/{id}"), None)
            .await?;
        let errors: Vec<SlurmError> = if status.is_success() {
            self.api.parse_errors(&bytes).unwrap_or_default()
        } else {
            let f = self.rest_failure(status, &bytes);
            return match f.class() {
                Class::UnknownJob | Class::AlreadyDone => Ok(()),
                _ => Err(f),
            };
        };
        let f = Failure::Rest {
            status: status.as_u16(),
            errors,
            body: String::new(),
        };
        match &f {
            Failure::Rest { errors, .. } if errors.is_empty() => Ok(()),
            _ => match f.class() {
                Class::UnknownJob | Class::AlreadyDone => Ok(()),
                _ => Err(f),
            },
        }
    }
}

fn transport(e: reqwest::Error) -> Failure {
    Failure::Transport {
        kind: TransportKind::of(&e),
        source: e,
    }
}

/// The first 200 characters of a non-JSON body, for error messages.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(200)
        .collect()
}
