//! Sentences of the docs that were once contradicted elsewhere, each pinned by a test.

use distributor_core::testing::FakeConfig;
use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_core::*;
use serde_json::json;

/// `ValidationError::violations`: "sorted by pointer (string order), duplicates removed".
#[test]
fn violations_are_sorted_by_pointer_not_in_document_order() {
    let registry = Registry::new().register::<FakeConfig>().unwrap();
    let kind = registry.kind("fake").unwrap();
    // In document order: run_for_ms, pending_for_ms, outcome.
    let e = kind
        .validate_payload(&json!({"run_for_ms": "x", "pending_for_ms": "y", "outcome": 5}))
        .unwrap_err();
    let pointers: Vec<&str> = e.violations.iter().map(|v| v.pointer.as_str()).collect();
    let mut sorted = pointers.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(pointers, sorted);
    assert_eq!(pointers[0], "/outcome", "{pointers:?}");
}

/// `RetryPolicy::attempts(n)`: n attempts in total, the first included.
#[test]
fn attempts_counts_the_first_attempt() {
    let p = RetryPolicy::attempts(2);
    let k = AbnormalKind::Failed;
    assert!(p.allows(k, Attempt(1), &[k]));
    assert!(!p.allows(k, Attempt(2), &[k, k]));
    assert!(!RetryPolicy::default().allows(k, Attempt(1), &[k]));
}

/// `Payloads::fails`: `None` leaves `run_failure_is_failed` out of the trial list.
#[test]
fn no_failing_payload_leaves_the_case_out() {
    let trials = Suite::new::<FakeConfig>(json!({"backend": "doc-contracts"}))
        .payloads(Payloads {
            succeeds: json!({}),
            fails: None,
            runs_long: json!({"hang": true}),
            invalid: vec![],
        })
        .trials();
    let names: Vec<&str> = trials.iter().map(|t| t.name()).collect();
    assert!(
        !names.contains(&"conformance::fake::run_failure_is_failed"),
        "{names:?}"
    );
    assert!(names.contains(&"conformance::fake::run_reaches_terminal"));
}
