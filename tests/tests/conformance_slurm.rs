//! The conformance suite against a real Slurm cluster through slurmrestd.
//!
//! Start one with `eval "$(scripts/engines/slurm.sh start)"` (exports `SLURM_URL`, `SLURM_USER`,
//! `SLURM_JWT`, `SLURM_JOB_DIR`); without `SLURM_URL` every trial is reported ignored.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use distributor_core::RequestId;
use distributor_core::testing::conformance::{Payloads, Suite};
use distributor_slurm::SlurmConfig;
use serde_json::{Value, json};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// How many Slurm jobs carry `request_id` in their comment: one `GET /jobs` over a plain
/// socket (the tests crate has no HTTP client), so the suite checks the MUST of `run`
/// idempotency (one piece of work), not only the SHOULD (same token).
fn jobs_for(request_id: &RequestId) -> usize {
    let marker = format!("distributor:request_id={request_id}");
    let Some(base) = env("SLURM_URL")
        .strip_prefix("http://")
        .map(|s| s.trim_end_matches('/').to_owned())
    else {
        return 0;
    };
    let request = format!(
        "GET /slurm/v0.0.38/jobs HTTP/1.0\r\nHost: {base}\r\nX-SLURM-USER-NAME: {}\r\n\
         X-SLURM-USER-TOKEN: {}\r\nConnection: close\r\n\r\n",
        env("SLURM_USER"),
        env("SLURM_JWT")
    );
    let jobs = TcpStream::connect(&base)
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(request.as_bytes())?;
            read_body(&mut s)
        })
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null);
    jobs["jobs"]
        .as_array()
        .map(|js| {
            js.iter()
                .filter(|j| j["comment"] == marker.as_str())
                .count()
        })
        .unwrap_or(0)
}

/// Reads one HTTP reply and returns its body (`Content-Length` bytes: slurmrestd does not
/// always close the connection after the reply).
fn read_body(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let (head_end, length) = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // slurmrestd 22.05 writes a stray `Connection: Close` after the body: cut at the length.
    buf.truncate(head_end + length);
    Ok(buf.split_off(head_end))
}

fn main() -> ExitCode {
    let unreachable = std::env::var("SLURM_URL").err().map(|_| {
        "SLURM_URL not set: no slurmrestd (run `eval \"$(scripts/engines/slurm.sh start)\"`)"
            .to_string()
    });
    let url = if unreachable.is_some() {
        "http://127.0.0.1:6820".to_owned()
    } else {
        env("SLURM_URL")
    };
    Suite::new::<SlurmConfig>(json!({
        "url": url,
        "user": if unreachable.is_some() { "nobody".to_owned() } else { env("SLURM_USER") },
        "token": { "env": "SLURM_JWT" },
        "working_directory": std::env::var("SLURM_JOB_DIR").unwrap_or_else(|_| "/tmp".into()),
        "poll_interval_secs": 1,
    }))
    .payloads(Payloads {
        succeeds: json!({ "argv": ["echo", "conformance"] }),
        fails: Some(json!({ "script": "#!/bin/sh\nexit 3\n" })),
        runs_long: json!({ "argv": ["sleep", "300"] }),
        invalid: vec![
            (
                json!({ "script": "echo no interpreter line" }),
                "/script".into(),
            ),
            (json!({ "argv": ["true"], "cpus": 0 }), "/cpus".into()),
            (json!({ "argv": "true" }), "/argv".into()),
            (
                json!({ "script": "#!/bin/sh\ntrue\n", "argv": ["true"] }),
                "/argv".into(),
            ),
            (
                json!({ "argv": ["true"], "environment": { "A=B": "x" } }),
                "/environment/A=B".into(),
            ),
        ],
    })
    .count_starts(|request_id| async move {
        tokio::task::spawn_blocking(move || jobs_for(&request_id))
            .await
            .unwrap_or(0)
    })
    .unreachable(unreachable)
    .timeout(Duration::from_secs(60))
    .run_main()
}
