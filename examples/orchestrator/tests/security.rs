//! The `orchestrator serve` binary as a browser, an attacker and a slow client meet it: a
//! cross-origin `text/plain` submit is refused, an unauthenticated one gets 401, the generated
//! token (0600 in a 0700 state directory) works, a world-readable database is refused at start,
//! and SIGTERM stops the server within its shutdown deadline while a client holds half a
//! request open.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
    addr: String,
    token_file: Option<PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("orchestrator.toml");
    std::fs::write(
        &path,
        format!(
            "[distributors.local]\nkind = \"local\"\nstate_dir = \"{0}/state/local\"\n\n\
             [store]\npath = \"{0}/state/engine.db\"\n\n[server]\n{server}\n",
            dir.display()
        ),
    )
    .unwrap();
    path
}

fn command(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    c.arg("--config")
        .arg(config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    c
}

fn start(config: &Path) -> Server {
    let mut child = command(config)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn orchestrator");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        for _ in 0..2 {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("orchestrator did not start");
    let base = line
        .trim()
        .strip_prefix("orchestrator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    let token_file = rx.recv_timeout(Duration::from_secs(5)).ok().and_then(|l| {
        l.trim()
            .strip_prefix("API token (scope admin) in ")
            .and_then(|r| r.split(';').next())
            .map(PathBuf::from)
    });
    let addr = base.trim_start_matches("http://").to_owned();
    Server {
        child,
        base,
        addr,
        token_file,
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn browsers_and_strangers_are_refused_and_the_generated_token_works() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let s = start(&cfg);
    let state = dir.path().join("state");
    let token_file = s
        .token_file
        .clone()
        .expect("the server says where its token is");
    assert_eq!(token_file, state.join("api-token"));
    assert_eq!(mode(&state), 0o700, "state dir");
    assert_eq!(mode(&token_file), 0o600, "token file");
    assert_eq!(mode(&state.join("engine.db")), 0o600, "database");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();

    let http = reqwest::Client::new();
    let url = format!("{}/v1/executions", s.base);
    let script = json!({"distributor": "local", "payload": {"script": "touch pwned"}}).to_string();
    // What `fetch(url, {method: "POST", mode: "no-cors", body})` from another site sends.
    let r = http
        .post(&url)
        .header("content-type", "text/plain;charset=UTF-8")
        .header("origin", "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .body(script.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "cross_origin", "{v}");
    // The same without Origin (a non-browser client) still needs JSON…
    let r = http
        .post(&url)
        .header("content-type", "text/plain")
        .body(script.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // …and a token.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(script.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized", "{v}");
    // DNS rebinding: a foreign Host, even with a valid token.
    let r = http
        .get(&url)
        .header(
            "host",
            format!("evil.example:{}", s.addr.rsplit(':').next().unwrap()),
        )
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden_host", "{v}");
    // Nothing ran.
    let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["executions"], json!([]), "{v}");
    // Public paths need no token.
    let r = http
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The client commands find the token in the state directory.
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--config")
        .arg(&cfg)
        .args(["--server", &s.base, "list", "--json"])
        .env_remove("ORCHESTRATOR_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong token from the environment overrides the file and fails.
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--config")
        .arg(&cfg)
        .args(["--server", &s.base, "list"])
        .env("ORCHESTRATOR_TOKEN", "not-the-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_database_others_can_read_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let db = state.join("engine.db");
    std::fs::write(&db, "").unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = command(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("accessible to other users") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_the_server_within_its_deadline_while_a_request_is_half_sent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "header_timeout = \"10m\"\nbody_timeout = \"10m\"\nshutdown_grace = \"1s\"",
    );
    let mut s = start(&cfg);
    // Half a request: headers never finished.
    let mut slow = std::net::TcpStream::connect(&s.addr).unwrap();
    slow.write_all(b"POST /v1/executions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        .unwrap();
    // And one with headers but half a body.
    let mut slow_body = std::net::TcpStream::connect(&s.addr).unwrap();
    slow_body
        .write_all(
            b"POST /v1/notify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"execution",
        )
        .unwrap();
    // Let the server see both connections (an answered request proves the accept loop ran
    // past them).
    let mut probe = std::net::TcpStream::connect(&s.addr).unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut probe, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = t0 + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "still running {:?} after SIGTERM with a 1 s shutdown grace",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    drop((slow, slow_body));
}
