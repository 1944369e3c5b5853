//! Training end to end: `clipcap prepare` (resumable, skips bad images) and the admin job API
//! over HTTP — the loss falls, the trained bundle is served without a restart and captions its
//! training images with their reference captions, cancel/resume work, a server killed mid-job
//! loses nothing, and bad job specs get 4xx with the field named.
mod common;

use common::Server;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_clipcap");
const TOKEN: &str = "train-token";

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    /// (image path, its caption) of the training set.
    pairs: Vec<(PathBuf, String)>,
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "clipcap {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `clipcap prepare` of the fixture's JSON lines with `model` into `data` (chunks of 5).
fn prepare_args(root: &Path, model: &Path, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "prepare",
        "--model",
        model.to_str().unwrap(),
        "--jsonl",
        root.join("synth/train.jsonl").to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--chunk-size",
        "5",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `run` with owned arguments.
fn run_owned(args: &[String]) -> String {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A tiny base bundle, 16 synthetic images with one caption each (JSON lines, plus one
/// unreadable image), prepared into `data/ds`.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let base = root.join("base");
    common::make_bundle(
        &base,
        &["--size", "tiny", "--seed", "31", "--wte-std", "0.02"],
    );
    let synth = root.join("synth");
    run(&[
        "synth",
        "--out",
        synth.to_str().unwrap(),
        "--images",
        "16",
        "--seed",
        "3",
    ]);
    let coco: Value = serde_json::from_str(
        &std::fs::read_to_string(synth.join("annotations/captions_synth.json")).unwrap(),
    )
    .unwrap();
    let mut pairs = vec![];
    let mut lines = String::new();
    for img in coco["images"].as_array().unwrap() {
        let id = &img["id"];
        let caption = coco["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| &a["image_id"] == id)
            .unwrap()["caption"]
            .as_str()
            .unwrap()
            .to_string();
        let rel = format!("images/{}", img["file_name"].as_str().unwrap());
        lines.push_str(&json!({"image": rel, "caption": caption, "split": "train"}).to_string());
        lines.push('\n');
        pairs.push((synth.join(&rel), caption));
    }
    std::fs::write(
        synth.join("images/broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    lines.push_str(
        &json!({"image": "images/broken.png", "caption": "broken", "split": "train"}).to_string(),
    );
    lines.push('\n');
    std::fs::write(synth.join("train.jsonl"), lines).unwrap();
    let data = root.join("data/ds");
    let out = run_owned(&prepare_args(&root, &base, &data, &[]));
    assert!(out.contains("prepared 16 images, 16 captions"), "{out}");
    assert!(out.contains("1 skipped"), "{out}");
    Fixture {
        _dir: dir,
        root,
        base,
        pairs,
    }
}

fn server(f: &Fixture) -> Server {
    let model = format!("tiny={}", f.base.display());
    trainer(f, &["--model", &model])
}

/// A training server on the fixture's data, jobs and bundle folders, with `args`.
fn trainer(f: &Fixture, args: &[&str]) -> Server {
    let data = f.root.join("data");
    let mut all = vec!["--data-root", data.to_str().unwrap()];
    all.extend_from_slice(args);
    Server::start(
        &all,
        &[
            ("CLIPCAP_ADMIN_TOKEN", TOKEN),
            ("CLIPCAP_JOBS_DIR", f.root.join("jobs").to_str().unwrap()),
            (
                "CLIPCAP_BUNDLES_DIR",
                f.root.join("models").to_str().unwrap(),
            ),
        ],
    )
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn start_job(s: &Server, body: Value) -> String {
    let r = client()
        .post(format!("{}/train", s.url))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap());
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["status_url"],
        format!("/train/{}", v["id"].as_str().unwrap())
    );
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn prepare_resumes_from_finished_chunks() {
    let f = fixture();
    let data = f.root.join("data/ds");
    // Interrupted run: the final files and the last chunk are gone, earlier chunks remain.
    std::fs::remove_file(data.join("embeddings.safetensors")).unwrap();
    std::fs::remove_file(data.join("chunks/chunk_000003.safetensors")).unwrap();
    let out = run_owned(&prepare_args(&f.root, &f.base, &data, &[]));
    assert!(out.contains("(4 chunks, 3 resumed, 1 skipped)"), "{out}");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["images"], 16);
    assert_eq!(meta["embedding_dim"], 32);
    assert!(meta["skipped"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("broken.png"));
    assert_eq!(meta["encoder_sha256"].as_str().unwrap().len(), 64);
    // COCO-format references beside the features: `clipcap score` takes them as they are.
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("references.json")).unwrap())
            .unwrap();
    assert_eq!(refs["images"].as_array().unwrap().len(), 16);
    assert_eq!(refs["annotations"].as_array().unwrap().len(), 16);
    let cands: Vec<Value> = caption_rows(&data)
        .into_iter()
        .map(|(id, _, _, caption)| json!({"image_id": id, "caption": caption}))
        .collect();
    let cands_path = f.root.join("cands.json");
    std::fs::write(&cands_path, serde_json::to_vec(&cands).unwrap()).unwrap();
    let scored = run(&[
        "score",
        "--refs",
        data.join("references.json").to_str().unwrap(),
        "--cands",
        cands_path.to_str().unwrap(),
        "--json",
        "--no-meteor",
    ]);
    let s: Value = serde_json::from_str(&scored).unwrap();
    assert_eq!(s["n_images"], 16);
    assert!(
        s["Bleu_4"].as_f64().unwrap() > 0.99,
        "each caption is its own reference: {s}"
    );
}

/// Rows of `captions.jsonl` as (image id, row, split, caption).
fn caption_rows(data: &Path) -> Vec<(String, i64, String, String)> {
    std::fs::read_to_string(data.join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["image_id"].as_str().unwrap().to_string(),
                v["row"].as_i64().unwrap(),
                v["split"].as_str().unwrap().to_string(),
                v["caption"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn embeddings(data: &Path) -> tch::Tensor {
    clipcap::model::weights::read_safetensors(&data.join("embeddings.safetensors"))
        .unwrap()
        .remove("embeddings")
        .unwrap()
}

/// The two other sources `prepare` reads: COCO annotations restricted and split by a
/// Karpathy file, and the original ClipCap's train_caption.json with COCO file names. The same
/// image gets the same embedding whichever source names it, and once however many captions.
#[test]
fn prepare_reads_coco_with_karpathy_splits_and_clipcap_json() {
    let f = fixture();
    let synth = f.root.join("synth");
    let coco_data = f.root.join("data/coco");
    let out = run(&[
        "prepare",
        "--model",
        f.base.to_str().unwrap(),
        "--images",
        synth.to_str().unwrap(),
        "--coco-captions",
        synth
            .join("annotations/captions_synth.json")
            .to_str()
            .unwrap(),
        "--karpathy",
        synth.join("dataset_coco.json").to_str().unwrap(),
        "--out",
        coco_data.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.contains("prepared 16 images, 80 captions"), "{out}");
    let karpathy: Value =
        serde_json::from_str(&std::fs::read_to_string(synth.join("dataset_coco.json")).unwrap())
            .unwrap();
    let mut want_splits = std::collections::BTreeMap::<String, usize>::new();
    let mut split_of = std::collections::BTreeMap::new();
    for im in karpathy["images"].as_array().unwrap() {
        let split = im["split"].as_str().unwrap().to_string();
        let n = im["sentences"].as_array().unwrap().len();
        *want_splits.entry(split.clone()).or_default() += n;
        split_of.insert(im["cocoid"].to_string(), split);
    }
    let rows = caption_rows(&coco_data);
    assert_eq!(rows.len(), 80);
    let mut got_splits = std::collections::BTreeMap::<String, usize>::new();
    for (id, _, split, _) in &rows {
        *got_splits.entry(split.clone()).or_default() += 1;
        assert_eq!(&split_of[id], split, "image {id}");
    }
    assert_eq!(got_splits, want_splits);
    // Five captions per image, one embedding row per image.
    let rows_of =
        |id: &str| -> Vec<i64> { rows.iter().filter(|r| r.0 == id).map(|r| r.1).collect() };
    assert_eq!(rows_of("0"), vec![rows_of("0")[0]; 5]);
    let coco_emb = embeddings(&coco_data);
    assert_eq!(coco_emb.size(), vec![16, 32]);

    // train_caption.json: COCO file names under train2014/, two captions for one image and an
    // image that does not exist (skipped, not fatal).
    let coco_dir = f.root.join("coco");
    std::fs::create_dir_all(coco_dir.join("train2014")).unwrap();
    let coco: Value = serde_json::from_str(
        &std::fs::read_to_string(synth.join("annotations/captions_synth.json")).unwrap(),
    )
    .unwrap();
    let images = coco["images"].as_array().unwrap();
    let synth_ids: Vec<String> = images[..3].iter().map(|im| im["id"].to_string()).collect();
    for (im, id) in images[..3].iter().zip([101u64, 102, 103]) {
        // Whatever the synthetic file's format, under a .jpg name: the decoder goes by content.
        std::fs::copy(
            synth.join("images").join(im["file_name"].as_str().unwrap()),
            coco_dir.join(format!("train2014/COCO_train2014_{id:012}.jpg")),
        )
        .unwrap();
    }
    let entries = json!([
        {"image_id": 101, "caption": "first caption of image 101."},
        {"image_id": 102, "caption": "a caption of image 102."},
        {"image_id": 101, "caption": "second caption of image 101."},
        {"image_id": 103, "caption": "a caption of image 103."},
        {"image_id": 104, "caption": "no such file."}
    ]);
    let cj = f.root.join("train_caption.json");
    std::fs::write(&cj, entries.to_string()).unwrap();
    let cj_data = f.root.join("data/clipcap");
    let out = run(&[
        "prepare",
        "--model",
        f.base.to_str().unwrap(),
        "--images",
        coco_dir.to_str().unwrap(),
        "--clipcap-json",
        cj.to_str().unwrap(),
        "--out",
        cj_data.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.contains("prepared 3 images, 4 captions"), "{out}");
    assert!(out.contains("1 skipped"), "{out}");
    let rows = caption_rows(&cj_data);
    let r101: Vec<_> = rows.iter().filter(|r| r.0 == "101").collect();
    assert_eq!(r101.len(), 2);
    assert_eq!(r101[0].1, r101[1].1, "one embedding row per image");
    assert!(rows.iter().all(|r| r.2 == "train"));
    let cj_emb = embeddings(&cj_data);
    let coco_row = |id: &str| rows_of(id)[0];
    for (cj_id, synth_id) in ["101", "102", "103"].into_iter().zip(&synth_ids) {
        let mine = rows.iter().find(|r| r.0 == cj_id).unwrap().1;
        let d = f64::try_from(
            (cj_emb.get(mine) - coco_emb.get(coco_row(synth_id)))
                .abs()
                .max(),
        )
        .unwrap();
        assert!(d < 1e-5, "image {cj_id}: embeddings differ by {d}");
    }
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(cj_data.join("meta.json")).unwrap()).unwrap();
    assert!(meta["skipped"][0]["path"]
        .as_str()
        .unwrap()
        .contains("COCO_train2014_000000000104.jpg"));
}

#[test]
fn a_trained_bundle_is_served_and_captions_its_training_images() {
    let f = fixture();
    let s = server(&f);
    let id = start_job(
        &s,
        json!({"dataset": "ds", "output": "trained", "activate": true, "epochs": 200, "batch_size": 8,
               "lr": 0.003, "warmup": 10, "seed": 1}),
    );
    let j = s.wait_for_job(TOKEN, &id, 600, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["activated"], true);
    let hist = j["loss_history"].as_array().unwrap();
    let first = hist.first().unwrap()["loss"].as_f64().unwrap();
    let last = hist.last().unwrap()["loss"].as_f64().unwrap();
    println!("loss {first:.3} -> {last:.3} over {} points", hist.len());
    assert!(last < first / 10.0, "loss did not fall: {first} -> {last}");
    assert_eq!(j["step"], j["total_steps"]);
    // Served without a restart, under its output name.
    let mut exact = 0;
    let mut overlap = 0.0;
    for (path, caption) in &f.pairs {
        let v: Value = client()
            .post(format!(
                "{}/caption?model=trained&strategy=greedy&max_tokens=30",
                s.url
            ))
            .header("content-type", "image/png")
            .body(std::fs::read(path).unwrap())
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["model"], "trained");
        let got = v["results"][0]["caption"].as_str().unwrap();
        exact += (got.trim() == caption.trim()) as usize;
        overlap += jaccard(got, caption);
    }
    let n = f.pairs.len();
    let overlap = overlap / n as f64;
    println!("{exact}/{n} training images captioned with their exact reference; mean word overlap {overlap:.3}");
    assert!(exact * 8 >= n * 5, "only {exact}/{n} exact");
    assert!(overlap >= 0.85, "mean word overlap {overlap}");
    let svg = client()
        .get(format!("{}/train/{id}/loss.svg", s.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    assert!(svg.text().unwrap().contains("<polyline"));
    let list = s.admin("GET", "/train", TOKEN).1;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert!(s.metric("clipcap_train_jobs{state=\"succeeded\"}").unwrap() >= 1.0);
    // The trained bundle in int8 (`--dtype int8`) captions its training images as f32 does,
    // on most of them.
    let captions = |dtype: &str| -> Vec<String> {
        let mut args: Vec<String> = [
            "caption",
            "--greedy",
            "--max-tokens",
            "30",
            "--dtype",
            dtype,
            "--model",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(f.root.join("models/trained").display().to_string());
        args.extend(f.pairs.iter().map(|(p, _)| p.display().to_string()));
        run_owned(&args)
            .lines()
            .map(|l| l.split('\t').nth(1).unwrap_or("").to_string())
            .collect()
    };
    let (full, int8) = (captions("f32"), captions("int8"));
    assert_eq!(full.len(), n);
    let same = full.iter().zip(&int8).filter(|(a, b)| a == b).count();
    println!("int8: {same}/{n} captions identical to f32");
    assert!(
        same * 4 >= n * 3,
        "only {same}/{n} int8 captions equal f32's:\n{full:?}\n{int8:?}"
    );
    // The bundle on disk is complete.
    let b = f.root.join("models/trained");
    for file in [
        "clipcap.json",
        "clip_image.pt",
        "model.safetensors",
        "tokenizer.json",
    ] {
        assert!(b.join(file).exists(), "{file}");
    }
}

/// Word-set Jaccard similarity of two captions.
fn jaccard(a: &str, b: &str) -> f64 {
    let words = |s: &str| -> std::collections::HashSet<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (a, b) = (words(a), words(b));
    a.intersection(&b).count() as f64 / a.union(&b).count().max(1) as f64
}

#[test]
fn cancel_resume_and_restart_mid_job() {
    let f = fixture();
    let mut s = server(&f);
    let body = json!({"dataset": "ds", "output": "long", "epochs": 400, "batch_size": 8, "lr": 0.001,
                      "warmup": 0, "save_every": 4});
    let id = start_job(&s, body);
    s.wait_for_job(TOKEN, &id, 120, |j| j["step"].as_i64().unwrap_or(0) >= 6);
    assert_eq!(s.admin("DELETE", &format!("/train/{id}"), TOKEN).0, 200);
    let j = s.wait_for_job(TOKEN, &id, 60, |j| j["state"] == "cancelled");
    let cancelled_at = j["step"].as_i64().unwrap();
    // Finished jobs cannot be cancelled again; unknown ones are 404.
    assert_eq!(s.admin("DELETE", &format!("/train/{id}"), TOKEN).0, 409);
    assert_eq!(s.admin("DELETE", "/train/nope", TOKEN).0, 404);
    // Resume continues from the checkpoint, not from step 0.
    assert_eq!(
        s.admin("POST", &format!("/train/{id}/resume"), TOKEN).0,
        202
    );
    let j = s.wait_for_job(TOKEN, &id, 120, |j| {
        j["state"] == "running" && j["step"].as_i64().unwrap() > cancelled_at + 8
    });
    assert!(j["runs"].as_i64().unwrap() == 2);
    // Kill the server mid-job (no graceful shutdown), start it again.
    let before_kill = j["loss_history"].as_array().unwrap().len();
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let s2 = server(&f);
    let j = s2.job(TOKEN, &id);
    assert_eq!(j["state"], "interrupted", "{j}");
    assert_eq!(
        s2.admin("POST", &format!("/train/{id}/resume"), TOKEN).0,
        202
    );
    let j = s2.wait_for_job(TOKEN, &id, 120, |j| {
        j["state"] == "running" && j["runs"] == 3 && j["step"].as_i64().unwrap() > 0
    });
    // Work saved before the kill is still there (checkpoints every 4 steps).
    let hist = j["loss_history"].as_array().unwrap();
    assert!(
        hist.len() + 4 >= before_kill,
        "history lost: {} points after, {before_kill} before",
        hist.len()
    );
    assert!(
        j["step"].as_i64().unwrap() >= cancelled_at,
        "resumed from the checkpoint, not from 0: {j}"
    );
    assert_eq!(s2.admin("DELETE", &format!("/train/{id}"), TOKEN).0, 200);
    s2.wait_for_job(TOKEN, &id, 60, |j| j["state"] == "cancelled");
}

#[test]
fn bad_job_specs_get_4xx_naming_the_field() {
    let f = fixture();
    // A symlink inside the data root that leads out of it.
    std::os::unix::fs::symlink(f.root.join("synth"), f.root.join("data/escape")).unwrap();
    let s = server(&f);
    let c = client();
    let url = format!("{}/train", s.url);
    let r = c
        .post(&url)
        .json(&json!({"dataset": "ds", "output": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    for (body, field) in [
        (json!({"dataset": "../synth", "output": "x"}), "dataset"),
        (json!({"dataset": "/etc", "output": "x"}), "dataset"),
        (json!({"dataset": "escape", "output": "x"}), "dataset"),
        (json!({"dataset": "missing", "output": "x"}), "dataset"),
        (json!({"dataset": "ds", "output": "../evil"}), "output"),
        (
            json!({"dataset": "ds", "output": "x", "epochs": 0}),
            "epochs",
        ),
        (json!({"dataset": "ds", "output": "x", "lr": 5.0}), "lr"),
        (
            json!({"dataset": "ds", "output": "x", "mapping": "lstm"}),
            "mapping",
        ),
        (
            json!({"dataset": "ds", "output": "x", "base": "nope"}),
            "base",
        ),
        (json!({"dataset": "ds", "output": "x", "bogus": 1}), "bogus"),
        (
            json!({"dataset": "ds", "output": "x", "epochs": "ten"}),
            "epochs",
        ),
    ] {
        let r = c.post(&url).bearer_auth(TOKEN).json(&body).send().unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    // An existing bundle is replaced only when asked.
    std::fs::create_dir_all(f.root.join("models/taken")).unwrap();
    let r = c
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&json!({"dataset": "ds", "output": "taken"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("overwrite"), "{v}");
    let r = c
        .get(format!("{}/train/none", s.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/train/none/resume", s.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        Path::new(&f.root)
            .join("jobs")
            .read_dir()
            .unwrap()
            .next()
            .is_none(),
        "no job was created"
    );
    // With "overwrite", the job is queued; a second job for the same output is refused
    // while the first may still write it.
    let long = json!({"dataset": "ds", "output": "taken", "overwrite": true, "epochs": 400});
    let id = start_job(&s, long.clone());
    let r = c.post(&url).bearer_auth(TOKEN).json(&long).send().unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().unwrap();
    assert!(v["error"].as_str().unwrap().contains(&id), "{v}");
    let r = c
        .delete(format!("{}/train/{id}", s.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `clipcap ARGS` expected to fail: its stderr.
fn run_failing(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "clipcap {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked") && !err.contains("libtorch"),
        "a message, not a panic: {err}"
    );
    err
}

#[test]
fn data_from_another_encoder_is_refused_before_any_tensor_op() {
    let f = fixture();
    let data = f.root.join("data/ds");
    let other = f.root.join("other");
    common::make_bundle(
        &other,
        &["--size", "tiny", "--seed", "32", "--clip-dim", "24"],
    );
    let prepare = |model: &Path, extra: &[&str]| prepare_args(&f.root, model, &data, extra);
    let args = prepare(&other, &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = run_failing(&refs);
    assert!(
        err.contains("another image encoder or preprocessing") && err.contains("--overwrite"),
        "{err}"
    );
    let meta = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap()
    };
    assert_eq!(
        meta()["embedding_dim"],
        32,
        "the refused run changed nothing"
    );
    // The 32-wide data against a 24-wide bundle: eval and train say so.
    let (o, d) = (other.to_str().unwrap(), data.to_str().unwrap());
    let err = run_failing(&["eval", "--model", o, "--data", d, "--split", "train"]);
    assert!(err.contains("32-value embeddings"), "{err}");
    let out = f.root.join("models/x");
    let train_on = |base: &str| {
        run_failing(&[
            "train",
            "--data",
            d,
            "--out",
            out.to_str().unwrap(),
            "--base",
            base,
            "--epochs",
            "1",
        ])
    };
    let err = train_on(o);
    assert!(
        err.contains("holds 32-value embeddings") && err.contains("gives 24"),
        "{err}"
    );
    assert!(!out.exists(), "no bundle written");
    // A bundle with the same width but another encoder is refused too.
    let twin = f.root.join("twin");
    common::make_bundle(&twin, &["--size", "tiny", "--seed", "33"]);
    let err = train_on(twin.to_str().unwrap());
    assert!(err.contains("another image encoder"), "{err}");
    // --overwrite starts over with the new encoder.
    let done = run_owned(&prepare(&other, &["--overwrite"]));
    assert!(
        done.contains("prepared 16 images") && done.contains("0 resumed"),
        "{done}"
    );
    assert_eq!(meta()["embedding_dim"], 24);
    // A meta.json that lies about the width is caught when the dataset opens.
    let mut m = meta();
    m["embedding_dim"] = json!(32);
    std::fs::write(data.join("meta.json"), m.to_string()).unwrap();
    let err = run_failing(&[
        "eval",
        "--model",
        f.base.to_str().unwrap(),
        "--data",
        d,
        "--split",
        "train",
    ]);
    assert!(err.contains("24-wide but meta.json says 32"), "{err}");
}

#[test]
fn a_resumed_run_with_no_steps_left_reports_its_true_step() {
    use clipcap::train::spec::{TrainParams, TrainSpec};
    use clipcap::train::trainer::{train, Outcome};
    let f = fixture();
    let spec = TrainSpec {
        data: f.root.join("data/ds"),
        out: f.root.join("models/done"),
        base: Some(f.base.clone()),
        params: TrainParams {
            epochs: 1,
            batch_size: 8,
            warmup: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let ckpt = f.root.join("done.ckpt");
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let step_of = |o: Outcome| match o {
        Outcome::Finished { progress, .. } => (progress.step, progress.total_steps),
        Outcome::Cancelled { .. } => panic!("not cancelled"),
    };
    let first = train(&spec, tch::Device::Cpu, &ckpt, false, &cancel, &mut |_| {}).unwrap();
    assert_eq!(step_of(first), (2, 2));
    let mut reports = vec![];
    let again = train(&spec, tch::Device::Cpu, &ckpt, true, &cancel, &mut |p| {
        reports.push(p.step)
    })
    .unwrap();
    assert_eq!(step_of(again), (2, 2), "resumed with nothing left to do");
    // Nothing was left to train, so nothing was reported step by step: the outcome alone
    // carries the step (which is what the job manager records).
    assert_eq!(reports, Vec::<i64>::new());
}

#[test]
fn a_full_disk_fails_the_job_cleanly_and_storage_errors_are_507() {
    let f = fixture();
    let model = format!("tiny={}", f.base.display());
    let data_root = f.root.join("data");
    let jobs = f.root.join("jobs");
    let bundles = f.root.join("models");
    let args = [
        "--model",
        model.as_str(),
        "--data-root",
        data_root.to_str().unwrap(),
    ];
    let env = [
        ("CLIPCAP_ADMIN_TOKEN", TOKEN),
        ("CLIPCAP_JOBS_DIR", jobs.to_str().unwrap()),
        ("CLIPCAP_BUNDLES_DIR", bundles.to_str().unwrap()),
    ];
    // Files capped at 1 MiB: job records fit, a checkpoint (tens of MB) does not.
    let id = {
        let s = Server::start_limited(&args, &env, Some(1024));
        let id = start_job(
            &s,
            json!({"dataset": "ds", "output": "full", "epochs": 1,
                                      "batch_size": 8, "warmup": 0}),
        );
        let j = s.wait_for_job(TOKEN, &id, 120, |j| j["state"] == "failed");
        let err = j["error"].as_str().unwrap();
        assert!(err.contains("File too large"), "the reason: {err}");
        id
    };
    // Nothing half-written is left anywhere.
    let mut temps = vec![];
    let mut stack = vec![f.root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp-") {
                temps.push(e.path());
            } else if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(temps.is_empty(), "temporaries left: {temps:?}");
    assert!(!f.root.join("models/full").exists());
    // No file may grow at all: no job record fits. A new job and a resume are refused with
    // 507 and a reason without server paths; nothing changes in memory or on disk.
    {
        let s = Server::start_limited(&args, &env, Some(0));
        assert_eq!(
            s.job(TOKEN, &id)["state"],
            "failed",
            "still failed after a restart"
        );
        let r = client()
            .post(format!("{}/train", s.url))
            .bearer_auth(TOKEN)
            .json(&json!({"dataset": "ds", "output": "other"}))
            .send()
            .unwrap();
        assert_eq!(r.status(), 507);
        let v: Value = r.json().unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains("File too large") && !msg.contains(f.root.to_str().unwrap()),
            "{msg}"
        );
        assert_eq!(
            s.admin("POST", &format!("/train/{id}/resume"), TOKEN).0,
            507
        );
        assert_eq!(s.job(TOKEN, &id)["state"], "failed");
        let listed = s.admin("GET", "/train", TOKEN).1;
        assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    }
    // With room again, the job resumes and finishes.
    let s = server(&f);
    assert_eq!(s.job(TOKEN, &id)["state"], "failed");
    assert_eq!(
        s.admin("POST", &format!("/train/{id}/resume"), TOKEN).0,
        202
    );
    s.wait_for_job(TOKEN, &id, 120, |j| j["state"] == "succeeded");
}

#[test]
fn train_warns_about_its_set_up_and_resume_names_what_changed() {
    let f = fixture();
    let (d, b) = (
        f.root.join("data/ds").to_str().unwrap().to_string(),
        f.base.to_str().unwrap().to_string(),
    );
    let out = f.root.join("models/w");
    let o = out.to_str().unwrap().to_string();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            &d,
            "--out",
            &o,
            "--base",
            &b,
            "--batch-size",
            "8",
        ];
        args.extend_from_slice(extra);
        Command::new(BIN).args(&args).output().unwrap()
    };
    // The default warmup (5000 steps) on a 2-step run, and no "val" split in the data.
    let first = train(&["--epochs", "1"]);
    assert!(first.status.success());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains(
            "warning: warmup is 5000 steps but the whole run is 2 (2 per epoch × 1 epochs)"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            r#"no validation: the dataset has no captions in split "val" (it has ["train"])"#
        ),
        "{err}"
    );
    // A finished run is extended by more epochs.
    let more = train(&["--epochs", "2", "--warmup", "0", "--resume"]);
    let err = String::from_utf8_lossy(&more.stderr);
    assert!(
        !more.status.success(),
        "warmup differs from the checkpoint: {err}"
    );
    assert!(
        err.contains("warmup (5000 → 0)") && err.contains("only epochs may change"),
        "{err}"
    );
    let more = train(&["--epochs", "2", "--resume"]);
    let err = String::from_utf8_lossy(&more.stderr);
    assert!(more.status.success(), "{err}");
    assert!(err.contains("resuming with 2 epochs instead of 1"), "{err}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("clipcap.json")).unwrap()).unwrap();
    let text = manifest["provenance"].to_string();
    assert!(
        text.contains("\"epochs\":2"),
        "the bundle records the extended run: {text}"
    );
}

/// A fleet on one model repository: the trainer replica publishes what it trained into the
/// repository, and a serve-only replica loads it at its next scan, byte for byte the same.
#[test]
fn a_trainer_publishes_into_the_repository_and_a_serving_replica_loads_it() {
    let f = fixture();
    let repo = f.root.join("repo");
    std::fs::create_dir_all(repo.join("tiny")).unwrap();
    for file in std::fs::read_dir(&f.base).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), repo.join("tiny").join(file.file_name())).unwrap();
    }
    let repo_arg = repo.to_str().unwrap();
    let trainer = trainer(
        &f,
        &["--model-repository", repo_arg, "--poll-interval", "1h"],
    );
    let replica = Server::start(
        &[
            "--model-repository",
            repo_arg,
            "--poll-interval",
            "1h",
            "--role",
            "serve",
        ],
        &[("CLIPCAP_ADMIN_TOKEN", TOKEN)],
    );
    let id = start_job(
        &trainer,
        json!({"dataset": "ds", "output": "trained", "activate": true, "epochs": 2, "batch_size": 8, "seed": 1}),
    );
    let j = trainer.wait_for_job(TOKEN, &id, 600, |j| {
        j["state"] != "queued" && j["state"] != "running"
    });
    assert_eq!(
        (j["state"].as_str(), j["activated"].as_bool()),
        (Some("succeeded"), Some(true)),
        "{j}"
    );
    // Published: a complete bundle in the repository, no temporaries beside it.
    for file in [
        "clipcap.json",
        "clip_image.pt",
        "model.safetensors",
        "tokenizer.json",
    ] {
        assert!(repo.join("trained").join(file).is_file(), "{file}");
    }
    let hidden: Vec<_> = std::fs::read_dir(&repo)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name())
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    let (status, report) = replica.admin("POST", "/admin/repository/scan", TOKEN);
    assert_eq!(status, 200);
    assert_eq!(report["loaded"], json!(["trained"]), "{report}");
    let fingerprint = |s: &Server| -> Value {
        let list: Value = reqwest::blocking::get(format!("{}/v1/models", s.url))
            .unwrap()
            .json()
            .unwrap();
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "trained")
            .unwrap_or_else(|| panic!("trained is not served: {list}"))["repository"]["fingerprint"]
            .clone()
    };
    assert!(fingerprint(&trainer).is_string());
    assert_eq!(fingerprint(&trainer), fingerprint(&replica));
    let caption = |s: &Server| -> String {
        let v: Value = client()
            .post(format!(
                "{}/caption?model=trained&strategy=greedy&max_tokens=20",
                s.url
            ))
            .header("content-type", "image/png")
            .body(std::fs::read(&f.pairs[0].0).unwrap())
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["results"][0]["caption"].as_str().unwrap().to_string()
    };
    assert_eq!(caption(&trainer), caption(&replica));
    // The replica does not train.
    let r = client()
        .post(format!("{}/train", replica.url))
        .bearer_auth(TOKEN)
        .json(&json!({"dataset": "ds", "output": "again"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
}
