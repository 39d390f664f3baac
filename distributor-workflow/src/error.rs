//! Errors of workflow loading and operations.

use distributor_core::ValidationError;

/// Everything that can go wrong loading a workflow or operating on a run.
///
/// | variant | meaning | HTTP |
/// |---|---|---|
/// | `Io` | the workflow file could not be read | 400 |
/// | `Parse` | not TOML/JSON, or not the shape of a workflow | 400 |
/// | `Invalid` | schema or meaning violations, each with its JSON Pointer | 422 |
/// | `UnknownRun` | no run with that id | 404 |
/// | `UnknownStep` | the run's workflow has no such step | 404 |
/// | `Conflict` | the operation does not apply in the current state (approve a step that is not waiting, re-run a step that did not fail…) | 409 |
/// | `Engine` | the engine or its store failed (see `is_transient`) | 503/500 |
/// | `Corrupt` | a stored run document does not parse | 500 |
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The workflow file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not TOML/JSON or not shaped like a workflow.
    #[error("cannot parse {source_name}: {message}")]
    Parse {
        /// The file or document name.
        source_name: String,
        /// The parser's message.
        message: String,
    },
    /// Violations of the schema or of the workflow's meaning.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No such run.
    #[error("unknown workflow run `{0}`")]
    UnknownRun(String),
    /// No such step in the run's workflow.
    #[error("run `{run}` has no step `{step}`")]
    UnknownStep {
        /// The run.
        run: String,
        /// The step asked for.
        step: String,
    },
    /// The operation does not apply now.
    #[error("{0}")]
    Conflict(String),
    /// The engine or its store failed.
    #[error(transparent)]
    Engine(#[from] distributor_core::Error),
    /// A stored document does not parse.
    #[error("corrupt workflow document `{key}`: {message}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The parser's message.
        message: String,
    },
}

impl WorkflowError {
    /// True when retrying the same call may succeed (a transient store error, an engine that
    /// is shutting down).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Engine(e) => e.is_transient() || matches!(e, distributor_core::Error::Shutdown),
            _ => false,
        }
    }

    /// The HTTP status an API should answer with (see the table).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Io { .. } | Self::Parse { .. } => 400,
            Self::Invalid(_) => 422,
            Self::UnknownRun(_) | Self::UnknownStep { .. } => 404,
            Self::Conflict(_) => 409,
            e if e.is_transient() => 503,
            _ => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_of_the_table() {
        let io = WorkflowError::Io {
            path: "x".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!((io.http_status(), io.is_transient()), (400, false));
        let parse = WorkflowError::Parse {
            source_name: "x".into(),
            message: "bad".into(),
        };
        assert_eq!(parse.http_status(), 400);
        let invalid = WorkflowError::Invalid(ValidationError {
            subject: "workflow".into(),
            violations: vec![],
        });
        assert_eq!(invalid.http_status(), 422);
        assert_eq!(WorkflowError::UnknownRun("r".into()).http_status(), 404);
        let step = WorkflowError::UnknownStep {
            run: "r".into(),
            step: "s".into(),
        };
        assert_eq!(step.http_status(), 404);
        assert_eq!(WorkflowError::Conflict("no".into()).http_status(), 409);
        let transient = WorkflowError::Engine(distributor_core::Error::Store {
            message: "busy".into(),
            transient: true,
            source: None,
        });
        assert_eq!(
            (transient.http_status(), transient.is_transient()),
            (503, true)
        );
        let permanent = WorkflowError::Engine(distributor_core::Error::Store {
            message: "disk".into(),
            transient: false,
            source: None,
        });
        assert_eq!(
            (permanent.http_status(), permanent.is_transient()),
            (500, false)
        );
        let shutdown = WorkflowError::Engine(distributor_core::Error::Shutdown);
        assert_eq!(shutdown.http_status(), 503);
        let corrupt = WorkflowError::Corrupt {
            key: "k".into(),
            message: "m".into(),
        };
        assert_eq!(corrupt.http_status(), 500);
    }
}
