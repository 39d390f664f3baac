//! The conformance suite over the `swarming` adapter, against the fake Swarming server
//! (`swarming-fake`) over loopback HTTP. There is no real Swarming on our machines; the fake
//! follows the public v2 API (see its crate docs).
//!
//! The fake lives for the whole run, on a runtime of its own. Its bots end tasks by tag:
//! `conformance:ok` exits 0 after 50 ms, `conformance:fail` exits 1, `conformance:long` runs
//! until killed. Pushes go to Pub/Sub topic `projects/conformance/topics/swarming`, whose push
//! subscription is the adapter's `push_listen` endpoint on a fixed free port; since every
//! trial builds its own instance on that port, trials run one at a time.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_swarming::SwarmingConfig;
use serde_json::json;
use swarming_fake::{Behaviour, End, FakeSwarming};

const TOPIC: &str = "projects/conformance/topics/swarming";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn main() -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime for the fake");
    let fake = Arc::new(rt.block_on(FakeSwarming::start()).expect("the fake starts"));
    let behaviour = |end| Behaviour {
        run_ms: 50,
        end,
        ..Behaviour::default()
    };
    fake.set_default_behaviour(behaviour(End::Exit(0)));
    fake.behave_for_tag("conformance:fail", behaviour(End::Exit(1)));
    fake.behave_for_tag("conformance:long", behaviour(End::Hang));
    let port = free_port();
    let push_url = format!("http://127.0.0.1:{port}/pubsub")
        .parse()
        .expect("push url");
    fake.subscribe(TOPIC, push_url);

    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "conformance\n").expect("token file");
    let config = json!({
        "url": fake.url().as_str(),
        "token": { "file": token },
        "pool": "default",
        "pubsub_topic": TOPIC,
        "push_listen": format!("127.0.0.1:{port}"),
        "poll_interval_secs": 1,
    });
    let counter = Arc::clone(&fake);
    let code = Suite::new::<SwarmingConfig>(config)
        .payloads(Payloads {
            succeeds: json!({ "command": ["true"], "tags": ["conformance:ok"] }),
            fails: Some(json!({ "command": ["false"], "tags": ["conformance:fail"] })),
            runs_long: json!({ "command": ["sleep", "3600"], "tags": ["conformance:long"] }),
            invalid: vec![
                (json!({ "command": [] }), "/command".into()),
                (json!({ "command": "true" }), "/command".into()),
                (
                    json!({ "command": ["x"], "dimensions": { "pool": "other" } }),
                    "/dimensions/pool".into(),
                ),
                (
                    json!({ "command": ["x"], "priority": 0 }),
                    "/priority".into(),
                ),
                (
                    json!({ "command": ["x"], "tags": ["no-colon"] }),
                    "/tags/0".into(),
                ),
            ],
        })
        .count_starts(move |request_id| {
            let n = counter.tasks_with_tag(&format!("distributor_request_id:{request_id}"));
            async move { n }
        })
        .test_threads(1)
        .timeout(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(20))
        .run_main();
    drop(fake);
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}
