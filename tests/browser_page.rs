//! The browser page end to end in headless Chromium (Debian's, driven by playwright-core):
//! upload an image and see its captions, scores and timings appear in the DOM; with the admin
//! token, see a finished training job and its loss curve drawn.
mod common;

use serde_json::{json, Value};
use std::path::Path;

/// Runs tests/browser/page.mjs against `url`; returns what it read from the page.
fn browse(url: &str, image: &Path, shot: &Path, token: Option<&str>) -> Value {
    let mut cmd = std::process::Command::new("node");
    cmd.arg("page.mjs")
        .arg(format!("{url}/"))
        .arg(image)
        .arg(shot);
    if let Some(t) = token {
        cmd.arg(t);
    }
    let out = cmd
        .current_dir(common::repo().join("tests/browser"))
        .output()
        .expect("node (run scripts/setup-system.sh)");
    assert!(
        out.status.success(),
        "browser run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

#[test]
fn page_uploads_an_image_and_shows_captions() {
    let dir = tempfile::tempdir().unwrap();
    common::make_bundle(dir.path(), &["--size", "tiny", "--seed", "21"]);
    let model = format!("tiny={}", dir.path().display());
    let s = common::Server::start(&["--model", &model], &[]);
    let image = dir.path().join("photo.png");
    std::fs::write(&image, common::png(120, 90, 3)).unwrap();
    let shot = dir.path().join("page.png");
    let v = browse(&s.url, &image, &shot, None);
    let captions = v["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 2, "n=2 captions shown: {v}");
    assert!(
        captions
            .iter()
            .all(|c| !c.as_str().unwrap().trim().is_empty()),
        "{v}"
    );
    assert!(
        v["scores"][0].as_str().unwrap().starts_with("score "),
        "{v}"
    );
    let timings: Vec<&str> = v["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        timings.contains(&"total") && timings.contains(&"decode"),
        "{timings:?}"
    );
    assert_eq!(v["error"], "", "{v}");
    assert!(v["jobsError"].as_str().unwrap().starts_with("403"), "{v}");
    // The same caption as the API gives for the same image and options.
    let api: Value = reqwest::blocking::Client::new()
        .post(format!("{}/caption?beam_size=3&n=2", s.url))
        .header("content-type", "image/png")
        .body(std::fs::read(&image).unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        api["results"][0]["captions"][0]["text"],
        captions[0].as_str().unwrap().trim()
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "screenshot written"
    );
}

#[test]
fn page_lists_training_jobs_with_their_loss_curves() {
    const TOKEN: &str = "page-token";
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let base = root.join("base");
    common::make_bundle(&base, &["--size", "tiny", "--seed", "22"]);
    // A four-image dataset, prepared by the real CLI.
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut lines = String::new();
    for i in 0..4u8 {
        std::fs::write(images.join(format!("{i}.png")), common::png(64, 48, i)).unwrap();
        lines.push_str(
            &json!({"image": format!("{i}.png"), "caption": format!("picture number {i}.")})
                .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(images.join("set.jsonl"), lines).unwrap();
    let prepared = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
        .args(["prepare", "--quiet", "--model"])
        .arg(&base)
        .arg("--jsonl")
        .arg(images.join("set.jsonl"))
        .arg("--out")
        .arg(root.join("data/pics"))
        .output()
        .unwrap();
    assert!(prepared.status.success(), "{prepared:?}");
    let model = format!("tiny={}", base.display());
    let s = common::Server::start(
        &[
            "--model",
            &model,
            "--data-root",
            root.join("data").to_str().unwrap(),
        ],
        &[
            ("CLIPCAP_ADMIN_TOKEN", TOKEN),
            ("CLIPCAP_JOBS_DIR", root.join("jobs").to_str().unwrap()),
            ("CLIPCAP_BUNDLES_DIR", root.join("models").to_str().unwrap()),
        ],
    );
    let http = reqwest::blocking::Client::new();
    let started: Value = http
        .post(format!("{}/train", s.url))
        .bearer_auth(TOKEN)
        .json(&json!({"dataset": "pics", "output": "pics-model", "epochs": 3, "batch_size": 2, "warmup": 1}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    let job = s.wait_for_job(TOKEN, &id, 300, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(job["state"], "succeeded", "{job}");

    let image = images.join("0.png");
    let v = browse(&s.url, &image, &root.join("page.png"), Some(TOKEN));
    assert_eq!(v["jobsError"], "", "{v}");
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{v}");
    let line = jobs[0].as_str().unwrap();
    assert!(
        line.starts_with(&format!("{id}: succeeded, epoch 3/3, step 6/6, loss ")),
        "{line}"
    );
    let curve = &v["curves"][0];
    assert_eq!(curve["alt"], format!("loss curve of {id}"), "{v}");
    assert!(
        curve["width"].as_u64().unwrap() >= 200 && curve["height"].as_u64().unwrap() >= 100,
        "loss curve not drawn: {v}"
    );
}
