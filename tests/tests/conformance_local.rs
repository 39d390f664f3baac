//! The conformance suite against the `local` kind: real processes on this machine, so no case
//! is ever ignored for want of a backend.

use std::process::ExitCode;
use std::time::Duration;

use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_local::LocalConfig;
use serde_json::json;

fn main() -> ExitCode {
    let state = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("conformance::local: cannot create a state directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Every start of the `succeeds` payload appends its request id here, so the idempotency case
    // can count real starts, not just compare tokens.
    let starts = state.path().join("starts.log");
    let succeeds = format!(
        "echo \"$DISTRIBUTOR_REQUEST_ID\" >> '{}'; echo conformance",
        starts.display()
    );
    let code = Suite::new::<LocalConfig>(json!({
        "state_dir": state.path(),
        "max_parallel": 16,
        "grace_period_ms": 2000,
        "poll_interval_ms": 50,
    }))
    .payloads(Payloads {
        succeeds: json!({ "script": succeeds }),
        fails: Some(json!({ "script": "echo failing >&2; exit 3" })),
        runs_long: json!({ "argv": ["sleep", "120"] }),
        invalid: vec![
            (json!({ "argv": "true" }), "/argv".into()),
            (json!({ "argv": [] }), "/argv".into()),
            (json!({ "argv": ["true"], "comand": "x" }), "/comand".into()),
            (
                json!({ "argv": ["true"], "time_limit_ms": -1 }),
                "/time_limit_ms".into(),
            ),
            (
                json!({ "argv": ["true"], "script": "true" }),
                "/script".into(),
            ),
            (json!({ "env": {} }), "/argv".into()),
        ],
    })
    .count_starts(move |request_id| {
        let n = std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == request_id.as_str())
            .count();
        async move { n }
    })
    .timeout(Duration::from_secs(30))
    .poll_interval(Duration::from_millis(20))
    .run_main();
    drop(state);
    code
}
