//! `SwarmingDistributor`: the [`Distributor`] implementation, and the TaskState → outcome
//! mapping.
//!
//! # Outcomes
//!
//! | Swarming result | status | why |
//! |---|---|---|
//! | PENDING | `Pending` | no bot has taken it yet |
//! | RUNNING (also with the kill bit set) | `Running` | a cancel is confirmed only by a final state |
//! | COMPLETED, exit code 0 | `Succeeded` (data: task and run id, bot, duration, outputs) | the process ran and reported success |
//! | COMPLETED, exit code ≠ 0 | `Failed` (the exit code in the reason) | the process ran and reported failure (retryable) |
//! | COMPLETED with `internal_failure` | `Crashed` | the bot failed around the process (DM v1 did the same) |
//! | BOT_DIED | `Crashed` | the bot vanished mid-task: the work died without reporting |
//! | TIMED_OUT | `TimedOut` | the bot killed it at `execution_timeout_secs` or `io_timeout_secs` |
//! | EXPIRED | `Expired` | no bot took it within `expiration_secs` |
//! | NO_RESOURCE | `Expired` | it never started because no bot has its dimensions; a bot may appear later, so it is retryable like EXPIRED rather than Rejected |
//! | KILLED | `Cancelled` | a cancel stopped the running process |
//! | CANCELED | `Cancelled` | a cancel removed it before it ran |
//! | CLIENT_ERROR | `Rejected` (missing CAS/CIPD inputs in the reason) | the request itself is broken; the same task cannot succeed on retry |
//! | `NOT_FOUND`, or a token that is not a summary task id | `Missing` | the server does not know it |
//! | INVALID or a state this adapter does not know | transient error | logged; the engine keeps polling until a known state or its deadline |

use std::collections::HashMap;
use std::time::Duration;

use distributor_core::reexports::async_trait;
use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Capabilities, Distributor, DistributorName, Error,
    Execution, Launch, Notification, Outcome, Result, Status, TaskDescription, ValidationError,
    Violation,
};
use serde_json::{Map, Value, json};
use url::Url;

use crate::config::{SwarmingConfig, SwarmingPayload};
use crate::core::{Client, MAX_BATCH, TaskResult, TaskState, get};
use crate::error::{Class, Failure, GrpcCode, classify_code};
use crate::push::{self, Userdata};

/// Version of the [`AdapterHandle`] layout `run` writes: `{"task_id": "…", "request_uuid": "…"}`.
const HANDLE_VERSION: u32 = 1;

/// A `swarming` distributor instance: creates Swarming tasks through the `swarming.v2.Tasks`
/// pRPC API and follows them by Pub/Sub push (when a topic is configured) and by
/// `BatchGetResult` polls.
///
/// Capabilities: cancel (`CancelTask` with `kill_running`), batch status (`BatchGetResult`, up
/// to 1000 ids a call), push notifications when `pubsub_topic` is set. `run` is idempotent
/// through `request_uuid`, a UUIDv5 of the request id (as Buildbucket derives it from the build
/// id): Swarming keeps it 7 days per caller identity and answers a repeat with the task it
/// created first.
#[derive(Debug)]
pub struct SwarmingDistributor {
    name: DistributorName,
    config: SwarmingConfig,
    client: Client,
    push_server: Option<tokio::task::JoinHandle<()>>,
    push_addr: Option<std::net::SocketAddr>,
}

impl Drop for SwarmingDistributor {
    fn drop(&mut self) {
        if let Some(h) = &self.push_server {
            h.abort();
        }
    }
}

/// The `request_uuid` of a request id: UUIDv5 in the nil namespace.
pub(crate) fn request_uuid(request_id: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::nil(), request_id.as_bytes()).to_string()
}

/// Whether `token` looks like a summary task id (hex, ending in `0`).
fn is_task_id(token: &str) -> bool {
    token.len() >= 2 && token.ends_with('0') && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn missing(reason: impl Into<String>) -> Status {
    Status::Finished(Outcome::abnormal(AbnormalKind::Missing, reason))
}

impl SwarmingDistributor {
    /// Builds an instance: checks the config, obtains a token (a broken token source fails
    /// here, permanently) and binds `push_listen` if set (a bind failure is permanent).
    pub async fn new(config: SwarmingConfig, ctx: BuildContext) -> Result<Self> {
        let invalid = |pointer: &str, message: String| {
            Error::Validation(ValidationError {
                subject: format!("config of distributor `{}`", ctx.name),
                violations: vec![Violation {
                    pointer: pointer.to_owned(),
                    expected: "a valid value".into(),
                    message,
                    suggestion: None,
                }],
            })
        };
        if config.dimensions.contains_key("pool") {
            return Err(invalid(
                "/dimensions/pool",
                "`pool` is its own field, not a dimension".into(),
            ));
        }
        if let Some(t) = &config.pubsub_topic
            && !is_topic(t)
        {
            return Err(invalid(
                "/pubsub_topic",
                format!("{t:?} is not of the form projects/<project>/topics/<topic>"),
            ));
        }
        if let Some(i) = config.tags.iter().position(|t| !t.contains(':')) {
            return Err(invalid(
                &format!("/tags/{i}"),
                "tags are `key:value`".into(),
            ));
        }
        let client = Client::new(&config)?;
        client
            .check_token()
            .await
            .map_err(|f| f.into_error("obtaining the swarming token"))?;
        let (push_server, push_addr) = match &config.push_listen {
            None => (None, None),
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr.as_str())
                    .await
                    .map_err(|e| {
                        Error::permanent_from(format!("binding push_listen `{addr}`"), e)
                    })?;
                let local = listener.local_addr().ok();
                (Some(push::serve(listener, ctx.notifier.clone())), local)
            }
        };
        Ok(Self {
            name: ctx.name,
            config,
            client,
            push_server,
            push_addr,
        })
    }

    /// The address the push endpoint listens on, when `push_listen` is set.
    pub fn push_addr(&self) -> Option<std::net::SocketAddr> {
        self.push_addr
    }

    /// The `NewTask` request for `task`.
    fn new_task_request(&self, task: &TaskDescription, p: &SwarmingPayload) -> Value {
        let c = &self.config;
        let mut dims: Vec<(String, String)> = vec![("pool".into(), c.pool.clone())];
        let mut merged = c.dimensions.clone();
        merged.extend(p.dimensions.clone());
        dims.extend(merged);
        let pair = |(k, v): (String, String)| json!({"key": k, "value": v});
        let mut props = Map::new();
        props.insert("command".into(), json!(p.command));
        props.insert(
            "dimensions".into(),
            Value::Array(dims.into_iter().map(pair).collect()),
        );
        if !p.env.is_empty() {
            props.insert(
                "env".into(),
                Value::Array(p.env.clone().into_iter().map(pair).collect()),
            );
        }
        props.insert(
            "executionTimeoutSecs".into(),
            json!(p.execution_timeout_secs.unwrap_or(c.execution_timeout_secs)),
        );
        if let Some(v) = p.io_timeout_secs {
            props.insert("ioTimeoutSecs".into(), json!(v));
        }
        if let Some(v) = p.grace_period_secs {
            props.insert("gracePeriodSecs".into(), json!(v));
        }
        if let Some(v) = &p.relative_cwd {
            props.insert("relativeCwd".into(), json!(v));
        }
        if !p.outputs.is_empty() {
            props.insert("outputs".into(), json!(p.outputs));
        }
        let mut tags = vec![
            format!("distributor_instance:{}", self.name),
            format!("distributor_execution_id:{}", task.execution_id),
            format!("distributor_task_id:{}", task.task_id),
            format!("distributor_attempt:{}", task.attempt),
            format!("distributor_request_id:{}", task.request_id),
        ];
        tags.extend(c.tags.iter().cloned());
        tags.extend(p.tags.iter().cloned());
        let mut req = Map::new();
        req.insert(
            "name".into(),
            json!(
                p.name
                    .clone()
                    .unwrap_or_else(|| format!("distributor-{}", task.execution_id))
            ),
        );
        req.insert("priority".into(), json!(p.priority.unwrap_or(c.priority)));
        req.insert(
            "requestUuid".into(),
            json!(request_uuid(task.request_id.as_str())),
        );
        req.insert("tags".into(), json!(tags));
        req.insert(
            "taskSlices".into(),
            json!([{
                "properties": props,
                "expirationSecs": p.expiration_secs.unwrap_or(c.expiration_secs),
                "waitForCapacity": p.wait_for_capacity,
            }]),
        );
        if let Some(r) = &c.realm {
            req.insert("realm".into(), json!(r));
        }
        if let Some(sa) = &c.service_account {
            req.insert("serviceAccount".into(), json!(sa));
        }
        if let Some(topic) = self.topic_for(task) {
            req.insert("pubsubTopic".into(), json!(topic));
            if !task.notify.auth_token.0.is_empty() {
                req.insert("pubsubAuthToken".into(), json!(task.notify.auth_token.0));
            }
            let ud = Userdata {
                execution_id: task.execution_id.to_string(),
                attempt: task.attempt.0,
                request_id: task.request_id.to_string(),
            };
            req.insert(
                "pubsubUserdata".into(),
                json!(serde_json::to_string(&ud).unwrap_or_default()),
            );
        }
        Value::Object(req)
    }

    /// The Pub/Sub topic for `task`: the notification route's target when it names a topic,
    /// else the configured one. A URL target is not usable (Swarming publishes only to
    /// topics) and is ignored.
    fn topic_for(&self, task: &TaskDescription) -> Option<String> {
        task.notify
            .target
            .as_deref()
            .filter(|t| is_topic(t))
            .map(str::to_owned)
            .or_else(|| self.config.pubsub_topic.clone())
    }

    fn launch(&self, task_id: &str, uuid: &str) -> Launch {
        Launch {
            token: task_id.into(),
            handle: AdapterHandle {
                version: HANDLE_VERSION,
                data: json!({"task_id": task_id, "request_uuid": uuid}),
            },
            poll_interval: Some(Duration::from_secs(self.config.poll_interval_secs)),
        }
    }

    /// One result or item error → status.
    fn item_status(&self, item: Result<TaskResult, Failure>) -> Result<Status> {
        match item {
            Ok(r) => status_of(&r),
            Err(f) if f.class() == Class::NotFound => {
                Ok(missing(format!("swarming does not know the task: {f}")))
            }
            Err(f) => Err(f.into_error("reading the task result")),
        }
    }
}

fn is_topic(t: &str) -> bool {
    let parts: Vec<&str> = t.split('/').collect();
    parts.len() == 4
        && parts[0] == "projects"
        && !parts[1].is_empty()
        && parts[2] == "topics"
        && !parts[3].is_empty()
}

/// The status a Swarming result means (the table in the module docs).
pub(crate) fn status_of(r: &TaskResult) -> Result<Status> {
    let abnormal = |kind, reason: String| Ok(Status::Finished(Outcome::abnormal(kind, reason)));
    let id = &r.task_id;
    match r.task_state() {
        TaskState::Pending => Ok(Status::Pending),
        TaskState::Running => Ok(Status::Running),
        TaskState::Completed if r.internal_failure => abnormal(
            AbnormalKind::Crashed,
            format!(
                "swarming task {id} completed with an internal failure on bot {}",
                r.bot_id
            ),
        ),
        TaskState::Completed if r.exit_code == 0 && !r.failure => {
            let mut data = json!({
                "task_id": r.task_id, "run_id": r.run_id, "exit_code": 0, "bot_id": r.bot_id,
            });
            if let Some(m) = data.as_object_mut() {
                if let Some(d) = r.duration {
                    m.insert("duration_secs".into(), json!(d));
                }
                if !r.deduped_from.is_empty() {
                    m.insert("deduped_from".into(), json!(r.deduped_from));
                }
                for (k, v) in [
                    ("cas_output_root", &r.cas_output_root),
                    ("cipd_pins", &r.cipd_pins),
                    ("bot_dimensions", &r.bot_dimensions),
                ] {
                    if let Some(v) = v {
                        m.insert(k.into(), v.clone());
                    }
                }
            }
            Ok(Status::Finished(Outcome::Succeeded { data }))
        }
        TaskState::Completed => abnormal(
            AbnormalKind::Failed,
            format!("swarming task {id} exited with code {}", r.exit_code),
        ),
        TaskState::BotDied => abnormal(
            AbnormalKind::Crashed,
            format!("swarming task {id}: the bot {} died (BOT_DIED)", r.bot_id),
        ),
        TaskState::TimedOut => abnormal(
            AbnormalKind::TimedOut,
            format!("swarming task {id} ran past its execution or io timeout (TIMED_OUT)"),
        ),
        TaskState::Expired => abnormal(
            AbnormalKind::Expired,
            format!("swarming task {id}: no bot took it before it expired (EXPIRED)"),
        ),
        TaskState::NoResource => abnormal(
            AbnormalKind::Expired,
            format!("swarming task {id}: no bot has its dimensions (NO_RESOURCE)"),
        ),
        TaskState::Killed => abnormal(
            AbnormalKind::Cancelled,
            format!("swarming task {id} was killed while running (KILLED)"),
        ),
        TaskState::Canceled => abnormal(
            AbnormalKind::Cancelled,
            format!("swarming task {id} was cancelled before it ran (CANCELED)"),
        ),
        TaskState::ClientError => {
            let mut missing_inputs = Vec::new();
            if let Some(v) = &r.missing_cas {
                missing_inputs.push(format!("missing CAS inputs {v}"));
            }
            if let Some(v) = &r.missing_cipd {
                missing_inputs.push(format!("missing CIPD packages {v}"));
            }
            abnormal(
                AbnormalKind::Rejected,
                format!(
                    "swarming task {id} failed on the client side (CLIENT_ERROR){}",
                    if missing_inputs.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", missing_inputs.join("; "))
                    }
                ),
            )
        }
        TaskState::Unknown => {
            tracing::warn!(task_id = %id, state = %r.state, "swarming task in an unknown state");
            Err(Error::transient(format!(
                "swarming task {id} is in state {} which this adapter does not know; polling again",
                r.state
            )))
        }
    }
}

/// Semantic payload checks the schema cannot express.
pub(crate) fn check_payload(payload: &Value) -> Result<SwarmingPayload, ValidationError> {
    let violation = |pointer: String, expected: &str, message: String| Violation {
        pointer,
        expected: expected.to_owned(),
        message,
        suggestion: None,
    };
    let invalid = |violations: Vec<Violation>| ValidationError {
        subject: "payload for kind `swarming`".to_owned(),
        violations,
    };
    let p: SwarmingPayload = serde_json::from_value(payload.clone()).map_err(|e| {
        invalid(vec![violation(
            String::new(),
            "a swarming payload",
            e.to_string(),
        )])
    })?;
    let esc = |s: &str| s.replace('~', "~0").replace('/', "~1");
    let mut v = Vec::new();
    if p.command.is_empty() || p.command.len() > 128 {
        v.push(violation(
            "/command".into(),
            "1 to 128 arguments",
            format!("`command` has {} arguments", p.command.len()),
        ));
    }
    if p.dimensions.contains_key("pool") {
        v.push(violation(
            "/dimensions/pool".into(),
            "no `pool` dimension",
            "the pool is the distributor's `pool`; a payload cannot change it".into(),
        ));
    }
    for (i, t) in p.tags.iter().enumerate() {
        if !t.contains(':') {
            v.push(violation(
                format!("/tags/{i}"),
                "a `key:value` tag",
                format!("tag {t:?} has no `:`"),
            ));
        }
    }
    for key in p.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            v.push(violation(
                format!("/env/{}", esc(key)),
                "a variable name without `=`",
                format!("{key:?} is not a valid environment variable name"),
            ));
        }
    }
    if let Some(io) = p.io_timeout_secs
        && io != 0
        && io < 30
    {
        v.push(violation(
            "/io_timeout_secs".into(),
            "0 or at least 30",
            format!("Swarming accepts 0 (none) or 30 s and more, got {io}"),
        ));
    }
    if v.is_empty() { Ok(p) } else { Err(invalid(v)) }
}

#[async_trait]
impl Distributor for SwarmingDistributor {
    /// `NewTask` with `request_uuid` = UUIDv5(request id): a repeat (same caller identity,
    /// within 7 days) returns the task created first, so no second task is started.
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        let payload = check_payload(&task.payload).map_err(Error::Validation)?;
        let req = self.new_task_request(task, &payload);
        let uuid = request_uuid(task.request_id.as_str());
        let reply = self
            .client
            .call("NewTask", &req)
            .await
            .map_err(|f| f.into_error("creating the swarming task"))?;
        let task_id = get(&reply, "taskId", "task_id")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::permanent("NewTask answered without a task_id"))?;
        tracing::debug!(distributor = %self.name, task_id, request_id = %task.request_id, "swarming task created");
        Ok(self.launch(task_id, &uuid))
    }

    /// `CancelTask` with `kill_running: true`: a pending task is cancelled at once, a running
    /// one gets its kill bit and ends KILLED when its bot notices. Unknown and finished tasks
    /// are Ok (Swarming answers `canceled: false`, or `NOT_FOUND`).
    async fn cancel(&self, execution: &Execution) -> Result<()> {
        let token = execution.token.as_str();
        if !is_task_id(token) {
            return Ok(());
        }
        match self
            .client
            .call("CancelTask", &json!({"taskId": token, "killRunning": true}))
            .await
        {
            Ok(reply) => {
                tracing::debug!(task_id = token, reply = %reply, "swarming cancel");
                Ok(())
            }
            Err(f) if f.class() == Class::NotFound => Ok(()),
            Err(f) => Err(f.into_error("cancelling the swarming task")),
        }
    }

    async fn status(&self, execution: &Execution) -> Result<Status> {
        let token = execution.token.as_str();
        if !is_task_id(token) {
            return Ok(missing(format!("`{token}` is not a swarming task id")));
        }
        let item = match self
            .client
            .call("GetResult", &json!({"taskId": token}))
            .await
        {
            Ok(v) => TaskResult::from_value(&v),
            // The only argument is the id: the server calls it malformed.
            Err(Failure::Rpc { code, message }) if code.0 == 3 => {
                return Ok(missing(format!("swarming refuses the task id: {message}")));
            }
            Err(f) => Err(f),
        };
        self.item_status(item)
    }

    /// `BatchGetResult` with the distinct task ids, at most 1000 per call.
    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        let mut ids: Vec<&str> = Vec::new();
        let mut seen = HashMap::new();
        for e in executions {
            let t = e.token.as_str();
            if is_task_id(t) && !seen.contains_key(t) {
                seen.insert(t, ());
                ids.push(t);
            }
        }
        let mut found: HashMap<String, Result<TaskResult, Failure>> = HashMap::new();
        let mut failed: HashMap<&str, (bool, String)> = HashMap::new();
        for chunk in ids.chunks(MAX_BATCH) {
            match self
                .client
                .call("BatchGetResult", &json!({"taskIds": chunk}))
                .await
            {
                Ok(reply) => {
                    let items = get(&reply, "results", "results")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    for item in items {
                        let Some(id) = get(&item, "taskId", "task_id").and_then(Value::as_str)
                        else {
                            continue;
                        };
                        let r = if let Some(res) = item.get("result") {
                            TaskResult::from_value(res)
                        } else {
                            let err = item.get("error").cloned().unwrap_or(Value::Null);
                            let code = err.get("code").and_then(Value::as_u64).unwrap_or(2);
                            Err(Failure::Rpc {
                                code: GrpcCode(u16::try_from(code).unwrap_or(2)),
                                message: err
                                    .get("message")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            })
                        };
                        found.insert(id.to_owned(), r);
                    }
                }
                Err(f) => {
                    let transient = f.class() == Class::Transient;
                    let msg = format!("reading task results: {f}");
                    for id in chunk {
                        failed.insert(id, (transient, msg.clone()));
                    }
                }
            }
        }
        executions
            .iter()
            .map(|e| {
                let t = e.token.as_str();
                if !is_task_id(t) {
                    return Ok(missing(format!("`{t}` is not a swarming task id")));
                }
                if let Some((transient, msg)) = failed.get(t) {
                    return Err(if *transient {
                        Error::transient(msg.clone())
                    } else {
                        Error::permanent(msg.clone())
                    });
                }
                match found.get(t) {
                    Some(Ok(r)) => status_of(r),
                    Some(Err(Failure::Rpc { code, message })) => {
                        let f = Failure::Rpc {
                            code: *code,
                            message: message.clone(),
                        };
                        if classify_code(*code) == Class::NotFound || code.0 == 3 {
                            return Ok(missing(format!("swarming does not know the task: {f}")));
                        }
                        self.item_status(Err(f))
                    }
                    Some(Err(f)) => Err(Error::permanent(format!("reading the task result: {f}"))),
                    None => Err(Error::transient(format!(
                        "BatchGetResult answered nothing for {t}"
                    ))),
                }
            })
            .collect()
    }

    /// The `info_url` template with `{task_id}` and `{url}`; `None` for tokens that are not
    /// task ids.
    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let t = execution.token.as_str();
        if !is_task_id(t) {
            return None;
        }
        let template = self
            .config
            .info_url
            .as_deref()
            .unwrap_or("{url}/task?id={task_id}");
        Url::parse(
            &template
                .replace("{task_id}", t)
                .replace("{url}", self.config.url.as_str().trim_end_matches('/')),
        )
        .ok()
    }

    /// A Swarming push carries no state: when its `task_id` is this execution's (and its
    /// userdata, if any, names this execution), it is a poke, answered with `GetResult`.
    /// Anything else is ignored.
    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        let Ok(body) = notification.data_json() else {
            return Ok(None);
        };
        let Some(task_id) = body.get("task_id").and_then(Value::as_str) else {
            return Ok(None);
        };
        // A run id (…1) names the same task as its summary id (…0).
        let summary = match task_id.strip_suffix('1') {
            Some(stem) => format!("{stem}0"),
            None => task_id.to_owned(),
        };
        if summary != execution.token.as_str() {
            return Ok(None);
        }
        if let Some(ud) = body.get("userdata").and_then(Value::as_str)
            && let Ok(ud) = serde_json::from_str::<Userdata>(ud)
            && ud.execution_id != execution.id.to_string()
        {
            return Ok(None);
        }
        self.status(execution).await.map(Some)
    }

    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        check_payload(payload).map(|_| ())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            push_notifications: self.config.pubsub_topic.is_some(),
            cancel: true,
            batch_status: true,
            recover: false,
            deferred: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(state: &str, exit: i64) -> TaskResult {
        TaskResult {
            task_id: "abc0".into(),
            state: json!(state),
            exit_code: exit,
            failure: exit != 0,
            ..TaskResult::default()
        }
    }

    fn kind(s: &Result<Status>) -> Option<AbnormalKind> {
        s.as_ref()
            .ok()
            .and_then(Status::outcome)
            .and_then(Outcome::abnormal_kind)
    }

    #[test]
    fn every_task_state_has_an_outcome() {
        use AbnormalKind::*;
        assert_eq!(status_of(&result("PENDING", 0)).ok(), Some(Status::Pending));
        assert_eq!(status_of(&result("RUNNING", 0)).ok(), Some(Status::Running));
        assert!(
            status_of(&result("COMPLETED", 0))
                .ok()
                .and_then(|s| s.outcome().map(Outcome::is_success))
                .unwrap_or(false)
        );
        let cases = [
            ("COMPLETED", 3, Failed),
            ("BOT_DIED", -1, Crashed),
            ("TIMED_OUT", -1, TimedOut),
            ("EXPIRED", 0, Expired),
            ("NO_RESOURCE", 0, Expired),
            ("KILLED", -1, Cancelled),
            ("CANCELED", 0, Cancelled),
            ("CLIENT_ERROR", 0, Rejected),
        ];
        for (state, exit, want) in cases {
            assert_eq!(
                kind(&status_of(&result(state, exit))),
                Some(want),
                "{state}"
            );
        }
        let mut internal = result("COMPLETED", 0);
        internal.internal_failure = true;
        assert_eq!(kind(&status_of(&internal)), Some(Crashed));
        for odd in ["INVALID", "NEW_STATE"] {
            let e = status_of(&result(odd, 0)).expect_err("unknown state");
            assert!(e.is_transient(), "{odd}: keep polling");
        }
    }

    #[test]
    fn failures_name_the_exit_code_and_successes_carry_the_run() {
        let s = status_of(&result("COMPLETED", 7)).expect("status");
        match s {
            Status::Finished(Outcome::Abnormal { reason, .. }) => {
                assert!(reason.contains("code 7"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let mut ok = result("COMPLETED", 0);
        ok.run_id = "abc1".into();
        ok.duration = Some(1.5);
        match status_of(&ok).expect("status") {
            Status::Finished(Outcome::Succeeded { data }) => {
                assert_eq!(data["run_id"], "abc1");
                assert_eq!(data["duration_secs"], 1.5);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn request_uuids_are_deterministic_v5() {
        let a = request_uuid("r-1");
        assert_eq!(a, request_uuid("r-1"));
        assert_ne!(a, request_uuid("r-2"));
        assert_eq!(
            uuid::Uuid::parse_str(&a).expect("uuid").get_version_num(),
            5
        );
    }

    #[test]
    fn payload_checks_name_the_field() {
        let ptrs = |v: Value| -> Vec<String> {
            check_payload(&v)
                .expect_err("invalid")
                .violations
                .into_iter()
                .map(|v| v.pointer)
                .collect()
        };
        assert_eq!(ptrs(json!({"command": []})), ["/command"]);
        assert_eq!(
            ptrs(json!({"command": ["x"], "dimensions": {"pool": "p"}})),
            ["/dimensions/pool"]
        );
        assert_eq!(
            ptrs(json!({"command": ["x"], "tags": ["a:b", "c"]})),
            ["/tags/1"]
        );
        assert_eq!(
            ptrs(json!({"command": ["x"], "env": {"A=B": "1"}})),
            ["/env/A=B"]
        );
        assert_eq!(
            ptrs(json!({"command": ["x"], "io_timeout_secs": 5})),
            ["/io_timeout_secs"]
        );
        assert!(check_payload(&json!({"command": ["true"], "io_timeout_secs": 0})).is_ok());
    }

    #[test]
    fn task_ids_and_topics_are_recognised() {
        assert!(is_task_id("5e1d7b2a4a9b5c10"));
        assert!(!is_task_id("5e1d7b2a4a9b5c11"));
        assert!(!is_task_id("2147483646"));
        assert!(!is_task_id("conformance-never-issued-x0"));
        assert!(is_topic("projects/p/topics/t"));
        assert!(!is_topic("http://127.0.0.1/v1/notify"));
    }
}
