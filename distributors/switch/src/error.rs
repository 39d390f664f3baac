//! Error table: what the switch itself refuses, and whether the engine may retry it.
//!
//! Errors of the two sides pass through unchanged (each side's own table classifies them);
//! store errors keep the store's classification.

use distributor_core::{Error, ValidationError, Violation};

use crate::core::{Interval, format_time};

/// Everything the switch itself can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SwitchError {
    /// A control request is malformed.
    #[error("switch control request: {pointer}: {message}", pointer = if pointer.is_empty() { "(root)" } else { pointer })]
    BadRequest { pointer: String, message: String },
    /// A payload field the schema let through does not mean a time.
    #[error("switch payload: {pointer}: {message}")]
    BadPayload { pointer: String, message: String },
    /// The cutover asked for is not on the grid.
    #[error(
        "cutover {} is not on the {}-second grid; the nearest grid points are {} and {}",
        format_time(*cutover), grid_ms / 1000, format_time(*below), format_time(*above)
    )]
    OffGrid {
        cutover: i64,
        grid_ms: i64,
        below: i64,
        above: i64,
    },
    /// The cutover falls inside or before an interval already dispatched to `before`.
    #[error(
        "cutover {} refused: it falls inside or before {interval}, already dispatched to \
         `before`; a cutover at or after {} leaves it there",
        format_time(*cutover), format_time(interval.end.max(interval.start + 1))
    )]
    BeforeDispatched { cutover: i64, interval: Interval },
    /// The change would hand an interval already dispatched to `after` back to `before`.
    #[error(
        "{} refused: {interval} was already dispatched to `after` and would go back to \
         `before`{}",
        match cutover { Some(c) => format!("cutover {}", format_time(*c)), None => "clearing the cutover".to_owned() },
        match cutover { Some(_) => format!("; a cutover at or before {} keeps it there", format_time(interval.start)), None => String::new() }
    )]
    AfterDispatched {
        cutover: Option<i64>,
        interval: Interval,
    },
    /// A task's interval contains the cutover, so it belongs to neither side.
    #[error(
        "interval {interval} contains the cutover {}: it belongs to neither side; split it \
         at the cutover or align intervals to the grid",
        format_time(*cutover)
    )]
    Straddles { interval: Interval, cutover: i64 },
    /// A launch handle that this switch did not write (or a newer version of it).
    #[error("switch handle: {0}")]
    Handle(String),
}

/// The table: which of the switch's own errors the engine may retry.
///
/// | error | class | why |
/// |---|---|---|
/// | `BadRequest` | permanent (validation, with the pointer) | the request will not change |
/// | `BadPayload` | permanent (validation, with the pointer) | the payload will not change |
/// | `OffGrid` | permanent (validation at `/cutover`) | the time will not move onto the grid |
/// | `BeforeDispatched` | permanent | what was dispatched stays dispatched |
/// | `AfterDispatched` | permanent | what was dispatched stays dispatched |
/// | `Straddles` | permanent (`run`: the execution is `Rejected`) | the interval will not shrink |
/// | `Handle` | permanent | the stored handle will not change |
pub(crate) fn is_transient(e: &SwitchError) -> bool {
    match e {
        SwitchError::BadRequest { .. }
        | SwitchError::BadPayload { .. }
        | SwitchError::OffGrid { .. }
        | SwitchError::BeforeDispatched { .. }
        | SwitchError::AfterDispatched { .. }
        | SwitchError::Straddles { .. }
        | SwitchError::Handle(_) => false,
    }
}

impl From<SwitchError> for Error {
    fn from(e: SwitchError) -> Self {
        let message = e.to_string();
        let violation = |subject: &str, pointer: &str, message: &str| {
            Error::Validation(ValidationError {
                subject: subject.to_owned(),
                violations: vec![Violation {
                    pointer: pointer.to_owned(),
                    expected: String::new(),
                    message: message.to_owned(),
                    suggestion: None,
                }],
            })
        };
        match &e {
            SwitchError::BadRequest { pointer, message } => {
                violation("switch control request", pointer, message)
            }
            SwitchError::BadPayload { pointer, message } => {
                violation("payload for kind `switch`", pointer, message)
            }
            SwitchError::OffGrid { .. } => {
                violation("switch control request", "/cutover", &message)
            }
            _ if is_transient(&e) => Error::transient_from(message, e),
            _ => Error::permanent_from(message, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(e: SwitchError) -> (bool, Error) {
        (is_transient(&e), Error::from(e))
    }

    fn pointer_of(e: &Error) -> &str {
        match e {
            Error::Validation(v) => &v.violations[0].pointer,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn bad_request_is_permanent_and_names_the_field() {
        let (t, e) = class(SwitchError::BadRequest {
            pointer: "/who".into(),
            message: "required".into(),
        });
        assert!(!t && !e.is_transient());
        assert_eq!(pointer_of(&e), "/who");
    }

    #[test]
    fn bad_payload_is_permanent_and_names_the_field() {
        let (t, e) = class(SwitchError::BadPayload {
            pointer: "/interval_start".into(),
            message: "not a time".into(),
        });
        assert!(!t && !e.is_transient());
        assert_eq!(pointer_of(&e), "/interval_start");
    }

    #[test]
    fn off_grid_is_permanent_at_cutover_and_names_the_grid_points() {
        let (t, e) = class(SwitchError::OffGrid {
            cutover: 90_000,
            grid_ms: 60_000,
            below: 60_000,
            above: 120_000,
        });
        assert!(!t);
        assert_eq!(pointer_of(&e), "/cutover");
        let text = e.to_string();
        assert!(text.contains("1970-01-01T00:01:00Z") && text.contains("1970-01-01T00:02:00Z"));
    }

    #[test]
    fn before_dispatched_is_permanent() {
        let (t, e) = class(SwitchError::BeforeDispatched {
            cutover: 0,
            interval: Interval::new(0, 60_000),
        });
        assert!(!t && !e.is_transient());
        assert!(
            e.to_string().contains("at or after 1970-01-01T00:01:00Z"),
            "{e}"
        );
    }

    #[test]
    fn after_dispatched_is_permanent() {
        let (t, e) = class(SwitchError::AfterDispatched {
            cutover: None,
            interval: Interval::new(60_000, 15_000),
        });
        assert!(!t && !e.is_transient());
        assert!(
            e.to_string().starts_with("clearing the cutover refused"),
            "{e}"
        );
    }

    #[test]
    fn straddles_is_permanent() {
        let (t, e) = class(SwitchError::Straddles {
            interval: Interval::new(30_000, 60_000),
            cutover: 60_000,
        });
        assert!(!t && !e.is_transient());
        assert!(e.to_string().contains("belongs to neither side"));
    }

    #[test]
    fn handle_is_permanent() {
        let (t, e) = class(SwitchError::Handle("no side".into()));
        assert!(!t && !e.is_transient());
    }
}
