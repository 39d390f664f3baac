//! The `Distributor` impl: a Jobs API server embedded in the orchestrator.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Capabilities, Distributor, Error, Execution,
    KindConfig, Launch, Notification, Outcome, Result, Status, TaskDescription, ValidationError,
    Violation,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use url::Url;

use crate::config::{JobsConfig, JobsPayload};
use crate::core::{Settings, Shared, now_ms};
use crate::error::JobsError;
use crate::queue::{Budget, Job, JobState, Queue, Refusal};
use crate::{api, store};

#[async_trait]
impl KindConfig for JobsConfig {
    const KIND: &'static str = "jobs";
    type Payload = JobsPayload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(JobsServer::start(self, ctx).await?)
    }
}

/// A running `jobs` distributor: the Jobs API server, its lease reaper and its queue file.
///
/// Dropping it stops the server (without waiting); [`JobsServer::shutdown`] stops it and waits
/// until the port and the database file are released, so a new instance can take them over.
pub struct JobsServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    run_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for JobsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for JobsServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn settings(cfg: &JobsConfig, addr: SocketAddr) -> Result<Settings, JobsError> {
    let mut names = HashSet::new();
    let mut tokens = HashSet::new();
    for w in &cfg.workers {
        if !names.insert(w.name.as_str()) {
            return Err(JobsError::Config(format!(
                "worker `{}` is listed twice",
                w.name
            )));
        }
        if !tokens.insert(w.token.as_str()) {
            return Err(JobsError::Config(format!(
                "worker `{}` shares its token with another worker",
                w.name
            )));
        }
    }
    let public_url = match &cfg.public_url {
        Some(u) => u.clone(),
        None => Url::parse(&format!("http://{addr}/"))
            .map_err(|e| JobsError::Config(format!("listen address `{addr}`: {e}")))?,
    };
    Ok(Settings {
        lease_ms: cfg.lease_ms.max(1),
        long_poll: Duration::from_millis(cfg.long_poll_ms),
        tokens: cfg
            .workers
            .iter()
            .map(|w| (w.token.clone(), Arc::from(w.name.as_str())))
            .collect(),
        public_url,
    })
}

fn token_id(e: &Execution) -> Option<i64> {
    e.token.as_str().parse().ok()
}

fn missing(reason: impl Into<String>) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

impl JobsServer {
    /// Opens the queue file, loads the unfinished jobs, binds `config.listen` and starts
    /// serving. Pushes go to `ctx.notifier`.
    ///
    /// Errors: the address is in use (transient); a bad address, duplicate worker or unusable
    /// database (permanent).
    pub async fn start(config: JobsConfig, ctx: BuildContext) -> Result<Arc<Self>> {
        Ok(Self::start_inner(config, ctx).await?)
    }

    async fn start_inner(config: JobsConfig, ctx: BuildContext) -> Result<Arc<Self>, JobsError> {
        let listen: SocketAddr = config
            .listen
            .parse()
            .map_err(|e| JobsError::Config(format!("`listen` = `{}`: {e}", config.listen)))?;
        let (store, conn) = store::open(&config.database).await?;
        let (live, next_id) = store.load_live().await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| JobsError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| JobsError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let settings = settings(&config, addr)?;
        let (wtx, wrx) = mpsc::unbounded_channel();
        let budget = Budget {
            lease_ms: settings.lease_ms,
            max_reoffers: config.max_reoffers,
        };
        let queue = Queue::new(live, next_id, budget, wtx, now_ms());
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            settings,
            queue,
            store,
            ctx.notifier,
            stop_rx.clone(),
        ));
        let writer = tokio::spawn(store::writer(conn, wrx));
        let app = api::router(shared.clone());
        let mut shutdown = stop_rx.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "jobs: server stopped");
            }
        });
        let reaper = tokio::spawn(shared.clone().reap());
        tracing::info!(%addr, name = %ctx.name, "jobs: serving");
        Ok(Arc::new(Self {
            shared,
            addr,
            stop,
            tasks: Mutex::new(vec![server, reaper, writer]),
            run_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of the API on the local address, e.g. `http://127.0.0.1:8089/`.
    pub fn local_url(&self) -> Url {
        Url::parse(&format!("http://{}/", self.addr))
            .unwrap_or_else(|_| self.shared.settings.public_url.clone())
    }

    /// Stops serving, lets in-flight writes commit, and releases the port and the database.
    /// Later calls on this instance fail with a transient error. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = {
            let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            t.drain(..).collect()
        };
        let mut tasks = tasks.into_iter();
        // Server and reaper first; then close the queue so the writer drains and exits.
        for t in tasks.by_ref().take(2) {
            let _ = t.await;
        }
        self.shared.lock().close();
        for t in tasks {
            let _ = t.await;
        }
        self.shared.store.close().await;
    }

    fn refusal(r: Refusal) -> Error {
        match r {
            Refusal::Api(a) => Error::transient(a.message),
            Refusal::NotLive => Error::transient("job vanished"),
        }
    }
}

#[async_trait]
impl Distributor for JobsServer {
    /// Queues a job. Idempotent per request id: a known request id (live or finished, also
    /// across restarts) returns the same job id as token and queues nothing.
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let payload: JobsPayload =
            serde_json::from_value(task.payload.clone()).map_err(JobsError::Payload)?;
        let launch = |id: i64| Launch {
            token: id.to_string().into(),
            handle: AdapterHandle {
                version: 1,
                data: json!({ "job": id }),
            },
            poll_interval: None,
        };
        let req = task.request_id.as_str();
        let _serial = self.run_lock.lock().await;
        // Memory first, then the file: a job leaves memory only after its final row is
        // committed, so a request is always found in one of the two.
        let known = self.shared.lock().by_request(req);
        let known = match known {
            Some(id) => Some(id),
            None => self.shared.store.find_request(req).await?,
        };
        if let Some(id) = known {
            // Make sure the insert of a job found in memory is committed before answering.
            self.shared
                .apply(true, |_, _| Ok(()))
                .await
                .map_err(Self::refusal)?;
            return Ok(launch(id));
        }
        let now = now_ms();
        let payload_text = serde_json::to_string(&task.payload).map_err(JobsError::Payload)?;
        let id = self
            .shared
            .apply(false, |q, fx| {
                let id = q.next_id();
                q.insert(
                    Job {
                        id,
                        request_id: Arc::from(req),
                        execution_id: task.execution_id.0,
                        task_type: Arc::from(payload.task_type.as_str()),
                        priority: payload.priority,
                        payload: Arc::from(payload_text),
                        input: Arc::new(payload.input),
                        activation: Arc::from(hex::encode(rand::random::<[u8; 16]>())),
                        auth_token: Arc::from(task.notify.auth_token.0.as_str()),
                        state: JobState::Queued,
                        cancel_requested: false,
                        worker: None,
                        lease_id: None,
                        lease_gen: 0,
                        lease_expires: None,
                        offers: 0,
                        stage: None,
                        progress: None,
                        message: None,
                        outcome: None,
                        seq: 0,
                        created_ms: now,
                        updated_ms: now,
                        heartbeat_ms: None,
                    },
                    fx,
                );
                Ok(id)
            })
            .await
            .map_err(Self::refusal)?;
        Ok(launch(id))
    }

    /// Cancels: a queued job ends `Cancelled` at once; a held job is flagged and its worker is
    /// told on its next heartbeat; it ends `Cancelled` when the worker releases it (or reports
    /// an error) or its lease lapses. Unknown and finished jobs: `Ok`.
    async fn cancel(&self, execution: &Execution) -> Result<()> {
        let Some(id) = token_id(execution) else {
            return Ok(());
        };
        let now = now_ms();
        self.shared
            .apply(false, |q, fx| {
                q.cancel(id, now, fx);
                Ok(())
            })
            .await
            .map_err(Self::refusal)
    }

    /// Answers from the committed SQLite state: queued → `Pending`, claimed or running →
    /// `Running`, finished → its outcome; unknown tokens (or a job of another request) →
    /// `Missing`.
    async fn status(&self, execution: &Execution) -> Result<Status> {
        let Some(id) = token_id(execution) else {
            return Ok(missing(format!("`{}` is not a job id", execution.token)));
        };
        let Some(view) = self.shared.store.view(id).await? else {
            return Ok(missing(format!("no job {id}")));
        };
        if view.request_id != execution.request_id.as_str() {
            return Ok(missing(format!("job {id} belongs to another request")));
        }
        Ok(view.state.status(view.outcome.as_ref()))
    }

    /// `<public_url>/status?job=<token>#job-<token>`: the job's entry on the status page.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let mut url = self.shared.settings.public_url.join("status").ok()?;
        url.query_pairs_mut()
            .append_pair("job", execution.token.as_str());
        url.set_fragment(Some(&format!("job-{}", execution.token)));
        Some(url)
    }

    /// Reads the pushes this adapter sends: `{"job": <id>, "status": <Status>}`. Anything
    /// else, or a push about another job, is ignored (`Ok(None)`).
    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        let Ok(body) = notification.data_json() else {
            return Ok(None);
        };
        let job = body.get("job").and_then(Value::as_i64);
        if job.is_none() || job != token_id(execution) {
            return Ok(None);
        }
        Ok(body
            .get("status")
            .and_then(|s| serde_json::from_value::<Status>(s.clone()).ok()))
    }

    /// Rejects a blank `task_type` (the schema already demands a non-empty string).
    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        match payload.get("task_type").and_then(Value::as_str) {
            Some(t) if t.trim().is_empty() => Err(ValidationError {
                subject: "payload for kind `jobs`".into(),
                violations: vec![Violation {
                    pointer: "/task_type".into(),
                    expected: "a task type name".into(),
                    message: "`task_type` is blank".into(),
                    suggestion: None,
                }],
            }),
            _ => Ok(()),
        }
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

    /// The queue state is in SQLite and reloaded at start: recovering is reading it.
    async fn recover(&self, execution: &Execution) -> Result<Status> {
        self.status(execution).await
    }
}
