//! `clipcap serve --model-repository`: bundles added, changed, broken and removed while
//! requests run. The healthy model never answers anything but 200; a broken bundle keeps its
//! previous version serving and is reported; half-written folders are never loaded; the
//! poller picks up a change on its own.
use crate::common;

use base64::Engine as _;
use common::Server;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

const TOKEN: &str = "repo-admin-token";

static BUNDLES: OnceLock<tempfile::TempDir> = OnceLock::new();

/// Three tiny bundles with different weights: `one`, `two`, `three`.
fn bundles() -> &'static Path {
    BUNDLES
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            for (name, seed) in [("one", "1"), ("two", "2"), ("three", "3")] {
                common::make_bundle(&d.path().join(name), &["--size", "tiny", "--seed", seed]);
            }
            d
        })
        .path()
}

/// Puts bundle `src` into the repository as `name` the way a publisher should: built in a
/// hidden folder, then renamed in (an old one moved aside first).
fn place(repo: &Path, name: &str, src: &str) {
    let tmp = repo.join(format!(".{name}.incoming"));
    std::fs::create_dir_all(&tmp).unwrap();
    for f in std::fs::read_dir(bundles().join(src)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), tmp.join(f.file_name())).unwrap();
    }
    let target = repo.join(name);
    if target.exists() {
        let aside = repo.join(format!(".{name}.old"));
        std::fs::rename(&target, &aside).unwrap();
        std::fs::rename(&tmp, &target).unwrap();
        std::fs::remove_dir_all(aside).unwrap();
    } else {
        std::fs::rename(&tmp, &target).unwrap();
    }
}

fn image() -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(common::png(32, 24, 9))
    )
}

/// A greedy chat completion from `model` (or the default): its status, caption and the
/// model version that answered (`system_fingerprint` ends in `name/version`).
fn ask(url: &str, model: Option<&str>) -> (u16, String, String) {
    let mut body = json!({
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image()}}]}],
        "max_tokens": 8, "temperature": 0,
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let r = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let version = v["system_fingerprint"]
        .as_str()
        .and_then(|f| f.rsplit(':').next())
        .unwrap_or("")
        .to_string();
    (status, text, version)
}

fn models(url: &str) -> Value {
    reqwest::blocking::get(format!("{url}/v1/models"))
        .unwrap()
        .json()
        .unwrap()
}

fn card<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
}

fn scan(s: &Server) -> Value {
    let (status, report) = s.admin("POST", "/admin/repository/scan", TOKEN);
    assert_eq!(status, 200, "{report}");
    report
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

fn repo_server(repo: &Path, poll: &str) -> Server {
    Server::start(
        &[
            "--model-repository",
            repo.to_str().unwrap(),
            "--poll-interval",
            poll,
            "--role",
            "serve",
        ],
        &[("CLIPCAP_ADMIN_TOKEN", TOKEN)],
    )
}

#[test]
fn bundles_added_changed_broken_and_removed_while_requests_run() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().to_path_buf();
    place(&repo, "a", "one");
    std::fs::write(repo.join("default"), "a\n").unwrap();
    // Scans happen only when the test asks (the poll interval is an hour; the first scan is
    // at start).
    let s = repo_server(&repo, "1h");
    let list = models(&s.url);
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(card(&list, "a").unwrap()["default"], true);
    assert_eq!(card(&list, "a").unwrap()["repository"]["state"], "ready");

    // The healthy model is asked all along, from another thread.
    let (first_status, a_caption, _) = ask(&s.url, Some("a"));
    assert_eq!(first_status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, stop, want) = (s.url.clone(), stop.clone(), a_caption.clone());
        std::thread::spawn(move || {
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, text, version) = ask(&url, Some("a"));
                assert_eq!(
                    (status, text.as_str(), version.as_str()),
                    (200, want.as_str(), "a/1")
                );
                answered += 1;
            }
            answered
        })
    };

    // Added.
    place(&repo, "b", "two");
    let r = scan(&s);
    assert_eq!(names(&r["loaded"]), ["b"], "{r}");
    assert_eq!(names(&r["unchanged"]), ["a"], "{r}");
    let (status, b1, version) = ask(&s.url, Some("b"));
    assert_eq!((status, version.as_str()), (200, "b/1"));
    let fp1 = card(&models(&s.url), "b").unwrap()["repository"]["fingerprint"].clone();

    // The default follows the repository's `default` file.
    std::fs::write(repo.join("default"), "b").unwrap();
    assert_eq!(scan(&s)["default_model"], "b");
    assert_eq!(ask(&s.url, None).2, "b/1");
    std::fs::write(repo.join("default"), "a").unwrap();
    assert_eq!(scan(&s)["default_model"], "a");

    // Changed: another bundle under the same name is a new version.
    place(&repo, "b", "three");
    let r = scan(&s);
    assert_eq!(names(&r["loaded"]), ["b"], "{r}");
    let (status, b2, version) = ask(&s.url, Some("b"));
    assert_eq!((status, version.as_str()), (200, "b/2"));
    let card_b = card(&models(&s.url), "b").unwrap().clone();
    assert_eq!(card_b["version"], 2);
    assert_ne!(card_b["repository"]["fingerprint"], fp1);
    println!("b: {b1:?} -> {b2:?}");

    // Broken in place: reported, and version 2 keeps serving.
    std::fs::write(repo.join("b/model.safetensors"), b"truncated").unwrap();
    let r = scan(&s);
    assert_eq!(names(&r["failed"]), ["b"], "{r}");
    assert_eq!(ask(&s.url, Some("b")), (200, b2.clone(), "b/2".into()));
    let st = card(&models(&s.url), "b").unwrap()["repository"].clone();
    assert_eq!(
        (st["state"].as_str(), st["serving"].as_bool()),
        (Some("failed"), Some(true)),
        "{st}"
    );
    assert!(
        st["error"].as_str().unwrap().contains("model.safetensors"),
        "{st}"
    );
    assert_eq!(
        s.metric("clipcap_repository_load_failures_total{model=\"b\"}"),
        Some(1.0)
    );
    // Not retried until its files change.
    assert_eq!(names(&scan(&s)["failed"]), ["b"]);
    assert_eq!(
        s.metric("clipcap_repository_load_failures_total{model=\"b\"}"),
        Some(1.0)
    );

    // Half-written: a manifest without its files waits; a hidden folder is never read.
    std::fs::create_dir_all(repo.join("c")).unwrap();
    std::fs::copy(
        bundles().join("one/clipcap.json"),
        repo.join("c/clipcap.json"),
    )
    .unwrap();
    place(&repo, ".d.tmp-1-0", "one");
    let r = scan(&s);
    assert_eq!(names(&r["incomplete"]), ["c"], "{r}");
    assert!(!r.to_string().contains(".d.tmp"), "{r}");
    let list = models(&s.url);
    assert!(card(&list, "c").is_none());
    assert_eq!(list["unavailable"][0]["name"], "c", "{list}");
    assert_eq!(list["unavailable"][0]["state"], "incomplete");
    let (status, _, _) = ask(&s.url, Some("c"));
    assert_eq!(status, 404);

    // Removed: gone on two scans in a row, then unloaded.
    std::fs::remove_dir_all(repo.join("b")).unwrap();
    let r = scan(&s);
    assert!(
        names(&r["unloaded"]).is_empty(),
        "one miss is not a removal: {r}"
    );
    assert_eq!(ask(&s.url, Some("b")).0, 200);
    let r = scan(&s);
    assert_eq!(names(&r["unloaded"]), ["b"], "{r}");
    assert_eq!(ask(&s.url, Some("b")).0, 404);

    // This replica serves only: training goes to the trainer.
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/train", s.url))
        .bearer_auth(TOKEN)
        .json(&json!({"dataset": "d", "output": "o"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().unwrap().contains("role"));

    stop.store(true, Ordering::Relaxed);
    let answered = load.join().expect("a request to the healthy model failed");
    assert!(answered >= 1);
    println!("{answered} requests to the healthy model, all 200 with its caption");
}

#[test]
fn the_poller_loads_a_new_bundle_on_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().to_path_buf();
    place(&repo, "a", "one");
    let s = repo_server(&repo, "200ms");
    place(&repo, "b", "two");
    // Bounded wait for the poller (no scan is asked for).
    let t0 = std::time::Instant::now();
    while card(&models(&s.url), "b").is_none() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the poller did not load b:\n{}",
            s.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(ask(&s.url, Some("b")).0, 200);
    assert!(s.metric("clipcap_repository_scans_total").unwrap() >= 2.0);
    let (status, status_body) = s.admin("GET", "/admin/repository", TOKEN);
    assert_eq!(status, 200);
    let states: Vec<(String, String)> = status_body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().into(),
                m["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("a".to_string(), "ready".to_string()),
            ("b".into(), "ready".into())
        ]
    );
    let _: PathBuf = repo;
}
