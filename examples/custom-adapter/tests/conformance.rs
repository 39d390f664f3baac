//! The conformance suite against the `http-get` kind, with a tiny HTTP server in this process:
//! `/ok` answers 200 to a request with the right bearer token (401 without), `/hang` never
//! answers, anything else 404. The server logs each request's `x-request-id`, so the
//! idempotency case counts real requests, not just tokens. The bearer token comes from a file
//! (the config's `auth` is a `Secret`), and outcomes are pushed to the HTTP notification target
//! the suite hands out, so `push_notifications_arrive` tests the HTTP push path.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custom_adapter::HttpGetConfig;
use distributor_core::testing::conformance::{Payloads, Suite};
use serde_json::json;

type Log = Arc<Mutex<Vec<String>>>;

/// The bearer token the server expects; the adapter reads it from a file.
const BEARER: &str = "conformance-bearer";

/// Serves one connection: reads the request head, logs its request id, answers by path.
fn serve(stream: TcpStream, log: &Log) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut line = String::new();
    let mut authorized = false;
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("x-request-id") {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(v.trim().to_owned());
            } else if k.eq_ignore_ascii_case("authorization") {
                authorized = v.trim() == format!("Bearer {BEARER}");
            }
        }
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/ok" if !authorized => ("401 Unauthorized", "no"),
        "/ok" => ("200 OK", "hello"),
        "/hang" => {
            // Hold the connection open without answering; the client's cancel drops it.
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut reader, &mut buf);
            return;
        }
        _ => ("404 Not Found", "no"),
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
}

fn main() -> ExitCode {
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("conformance::http-get: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => {
            eprintln!("conformance::http-get: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log: Log = Arc::default();
    let server_log = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let log = server_log.clone();
            std::thread::spawn(move || serve(stream, &log));
        }
    });
    let secrets = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("conformance::http-get: no temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token_file = secrets.path().join("bearer");
    if let Err(e) = std::fs::write(&token_file, format!("{BEARER}\n")) {
        eprintln!("conformance::http-get: {e}");
        return ExitCode::FAILURE;
    }
    let config = json!({ "timeout_ms": 120_000, "retries": 0, "auth": { "file": token_file } });
    let code = Suite::new::<HttpGetConfig>(config)
        .payloads(Payloads {
            succeeds: json!({ "url": format!("{base}/ok") }),
            fails: Some(json!({ "url": format!("{base}/missing") })),
            runs_long: json!({ "url": format!("{base}/hang") }),
            invalid: vec![
                (json!({}), "/url".into()),
                (json!({ "url": 7 }), "/url".into()),
                (json!({ "url": "not a url" }), "/url".into()),
                (json!({ "url": "ftp://example.com/" }), "/url".into()),
                (
                    json!({ "url": format!("{base}/ok"), "header": {} }),
                    "/header".into(),
                ),
                (
                    json!({ "url": format!("{base}/ok"), "expect_status": 99 }),
                    "/expect_status".into(),
                ),
            ],
        })
        .count_starts(move |request_id| {
            let n = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|r| *r == request_id.as_str())
                .count();
            async move { n }
        })
        .timeout(Duration::from_secs(30))
        .poll_interval(Duration::from_millis(20))
        .run_main();
    drop(secrets);
    code
}
