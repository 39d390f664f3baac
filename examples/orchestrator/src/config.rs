//! The orchestrator's config: distributors, engine settings and store, with embedded defaults.
//!
//! ```toml
//! [distributors.local]        # any number of named instances (see distributor-core's config)
//! kind = "local"
//! state_dir = ".distributor/local"
//!
//! [engine]                    # optional; maps onto distributor_core::Settings
//! poll_interval = "5s"        # durations as "500ms"/"5s"/"1m", or integer milliseconds
//! stop_polls = 3
//!
//! [store]                     # optional
//! path = ".distributor/engine.db"   # SQLite file; ":memory:" keeps nothing
//! # or, for several orchestrator replicas on one PostgreSQL database:
//! # url = "postgres://user@db.example:5432/distributor"
//! # shards = 64                     # fixed when the database is first used
//! # lease_ttl = "10s"               # how soon a dead replica's executions are taken over
//!
//! [server]                    # optional; `orchestrator serve` only (see [`ServerConfig`])
//! allowed_hosts = ["orchestrator.internal"]
//! [[server.tokens]]
//! token_file = "/etc/orchestrator/ci-token"
//! scopes = ["submit", "read"]
//! ```
//!
//! Without a file (or without a `[distributors]` table) the orchestrator configures one
//! distributor, `local`, keeping its state under `.distributor/local`; the store defaults to
//! `.distributor/engine.db`. Engine settings start from [`default_settings`]. Every problem in a
//! file is reported at once, each with the JSON Pointer of the value at fault.
//!
//! The state directory (the SQLite file's directory, default `.distributor/`) is created with
//! mode 0700 and the database file with 0600: it holds the notification secret and every
//! payload. A database file that other users can read is refused (see [`OrchestratorConfig::open_store`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use distributor_core::store::{MemoryStore, PostgresOptions, PostgresStore, SqliteStore, Store};
use distributor_core::{
    ConfigError, ConfigProblem, DistributorsConfig, Engine, Error, Registry, Settings, nearest,
};
use serde_json::{Map, Value, json};

use serde::Deserialize;

use crate::duration::HumanDuration;

/// Where the engine keeps its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// One SQLite file (created with its directory if missing).
    Sqlite(PathBuf),
    /// In memory: everything is lost on exit.
    Memory,
    /// A PostgreSQL database that several orchestrator replicas may share.
    Postgres {
        /// `postgres://…` or `postgresql://…`.
        url: String,
        /// Shard count, used when the database is first used.
        shards: u32,
        /// Lease lifetime of a replica's shards.
        lease_ttl: std::time::Duration,
    },
}

impl StoreLocation {
    /// What `--store` names: a `postgres://` (or `postgresql://`) URL, `:memory:`, or a SQLite
    /// file path.
    pub fn parse(s: &str) -> Self {
        if is_postgres_url(s) {
            let d = distributor_core::store::PostgresOptions::default();
            Self::Postgres {
                url: s.to_owned(),
                shards: d.shards,
                lease_ttl: d.lease_ttl,
            }
        } else if s == ":memory:" {
            Self::Memory
        } else {
            Self::Sqlite(s.into())
        }
    }
}

fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// A loaded, validated orchestrator config.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// The distributor instances.
    pub distributors: DistributorsConfig,
    /// Engine tunables.
    pub settings: Settings,
    /// The store.
    pub store: StoreLocation,
    /// The HTTP server's security and limits (`[server]`).
    pub server: ServerConfig,
}

/// The default store file.
pub const DEFAULT_STORE: &str = ".distributor/engine.db";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = ".distributor";
/// The generated API token's file name in the state directory.
pub const DEFAULT_TOKEN_FILE: &str = "api-token";
/// The default `local` instance's state directory.
pub const DEFAULT_LOCAL_STATE: &str = ".distributor/local";

/// Every adapter kind linked into this binary.
///
/// Errors: [`Error::DuplicateKind`] if two linked crates register one kind.
pub fn registry() -> Result<Registry, Error> {
    Registry::from_inventory()
}

fn default_distributors() -> Value {
    json!({ "local": { "kind": "local", "state_dir": DEFAULT_LOCAL_STATE, "max_parallel": 8 } })
}

impl OrchestratorConfig {
    /// The embedded defaults: one `local` distributor and SQLite under `.distributor/`.
    ///
    /// Errors: the `local` kind is not linked (never in this binary).
    pub fn defaults(registry: &Registry) -> Result<Self, Error> {
        Self::from_value(registry, "<defaults>", &json!({}))
    }

    /// Loads `path` (JSON if it ends in `.json`, TOML otherwise), or the defaults when `None`.
    ///
    /// Errors: [`Error::Config`] with every problem in the file.
    pub fn load(registry: &Registry, path: Option<&Path>) -> Result<Self, Error> {
        let Some(path) = path else {
            return Self::defaults(registry);
        };
        let name = path.display().to_string();
        let problem = |message: String| -> Error {
            ConfigError {
                source_name: name.clone(),
                problems: vec![ConfigProblem {
                    instance: None,
                    pointer: String::new(),
                    message,
                }],
            }
            .into()
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read: {e}")))?;
        let doc: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| problem(format!("invalid JSON: {e}")))?
        } else {
            toml::from_str(&text).map_err(|e| problem(format!("invalid TOML: {e}")))?
        };
        Self::from_value(registry, &name, &doc)
    }

    /// Validates a parsed document. Problems in `[engine]`, `[store]` and `[distributors]` are
    /// all collected before failing.
    ///
    /// Errors: [`Error::Config`] listing every problem.
    pub fn from_value(registry: &Registry, source_name: &str, doc: &Value) -> Result<Self, Error> {
        let mut problems = Vec::new();
        let mut file_problem = |pointer: String, message: String| {
            problems.push(ConfigProblem {
                instance: None,
                pointer,
                message,
            });
        };
        let empty = Map::new();
        let Some(top) = doc.as_object() else {
            file_problem(String::new(), "expected a table at the top level".into());
            return Err(ConfigError {
                source_name: source_name.into(),
                problems,
            }
            .into());
        };
        for key in top.keys() {
            if !["distributors", "engine", "store", "server"].contains(&key.as_str()) {
                let hint = nearest(key, ["distributors", "engine", "store", "server"])
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                file_problem(
                    format!("/{key}"),
                    format!(
                        "unknown table `{key}`{hint}; expected distributors, engine, store, server"
                    ),
                );
            }
        }
        let settings = parse_settings(
            top.get("engine")
                .map_or(Ok(&empty), |v| v.as_object().ok_or(v)),
            &mut file_problem,
        );
        let store = parse_store(
            top.get("store")
                .map_or(Ok(&empty), |v| v.as_object().ok_or(v)),
            &mut file_problem,
        );
        let server = parse_server(top.get("server"), &mut file_problem);
        let mut dist_doc = Map::new();
        dist_doc.insert(
            "distributors".into(),
            top.get("distributors")
                .cloned()
                .unwrap_or_else(default_distributors),
        );
        let distributors =
            match DistributorsConfig::from_value(registry, source_name, &Value::Object(dist_doc)) {
                Ok(d) => Some(d),
                Err(Error::Config(e)) => {
                    problems.extend(e.problems);
                    None
                }
                Err(e) => return Err(e),
            };
        match (distributors, problems.is_empty()) {
            (Some(distributors), true) => Ok(Self {
                distributors,
                settings,
                store,
                server,
            }),
            _ => Err(ConfigError {
                source_name: source_name.into(),
                problems,
            }
            .into()),
        }
    }

    /// The state directory: the SQLite file's directory (`.distributor` for the default store,
    /// for `:memory:` and for PostgreSQL).
    pub fn state_dir(&self) -> PathBuf {
        match &self.store {
            StoreLocation::Sqlite(p) => p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            StoreLocation::Memory | StoreLocation::Postgres { .. } => {
                PathBuf::from(DEFAULT_STATE_DIR)
            }
        }
    }

    /// Where the server keeps the API token it generates (and the client commands read it):
    /// `[server] token_file`, default `api-token` in the [state directory](Self::state_dir).
    pub fn token_file(&self) -> PathBuf {
        self.server
            .token_file
            .clone()
            .unwrap_or_else(|| self.state_dir().join(DEFAULT_TOKEN_FILE))
    }

    /// Opens the store this config names. A new SQLite file is created with mode 0600 in a
    /// directory created with mode 0700 (SQLite gives its `-wal` and `-shm` files the database
    /// file's mode).
    ///
    /// Errors: [`Error::Store`] when the SQLite file cannot be created or opened, or when other
    /// users can read or write it (it holds the notification secret).
    pub async fn open_store(&self) -> Result<Arc<dyn Store>, Error> {
        Ok(match &self.store {
            StoreLocation::Memory => Arc::new(MemoryStore::new()),
            StoreLocation::Sqlite(p) => {
                crate::security::ensure_private_file(p).map_err(|e| Error::Store {
                    message: e.to_string(),
                    transient: false,
                    source: Some(Box::new(e)),
                })?;
                Arc::new(SqliteStore::open(p).await?)
            }
            StoreLocation::Postgres {
                url,
                shards,
                lease_ttl,
            } => Arc::new(
                PostgresStore::connect_with(
                    url,
                    PostgresOptions {
                        shards: *shards,
                        lease_ttl: *lease_ttl,
                        ..PostgresOptions::default()
                    },
                )
                .await?,
            ),
        })
    }

    /// Builds and starts an engine on this config; `notify_target` is where backends push.
    ///
    /// Errors: the store cannot be opened, or an adapter's factory refuses its config.
    pub async fn engine(
        &self,
        registry: Registry,
        notify_target: Option<String>,
    ) -> Result<Engine, Error> {
        let mut b = Engine::builder()
            .registry(registry)
            .distributors(self.distributors.clone())
            .settings(self.settings.clone())
            .store_arc(self.open_store().await?);
        if let Some(t) = notify_target {
            b = b.notify_target(t);
        }
        b.build().await
    }
}

type Section<'a> = Result<&'a Map<String, Value>, &'a Value>;

/// The engine settings the orchestrator starts from: the engine's defaults, except a 2 s hedge
/// poll for push adapters (the engine's 30 s suits remote backends; the local adapter's status is
/// a few file reads, and a short hedge bounds how late a lost push is noticed).
pub fn default_settings() -> Settings {
    Settings {
        hedge_poll_interval: std::time::Duration::from_secs(2),
        ..Settings::default()
    }
}

fn parse_settings(section: Section<'_>, problem: &mut impl FnMut(String, String)) -> Settings {
    let defaults = default_settings();
    let section = match section {
        Ok(s) => s,
        Err(_) => {
            problem("/engine".into(), "expected a table".into());
            return defaults;
        }
    };
    let known = match serde_json::to_value(&defaults) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mut merged = known.clone();
    for (key, value) in section {
        let pointer = format!("/engine/{key}");
        let Some(default) = known.get(key) else {
            let hint = nearest(key, known.keys().map(String::as_str))
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            problem(pointer, format!("unknown setting `{key}`{hint}"));
            continue;
        };
        // Durations are integer milliseconds in `Settings`; also accept "5s".
        let is_duration = ["interval", "timeout", "backoff", "ttl"]
            .iter()
            .any(|w| key.contains(w));
        let value = match (value, default) {
            (Value::String(s), Value::Number(_)) if is_duration => match HumanDuration::parse(s) {
                Ok(d) => json!(u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)),
                Err(e) => {
                    problem(pointer, e);
                    continue;
                }
            },
            (v, _) => v.clone(),
        };
        let mut one = Map::new();
        one.insert(key.clone(), value.clone());
        match serde_json::from_value::<Settings>(Value::Object(one)) {
            Ok(_) => {
                merged.insert(key.clone(), value);
            }
            Err(e) => problem(pointer, format!("{e}")),
        }
    }
    serde_json::from_value(Value::Object(merged)).unwrap_or(defaults)
}

fn parse_store(section: Section<'_>, problem: &mut impl FnMut(String, String)) -> StoreLocation {
    let default = StoreLocation::Sqlite(PathBuf::from(DEFAULT_STORE));
    let section = match section {
        Ok(s) => s,
        Err(_) => {
            problem("/store".into(), "expected a table".into());
            return default;
        }
    };
    let mut out = default;
    let pg = PostgresOptions::default();
    let (mut url, mut shards, mut lease_ttl) = (None, pg.shards, pg.lease_ttl);
    let mut pg_only = Vec::new();
    for (key, value) in section {
        match (key.as_str(), value.as_str()) {
            ("path", Some(":memory:")) => out = StoreLocation::Memory,
            ("path", Some(p)) if !p.is_empty() => out = StoreLocation::Sqlite(p.into()),
            ("path", _) => problem(
                "/store/path".into(),
                "expected a file path (or \":memory:\")".into(),
            ),
            ("url", Some(u)) if is_postgres_url(u) => url = Some(u.to_owned()),
            ("url", _) => problem(
                "/store/url".into(),
                "expected a postgres:// or postgresql:// URL".into(),
            ),
            ("shards", _) => match value.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if (1..=4096).contains(&n) => {
                    shards = n;
                    pg_only.push(key.clone());
                }
                _ => problem(
                    "/store/shards".into(),
                    "expected an integer from 1 to 4096".into(),
                ),
            },
            ("lease_ttl", _) => {
                let d = match value {
                    Value::String(s) => HumanDuration::parse(s).map(|d| d.0),
                    Value::Number(n) => n
                        .as_u64()
                        .map(std::time::Duration::from_millis)
                        .ok_or_else(|| "expected a duration".to_owned()),
                    _ => Err("expected a duration such as \"10s\"".to_owned()),
                };
                match d {
                    Ok(d) if d >= std::time::Duration::from_millis(300) => {
                        lease_ttl = d;
                        pg_only.push(key.clone());
                    }
                    Ok(_) => problem("/store/lease_ttl".into(), "must be at least 300ms".into()),
                    Err(e) => problem("/store/lease_ttl".into(), e),
                }
            }
            (other, _) => problem(
                format!("/store/{other}"),
                format!("unknown field `{other}`; expected `path`, `url`, `shards`, `lease_ttl`"),
            ),
        }
    }
    match url {
        Some(url) => {
            if section.contains_key("path") {
                problem(
                    "/store/path".into(),
                    "give either `path` (SQLite) or `url` (PostgreSQL), not both".into(),
                );
            }
            out = StoreLocation::Postgres {
                url,
                shards,
                lease_ttl,
            };
        }
        None => {
            for key in pg_only {
                problem(
                    format!("/store/{key}"),
                    format!("`{key}` applies to a PostgreSQL store (`url`) only"),
                );
            }
        }
    }
    out
}

/// `[server]`: who may call the HTTP API and how long a request may take. Every field is
/// optional.
///
/// ```toml
/// [server]
/// allowed_hosts = ["orchestrator.internal"]   # Host names served, besides loopback; "*" = any
/// allowed_origins = ["https://ci.internal"]    # browser origins allowed besides the server's own
/// public = ["/healthz", "/metrics"]            # paths needing no token (default adds /v1/openapi.json)
/// token_file = ".distributor/api-token"        # the generated token (when no tokens are listed)
/// body_limit = 1048576                          # bytes
/// header_timeout = "10s"                        # to receive a request's headers (and keep-alive idle)
/// body_timeout = "30s"                          # to receive its body
/// max_connections = 512
/// shutdown_grace = "10s"                        # SIGTERM: open connections are dropped after this
///
/// [[server.tokens]]                             # any number; each one of token, token_file, token_env
/// name = "ci"
/// token_file = "/etc/orchestrator/ci-token"    # must not be readable by others
/// scopes = ["submit", "read"]                  # read, submit, cancel, admin
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Host names served besides `localhost`, `127.0.0.1`, `::1`; `"*"` serves any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed besides the server's own (`https://ci.internal`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Paths that need no API token (default `/healthz`, `/metrics`, `/v1/openapi.json`).
    #[serde(default)]
    pub public: Option<Vec<String>>,
    /// API tokens. Without any, the server generates one with scope `admin` in `token_file`.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Where the generated token is kept (default `<state dir>/api-token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Largest request body, in bytes (default 1 MiB).
    #[serde(default)]
    pub body_limit: Option<usize>,
    /// Time to receive a request's headers, also the keep-alive idle limit (default 10 s).
    #[serde(default)]
    pub header_timeout: Option<HumanDuration>,
    /// Time to receive a request's body (default 30 s).
    #[serde(default)]
    pub body_timeout: Option<HumanDuration>,
    /// Most connections open at once; more wait in the listen backlog (default 512).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// On shutdown, how long open requests may finish before connections are dropped
    /// (default 10 s).
    #[serde(default)]
    pub shutdown_grace: Option<HumanDuration>,
}

/// One `[[server.tokens]]` entry: exactly one of `token`, `token_file`, `token_env`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Its name in logs and messages (default `token-<index>`).
    #[serde(default)]
    pub name: Option<String>,
    /// The token itself (prefer `token_file` or `token_env`: config files get copied around).
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding it (first line); refused if others can read it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding it.
    #[serde(default)]
    pub token_env: Option<String>,
    /// What it may do.
    pub scopes: Vec<crate::security::Scope>,
}

/// The server's resolved security: what [`crate::security::secure`] checks, the connection
/// limits, and the path of a token generated now (to tell the operator).
#[derive(Debug, Clone)]
pub struct ServerSetup {
    /// The guard's checks.
    pub security: crate::security::Security,
    /// Connection limits and shutdown deadline.
    pub limits: crate::serve::Limits,
    /// The file of the token the server generated or reuses (when no tokens are configured).
    pub token_file: Option<PathBuf>,
}

impl OrchestratorConfig {
    /// Resolves `[server]` for a server listening on `listen`: reads token files and
    /// variables, or generates the default token (see [`token_file`](Self::token_file)).
    ///
    /// Errors: a token file is unreadable, empty or readable by others; a variable is unset;
    /// the server listens on every interface without `allowed_hosts`.
    pub fn server_setup(&self, listen: std::net::SocketAddr) -> Result<ServerSetup, String> {
        use crate::security::{ApiTokens, HostPolicy, Scope, Security};
        let c = &self.server;
        if listen.ip().is_unspecified() && c.allowed_hosts.is_empty() {
            return Err(format!(
                "listening on {listen} (every interface) needs [server] allowed_hosts: the host                  names clients use to reach this server (\"*\" to accept any, behind a proxy                  that checks them)"
            ));
        }
        let listen_ip = listen.ip().to_string();
        let hosts = HostPolicy::loopback_and(
            c.allowed_hosts
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(listen_ip.as_str())),
        );
        let mut tokens = ApiTokens::new();
        let mut token_file = None;
        for (i, t) in c.tokens.iter().enumerate() {
            let name = t.name.clone().unwrap_or_else(|| format!("token-{i}"));
            let at = format!("/server/tokens/{i}");
            let value = match (&t.token, &t.token_file, &t.token_env) {
                (Some(v), None, None) => v.clone(),
                (None, Some(f), None) => {
                    crate::security::read_token_file(f).map_err(|e| format!("{at}: {e}"))?
                }
                (None, None, Some(var)) => std::env::var(var)
                    .map_err(|_| format!("{at}/token_env: variable `{var}` is not set"))?,
                _ => {
                    return Err(format!(
                        "{at}: give exactly one of `token`, `token_file`, `token_env`"
                    ));
                }
            };
            if value.len() < 16 {
                return Err(format!("{at}: a token needs at least 16 characters"));
            }
            tokens.insert(&name, &value, t.scopes.iter().copied());
        }
        if c.tokens.is_empty() {
            let path = self.token_file();
            let (token, _) =
                crate::security::load_or_generate_token(&path).map_err(|e| e.to_string())?;
            tokens.insert("default", &token, [Scope::Admin]);
            token_file = Some(path);
        }
        let mut security = Security::loopback(tokens);
        security.hosts = hosts;
        security.origins = c.allowed_origins.iter().cloned().collect();
        if let Some(p) = &c.public {
            security.public = p.iter().cloned().collect();
        }
        if let Some(n) = c.body_limit {
            security.body_limit = n;
        }
        if let Some(d) = c.body_timeout {
            security.body_timeout = d.0;
        }
        let mut limits = crate::serve::Limits::default();
        if let Some(d) = c.header_timeout {
            limits.header_timeout = d.0;
        }
        if let Some(n) = c.max_connections {
            limits.max_connections = n.max(1);
        }
        if let Some(d) = c.shutdown_grace {
            limits.shutdown_grace = d.0;
        }
        Ok(ServerSetup {
            security,
            limits,
            token_file,
        })
    }
}

fn parse_server(section: Option<&Value>, problem: &mut impl FnMut(String, String)) -> ServerConfig {
    let Some(v) = section else {
        return ServerConfig::default();
    };
    match serde_path_to_error::deserialize::<_, ServerConfig>(v.clone()) {
        Ok(c) => c,
        Err(e) => {
            let pointer = crate::taskfile::pointer_of(&e.path().to_string());
            let msg = crate::taskfile::humanize(&e.into_inner().to_string());
            problem(format!("/server{pointer}"), msg);
            ServerConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        registry().unwrap()
    }

    #[test]
    fn defaults_have_local_and_sqlite() {
        let c = OrchestratorConfig::defaults(&reg()).unwrap();
        assert_eq!(
            c.distributors.names(),
            [distributor_core::DistributorName::from("local")]
        );
        assert_eq!(c.store, StoreLocation::Sqlite(DEFAULT_STORE.into()));
        assert_eq!(c.settings, default_settings());
    }

    #[test]
    fn engine_table_maps_onto_settings_with_human_durations() {
        let doc: Value = toml::from_str(
            "[engine]\npoll_interval = \"2s\"\nstop_polls = 1\nbackoff_base = 250\n\
             [store]\npath = \":memory:\"",
        )
        .unwrap();
        let c = OrchestratorConfig::from_value(&reg(), "t", &doc).unwrap();
        assert_eq!(c.settings.poll_interval, std::time::Duration::from_secs(2));
        assert_eq!(c.settings.stop_polls, 1);
        assert_eq!(
            c.settings.backoff_base,
            std::time::Duration::from_millis(250)
        );
        assert_eq!(c.store, StoreLocation::Memory);
    }

    #[test]
    fn server_table_is_checked_and_resolves_tokens_and_limits() {
        let doc: Value = toml::from_str(
            "[server]\nallowed_hosts = [\"orch.internal\"]\nheader_timeout = \"3s\"\n\
             [[server.tokens]]\nname = \"ci\"\ntoken = \"0123456789abcdef0123\"\n\
             scopes = [\"submit\", \"read\"]\n[store]\npath = \":memory:\"\n",
        )
        .unwrap();
        let c = OrchestratorConfig::from_value(&reg(), "t", &doc).unwrap();
        let setup = c.server_setup("127.0.0.1:8080".parse().unwrap()).unwrap();
        assert_eq!(
            setup.token_file, None,
            "configured tokens: nothing generated"
        );
        assert_eq!(setup.security.tokens.len(), 1);
        assert_eq!(
            setup.limits.header_timeout,
            std::time::Duration::from_secs(3)
        );
        // Every interface needs allowed_hosts.
        let bare = OrchestratorConfig::from_value(&reg(), "t", &json!({})).unwrap();
        let e = bare
            .server_setup("0.0.0.0:8080".parse().unwrap())
            .unwrap_err();
        assert!(e.contains("allowed_hosts"), "{e}");
        // Typos and bad scopes are named with their pointer.
        let doc: Value = toml::from_str("[server]\nallowed_host = [\"x\"]\n").unwrap();
        let Err(Error::Config(e)) = OrchestratorConfig::from_value(&reg(), "t", &doc) else {
            panic!("expected a config error");
        };
        let text = e.to_string();
        assert!(text.contains("/server/allowed_host"), "{text}");
        assert!(text.contains("did you mean `allowed_hosts`"), "{text}");
        let doc: Value = toml::from_str(
            "[[server.tokens]]\ntoken = \"0123456789abcdef0123\"\nscopes = [\"rea\"]\n",
        )
        .unwrap();
        let Err(Error::Config(e)) = OrchestratorConfig::from_value(&reg(), "t", &doc) else {
            panic!("expected a config error");
        };
        assert!(e.to_string().contains("/server/tokens/0/scopes/0"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_pointer() {
        let doc: Value = toml::from_str(
            "[engine]\npoll_intervall = \"2s\"\nstop_polls = \"many\"\nbackoff_max = \"2 weeks\"\n\
             [store]\nfile = \"x\"\n[distributors.a]\nkind = \"locl\"\n\
             [distributors.b]\nkind = \"local\"\nmax_parallel = \"x\"\n[extra]\n",
        )
        .unwrap();
        let Err(Error::Config(e)) = OrchestratorConfig::from_value(&reg(), "t", &doc) else {
            panic!("expected a config error");
        };
        let at: Vec<_> = e.problems.iter().map(|p| p.pointer.as_str()).collect();
        for want in [
            "/extra",
            "/engine/poll_intervall",
            "/engine/stop_polls",
            "/engine/backoff_max",
            "/store/file",
            "/kind",
            "/max_parallel",
        ] {
            assert!(at.contains(&want), "missing {want} in {e}");
        }
        let text = e.to_string();
        assert!(text.contains("did you mean `poll_interval`"), "{text}");
        assert!(text.contains("did you mean `local`"), "{text}");
    }

    #[test]
    fn postgres_store_from_the_file_or_the_flag() {
        let doc: Value = toml::from_str(
            "[store]\nurl = \"postgres://u@db:5432/d\"\nshards = 16\nlease_ttl = \"4s\"",
        )
        .unwrap();
        let c = OrchestratorConfig::from_value(&reg(), "t", &doc).unwrap();
        assert_eq!(
            c.store,
            StoreLocation::Postgres {
                url: "postgres://u@db:5432/d".into(),
                shards: 16,
                lease_ttl: std::time::Duration::from_secs(4),
            }
        );
        assert!(matches!(
            StoreLocation::parse("postgresql://h/d"),
            StoreLocation::Postgres { shards: 64, .. }
        ));
        assert_eq!(StoreLocation::parse(":memory:"), StoreLocation::Memory);
        assert_eq!(
            StoreLocation::parse("x.db"),
            StoreLocation::Sqlite("x.db".into())
        );
    }

    #[test]
    fn postgres_store_problems_have_pointers() {
        let doc: Value =
            toml::from_str("[store]\nurl = \"mysql://x\"\nshards = 0\nlease_ttl = \"1ms\"")
                .unwrap();
        let Err(Error::Config(e)) = OrchestratorConfig::from_value(&reg(), "t", &doc) else {
            panic!("expected a config error");
        };
        let mut at: Vec<_> = e.problems.iter().map(|p| p.pointer.as_str()).collect();
        at.sort_unstable();
        assert_eq!(
            at,
            ["/store/lease_ttl", "/store/shards", "/store/url"],
            "{e}"
        );
        let doc: Value = toml::from_str("[store]\npath = \"a.db\"\nshards = 8").unwrap();
        let Err(Error::Config(e)) = OrchestratorConfig::from_value(&reg(), "t", &doc) else {
            panic!("expected a config error");
        };
        assert!(e.to_string().contains("PostgreSQL store"), "{e}");
    }
}
