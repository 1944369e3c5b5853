//! The OpenAI-compatible API over real HTTP with tiny models: the official `openai` Python
//! client (tests/openai/client_check.py) against a running server, errors in OpenAI's shape
//! from every layer, and image URLs fetched only from hosts the operator allows.
mod common;
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{Read, Write};

fn bundles() -> (&'static std::path::Path, &'static std::path::Path) {
    static A: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    static B: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    (
        common::bundle_once(&A, &["--size", "tiny", "--seed", "31"]),
        common::bundle_once(&B, &["--size", "tiny", "--seed", "32"]),
    )
}

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn chat(url: &str) -> Value {
    json!({"model": "a", "max_tokens": 6,
           "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
}

fn post(s: &common::Server, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{}{path}", s.url))
        .json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

#[test]
fn the_official_openai_client_gets_what_caption_gives() {
    let (a, b) = bundles();
    let (ma, mb) = (format!("a={}", a.display()), format!("b={}", b.display()));
    let s = common::Server::start(
        &["--model", &ma, "--model", &mb],
        &[("CLIPCAP_API_KEY", "sk-test")],
    );
    let py = common::python();
    let out = std::process::Command::new(&py)
        .arg(common::repo().join("tests/openai/client_check.py"))
        .args([&s.url, "sk-test", "a,b"])
        .output()
        .expect("the test venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client checks failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    print!("{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 6);
    assert!(stdout.contains("all checks passed"));
    // Streams were timed to their first token.
    assert!(
        s.metric("clipcap_time_to_first_token_seconds_count")
            .unwrap()
            >= 6.0,
        "{}",
        s.log()
    );
}

#[test]
fn errors_under_v1_have_openai_shape_from_every_layer() {
    let (a, _) = bundles();
    let m = format!("a={}", a.display());
    let s = common::Server::start(
        &["--model", &m],
        &[("CLIPCAP_API_KEY", "k"), ("CLIPCAP_MAX_BODY_BYTES", "4096")],
    );
    let c = reqwest::blocking::Client::new();
    let shape = |what: &str, r: reqwest::blocking::Response, status: u16| -> Value {
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().unwrap();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e["code"].is_string(),
            "{what}: {v}"
        );
        v
    };
    let png = data_uri(&common::png(32, 32, 1));
    let url = |p: &str| format!("{}{p}", s.url);
    // The API key (auth layer).
    let v = shape("no key", c.get(url("/v1/models")).send().unwrap(), 401);
    assert_eq!(v["error"]["type"], "authentication_error");
    // The request guard: a body over max_body_bytes.
    let big = chat(&format!("data:image/png;base64,{}", "A".repeat(8000)));
    let v = shape(
        "413",
        c.post(url("/v1/chat/completions"))
            .bearer_auth("k")
            .json(&big)
            .send()
            .unwrap(),
        413,
    );
    assert_eq!(v["error"]["code"], "too_large");
    // Routing: no such route, wrong method.
    shape(
        "404",
        c.get(url("/v1/nothing")).bearer_auth("k").send().unwrap(),
        404,
    );
    shape(
        "405",
        c.get(url("/v1/chat/completions"))
            .bearer_auth("k")
            .send()
            .unwrap(),
        405,
    );
    // The handler: not JSON, unknown model, a parameter value out of range, a missing field.
    shape(
        "415",
        c.post(url("/v1/chat/completions"))
            .bearer_auth("k")
            .body("x")
            .send()
            .unwrap(),
        415,
    );
    let mut body = chat(&png);
    body["model"] = json!("nope");
    let v = shape(
        "404 model",
        c.post(url("/v1/chat/completions"))
            .bearer_auth("k")
            .json(&body)
            .send()
            .unwrap(),
        404,
    );
    assert_eq!(
        (v["error"]["param"].as_str(), v["error"]["code"].as_str()),
        (Some("model"), Some("model_not_found"))
    );
    let mut body = chat(&png);
    body["beam_size"] = json!(0);
    let v = shape(
        "422",
        c.post(url("/v1/chat/completions"))
            .bearer_auth("k")
            .json(&body)
            .send()
            .unwrap(),
        422,
    );
    assert_eq!(v["error"]["param"], "beam_size");
    let v = shape(
        "400",
        c.post(url("/v1/chat/completions"))
            .bearer_auth("k")
            .json(&json!({"model": "a"}))
            .send()
            .unwrap(),
        400,
    );
    assert_eq!(v["error"]["param"], "messages");
    // The same refusal on /caption keeps clipcap's own shape.
    let r = c
        .post(url("/caption?beam_size=0"))
        .bearer_auth("k")
        .header("content-type", "image/png")
        .body(common::png(32, 32, 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().unwrap();
    assert_eq!(
        (v["type"].as_str(), v["field"].as_str()),
        (Some("invalid_option"), Some("beam_size")),
        "{v}"
    );
    // And a good request works with the key.
    let (status, v) = post(&s, "/v1/chat/completions", &chat(&png), Some("k"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
}

/// A one-route HTTP server on loopback: `/img.png` is `png`, `/moved` redirects, anything
/// else is 404. Counts the requests it answered.
fn image_host(png: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = vec![];
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = String::from_utf8_lossy(&head).to_string();
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let reply: Vec<u8> = match path.as_str() {
                "/img.png" => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        png.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&png);
                    r
                }
                "/moved" => b"HTTP/1.1 302 Found\r\nlocation: /img.png\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
            };
            let _ = conn.write_all(&reply);
        }
    });
    (format!("127.0.0.1:{}", addr.port()), hits)
}

#[test]
fn image_urls_are_fetched_only_from_allowed_hosts_and_never_from_private_ones_unasked() {
    let (a, _) = bundles();
    let m = format!("a={}", a.display());
    let png = common::png(40, 30, 4);
    let (host, hits) = image_host(png.clone());
    let img = format!("http://{host}/img.png");
    // Not listed: refused, never fetched.
    let open = common::Server::start(&["--model", &m], &[]);
    let (status, v) = post(&open, "/v1/chat/completions", &chat(&img), None);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not fetch images from"),
        "{v}"
    );
    // Listed, but loopback: still refused unless the operator allows private addresses.
    let listed = common::Server::start(
        &["--model", &m],
        &[("CLIPCAP_IMAGE_URL_HOSTS", "127.0.0.1")],
    );
    let (status, v) = post(&listed, "/v1/chat/completions", &chat(&img), None);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("non-public address"),
        "{v}"
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was fetched"
    );
    // https is refused with a reason.
    let (status, v) = post(
        &listed,
        "/v1/chat/completions",
        &chat("https://127.0.0.1/x.png"),
        None,
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("https"),
        "{v}"
    );
    // Allowed: the fetched image gets the caption its data: URI gets; redirects are refused.
    let private = common::Server::start(
        &["--model", &m],
        &[
            ("CLIPCAP_IMAGE_URL_HOSTS", "127.0.0.1"),
            ("CLIPCAP_IMAGE_URL_ALLOW_PRIVATE", "true"),
        ],
    );
    let (status, fetched) = post(&private, "/v1/chat/completions", &chat(&img), None);
    assert_eq!(status, 200, "{fetched}\n{}", private.log());
    let (_, inline) = post(
        &private,
        "/v1/chat/completions",
        &chat(&data_uri(&png)),
        None,
    );
    assert_eq!(
        fetched["choices"][0]["message"]["content"],
        inline["choices"][0]["message"]["content"]
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    for (path, why) in [("/moved", "redirect"), ("/gone.png", "404")] {
        let url = format!("http://{host}{path}");
        let (status, v) = post(&private, "/v1/chat/completions", &chat(&url), None);
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(why),
            "{path}: {v}"
        );
    }
}
