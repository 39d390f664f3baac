//! The `Distributor` impl: publishes work to the JetStream work queue and follows it through
//! the execution records the workers write.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage as Publish, stream};
use async_trait::async_trait;
use bytes::Bytes;
use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Capabilities, Distributor, Execution, ExecutionId,
    KindConfig, Launch, Notification, Notifier, Outcome, Result, Status, TaskDescription,
    ValidationError, Violation,
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use url::Url;

use crate::config::{Layout, NatsConfig, NatsPayload, is_name, request_key};
use crate::core::{
    Delivery, Records, Stored, Write, connect, ensure_bucket, ensure_consumer, ensure_stream,
    now_ms, read_job, remove_job,
};
use crate::error::NatsError;
use crate::wire::{ExecRecord, JobMessage, RecordState};

#[async_trait]
impl KindConfig for NatsConfig {
    const KIND: &'static str = "nats";
    type Payload = NatsPayload;

    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>> {
        Ok(NatsDistributor::connect(self, ctx.notifier).await?)
    }
}

/// A `nats` distributor instance: a connection to the broker, a watch on the execution records
/// (the push path) and a subscription to the MaxDeliver advisories of its stream.
///
/// Instances sharing a stream (several orchestrators, or an old and a new instance across a
/// config reload) cooperate: every write is a compare-and-set on the execution record, so the
/// first activation wins and a result is written once. An instance pushes notifications only
/// about executions it ran or recovered. Its background tasks stop when it is dropped.
pub struct NatsDistributor {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for NatsDistributor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsDistributor")
            .field("stream", &self.inner.layout.stream)
            .field("servers", &self.inner.config.servers)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsDistributor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Inner {
    config: NatsConfig,
    layout: Layout,
    js: jetstream::Context,
    stream: stream::Stream,
    records: Records,
    delivery: Delivery,
    /// Task types whose consumer exists.
    consumers: tokio::sync::Mutex<HashSet<String>>,
    /// Executions this instance pushes about, by request key.
    routes: Mutex<HashMap<String, Route>>,
    notifier: Notifier,
}

struct Route {
    execution: ExecutionId,
    /// The phase pushed last (`running` or `finished`), so a heartbeat is not pushed again.
    last: Option<&'static str>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn missing(reason: impl Into<String>) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

fn token_seq(e: &Execution) -> Option<u64> {
    e.token.as_str().parse().ok()
}

/// Checks the parts of the config the schema cannot: subjects of task types.
fn check_config(config: &NatsConfig, layout: &Layout) -> Result<(), NatsError> {
    let under = format!("{}.jobs.", layout.prefix);
    let mut subjects = HashSet::new();
    for (task_type, t) in &config.task_types {
        if !is_name(task_type) {
            return Err(NatsError::Config(format!(
                "task type `{task_type}` (/task_types/{task_type}): use letters, digits, `_` and `-`"
            )));
        }
        let subject = t
            .subject
            .clone()
            .unwrap_or_else(|| layout.default_subject(task_type));
        let valid = subject.starts_with(&under)
            && subject
                .split('.')
                .all(|tok| !tok.is_empty() && tok != "*" && tok != ">" && !tok.contains(' '));
        if !valid {
            return Err(NatsError::Config(format!(
                "/task_types/{task_type}/subject: `{subject}` must be a subject without \
                 wildcards under `{under}`"
            )));
        }
        if !subjects.insert(subject.clone()) {
            return Err(NatsError::Config(format!(
                "/task_types/{task_type}/subject: `{subject}` is used by another task type"
            )));
        }
    }
    Ok(())
}

impl NatsDistributor {
    /// Connects to the broker, creates the stream, the record bucket and the consumers of the
    /// listed task types if they are missing, and starts the push path. Pushes go to
    /// `notifier`.
    ///
    /// Errors: the broker cannot be reached (transient); bad credentials, a bad server URL or a
    /// task type subject outside the stream (permanent).
    pub async fn connect(config: NatsConfig, notifier: Notifier) -> Result<Arc<Self>, NatsError> {
        let layout = Layout::new(config.stream.clone(), config.subject_prefix.clone());
        check_config(&config, &layout)?;
        let client = connect(
            &config.servers,
            &config.credentials,
            &format!("distributor {}", layout.stream),
            false,
        )
        .await?;
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(
            &js,
            &layout,
            Duration::from_millis(config.duplicate_window_ms),
        )
        .await?;
        let kv = ensure_bucket(
            &js,
            &layout,
            Duration::from_millis(config.record_max_age_ms),
        )
        .await?;
        let delivery = Delivery {
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_ack_pending,
        };
        let inner = Arc::new(Inner {
            layout,
            js,
            stream,
            records: Records::new(kv),
            delivery,
            consumers: tokio::sync::Mutex::new(HashSet::new()),
            routes: Mutex::new(HashMap::new()),
            notifier,
            config,
        });
        for task_type in inner.config.task_types.keys() {
            inner.consumer(task_type).await?;
        }
        // Subscribe before answering, so that nothing after `connect` returns is missed.
        let watch = inner
            .records
            .kv
            .watch("exec.>")
            .await
            .map_err(|e| NatsError::broker("watch the execution records")(e.into()))?;
        let advisories = client
            .subscribe(inner.layout.max_deliveries_advisory())
            .await
            .map_err(|e| NatsError::broker("subscribe to MaxDeliver advisories")(e.into()))?;
        let tasks = vec![
            tokio::spawn(Arc::clone(&inner).follow_records(watch)),
            tokio::spawn(Arc::clone(&inner).follow_advisories(advisories)),
        ];
        Ok(Arc::new(Self { inner, tasks }))
    }

    /// The execution records of this instance's bucket (for tools and tests).
    pub fn records(&self) -> &Records {
        &self.inner.records
    }

    /// The JetStream context of this instance's connection.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }
}

impl Inner {
    fn subject(&self, task_type: &str) -> String {
        self.config
            .task_types
            .get(task_type)
            .and_then(|t| t.subject.clone())
            .unwrap_or_else(|| self.layout.default_subject(task_type))
    }

    /// Makes sure the consumer of `task_type` exists (once per instance).
    async fn consumer(&self, task_type: &str) -> Result<(), NatsError> {
        let mut known = self.consumers.lock().await;
        if known.contains(task_type) {
            return Ok(());
        }
        ensure_consumer(
            &self.stream,
            &self.layout,
            task_type,
            &self.subject(task_type),
            self.delivery,
        )
        .await?;
        known.insert(task_type.to_owned());
        Ok(())
    }

    fn route(&self, request_id: &str, execution: ExecutionId) {
        lock(&self.routes)
            .entry(request_key(request_id))
            .or_insert(Route {
                execution,
                last: None,
            });
    }

    /// The push path: every change of an execription record this instance routes becomes a
    /// notification (its revision is the sequence). On a broken watch it starts again after
    /// the last revision seen; polling covers what a gap would lose.
    async fn follow_records(self: Arc<Self>, first: async_nats::jetstream::kv::Watch) {
        let mut watch = Some(first);
        let mut last_rev = None::<u64>;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut w = match watch.take() {
                Some(w) => w,
                None => {
                    let opened = match last_rev {
                        Some(r) => self.records.kv.watch_from_revision("exec.>", r + 1).await,
                        None => self.records.kv.watch("exec.>").await,
                    };
                    match opened {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::warn!(error = %e, "nats: cannot watch the records; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            while let Some(entry) = w.next().await {
                match entry {
                    Ok(entry) => {
                        backoff = Duration::from_millis(100);
                        last_rev = Some(entry.revision);
                        if entry.operation == async_nats::jetstream::kv::Operation::Put {
                            self.on_record(&entry.key, &entry.value, entry.revision);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "nats: record watch error");
                        break;
                    }
                }
            }
        }
    }

    fn on_record(&self, key: &str, value: &[u8], revision: u64) {
        let Some(req_key) = key.strip_prefix("exec.") else {
            return;
        };
        let Ok(record) = serde_json::from_slice::<ExecRecord>(value) else {
            tracing::warn!(key, "nats: unreadable execution record");
            return;
        };
        let phase = if record.is_finished() {
            "finished"
        } else {
            "running"
        };
        let execution = {
            let mut routes = lock(&self.routes);
            let Some(route) = routes.get_mut(req_key) else {
                return;
            };
            if route.last == Some(phase) {
                return;
            }
            route.last = Some(phase);
            let execution = route.execution;
            if record.is_finished() {
                routes.remove(req_key);
            }
            execution
        };
        let status = record.status();
        let n = Notification {
            data: serde_json::to_vec(&json!({ "record": req_key, "status": status }))
                .unwrap_or_default(),
            attributes: [("auth_token".to_owned(), record.auth_token.clone())].into(),
            message_id: Some(format!("{}/{revision}", self.layout.bucket())),
            sequence: Some(revision),
        };
        self.notifier.send(execution, n);
    }

    /// Work that reached MaxDeliver stays in the stream: end its execution `Crashed` and remove
    /// the message.
    async fn follow_advisories(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        #[derive(Deserialize)]
        struct Advisory {
            stream_seq: u64,
            deliveries: u64,
        }
        while let Some(msg) = sub.next().await {
            let Ok(a) = serde_json::from_slice::<Advisory>(&msg.payload) else {
                continue;
            };
            if let Err(e) = self.exhausted(a.stream_seq, a.deliveries).await {
                tracing::warn!(seq = a.stream_seq, error = %e, "nats: cannot end exhausted work");
            }
        }
    }

    /// Ends the work of message `seq`, delivered `deliveries` times without a result.
    async fn exhausted(&self, seq: u64, deliveries: u64) -> Result<Option<ExecRecord>, NatsError> {
        let Some(job) = read_job(&self.stream, seq).await? else {
            return Ok(None);
        };
        let worker = match self.records.read(&job.request_id).await? {
            Some((
                ExecRecord {
                    state: RecordState::Active { worker, .. },
                    ..
                },
                _,
            )) if !worker.is_empty() => format!(" (last on worker {worker})"),
            _ => String::new(),
        };
        let reason = format!(
            "the work was delivered {deliveries} times (max_deliver {}) and each delivery's \
             lease of {} ms lapsed without a result{worker}",
            self.delivery.max_deliver,
            self.delivery.ack_wait.as_millis()
        );
        let record = self
            .records
            .end(&job, seq, Outcome::abnormal(AbnormalKind::Crashed, reason))
            .await?;
        remove_job(&self.stream, seq).await?;
        Ok(Some(record))
    }

    /// The status an execution record says; ends the work `Crashed` when its last delivery's
    /// holder has shown no sign of life for two lease periods (a lost advisory).
    async fn record_status(&self, stored: Stored) -> Result<Status, NatsError> {
        if let RecordState::Active { delivered, .. } = &stored.record.state {
            let silent_ms = now_ms() - stored.written_ms;
            let lease_ms = i64::try_from(self.delivery.ack_wait.as_millis()).unwrap_or(i64::MAX);
            if *delivered >= u64::from(self.delivery.max_deliver)
                && silent_ms > lease_ms.saturating_mul(2).saturating_add(1000)
                && let Some(r) = self.exhausted(stored.record.seq, *delivered).await?
            {
                return Ok(r.status());
            }
        }
        Ok(stored.record.status())
    }
}

#[async_trait]
impl Distributor for NatsDistributor {
    /// Publishes the work on its task type's subject with `Nats-Msg-Id` = request id and waits
    /// for the broker's ack. Idempotent per request id: inside the duplicate window the broker
    /// drops the repeat and answers with the first message's sequence; a repeat (`redispatch`)
    /// whose execution record exists returns that record's message; outside the window a
    /// repeated message is stored, and the workers' activation (first wins) keeps it from
    /// running twice. The token is the message's stream sequence.
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let inner = &self.inner;
        let payload: NatsPayload =
            serde_json::from_value(task.payload.clone()).map_err(NatsError::Payload)?;
        let req = task.request_id.as_str();
        let launch = |seq: u64| Launch {
            token: seq.to_string().into(),
            handle: AdapterHandle {
                version: 1,
                data: json!({ "stream": inner.layout.stream, "seq": seq }),
            },
            poll_interval: Some(Duration::from_millis(inner.config.poll_interval_ms)),
        };
        inner.route(req, task.execution_id);
        if task.redispatch
            && let Some((record, _)) = inner.records.read(req).await?
        {
            return Ok(launch(record.seq));
        }
        inner.consumer(&payload.task_type).await?;
        let now = now_ms();
        let job = JobMessage {
            request_id: req.to_owned(),
            execution_id: task.execution_id.0,
            task_id: task.task_id.0,
            attempt: task.attempt.0,
            task_type: payload.task_type.clone(),
            input: payload.input,
            activation: hex::encode(rand::random::<[u8; 16]>()),
            auth_token: task.notify.auth_token.0.clone(),
            published_ms: now,
            start_by_ms: task
                .timeouts
                .start
                .map(|d| distributor_core::Timestamp(now).plus(d).0),
            run_timeout_ms: task
                .timeouts
                .run
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let body = Bytes::from(serde_json::to_vec(&job).map_err(NatsError::Payload)?);
        let ack = inner
            .js
            .send_publish(
                inner.subject(&payload.task_type),
                Publish::build().payload(body).message_id(req),
            )
            .await
            .map_err(|e| NatsError::broker("publish the work")(e.into()))?
            .await
            .map_err(|e| NatsError::broker("publish the work (ack)")(e.into()))?;
        Ok(launch(ack.sequence))
    }

    /// Cancels. Work no worker has taken: its record is written `Cancelled` (so a worker that
    /// receives it later drops it) and its message removed. Running work: a cancel request is
    /// written to the bucket, which the worker watches; it stops the handler and records
    /// `Cancelled`. Finished and unknown work: `Ok`.
    async fn cancel(&self, execution: &Execution) -> Result<()> {
        let inner = &self.inner;
        let req = execution.request_id.as_str();
        loop {
            match inner.records.read(req).await? {
                Some((r, _)) if r.is_finished() => return Ok(()),
                Some(_) => {
                    inner.records.request_cancel(req).await?;
                    return Ok(());
                }
                None => {}
            }
            let Some(seq) = token_seq(execution) else {
                return Ok(());
            };
            let Some(job) = read_job(&inner.stream, seq).await? else {
                // Taken and finished in between, or never issued.
                if inner.records.read(req).await?.is_some() {
                    continue;
                }
                return Ok(());
            };
            if job.request_id != req {
                return Ok(());
            }
            inner.records.request_cancel(req).await?;
            let record = ExecRecord {
                execution_id: job.execution_id,
                auth_token: job.auth_token.clone(),
                seq,
                activation: job.activation.clone(),
                state: RecordState::Finished {
                    outcome: Outcome::abnormal(
                        AbnormalKind::Cancelled,
                        "cancelled before a worker took it",
                    ),
                    worker: None,
                },
            };
            match inner.records.create(req, &record).await? {
                Write::Done(_) => {
                    remove_job(&inner.stream, seq).await?;
                    return Ok(());
                }
                // A worker activated it in between: the cancel request reaches it.
                Write::Conflict => continue,
            }
        }
    }

    /// Answers from the execution record (running or finished, as the worker last wrote it)
    /// and, before any worker took the work, from the stream: its message still queued →
    /// `Pending`; neither record nor message → `Missing`.
    async fn status(&self, execution: &Execution) -> Result<Status> {
        let inner = &self.inner;
        let req = execution.request_id.as_str();
        if let Some(stored) = inner.records.read_stored(req).await? {
            return Ok(inner.record_status(stored).await?);
        }
        let Some(seq) = token_seq(execution) else {
            return Ok(missing(format!(
                "`{}` is not a stream sequence and there is no execution record",
                execution.token
            )));
        };
        if let Some(job) = read_job(&inner.stream, seq).await?
            && job.request_id == req
        {
            return Ok(Status::Pending);
        }
        // A worker may have taken and finished it between the two reads.
        if let Some(stored) = inner.records.read_stored(req).await? {
            return Ok(inner.record_status(stored).await?);
        }
        Ok(missing(format!(
            "no message {seq} of request {req} in stream {} and no execution record",
            inner.layout.stream
        )))
    }

    /// `<info_base_url>?request_id=<id>` when `info_base_url` is set.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let mut url = self.inner.config.info_base_url.clone()?;
        url.query_pairs_mut()
            .append_pair("request_id", execution.request_id.as_str());
        Some(url)
    }

    /// Reads the pushes this adapter sends: `{"record": <request key>, "status": <Status>}`.
    /// Anything else, or a push about another request, is ignored (`Ok(None)`).
    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        let Ok(body) = notification.data_json() else {
            return Ok(None);
        };
        let key = request_key(execution.request_id.as_str());
        if body.get("record").and_then(Value::as_str) != Some(key.as_str()) {
            return Ok(None);
        }
        Ok(body
            .get("status")
            .and_then(|s| serde_json::from_value::<Status>(s.clone()).ok()))
    }

    /// With `only_listed_task_types`, refuses task types not in `task_types`.
    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        let config = &self.inner.config;
        match payload.get("task_type").and_then(Value::as_str) {
            Some(t) if config.only_listed_task_types && !config.task_types.contains_key(t) => {
                Err(ValidationError {
                    subject: "payload for kind `nats`".into(),
                    violations: vec![Violation {
                        pointer: "/task_type".into(),
                        expected: format!(
                            "one of {:?}",
                            config.task_types.keys().collect::<Vec<_>>()
                        ),
                        message: format!("task type `{t}` is not served by this distributor"),
                        suggestion: None,
                    }],
                })
            }
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

    /// Routes the execution's later record changes to this instance's notifier, then answers
    /// like `status`: the state lives in the broker, so nothing else needs re-attaching.
    async fn recover(&self, execution: &Execution) -> Result<Status> {
        self.inner
            .route(execution.request_id.as_str(), execution.id);
        self.status(execution).await
    }
}
