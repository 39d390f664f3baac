//! Error tables: backend errors → transient/permanent, and Jobs API error codes → HTTP status.

use std::io;

use axum::http::StatusCode;
use distributor_core::Error;

use crate::wire::{ApiError, ApiErrorDetail, ErrorCode};

/// Everything that can go wrong inside the adapter.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobsError {
    /// The config cannot work (bad address, duplicate worker).
    #[error("jobs config: {0}")]
    Config(String),
    /// The API address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The queue database failed.
    #[error("jobs queue database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row cannot be read.
    #[error("jobs queue database: corrupt row for job {id}: {message}")]
    Corrupt { id: i64, message: String },
    /// The adapter was shut down (dropped).
    #[error("the jobs server is shut down")]
    Shutdown,
    /// The payload does not match the `jobs` payload type.
    #[error("jobs payload: {0}")]
    Payload(#[source] serde_json::Error),
}

/// The table: which adapter errors the engine may retry.
///
/// | error | class | why |
/// |---|---|---|
/// | `Config` | permanent | the config will not fix itself |
/// | `Bind` address in use | transient | a previous process may still be exiting |
/// | `Bind` other | permanent | bad address, no permission |
/// | `Database` busy / locked / I/O / pool timeout or closed | transient | contention, disk blip |
/// | `Database` other | permanent | schema or constraint problems |
/// | `Corrupt` | permanent | the row will not change |
/// | `Shutdown` | transient | a rebuilt instance will answer |
/// | `Payload` | permanent | the payload will not change |
pub(crate) fn is_transient(e: &JobsError) -> bool {
    match e {
        JobsError::Config(_) | JobsError::Corrupt { .. } | JobsError::Payload(_) => false,
        JobsError::Bind { source, .. } => source.kind() == io::ErrorKind::AddrInUse,
        JobsError::Database(d) => match d {
            sqlx::Error::Database(db) => {
                let m = db.message();
                m.contains("locked") || m.contains("busy")
            }
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
            _ => false,
        },
        JobsError::Shutdown => true,
    }
}

impl From<JobsError> for Error {
    fn from(e: JobsError) -> Self {
        let message = e.to_string();
        if is_transient(&e) {
            Error::transient_from(message, e)
        } else {
            Error::permanent_from(message, e)
        }
    }
}

/// A refused Jobs API request: an [`ErrorCode`] and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiFailure {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ApiFailure {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of each code.
    pub(crate) fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::UnknownJob | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MalformedRequest => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::NotHolder | ErrorCode::WrongActivationToken => StatusCode::FORBIDDEN,
            ErrorCode::LeaseLost
            | ErrorCode::JobFinished
            | ErrorCode::AlreadyClaimed
            | ErrorCode::CapacityExhausted => StatusCode::CONFLICT,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn body(&self) -> ApiError {
        ApiError {
            error: ApiErrorDetail {
                code: self.code,
                message: self.message.clone(),
            },
        }
    }
}

impl From<JobsError> for ApiFailure {
    fn from(e: JobsError) -> Self {
        Self::new(ErrorCode::Unavailable, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "x")
    }

    #[test]
    fn config_is_permanent() {
        assert!(!Error::from(JobsError::Config("x".into())).is_transient());
    }

    #[test]
    fn bind_in_use_is_transient() {
        let e = JobsError::Bind {
            addr: "a".into(),
            source: io(io::ErrorKind::AddrInUse),
        };
        assert!(Error::from(e).is_transient());
    }

    #[test]
    fn bind_other_is_permanent() {
        let e = JobsError::Bind {
            addr: "a".into(),
            source: io(io::ErrorKind::PermissionDenied),
        };
        assert!(!Error::from(e).is_transient());
    }

    #[test]
    fn database_io_and_pool_are_transient() {
        for e in [
            sqlx::Error::Io(io(io::ErrorKind::Other)),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
        ] {
            assert!(Error::from(JobsError::Database(e)).is_transient());
        }
    }

    #[test]
    fn database_other_is_permanent() {
        let e = JobsError::Database(sqlx::Error::RowNotFound);
        assert!(!Error::from(e).is_transient());
    }

    #[tokio::test]
    async fn database_locked_is_transient_and_constraint_is_permanent() {
        use sqlx::Connection;
        use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(dir.path().join("db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut one = SqliteConnection::connect_with(&opts).await.unwrap();
        let mut two = SqliteConnection::connect_with(&opts).await.unwrap();
        sqlx::raw_sql("CREATE TABLE t (x INTEGER UNIQUE); INSERT INTO t VALUES (1);")
            .execute(&mut one)
            .await
            .unwrap();
        let dup = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut one)
            .await
            .unwrap_err();
        assert!(!Error::from(JobsError::Database(dup)).is_transient());
        sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO t VALUES (2);")
            .execute(&mut one)
            .await
            .unwrap();
        let locked = sqlx::query("INSERT INTO t VALUES (3)")
            .execute(&mut two)
            .await
            .unwrap_err();
        assert!(locked.to_string().contains("locked"), "{locked}");
        assert!(Error::from(JobsError::Database(locked)).is_transient());
    }

    #[test]
    fn corrupt_is_permanent() {
        let e = JobsError::Corrupt {
            id: 1,
            message: "x".into(),
        };
        assert!(!Error::from(e).is_transient());
    }

    #[test]
    fn shutdown_is_transient() {
        assert!(Error::from(JobsError::Shutdown).is_transient());
    }

    #[test]
    fn payload_is_permanent() {
        let e = serde_json::from_str::<u8>("x").unwrap_err();
        assert!(!Error::from(JobsError::Payload(e)).is_transient());
    }

    #[test]
    fn every_api_code_is_4xx_or_503() {
        use ErrorCode::*;
        let table = [
            (Unauthorized, 401),
            (UnknownJob, 404),
            (NotFound, 404),
            (MalformedRequest, 400),
            (InvalidRequest, 422),
            (NotHolder, 403),
            (WrongActivationToken, 403),
            (LeaseLost, 409),
            (JobFinished, 409),
            (AlreadyClaimed, 409),
            (CapacityExhausted, 409),
            (MethodNotAllowed, 405),
            (Unavailable, 503),
        ];
        for (code, status) in table {
            assert_eq!(
                ApiFailure::new(code, "m").status().as_u16(),
                status,
                "{code:?}"
            );
        }
    }
}
