//! slurmrestd failures and the one table that classifies them as transient or permanent.
//!
//! | failure | class | why |
//! |---|---|---|
//! | connection refused / reset, DNS | transient | slurmrestd restarting or not up yet |
//! | request timed out | transient | slurmrestd or slurmctld busy |
//! | reply body cut off | transient | slurmrestd died mid-reply |
//! | other transport error (bad URL, redirect loop) | permanent | retrying sends the same request |
//! | 2xx reply that does not parse | permanent | wrong `api_version` or not slurmrestd |
//! | Slurm error 2017 (invalid job id) | unknown job | `status` → Missing, `cancel` → Ok |
//! | Slurm error 2021 (job already done) | already done | `cancel` → Ok |
//! | Slurm error -1 (unspecified) | transient | what 22.05 answers when slurmctld is down |
//! | Slurm error 11 (EAGAIN) | transient | slurmctld throttling RPCs |
//! | Slurm errors 1000–1004, 1800–1899 (communication) | transient | slurmctld unreachable |
//! | Slurm errors 5000–5099 (socket) | transient | slurmctld timed out |
//! | Slurm errors 2016 (nodes busy), 2027 (standby mode) | transient | the cluster will recover |
//! | any other Slurm error 2000–2999 (ESLURM_*) | permanent | slurmctld refused this request |
//! | Slurm errors 9000–9999 (REST parsing) | permanent | the request is malformed |
//! | HTTP 401 (no Slurm number) | transient | token expired or being rotated; re-read next call |
//! | HTTP 408, 429, 5xx (no Slurm number) | transient | overload or outage |
//! | any other HTTP status | permanent | the request is wrong (400, 403, 404 wrong version…) |
//!
//! Slurm numbers are read first (slurmrestd 22.05 answers HTTP 500 for every Slurm error,
//! including an invalid partition); the HTTP status decides only when no number is known.

use std::fmt;

use distributor_core::Error;

/// One entry of a slurmrestd reply's `errors` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlurmError {
    /// The Slurm error number (`slurm_errno.h`), when given.
    pub number: Option<i64>,
    /// Slurm's text and description.
    pub message: String,
}

impl fmt::Display for SlurmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number {
            Some(n) => write!(f, "slurm error {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What went wrong at the transport level (read off `reqwest::Error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransportKind {
    /// Could not connect.
    Connect,
    /// No answer in time.
    Timeout,
    /// The reply body could not be read.
    Body,
    /// Anything else (builder, redirect…).
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

/// Why a call to slurmrestd failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The request did not get a reply.
    #[error("slurmrestd request failed ({kind:?}): {source}")]
    Transport {
        kind: TransportKind,
        #[source]
        source: reqwest::Error,
    },
    /// slurmrestd replied with an error status or an `errors` list.
    #[error("slurmrestd answered HTTP {status}: {}", describe(.errors, .body))]
    Rest {
        status: u16,
        errors: Vec<SlurmError>,
        /// The start of a body that was not a JSON error list.
        body: String,
    },
    /// A successful reply that does not parse.
    #[error("unexpected reply from slurmrestd: {0}")]
    Decode(#[source] serde_json::Error),
}

fn describe(errors: &[SlurmError], body: &str) -> String {
    if errors.is_empty() {
        return if body.is_empty() {
            "no details".into()
        } else {
            body.to_owned()
        };
    }
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a [`Failure`] is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// Retrying may help.
    Transient,
    /// Retrying will not help.
    Permanent,
    /// slurmctld does not know the job id.
    UnknownJob,
    /// The job has already finished (cancel is a no-op).
    AlreadyDone,
}

/// The class of a Slurm error number, if the table knows it.
fn classify_number(n: i64) -> Option<Class> {
    Some(match n {
        2017 => Class::UnknownJob,
        2021 => Class::AlreadyDone,
        -1 | 11 | 1000..=1004 | 1800..=1899 | 5000..=5099 | 2016 | 2027 => Class::Transient,
        2000..=2999 | 9000..=9999 => Class::Permanent,
        _ => return None,
    })
}

/// The class of an HTTP status without a known Slurm number.
fn classify_http(status: u16) -> Class {
    match status {
        401 | 408 | 429 | 500..=599 => Class::Transient,
        _ => Class::Permanent,
    }
}

impl Failure {
    /// Classifies the failure (the table in the module docs).
    pub(crate) fn class(&self) -> Class {
        match self {
            Self::Transport { kind, .. } => match kind {
                TransportKind::Connect | TransportKind::Timeout | TransportKind::Body => {
                    Class::Transient
                }
                TransportKind::Other => Class::Permanent,
            },
            Self::Decode(_) => Class::Permanent,
            Self::Rest { status, errors, .. } => errors
                .iter()
                .filter_map(|e| e.number.and_then(classify_number))
                .next()
                .unwrap_or_else(|| classify_http(*status)),
        }
    }

    /// Converts to the framework error, keeping `self` as the source. `what` says which call
    /// failed. Unknown-job and already-done failures become permanent: callers that treat them
    /// specially check [`class`](Self::class) first.
    pub(crate) fn into_error(self, what: &str) -> Error {
        let message = format!("{what}: {self}");
        match self.class() {
            Class::Transient => Error::transient_from(message, self),
            Class::Permanent | Class::UnknownJob | Class::AlreadyDone => {
                Error::permanent_from(message, self)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rest(status: u16, numbers: &[i64]) -> Failure {
        Failure::Rest {
            status,
            errors: numbers
                .iter()
                .map(|n| SlurmError {
                    number: Some(*n),
                    message: "m".into(),
                })
                .collect(),
            body: String::new(),
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
    async fn row_connection_refused_is_transient() {
        // Port 9 on loopback (discard) is closed on CI machines.
        let e = transport_error("http://127.0.0.1:9/").await;
        assert_eq!(TransportKind::of(&e), TransportKind::Connect);
        let f = Failure::Transport {
            kind: TransportKind::of(&e),
            source: e,
        };
        assert_eq!(f.class(), Class::Transient);
        assert!(f.into_error("status").is_transient());
    }

    #[tokio::test]
    async fn row_timeout_is_transient() {
        // A listener that accepts and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let e = transport_error(&format!("http://{addr}/")).await;
        assert_eq!(TransportKind::of(&e), TransportKind::Timeout);
        let f = Failure::Transport {
            kind: TransportKind::Timeout,
            source: e,
        };
        assert_eq!(f.class(), Class::Transient);
    }

    #[tokio::test]
    async fn row_body_and_other_transport_errors() {
        let e = transport_error("http://127.0.0.1:9/").await;
        let body = Failure::Transport {
            kind: TransportKind::Body,
            source: e,
        };
        assert_eq!(body.class(), Class::Transient);
        let e = transport_error("http://127.0.0.1:9/").await;
        let other = Failure::Transport {
            kind: TransportKind::Other,
            source: e,
        };
        assert_eq!(other.class(), Class::Permanent);
        assert!(!other.into_error("run").is_transient());
    }

    #[test]
    fn row_undecodable_success_is_permanent() {
        let e = serde_json::from_str::<serde_json::Value>("Unable find").expect_err("bad json");
        assert_eq!(Failure::Decode(e).class(), Class::Permanent);
    }

    #[test]
    fn row_2017_is_unknown_job() {
        assert_eq!(rest(500, &[2017]).class(), Class::UnknownJob);
        assert!(!rest(500, &[2017]).into_error("run").is_transient());
    }

    #[test]
    fn row_2021_is_already_done() {
        assert_eq!(rest(500, &[2021]).class(), Class::AlreadyDone);
    }

    #[test]
    fn row_unspecified_minus_one_is_transient() {
        assert_eq!(rest(500, &[-1]).class(), Class::Transient);
    }

    #[test]
    fn row_eagain_is_transient() {
        assert_eq!(rest(500, &[11]).class(), Class::Transient);
    }

    #[test]
    fn row_communication_errors_are_transient() {
        for n in [1000, 1001, 1004, 1800, 1899] {
            assert_eq!(rest(500, &[n]).class(), Class::Transient, "{n}");
        }
    }

    #[test]
    fn row_socket_errors_are_transient() {
        for n in [5004, 5005] {
            assert_eq!(rest(500, &[n]).class(), Class::Transient, "{n}");
        }
    }

    #[test]
    fn row_busy_and_standby_are_transient() {
        assert_eq!(rest(500, &[2016]).class(), Class::Transient);
        assert_eq!(rest(500, &[2027]).class(), Class::Transient);
    }

    #[test]
    fn row_other_eslurm_errors_are_permanent() {
        // 2000 invalid partition (answered with HTTP 500), 2127 environment missing.
        assert_eq!(rest(500, &[2000]).class(), Class::Permanent);
        assert_eq!(rest(400, &[2127, 9001]).class(), Class::Permanent);
    }

    #[test]
    fn row_rest_parsing_errors_are_permanent() {
        assert_eq!(rest(400, &[9002]).class(), Class::Permanent);
    }

    #[test]
    fn row_401_is_transient() {
        assert_eq!(rest(401, &[]).class(), Class::Transient);
    }

    #[test]
    fn row_overload_and_5xx_are_transient() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(rest(s, &[]).class(), Class::Transient, "{s}");
        }
        // An unknown Slurm number falls back to the HTTP status.
        assert_eq!(rest(503, &[123_456]).class(), Class::Transient);
    }

    #[test]
    fn row_other_http_statuses_are_permanent() {
        for s in [400, 403, 404, 405, 413, 422] {
            assert_eq!(rest(s, &[]).class(), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn messages_name_the_call_and_the_slurm_error() {
        let f = Failure::Rest {
            status: 500,
            errors: vec![SlurmError {
                number: Some(2000),
                message: "Invalid partition name specified".into(),
            }],
            body: String::new(),
        };
        assert_eq!(
            f.into_error("submitting").to_string(),
            "submitting: slurmrestd answered HTTP 500: slurm error 2000: Invalid partition name specified"
        );
    }
}
