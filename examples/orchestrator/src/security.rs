//! What stands in front of every route of `orchestrator serve`: the `Host` and `Origin` checks,
//! the JSON content type, bearer-token authentication with scopes, the request body's size and
//! time limits, and JSON error bodies for every refusal.
//!
//! [`secure`] wraps a whole [`Router`]: every route merged into it before the call (the API's
//! own, and any an embedder or another module adds) goes through [`Guard`], and so does the
//! fallback. The checks, in order:
//!
//! 1. **Host.** The `Host` header's name (without port) MUST be one of the allowed names
//!    (default: `localhost`, `127.0.0.1`, `::1` and the listen address), else 403
//!    `forbidden_host`. This defeats DNS rebinding: a page on `evil.example` that resolves its
//!    name to 127.0.0.1 still sends `Host: evil.example`.
//! 2. **Origin.** A request with an `Origin` header MUST come from the server's own origin
//!    (`http://<Host>`) or a configured `allowed_origins` entry, else 403 `cross_origin`
//!    (`Origin: null` is refused). An unsafe method (`POST`, `PUT`, `PATCH`, `DELETE`) marked
//!    `Sec-Fetch-Site: cross-site` is refused the same way.
//! 3. **Content type.** An unsafe request with a body MUST say `Content-Type: application/json`
//!    (or `…+json`), else 415 `unsupported_media_type`; only `POST /login` takes a form. So a
//!    browser cannot send a "simple" cross-site request (`text/plain`, no preflight) to the API.
//! 4. **Authentication.** Every path except `/v1/notify` (authenticated by its per-execution
//!    tokens), `/login` and the configured public paths (default `/healthz`, `/metrics`,
//!    `/v1/openapi.json`) needs an API token: `Authorization: Bearer <token>`, or the
//!    `distributor_token` cookie a browser gets from the login form. No or an unknown token:
//!    401 `unauthorized` with `WWW-Authenticate: Bearer` (a browser asking for HTML is sent to
//!    `/login` instead); a token without the route's scope: 403 `forbidden`.
//! 5. **Body.** At most `body_limit` bytes (413 `payload_too_large`, naming the limit), read
//!    within `body_timeout` (408 `request_timeout`).
//!
//! Scopes ([`Scope`]): `GET`/`HEAD` need `read`; `POST /v1/<collection>` (a submission, such as
//! `POST /v1/executions`) and `POST …/poke` need `submit`; `POST …/cancel` needs `cancel`;
//! anything else needs `admin`. `admin` includes every scope.
//!
//! Browser pages: `GET /login` shows a form; posting a token there sets the `distributor_token`
//! cookie (`HttpOnly`, `SameSite=Lax`, path `/`) and redirects to `next`. A link carrying
//! `?token=<token>` does the same exchange for any page: the answer sets the cookie and
//! redirects to the same URL without the token. Any HTML page under `/` is therefore reachable
//! by a person holding a token, with no code in the page's handler.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::{ErrorBody, ErrorResponse};

/// The cookie a browser keeps its API token in.
pub const COOKIE: &str = "distributor_token";

/// Paths that need no API token unless configured otherwise.
pub const DEFAULT_PUBLIC: [&str; 3] = ["/healthz", "/metrics", "/v1/openapi.json"];

/// Default largest request body: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What an API token may do. `Admin` includes the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read executions, kinds, pages.
    Read,
    /// Submit work (and poke it).
    Submit,
    /// Cancel work.
    Cancel,
    /// Everything, including routes that change the server's own configuration.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Submit, Scope::Cancel, Scope::Admin];

    /// Its name in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Submit => "submit",
            Self::Cancel => "cancel",
            Self::Admin => "admin",
        }
    }

    /// The scope a request needs (see the module docs).
    pub fn required(method: &Method, path: &str) -> Scope {
        if matches!(*method, Method::GET | Method::HEAD) {
            return Scope::Read;
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segs.as_slice()) {
            (&Method::POST, [.., "cancel"]) => Scope::Cancel,
            (&Method::POST, [.., "poke"]) => Scope::Submit,
            (&Method::POST, ["v1", collection]) if *collection != "notify" => Scope::Submit,
            _ => Scope::Admin,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`; expected read, submit, cancel, admin"))
    }
}

/// The API tokens a server accepts, each with its scopes. Tokens are kept as SHA-256 digests.
#[derive(Clone, Default)]
pub struct ApiTokens {
    by_digest: HashMap<[u8; 32], (String, BTreeSet<Scope>)>,
}

impl fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.by_digest.values().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ApiTokens").field("names", &names).finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ApiTokens {
    /// No tokens: every authenticated route answers 401.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `token` (named `name` in logs) with `scopes`.
    pub fn with(
        mut self,
        name: &str,
        token: &str,
        scopes: impl IntoIterator<Item = Scope>,
    ) -> Self {
        self.insert(name, token, scopes);
        self
    }

    /// Adds `token` (named `name` in logs) with `scopes`; a repeated token gets the union.
    pub fn insert(&mut self, name: &str, token: &str, scopes: impl IntoIterator<Item = Scope>) {
        let e = self
            .by_digest
            .entry(digest(token))
            .or_insert_with(|| (name.to_owned(), BTreeSet::new()));
        e.1.extend(scopes);
    }

    /// How many tokens.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The name and scopes of `token`, if it is one of ours.
    fn lookup(&self, token: &str) -> Option<&(String, BTreeSet<Scope>)> {
        self.by_digest.get(&digest(token))
    }
}

/// A fresh random API token (`dst_` and 64 hex digits).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("dst_{}", hex::encode(bytes))
}

/// Why a token or state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read, written or created.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable or writable by other users.
    #[error(
        "{} is accessible to other users (mode {mode:o}); it holds secrets: run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds no token.
    #[error("{}: no token in the file", .path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a file that group or others can read or write.
///
/// Errors: [`FileError::TooOpen`]; [`FileError::Io`] when it cannot be inspected.
pub fn check_private(path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700. An existing directory is left as it is.
///
/// Errors: [`FileError::Io`].
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Creates `path` empty with mode 0600 if it does not exist (its directory 0700); refuses an
/// existing one that others can access.
///
/// Errors: [`FileError::TooOpen`], [`FileError::Io`].
pub fn ensure_private_file(path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_private(path),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads the token in `path` (its first non-empty, non-`#` line), refusing a file others can
/// read.
///
/// Errors: [`FileError`].
pub fn read_token_file(path: &Path) -> Result<String, FileError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| FileError::Empty {
            path: path.to_owned(),
        })
}

/// The token in `path`, generating one (mode 0600, directory 0700) if the file does not exist.
/// Returns the token and whether it was generated now.
///
/// Errors: [`FileError`].
pub fn load_or_generate_token(path: &Path) -> Result<(String, bool), FileError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.exists() {
        return read_token_file(path).map(|t| (t, false));
    }
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let token = generate_token();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    writeln!(f, "{token}").map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok((token, true))
}

/// Which `Host` names are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// Any name (`allowed_hosts = ["*"]`): only for a server behind a proxy that checks it.
    Any,
    /// These names, lowercase, without port (IPv6 without brackets).
    Names(BTreeSet<String>),
}

impl HostPolicy {
    /// `localhost`, `127.0.0.1`, `::1`, plus `extra`.
    pub fn loopback_and<'a>(extra: impl IntoIterator<Item = &'a str>) -> Self {
        let mut names: BTreeSet<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        for e in extra {
            if e == "*" {
                return Self::Any;
            }
            names.insert(host_name(e).to_ascii_lowercase());
        }
        Self::Names(names)
    }

    fn allows(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Names(n) => n.contains(&host_name(host).to_ascii_lowercase()),
        }
    }
}

/// The name part of a `Host` value: `[::1]:8080` → `::1`, `a.b:80` → `a.b`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Everything the guard checks; see the module docs.
#[derive(Debug, Clone)]
pub struct Security {
    /// Allowed `Host` names.
    pub hosts: HostPolicy,
    /// Origins (`scheme://host[:port]`) allowed besides the server's own.
    pub origins: BTreeSet<String>,
    /// Accepted API tokens.
    pub tokens: ApiTokens,
    /// Paths that need no token.
    pub public: BTreeSet<String>,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Time to receive a request body once its headers are in.
    pub body_timeout: Duration,
}

impl Security {
    /// Loopback names only, the default public paths and limits, and `tokens`.
    pub fn loopback(tokens: ApiTokens) -> Self {
        Self {
            hosts: HostPolicy::loopback_and([]),
            origins: BTreeSet::new(),
            tokens,
            public: DEFAULT_PUBLIC.into_iter().map(str::to_owned).collect(),
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The guard middleware's state.
#[derive(Debug, Clone)]
pub struct Guard(Arc<Security>);

/// Wraps every route of `app` (and its fallback) in the guard, and adds `/login`.
pub fn secure(app: Router, security: Security) -> Router {
    let guard = Guard(Arc::new(security));
    let login = Router::new()
        .route("/login", axum::routing::get(login_form).post(login_submit))
        .with_state(guard.clone());
    // The guard wraps the whole router (not each route, as `Router::layer` would), so it also
    // sees what routing itself answers (405 with its `Allow` header, 404).
    Router::new()
        .fallback_service(app.merge(login))
        .layer(axum::middleware::from_fn_with_state(guard, guard_fn))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// A refusal in the documented error shape.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> Response {
    (
        status,
        axum::Json(ErrorResponse {
            error: ErrorBody {
                code: code.into(),
                message: message.into(),
                field: None,
                parameter: None,
                violations: Vec::new(),
            },
        }),
    )
        .into_response()
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .is_some_and(|m| {
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

fn has_body(headers: &HeaderMap) -> bool {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match len {
        Some(n) => n > 0,
        None => headers.contains_key(header::TRANSFER_ENCODING),
    }
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn set_cookie(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn redirect(to: &str, cookie: Option<&str>) -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response();
    if let Some(t) = cookie {
        r.headers_mut().insert(header::SET_COOKIE, set_cookie(t));
    }
    r
}

/// A local path to return to: starts with one `/` (no scheme, no `//host`).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

async fn guard_fn(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let s = &g.0;
    let headers = req.headers();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    // 1. Host.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host else {
        return error_response(StatusCode::BAD_REQUEST, "invalid_request", "no Host header");
    };
    if !s.hosts.allows(&host) {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!(
                "host `{}` is not served here; add it to [server] allowed_hosts",
                host_name(&host)
            ),
        );
    }

    // 2. Origin.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let own = format!("http://{host}");
        if !(origin.eq_ignore_ascii_case(&own) || s.origins.contains(origin)) {
            return error_response(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "cross-origin request from `{origin}` refused; add it to [server] \
                     allowed_origins to allow it"
                ),
            );
        }
    } else if is_unsafe(&method)
        && headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return error_response(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "cross-site request refused",
        );
    }

    // 3. Content type.
    let is_login = path == "/login";
    if is_unsafe(&method) && has_body(headers) && !is_json(headers) && !is_login {
        let got = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("request bodies must be `Content-Type: application/json` (got `{got}`)"),
        );
    }

    // 4. Authentication: `?token=` exchange, then bearer or cookie.
    let public = is_login || path == "/v1/notify" || s.public.contains(&path);
    if method == Method::GET
        && let Some(q) = req.uri().query()
    {
        let mut token = None;
        let mut rest = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            if k == "token" {
                token = Some(v.into_owned());
            } else {
                rest.append_pair(&k, &v);
            }
        }
        if let Some(t) = token {
            if s.tokens.lookup(&t).is_none() {
                return unauthorized("the `token` in the URL is not a valid API token");
            }
            let rest = rest.finish();
            let to = if rest.is_empty() {
                path.clone()
            } else {
                format!("{path}?{rest}")
            };
            return redirect(&to, Some(&t));
        }
    }
    if !public {
        let presented = bearer(headers).or_else(|| cookie_token(headers));
        let Some(token) = presented else {
            if method == Method::GET && wants_html(headers) {
                let next: String =
                    url::form_urlencoded::byte_serialize(req.uri().to_string().as_bytes())
                        .collect();
                return redirect(&format!("/login?next={next}"), None);
            }
            return unauthorized(
                "an API token is required: send `Authorization: Bearer <token>` (the default \
                 server's token is in its state directory, file `api-token`)",
            );
        };
        let Some((name, scopes)) = s.tokens.lookup(&token) else {
            return unauthorized("the API token is not valid");
        };
        let need = Scope::required(&method, &path);
        if !(scopes.contains(&need) || scopes.contains(&Scope::Admin)) {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{method} {path} needs scope `{need}`; token `{name}` has {scopes:?}"),
            );
        }
    }

    // 5. Body: bounded in size and time.
    let (parts, body) = req.into_parts();
    let limit = s.body_limit;
    if let Some(n) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && n > limit as u64
    {
        return too_large(limit, &parts.headers, &path);
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| None)?;
            if buf.len() + chunk.len() > limit {
                return Err(Some(()));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    let bytes = match tokio::time::timeout(s.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(Some(()))) => return too_large(limit, &parts.headers, &path),
        Ok(Err(None)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body could not be read",
            );
        }
        Err(_) => {
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    s.body_timeout.as_secs_f64()
                ),
            );
        }
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    let method_str = req.method().to_string();
    json_errors(next.run(req).await, &method_str, &path).await
}

fn unauthorized(message: &str) -> Response {
    let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"orchestrator\""),
    );
    r
}

/// Whether a request comes from Google Pub/Sub's push delivery (its `User-Agent`).
pub(crate) fn from_pubsub(headers: &HeaderMap) -> bool {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.contains("CloudPubSub-Google") || ua.contains("APIs-Google"))
}

fn too_large(limit: usize, headers: &HeaderMap, path: &str) -> Response {
    let message =
        format!("the request body exceeds the limit of {limit} bytes ([server] body_limit)");
    if path == "/v1/notify" && from_pubsub(headers) {
        // Pub/Sub redelivers anything but 2xx; an oversized push never gets smaller.
        return crate::serve::push_dropped("payload_too_large", &message);
    }
    error_response(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
}

/// Turns a non-JSON error answer (axum's 405, 404 from a nested router, a rejection's text)
/// into the documented JSON shape.
async fn json_errors(r: Response, method: &str, path: &str) -> Response {
    let status = r.status();
    if status.is_success() || status.is_redirection() || status.is_informational() {
        return r;
    }
    let ct_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if ct_json {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allow = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            (
                "method_not_allowed",
                format!("{method} is not allowed on {path}; allowed: {allow}"),
            )
        }
        StatusCode::NOT_FOUND => ("not_found", format!("no such route: {path}")),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", text),
        s if s.is_server_error() => ("internal", text),
        _ => ("invalid_request", text),
    };
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        message
    };
    let mut out = error_response(status, code, message);
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

const LOGIN_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\">\
<title>distributor: sign in</title><style>body{font:14px system-ui,sans-serif;margin:2em}\
input{font:inherit;padding:.3em}</style></head><body><h1>distributor</h1>{error}\
<form method=\"post\" action=\"/login\"><input type=\"hidden\" name=\"next\" value=\"{next}\">\
<label>API token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" \
size=\"72\" autofocus></label> <button>Sign in</button></form>\
<p>The default server's token is in the file <code>api-token</code> in its state directory \
(<code>.distributor/</code>).</p></body></html>";

#[derive(Debug, Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

async fn login_form(axum::extract::Query(q): axum::extract::Query<LoginQuery>) -> Response {
    let next = crate::page::esc(safe_next(q.next.as_deref().unwrap_or("/")));
    let error = if q.error.is_some() {
        "<p style=\"color:#b00\">That token is not valid.</p>"
    } else {
        ""
    };
    axum::response::Html(
        LOGIN_PAGE
            .replace("{error}", error)
            .replace("{next}", &next),
    )
    .into_response()
}

async fn login_submit(State(g): State<Guard>, headers: HeaderMap, body: Bytes) -> Response {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "POST /login takes the login form (application/x-www-form-urlencoded)",
        );
    }
    let mut token = String::new();
    let mut next = String::from("/");
    for (k, v) in url::form_urlencoded::parse(&body) {
        match k.as_ref() {
            "token" => token = v.trim().to_owned(),
            "next" => next = v.into_owned(),
            _ => {}
        }
    }
    let next = safe_next(&next).to_owned();
    if g.0.tokens.lookup(&token).is_none() {
        let n: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
        return redirect(&format!("/login?error=1&next={n}"), None);
    }
    redirect(&next, Some(&token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_method_and_path() {
        let s = |m: Method, p: &str| Scope::required(&m, p);
        assert_eq!(s(Method::GET, "/v1/executions"), Scope::Read);
        assert_eq!(s(Method::POST, "/v1/executions"), Scope::Submit);
        assert_eq!(s(Method::POST, "/v1/workflows"), Scope::Submit);
        assert_eq!(s(Method::POST, "/v1/executions/3/poke"), Scope::Submit);
        assert_eq!(s(Method::POST, "/v1/executions/3/cancel"), Scope::Cancel);
        assert_eq!(s(Method::POST, "/v1/switch/a/b"), Scope::Admin);
        assert_eq!(s(Method::DELETE, "/v1/executions/3"), Scope::Admin);
        assert_eq!(s(Method::PUT, "/v1/executions"), Scope::Admin);
    }

    #[test]
    fn host_names_without_ports() {
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("localhost:80"), "localhost");
        assert_eq!(host_name("example.org"), "example.org");
        let p = HostPolicy::loopback_and(["orch.internal:8080"]);
        assert!(p.allows("LOCALHOST:1"));
        assert!(p.allows("orch.internal"));
        assert!(!p.allows("evil.example:8080"));
        assert_eq!(HostPolicy::loopback_and(["*"]), HostPolicy::Any);
    }

    #[test]
    fn next_stays_on_this_server() {
        assert_eq!(safe_next("/v1/executions?x=1"), "/v1/executions?x=1");
        for bad in ["//evil.example/", "https://evil.example", "\\\\x", "x"] {
            assert_eq!(safe_next(bad), "/");
        }
    }

    #[test]
    fn token_files_are_private_and_generated_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = state.join("api-token");
        let (t, fresh) = load_or_generate_token(&path).unwrap();
        assert!(fresh && t.starts_with("dst_") && t.len() == 68);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&state), 0o700);
        assert_eq!(load_or_generate_token(&path).unwrap(), (t, false));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_generate_token(&path).unwrap_err();
        assert!(matches!(e, FileError::TooOpen { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
