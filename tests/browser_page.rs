//! The browser page end to end in headless Chromium (Debian's, driven by playwright-core):
//! upload an image and see its captions, scores and timings appear in the DOM.
mod common;

use serde_json::Value;

#[test]
fn page_uploads_an_image_and_shows_captions() {
    let dir = tempfile::tempdir().unwrap();
    common::make_bundle(dir.path(), &["--size", "tiny", "--seed", "21"]);
    let model = format!("tiny={}", dir.path().display());
    let s = common::Server::start(&["--model", &model], &[]);
    let image = dir.path().join("photo.png");
    std::fs::write(&image, common::png(120, 90, 3)).unwrap();
    let shot = dir.path().join("page.png");
    let out = std::process::Command::new("node")
        .arg("page.mjs")
        .arg(format!("{}/", s.url))
        .arg(&image)
        .arg(&shot)
        .current_dir(common::repo().join("tests/browser"))
        .output()
        .expect("node (run scripts/setup-system.sh)");
    assert!(
        out.status.success(),
        "browser run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
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
