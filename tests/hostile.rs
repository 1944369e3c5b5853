//! Hostile and unlucky clients over a real socket: slow and idle connections, too many of
//! them, oversized heads, bad bundles from the admin API, and models that must survive a
//! restart. Every wait here is on something the test controls (a metric it reads, a
//! connection it never finishes); timeouts are only failure guards.
mod common;

use common::{png, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TOKEN: &str = "hostile-admin";

fn bundle() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    common::bundle_once(
        &DIR,
        &["--size", "tiny", "--encoder", "tiny", "--seed", "5"],
    )
}

fn start(env: &[(&str, &str)]) -> Server {
    let m = format!("tiny={}", bundle().display());
    Server::start(&["--model", &m], env)
}

fn connect(s: &Server) -> TcpStream {
    let addr = s.url.trim_start_matches("http://");
    let c = TcpStream::connect(addr).unwrap();
    // A failure guard only: every read below ends well before this by construction.
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}

/// One HTTP/1.1 response: status, lower-cased head, body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads one response (headers, then a Content-Length body).
fn read_answer(c: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = c.read(&mut chunk).expect("reading a response");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = c.read(&mut chunk).expect("reading a body");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Answer { status, head, body }
}

/// Reads until the server closes the connection; panics if it does not (the guard above).
fn assert_closed(c: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match c.read(&mut chunk) {
            Ok(0) => return rest,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return rest,
            Err(e) => panic!("{what}: the server kept the connection open ({e})"),
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n")
}

/// A metric read over a keep-alive connection of the test's own.
fn metric(c: &mut TcpStream, name: &str) -> f64 {
    c.write_all(get("/metrics").as_bytes()).unwrap();
    let a = read_answer(c);
    assert_eq!(a.status, 200);
    String::from_utf8_lossy(&a.body)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

/// Reads `name` over `c` until it equals `want` (each read is a request the test makes).
fn until_metric(c: &mut TcpStream, name: &str, want: f64) {
    let t0 = Instant::now();
    while metric(c, name) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name} never became {want}"
        );
        std::thread::yield_now();
    }
}

fn no_error_lines(s: &Server) {
    let log = s.log();
    assert!(
        !log.lines().any(|l| l.contains("ERROR")),
        "routine refusals are not errors:\n{log}"
    );
}

#[test]
fn unfinished_headers_and_idle_keep_alive_connections_are_closed() {
    let s = start(&[("CLIPCAP_HEADER_TIMEOUT_MS", "300")]);
    // Headers that never end.
    let mut slow = connect(&s);
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    assert_closed(&mut slow, "unfinished headers");
    // A finished request, then silence: the keep-alive connection is closed too.
    let mut idle = connect(&s);
    idle.write_all(get("/health").as_bytes()).unwrap();
    let a = read_answer(&mut idle);
    assert_eq!(a.status, 200);
    assert_closed(&mut idle, "idle keep-alive");
    // Neither cost the server anything: it answers as before.
    let mut fresh = connect(&s);
    fresh.write_all(get("/health").as_bytes()).unwrap();
    assert_eq!(read_answer(&mut fresh).status, 200);
}

#[test]
fn a_slow_body_holds_no_request_slot_and_gets_a_json_408() {
    let s = start(&[
        ("CLIPCAP_MAX_INFLIGHT_REQUESTS", "1"),
        ("CLIPCAP_BODY_TIMEOUT_MS", "5000"),
    ]);
    let img = png(64, 48, 3);
    // Headers and a tenth of the body, and never the rest.
    let mut slow = connect(&s);
    write!(
        slow,
        "POST /caption HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {}\r\n\r\n",
        img.len()
    )
    .unwrap();
    slow.write_all(&img[..img.len() / 10]).unwrap();
    let mut probe = connect(&s);
    until_metric(&mut probe, "clipcap_reading_bodies", 1.0);
    // The one request slot is free for a client whose body has arrived.
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/caption?max_tokens=4", s.url))
        .header("content-type", "image/png")
        .body(img.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert_eq!(metric(&mut probe, "clipcap_reading_bodies"), 1.0);
    // The slow one is told, in JSON, and its connection closed.
    let a = read_answer(&mut slow);
    assert_eq!(a.status, 408);
    assert_eq!(a.json()["type"], "body_timeout");
    assert!(a.head.contains("connection: close"), "{}", a.head);
    assert_closed(&mut slow, "after the 408");
    no_error_lines(&s);
}

#[test]
fn connections_over_the_cap_get_a_json_503_and_the_cap_frees_up() {
    // No header timeout: the idle connection stays open until the test drops it.
    let s = start(&[
        ("CLIPCAP_MAX_CONNECTIONS", "2"),
        ("CLIPCAP_HEADER_TIMEOUT_MS", "0"),
    ]);
    let mut probe = connect(&s);
    // The start-up readiness polls' connection may still be closing: wait until the probe is
    // the only one.
    until_metric(&mut probe, "clipcap_open_connections", 1.0);
    let idle = connect(&s);
    until_metric(&mut probe, "clipcap_open_connections", 2.0);
    let mut third = connect(&s);
    third.write_all(get("/health").as_bytes()).unwrap();
    let a = read_answer(&mut third);
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["type"], "unavailable");
    assert!(a.head.contains("retry-after: 1"), "{}", a.head);
    assert_closed(&mut third, "a refused connection");
    assert_eq!(metric(&mut probe, "clipcap_refused_connections_total"), 1.0);
    // One leaves; the next one is served.
    drop(idle);
    until_metric(&mut probe, "clipcap_open_connections", 1.0);
    let mut next = connect(&s);
    next.write_all(get("/health").as_bytes()).unwrap();
    assert_eq!(read_answer(&mut next).status, 200);
    no_error_lines(&s);
}

#[test]
fn oversized_heads_targets_and_admin_bodies_get_json_errors() {
    let s = start(&[
        ("CLIPCAP_ADMIN_TOKEN", TOKEN),
        ("CLIPCAP_MAX_BODY_BYTES", "100000"),
    ]);
    for (size, what) in [(20 * 1024, "20 KiB"), (128 * 1024, "128 KiB")] {
        let mut c = connect(&s);
        write!(
            c,
            "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(size)
        )
        .unwrap();
        let a = read_answer(&mut c);
        assert_eq!(a.status, 431, "{what} header");
        assert_eq!(a.json()["type"], "headers_too_large", "{what}");
    }
    let mut c = connect(&s);
    c.write_all(get(&format!("/health?{}", "q".repeat(10_000))).as_bytes())
        .unwrap();
    let a = read_answer(&mut c);
    assert_eq!(a.status, 414);
    assert_eq!(a.json()["type"], "uri_too_long");
    // Under the cap, headers pass as before.
    let mut c = connect(&s);
    write!(
        c,
        "GET /health HTTP/1.1\r\nhost: x\r\nx-ok: {}\r\n\r\n",
        "a".repeat(8000)
    )
    .unwrap();
    assert_eq!(read_answer(&mut c).status, 200);
    // An admin body announced over max_body_bytes: refused before it is read, in JSON like
    // every other error (the body is never sent, so the answer cannot race it).
    let mut c = connect(&s);
    write!(
        c,
        "POST /admin/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: 200000\r\n\r\n"
    )
    .unwrap();
    let a = read_answer(&mut c);
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["type"], "too_large");
    no_error_lines(&s);
}

/// A copy of the test bundle whose manifest `edit` changes.
fn bundle_copy(root: &std::path::Path, name: &str, edit: impl Fn(&mut Value)) -> String {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(bundle()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("clipcap.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    dir.to_str().unwrap().to_string()
}

#[test]
fn bad_bundles_are_refused_with_a_reason_and_never_hang() {
    let s = start(&[("CLIPCAP_ADMIN_TOKEN", TOKEN)]);
    let root = tempfile::tempdir().unwrap();
    let huge = bundle_copy(root.path(), "huge", |m| {
        m["gpt2"]["vocab_size"] = json!(1u64 << 30)
    });
    let big = bundle_copy(root.path(), "big", |m| {
        m["gpt2"]["vocab_size"] = json!(1u64 << 19)
    });
    let pipe = bundle_copy(root.path(), "pipe", |_| {});
    let manifest = std::path::Path::new(&pipe).join("clipcap.json");
    std::fs::remove_file(&manifest).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&manifest)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    for (dir, reason) in [
        (&huge, "vocab_size is 1073741824; at most 1048576"),
        (&big, "needs at least"),
        (&pipe, "is not a regular file"),
    ] {
        let r = c
            .post(format!("{}/admin/models", s.url))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "bad", "path": dir}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 422, "{dir}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["field"], "path");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(reason), "{dir}: {msg}");
        assert!(msg.len() < 1000, "a reason, not a backtrace: {msg}");
    }
    // A large admin body under max_body_bytes reaches the handler (no framework limit of its
    // own): a JSON 400 for the bad JSON, not a plain-text 413.
    let r = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().unwrap()["type"], "malformed_request");
    // Still serving the good model.
    let r = c
        .post(format!("{}/caption?max_tokens=3", s.url))
        .header("content-type", "image/png")
        .body(png(40, 40, 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn models_loaded_at_run_time_are_served_again_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let record = root.path().join("served.json");
    let record = record.to_str().unwrap();
    let second = bundle_copy(root.path(), "second", |m| m["name"] = json!("second"));
    let env = [
        ("CLIPCAP_ADMIN_TOKEN", TOKEN),
        ("CLIPCAP_SERVED_RECORD", record),
    ];
    let models = |s: &Server| -> Vec<String> {
        let v: Value = reqwest::blocking::Client::new()
            .get(format!("{}/info", s.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mut names: Vec<String> = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names.push(format!("default={}", v["default_model"].as_str().unwrap()));
        names
    };
    let c = reqwest::blocking::Client::new();
    {
        let s = start(&env);
        let r = c
            .post(format!("{}/admin/models", s.url))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "second", "path": second, "default": true}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().unwrap()["recorded"], true);
        assert_eq!(models(&s), ["second", "tiny", "default=second"]);
    }
    {
        let s = start(&env);
        assert_eq!(models(&s), ["second", "tiny", "default=second"]);
        let r = c
            .delete(format!("{}/admin/models/second", s.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let s = start(&env);
    assert_eq!(models(&s), ["tiny", "default=tiny"]);
}

#[test]
fn refusals_are_not_logged_as_errors_and_slow_loads_are_refused() {
    // A deadline no caption can meet, and a load time no bundle can meet.
    let s = start(&[
        ("CLIPCAP_ADMIN_TOKEN", TOKEN),
        ("CLIPCAP_REQUEST_TIMEOUT_MS", "1"),
        ("CLIPCAP_LOAD_TIMEOUT_MS", "1"),
    ]);
    let c = reqwest::blocking::Client::new();
    let r = c
        .post(format!("{}/caption", s.url))
        .header("content-type", "image/png")
        .body(png(64, 64, 2))
        .send()
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().unwrap()["type"], "deadline_exceeded");
    let r = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "slow", "path": bundle()}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("did not load within 1 ms"),
        "{v}"
    );
    // The access log has both; neither is an ERROR line.
    let log = s.log();
    assert!(log.contains("status=504"), "{log}");
    no_error_lines(&s);
}
