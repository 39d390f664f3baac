//! The one table: what went wrong talking to the server → transient (try again) or permanent.
//!
//! | backend error | class |
//! |---|---|
//! | connection refused/reset, DNS failure | transient |
//! | request timed out | transient |
//! | HTTP 5xx, 429 Too Many Requests, 408 Request Timeout | transient |
//! | other HTTP 4xx (and 3xx, 1xx not followed) | permanent |
//! | anything else (a request that cannot be built, a body that cannot be read) | permanent |

use distributor_core::Error;
use reqwest::StatusCode;

/// Classifies a transport error.
pub(crate) fn from_reqwest(e: reqwest::Error) -> Error {
    if e.is_connect() || e.is_timeout() {
        Error::transient_from(format!("cannot fetch: {e}"), e)
    } else {
        Error::permanent_from(format!("cannot fetch: {e}"), e)
    }
}

/// Classifies an unexpected HTTP status.
pub(crate) fn from_status(status: StatusCode) -> Error {
    let msg = format!("HTTP {status}");
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Error::transient(msg)
    } else {
        Error::permanent(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_and_throttling_are_transient() {
        for s in [500, 502, 503, 429, 408] {
            let code = StatusCode::from_u16(s).unwrap();
            assert!(from_status(code).is_transient(), "{s}");
        }
    }

    #[test]
    fn client_errors_are_permanent() {
        for s in [400, 401, 403, 404, 410, 301, 101] {
            let code = StatusCode::from_u16(s).unwrap();
            assert!(!from_status(code).is_transient(), "{s}");
        }
    }

    #[tokio::test]
    async fn connection_refused_is_transient() {
        // Bind and drop a listener: its port refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(from_reqwest(e).is_transient());
    }

    #[tokio::test]
    async fn a_timeout_is_transient() {
        // A server that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(50))
            .build()
            .unwrap();
        let e = client.get(url).send().await.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(from_reqwest(e).is_transient());
        drop(listener);
    }

    #[tokio::test]
    async fn a_request_that_cannot_be_built_is_permanent() {
        let e = reqwest::Client::new()
            .get("http://[::1")
            .send()
            .await
            .unwrap_err();
        assert!(!from_reqwest(e).is_transient());
    }
}
