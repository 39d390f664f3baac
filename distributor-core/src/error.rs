//! The one error type of the framework, and payload/config validation errors.
//!
//! Retry logic reads exactly one thing: [`Error::is_transient`]. Adapters classify their
//! backend's errors into [`Error::Transient`] or [`Error::Permanent`] (in their `error.rs`
//! table) and keep the native error as `source`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{DistributorName, ExecutionId, KindName};

/// A boxed native error kept as a `source`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the framework reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A failure that may go away if the same call is made again (network blip, backend busy).
    /// The engine retries it with backoff.
    #[error("transient: {message}")]
    Transient {
        /// What failed.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },
    /// A failure that repeating the call will not fix (bad request, refused). `run` failing this
    /// way ends the execution `Rejected` with this text.
    #[error("{message}")]
    Permanent {
        /// What failed.
        message: String,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },
    /// A payload or config did not match its schema.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A distributors config file could not be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No adapter is registered for this kind.
    #[error("unknown kind `{kind}`{}; known kinds: {}{}", did_you_mean(.suggestion), list(.known), link_hint(.suggestion))]
    UnknownKind {
        /// The kind asked for.
        kind: String,
        /// The kinds that are registered.
        known: Vec<KindName>,
        /// The nearest known kind.
        suggestion: Option<String>,
    },
    /// Two registrations claim the same kind.
    #[error("kind `{0}` is registered twice")]
    DuplicateKind(KindName),
    /// No distributor instance has this name.
    #[error("unknown distributor `{name}`{}; configured: {}", did_you_mean(.suggestion), list(.known))]
    UnknownDistributor {
        /// The name asked for.
        name: String,
        /// The configured names.
        known: Vec<DistributorName>,
        /// The nearest configured name.
        suggestion: Option<String>,
    },
    /// No execution has this id.
    #[error("unknown execution {0}")]
    UnknownExecution(ExecutionId),
    /// A push was refused; nothing changed.
    #[error("notification rejected: {0}")]
    NotificationRejected(NotificationRejection),
    /// The adapter does not support the operation (see its capabilities).
    #[error("`{operation}` is not supported by this distributor")]
    Unsupported {
        /// The operation.
        operation: &'static str,
    },
    /// A compare-and-set lost: someone else changed the record first.
    #[error("execution {0} was changed concurrently")]
    Conflict(ExecutionId),
    /// The store failed.
    #[error("store: {message}")]
    Store {
        /// What failed.
        message: String,
        /// Whether trying again may help (connection lost, database busy).
        transient: bool,
        /// The native error.
        #[source]
        source: Option<BoxError>,
    },
    /// The engine is shutting down.
    #[error("the engine is shut down")]
    Shutdown,
    /// This engine instance does not own the shard an execution belongs to (any more): another
    /// instance sharing the store took it over, or it was handed over in a rebalance. Nothing
    /// was written. Not transient for this instance; the shard's owner carries on.
    #[error("this engine instance does not own shard {shard} (any more)")]
    Fenced {
        /// The shard.
        shard: u32,
    },
}

impl Error {
    /// A transient error with a message.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            source: None,
        }
    }
    /// A permanent error with a message.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
            source: None,
        }
    }
    /// A transient error wrapping a native one.
    pub fn transient_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Transient {
            message: message.into(),
            source: Some(source.into()),
        }
    }
    /// A permanent error wrapping a native one.
    pub fn permanent_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Permanent {
            message: message.into(),
            source: Some(source.into()),
        }
    }
    /// Whether the call that failed may succeed if made again. The only thing retry logic reads.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transient { .. } => true,
            Self::Store { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// Why a notification was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationRejection {
    /// It carried no auth token.
    MissingToken,
    /// The token does not verify (forged or for another engine).
    Forged,
    /// The token is past its expiry.
    Expired,
    /// The token belongs to another execution.
    WrongExecution,
    /// No such execution.
    UnknownExecution,
    /// The execution has already finished.
    Terminal,
    /// Its sequence is not newer than the last accepted one, or its message id was seen.
    Stale,
    /// Its sequence jumps more than [`MAX_SEQUENCE_JUMP`](crate::MAX_SEQUENCE_JUMP) past the
    /// last accepted one (accepting it would make every later genuine update look stale).
    SequenceJump,
}

impl fmt::Display for NotificationRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MissingToken => "no auth_token attribute",
            Self::Forged => "auth token does not verify",
            Self::Expired => "auth token expired",
            Self::WrongExecution => "auth token is for another execution",
            Self::UnknownExecution => "unknown execution",
            Self::Terminal => "execution already finished",
            Self::Stale => "stale or duplicate update",
            Self::SequenceJump => "update sequence jumps too far past the last accepted one",
        })
    }
}

fn did_you_mean(s: &Option<String>) -> String {
    s.as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// When no known kind is near, the likely cause: the adapter crate is a dependency but was
/// never named, so the linker dropped its registration.
fn link_hint(suggestion: &Option<String>) -> &'static str {
    if suggestion.is_some() {
        return "";
    }
    " (if an adapter crate of this kind is a dependency, name it where the registry is built, \
     e.g. `use distributor_local as _;`: a crate nothing names is not linked and its \
     `inventory::submit!` registration is dropped)"
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nearest candidate to `input` by edit distance, if it is close enough to be a plausible
/// typo (Jaro-Winkler similarity ≥ 0.8, or for short names one edit or swap of neighbours).
pub fn nearest<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(input, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
        .or_else(|| {
            // Short names defeat Jaro-Winkler (`evn` vs `env`): one edit or one swap of
            // neighbours, in a name of at least 3 characters, is a slip too.
            candidates
                .iter()
                .filter(|c| input.chars().count() >= 3 && strsim::osa_distance(input, c) == 1)
                .min()
                .map(|c| (*c).to_owned())
        })
}

/// One schema violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// JSON Pointer (RFC 6901) of the offending value (`""` is the document root).
    pub pointer: String,
    /// What was expected there, in words (`a string`, `one of "a", "b"`, `no field "x"`).
    pub expected: String,
    /// The full message (never echoes secrets: values are masked).
    pub message: String,
    /// For an unknown field or bad enum value: the nearest allowed one.
    pub suggestion: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.pointer.is_empty() {
            "(root)"
        } else {
            &self.pointer
        };
        write!(f, "{at}: {}", self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean `{s}`?)")?;
        }
        Ok(())
    }
}

/// Every violation found in one document, with where the document came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ValidationError {
    /// What was validated (`payload for kind local`, `config of distributor hpc`).
    pub subject: String,
    /// All violations, sorted by [`Violation::pointer`] (string order, so `/a/10` comes before
    /// `/a/2`), duplicates removed. Never empty.
    pub violations: Vec<Violation>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.violations.len();
        write!(
            f,
            "invalid {}: {n} problem{}",
            self.subject,
            if n == 1 { "" } else { "s" }
        )?;
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

/// A distributors config file could not be used. Holds every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct ConfigError {
    /// The file (or `<inline>`).
    pub source_name: String,
    /// Every problem.
    pub problems: Vec<ConfigProblem>,
}

/// One problem in a distributors config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigProblem {
    /// The instance it concerns, if any.
    pub instance: Option<DistributorName>,
    /// JSON Pointer inside that instance (or the file, when `instance` is `None`).
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            match &p.instance {
                Some(i) => write!(f, "\n  distributor `{i}`")?,
                None => write!(f, "\n  file")?,
            }
            if !p.pointer.is_empty() {
                write!(f, " at {}", p.pointer)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_get_suggestions_too() {
        assert_eq!(
            nearest("evn", ["env", "argv", "cwd"]).as_deref(),
            Some("env")
        );
        assert_eq!(
            nearest("cdw", ["env", "argv", "cwd"]).as_deref(),
            Some("cwd")
        );
        assert_eq!(
            nearest("payloda", ["payload", "labels"]).as_deref(),
            Some("payload")
        );
        assert_eq!(nearest("xyz", ["env", "argv", "cwd"]), None);
        assert_eq!(nearest("ab", ["ba"]), None);
    }

    #[test]
    fn only_transient_errors_are_transient() {
        assert!(Error::transient("x").is_transient());
        assert!(!Error::permanent("x").is_transient());
        assert!(!Error::Shutdown.is_transient());
        let store = |transient| Error::Store {
            message: "m".into(),
            transient,
            source: None,
        };
        assert!(store(true).is_transient());
        assert!(!store(false).is_transient());
    }

    #[test]
    fn unknown_kind_lists_known_and_suggests() {
        let e = Error::UnknownKind {
            kind: "slrum".into(),
            known: vec![KindName::new("local"), KindName::new("slurm")],
            suggestion: nearest("slrum", ["local", "slurm"]),
        };
        assert_eq!(
            e.to_string(),
            "unknown kind `slrum` (did you mean `slurm`?); known kinds: `local`, `slurm`"
        );
    }

    #[test]
    fn unknown_kind_without_a_near_one_hints_at_the_force_link_line() {
        let e = Error::UnknownKind {
            kind: "webhook".into(),
            known: vec![],
            suggestion: None,
        };
        let text = e.to_string();
        assert!(
            text.starts_with("unknown kind `webhook`; known kinds: none"),
            "{text}"
        );
        assert!(
            text.contains("as _;") && text.contains("not linked"),
            "{text}"
        );
    }

    #[test]
    fn nearest_ignores_far_candidates() {
        assert_eq!(nearest("zzz", ["local", "slurm"]), None);
        assert_eq!(
            nearest("comand", ["command", "env"]).as_deref(),
            Some("command")
        );
    }
}
