//! Decoding options beyond the original algorithms, on a tiny random bundle: n-best, sampling
//! (seeded, batch-independent, top-k/top-p), repetition penalty, no-repeat-n-gram; and the
//! `clipcap caption` command line.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::generate::caption_embeddings;
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};

fn bundle_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    // A flat token embedding makes random GPT-2s loop on a few tokens: good for penalties.
    common::bundle_once(
        &DIR,
        &["--size", "tiny", "--seed", "41", "--wte-std", "0.05"],
    )
}

fn setup() -> (Arc<Bundle>, Tensor) {
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    tch::manual_seed(1);
    let clip = Tensor::randn([6, 32], (Kind::Float, Device::Cpu));
    (b, clip)
}

fn repeated_bigrams(t: &[i64]) -> usize {
    let mut seen = HashSet::new();
    t.windows(2).filter(|w| !seen.insert((w[0], w[1]))).count()
}

#[test]
fn no_repeat_ngram_and_repetition_penalty() {
    let (b, clip) = setup();
    let base = GenOptions {
        strategy: Strategy::Greedy,
        max_tokens: 40,
        ..Default::default()
    };
    let plain = caption_embeddings(b.clone(), &clip, &base).unwrap();
    let plain_repeats: usize = plain.iter().map(|c| repeated_bigrams(&c[0].tokens)).sum();
    assert!(
        plain_repeats > 0,
        "the fixture should repeat itself without the option"
    );
    for strategy in [Strategy::Greedy, Strategy::Beam] {
        let o = GenOptions {
            strategy,
            no_repeat_ngram: 2,
            ..base.clone()
        };
        let caps = caption_embeddings(b.clone(), &clip, &o).unwrap();
        for c in &caps {
            assert_eq!(
                repeated_bigrams(&c[0].tokens),
                0,
                "{strategy:?}: {:?}",
                c[0].tokens
            );
        }
    }
    let distinct = |caps: &[Vec<clipcap::generate::Caption>]| -> usize {
        caps.iter()
            .map(|c| c[0].tokens.iter().collect::<HashSet<_>>().len())
            .sum()
    };
    let penalized = caption_embeddings(
        b.clone(),
        &clip,
        &GenOptions {
            repetition_penalty: 5.0,
            ..base.clone()
        },
    )
    .unwrap();
    assert!(
        distinct(&penalized) > distinct(&plain),
        "penalty should diversify tokens: {} vs {}",
        distinct(&penalized),
        distinct(&plain)
    );
}

#[test]
fn sampling_is_seeded_and_batch_independent() {
    let (b, clip) = setup();
    let o = GenOptions {
        strategy: Strategy::Sample,
        max_tokens: 20,
        seed: Some(7),
        top_p: 0.9,
        n: 3,
        ..Default::default()
    };
    let a = caption_embeddings(b.clone(), &clip, &o).unwrap();
    let again = caption_embeddings(b.clone(), &clip, &o).unwrap();
    assert_eq!(a, again, "same seed, same captions");
    assert_eq!(a[0].len(), 3, "n samples per image");
    let alone = caption_embeddings(b.clone(), &clip.narrow(0, 2, 1), &o).unwrap();
    // The same samples alone and in a batch. Scores may differ in their last bits: on some
    // CPUs (AVX-512 EPYC here) MKL rounds a row of the lm_head product differently with the
    // number of rows beside it, which moves a log-probability by ~1e-7 but no sampled token.
    assert_eq!(alone[0].len(), a[2].len());
    for (x, y) in alone[0].iter().zip(&a[2]) {
        assert_eq!(
            (&x.tokens, &x.text, x.finish),
            (&y.tokens, &y.text, y.finish),
            "alone vs in a batch"
        );
        assert!(
            (x.score - y.score).abs() <= 1e-5 * y.score.abs().max(1.0),
            "{} vs {}",
            x.score,
            y.score
        );
    }
    let other = caption_embeddings(
        b.clone(),
        &clip,
        &GenOptions {
            seed: Some(8),
            ..o.clone()
        },
    )
    .unwrap();
    assert_ne!(a, other, "another seed, other samples");
    // top_k = 1 is greedy.
    let k1 = caption_embeddings(
        b.clone(),
        &clip,
        &GenOptions {
            top_k: 1,
            top_p: 1.0,
            n: 1,
            ..o.clone()
        },
    )
    .unwrap();
    let greedy = caption_embeddings(
        b.clone(),
        &clip,
        &GenOptions {
            strategy: Strategy::Greedy,
            max_tokens: 20,
            ..Default::default()
        },
    )
    .unwrap();
    for (x, y) in k1.iter().zip(&greedy) {
        assert_eq!(x[0].tokens, y[0].tokens);
    }
}

#[test]
fn beam_n_best_is_sorted_and_distinct() {
    let (b, clip) = setup();
    let o = GenOptions {
        beam_size: 4,
        n: 4,
        max_tokens: 15,
        ..Default::default()
    };
    for caps in caption_embeddings(b, &clip, &o).unwrap() {
        assert_eq!(caps.len(), 4);
        assert!(caps.windows(2).all(|w| w[0].score >= w[1].score));
        let uniq: HashSet<_> = caps.iter().map(|c| c.tokens.clone()).collect();
        assert_eq!(uniq.len(), 4, "beams are distinct sequences");
    }
}

#[test]
fn caption_cli_prints_captions_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.png");
    std::fs::write(&img, common::png(80, 60, 1)).unwrap();
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"\xff\xd8\xffnope").unwrap();
    let bin = env!("CARGO_BIN_EXE_clipcap");
    let model = bundle_dir().to_str().unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "caption",
            "--model",
            model,
            "--json",
            "-n",
            "2",
            "--max-tokens",
            "8",
        ])
        .arg(&img)
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["captions"].as_array().unwrap().len(), 2);
    assert_eq!(
        lines[0]["captions"], lines[1]["captions"],
        "same image, same captions"
    );
    assert!(lines[0]["timings_ms"]["decode"].as_f64().unwrap() > 0.0);
    let fails = |args: &[&str], needle: &str| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        // Our errors are one line; clap's (a bad flag value) add a hint line after it.
        let first = err.trim().lines().next().unwrap_or_default();
        assert!(first.contains(needle), "{args:?}: {err}");
        assert!(err.trim().lines().count() <= 3, "a short error: {err}");
    };
    let img_s = img.to_str().unwrap();
    fails(
        &["caption", "--model", model, "--device", "tpu", img_s],
        "unknown device",
    );
    fails(
        &["caption", "--model", model, "--device", "cuda", img_s],
        "CUDA is not available",
    );
    fails(
        &["caption", "--model", model, "/no/such.png"],
        "/no/such.png",
    );
    fails(
        &["caption", "--model", model, bad.to_str().unwrap()],
        "bad.jpg",
    );
    fails(&["caption", "--model", "/no/bundle", img_s], "clipcap.json");
    fails(
        &["caption", "--model", model, "--beam-size", "99", img_s],
        "beam-size",
    );
}

#[test]
fn caption_cli_captions_every_readable_file_of_lists_folders_and_stdin() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir_all(sub.join("deeper")).unwrap();
    let (a, b) = (sub.join("a.png"), sub.join("deeper/b.PNG"));
    std::fs::write(&a, common::png(80, 60, 1)).unwrap();
    std::fs::write(&b, common::png(50, 70, 2)).unwrap();
    std::fs::write(sub.join("notes.txt"), b"not an image").unwrap();
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"\xff\xd8\xffnope").unwrap();
    let missing = dir.path().join("missing.png");
    let bin = env!("CARGO_BIN_EXE_clipcap");
    let model = bundle_dir().to_str().unwrap();
    let caption = |args: &[&std::path::Path], stdin: &str| {
        let mut child = std::process::Command::new(bin)
            .args([
                "caption",
                "--model",
                model,
                "--json",
                "--max-tokens",
                "4",
                "--batch",
                "2",
            ])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            out.status.success(),
            lines,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let name = |v: &serde_json::Value| v["image"].as_str().unwrap().to_string();
    // Good, missing, undecodable, good: both good ones captioned, both bad ones reported in
    // place, and the exit status says something failed.
    let (ok, lines, err) = caption(&[&a, &missing, &bad, &b], "");
    assert!(!ok);
    assert!(
        err.contains("2 of 4 images could not be captioned"),
        "{err}"
    );
    let names: Vec<String> = lines.iter().map(name).collect();
    assert_eq!(
        names,
        [&a, &missing, &bad, &b].map(|p| p.to_str().unwrap().to_string())
    );
    assert!(lines[0]["captions"].is_array() && lines[3]["captions"].is_array());
    assert!(
        lines[1]["error"].as_str().unwrap().contains("cannot read"),
        "{}",
        lines[1]
    );
    assert!(lines[2]["error"].is_string() && lines[2].get("captions").is_none());
    // A folder: its image files, recursively, in order; other files ignored.
    let (ok, lines, err) = caption(&[&sub], "");
    assert!(ok, "{err}");
    assert_eq!(
        lines.iter().map(name).collect::<Vec<_>>(),
        [a.to_str().unwrap(), b.to_str().unwrap()]
    );
    // Paths on stdin, blank lines skipped; the same captions as given on the command line.
    let stdin = format!("{}\n\n{}\n", a.display(), b.display());
    let (ok, from_stdin, err) = caption(&[std::path::Path::new("-")], &stdin);
    assert!(ok, "{err}");
    assert_eq!(
        from_stdin
            .iter()
            .map(|l| &l["captions"])
            .collect::<Vec<_>>(),
        lines.iter().map(|l| &l["captions"]).collect::<Vec<_>>()
    );
}

#[test]
fn clipcap_info_names_torch_the_cpu_threads_and_the_packing_state() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
        .arg("info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("no {k:?} line in:\n{text}"))
            .to_string()
    };
    assert!(field("torch").starts_with("2."), "{text}");
    assert!(!field("cpu").is_empty(), "{text}");
    assert!(
        field("torch threads").parse::<usize>().unwrap() >= 1,
        "{text}"
    );
    let packing = field("cpu decoding");
    assert!(
        ["in use", "refused on this CPU", "off (", "unavailable"]
            .iter()
            .any(|w| packing.contains(w)),
        "{packing}"
    );
}
