//! The conformance suite against the `switch` kind over two fakes (`before` and `after`), with
//! no cutover set: every task goes to `before`, and the switch must honour the whole contract
//! in front of it (routing across a cutover is tested in `distributors/switch/tests`).

use std::process::ExitCode;
use std::time::Duration;

use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_core::testing::{FakeBackend, FakeConfig};
use distributor_switch::SwitchConfig;
use serde_json::{Value, json};

/// A switch payload around a fake script.
fn wrap(inner: Value) -> Value {
    json!({ "interval_start": "2026-12-02T15:00:00Z", "interval_ms": 15000, "payload": inner })
}

fn main() -> ExitCode {
    let before = format!("conformance-switch-before-{}", std::process::id());
    let after = format!("conformance-switch-after-{}", std::process::id());
    let (b, a) = (FakeBackend::named(&before), FakeBackend::named(&after));
    Suite::new::<SwitchConfig>(json!({
        "grid_secs": 60,
        "before": { "kind": "fake", "backend": before },
        "after": { "kind": "fake", "backend": after },
    }))
    .with_kind::<FakeConfig>()
    .payloads(Payloads {
        succeeds: wrap(
            json!({ "pending_for_ms": 20, "run_for_ms": 50, "outcome": { "outcome": "succeeded", "data": { "exit_code": 0 } } }),
        ),
        fails: Some(wrap(
            json!({ "run_for_ms": 50, "outcome": { "outcome": "abnormal", "kind": "failed", "reason": "exit 1" } }),
        )),
        runs_long: wrap(json!({ "hang": true })),
        invalid: vec![
            (wrap(json!({ "run_for_ms": "soon" })), "/payload/run_for_ms".into()),
            (wrap(json!({ "pushs": "drop" })), "/payload/pushs".into()),
            (json!({ "interval_start": "noon", "payload": {} }), "/interval_start".into()),
            (json!({ "interval_start": true, "payload": {} }), "/interval_start".into()),
            (json!({ "payload": {}, "intervals_ms": 1 }), "/intervals_ms".into()),
            (json!({ "interval_ms": 1 }), "/payload".into()),
        ],
    })
    // Work started on either side counts: exactly one start in total per request id.
    .count_starts(move |request_id| {
        let n = b.starts(&request_id) + a.starts(&request_id);
        async move { n }
    })
    .timeout(Duration::from_secs(10))
    .poll_interval(Duration::from_millis(10))
    .run_main()
}
