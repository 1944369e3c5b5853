//! The browser page end to end in headless Chromium (Debian's, driven by playwright-core):
//! upload two images and see their captions, scores and timings appear in the DOM (a progress
//! bar while waiting); the model's provenance; no admin section without admin routes; with
//! the admin token, a finished training job and its loss curve drawn, and a job started,
//! cancelled and resumed with the page's own form and buttons.
mod common;

use serde_json::{json, Value};
use std::path::Path;

/// Runs tests/browser/page.mjs against `url`; returns what it read from the page.
fn browse(
    url: &str,
    image: &Path,
    shot: &Path,
    token: Option<&str>,
    dataset: Option<&str>,
) -> Value {
    let mut cmd = std::process::Command::new("node");
    cmd.arg("page.mjs")
        .arg(format!("{url}/"))
        .arg(image)
        .arg(shot);
    if let Some(t) = token {
        cmd.arg(t);
    }
    if let Some(d) = dataset {
        cmd.arg(d);
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
    let v = browse(&s.url, &image, &shot, None, None);
    // Two files in one request: two results, each with n=2 captions, the same for the same
    // image; a progress bar while waiting; sampling controls only for sampling.
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{v}");
    assert_eq!(results[0]["name"], "photo.png");
    assert_eq!(results[0]["captions"], results[1]["captions"], "{v}");
    assert_eq!(v["busyShown"], true);
    assert_eq!(v["samplingEnabled"], true);
    assert_eq!(v["samplingDisabledForBeam"], true);
    // Where the model comes from, and no admin section on a server without admin routes.
    assert!(
        v["provenance"].as_str().unwrap().contains("random weights"),
        "{v}"
    );
    assert_eq!(v["noticeShown"], false);
    assert_eq!(v["adminShown"], false, "{v}");
    let captions = results[0]["captions"].as_array().unwrap();
    assert_eq!(captions.len(), 2, "n=2 captions shown: {v}");
    assert!(
        captions
            .iter()
            .all(|c| !c.as_str().unwrap().trim().is_empty()),
        "{v}"
    );
    assert!(
        results[0]["scores"][0]
            .as_str()
            .unwrap()
            .starts_with("score "),
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
    // The same caption as the API gives for the same image and options.
    let api: Value = reqwest::blocking::Client::new()
        .post(format!(
            "{}/caption?beam_size=3&n=2&prompt=A%20photo%20of",
            s.url
        ))
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
    // The page's "Begins with" field is the caption's beginning.
    assert!(
        captions[0].as_str().unwrap().starts_with("A photo of"),
        "{v}"
    );
    // The API section names the OpenAI-compatible routes, with this server's address.
    let api_text = v["api"].as_str().unwrap();
    for route in [
        "/v1/chat/completions",
        "/v1/models",
        "/caption",
        "/openapi.json",
    ] {
        assert!(api_text.contains(route), "{route}: {api_text}");
    }
    assert!(
        api_text.contains(&format!("\"{}/v1\"", s.url)) && api_text.contains("\"tiny\""),
        "{api_text}"
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
    // A bundle with a notice for its users, as the demo bundle has.
    let manifest = base.join("clipcap.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["provenance"]["notice"] = json!("knows four test pictures only");
    std::fs::write(&manifest, m.to_string()).unwrap();
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

    // The loss curve: the token or the signed link opens it; nothing else does.
    let svg_url = |auth: Option<&str>, url: &str| {
        let mut r = http.get(format!("{}{url}", s.url));
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    let listed = s.job(TOKEN, &id);
    let signed = listed["loss_svg_url"].as_str().unwrap().to_string();
    assert!(
        signed.contains("expires=") && signed.contains("&sig="),
        "{signed}"
    );
    let plain = format!("/train/{id}/loss.svg");
    assert_eq!(svg_url(None, &signed), 200);
    assert_eq!(svg_url(Some(TOKEN), &plain), 200);
    assert_eq!(svg_url(None, &plain), 401);
    let tampered = signed.replace(&format!("/train/{id}/"), "/train/other/");
    assert_eq!(svg_url(None, &tampered), 401, "a link signs one job only");
    let expired = {
        let (head, _) = signed.split_once("expires=").unwrap();
        let sig = signed.split("&sig=").nth(1).unwrap();
        format!("{head}expires=1&sig={sig}")
    };
    assert_eq!(svg_url(None, &expired), 401);

    let image = images.join("0.png");
    let v = browse(
        &s.url,
        &image,
        &root.join("page.png"),
        Some(TOKEN),
        Some("pics"),
    );
    assert_eq!(v["adminShown"], true, "{v}");
    assert_eq!(v["noticeShown"], true, "{v}");
    assert_eq!(v["notice"], "Note: knows four test pictures only", "{v}");
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
    // The form started a job, its buttons cancelled and resumed it, and the server agrees.
    let flow: Vec<&str> = v["flow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(flow.len(), 4, "{v}");
    assert_eq!((flow[1], flow[3]), ("cancelled", "cancelled"), "{v}");
    let all = s.admin("GET", "/train", TOKEN).1;
    let started: Vec<&Value> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["output"] == "page-job")
        .collect();
    assert_eq!(started.len(), 1, "{all}");
    let record = s.job(TOKEN, started[0]["id"].as_str().unwrap());
    assert_eq!(record["state"], "cancelled");
    assert_eq!(record["dataset"], "pics");
    assert_eq!(record["epochs"], 5000);
}
