//! The HTTP push format: what a backend POSTs to [`NotificationRoute::target`](crate::NotificationRoute::target) to notify the
//! engine about one execution, and the parser an embedder's HTTP endpoint (and the conformance
//! harness) uses to turn the body into an [`ExecutionId`] and a [`Notification`].
//!
//! # The route
//!
//! The embedder serves one endpoint (the example orchestrator: `POST /v1/notify`) and hands its
//! full URL to the engine ([`EngineBuilder::notify_target`](crate::EngineBuilder)); every
//! task's [`NotificationRoute::target`](crate::NotificationRoute::target) is that URL, the same for every execution. An adapter
//! whose backend calls back MUST POST to the target exactly as given (it is a URL, not a base to
//! append to) and MUST NOT push when the target is `None` (polling is then the only path).
//!
//! # The body
//!
//! `Content-Type: application/json`, one of two shapes.
//!
//! **Plain** ([`HttpPush`]), unknown fields refused:
//!
//! ```json
//! { "execution_id": 42,
//!   "attributes": { "auth_token": "<NotificationRoute::auth_token>" },
//!   "data": { "state": "finished", "exit_code": 0 },
//!   "sequence": 3,
//!   "message_id": "b7c1…" }
//! ```
//!
//! | field | required | meaning |
//! |---|---|---|
//! | `execution_id` | yes | [`TaskDescription::execution_id`](crate::TaskDescription), as a JSON integer: identifies the execution |
//! | `attributes` | yes, for `auth_token` | string → string; `auth_token` MUST be the task's [`NotificationRoute::auth_token`](crate::NotificationRoute::auth_token) (the engine authenticates with it and removes it); the others reach the adapter in [`Notification::attributes`] |
//! | `data` | no | any JSON; it becomes [`Notification::data`]: a JSON string gives its UTF-8 bytes as they are, `null` or absent gives empty bytes, anything else its compact JSON text (so `{"a":1}` arrives as the bytes `{"a":1}`) |
//! | `sequence` | no | the sender's update counter for this execution; a push whose sequence is not greater than the last accepted one is dropped, so late pushes never regress a state |
//! | `message_id` | no | the sender's message id; a repeated one is dropped |
//!
//! **Google Pub/Sub push** (`{"message": {...}, "subscription": "..."}`, unknown fields
//! ignored since Pub/Sub adds fields): `message.data` is base64 and becomes
//! [`Notification::data`] decoded; `message.attributes.execution_id` (a decimal string) identifies
//! the execution and is removed; `message.attributes.sequence` (a decimal string), if present,
//! is the sequence; `message.attributes.auth_token` is the token; `message.messageId` (or
//! `message_id`) is the message id.
//!
//! # The answer
//!
//! What the example orchestrator (and the conformance harness's endpoint) answers: 200
//! `{"accepted": true}`; 200 `{"accepted": false, "reason"}` for stale, duplicate and
//! post-terminal pushes (so a push service stops redelivering them); 400 for a body that does
//! not parse, naming the field by JSON Pointer ([`PushError::pointer`]); 401 without
//! `auth_token`; 403 for a forged, expired or foreign token; 404 for an unknown execution; 503
//! while the engine cannot take it (try again). A backend SHOULD retry 5xx answers and
//! connection failures with backoff and MUST NOT retry 4xx ones.
//!
//! # Example
//!
//! ```
//! use distributor_core::push::{HttpPush, parse_push};
//! use distributor_core::{AuthToken, ExecutionId};
//! use serde_json::json;
//!
//! // The backend's side: the body to POST to the task's notification target.
//! let body = HttpPush::new(ExecutionId(42), &AuthToken("tok".into()), json!({"done": true}))
//!     .with_sequence(1)
//!     .to_body();
//!
//! // The endpoint's side.
//! let (id, n) = parse_push(&body).unwrap();
//! assert_eq!(id, ExecutionId(42));
//! assert_eq!(n.data, br#"{"done":true}"#);
//! assert_eq!(n.attributes["auth_token"], "tok");
//! assert_eq!(n.sequence, Some(1));
//!
//! let err = parse_push(br#"{"execution_id": "42"}"#).unwrap_err();
//! assert_eq!(err.pointer, "/execution_id");
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{AuthToken, ExecutionId, Notification};

/// The attribute carrying the per-execution token.
pub const AUTH_TOKEN_ATTRIBUTE: &str = "auth_token";

/// A plain JSON push body (see the [module docs](self) for every field's meaning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPush {
    /// The execution the push is about.
    pub execution_id: u64,
    /// Any JSON; becomes [`Notification::data`] (a string as its bytes, `null` as empty, else
    /// compact JSON text).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// String attributes; MUST hold `auth_token`.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The sender's update sequence for this execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The sender's message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl HttpPush {
    /// A push about `execution` carrying `auth_token` and `data`.
    pub fn new(execution: ExecutionId, auth_token: &AuthToken, data: Value) -> Self {
        Self {
            execution_id: execution.0,
            data,
            attributes: BTreeMap::from([(AUTH_TOKEN_ATTRIBUTE.to_owned(), auth_token.0.clone())]),
            sequence: None,
            message_id: None,
        }
    }

    /// The same push with `sequence` set.
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// The same push with `message_id` set.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// The same push with one more attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// The JSON body to POST.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A push body that does not parse, with the JSON Pointer of the field at fault (`""` for the
/// whole body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid push body at `{pointer}`: {message}")]
pub struct PushError {
    /// The field at fault.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl PushError {
    fn at(pointer: &str, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct PubSubPush {
    message: PubSubMessage,
    #[serde(default)]
    #[allow(dead_code)]
    subscription: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PubSubMessage {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default, alias = "message_id", rename = "messageId")]
    message_id: Option<String>,
}

/// Parses a push body in either shape (see the [module docs](self)), telling them apart by a
/// top-level `message` or `subscription` member. Authentication is not done here: the
/// `auth_token` attribute is left in [`Notification::attributes`] for
/// [`Engine::notify`](crate::Engine::notify), which checks and removes it.
///
/// Numbers in attributes (`execution_id`, `sequence`) have one spelling: digits, no sign, no
/// leading zeros, so that one push has one form.
///
/// Errors: [`PushError`] naming the field at fault (`""` for a body that is not a JSON object,
/// `/execution_id`, `/message`, `/message/data`, `/message/attributes/execution_id`,
/// `/message/attributes/sequence`, …).
pub fn parse_push(body: &[u8]) -> Result<(ExecutionId, Notification), PushError> {
    parse_push_as(body, false)
}

/// Like [`parse_push`], for a body known to come from Pub/Sub (its `User-Agent`, say): it MUST
/// be in Pub/Sub's envelope, and a body without `message` is refused as such.
pub fn parse_pubsub_push(body: &[u8]) -> Result<(ExecutionId, Notification), PushError> {
    parse_push_as(body, true)
}

fn parse_push_as(body: &[u8], pubsub: bool) -> Result<(ExecutionId, Notification), PushError> {
    let doc: Value = parse(body)?;
    if !doc.is_object() {
        return Err(PushError::at(
            "",
            "a push is a JSON object: Pub/Sub's {\"message\": {...}, \"subscription\"} or \
             {\"execution_id\", \"data\", \"attributes\", \"sequence\"}",
        ));
    }
    if pubsub || doc.get("message").is_some() || doc.get("subscription").is_some() {
        if doc.get("message").is_none() {
            return Err(PushError::at(
                "/message",
                "a Pub/Sub push needs `message` (an object with `data` and `attributes`)",
            ));
        }
        let push: PubSubPush = parse(body)?;
        let m = push.message;
        let data = match &m.data {
            None => Vec::new(),
            Some(d) => base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|e| PushError::at("/message/data", format!("not base64: {e}")))?,
        };
        let raw_id = m.attributes.get("execution_id").ok_or_else(|| {
            PushError::at(
                "/message/attributes/execution_id",
                "missing attribute `execution_id`",
            )
        })?;
        let id = parse_canonical_u64(raw_id)
            .map(ExecutionId)
            .ok_or_else(|| {
                PushError::at(
                    "/message/attributes/execution_id",
                    format!("`{raw_id}` is not an execution id (digits, no leading zeros)"),
                )
            })?;
        let sequence = match m.attributes.get("sequence") {
            None => None,
            Some(s) => Some(parse_canonical_u64(s).ok_or_else(|| {
                PushError::at(
                    "/message/attributes/sequence",
                    format!("`{s}` is not a sequence number (digits, no leading zeros)"),
                )
            })?),
        };
        let mut attributes = m.attributes;
        attributes.remove("execution_id");
        Ok((
            id,
            Notification {
                data,
                attributes,
                message_id: m.message_id,
                sequence,
            },
        ))
    } else {
        let p: HttpPush = parse(body)?;
        let data = match p.data {
            Value::Null => Vec::new(),
            Value::String(s) => s.into_bytes(),
            other => serde_json::to_vec(&other).unwrap_or_default(),
        };
        Ok((
            ExecutionId(p.execution_id),
            Notification {
                data,
                attributes: p.attributes,
                message_id: p.message_id,
                sequence: p.sequence,
            },
        ))
    }
}

/// Digits only, no sign, no leading zeros (`0` itself is fine): one spelling per number.
fn parse_canonical_u64(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// Deserializes a JSON body, naming the field at fault by JSON Pointer.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, PushError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PushError::at("", "expected a JSON body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let result = T::deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track));
    result.map_err(|inner| {
        let path = track.path();
        let mut pointer = String::new();
        for seg in path.iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    pointer.push('/');
                    pointer.push_str(&escape(key));
                }
                Segment::Unknown => {}
            }
        }
        let message = inner.to_string();
        if let Some(field) = missing_field(&message) {
            pointer.push('/');
            pointer.push_str(&escape(field));
        }
        PushError::at(&pointer, message)
    })
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The field a serde "missing field `x`" message names (the error's path stops at its parent).
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn pubsub_push_decodes_data_id_and_sequence() {
        let body = json!({
            "message": {
                "data": base64::engine::general_purpose::STANDARD.encode(b"{\"x\":1}"),
                "attributes": {"execution_id": "7", "auth_token": "t", "sequence": "3"},
                "messageId": "m1", "publishTime": "2024-01-01T00:00:00Z"
            },
            "subscription": "projects/p/subscriptions/s"
        });
        let (id, n) = parse_push(body.to_string().as_bytes()).unwrap();
        assert_eq!(id, ExecutionId(7));
        assert_eq!(n.data, b"{\"x\":1}");
        assert_eq!(n.sequence, Some(3));
        assert_eq!(n.message_id.as_deref(), Some("m1"));
        assert_eq!(n.attributes["auth_token"], "t");
        assert!(!n.attributes.contains_key("execution_id"));
    }

    #[test]
    fn plain_push_data_forms() {
        let (id, n) =
            parse_push(br#"{"execution_id": 4, "data": {"a": 1}, "sequence": 2}"#).unwrap();
        assert_eq!((id, n.sequence), (ExecutionId(4), Some(2)));
        assert_eq!(n.data, br#"{"a":1}"#);
        let (_, n) = parse_push(br#"{"execution_id": 4, "data": "raw text"}"#).unwrap();
        assert_eq!(n.data, b"raw text");
        let (_, n) = parse_push(br#"{"execution_id": 4}"#).unwrap();
        assert!(n.data.is_empty() && n.attributes.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let at = |body: &[u8]| parse_push(body).unwrap_err().pointer;
        assert_eq!(at(br#"{"execution_id": "x"}"#), "/execution_id");
        assert_eq!(at(br#"{"data": 1}"#), "/execution_id");
        assert_eq!(at(br#"{"execution_id": 1, "sequense": 2}"#), "/sequense");
        assert_eq!(
            at(br#"{"execution_id": 1, "attributes": {"a": 1}}"#),
            "/attributes/a"
        );
        assert_eq!(
            at(br#"{"message": {"attributes": {}}}"#),
            "/message/attributes/execution_id"
        );
        assert_eq!(
            at(br#"{"message": {"data": "%%", "attributes": {"execution_id": "1"}}}"#),
            "/message/data"
        );
        assert_eq!(at(b"  "), "");
        assert_eq!(at(b"{"), "");
    }

    #[test]
    fn the_builder_round_trips() {
        let p = HttpPush::new(ExecutionId(9), &AuthToken("a".into()), json!([1]))
            .with_sequence(5)
            .with_message_id("m")
            .with_attribute("k", "v");
        let (id, n) = parse_push(&p.to_body()).unwrap();
        assert_eq!(id, ExecutionId(9));
        assert_eq!(n.data, b"[1]");
        assert_eq!(n.sequence, Some(5));
        assert_eq!(n.message_id.as_deref(), Some("m"));
        assert_eq!(n.attributes["k"], "v");
        assert_eq!(n.attributes[AUTH_TOKEN_ATTRIBUTE], "a");
    }
}
