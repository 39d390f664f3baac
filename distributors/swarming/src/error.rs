//! Swarming pRPC failures and the one table that classifies them as transient or permanent.
//!
//! | failure | class | why |
//! |---|---|---|
//! | connection refused / reset, DNS | transient | server restarting, network blip |
//! | request timed out | transient | server busy |
//! | reply body cut off | transient | the connection died mid-reply |
//! | other transport error (bad URL, redirect loop) | permanent | retrying sends the same request |
//! | code 0 reply that does not parse | permanent | not a Swarming server, or an API change |
//! | `NOT_FOUND` (5) | not found | `status` → Missing, `cancel` → Ok |
//! | `UNKNOWN` (2), `INTERNAL` (13), `UNAVAILABLE` (14) | transient | LUCI's `grpcutil.IsTransientCode` |
//! | `DEADLINE_EXCEEDED` (4) | transient | LUCI's client retries it too |
//! | `CANCELLED` (1) | transient | the call was cut short (a proxy or server shutdown), not refused |
//! | `RESOURCE_EXHAUSTED` (8) | transient | quota or rate limit: backing off is the cure (Buildbucket treats it as fatal; we retry, with the engine's backoff) |
//! | `ABORTED` (10) | transient | a datastore transaction conflict |
//! | `UNAUTHENTICATED` (16) | transient | the token expired; it is re-read (file) or re-run (command) before the next call |
//! | `INVALID_ARGUMENT` (3), `FAILED_PRECONDITION` (9), `OUT_OF_RANGE` (11) | permanent | the request is wrong |
//! | `PERMISSION_DENIED` (7) | permanent | the caller may not use this pool or realm |
//! | `ALREADY_EXISTS` (6), `UNIMPLEMENTED` (12), `DATA_LOSS` (15), other codes | permanent | retrying cannot help |
//! | no `X-Prpc-Grpc-Code` header: HTTP 408, 429, 5xx | transient | a proxy or load balancer in front of the server |
//! | no `X-Prpc-Grpc-Code` header: other HTTP status | permanent | not a pRPC endpoint (wrong URL) |
//!
//! With the header present the HTTP status is ignored, as pRPC clients do.

use std::fmt;

use distributor_core::Error;

/// What went wrong at the transport level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransportKind {
    /// Could not connect.
    Connect,
    /// No answer in time.
    Timeout,
    /// The reply body could not be read.
    Body,
    /// Anything else.
    Other,
}

impl TransportKind {
    pub(crate) fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::Connect
        } else if e.is_body() || e.is_decode() || e.is_request() {
            Self::Body
        } else {
            Self::Other
        }
    }
}

/// A gRPC status code as pRPC reports it in `X-Prpc-Grpc-Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrpcCode(pub u16);

impl GrpcCode {
    pub(crate) const UNAUTHENTICATED: Self = Self(16);

    fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            1 => "CANCELLED",
            2 => "UNKNOWN",
            3 => "INVALID_ARGUMENT",
            4 => "DEADLINE_EXCEEDED",
            5 => "NOT_FOUND",
            6 => "ALREADY_EXISTS",
            7 => "PERMISSION_DENIED",
            8 => "RESOURCE_EXHAUSTED",
            9 => "FAILED_PRECONDITION",
            10 => "ABORTED",
            11 => "OUT_OF_RANGE",
            12 => "UNIMPLEMENTED",
            13 => "INTERNAL",
            14 => "UNAVAILABLE",
            15 => "DATA_LOSS",
            16 => "UNAUTHENTICATED",
            _ => "code",
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Why a call to Swarming failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The request did not get a reply.
    #[error("swarming request failed ({kind:?}): {source}")]
    Transport {
        kind: TransportKind,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with a non-zero gRPC code.
    #[error("swarming answered {code}: {message}")]
    Rpc { code: GrpcCode, message: String },
    /// A reply without `X-Prpc-Grpc-Code` and a non-2xx HTTP status.
    #[error("not a pRPC reply: HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// A successful reply that does not parse.
    #[error("unexpected reply from swarming: {0}")]
    Decode(String),
    /// The bearer token could not be obtained.
    #[error("{0}")]
    Token(String),
}

/// How a [`Failure`] is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying may help.
    Transient,
    /// Retrying will not help.
    Permanent,
    /// The task id is unknown to the server.
    NotFound,
}

/// The class of a gRPC code (the table in the module docs).
pub(crate) fn classify_code(code: GrpcCode) -> Class {
    match code.0 {
        5 => Class::NotFound,
        1 | 2 | 4 | 8 | 10 | 13 | 14 | 16 => Class::Transient,
        _ => Class::Permanent,
    }
}

fn classify_http(status: u16) -> Class {
    match status {
        408 | 429 | 500..=599 => Class::Transient,
        _ => Class::Permanent,
    }
}

impl Failure {
    /// Classifies the failure.
    pub(crate) fn class(&self) -> Class {
        match self {
            Self::Transport { kind, .. } => match kind {
                TransportKind::Connect | TransportKind::Timeout | TransportKind::Body => {
                    Class::Transient
                }
                TransportKind::Other => Class::Permanent,
            },
            Self::Rpc { code, .. } => classify_code(*code),
            Self::Http { status, .. } => classify_http(*status),
            Self::Decode(_) | Self::Token(_) => Class::Permanent,
        }
    }

    /// Converts to the framework error, keeping `self` as the source. `what` says which call
    /// failed. Not-found becomes permanent: callers that treat it specially check
    /// [`class`](Self::class) first.
    pub(crate) fn into_error(self, what: &str) -> Error {
        let message = format!("{what}: {self}");
        match self.class() {
            Class::Transient => Error::transient_from(message, self),
            Class::Permanent | Class::NotFound => Error::permanent_from(message, self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: u16) -> Failure {
        Failure::Rpc {
            code: GrpcCode(code),
            message: "m".into(),
        }
    }

    async fn transport_error(url: &str) -> reqwest::Error {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(200))
            .build()
            .expect("client");
        client.get(url).send().await.expect_err("must fail")
    }

    #[tokio::test]
    async fn connection_refused_is_transient() {
        let e = transport_error("http://127.0.0.1:9/").await;
        let f = Failure::Transport {
            kind: TransportKind::of(&e),
            source: e,
        };
        assert_eq!(f.class(), Class::Transient);
        assert!(f.into_error("x").is_transient());
    }

    #[tokio::test]
    async fn a_bad_url_is_permanent() {
        let e = transport_error("gopher://nowhere/").await;
        let f = Failure::Transport {
            kind: TransportKind::of(&e),
            source: e,
        };
        assert_eq!(f.class(), Class::Permanent);
    }

    #[tokio::test]
    async fn timeouts_are_transient() {
        // A listener that never answers: the connection is accepted by the kernel, the
        // request times out.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", silent.local_addr().expect("addr"));
        let e = transport_error(&url).await;
        assert_eq!(TransportKind::of(&e), TransportKind::Timeout);
        let f = Failure::Transport {
            kind: TransportKind::Timeout,
            source: e,
        };
        assert_eq!(f.class(), Class::Transient);
    }

    #[test]
    fn unparseable_ok_replies_and_token_failures_are_permanent() {
        assert_eq!(Failure::Decode("x".into()).class(), Class::Permanent);
        assert_eq!(Failure::Token("x".into()).class(), Class::Permanent);
    }

    #[test]
    fn not_found_is_its_own_class_and_permanent_as_an_error() {
        assert_eq!(rpc(5).class(), Class::NotFound);
        assert!(!rpc(5).into_error("x").is_transient());
    }

    #[test]
    fn luci_transient_codes_are_transient() {
        for c in [2, 13, 14, 4] {
            assert_eq!(rpc(c).class(), Class::Transient, "code {c}");
        }
    }

    #[test]
    fn cancelled_resource_exhausted_aborted_and_unauthenticated_are_transient() {
        for c in [1, 8, 10, 16] {
            assert_eq!(rpc(c).class(), Class::Transient, "code {c}");
        }
    }

    #[test]
    fn request_errors_are_permanent() {
        for c in [3, 9, 11] {
            assert_eq!(rpc(c).class(), Class::Permanent, "code {c}");
        }
    }

    #[test]
    fn permission_denied_is_permanent() {
        assert_eq!(rpc(7).class(), Class::Permanent);
    }

    #[test]
    fn other_codes_are_permanent() {
        for c in [6, 12, 15, 99] {
            assert_eq!(rpc(c).class(), Class::Permanent, "code {c}");
        }
    }

    #[test]
    fn replies_without_a_grpc_code_follow_the_http_status() {
        let http = |status| Failure::Http {
            status,
            body: String::new(),
        };
        for s in [408, 429, 500, 502, 503] {
            assert_eq!(http(s).class(), Class::Transient, "{s}");
        }
        for s in [400, 401, 403, 404] {
            assert_eq!(http(s).class(), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn codes_display_by_name() {
        assert_eq!(GrpcCode(5).to_string(), "NOT_FOUND (5)");
        assert_eq!(rpc(14).to_string(), "swarming answered UNAVAILABLE (14): m");
    }
}
