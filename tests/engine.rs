//! The engine in-process, with a tiny random bundle: continuous batching changes no caption,
//! cancellation frees rows, swaps and unloads under load, worker failures, deadlines, client
//! disconnects and graceful drain — each made deterministic by a hold on the worker that the
//! test controls (`Engine::hold`), never by sleeping.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::config::Config;
use clipcap::engine::{Engine, Fault};
use clipcap::generate::{caption_embeddings, Caption, Decoder};
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use clipcap::serve::{metrics::HttpMetrics, AppState};
use common::png;
use reqwest::blocking::Client;
use serde_json::Value;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn bundle_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    common::bundle_once(
        &DIR,
        &["--size", "tiny", "--encoder", "tiny", "--seed", "23"],
    )
}

fn embeddings(n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, 32], (Kind::Float, Device::Cpu))
}

fn tokens(caps: &[Caption]) -> Vec<Vec<i64>> {
    caps.iter().map(|c| c.tokens.clone()).collect()
}

/// Runs `dec` to the end, collecting every finished image's tokens by id.
fn drain(dec: &mut Decoder, out: &mut std::collections::BTreeMap<u64, Vec<Vec<i64>>>) {
    while !dec.is_empty() {
        for f in dec.step().unwrap() {
            out.insert(f.id, tokens(&f.captions));
        }
    }
}

fn opts(strategy: Strategy, extra: impl FnOnce(&mut GenOptions)) -> GenOptions {
    let mut o = GenOptions {
        strategy,
        max_tokens: 14,
        beam_size: 3,
        ..Default::default()
    };
    extra(&mut o);
    o
}

#[test]
fn joining_a_running_decode_changes_no_caption() {
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let first = embeddings(3, 1);
    let late = embeddings(4, 2);
    let cases = [
        ("beam", opts(Strategy::Beam, |_| {})),
        ("greedy", opts(Strategy::Greedy, |_| {})),
        (
            "sample",
            opts(Strategy::Sample, |o| {
                o.seed = Some(7);
                o.n = 2;
                o.temperature = 1.5;
            }),
        ),
    ];
    for (name, o) in &cases {
        // Mixed cohorts: the running images decode with other options than the newcomers.
        for running in [o.clone(), opts(Strategy::Beam, |x| x.beam_size = 2)] {
            let alone_first = caption_embeddings(b.clone(), &first, &running).unwrap();
            let alone_late = caption_embeddings(b.clone(), &late, o).unwrap();
            let mut dec = Decoder::new(b.clone());
            let mut got = std::collections::BTreeMap::new();
            dec.add(&first, &running, vec![0, 1, 2]).unwrap();
            for _ in 0..4 {
                for f in dec.step().unwrap() {
                    got.insert(f.id, tokens(&f.captions));
                }
            }
            let rows_before = dec.rows();
            dec.add(&late, o, vec![10, 11, 12, 13]).unwrap();
            assert!(
                dec.rows() > rows_before,
                "{name}: the newcomers joined the batch"
            );
            drain(&mut dec, &mut got);
            for i in 0..3 {
                assert_eq!(
                    got[&(i as u64)],
                    tokens(&alone_first[i]),
                    "{name}: running image {i}"
                );
            }
            for i in 0..4 {
                assert_eq!(
                    got[&(10 + i as u64)],
                    tokens(&alone_late[i]),
                    "{name}: image {i} that joined mid-decode"
                );
            }
        }
    }
}

/// Images that join later with the same options run in the cohort already decoding (one set
/// of kernels per step), and every caption, score and step count is what it is alone; with a
/// penalty that reads the token history they stay apart, with the same captions.
#[test]
fn later_joiners_with_the_same_options_share_the_running_cohort_and_keep_their_captions() {
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let (first, late) = (embeddings(3, 31), embeddings(2, 32));
    let sample = |o: &mut GenOptions| {
        o.seed = Some(5);
        o.n = 2;
        o.temperature = 1.3;
        o.top_p = 0.9;
    };
    let cases = [
        ("beam", opts(Strategy::Beam, |_| {}), 1),
        ("greedy", opts(Strategy::Greedy, |_| {}), 1),
        ("sample", opts(Strategy::Sample, sample), 1),
        (
            "beam with a repetition penalty",
            opts(Strategy::Beam, |o| o.repetition_penalty = 1.5),
            2,
        ),
    ];
    for (name, o, cohorts) in &cases {
        let alone_first = caption_embeddings(b.clone(), &first, o).unwrap();
        let alone_late = caption_embeddings(b.clone(), &late, o).unwrap();
        let mut dec = Decoder::new(b.clone());
        let mut got = std::collections::BTreeMap::new();
        dec.add(&first, o, vec![0, 1, 2]).unwrap();
        for _ in 0..5 {
            assert!(
                dec.step().unwrap().is_empty(),
                "{name}: nothing ends this early"
            );
        }
        dec.add(&late, o, vec![10, 11]).unwrap();
        for f in dec.step().unwrap() {
            got.insert(f.id, f);
        }
        assert_eq!(dec.images(), 5, "{name}: all five still decoding");
        assert_eq!(dec.cohorts(), *cohorts, "{name}: cohorts after the join");
        while !dec.is_empty() {
            for f in dec.step().unwrap() {
                got.insert(f.id, f);
            }
        }
        let want = alone_first.iter().zip([0u64, 1, 2]);
        for (alone, id) in want.chain(alone_late.iter().zip([10u64, 11])) {
            let f = &got[&id];
            assert_eq!(f.captions.len(), alone.len(), "{name}: image {id}");
            for (x, y) in f.captions.iter().zip(alone) {
                assert_eq!(
                    (&x.text, &x.tokens, x.finish),
                    (&y.text, &y.tokens, y.finish),
                    "{name}: image {id}"
                );
                assert!((x.score - y.score).abs() <= 1e-5, "{name}: image {id}");
            }
            let longest = alone.iter().map(|c| c.tokens.len()).max().unwrap() as i64;
            assert!(
                (longest..=o.max_tokens).contains(&f.steps),
                "{name}: image {id}'s own step count {}",
                f.steps
            );
        }
    }
}

#[test]
fn a_streamed_image_reports_each_token_once_while_others_join() {
    use clipcap::generate::NewImage;
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let (first, late) = (embeddings(1, 21), embeddings(2, 22));
    for strategy in [Strategy::Greedy, Strategy::Sample] {
        let o = opts(strategy, |o| {
            o.max_tokens = 12;
            o.seed = Some(5);
        });
        let mut dec = Decoder::new(b.clone());
        let mut got = std::collections::BTreeMap::new();
        let mut streamed: Vec<i64> = vec![];
        let image = NewImage {
            id: 0,
            seed: o.seed,
            streamed: true,
        };
        let mut turn = |dec: &mut Decoder, done: Vec<clipcap::generate::Finished>| {
            for f in done {
                got.insert(f.id, tokens(&f.captions));
            }
            for s in dec.take_streamed() {
                assert_eq!(s.id, 0, "only image 0 streams");
                streamed.extend(s.tokens);
            }
        };
        dec.join(&first, &o, vec![image]).unwrap();
        for step in 0..8 {
            // Other requests join while image 0 streams: one with its options, one with others.
            if step == 2 {
                dec.add(&late.narrow(0, 0, 1), &o, vec![10]).unwrap();
            }
            if step == 4 {
                let beam = opts(Strategy::Beam, |_| {});
                dec.add(&late.narrow(0, 1, 1), &beam, vec![11]).unwrap();
            }
            let done = dec.step().unwrap();
            turn(&mut dec, done);
        }
        while !dec.is_empty() {
            let done = dec.step().unwrap();
            turn(&mut dec, done);
        }
        let want = &got[&0][0];
        // The stream is the caption, token by token (after a stop token only filler follows).
        let upto = streamed
            .iter()
            .position(|t| b.stop_ids.contains(t))
            .map_or(streamed.len(), |p| p + 1);
        assert_eq!(
            &streamed[..upto],
            want.as_slice(),
            "{strategy:?}: {streamed:?}"
        );
        assert_eq!(got.len(), 3);
    }
}

#[test]
fn cancelling_mid_decode_frees_rows_and_changes_no_other_caption() {
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let clip = embeddings(4, 3);
    let o = opts(Strategy::Beam, |o| o.max_tokens = 20);
    let alone = caption_embeddings(b.clone(), &clip, &o).unwrap();
    let mut dec = Decoder::new(b.clone());
    let mut got = std::collections::BTreeMap::new();
    dec.add(&clip, &o, vec![0, 1, 2, 3]).unwrap();
    dec.step().unwrap();
    let rows = dec.rows();
    dec.cancel(1);
    dec.cancel(3);
    let after = dec.step().unwrap();
    for f in after {
        got.insert(f.id, tokens(&f.captions));
    }
    assert!(
        dec.is_empty() || dec.rows() <= rows - 2 * o.beam_size,
        "the cancelled images' rows are gone ({} of {rows} left)",
        dec.rows()
    );
    drain(&mut dec, &mut got);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        vec![0, 2],
        "no captions for cancelled images"
    );
    assert_eq!(got[&0], tokens(&alone[0]));
    assert_eq!(got[&2], tokens(&alone[2]));
}

/// An in-process server on a real socket, with the test holding its engine.
struct Rig {
    url: String,
    engine: Engine,
    state: AppState,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn rig(env: &[(&str, &str)]) -> Rig {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let flags = [
        ("models", toml::Value::Array(vec![])),
        ("device", toml::Value::String("cpu".into())),
        // Nothing recorded in the working folder, nothing read back from it.
        ("served_record", toml::Value::String(String::new())),
    ];
    let cfg = Config::load(None, &env, &flags).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = Arc::new(HttpMetrics::new());
    let engine = clipcap::serve::engine_for(&cfg, &http.registry).unwrap();
    engine.install_blocking("tiny", bundle_dir(), true).unwrap();
    let state = AppState::new(Arc::new(cfg), engine.clone(), http).unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = rt.spawn(clipcap::serve::serve(listener, state.clone(), async {
        let _ = rx.await;
    }));
    Rig {
        url,
        engine,
        state,
        rt,
        stop: Some(tx),
        served: Some(served),
    }
}

impl Rig {
    fn caption(&self, query: &str, seed: u8) -> reqwest::blocking::Response {
        client()
            .post(format!("{}/caption?{query}", self.url))
            .header("content-type", "image/png")
            .body(png(48, 40, seed))
            .send()
            .unwrap()
    }

    fn images(&self, outcome: &str) -> u64 {
        self.engine
            .metrics()
            .images
            .with_label_values(&["tiny", outcome])
            .get()
    }

    /// Sends a caption request from another thread; its status comes back on join.
    fn caption_later(&self, query: &str, seed: u8) -> std::thread::JoinHandle<u16> {
        let url = format!("{}/caption?{query}", self.url);
        std::thread::spawn(move || {
            client()
                .post(url)
                .header("content-type", "image/png")
                .body(png(32, 32, seed))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
    }

    /// Waits (bounded) until `cond` holds; a condition the test observes, not a fixed sleep.
    fn until(&self, what: &str, cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            std::thread::yield_now();
        }
    }

    /// Lets the held worker take exactly the work that reached it, then holds it again.
    fn one_turn(&self, hold: clipcap::engine::Hold) -> clipcap::engine::Hold {
        drop(hold);
        self.engine.hold()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.served.take() {
            let _ = self.rt.block_on(h);
        }
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn ready(r: &Rig) -> (u16, Value) {
    let resp = client().get(format!("{}/ready", r.url)).send().unwrap();
    (resp.status().as_u16(), resp.json().unwrap())
}

#[test]
fn a_panicking_step_fails_its_requests_with_an_opaque_500_and_the_worker_recovers() {
    let r = rig(&[]);
    let before = r.caption("max_tokens=6", 1);
    assert_eq!(before.status(), 200);
    let want: Value = before.json().unwrap();
    r.engine.inject_fault(Fault::PanicInStep);
    let failed = r.caption("max_tokens=6", 1);
    assert_eq!(failed.status(), 500);
    assert!(failed.headers().contains_key("x-request-id"));
    let body: Value = failed.json().unwrap();
    assert_eq!(body["type"], "internal");
    let msg = body["error"].as_str().unwrap();
    assert!(
        !msg.contains("injected") && !msg.contains("panic"),
        "no internals leak: {msg}"
    );
    assert_eq!(r.images("error"), 1);
    // Recovered: the same image gets the same caption, and /ready says so.
    let again: Value = r.caption("max_tokens=6", 1).json().unwrap();
    assert_eq!(
        again["results"][0]["caption"],
        want["results"][0]["caption"]
    );
    assert_eq!(ready(&r).0, 200);
    // A worker that dies is reported: not ready, and new requests get 503, not a hang.
    r.engine.inject_fault(Fault::KillWorker);
    let lost = r.caption("max_tokens=6", 2);
    assert_eq!(lost.status(), 503);
    let (status, body) = ready(&r);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["worker_alive"], false);
    assert_eq!(r.caption("max_tokens=6", 3).status(), 503);
}

#[test]
fn a_deadline_that_passes_in_the_queue_answers_504_and_costs_no_compute() {
    let r = rig(&[("CLIPCAP_REQUEST_TIMEOUT_MS", "300")]);
    let hold = r.engine.hold();
    let resp = r.caption("max_tokens=6", 4);
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["type"], "deadline_exceeded");
    assert_eq!(r.engine.queued(), 1, "it waits in the queue, never started");
    let _hold = r.one_turn(hold);
    assert_eq!(r.images("deadline"), 1);
    assert_eq!(r.images("ok"), 0);
    assert_eq!(r.engine.queued(), 0);
    assert_eq!(
        r.engine.metrics().encode_batch_size.get_sample_count(),
        0,
        "never encoded"
    );
}

#[test]
fn a_client_that_leaves_cancels_its_queued_work() {
    let r = rig(&[]);
    let hold = r.engine.hold();
    let url = format!("{}/caption?max_tokens=6", r.url);
    let task = r.rt.spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "image/png")
            .body(png(48, 40, 5))
            .send()
            .await
    });
    r.until("the request to reach the queue", || {
        r.engine.captions_in_channel() == 1
    });
    task.abort();
    // The handler is dropped when the connection closes: its in-flight slot frees.
    r.until("the server to drop the handler", || {
        r.state.http.inflight.get() == 0
    });
    let _hold = r.one_turn(hold);
    assert_eq!(r.images("cancelled"), 1);
    assert_eq!(r.images("ok"), 0);
}

#[test]
fn swaps_and_unloads_under_load_answer_every_request_on_a_named_version() {
    let r = rig(&[("CLIPCAP_ADMIN_TOKEN", "t0k")]);
    r.engine
        .install_blocking("second", bundle_dir(), false)
        .unwrap();
    // Deterministic part: requests queued before a swap or an unload run on the version they
    // were validated against.
    let hold = r.engine.hold();
    let url = r.url.clone();
    let queued: Vec<_> = [("tiny", 6u8), ("second", 7)]
        .into_iter()
        .map(|(model, seed)| {
            let url = format!("{url}/caption?model={model}&max_tokens=6");
            std::thread::spawn(move || {
                let v: Value = client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(png(48, 40, seed))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                v
            })
        })
        .collect();
    r.until("both requests to queue", || {
        r.engine.captions_in_channel() == 2
    });
    let base = r.engine.commands_waiting();
    let (engine, dir) = (r.engine.clone(), bundle_dir().to_path_buf());
    let swap = std::thread::spawn(move || engine.install_blocking("tiny", &dir, false).unwrap());
    let engine = r.engine.clone();
    let unload = r.rt.spawn(async move { engine.unload("second").await });
    // Both commands wait behind the two requests before the worker goes on.
    r.until("the swap and the unload to queue", || {
        r.engine.commands_waiting() == base + 2
    });
    drop(hold);
    assert_eq!(swap.join().unwrap().version, 2);
    r.rt.block_on(unload).unwrap().unwrap();
    let answers: Vec<Value> = queued.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        (
            answers[0]["model"].as_str(),
            answers[0]["model_version"].as_u64()
        ),
        (Some("tiny"), Some(1))
    );
    assert_eq!(
        (
            answers[1]["model"].as_str(),
            answers[1]["model_version"].as_u64()
        ),
        (Some("second"), Some(1))
    );
    let gone = r.caption("model=second&max_tokens=6", 7);
    assert_eq!(
        gone.status(),
        422,
        "an unloaded model is unknown to new requests"
    );
    // Under load: four clients keep captioning while "tiny" is swapped three more times.
    let clients: Vec<_> = (0..4u8)
        .map(|c| {
            let url = format!("{}/caption?max_tokens=5", r.url);
            std::thread::spawn(move || {
                let http = client();
                (0..12)
                    .map(|i| {
                        let resp = http
                            .post(&url)
                            .header("content-type", "image/png")
                            .body(png(40, 40, c * 16 + i))
                            .send()
                            .unwrap();
                        let status = resp.status().as_u16();
                        let version = resp.headers()["x-clipcap-model"]
                            .to_str()
                            .unwrap()
                            .to_string();
                        let v: Value = resp.json().unwrap();
                        assert_eq!(version, format!("tiny/{}", v["model_version"]));
                        (status, v["model_version"].as_u64().unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for want in 3..=5 {
        let admin = client()
            .post(format!("{}/admin/models", r.url))
            .bearer_auth("t0k")
            .json(&serde_json::json!({"name": "tiny", "path": bundle_dir()}))
            .send()
            .unwrap();
        assert_eq!(admin.status(), 200);
        let v: Value = admin.json().unwrap();
        assert_eq!(v["loaded"]["version"], want);
    }
    for c in clients {
        let seen = c.join().unwrap();
        assert!(seen.iter().all(|(s, _)| *s == 200), "{seen:?}");
        let versions: Vec<u64> = seen.iter().map(|(_, v)| *v).collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "versions only go forward: {versions:?}"
        );
        assert!(versions.iter().all(|v| (2..=5).contains(v)), "{versions:?}");
    }
    let last: Value = r.caption("max_tokens=5", 9).json().unwrap();
    assert_eq!(last["model_version"], 5);
}

#[test]
fn shutdown_refuses_new_connections_and_finishes_what_is_in_flight() {
    let mut r = rig(&[]);
    let hold = r.engine.hold();
    let url = format!("{}/caption?max_tokens=6", r.url);
    let inflight = std::thread::spawn(move || {
        client()
            .post(url)
            .header("content-type", "image/png")
            .body(png(48, 40, 8))
            .send()
            .map(|resp| resp.status().as_u16())
    });
    r.until("the request to queue", || {
        r.engine.captions_in_channel() == 1
    });
    let _ = r.stop.take().unwrap().send(());
    r.until("the server to stop accepting", || {
        Client::new()
            .get(format!("{}/health", r.url))
            .timeout(Duration::from_secs(5))
            .send()
            .is_err()
    });
    assert!(r.state.draining.load(std::sync::atomic::Ordering::Relaxed));
    drop(hold);
    assert_eq!(
        inflight.join().unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );
    let served = r.served.take().unwrap();
    r.rt.block_on(served).unwrap().unwrap();
    assert!(
        !r.engine.readiness().worker_alive,
        "the worker ended with the server"
    );
}

/// The names an "unknown field" error lists as allowed (the handler's own list).
fn allowed_fields(error: &str) -> Vec<String> {
    let list = error
        .split("allowed: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of allowed fields in {error:?}"));
    list.split(',').map(|s| s.trim().to_string()).collect()
}

/// Every property of `schema`, following `$ref`s and `allOf` (flattened types).
fn properties(doc: &Value, schema: &Value) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return properties(doc, &doc["components"]["schemas"][name]);
    }
    let mut out: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        out.extend(properties(doc, part));
    }
    out
}

#[test]
fn the_openapi_document_is_valid_and_names_every_field_the_handlers_accept() {
    let r = rig(&[("CLIPCAP_ADMIN_TOKEN", "t0k")]);
    let doc: Value = client()
        .get(format!("{}/openapi.json", r.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = common::run_python(&["scripts/validate_openapi.py", file.path().to_str().unwrap()]);
    assert!(out.starts_with("valid: OpenAPI 3"), "{out}");

    // /caption: the fields the handler accepts, as it lists them when given an unknown one.
    let refused: Value = r.caption("no_such_option=1", 1).json().unwrap();
    let accepted = allowed_fields(refused["error"].as_str().unwrap());
    assert!(accepted.len() >= 11, "{accepted:?}");
    let post = &doc["paths"]["/caption"]["post"];
    let query: Vec<String> = post["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let content = &post["requestBody"]["content"];
    let json_body = properties(&doc, &content["application/json"]["schema"]);
    let form = properties(&doc, &content["multipart/form-data"]["schema"]);
    for f in &accepted {
        assert!(query.contains(f), "query parameter {f} missing: {query:?}");
        assert!(
            json_body.contains(f),
            "JSON field {f} missing: {json_body:?}"
        );
        assert!(form.contains(f), "form field {f} missing: {form:?}");
    }
    assert!(json_body.contains(&"image".into()) && json_body.contains(&"images".into()));
    assert!(content["image/*"].is_object());
    // Every accepted field, with a valid value, is taken (beam_size by beam search, the
    // sampling fields by sampling).
    let sample = "model=tiny&strategy=sample&max_tokens=5&n=2&temperature=0.9&top_p=0.9&top_k=40\
                  &seed=3&repetition_penalty=1.1&no_repeat_ngram=2&prompt=A%20photo&priority=-1\
                  &timeout=30";
    let beam = "strategy=beam&beam_size=2";
    let mut covered: Vec<&str> = sample
        .split('&')
        .chain(beam.split('&'))
        .map(|kv| kv.split('=').next().unwrap())
        .collect();
    covered.sort();
    covered.dedup();
    let mut want: Vec<&str> = accepted.iter().map(|s| s.as_str()).collect();
    want.sort();
    assert_eq!(covered, want, "the two requests cover every accepted field");
    assert_eq!(r.caption(sample, 1).status(), 200);
    assert_eq!(r.caption(beam, 1).status(), 200);

    // POST /train likewise.
    let refused: Value = client()
        .post(format!("{}/train", r.url))
        .bearer_auth("t0k")
        .json(&serde_json::json!({"dataset": "d", "output": "o", "no_such_field": 1}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(refused["field"], "no_such_field", "{refused}");
    let accepted = allowed_fields(refused["error"].as_str().unwrap());
    assert!(accepted.len() >= 22, "{accepted:?}");
    let train =
        &doc["paths"]["/train"]["post"]["requestBody"]["content"]["application/json"]["schema"];
    let documented = properties(&doc, train);
    for f in &accepted {
        assert!(
            documented.contains(f),
            "POST /train field {f} missing from the document"
        );
    }
    for route in [
        "/health",
        "/ready",
        "/info",
        "/metrics",
        "/admin/models",
        "/train/{id}/resume",
    ] {
        assert!(doc["paths"][route].is_object(), "{route} undocumented");
    }
}

#[test]
fn requests_that_wait_together_share_one_encoder_pass_and_one_decode_batch() {
    let r = rig(&[]);
    let hold = r.engine.hold();
    let url = format!("{}/caption?max_tokens=8&beam_size=3", r.url);
    let clients: Vec<_> = (0..8u8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let v: Value = client()
                    .post(url)
                    .header("content-type", "image/png")
                    .body(png(64, 48, i))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                v["results"][0]["batch_rows"].as_i64().unwrap()
            })
        })
        .collect();
    r.until("eight requests to queue", || {
        r.engine.captions_in_channel() == 8
    });
    drop(hold);
    let rows: Vec<i64> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let enc = &r.engine.metrics().encode_batch_size;
    assert_eq!(
        (enc.get_sample_count(), enc.get_sample_sum()),
        (1, 8.0),
        "one encoder pass of 8"
    );
    assert_eq!(rows, vec![24; 8], "8 images x 3 beams decode as one batch");
}

#[test]
fn overload_is_refused_with_429_and_retry_after_while_the_limit_is_held() {
    let r = rig(&[("CLIPCAP_MAX_INFLIGHT_REQUESTS", "1")]);
    let hold = r.engine.hold();
    let first = r.caption_later("max_tokens=4", 1);
    r.until("the first request to hold the only slot", || {
        r.engine.queued() == 1
    });
    let refused = r.caption("max_tokens=4", 2);
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().unwrap();
    assert_eq!(body["type"], "too_many_requests");
    drop(hold);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        r.caption("max_tokens=4", 3).status(),
        200,
        "the slot is free again"
    );
}

#[test]
fn after_the_grace_period_what_is_left_gets_503_and_the_server_exits() {
    let mut r = rig(&[("CLIPCAP_SHUTDOWN_GRACE_MS", "200")]);
    // Held, the worker cannot finish the request: only the grace period can end it.
    let hold = r.engine.hold();
    let url = format!("{}/caption?max_tokens=6", r.url);
    let inflight = std::thread::spawn(move || {
        let resp = client()
            .post(url)
            .header("content-type", "image/png")
            .body(png(48, 40, 9))
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().unwrap())
    });
    r.until("the request to queue", || {
        r.engine.captions_in_channel() == 1
    });
    let _ = r.stop.take().unwrap().send(());
    let (status, body) = inflight.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "unavailable");
    assert!(
        body["error"].as_str().unwrap().contains("shut down"),
        "{body}"
    );
    drop(hold);
    let served = r.served.take().unwrap();
    r.rt.block_on(served).unwrap().unwrap();
    assert_eq!(r.images("ok"), 0);
}

#[test]
fn a_full_queue_refuses_before_any_image_is_decoded() {
    let r = rig(&[("CLIPCAP_QUEUE_CAPACITY", "1")]);
    let hold = r.engine.hold();
    let first = r.caption_later("max_tokens=4", 1);
    r.until("the first request to take the only place", || {
        r.engine.queued() == 1
    });
    // Not even an image: a server that decoded first would answer 415.
    let refused = client()
        .post(format!("{}/caption", r.url))
        .header("content-type", "image/png")
        .body(b"certainly not a png".to_vec())
        .send()
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    drop(hold);
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(r.engine.queued(), 0, "every place was given back");
    let undecodable = client()
        .post(format!("{}/caption", r.url))
        .header("content-type", "image/png")
        .body(b"certainly not a png".to_vec())
        .send()
        .unwrap();
    assert_eq!(
        undecodable.status(),
        415,
        "with room, the image itself is judged"
    );
    assert_eq!(r.engine.queued(), 0, "a refused image gives its place back");
}

fn admitted(r: &Rig, priority: &str) -> u64 {
    r.engine
        .metrics()
        .admitted
        .with_label_values(&[priority])
        .get()
}

#[test]
fn waiting_requests_start_by_priority_then_arrival() {
    // One image decodes at a time, so the order in which requests start is observable.
    let r = rig(&[("CLIPCAP_MAX_RUNNING_IMAGES", "1")]);
    let hold = r.engine.hold();
    let late = r.caption_later("max_tokens=4&priority=5", 1);
    let normal = r.caption_later("max_tokens=4", 2);
    r.until("two requests in the queue", || {
        r.engine.captions_in_channel() == 2
    });
    let urgent = r.caption_later("max_tokens=4&priority=-3", 3);
    r.until("three requests in the queue", || {
        r.engine.captions_in_channel() == 3
    });
    let mut hold = r.one_turn(hold);
    assert_eq!(
        (admitted(&r, "-3"), admitted(&r, "0"), admitted(&r, "5")),
        (1, 0, 0),
        "the urgent request, sent last, starts first"
    );
    // Turn by turn: priority 0 starts before priority 5.
    let mut turns = 0;
    while admitted(&r, "0") == 0 {
        hold = r.one_turn(hold);
        turns += 1;
        assert!(turns < 100, "the priority-0 request never started");
    }
    assert_eq!(admitted(&r, "5"), 0, "priority 5 waits for priority 0");
    drop(hold);
    for t in [late, normal, urgent] {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert_eq!(admitted(&r, "5"), 1);
}

#[test]
fn a_request_timeout_that_passes_in_the_queue_answers_504_uncomputed() {
    let r = rig(&[]);
    let hold = r.engine.hold();
    // The worker is held: no caption can be ready within the request's own 0.3 s.
    let resp = r.caption("max_tokens=6&timeout=0.3", 4);
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["type"], "deadline_exceeded", "{body}");
    let _hold = r.one_turn(hold);
    assert_eq!(r.images("deadline"), 1);
    assert_eq!(r.images("ok"), 0);
    assert_eq!(admitted(&r, "0"), 0, "never started");
    let bad: Value = r.caption("timeout=0", 4).json().unwrap();
    assert_eq!(bad["field"], "timeout", "{bad}");
    let bad: Value = r.caption("priority=1.5", 4).json().unwrap();
    assert_eq!(bad["field"], "priority", "{bad}");
}

/// A streamed chat request over a raw socket: the request's bytes.
fn stream_request(r: &Rig, max_tokens: u32) -> Vec<u8> {
    use base64::Engine as _;
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png(48, 40, 6))
    );
    let body = serde_json::json!({
        "model": "tiny", "stream": true, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}],
    })
    .to_string();
    let host = r.url.trim_start_matches("http://");
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn a_stream_whose_client_leaves_frees_its_rows() {
    use std::io::{BufRead, Write};
    let r = rig(&[]);
    // Unheld first: this image's greedy caption runs to max_tokens (no stop token), so the
    // streamed request below cannot finish in fewer than 256 steps.
    let whole: Value = client()
        .post(format!("{}/v1/chat/completions", r.url))
        .header("content-type", "application/json")
        .body({
            let raw = String::from_utf8(stream_request(&r, 256)).unwrap();
            raw.split("\r\n\r\n")
                .nth(1)
                .unwrap()
                .replace("\"stream\":true", "\"stream\":false")
        })
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(whole["choices"][0]["finish_reason"], "length", "{whole}");
    assert_eq!(whole["usage"]["completion_tokens"], 256, "{whole}");
    let ok_before = r.images("ok");

    let hold = r.engine.hold();
    let addr = r.url.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    sock.write_all(&stream_request(&r, 256)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = sock.try_clone().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    r.until("the stream to reach the queue", || {
        r.engine.captions_in_channel() == 1
    });
    // Step by step until the first text arrives.
    let mut hold = hold;
    let mut turns = 0;
    let mut lines = vec![];
    while !lines.iter().any(|l: &String| {
        l.starts_with("data:") && l.contains("\"content\":\"") && !l.contains("\"content\":\"\"")
    }) {
        hold = r.one_turn(hold);
        lines.extend(rx.try_iter());
        turns += 1;
        assert!(turns < 100, "no text streamed: {lines:?}");
    }
    assert!(lines[0].starts_with("HTTP/1.1 200"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case("content-type: text/event-stream")),
        "{lines:?}"
    );
    // The client leaves; the request ends cancelled, its rows freed, long before its 256 steps.
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    while r.images("cancelled") == 0 {
        hold = r.one_turn(hold);
        turns += 1;
        assert!(turns < 200, "the stream's rows were never freed");
    }
    drop(hold);
    assert_eq!(r.images("ok"), ok_before, "the stream never finished");
    r.until("the decoder to empty", || {
        r.engine.metrics().requests_running.get() == 0
    });
}

#[test]
fn seeded_images_share_one_cohort_and_keep_the_captions_their_seeds_give() {
    use clipcap::generate::NewImage;
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let clip = embeddings(3, 8);
    let sample = opts(Strategy::Sample, |o| {
        o.n = 2;
        o.max_tokens = 12;
    });
    // Alone, each with its own seed.
    let alone: Vec<Vec<Vec<i64>>> = (0..3)
        .map(|i| {
            let o = GenOptions {
                seed: Some(100 + i as u64),
                ..sample.clone()
            };
            tokens(&caption_embeddings(b.clone(), &clip.narrow(0, i, 1), &o).unwrap()[0])
        })
        .collect();
    // Together: one cohort, the same captions.
    let mut dec = Decoder::new(b.clone());
    let images = (0..3)
        .map(|i| NewImage {
            id: i,
            seed: Some(100 + i),
            streamed: false,
        })
        .collect();
    let mut out = std::collections::BTreeMap::new();
    dec.join(&clip, &sample, images).unwrap();
    assert_eq!(dec.cohorts(), 1);
    drain(&mut dec, &mut out);
    for i in 0..3u64 {
        assert_eq!(out[&i], alone[i as usize], "image {i}");
    }

    // Through the server: three requests with three seeds decode as one cohort.
    let r = rig(&[]);
    let hold = r.engine.hold();
    let later: Vec<_> = (0..3)
        .map(|i| {
            r.caption_later(
                &format!("strategy=sample&seed={}&max_tokens=4", 7 + i),
                i as u8,
            )
        })
        .collect();
    r.until("three requests in the queue", || {
        r.engine.captions_in_channel() == 3
    });
    drop(hold);
    let statuses: Vec<u16> = later.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(statuses, vec![200; 3]);
    let cohorts = &r.engine.metrics().decode_cohorts;
    assert!(cohorts.get_sample_count() > 0);
    assert_eq!(
        cohorts.get_sample_sum(),
        cohorts.get_sample_count() as f64,
        "every step ran one cohort"
    );
    assert_eq!(
        r.engine.metrics().encode_batch_size.get_sample_count(),
        1,
        "one encoder pass for the three"
    );
}

#[test]
fn the_kv_budget_refuses_what_cannot_fit_and_admits_by_bytes() {
    // The tiny model: 2 layers x 64 wide, f32. Beam 3 over 10 + 14 + 1 positions needs
    // 3 x 25 x 2 x 2 x 64 x 4 x 2 (the reorder's spare) = 153 600 bytes per image.
    let r = rig(&[("CLIPCAP_KV_CACHE_BYTES", "250000")]);
    let too_big = r.caption("beam_size=16&max_tokens=200", 1);
    assert_eq!(too_big.status(), 413);
    let body: Value = too_big.json().unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("KV cache"),
        "{body}"
    );
    assert_eq!(r.images("ok"), 0, "refused before any work");
    // Two requests that fit one at a time: the second waits for the first's bytes.
    let hold = r.engine.hold();
    let a = r.caption_later("beam_size=3&max_tokens=14", 2);
    let b = r.caption_later("beam_size=3&max_tokens=14", 3);
    r.until("both in the queue", || r.engine.captions_in_channel() == 2);
    let hold = r.one_turn(hold);
    assert_eq!(
        admitted(&r, "0"),
        1,
        "the second waits for room in the budget"
    );
    drop(hold);
    assert_eq!((a.join().unwrap(), b.join().unwrap()), (200, 200));
    assert_eq!(admitted(&r, "0"), 2);
}

#[test]
fn a_join_that_runs_out_of_memory_fails_alone_and_a_sticky_device_error_goes_unready() {
    let r = rig(&[]);
    // A long request runs; the next one to join runs out of memory.
    let hold = r.engine.hold();
    let long = r.caption_later("max_tokens=40", 1);
    r.until("the long request in the queue", || {
        r.engine.captions_in_channel() == 1
    });
    let hold = r.one_turn(hold);
    assert_eq!(admitted(&r, "0"), 1, "the long request runs");
    r.engine.inject_fault(Fault::OomInJoin);
    let url = format!("{}/caption?max_tokens=4", r.url);
    let joining = std::thread::spawn(move || {
        let resp = client()
            .post(url)
            .header("content-type", "image/png")
            .body(png(40, 32, 2))
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        let retry = resp.headers().contains_key("retry-after");
        (status, retry, resp.json::<Value>().unwrap())
    });
    r.until("the joining request in the queue", || {
        r.engine.captions_in_channel() == 1
    });
    drop(hold);
    let (status, retry, body) = joining.join().unwrap();
    assert_eq!((status, retry), (503, true), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("out of memory"),
        "{body}"
    );
    assert_eq!(long.join().unwrap(), 200, "the running request went on");
    assert_eq!(
        ready(&r).0,
        200,
        "running out of memory once is no reason to go unready"
    );
    assert_eq!(r.caption("max_tokens=4", 3).status(), 200);
    // An error that poisons the device: the running request fails, and the engine says it
    // is not ready (a load balancer stops sending), instead of failing every later request
    // while /ready stays green.
    r.engine.inject_fault(Fault::DeviceErrorInStep);
    assert_eq!(r.caption("max_tokens=4", 4).status(), 500);
    let (status, body) = ready(&r);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["device_error"]
            .as_str()
            .unwrap()
            .contains("illegal memory access"),
        "{body}"
    );
}
