//! A fake LUCI Swarming server for tests: the public `swarming.v2.Tasks` pRPC API over HTTP on
//! a loopback port, with bots that take pending tasks and finish them, and Pub/Sub pushes in
//! Google's push JSON.
//!
//! What it follows from the Go server (`luci-go/swarming/server`, see
//! `shared/research/round2.md` §1):
//!
//! - **pRPC**: `POST /prpc/swarming.v2.Tasks/<Method>`, JSON in and out (`Content-Type` and
//!   `Accept: application/json` are required: the real server's default reply is binary
//!   protobuf, which this fake does not speak), every reply body prefixed with `)]}'\n`, the
//!   gRPC code in `X-Prpc-Grpc-Code` and the HTTP status following it (404 for `NOT_FOUND`…),
//!   error messages as text. Input accepts proto names and lowerCamelCase JSON names and ignores
//!   unknown fields (the server decodes with `DiscardUnknown`); output uses lowerCamelCase,
//!   int64 as strings, enums by name, RFC 3339 timestamps and omits default values.
//! - **RPCs**: `NewTask`, `GetResult`, `BatchGetResult` (1..1000 ids, no duplicates, per-item
//!   errors), `CancelTask` (`canceled`, `was_running`; a running task gets only its kill bit
//!   set and stays RUNNING until its bot stops it). Others answer `UNIMPLEMENTED`.
//! - **NewTask validation**: name, priority 1..255, ≤ 256 `k:v` tags, 1..8 `task_slices` with
//!   one `pool` dimension, expiration 30 s..7 d, command 1..128 args, execution timeout
//!   30 s..7 d, io timeout 0 or ≥ 30 s, grace period ≤ 3600 s, unique env keys, secret bytes ≤
//!   20 KiB, the deprecated top-level `properties`/`expiration_secs` refused, `pubsub_topic` of
//!   the form `projects/<p>/topics/<t>`, token and userdata only with a topic, userdata ≤ 1024
//!   bytes, `evaluate_only`.
//! - **request_uuid**: deduplicated per caller (`"<identity>:<uuid>"`) for 7 days; a repeat
//!   returns the existing task and its current result without comparing the bodies.
//! - **Bots**: [`Options::bots`] bots with [`Options::bot_dimensions`]; a slice whose dimensions
//!   no bot has is denied at once unless `wait_for_capacity` (the last one ends the task
//!   `NO_RESOURCE`); pending tasks wait for a free bot until their slices' expiration
//!   (`EXPIRED`). What a bot does with a task is its [`Behaviour`]: chosen by the first rule
//!   whose tag the task carries ([`FakeSwarming::behave_for_tag`]), else the default.
//! - **Pub/Sub**: on claim, completion, expiry, cancel (also when only the kill bit is set) and
//!   on creation of an already-final task, a message `{"task_id","userdata"}` (indented JSON)
//!   with attribute `auth_token` (only when the task set one) is pushed to the URL subscribed to
//!   the task's topic ([`FakeSwarming::subscribe`]), wrapped as Pub/Sub push JSON
//!   (`{"message":{"attributes","data","messageId","publishTime"},"subscription"}`); a non-2xx
//!   answer is retried a few times. Delivery order is not promised, as with Pub/Sub.
//! - **Caller identity**: `Authorization: Bearer <token>`; with no tokens registered any
//!   non-empty token is accepted as identity `user:<token>`, else only registered ones
//!   ([`FakeSwarming::accept_token`]). No header → `UNAUTHENTICATED`.
//!
//! Not modelled: binary protobuf, CAS/CIPD, task deduplication by `idempotent`, bots' own API,
//! ResultDB, realms/ACLs beyond the caller identity, `ListTasks` and the other RPCs.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use swarming_fake::{Behaviour, End, FakeSwarming};
//! let fake = FakeSwarming::start().await.unwrap();
//! fake.set_default_behaviour(Behaviour { run_ms: 5, ..Behaviour::default() });
//! fake.behave_for_tag("outcome:fail", Behaviour { end: End::Exit(3), ..Behaviour::default() });
//! assert!(fake.url().as_str().starts_with("http://127.0.0.1:"));
//! # });
//! ```

#![deny(missing_docs)]

pub mod prpc;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use server::Shared;
pub use server::TaskState;
use tokio::task::JoinHandle;

/// How a bot ends a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The process exits with this code: `COMPLETED` (`failure` when non-zero).
    Exit(i64),
    /// The bot dies mid-task: `BOT_DIED`, `internal_failure`, exit code -1.
    BotDied,
    /// The task hits its timeout: `TIMED_OUT`, exit code -1.
    TimedOut,
    /// The bot finds a client-side problem (a missing CIPD package): `CLIENT_ERROR`.
    ClientError,
    /// No bot ever takes the task: it stays PENDING for `pending_ms`, then `EXPIRED`.
    Expire,
    /// The process runs until it is killed (`KILLED`) or its `execution_timeout_secs` pass
    /// (`TIMED_OUT`).
    Hang,
}

/// What a bot does with a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behaviour {
    /// How long the task stays PENDING before a bot may take it, in milliseconds.
    pub pending_ms: u64,
    /// How long it runs before it ends, in milliseconds (ignored by [`End::Hang`]).
    pub run_ms: u64,
    /// How it ends.
    pub end: End,
    /// How long a bot takes to notice a kill request, in milliseconds (the real bot notices at
    /// its next poll).
    pub kill_delay_ms: u64,
}

impl Default for Behaviour {
    /// Taken at once, runs 20 ms, exits 0.
    fn default() -> Self {
        Self {
            pending_ms: 0,
            run_ms: 20,
            end: End::Exit(0),
            kill_delay_ms: 0,
        }
    }
}

/// Options of a fake server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// How many bots take tasks (tasks beyond them stay PENDING). Default 64.
    pub bots: usize,
    /// Dimensions every bot has (each bot also has `id:<bot id>`). Default `pool:default`,
    /// `os:Linux`, `cpu:x86-64`.
    pub bot_dimensions: Vec<(String, String)>,
    /// How many times a push is attempted before it is given up. Default 5.
    pub push_attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bots: 64,
            bot_dimensions: vec![
                ("pool".into(), "default".into()),
                ("os".into(), "Linux".into()),
                ("cpu".into(), "x86-64".into()),
            ],
            push_attempts: 5,
        }
    }
}

/// Counters of what the fake has seen and done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `NewTask` calls answered OK (including deduplicated ones and `evaluate_only`).
    pub new_task_calls: u64,
    /// Tasks created.
    pub tasks_created: u64,
    /// `GetResult` calls.
    pub get_result_calls: u64,
    /// `BatchGetResult` calls.
    pub batch_get_result_calls: u64,
    /// `CancelTask` calls.
    pub cancel_calls: u64,
    /// Pushes a subscriber acknowledged (2xx).
    pub pushes_delivered: u64,
    /// Pushes dropped on purpose ([`FakeSwarming::lose_pushes`]) or without a subscription.
    pub pushes_lost: u64,
    /// Pushes given up after every attempt failed.
    pub pushes_failed: u64,
}

/// A running fake Swarming server. Dropping it stops the server and its bots.
#[derive(Debug)]
pub struct FakeSwarming {
    url: reqwest::Url,
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeSwarming {
    /// Starts a fake with default [`Options`] on an ephemeral loopback port. MUST be called
    /// inside a tokio runtime; the server and its bots run on it.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts a fake with `options` on an ephemeral loopback port.
    pub async fn start_with(options: Options) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let url = reqwest::Url::parse(&format!("http://{addr}/"))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let shared = Shared::new(options);
        let app = server::router(Arc::clone(&shared));
        // Without TCP_NODELAY a large reply (a BatchGetResult of 1000 results) stalls on
        // delayed ACKs.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "swarming fake stopped");
            }
        });
        Ok(Self {
            url,
            addr,
            shared,
            server,
        })
    }

    /// The base URL (`http://127.0.0.1:<port>/`); the pRPC endpoints are under `prpc/`.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The behaviour of tasks no tag rule matches.
    pub fn set_default_behaviour(&self, behaviour: Behaviour) {
        self.shared.config().default = behaviour;
    }

    /// Tasks carrying `tag` (`k:v`) get `behaviour`. Rules are tried in the order they were
    /// added; a second rule for the same tag replaces the first.
    pub fn behave_for_tag(&self, tag: &str, behaviour: Behaviour) {
        let mut c = self.shared.config();
        match c.rules.iter_mut().find(|(t, _)| t == tag) {
            Some(rule) => rule.1 = behaviour,
            None => c.rules.push((tag.to_owned(), behaviour)),
        }
    }

    /// Pushes for Pub/Sub `topic` go to `push_url` (a push subscription). Replaces an earlier
    /// subscription of the topic.
    pub fn subscribe(&self, topic: &str, push_url: reqwest::Url) {
        self.shared
            .config()
            .subscriptions
            .insert(topic.to_owned(), push_url);
    }

    /// While `lose` is true, every push is dropped (counted in [`Stats::pushes_lost`]).
    pub fn lose_pushes(&self, lose: bool) {
        self.shared.config().lose_pushes = lose;
    }

    /// Accepts `token` as a bearer token of `identity` (`user:ci@example.com`). Once any token
    /// is registered, unregistered tokens are refused with `UNAUTHENTICATED`.
    pub fn accept_token(&self, token: &str, identity: &str) {
        self.shared
            .config()
            .tokens
            .insert(token.to_owned(), identity.to_owned());
    }

    /// The next `n` pRPC calls fail with `code` (fault injection for clients' retry logic).
    pub fn fail_next(&self, n: u32, code: prpc::Code) {
        self.shared.config().fail_next = Some((n, code));
    }

    /// What the fake has counted so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// How many tasks carry `tag` (`k:v`).
    pub fn tasks_with_tag(&self, tag: &str) -> usize {
        self.shared.tasks_with_tag(tag)
    }

    /// The state of a task by its summary id, if the fake knows it.
    pub fn task_state(&self, task_id: &str) -> Option<TaskState> {
        self.shared.task_state(task_id)
    }
}

impl Drop for FakeSwarming {
    fn drop(&mut self) {
        self.server.abort();
        self.shared.shut_down();
    }
}

/// Settings the test changes while the fake runs.
#[derive(Debug, Default)]
struct Config {
    default: Behaviour,
    rules: Vec<(String, Behaviour)>,
    subscriptions: HashMap<String, reqwest::Url>,
    lose_pushes: bool,
    tokens: HashMap<String, String>,
    fail_next: Option<(u32, prpc::Code)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
