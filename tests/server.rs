//! The HTTP server over a real socket with a real (tiny, random) bundle.
mod common;

use base64::Engine;
use common::{png, Server};
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

/// One tiny bundle shared by every test of this file.
fn bundle() -> &'static str {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    common::bundle_once(
        &DIR,
        &["--size", "tiny", "--encoder", "tiny", "--seed", "11"],
    )
    .to_str()
    .unwrap()
}

fn model_arg() -> String {
    format!("tiny={}", bundle())
}

fn start(env: &[(&str, &str)]) -> Server {
    let m = model_arg();
    Server::start(&["--model", &m], env)
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn caption_of(v: &Value, i: usize) -> String {
    v["results"][i]["caption"].as_str().unwrap().to_string()
}

#[test]
fn every_input_form_gives_the_same_caption() {
    let s = start(&[]);
    let c = client();
    let img = png(96, 64, 1);
    let other = png(50, 80, 2);
    // Raw body.
    let r = c
        .post(format!("{}/caption?max_tokens=12", s.url))
        .header("content-type", "image/png")
        .body(img.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let timing = r.headers()["server-timing"].to_str().unwrap().to_string();
    assert!(
        timing.contains("encode;dur=") && timing.contains("decode;dur="),
        "{timing}"
    );
    let raw: Value = r.json().unwrap();
    let want = caption_of(&raw, 0);
    assert!(!want.is_empty());
    assert_eq!(raw["model"], "tiny");
    assert_eq!(raw["results"][0]["captions"].as_array().unwrap().len(), 1);
    // The options come back under the names the request uses.
    let echoed = raw["options"].as_object().unwrap();
    assert_eq!(echoed["n"], 1);
    assert_eq!(echoed["max_tokens"], 12);
    assert!(!echoed.contains_key("n_best"), "{echoed:?}");
    // The request's phases happen one after another inside its total, and the header says
    // the same as the body.
    let t = &raw["timings_ms"];
    let phase = |k: &str| t[k].as_f64().unwrap();
    assert!(phase("decode") > 0.0, "{t}");
    let parts = phase("preprocess") + phase("queue") + phase("encode") + phase("decode");
    assert!(
        parts <= phase("total") + 1e-6,
        "phases {parts} ms within total {t}"
    );
    assert!(
        timing.contains(&format!("decode;dur={:.2}", phase("decode"))),
        "{timing} vs {t}"
    );
    assert_eq!(raw["model_version"], 1);
    // Multipart with two images and an option as a form field.
    let form = multipart::Form::new()
        .part(
            "image",
            multipart::Part::bytes(img.clone()).file_name("a.png"),
        )
        .part(
            "image",
            multipart::Part::bytes(other.clone()).file_name("b.png"),
        )
        .text("max_tokens", "12");
    let v: Value = c
        .post(format!("{}/caption", s.url))
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["images"], 2);
    assert_eq!(caption_of(&v, 0), want, "multipart vs raw");
    // JSON base64, n-best.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&img);
    let v: Value = c
        .post(format!("{}/caption", s.url))
        .json(&json!({"image": b64, "max_tokens": 12, "n": 3}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(caption_of(&v, 0), want, "json vs raw");
    let caps = v["results"][0]["captions"].as_array().unwrap();
    assert_eq!(caps.len(), 3);
    let scores: Vec<f64> = caps.iter().map(|c| c["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "n-best sorted by score: {scores:?}"
    );
    // Greedy matches the command line's greedy caption of the same file; seeded sampling is
    // reproducible and another seed samples differently.
    let g = |q: &str| -> String {
        let v: Value = c
            .post(format!("{}/caption?{q}", s.url))
            .header("content-type", "image/png")
            .body(img.clone())
            .send()
            .unwrap()
            .json()
            .unwrap();
        caption_of(&v, 0)
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &img).unwrap();
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
        .args([
            "caption",
            "--model",
            bundle(),
            "--greedy",
            "--max-tokens",
            "10",
        ])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli_caption = String::from_utf8(cli.stdout).unwrap();
    let cli_caption = cli_caption
        .trim_end_matches('\n')
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(
        g("strategy=greedy&max_tokens=10"),
        cli_caption,
        "HTTP vs CLI greedy"
    );
    let sampled = g("strategy=sample&seed=5&temperature=2&max_tokens=10");
    assert_eq!(
        sampled,
        g("strategy=sample&seed=5&temperature=2&max_tokens=10")
    );
    let others: std::collections::BTreeSet<String> = (6..10)
        .map(|seed| {
            g(&format!(
                "strategy=sample&seed={seed}&temperature=2&max_tokens=10"
            ))
        })
        .collect();
    assert!(
        others.iter().any(|o| *o != sampled),
        "four other seeds all gave {sampled:?}"
    );
}

fn expect_error(r: reqwest::blocking::Response, status: u16, kind: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    let v: Value = r.json().expect("JSON error body");
    assert_eq!(v["type"], kind, "{v}");
    assert!(!v["error"].as_str().unwrap().is_empty());
    v
}

#[test]
fn bad_input_gets_the_right_status() {
    let s = start(&[
        ("CLIPCAP_MAX_BODY_BYTES", "200000"),
        ("CLIPCAP_MAX_IMAGES_PER_REQUEST", "2"),
        ("CLIPCAP_MAX_PIXELS", "1000000"),
    ]);
    let c = client();
    let url = format!("{}/caption", s.url);
    let img = png(64, 64, 3);
    // 400
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .unwrap();
    expect_error(r, 400, "malformed_request");
    let r = c.post(&url).json(&json!({"max_tokens": 5})).send().unwrap();
    expect_error(r, 400, "malformed_request");
    let r = c.post(&url).json(&json!({"image": "***"})).send().unwrap();
    expect_error(r, 400, "malformed_request");
    let r = c
        .post(&url)
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nbroken")
        .send()
        .unwrap();
    expect_error(r, 400, "malformed_request");
    // 413: body, image count, pixels (a 20000x20000 PNG header is tiny).
    let r = c
        .post(&url)
        .header("content-type", "image/png")
        .body(vec![0u8; 300_000])
        .send()
        .unwrap();
    expect_error(r, 413, "too_large");
    let form = multipart::Form::new()
        .part("image", multipart::Part::bytes(img.clone()))
        .part("image", multipart::Part::bytes(img.clone()))
        .part("image", multipart::Part::bytes(img.clone()));
    expect_error(
        c.post(&url).multipart(form).send().unwrap(),
        413,
        "too_large",
    );
    let bomb = png_header(20000, 20000);
    let v = expect_error(
        c.post(&url)
            .header("content-type", "image/png")
            .body(bomb)
            .send()
            .unwrap(),
        413,
        "too_large",
    );
    assert!(v["error"].as_str().unwrap().contains("20000"), "{v}");
    // 415
    let r = c
        .post(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .unwrap();
    expect_error(r, 415, "unsupported_media_type");
    let r = c.post(&url).body(img.clone()).send().unwrap();
    expect_error(r, 415, "unsupported_media_type");
    // 422: options name the field and the range; undecodable image; unknown model.
    let r = c
        .post(format!("{url}?beam_size=0"))
        .header("content-type", "image/png")
        .body(img.clone())
        .send()
        .unwrap();
    let v = expect_error(r, 422, "invalid_option");
    assert_eq!(v["field"], "beam_size");
    assert!(
        v["error"].as_str().unwrap().contains("between 1 and 16"),
        "{v}"
    );
    for (q, field) in [
        ("temperature=-1", "temperature"),
        ("top_p=2", "top_p"),
        ("strategy=fancy", "strategy"),
        ("beams=2", "beams"),
        ("max_tokens=abc", "max_tokens"),
        ("strategy=greedy&n=2", "n"),
        ("model=nope", "model"),
    ] {
        let r = c
            .post(format!("{url}?{q}"))
            .header("content-type", "image/png")
            .body(img.clone())
            .send()
            .unwrap();
        let v = expect_error(r, 422, "invalid_option");
        assert_eq!(v["field"], field, "{q}: {v}");
    }
    let r = c
        .post(&url)
        .header("content-type", "image/jpeg")
        .body(b"\xff\xd8\xff\xe0 not really a jpeg".to_vec())
        .send()
        .unwrap();
    expect_error(r, 422, "invalid_image");
    // Unknown routes and methods are JSON too.
    expect_error(
        c.get(format!("{}/nope", s.url)).send().unwrap(),
        404,
        "not_found",
    );
    expect_error(c.get(&url).send().unwrap(), 405, "method_not_allowed");
    // Still healthy after all that.
    let r = c
        .post(&url)
        .header("content-type", "image/png")
        .body(img)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A valid PNG signature + IHDR claiming `w`×`h`, and nothing else.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&ihdr);
    v.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    v
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn health_ready_info_metrics_openapi_and_request_ids() {
    // A misspelt setting is named in the log, with the one meant.
    let s = start(&[("CLIPCAP_MAX_BATCH_IMAGE", "8")]);
    let c = client();
    let h: Value = c
        .get(format!("{}/health", s.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    let r: Value = c
        .get(format!("{}/ready", s.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["ready"], true);
    let i: Value = c
        .get(format!("{}/info", s.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(i["default_model"], "tiny");
    assert_eq!(i["models"][0]["device"], "cpu");
    assert_eq!(i["models"][0]["dtype"], "f32");
    assert!(i["limits"]["max_pixels"].as_u64().unwrap() > 0);
    let o: Value = c
        .get(format!("{}/openapi.json", s.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(o["paths"]["/caption"]["post"].is_object());
    let page = c.get(format!("{}/", s.url)).send().unwrap().text().unwrap();
    assert!(page.contains("<form") && page.contains("/caption"));
    let r = c
        .post(format!("{}/caption?max_tokens=4", s.url))
        .header("content-type", "image/png")
        .header("x-request-id", "abc-123")
        .body(png(40, 40, 4))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = c.get(format!("{}/health", s.url)).send().unwrap();
    assert!(
        !r.headers()["x-request-id"].is_empty(),
        "an id is made when none is sent"
    );
    let m = c
        .get(format!("{}/metrics", s.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    // No admin token: no training, so no training metrics (whatever ./jobs holds).
    assert!(
        !m.contains("clipcap_train_jobs"),
        "training metrics without training"
    );
    // The log: one access line per request (with its id and the model version), no colour
    // codes when not on a terminal, and the typo warning.
    let log = s.log();
    assert!(!log.contains('\u{1b}'), "ANSI codes in a file log");
    assert!(
        log.lines().any(|l| l.contains("abc-123")
            && l.contains("/caption")
            && l.contains("status=200")
            && l.contains("tiny/1")),
        "no access line for the request:\n{log}"
    );
    assert!(
        log.contains("CLIPCAP_MAX_BATCH_IMAGE is not a setting"),
        "{log}"
    );
    // The effective configuration: one line per section, secrets masked.
    let config: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" configuration "))
        .collect();
    assert_eq!(config.len(), 5, "{log}");
    assert!(
        config.iter().any(|l| l.contains("section=server")
            && l.contains("max_connections=1024")
            && l.contains("header_timeout_ms=10000")),
        "{config:?}"
    );
    assert!(!log.lines().any(|l| l.trim() == "[server]"), "{log}");
    assert!(
        log.contains("did you mean CLIPCAP_MAX_BATCH_IMAGES?"),
        "{log}"
    );
    for name in [
        "clipcap_requests_total{route=\"/caption\",status=\"200\"}",
        "clipcap_request_duration_seconds_bucket",
        "clipcap_queue_duration_seconds_bucket",
        "clipcap_encode_duration_seconds_bucket",
        "clipcap_decode_duration_seconds_bucket",
        "clipcap_encode_batch_size_bucket",
        "clipcap_decode_batch_rows_bucket",
        "clipcap_queue_depth",
        "clipcap_generated_tokens_total",
        "clipcap_inflight_requests",
        "clipcap_model_info{device=\"cpu\",dtype=\"f32\",name=\"tiny\",version=\"1\"} 1",
        "clipcap_process_resident_memory_bytes",
    ] {
        assert!(m.contains(name), "metrics lack {name}");
    }
}

#[test]
fn admin_routes_need_the_token_and_swap_models() {
    // No token configured: admin disabled.
    let s = start(&[]);
    let c = client();
    let body = json!({"name": "second", "path": bundle()});
    let r = c
        .post(format!("{}/admin/models", s.url))
        .json(&body)
        .send()
        .unwrap();
    expect_error(r, 403, "forbidden");
    drop(s);

    let s = start(&[("CLIPCAP_ADMIN_TOKEN", "s3cret")]);
    let r = c
        .post(format!("{}/admin/models", s.url))
        .json(&body)
        .send()
        .unwrap();
    expect_error(r, 401, "unauthorized");
    let r = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .unwrap();
    expect_error(r, 401, "unauthorized");
    let r = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth("s3cret")
        .json(&json!({"name": "second", "path": "/no/such/bundle"}))
        .send()
        .unwrap();
    expect_error(r, 422, "invalid_option");
    let r = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["loaded"]["name"], "second");
    let r: Value = c
        .post(format!("{}/caption?model=second&max_tokens=6", s.url))
        .header("content-type", "image/png")
        .body(png(40, 40, 5))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["model"], "second");
    // Swap "tiny" in place: version 2, still serving.
    let r: Value = c
        .post(format!("{}/admin/models", s.url))
        .bearer_auth("s3cret")
        .json(&json!({"name": "tiny", "path": bundle()}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["loaded"]["version"], 2);
    let r = c
        .delete(format!("{}/admin/models/second", s.url))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .post(format!("{}/caption?model=second", s.url))
        .header("content-type", "image/png")
        .body(png(40, 40, 5))
        .send()
        .unwrap();
    expect_error(r, 422, "invalid_option");
}

#[test]
fn api_key_protects_caption() {
    let s = start(&[("CLIPCAP_API_KEY", "k1")]);
    let c = client();
    let url = format!("{}/caption?max_tokens=4", s.url);
    let send = |header: Option<(&str, &str)>| {
        let mut req = c.post(&url).header("content-type", "image/png");
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        req.body(png(32, 32, 1)).send().unwrap()
    };
    expect_error(send(None), 401, "unauthorized");
    assert_eq!(send(Some(("x-api-key", "k1"))).status(), 200);
    // The scheme is case-insensitive (RFC 7235).
    assert_eq!(send(Some(("authorization", "bearer k1"))).status(), 200);
    // Bundle paths only for callers with the key.
    let info = |key: Option<&str>| -> Value {
        let mut req = c.get(format!("{}/info", s.url));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().unwrap().json().unwrap()
    };
    // The load generator sends the key (and says what the server answered when it is wrong).
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), png(32, 32, 2)).unwrap();
    let bench = |key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
            .args([
                "bench-http",
                "--url",
                &s.url,
                "--concurrency",
                "1",
                "--requests",
                "2",
            ])
            .args([
                "--warmup",
                "1",
                "--query",
                "max_tokens=3",
                "--api",
                "caption,openai",
                "--api-key",
                key,
                "--image",
            ])
            .arg(file.path())
            .output()
            .unwrap()
    };
    let ok = bench("k1");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Both doors, two requests each, no errors.
    for api in ["/caption", "/v1/chat/completions"] {
        assert!(
            out.contains(&format!("| {api} | 1 | 2 | 0 |")),
            "{api}: {out}"
        );
    }
    let wrong = bench("nope");
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(err.contains("401") && err.contains("API key"), "{err}");
    let anonymous = info(None);
    assert_eq!(anonymous["models"][0]["name"], "tiny");
    assert!(anonymous["models"][0].get("dir").is_none(), "{anonymous}");
    assert_eq!(info(Some("k1"))["models"][0]["dir"], bundle());
}

#[test]
fn sigterm_on_an_idle_server_exits_cleanly_and_refuses_new_connections() {
    // Draining in-flight work is covered in-process (tests/engine.rs); this checks the signal.
    let mut s = start(&[]);
    let ok = client()
        .post(format!("{}/caption?max_tokens=4", s.url))
        .header("content-type", "image/png")
        .body(png(32, 32, 7))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    s.terminate();
    let code = s.child.wait().unwrap();
    assert!(code.success(), "exit status {code:?}\n{}", s.log());
    assert!(
        client().get(format!("{}/health", s.url)).send().is_err(),
        "no new connections after shutdown"
    );
}

#[test]
fn the_open_loop_benchmark_sends_a_mixed_schedule_and_reads_the_servers_batches() {
    // Two targets (the same server twice) at a fixed rate: every measured request of every
    // kind answered, the server's decode steps read from /metrics, and a plot of both.
    let s = start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let img = |name: &str, w: u32, seed: u8| {
        let p = dir.path().join(name);
        std::fs::write(&p, png(w, w, seed)).unwrap();
        p
    };
    let (small, large) = (img("a.png", 24, 1), img("b.png", 200, 2));
    let spec = dir.path().join("mix.toml");
    std::fs::write(
        &spec,
        "[[kind]]\nname = \"beam-x3\"\nimages = 3\noptions = { beam_size = 3, max_tokens = 4 }\n\
         [[kind]]\nname = \"greedy\"\noptions = { strategy = \"greedy\", max_tokens = 6 }\n\
         [[kind]]\nname = \"stream\"\napi = \"openai\"\nstream = true\n\
         options = { temperature = 0.9, seed = 3, max_tokens = 5 }\n",
    )
    .unwrap();
    let (json_out, svg_out) = (dir.path().join("sweep.json"), dir.path().join("sweep.svg"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
        .arg("bench-http")
        .args(["--target", &format!("first={}", s.url)])
        .args(["--target", &format!("second={}", s.url)])
        .arg("--spec")
        .arg(&spec)
        .args([
            "--rate",
            "40",
            "--requests",
            "24",
            "--warmup",
            "3",
            "--seed",
            "5",
        ])
        .arg("--image")
        .arg(&small)
        .arg("--image")
        .arg(&large)
        .arg("--out")
        .arg(&json_out)
        .arg("--plot")
        .arg(&svg_out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sweep: Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let levels = sweep["levels"].as_array().unwrap();
    let targets: Vec<&str> = levels
        .iter()
        .map(|l| l["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["first", "second"]);
    for l in levels {
        assert_eq!(
            (l["measured"].as_u64(), l["ok"].as_u64()),
            (Some(24), Some(24)),
            "{l}"
        );
        assert_eq!(l["errors"], json!({}), "{l}");
        assert_eq!(l["offered_rps"], 40.0);
        // All three kinds were drawn (24 draws of three equal weights), each with latencies.
        let kinds: Vec<(&str, u64)> = l["by_kind"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["kind"].as_str().unwrap(),
                    k["latency_ms"]["n"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(kinds.iter().map(|k| k.1).sum::<u64>(), 24, "{kinds:?}");
        assert!(kinds.iter().all(|k| k.1 > 0), "{kinds:?}");
        // Streams had their first text before their end; /caption said its queue time.
        let n_stream = kinds[2].1;
        assert_eq!(l["ttft_ms"]["n"].as_u64(), Some(n_stream));
        assert!(l["ttft_ms"]["p50"].as_f64().unwrap() <= l["latency_ms"]["max"].as_f64().unwrap());
        assert_eq!(l["queue_ms"]["n"].as_u64(), Some(24 - n_stream));
        // The server ran decode steps for these requests, of at least one row each; the
        // three-image kind went through the encoder in one forward at least.
        let server = &l["server"];
        assert!(server["steps"].as_f64().unwrap() >= 4.0, "{server}");
        assert!(
            server["decode_rows_mean"].as_f64().unwrap() >= 1.0,
            "{server}"
        );
        assert!(
            server["encode_batch_mean"].as_f64().unwrap() >= 1.0,
            "{server}"
        );
        // The inference thread's time by phase: decode steps took some.
        assert!(
            server["worker_seconds"]["step"].as_f64().unwrap() > 0.0,
            "{server}"
        );
    }
    assert!(stdout.contains("| – | 40.00 ("), "{stdout}");
    assert!(
        stdout.contains("first kept up with 40.00 req/s"),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&svg_out).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("first p99") && svg.contains("second p50"),
        "{svg}"
    );
}
