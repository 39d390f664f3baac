//! The pRPC client (`swarming.v2.Tasks` over JSON), its bearer token, the request this adapter
//! builds for `NewTask`, and the parsed `TaskResultResponse`.
//!
//! Wire rules followed (luci-go `grpc/prpc`): `POST <url>/prpc/swarming.v2.Tasks/<Method>` with
//! `Content-Type` and `Accept: application/json`; the reply body starts with `)]}'` (stripped);
//! `X-Prpc-Grpc-Code` decides success, not the HTTP status; int64 fields arrive as strings.
//! Replies are read under both the JSON names the Go server emits (`taskId`) and the proto
//! names (`task_id`).

use std::time::Duration;

use distributor_core::Result;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{SwarmingConfig, TokenSource};
use crate::error::{Failure, GrpcCode, TransportKind};

/// The pRPC service this adapter speaks.
pub(crate) const SERVICE: &str = "swarming.v2.Tasks";
/// The most task ids one `BatchGetResult` accepts.
pub(crate) const MAX_BATCH: usize = 1000;

/// A bearer token and where it comes from.
#[derive(Debug)]
struct Auth {
    source: TokenSource,
    current: Mutex<Option<(String, Instant)>>,
}

impl Auth {
    /// The token to send, obtaining it first if there is none or it is due for refresh.
    async fn token(&self) -> Result<String, Failure> {
        let mut cur = self.current.lock().await;
        if let Some((t, fresh_until)) = &*cur
            && Instant::now() < *fresh_until
        {
            return Ok(t.clone());
        }
        let (t, ttl) = self.fetch().await?;
        *cur = Some((t.clone(), Instant::now() + ttl));
        Ok(t)
    }

    /// Forgets the token, so the next call obtains a fresh one.
    async fn invalidate(&self) {
        *self.current.lock().await = None;
    }

    async fn fetch(&self) -> Result<(String, Duration), Failure> {
        let (raw, ttl) = match &self.source {
            TokenSource::File(path) => {
                let raw = tokio::fs::read_to_string(path).await.map_err(|e| {
                    Failure::Token(format!("reading the token file `{}`: {e}", path.display()))
                })?;
                // Re-read on UNAUTHENTICATED only; a file is cheap to keep.
                (raw, Duration::from_secs(24 * 3600))
            }
            TokenSource::Command { argv, refresh_secs } => {
                let (prog, args) = argv
                    .split_first()
                    .ok_or_else(|| Failure::Token("the token command is empty".into()))?;
                let out = tokio::time::timeout(
                    Duration::from_secs(60),
                    tokio::process::Command::new(prog)
                        .args(args)
                        .stdin(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .output(),
                )
                .await
                .map_err(|_| Failure::Token(format!("the token command `{prog}` took over 60 s")))?
                .map_err(|e| Failure::Token(format!("running the token command `{prog}`: {e}")))?;
                if !out.status.success() {
                    return Err(Failure::Token(format!(
                        "the token command `{prog}` failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                (
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    Duration::from_secs(*refresh_secs),
                )
            }
        };
        let token = raw.trim();
        if token.is_empty() {
            return Err(Failure::Token("the swarming token is empty".into()));
        }
        Ok((token.to_owned(), ttl))
    }
}

/// A `swarming.v2.Tasks` client.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// `<url>/prpc/swarming.v2.Tasks/` .
    prefix: String,
    auth: Auth,
}

impl Client {
    /// Builds a client. Does no I/O: the token is obtained at the first call.
    pub(crate) fn new(config: &SwarmingConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| {
                distributor_core::Error::permanent_from("building the swarming http client", e)
            })?;
        Ok(Self {
            http,
            prefix: format!(
                "{}/prpc/{SERVICE}/",
                config.url.as_str().trim_end_matches('/')
            ),
            auth: Auth {
                source: config.token.clone(),
                current: Mutex::new(None),
            },
        })
    }

    /// Obtains the token now (at build, to report a broken token source early).
    pub(crate) async fn check_token(&self) -> Result<(), Failure> {
        self.auth.token().await.map(|_| ())
    }

    /// Calls `method` with `body`; on `UNAUTHENTICATED` obtains a fresh token and tries once
    /// more.
    pub(crate) async fn call(&self, method: &str, body: &Value) -> Result<Value, Failure> {
        let text = body.to_string();
        let mut retried = false;
        loop {
            let token = self.auth.token().await?;
            let resp = self
                .http
                .post(format!("{}{method}", self.prefix))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT, "application/json")
                .header(reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(text.clone())
                .send()
                .await
                .map_err(transport)?;
            let status = resp.status().as_u16();
            let code = resp
                .headers()
                .get("x-prpc-grpc-code")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().parse::<u16>());
            let bytes = resp.bytes().await.map_err(transport)?;
            match code {
                Some(Ok(0)) => return parse_body(&bytes),
                Some(Ok(c)) => {
                    let code = GrpcCode(c);
                    if code == GrpcCode::UNAUTHENTICATED && !retried {
                        self.auth.invalidate().await;
                        retried = true;
                        continue;
                    }
                    if code == GrpcCode::UNAUTHENTICATED {
                        self.auth.invalidate().await;
                    }
                    return Err(Failure::Rpc {
                        code,
                        message: snippet(&bytes),
                    });
                }
                Some(Err(_)) => {
                    return Err(Failure::Decode(format!(
                        "X-Prpc-Grpc-Code is not a number (HTTP {status})"
                    )));
                }
                None if (200..300).contains(&status) => return parse_body(&bytes),
                None => {
                    return Err(Failure::Http {
                        status,
                        body: snippet(&bytes),
                    });
                }
            }
        }
    }
}

/// Parses a successful reply body, stripping pRPC's `)]}'` prefix.
pub(crate) fn parse_body(bytes: &[u8]) -> Result<Value, Failure> {
    let body = bytes.strip_prefix(b")]}'").unwrap_or(bytes);
    serde_json::from_slice(body).map_err(|e| Failure::Decode(e.to_string()))
}

fn transport(e: reqwest::Error) -> Failure {
    Failure::Transport {
        kind: TransportKind::of(&e),
        source: e,
    }
}

/// The first 300 characters of an error body.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(300)
        .collect()
}

/// Swarming's `TaskState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskState {
    Pending,
    Running,
    Completed,
    BotDied,
    TimedOut,
    Expired,
    NoResource,
    Killed,
    Canceled,
    ClientError,
    /// `INVALID` or a name this adapter does not know (a newer server).
    Unknown,
}

impl TaskState {
    /// From the enum name (protojson) or its number (also accepted by protojson).
    pub(crate) fn parse(v: &Value) -> Self {
        match v {
            Value::String(s) => match s.as_str() {
                "PENDING" => Self::Pending,
                "RUNNING" => Self::Running,
                "COMPLETED" => Self::Completed,
                "BOT_DIED" => Self::BotDied,
                "TIMED_OUT" => Self::TimedOut,
                "EXPIRED" => Self::Expired,
                "NO_RESOURCE" => Self::NoResource,
                "KILLED" => Self::Killed,
                "CANCELED" => Self::Canceled,
                "CLIENT_ERROR" => Self::ClientError,
                _ => Self::Unknown,
            },
            Value::Number(n) => match n.as_u64() {
                Some(0x10) => Self::Running,
                Some(0x20) => Self::Pending,
                Some(0x30) => Self::Expired,
                Some(0x40) => Self::TimedOut,
                Some(0x50) => Self::BotDied,
                Some(0x60) => Self::Canceled,
                Some(0x70) => Self::Completed,
                Some(0x80) => Self::Killed,
                Some(0x100) => Self::NoResource,
                Some(0x200) => Self::ClientError,
                _ => Self::Unknown,
            },
            // An unset enum is omitted by protojson: INVALID.
            _ => Self::Unknown,
        }
    }
}

/// The fields of a `TaskResultResponse` this adapter reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct TaskResult {
    #[serde(rename = "taskId", alias = "task_id")]
    pub task_id: String,
    pub state: Value,
    #[serde(rename = "exitCode", alias = "exit_code", deserialize_with = "int64")]
    pub exit_code: i64,
    pub failure: bool,
    #[serde(rename = "internalFailure", alias = "internal_failure")]
    pub internal_failure: bool,
    #[serde(rename = "runId", alias = "run_id")]
    pub run_id: String,
    #[serde(rename = "botId", alias = "bot_id")]
    pub bot_id: String,
    pub duration: Option<f64>,
    #[serde(rename = "dedupedFrom", alias = "deduped_from")]
    pub deduped_from: String,
    #[serde(rename = "casOutputRoot", alias = "cas_output_root")]
    pub cas_output_root: Option<Value>,
    #[serde(rename = "cipdPins", alias = "cipd_pins")]
    pub cipd_pins: Option<Value>,
    #[serde(rename = "botDimensions", alias = "bot_dimensions")]
    pub bot_dimensions: Option<Value>,
    #[serde(rename = "missingCas", alias = "missing_cas")]
    pub missing_cas: Option<Value>,
    #[serde(rename = "missingCipd", alias = "missing_cipd")]
    pub missing_cipd: Option<Value>,
}

/// protojson's int64: a decimal string (what servers emit) or a number (also accepted).
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(0),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("int64 out of range")),
        Value::String(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an int64"))),
        other => Err(serde::de::Error::custom(format!("{other} is not an int64"))),
    }
}

impl TaskResult {
    /// Parses a result object.
    pub(crate) fn from_value(v: &Value) -> Result<Self, Failure> {
        serde_json::from_value(v.clone()).map_err(|e| Failure::Decode(format!("task result: {e}")))
    }
    /// Its state.
    pub(crate) fn task_state(&self) -> TaskState {
        TaskState::parse(&self.state)
    }
}

/// A field of a reply object under its JSON name or its proto name.
pub(crate) fn get<'a>(v: &'a Value, json_name: &str, proto_name: &str) -> Option<&'a Value> {
    v.get(json_name).or_else(|| v.get(proto_name))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bodies_lose_the_xssi_prefix_and_parse_both_name_forms() {
        let v = parse_body(b")]}'\n{\"taskId\":\"a0\",\"exitCode\":\"-1\",\"state\":\"BOT_DIED\"}")
            .expect("parses");
        let r = TaskResult::from_value(&v).expect("result");
        assert_eq!((r.task_id.as_str(), r.exit_code), ("a0", -1));
        assert_eq!(r.task_state(), TaskState::BotDied);
        let r = TaskResult::from_value(&json!({"task_id": "b0", "exit_code": 3, "state": 112}))
            .expect("proto names, numbers");
        assert_eq!((r.task_id.as_str(), r.exit_code), ("b0", 3));
        assert_eq!(r.task_state(), TaskState::Completed);
        assert!(parse_body(b")]}'\nnot json").is_err());
        assert!(TaskResult::from_value(&json!({"exitCode": "x"})).is_err());
    }

    #[test]
    fn unknown_and_missing_states_are_unknown() {
        assert_eq!(TaskState::parse(&json!("INVALID")), TaskState::Unknown);
        assert_eq!(
            TaskState::parse(&json!("SOMETHING_NEW")),
            TaskState::Unknown
        );
        assert_eq!(TaskState::parse(&Value::Null), TaskState::Unknown);
        assert_eq!(TaskState::parse(&json!(0x100)), TaskState::NoResource);
    }
}
