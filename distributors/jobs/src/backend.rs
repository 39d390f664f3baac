//! The `Distributor` impl: a Jobs API server embedded in the orchestrator.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Capabilities, Distributor, Error, Execution,
    KindConfig, Launch, Notification, Notifier, Outcome, Result, Status, TaskDescription,
    ValidationError, Violation,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
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

/// A `jobs` distributor instance: a handle on the Jobs API server of its queue file.
///
/// The server (HTTP listener, lease reaper, group-commit writer) runs on its own runtime
/// thread, so it does not depend on the runtime of whoever built it. Instances built in one
/// process with the same `database` and an identical config share one server (an engine may
/// hold an old and a new instance across a config reload); with a different config they are
/// refused, since one queue file MUST have one owner. Pushes about a job go to the notifier of
/// the instance that ran it. The server stops when the last instance is dropped (without
/// waiting) or on [`JobsServer::shutdown`] (waiting until the port and the file are released).
pub struct JobsServer {
    core: Arc<Core>,
    notifier: Notifier,
}

impl fmt::Debug for JobsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobsServer")
            .field("addr", &self.core.addr)
            .finish_non_exhaustive()
    }
}

/// One running server, shared by the instances of one queue file.
struct Core {
    shared: Arc<Shared>,
    addr: SocketAddr,
    config: JobsConfig,
    stop: watch::Sender<bool>,
    done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    run_lock: tokio::sync::Mutex<()>,
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Servers running in this process, by absolute queue file path.
static SERVING: tokio::sync::Mutex<BTreeMap<PathBuf, Weak<Core>>> =
    tokio::sync::Mutex::const_new(BTreeMap::new());

fn settings(cfg: &JobsConfig, addr: SocketAddr) -> Result<Settings, JobsError> {
    let mut names = HashSet::new();
    let mut tokens = BTreeMap::new();
    for (i, w) in cfg.workers.iter().enumerate() {
        if !names.insert(w.name.as_str()) {
            return Err(JobsError::Config(format!(
                "worker `{}` is listed twice",
                w.name
            )));
        }
        let token = w.token.resolve().map_err(|e| {
            JobsError::Config(format!("/workers/{i}/token (worker `{}`): {e}", w.name))
        })?;
        if tokens
            .insert(token, Arc::<str>::from(w.name.as_str()))
            .is_some()
        {
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
        tokens: tokens.into_iter().collect(),
        public_url,
    })
}

fn token_id(e: &Execution) -> Option<i64> {
    e.token.as_str().parse().ok()
}

fn missing(reason: impl Into<String>) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

/// Opens the file, loads the queue, binds, and spawns the server's tasks on the current
/// runtime (the server thread's). Returns the shared state, the address and the tasks.
async fn serve(
    config: &JobsConfig,
    stop: watch::Receiver<bool>,
) -> Result<(Arc<Shared>, SocketAddr, Vec<JoinHandle<()>>), JobsError> {
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
    let settings = settings(config, addr)?;
    let (wtx, wrx) = mpsc::unbounded_channel();
    let budget = Budget {
        lease_ms: settings.lease_ms,
        max_reoffers: config.max_reoffers,
    };
    let queue = Queue::new(live, next_id, budget, wtx, now_ms());
    let shared = Arc::new(Shared::new(settings, queue, store, stop.clone()));
    let writer = tokio::spawn(store::writer(conn, wrx));
    let app = api::router(shared.clone());
    let mut shutdown = stop;
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
    Ok((shared, addr, vec![server, reaper, writer]))
}

impl Core {
    /// Starts a server on its own runtime thread.
    async fn start(config: JobsConfig) -> Result<Arc<Self>, JobsError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let (stop, stop_rx) = watch::channel(false);
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("jobs-server".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("jobs-server")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(JobsError::Config(format!("runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let (shared, addr, tasks) = match serve(&cfg, stop_rx.clone()).await {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok((shared.clone(), addr)));
                    let mut stop = stop_rx;
                    let _ = stop.wait_for(|s| *s).await;
                    let mut tasks = tasks.into_iter();
                    // Server and reaper first; then close the queue so the writer drains.
                    for t in tasks.by_ref().take(2) {
                        let _ = t.await;
                    }
                    shared.lock().close();
                    for t in tasks {
                        let _ = t.await;
                    }
                    shared.store.close().await;
                });
                rt.shutdown_background();
                let _ = done_tx.send(());
            });
        if let Err(e) = thread {
            return Err(JobsError::Config(format!(
                "cannot start the server thread: {e}"
            )));
        }
        let (shared, addr) = ready_rx.await.map_err(|_| JobsError::Shutdown)??;
        tracing::info!(%addr, "jobs: serving");
        Ok(Arc::new(Self {
            shared,
            addr,
            config,
            stop,
            done: tokio::sync::Mutex::new(Some(done_rx)),
            run_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

impl JobsServer {
    /// Starts serving `config` (or joins the server already serving its queue file in this
    /// process with the identical config). Pushes about the jobs this instance runs go to
    /// `ctx.notifier`.
    ///
    /// Errors: the address is in use (transient); a bad address, a duplicate worker, an
    /// unusable database, or a queue file served here with another config (permanent).
    pub async fn start(config: JobsConfig, ctx: BuildContext) -> Result<Arc<Self>> {
        let key = std::path::absolute(&config.database).map_err(|e| {
            JobsError::Config(format!("`database` = {}: {e}", config.database.display()))
        })?;
        let mut serving = SERVING.lock().await;
        let running = serving
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|c| !c.stopping());
        let core = match running {
            Some(core) if core.config == config => core,
            Some(_) => {
                return Err(JobsError::Config(format!(
                    "{} is already served in this process by a jobs instance with another config",
                    key.display()
                ))
                .into());
            }
            None => {
                let core = Core::start(config).await?;
                serving.retain(|_, w| w.strong_count() > 0);
                serving.insert(key, Arc::downgrade(&core));
                core
            }
        };
        drop(serving);
        core.shared.set_fallback(ctx.notifier.clone());
        Ok(Arc::new(Self {
            core,
            notifier: ctx.notifier,
        }))
    }

    /// The address the API listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.core.addr
    }

    /// The base URL of the API on the local address, e.g. `http://127.0.0.1:8089/`.
    pub fn local_url(&self) -> Url {
        Url::parse(&format!("http://{}/", self.core.addr))
            .unwrap_or_else(|_| self.core.shared.settings.public_url.clone())
    }

    /// Stops the server (for every instance sharing it), lets in-flight writes commit, and
    /// waits until the port and the queue file are released. Later calls on these instances
    /// fail with a transient error. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.core.stop.send(true);
        if let Some(done) = self.core.done.lock().await.take() {
            let _ = done.await;
        }
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
        // Runs are serialised from the lookup until the new job is in the queue (not until it
        // is committed), so two runs of one request id cannot both miss.
        let serial = self.core.run_lock.lock().await;
        // Memory first, then the file: a job leaves memory only after its final row is
        // committed, so a request is always found in one of the two.
        let known = self.core.shared.lock().by_request(req);
        let known = match known {
            Some(id) => Some(id),
            None => self.core.shared.store.find_request(req).await?,
        };
        if let Some(id) = known {
            drop(serial);
            // Make sure the insert of a job found in memory is committed before answering.
            self.core
                .shared
                .apply(true, |_, _| Ok(()))
                .await
                .map_err(Self::refusal)?;
            return Ok(launch(id));
        }
        let now = now_ms();
        let payload_text = serde_json::to_string(&task.payload).map_err(JobsError::Payload)?;
        let shared = &self.core.shared;
        let notifier = self.notifier.clone();
        let id = shared
            .apply(false, move |q, fx| {
                let id = q.next_id();
                // Route before the job can be claimed (and pushed about).
                shared.route(id, notifier);
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
                drop(serial);
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
        self.core
            .shared
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
        let Some(view) = self.core.shared.store.view(id).await? else {
            return Ok(missing(format!("no job {id}")));
        };
        if view.request_id != execution.request_id.as_str() {
            return Ok(missing(format!("job {id} belongs to another request")));
        }
        Ok(view.state.status(view.outcome.as_ref()))
    }

    /// `<public_url>/status?job=<token>#job-<token>`: the job's entry on the status page.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let mut url = self.core.shared.settings.public_url.join("status").ok()?;
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

    // `recover` keeps the trait's default (ask `status`): the queue state is in SQLite and
    // reloaded at start, so recovering is reading it.
}

#[cfg(test)]
mod tests {
    use distributor_core::Secret;

    use super::*;
    use crate::config::WorkerCredential;

    fn config(tokens: Vec<Secret>) -> JobsConfig {
        JobsConfig {
            listen: "127.0.0.1:0".into(),
            workers: tokens
                .into_iter()
                .enumerate()
                .map(|(i, token)| WorkerCredential {
                    name: format!("w{i}"),
                    token,
                })
                .collect(),
            database: PathBuf::from("unused.sqlite"),
            lease_ms: 1000,
            max_reoffers: 1,
            long_poll_ms: 1000,
            public_url: None,
        }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn worker_tokens_are_read_from_files_and_literals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();
        let s = settings(&config(vec![Secret::File(path), "literal".into()]), addr()).unwrap();
        let mut tokens: Vec<(&str, &str)> =
            s.tokens.iter().map(|(t, n)| (t.as_str(), &**n)).collect();
        tokens.sort();
        assert_eq!(tokens, [("from-file", "w0"), ("literal", "w1")]);
    }

    #[test]
    fn an_unreadable_token_names_the_worker_and_field() {
        let e = settings(
            &config(vec![
                "ok".into(),
                Secret::Env("DISTRIBUTOR_JOBS_NO_SUCH_VAR".into()),
            ]),
            addr(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/workers/1/token (worker `w1`)")
                && e.contains("DISTRIBUTOR_JOBS_NO_SUCH_VAR"),
            "{e}"
        );
        let e = settings(&config(vec!["same".into(), "same".into()]), addr())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shares its token"), "{e}");
    }

    #[test]
    fn the_snapshot_of_a_config_holds_no_literal_token() {
        let v = serde_json::to_value(config(vec!["s3cret".into()])).unwrap();
        assert_eq!(v["workers"][0]["token"], json!({"redacted": true}));
        assert!(!v.to_string().contains("s3cret"));
    }
}
