//! The server: task records, the four RPCs, the bots and the Pub/Sub pusher.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::prpc::{self, Code, RpcError, field};
use crate::{Behaviour, Config, End, Options, Stats, lock};

/// Swarming's TaskState (`swarming.v2.TaskState`), with its proto numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// A bot runs it.
    Running,
    /// Waiting for a bot.
    Pending,
    /// No bot took it before its expiration.
    Expired,
    /// It ran past its timeout.
    TimedOut,
    /// Its bot died.
    BotDied,
    /// Cancelled before it ran.
    Canceled,
    /// It ran and exited (with any code).
    Completed,
    /// Killed while running.
    Killed,
    /// Refused at once: no bot has its dimensions.
    NoResource,
    /// A client-side problem (bad CIPD/CAS input).
    ClientError,
}

impl TaskState {
    /// The enum value name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Pending => "PENDING",
            Self::Expired => "EXPIRED",
            Self::TimedOut => "TIMED_OUT",
            Self::BotDied => "BOT_DIED",
            Self::Canceled => "CANCELED",
            Self::Completed => "COMPLETED",
            Self::Killed => "KILLED",
            Self::NoResource => "NO_RESOURCE",
            Self::ClientError => "CLIENT_ERROR",
        }
    }
    /// Whether it can still change (PENDING and RUNNING only).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Pending)
    }
}

/// How long a request_uuid is remembered.
const DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_BATCH: usize = 1000;

/// The fake's state, shared by the handlers and the bots.
#[derive(Debug)]
pub(crate) struct Shared {
    options: Options,
    config: Mutex<Config>,
    tasks: Mutex<Tasks>,
    bots: Arc<Semaphore>,
    idle_bots: Mutex<Vec<usize>>,
    counters: Counters,
    http: reqwest::Client,
    next_message: AtomicU64,
}

#[derive(Debug, Default)]
struct Counters {
    new_task_calls: AtomicU64,
    tasks_created: AtomicU64,
    get_result_calls: AtomicU64,
    batch_get_result_calls: AtomicU64,
    cancel_calls: AtomicU64,
    pushes_delivered: AtomicU64,
    pushes_lost: AtomicU64,
    pushes_failed: AtomicU64,
}

#[derive(Debug, Default)]
struct Tasks {
    by_key: HashMap<u64, Task>,
    by_uuid: HashMap<String, (u64, SystemTime)>,
}

/// The next task key. Process-wide, so two fakes never hand out the same task id; it starts
/// from the clock so that ids look like real (time-based) ones and differ between runs.
fn next_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        (u64::try_from(ms).unwrap_or(0) & 0xff_ffff_ffff) << 16
    });
    base + NEXT.fetch_add(1, Ordering::Relaxed) + 1
}

#[derive(Debug)]
struct Task {
    key: u64,
    request: Value,
    tags: Vec<String>,
    name: String,
    user: String,
    created: SystemTime,
    modified: SystemTime,
    state: TaskState,
    current_slice: usize,
    bot_id: Option<String>,
    bot_dimensions: Vec<(String, String)>,
    started: Option<SystemTime>,
    completed: Option<SystemTime>,
    abandoned: Option<SystemTime>,
    exit_code: Option<i64>,
    internal_failure: bool,
    duration: Option<f64>,
    missing_cipd: bool,
    killing: bool,
    pubsub: Option<PubSub>,
    signal: watch::Sender<Signal>,
}

#[derive(Debug, Clone)]
struct PubSub {
    topic: String,
    auth_token: String,
    userdata: String,
}

/// What the handlers tell a task's bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    None,
    /// Cancelled while pending: stop waiting.
    Cancelled,
    /// Kill bit set while running.
    Kill,
    /// The server is going away.
    Shutdown,
}

impl Shared {
    pub(crate) fn new(options: Options) -> Arc<Self> {
        let bots = options.bots;
        Arc::new(Self {
            options,
            config: Mutex::new(Config::default()),
            tasks: Mutex::new(Tasks::default()),
            bots: Arc::new(Semaphore::new(bots)),
            idle_bots: Mutex::new((0..bots).rev().collect()),
            counters: Counters::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            next_message: AtomicU64::new(1),
        })
    }

    pub(crate) fn config(&self) -> MutexGuard<'_, Config> {
        lock(&self.config)
    }

    fn tasks(&self) -> MutexGuard<'_, Tasks> {
        lock(&self.tasks)
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            new_task_calls: l(&c.new_task_calls),
            tasks_created: l(&c.tasks_created),
            get_result_calls: l(&c.get_result_calls),
            batch_get_result_calls: l(&c.batch_get_result_calls),
            cancel_calls: l(&c.cancel_calls),
            pushes_delivered: l(&c.pushes_delivered),
            pushes_lost: l(&c.pushes_lost),
            pushes_failed: l(&c.pushes_failed),
        }
    }

    pub(crate) fn tasks_with_tag(&self, tag: &str) -> usize {
        self.tasks()
            .by_key
            .values()
            .filter(|t| t.tags.iter().any(|x| x == tag))
            .count()
    }

    pub(crate) fn task_state(&self, task_id: &str) -> Option<TaskState> {
        let (key, _) = parse_task_id(task_id)?;
        self.tasks().by_key.get(&key).map(|t| t.state)
    }

    pub(crate) fn shut_down(&self) {
        self.bots.close();
        for t in self.tasks().by_key.values() {
            t.signal.send_replace(Signal::Shutdown);
        }
    }

    fn caller(&self, headers: &HeaderMap) -> Result<String, RpcError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                RpcError::new(
                    Code::Unauthenticated,
                    "no OAuth2 bearer token in Authorization",
                )
            })?;
        let c = self.config();
        if c.tokens.is_empty() {
            return Ok(format!("user:{token}"));
        }
        c.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| RpcError::new(Code::Unauthenticated, "invalid OAuth2 token"))
    }

    fn injected_failure(&self) -> Option<RpcError> {
        let mut c = self.config();
        let (n, code) = c.fail_next?;
        c.fail_next = (n > 1).then_some((n - 1, code));
        Some(RpcError::new(
            code,
            format!("injected {} failure", code.name()),
        ))
    }

    fn behaviour_for(&self, tags: &[String]) -> Behaviour {
        let c = self.config();
        c.rules
            .iter()
            .find(|(t, _)| tags.iter().any(|x| x == t))
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| c.default.clone())
    }

    fn bots_match(&self, dims: &[(String, String)]) -> bool {
        let bots = self.options.bots;
        dims.iter().all(|(k, v)| {
            if k == "id" {
                return v
                    .strip_prefix("fake-bot-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n < bots);
            }
            self.options
                .bot_dimensions
                .iter()
                .any(|(bk, bv)| bk == k && bv == v)
        }) && bots > 0
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/prpc/{service}/{method}", post(rpc))
        .with_state(shared)
}

async fn rpc(
    State(s): State<Arc<Shared>>,
    Path((service, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match dispatch(&s, &service, &method, &headers, &body) {
        Ok(v) => prpc::ok(&v),
        Err(e) => axum::response::IntoResponse::into_response(e),
    }
}

fn dispatch(
    s: &Arc<Shared>,
    service: &str,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, RpcError> {
    if service != "swarming.v2.Tasks" {
        return Err(RpcError::new(
            Code::Unimplemented,
            format!("service {service:?} is not implemented"),
        ));
    }
    prpc::check_headers(headers)?;
    let identity = s.caller(headers)?;
    if let Some(e) = s.injected_failure() {
        return Err(e);
    }
    let doc: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| RpcError::invalid(format!("bad request: could not decode body: {e}")))?
    };
    let obj = doc
        .as_object()
        .ok_or_else(|| RpcError::invalid("bad request: the body is not a JSON object"))?;
    match method {
        "NewTask" => new_task(s, &identity, obj),
        "GetResult" => {
            s.counters.get_result_calls.fetch_add(1, Ordering::Relaxed);
            get_result(s, obj)
        }
        "BatchGetResult" => {
            s.counters
                .batch_get_result_calls
                .fetch_add(1, Ordering::Relaxed);
            batch_get_result(s, obj)
        }
        "CancelTask" => {
            s.counters.cancel_calls.fetch_add(1, Ordering::Relaxed);
            cancel_task(s, obj)
        }
        other => Err(RpcError::new(
            Code::Unimplemented,
            format!("method {other:?} is not implemented by the fake"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Task ids

/// `hex(key ^ 0x7fff_ffff_ffff_ffff)` + `0` (summary) — the format of `model/taskid.go`.
fn summary_id(key: u64) -> String {
    format!("{:x}0", key ^ 0x7fff_ffff_ffff_ffff)
}

fn run_id(key: u64) -> String {
    format!("{:x}1", key ^ 0x7fff_ffff_ffff_ffff)
}

/// The key and whether it names the run (`…1`) rather than the summary (`…0`).
fn parse_task_id(id: &str) -> Option<(u64, bool)> {
    if id.len() < 2 || !id.is_ascii() {
        return None;
    }
    let (hex, last) = id.split_at(id.len() - 1);
    let run = match last {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    let v = u64::from_str_radix(hex, 16).ok()?;
    Some((v ^ 0x7fff_ffff_ffff_ffff, run))
}

// ---------------------------------------------------------------------------------------------
// NewTask

struct Slice {
    dims: Vec<(String, String)>,
    expiration_secs: i64,
    wait_for_capacity: bool,
    execution_timeout_secs: i64,
}

fn new_task(s: &Arc<Shared>, identity: &str, req: &Map<String, Value>) -> Result<Value, RpcError> {
    if field(req, "properties").is_some() {
        return Err(RpcError::invalid(
            "bad request: properties is deprecated, use task_slices instead",
        ));
    }
    if prpc::integer(req, "expiration_secs")? != 0 {
        return Err(RpcError::invalid(
            "bad request: expiration_secs is deprecated, set it in task_slices",
        ));
    }
    let name = prpc::string(req, "name")?;
    if name.is_empty() {
        return Err(RpcError::invalid("bad request: name is required"));
    }
    let priority = prpc::integer(req, "priority")?;
    if !(1..=255).contains(&priority) {
        return Err(RpcError::invalid(format!(
            "bad request: priority: must be between 1 and 255, got {priority}"
        )));
    }
    let mut tags = prpc::strings(req, "tags")?;
    if tags.len() > 256 {
        return Err(RpcError::invalid("bad request: tags: up to 256 tags"));
    }
    if let Some(t) = tags.iter().find(|t| !t.contains(':')) {
        return Err(RpcError::invalid(format!(
            "bad request: tags: tag {t:?} must be in key:value form"
        )));
    }
    let slices = parse_slices(req)?;
    let topic = prpc::string(req, "pubsub_topic")?;
    let auth_token = prpc::string(req, "pubsub_auth_token")?;
    let userdata = prpc::string(req, "pubsub_userdata")?;
    if !topic.is_empty() && !valid_topic(&topic) {
        return Err(RpcError::invalid(format!(
            "bad request: pubsub_topic: {topic:?} is not of the form projects/<project>/topics/<topic>"
        )));
    }
    if topic.is_empty() && (!auth_token.is_empty() || !userdata.is_empty()) {
        return Err(RpcError::invalid(
            "bad request: pubsub_auth_token and pubsub_userdata require pubsub_topic",
        ));
    }
    if userdata.len() > 1024 {
        return Err(RpcError::invalid(
            "bad request: pubsub_userdata: too long, up to 1024 bytes",
        ));
    }
    let user = prpc::string(req, "user")?;
    let uuid = prpc::string(req, "request_uuid")?;
    let pool = slices[0]
        .dims
        .iter()
        .find(|(k, _)| k == "pool")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    tags.push(format!("pool:{pool}"));
    tags.push(format!("priority:{priority}"));
    tags.push(format!("authenticated:{identity}"));
    if !user.is_empty() {
        tags.push(format!("user:{user}"));
    }
    tags.sort();
    tags.dedup();
    let now = SystemTime::now();
    // The echoed request: lowerCamelCase, secret bytes never returned.
    let mut echoed_slices = prpc::camel_keys(field(req, "task_slices").unwrap_or(&Value::Null));
    if let Some(a) = echoed_slices.as_array_mut() {
        for sl in a {
            if let Some(p) = sl.get_mut("properties").and_then(Value::as_object_mut) {
                p.remove("secretBytes");
            }
        }
    }
    let mut request = json!({
        "name": name,
        "priority": priority,
        "tags": tags,
        "createdTs": prpc::timestamp(now),
        "authenticated": identity,
        "taskSlices": echoed_slices,
    });
    if let Some(r) = request.as_object_mut() {
        for (k, v) in [
            ("user", user.as_str()),
            ("pubsubTopic", topic.as_str()),
            ("pubsubUserdata", userdata.as_str()),
        ] {
            if !v.is_empty() {
                r.insert(k.into(), json!(v));
            }
        }
        for k in ["realm", "service_account", "parent_task_id"] {
            if let Some(v) = field(req, k)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
            {
                r.insert(prpc::camel(k), json!(v));
            }
        }
    }
    if prpc::boolean(req, "evaluate_only")? {
        s.counters.new_task_calls.fetch_add(1, Ordering::Relaxed);
        return Ok(json!({ "request": request }));
    }

    let behaviour = s.behaviour_for(&tags);
    // Which slice is enqueued: the first with a bot that can run it (or that waits for one).
    let chosen = slices
        .iter()
        .position(|sl| sl.wait_for_capacity || s.bots_match(&sl.dims));
    let mut tasks = s.tasks();
    let dedup_key = format!("{identity}:{uuid}");
    if !uuid.is_empty()
        && let Some((key, at)) = tasks.by_uuid.get(&dedup_key).copied()
        && now.duration_since(at).unwrap_or_default() < DEDUP_WINDOW
        && let Some(t) = tasks.by_key.get(&key)
    {
        let out = json!({
            "taskId": summary_id(key),
            "request": t.request,
            "taskResult": result_json(t, false),
        });
        s.counters.new_task_calls.fetch_add(1, Ordering::Relaxed);
        return Ok(out);
    }
    let key = next_key();
    let task_id = summary_id(key);
    if let Some(r) = request.as_object_mut() {
        r.insert("taskId".into(), json!(task_id));
    }
    let (signal, rx) = watch::channel(Signal::None);
    let mut task = Task {
        key,
        request,
        tags,
        name,
        user,
        created: now,
        modified: now,
        state: TaskState::Pending,
        current_slice: chosen.unwrap_or(slices.len() - 1),
        bot_id: None,
        bot_dimensions: Vec::new(),
        started: None,
        completed: None,
        abandoned: None,
        exit_code: None,
        internal_failure: false,
        duration: None,
        missing_cipd: false,
        killing: false,
        pubsub: (!topic.is_empty()).then_some(PubSub {
            topic,
            auth_token,
            userdata,
        }),
        signal,
    };
    if chosen.is_none() {
        task.state = TaskState::NoResource;
        task.abandoned = Some(now);
    }
    let out = json!({
        "taskId": task_id,
        "request": task.request,
        "taskResult": result_json(&task, false),
    });
    let final_at_creation = !task.state.is_active();
    let push = task.pubsub.clone().map(|p| (p, task_id.clone()));
    if !uuid.is_empty() {
        tasks.by_uuid.insert(dedup_key, (key, now));
    }
    tasks.by_key.insert(key, task);
    drop(tasks);
    s.counters.tasks_created.fetch_add(1, Ordering::Relaxed);
    s.counters.new_task_calls.fetch_add(1, Ordering::Relaxed);
    if final_at_creation {
        if let Some((p, id)) = push {
            publish(s, p, id);
        }
    } else if let Some(i) = chosen {
        let remaining: i64 = slices[i..].iter().map(|sl| sl.expiration_secs).sum();
        let expire_at = Instant::now() + Duration::from_secs(u64::try_from(remaining).unwrap_or(0));
        let timeout =
            Duration::from_secs(u64::try_from(slices[i].execution_timeout_secs).unwrap_or(0));
        tokio::spawn(bot(Arc::clone(s), key, behaviour, expire_at, timeout, rx));
    }
    Ok(out)
}

fn valid_topic(t: &str) -> bool {
    let parts: Vec<&str> = t.split('/').collect();
    parts.len() == 4
        && parts[0] == "projects"
        && !parts[1].is_empty()
        && parts[2] == "topics"
        && !parts[3].is_empty()
}

fn parse_slices(req: &Map<String, Value>) -> Result<Vec<Slice>, RpcError> {
    let raw = match field(req, "task_slices") {
        None => return Err(RpcError::invalid("bad request: task_slices is required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(RpcError::invalid("bad request: task_slices: not a list")),
    };
    if raw.is_empty() || raw.len() > 8 {
        return Err(RpcError::invalid(format!(
            "bad request: task_slices: between 1 and 8 slices, got {}",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut seen_props = HashSet::new();
    let mut pool: Option<String> = None;
    for (i, sl) in raw.iter().enumerate() {
        let at = |m: String| RpcError::invalid(format!("bad request: task_slices[{i}]: {m}"));
        let sl = sl.as_object().ok_or_else(|| at("not an object".into()))?;
        let props = field(sl, "properties")
            .and_then(Value::as_object)
            .ok_or_else(|| at("properties is required".into()))?;
        if !seen_props.insert(serde_json::to_string(props).unwrap_or_default()) {
            return Err(at("properties: identical to another slice".into()));
        }
        let expiration_secs = prpc::integer(sl, "expiration_secs")?;
        if !(30..=7 * 24 * 3600).contains(&expiration_secs) {
            return Err(at(format!(
                "expiration_secs: must be between 30s and 7d, got {expiration_secs}"
            )));
        }
        let command = prpc::strings(props, "command")?;
        if command.is_empty() {
            return Err(at("properties: command is required".into()));
        }
        if command.len() > 128 {
            return Err(at("properties: command: up to 128 arguments".into()));
        }
        let dims = prpc::pairs(props, "dimensions")?;
        let slice_pool: Vec<&String> = dims
            .iter()
            .filter(|(k, _)| k == "pool")
            .map(|(_, v)| v)
            .collect();
        match (slice_pool.as_slice(), &pool) {
            ([p], None) => pool = Some((*p).clone()),
            ([p], Some(first)) if *p == first => {}
            ([_], Some(_)) => {
                return Err(at(
                    "properties: dimensions: pool differs between slices".into()
                ));
            }
            _ => {
                return Err(at(
                    "properties: dimensions: exactly one pool dimension is required".into(),
                ));
            }
        }
        let env = prpc::pairs(props, "env")?;
        let mut keys = HashSet::new();
        if let Some((k, _)) = env.iter().find(|(k, _)| !keys.insert(k.clone())) {
            return Err(at(format!("properties: env: key {k:?} is repeated")));
        }
        let execution_timeout_secs = prpc::integer(props, "execution_timeout_secs")?;
        if !(30..=7 * 24 * 3600).contains(&execution_timeout_secs) {
            return Err(at(format!(
                "properties: execution_timeout_secs: must be between 30s and 7d, got {execution_timeout_secs}"
            )));
        }
        let io = prpc::integer(props, "io_timeout_secs")?;
        if io != 0 && !(30..=7 * 24 * 3600).contains(&io) {
            return Err(at(format!(
                "properties: io_timeout_secs: must be 0 or between 30s and 7d, got {io}"
            )));
        }
        let grace = prpc::integer(props, "grace_period_secs")?;
        if !(0..=3600).contains(&grace) {
            return Err(at(format!(
                "properties: grace_period_secs: must be between 0 and 3600, got {grace}"
            )));
        }
        if let Some(Value::String(b)) = field(props, "secret_bytes") {
            let n = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| at("properties: secret_bytes: not base64".into()))?
                .len();
            if n > 20 * 1024 {
                return Err(at("properties: secret_bytes: up to 20 KiB".into()));
            }
        }
        out.push(Slice {
            dims,
            expiration_secs,
            wait_for_capacity: prpc::boolean(sl, "wait_for_capacity")?,
            execution_timeout_secs,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Results

/// The `TaskResultResponse` JSON: lowerCamelCase, int64 as strings, defaults omitted.
fn result_json(t: &Task, as_run: bool) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    put("taskId", json!(summary_id(t.key)));
    put("state", json!(t.state.name()));
    put("createdTs", json!(prpc::timestamp(t.created)));
    put("modifiedTs", json!(prpc::timestamp(t.modified)));
    if !as_run {
        put("name", json!(t.name));
        put("tags", json!(t.tags));
        if !t.user.is_empty() {
            put("user", json!(t.user));
        }
    }
    if t.current_slice > 0 {
        put("currentTaskSlice", json!(t.current_slice));
    }
    if let Some(bot) = &t.bot_id {
        put("botId", json!(bot));
        put("runId", json!(run_id(t.key)));
        let mut dims: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in &t.bot_dimensions {
            match dims.iter_mut().find(|(dk, _)| dk == k) {
                Some((_, vs)) => vs.push(v.clone()),
                None => dims.push((k.clone(), vec![v.clone()])),
            }
        }
        dims.sort();
        put(
            "botDimensions",
            Value::Array(
                dims.into_iter()
                    .map(|(k, v)| json!({"key": k, "value": v}))
                    .collect(),
            ),
        );
        put("botVersion", json!("fake"));
        put("serverVersions", json!(["swarming-fake"]));
    }
    if let Some(ts) = t.started {
        put("startedTs", json!(prpc::timestamp(ts)));
    }
    if let Some(ts) = t.completed {
        put("completedTs", json!(prpc::timestamp(ts)));
    }
    if let Some(ts) = t.abandoned {
        put("abandonedTs", json!(prpc::timestamp(ts)));
    }
    if let Some(code) = t.exit_code.filter(|c| *c != 0) {
        put("exitCode", json!(code.to_string()));
        put("failure", json!(true));
    }
    if t.internal_failure {
        put("internalFailure", json!(true));
    }
    if let Some(d) = t.duration {
        put("duration", json!(d));
    }
    if t.missing_cipd {
        put(
            "missingCipd",
            json!([{"packageName": "infra/fake/missing/${platform}", "version": "latest", "path": "."}]),
        );
    }
    Value::Object(m)
}

fn get_result(s: &Shared, req: &Map<String, Value>) -> Result<Value, RpcError> {
    let id = prpc::string(req, "task_id")?;
    if id.is_empty() {
        return Err(RpcError::invalid("bad request: task_id is required"));
    }
    lookup(s, &id)
}

fn lookup(s: &Shared, id: &str) -> Result<Value, RpcError> {
    let (key, run) = parse_task_id(id)
        .ok_or_else(|| RpcError::invalid(format!("bad request: bad task ID {id:?}")))?;
    let tasks = s.tasks();
    match tasks.by_key.get(&key) {
        Some(t) if !run || t.bot_id.is_some() => Ok(result_json(t, run)),
        _ => Err(RpcError::new(Code::NotFound, "no such task")),
    }
}

fn batch_get_result(s: &Shared, req: &Map<String, Value>) -> Result<Value, RpcError> {
    let ids = prpc::strings(req, "task_ids")?;
    if ids.is_empty() {
        return Err(RpcError::invalid("bad request: task_ids is required"));
    }
    if ids.len() > MAX_BATCH {
        return Err(RpcError::invalid(format!(
            "bad request: task_ids: at most {MAX_BATCH} task IDs, got {}",
            ids.len()
        )));
    }
    let mut seen = HashSet::with_capacity(ids.len());
    if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
        return Err(RpcError::invalid(format!(
            "bad request: task_ids: {dup:?} is specified more than once"
        )));
    }
    let results: Vec<Value> = ids
        .iter()
        .map(|id| match parse_task_id(id) {
            Some((_, true)) | None => json!({
                "taskId": id,
                "error": RpcError::invalid(format!("bad task ID {id:?}: want a summary ID")).status_json(),
            }),
            Some(_) => match lookup(s, id) {
                Ok(r) => json!({"taskId": id, "result": r}),
                Err(e) => json!({"taskId": id, "error": e.status_json()}),
            },
        })
        .collect();
    Ok(json!({ "results": results }))
}

fn cancel_task(s: &Arc<Shared>, req: &Map<String, Value>) -> Result<Value, RpcError> {
    let id = prpc::string(req, "task_id")?;
    let kill_running = prpc::boolean(req, "kill_running")?;
    let (key, _) = parse_task_id(&id)
        .ok_or_else(|| RpcError::invalid(format!("bad request: bad task ID {id:?}")))?;
    let mut tasks = s.tasks();
    let t = tasks
        .by_key
        .get_mut(&key)
        .ok_or_else(|| RpcError::new(Code::NotFound, "no such task"))?;
    let now = SystemTime::now();
    let (canceled, was_running) = match t.state {
        TaskState::Pending => {
            t.state = TaskState::Canceled;
            t.abandoned = Some(now);
            t.modified = now;
            t.signal.send_replace(Signal::Cancelled);
            (true, false)
        }
        TaskState::Running if kill_running && !t.killing => {
            t.killing = true;
            t.abandoned = Some(now);
            t.modified = now;
            t.signal.send_replace(Signal::Kill);
            (true, true)
        }
        TaskState::Running => (false, true),
        _ => (false, false),
    };
    let push = canceled
        .then(|| t.pubsub.clone().map(|p| (p, summary_id(key))))
        .flatten();
    drop(tasks);
    if let Some((p, id)) = push {
        publish(s, p, id);
    }
    let mut out = Map::new();
    if canceled {
        out.insert("canceled".into(), json!(true));
    }
    if was_running {
        out.insert("wasRunning".into(), json!(true));
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------------
// Bots

/// Plays the bot side of one task: waits for a bot, runs, ends as `behaviour` says.
async fn bot(
    s: Arc<Shared>,
    key: u64,
    behaviour: Behaviour,
    expire_at: Instant,
    execution_timeout: Duration,
    mut rx: watch::Receiver<Signal>,
) {
    // Pending.
    let pending_until = Instant::now() + Duration::from_millis(behaviour.pending_ms);
    if behaviour.end == End::Expire {
        if wait_signal(&mut rx, pending_until.min(expire_at))
            .await
            .is_none()
        {
            finish(&s, key, TaskState::Expired, None, false);
        }
        return;
    }
    if wait_signal(&mut rx, pending_until).await.is_some() {
        return;
    }
    let permit = tokio::select! {
        p = Arc::clone(&s.bots).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        _ = tokio::time::sleep_until(expire_at) => {
            finish(&s, key, TaskState::Expired, None, false);
            return;
        }
        _ = rx.wait_for(|sig| *sig != Signal::None) => return,
    };
    let bot = lock(&s.idle_bots).pop().unwrap_or(0);
    let started = Instant::now();
    // Claim.
    {
        let mut tasks = s.tasks();
        let Some(t) = tasks.by_key.get_mut(&key) else {
            return;
        };
        if t.state != TaskState::Pending {
            lock(&s.idle_bots).push(bot);
            return;
        }
        let now = SystemTime::now();
        t.state = TaskState::Running;
        t.started = Some(now);
        t.modified = now;
        t.bot_id = Some(format!("fake-bot-{bot}"));
        t.bot_dimensions = s.options.bot_dimensions.clone();
        t.bot_dimensions
            .push(("id".into(), format!("fake-bot-{bot}")));
        if let Some(p) = t.pubsub.clone() {
            let id = summary_id(key);
            drop(tasks);
            publish(&s, p, id);
        }
    }
    // Running.
    let run_until = started + Duration::from_millis(behaviour.run_ms);
    let timeout_at = started + execution_timeout;
    let ends_by = if behaviour.end == End::Hang {
        timeout_at
    } else {
        run_until.min(timeout_at)
    };
    let end = match wait_signal(&mut rx, ends_by).await {
        Some(Signal::Kill) => {
            tokio::time::sleep(Duration::from_millis(behaviour.kill_delay_ms)).await;
            // A timeout that passed meanwhile wins over the kill (`calculateState`).
            if Instant::now() >= timeout_at {
                TaskState::TimedOut
            } else {
                TaskState::Killed
            }
        }
        Some(_) => {
            drop(permit);
            lock(&s.idle_bots).push(bot);
            return;
        }
        None if Instant::now() >= timeout_at => TaskState::TimedOut,
        None => match behaviour.end {
            End::Exit(_) => TaskState::Completed,
            End::BotDied => TaskState::BotDied,
            End::TimedOut | End::Hang => TaskState::TimedOut,
            End::ClientError => TaskState::ClientError,
            End::Expire => TaskState::Expired,
        },
    };
    let exit = match (end, &behaviour.end) {
        (TaskState::Completed, End::Exit(code)) => Some(*code),
        (TaskState::ClientError, _) => None,
        _ => Some(-1),
    };
    finish(&s, key, end, exit, true);
    drop(permit);
    lock(&s.idle_bots).push(bot);
}

/// Waits until `until` (→ `None`) or a signal (→ it).
async fn wait_signal(rx: &mut watch::Receiver<Signal>, until: Instant) -> Option<Signal> {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => None,
        r = rx.wait_for(|sig| *sig != Signal::None) => Some(r.map(|v| *v).unwrap_or(Signal::Shutdown)),
    }
}

fn finish(s: &Arc<Shared>, key: u64, state: TaskState, exit: Option<i64>, ran: bool) {
    let mut tasks = s.tasks();
    let Some(t) = tasks.by_key.get_mut(&key) else {
        return;
    };
    if !t.state.is_active() {
        return;
    }
    let now = SystemTime::now();
    t.state = state;
    t.modified = now;
    t.exit_code = exit;
    match state {
        TaskState::BotDied => {
            t.internal_failure = true;
            t.abandoned = Some(now);
        }
        TaskState::Expired => t.abandoned = Some(now),
        TaskState::ClientError => t.missing_cipd = true,
        _ => {}
    }
    if ran {
        if state != TaskState::BotDied {
            t.completed = Some(now);
        }
        t.duration = t
            .started
            .and_then(|st| now.duration_since(st).ok())
            .map(|d| d.as_secs_f64());
    }
    let push = t.pubsub.clone();
    drop(tasks);
    if let Some(p) = push {
        publish(s, p, summary_id(key));
    }
}

// ---------------------------------------------------------------------------------------------
// Pub/Sub

/// Publishes `{"task_id","userdata"}` to the task's topic; the topic's push subscription (if
/// any) gets it as Pub/Sub push JSON, retried on non-2xx answers.
fn publish(s: &Arc<Shared>, p: PubSub, task_id: String) {
    let (url, lose) = {
        let c = s.config();
        (c.subscriptions.get(&p.topic).cloned(), c.lose_pushes)
    };
    let Some(url) = url.filter(|_| !lose) else {
        s.counters.pushes_lost.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let data = serde_json::to_string_pretty(&json!({"task_id": task_id, "userdata": p.userdata}))
        .unwrap_or_default();
    let mut attributes = Map::new();
    if !p.auth_token.is_empty() {
        attributes.insert("auth_token".into(), json!(p.auth_token));
    }
    let message_id = s.next_message.fetch_add(1, Ordering::Relaxed).to_string();
    let published = prpc::timestamp(SystemTime::now());
    let subscription = format!(
        "projects/{}/subscriptions/{}-push",
        p.topic.split('/').nth(1).unwrap_or("fake"),
        p.topic.rsplit('/').next().unwrap_or("topic")
    );
    let body = json!({
        "message": {
            "attributes": attributes,
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": published,
            "publish_time": published,
        },
        "subscription": subscription,
    });
    let s = Arc::clone(s);
    let attempts = s.options.push_attempts.max(1);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(20);
        for _ in 0..attempts {
            let sent = s
                .http
                .post(url.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                s.counters.pushes_delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        s.counters.pushes_failed.fetch_add(1, Ordering::Relaxed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_follow_the_taskid_go_format() {
        let id = summary_id(5);
        assert_eq!(id, "7ffffffffffffffa0");
        assert_eq!(parse_task_id(&id), Some((5, false)));
        assert_eq!(parse_task_id(&run_id(5)), Some((5, true)));
        assert_eq!(parse_task_id("zz0"), None);
        assert_eq!(parse_task_id("7ffffffffffffffa2"), None);
        assert_eq!(parse_task_id(""), None);
    }

    #[test]
    fn topics_must_name_project_and_topic() {
        assert!(valid_topic("projects/p/topics/t"));
        assert!(!valid_topic("projects/p/topics/"));
        assert!(!valid_topic("topics/t"));
        assert!(!valid_topic("https://example.invalid/push"));
    }
}
