//! The conformance suite against the fake kind: proves the suite passes on an adapter that
//! honours the contract (and keeps the fake honest).

use std::process::ExitCode;
use std::time::Duration;

use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_core::testing::{FakeBackend, FakeConfig};
use serde_json::json;

fn main() -> ExitCode {
    let backend = format!("conformance-fake-{}", std::process::id());
    let starts = FakeBackend::named(&backend);
    Suite::new::<FakeConfig>(json!({ "backend": backend }))
        .payloads(Payloads {
            succeeds: json!({ "pending_for_ms": 20, "run_for_ms": 50, "outcome": { "outcome": "succeeded", "data": { "exit_code": 0 } } }),
            fails: Some(json!({ "run_for_ms": 50, "outcome": { "outcome": "abnormal", "kind": "failed", "reason": "exit 1" } })),
            runs_long: json!({ "hang": true }),
            invalid: vec![
                (json!({ "run_for_ms": "soon" }), "/run_for_ms".into()),
                (json!({ "pushs": "drop" }), "/pushs".into()),
                (json!({ "outcome": { "outcome": "abnormal", "kind": "faild" } }), "/outcome/kind".into()),
                (json!({ "permanent_run_error": "" }), "/permanent_run_error".into()),
            ],
        })
        .count_starts(move |request_id| {
            let n = starts.starts(&request_id);
            async move { n }
        })
        .timeout(Duration::from_secs(10))
        .poll_interval(Duration::from_millis(10))
        .run_main()
}
