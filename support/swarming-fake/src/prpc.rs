//! pRPC framing as the LUCI Go server does it (`grpc/prpc`): JSON bodies prefixed with `)]}'`,
//! the gRPC code in `X-Prpc-Grpc-Code`, the HTTP status following the code, errors as text.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// The prefix of every JSON response body (an XSSI guard); clients strip it before parsing.
pub const JSON_PREFIX: &str = ")]}'\n";

/// gRPC status codes (google.rpc.Code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// The operation was cancelled by the caller.
    Cancelled = 1,
    /// Unknown error.
    Unknown = 2,
    /// The request is invalid.
    InvalidArgument = 3,
    /// The deadline passed.
    DeadlineExceeded = 4,
    /// The entity does not exist.
    NotFound = 5,
    /// The entity already exists.
    AlreadyExists = 6,
    /// The caller may not do this.
    PermissionDenied = 7,
    /// Quota or rate limit.
    ResourceExhausted = 8,
    /// The system is not in a state for this.
    FailedPrecondition = 9,
    /// Concurrency conflict.
    Aborted = 10,
    /// Out of range.
    OutOfRange = 11,
    /// No such method.
    Unimplemented = 12,
    /// Server bug.
    Internal = 13,
    /// The service is down; retry.
    Unavailable = 14,
    /// Data lost.
    DataLoss = 15,
    /// No or bad credentials.
    Unauthenticated = 16,
}

impl Code {
    /// The numeric code.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// The HTTP status the LUCI server answers with for this code (`grpcutil.CodeStatus`).
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::Ok => StatusCode::OK,
            Self::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::InvalidArgument | Self::FailedPrecondition | Self::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists | Self::Aborted => StatusCode::CONFLICT,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unknown | Self::Internal | Self::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The google.rpc.Code name (`NOT_FOUND`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// A pRPC error: a code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The code.
    pub code: Code,
    /// The message (the response body).
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    /// `INVALID_ARGUMENT`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    /// The `google.rpc.Status` JSON of this error (as BatchGetResult items carry it).
    pub fn status_json(&self) -> Value {
        serde_json::json!({ "code": self.code.number(), "message": self.message })
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert("x-prpc-grpc-code", HeaderValue::from(self.code.number()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        (
            self.code.http_status(),
            headers,
            format!("{}\n", self.message),
        )
            .into_response()
    }
}

/// A successful JSON response.
pub fn ok(body: &Value) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-prpc-grpc-code", HeaderValue::from_static("0"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let text = format!(
        "{JSON_PREFIX}{}",
        serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned())
    );
    (StatusCode::OK, headers, text).into_response()
}

/// Checks the request's content negotiation: JSON in (`Content-Type: application/json`) and
/// JSON out (`Accept: application/json`; without it a LUCI server answers in binary protobuf,
/// which this fake does not speak).
pub fn check_headers(headers: &HeaderMap) -> Result<(), RpcError> {
    let is_json = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim() == "application/json")
            })
    };
    if !is_json(header::CONTENT_TYPE) {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "bad request: this server reads only Content-Type: application/json",
        ));
    }
    let accepts_json = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim() == "application/json")
            })
        });
    if !accepts_json {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "bad request: this server writes only JSON; send Accept: application/json",
        ));
    }
    Ok(())
}

/// A JSON object field under its proto name (`task_slices`) or its JSON name (`taskSlices`):
/// protojson accepts both on input.
pub fn field<'a>(obj: &'a Map<String, Value>, proto_name: &str) -> Option<&'a Value> {
    obj.get(proto_name)
        .or_else(|| obj.get(&camel(proto_name)))
        .filter(|v| !v.is_null())
}

/// `snake_case` → `lowerCamelCase`, as protoc derives JSON names.
pub fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Rewrites every object key of `v` to lowerCamelCase (the form the server emits).
pub fn camel_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (camel(k), camel_keys(v))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(camel_keys).collect()),
        other => other.clone(),
    }
}

/// A string field (absent → empty).
pub fn string(obj: &Map<String, Value>, name: &str) -> Result<String, RpcError> {
    match field(obj, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(RpcError::invalid(format!(
            "bad request: {name}: not a string"
        ))),
    }
}

/// A bool field (absent → false).
pub fn boolean(obj: &Map<String, Value>, name: &str) -> Result<bool, RpcError> {
    match field(obj, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RpcError::invalid(format!(
            "bad request: {name}: not a bool"
        ))),
    }
}

/// An integer field, given as a JSON number or a decimal string (protojson accepts both for
/// every integer type; int64 is emitted as a string). Absent → 0.
pub fn integer(obj: &Map<String, Value>, name: &str) -> Result<i64, RpcError> {
    match field(obj, name) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| RpcError::invalid(format!("bad request: {name}: not an integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| RpcError::invalid(format!("bad request: {name}: not an integer"))),
        Some(_) => Err(RpcError::invalid(format!(
            "bad request: {name}: not an integer"
        ))),
    }
}

/// A repeated string field.
pub fn strings(obj: &Map<String, Value>, name: &str) -> Result<Vec<String>, RpcError> {
    match field(obj, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| RpcError::invalid(format!("bad request: {name}: not strings")))
            })
            .collect(),
        Some(_) => Err(RpcError::invalid(format!(
            "bad request: {name}: not a list"
        ))),
    }
}

/// A repeated `StringPair` field as `(key, value)` pairs.
pub fn pairs(obj: &Map<String, Value>, name: &str) -> Result<Vec<(String, String)>, RpcError> {
    match field(obj, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                let o = v.as_object().ok_or_else(|| {
                    RpcError::invalid(format!("bad request: {name}: not StringPairs"))
                })?;
                Ok((string(o, "key")?, string(o, "value")?))
            })
            .collect(),
        Some(_) => Err(RpcError::invalid(format!(
            "bad request: {name}: not a list"
        ))),
    }
}

/// RFC 3339 in UTC with microseconds, as protojson writes `google.protobuf.Timestamp`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123456Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&timestamp(leap)[..10], "2000-02-29");
    }

    #[test]
    fn names_are_camelized_like_protoc() {
        assert_eq!(camel("task_slices"), "taskSlices");
        assert_eq!(camel("execution_timeout_secs"), "executionTimeoutSecs");
        assert_eq!(camel("name"), "name");
    }

    #[test]
    fn codes_map_to_the_luci_http_statuses() {
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::InvalidArgument.http_status(), 400);
        assert_eq!(Code::Unavailable.http_status(), 503);
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::Cancelled.http_status().as_u16(), 499);
    }
}
