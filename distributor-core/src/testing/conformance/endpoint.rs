//! The harness's HTTP notification endpoint: what an embedder serves at its notification target
//! (the example orchestrator's `POST /v1/notify`), on a loopback port of its own for each
//! trial. It parses bodies with [`crate::push::parse_push`] and answers as the
//! [push format](crate::push) specifies; what it receives goes to the trial.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::push::{AUTH_TOKEN_ATTRIBUTE, parse_push};
use crate::types::{ExecutionId, Notification};

/// The path the endpoint serves; the target handed to tasks is the full URL.
pub(super) const PATH: &str = "/conformance/notify";

/// What reached the endpoint.
#[derive(Debug)]
pub(super) enum Received {
    /// A push that parsed and carried an `auth_token` attribute.
    Push(ExecutionId, Notification),
    /// A request the endpoint refused, described (status and why).
    Refused(String),
}

/// A running endpoint; stops when dropped.
#[derive(Debug)]
pub(super) struct Endpoint {
    url: String,
    server: JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Endpoint {
    /// Binds `127.0.0.1:0` and serves on the current runtime, sending what arrives to `tx`.
    pub(super) async fn start(tx: UnboundedSender<Received>) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot bind the HTTP notification endpoint: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("the HTTP notification endpoint has no address: {e}"))?;
        let refused = tx.clone();
        let app = Router::new()
            .route(PATH, post(notify))
            .fallback(move |req: axum::extract::Request| {
                let refused = refused.clone();
                async move {
                    let what = format!(
                        "404: {} {} (pushes go to the notification target exactly as given, \
                         {PATH})",
                        req.method(),
                        req.uri()
                    );
                    let _ = refused.send(Received::Refused(what.clone()));
                    (StatusCode::NOT_FOUND, axum::Json(json!({"error": what})))
                }
            })
            .with_state(tx);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}{PATH}"),
            server,
        })
    }

    /// The notification target to hand to tasks.
    pub(super) fn url(&self) -> &str {
        &self.url
    }
}

async fn notify(State(tx): State<UnboundedSender<Received>>, body: Bytes) -> Response {
    let refuse = |status: StatusCode, pointer: &str, message: String| {
        let _ = tx.send(Received::Refused(format!("{}: {message}", status.as_u16())));
        (
            status,
            axum::Json(json!({"error": {"field": pointer, "message": message}})),
        )
            .into_response()
    };
    let (id, n) = match parse_push(&body) {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.pointer, e.to_string()),
    };
    if !n.attributes.contains_key(AUTH_TOKEN_ATTRIBUTE) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "/attributes/auth_token",
            format!("the push for execution {id} carries no `/attributes/auth_token`"),
        );
    }
    if tx.send(Received::Push(id, n)).is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "the trial is over"})),
        )
            .into_response();
    }
    axum::Json(json!({"accepted": true})).into_response()
}
