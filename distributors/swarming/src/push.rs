//! Pub/Sub pushes from Swarming: decoding Google's push JSON into an execution id and a
//! [`Notification`], and the optional endpoint (`push_listen`) that hands them to the engine.
//!
//! Swarming publishes `{"task_id", "userdata"}` with the single attribute `auth_token` (the
//! task's `pubsub_auth_token`). Nothing in the message names the execution except the userdata
//! this adapter wrote at `run` (`{"execution_id":"<id>","attempt":<n>,"request_id":"<id>"}`),
//! so [`decode_push`] reads it there; the engine then authenticates the push with its
//! `auth_token` before the adapter's `handle_notification` sees it.

use std::collections::BTreeMap;
use std::fmt;

use axum::body::Bytes;
use axum::http::StatusCode;
use base64::Engine as _;
use distributor_core::{ExecutionId, Notification, Notifier};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What this adapter puts in `pubsub_userdata` (compact JSON, well under Swarming's 1024 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Userdata {
    /// The execution, as a decimal string.
    pub execution_id: String,
    /// Its attempt.
    pub attempt: u32,
    /// Its request id.
    pub request_id: String,
}

/// A push body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pointer}: {message}")]
pub struct PushError {
    /// JSON Pointer of the offending field in the push body (`/message/data`).
    pub pointer: String,
    /// What is wrong with it.
    pub message: String,
}

fn bad(pointer: &str, message: impl fmt::Display) -> PushError {
    PushError {
        pointer: pointer.to_owned(),
        message: message.to_string(),
    }
}

/// Decodes a Google Pub/Sub push body (`{"message": {"attributes", "data", "messageId"},
/// "subscription"}`) carrying a Swarming task update into the execution it concerns and the
/// notification to hand to the engine (`Engine::notify`), which authenticates its `auth_token`
/// attribute. The notification's data is the decoded message data; its message id is Pub/Sub's
/// (the engine drops repeats); it has no sequence (Swarming's pushes carry no state and no
/// order: each one is a poke).
///
/// Errors name the field by JSON Pointer: a body that is not the push JSON, data that is not
/// base64 JSON, userdata that this adapter did not write.
pub fn decode_push(body: &[u8]) -> Result<(ExecutionId, Notification), PushError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| bad("", e))?;
    let message = doc
        .get("message")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("/message", "missing: not a Pub/Sub push"))?;
    let data_b64 = message
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("/message/data", "missing or not a string"))?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(data_b64)
        .map_err(|e| bad("/message/data", format!("not base64: {e}")))?;
    let inner: Value = serde_json::from_slice(&data)
        .map_err(|e| bad("/message/data", format!("not JSON: {e}")))?;
    let userdata = inner
        .get("userdata")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                "/message/data",
                "no `userdata` string: not a Swarming task update",
            )
        })?;
    let ud: Userdata = serde_json::from_str(userdata).map_err(|e| {
        bad(
            "/message/data",
            format!("`userdata` is not this adapter's: {e}"),
        )
    })?;
    let id = ud.execution_id.parse().map(ExecutionId).map_err(|_| {
        bad(
            "/message/data",
            format!("`userdata.execution_id` {:?} is not an id", ud.execution_id),
        )
    })?;
    let mut attributes = BTreeMap::new();
    if let Some(attrs) = message.get("attributes") {
        let attrs = attrs
            .as_object()
            .ok_or_else(|| bad("/message/attributes", "not an object"))?;
        for (k, v) in attrs {
            let v = v.as_str().ok_or_else(|| {
                bad(
                    &format!(
                        "/message/attributes/{}",
                        k.replace('~', "~0").replace('/', "~1")
                    ),
                    "not a string",
                )
            })?;
            attributes.insert(k.clone(), v.to_owned());
        }
    }
    let message_id = message
        .get("messageId")
        .or_else(|| message.get("message_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok((
        id,
        Notification {
            data,
            attributes,
            message_id,
            sequence: None,
        },
    ))
}

/// Serves the push endpoint on `listener` until the returned task is aborted: `POST` on any
/// path. Answers 204 once the push is handed to the engine (Pub/Sub acks it; a forged token is
/// then dropped by the engine, as DM's receiver acks and drops them), 400 with the JSON Pointer
/// for a body that does not decode, 503 when no engine listens (Pub/Sub redelivers later).
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    notifier: Notifier,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().fallback(axum::routing::post(move |body: Bytes| {
        let notifier = notifier.clone();
        async move {
            match decode_push(&body) {
                Ok((id, n)) => {
                    if notifier.send(id, n) {
                        (StatusCode::NO_CONTENT, String::new())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no engine is listening\n".to_owned(),
                        )
                    }
                }
                Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
    }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "swarming push endpoint stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn push(data: &Value, attributes: Value) -> Vec<u8> {
        let data = serde_json::to_string_pretty(data).expect("json");
        serde_json::to_vec(&json!({
            "message": {
                "attributes": attributes,
                "data": base64::engine::general_purpose::STANDARD.encode(data),
                "messageId": "m-1", "publishTime": "2026-01-01T00:00:00Z"
            },
            "subscription": "projects/p/subscriptions/s"
        }))
        .expect("json")
    }

    #[test]
    fn a_swarming_push_names_its_execution_through_userdata() {
        let ud = r#"{"execution_id":"42","attempt":2,"request_id":"r"}"#;
        let body = push(
            &json!({"task_id": "abc0", "userdata": ud}),
            json!({"auth_token": "t"}),
        );
        let (id, n) = decode_push(&body).expect("decodes");
        assert_eq!(id, ExecutionId(42));
        assert_eq!(
            n.attributes.get("auth_token").map(String::as_str),
            Some("t")
        );
        assert_eq!(n.message_id.as_deref(), Some("m-1"));
        assert_eq!(n.sequence, None);
        assert_eq!(n.data_json().expect("json")["task_id"], "abc0");
    }

    #[test]
    fn garbage_is_refused_with_the_field() {
        let p = |b: &[u8]| decode_push(b).expect_err("refused").pointer;
        assert_eq!(p(b"not json"), "");
        assert_eq!(p(br#"{"execution_id": 1}"#), "/message");
        assert_eq!(p(br#"{"message": {"data": "!!"}}"#), "/message/data");
        let foreign = push(&json!({"task_id": "a0", "userdata": "hello"}), json!({}));
        assert_eq!(p(&foreign), "/message/data");
        let bad_attr = serde_json::to_vec(&json!({"message": {
            "data": base64::engine::general_purpose::STANDARD.encode(
                r#"{"task_id":"a0","userdata":"{\"execution_id\":\"1\",\"attempt\":1,\"request_id\":\"r\"}"}"#),
            "attributes": {"a/b": 1}}}))
        .expect("json");
        assert_eq!(p(&bad_attr), "/message/attributes/a~1b");
    }
}
