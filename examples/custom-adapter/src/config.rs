//! The `http-get` kind's config and payload (serde + schemars: the JSON Schemas the registry
//! validates with are derived from these types, doc comments included).

use std::collections::BTreeMap;

use distributor_core::{Secret, ValidationError, Violation};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Config of an `http-get` distributor instance. `{}` is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpGetConfig {
    /// A bearer token sent as `Authorization: Bearer …` with every GET: a [`Secret`]
    /// (`{"env": NAME}`, `{"file": PATH}`, or the token itself for tests). Read when the
    /// instance is built; never stored in execution snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<Secret>,
    /// Milliseconds one request may take, connecting included (default 30000).
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1))]
    pub timeout_ms: u64,
    /// Extra tries after a transient failure (connection refused, timeout, 5xx, 429), before
    /// the execution ends `failed` (default 2).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Milliseconds before the first extra try; doubles each time (default 200).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Bytes of the response body kept in the result (default 4096).
    #[serde(default = "default_keep_bytes")]
    pub keep_bytes: usize,
}

impl Default for HttpGetConfig {
    fn default() -> Self {
        Self {
            auth: None,
            timeout_ms: default_timeout_ms(),
            retries: default_retries(),
            backoff_ms: default_backoff_ms(),
            keep_bytes: default_keep_bytes(),
        }
    }
}

fn default_timeout_ms() -> u64 {
    30_000
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_keep_bytes() -> usize {
    4096
}

/// What one `http-get` task fetches.
///
/// ```json
/// {"url": "http://127.0.0.1:8000/health", "headers": {"accept": "application/json"}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpGetPayload {
    /// The `http://` URL to GET.
    pub url: String,
    /// Request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The status that counts as success; any 2xx when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: Option<u16>,
}

impl HttpGetPayload {
    /// The parsed URL, or the violation at `/url` (not a URL, or not `http`).
    pub(crate) fn parsed_url(&self) -> Result<url::Url, ValidationError> {
        let bad = |message: String| ValidationError {
            subject: "payload for kind `http-get`".into(),
            violations: vec![Violation {
                pointer: "/url".into(),
                expected: "an http:// URL".into(),
                message,
                suggestion: None,
            }],
        };
        let url = url::Url::parse(&self.url).map_err(|e| bad(format!("not a URL: {e}")))?;
        if url.scheme() != "http" {
            return Err(bad(format!(
                "scheme `{}` is not supported; use http",
                url.scheme()
            )));
        }
        Ok(url)
    }
}
