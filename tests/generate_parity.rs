//! Decoding parity with ClipCap's own algorithms (scripts/ref/clipcap_reference.py:
//! `generate_beam` with 5 beams and `generate2`, HF GPT-2 without a KV cache) on random
//! weights: the same tokens, token for token, and beam scores within 1e-4.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::generate::caption_embeddings;
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Deserialize)]
struct Reference {
    beam: Vec<Vec<i64>>,
    beam_scores: Vec<f64>,
    greedy: Vec<i64>,
}

fn make_bundle(dir: &Path, extra: &[&str]) {
    let mut args = vec![
        "scripts/make_test_bundle.py",
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    common::run_python(&args);
}

fn reference(bundle: &Path, clip: &Tensor, stop: i64, max_tokens: i64) -> Vec<Reference> {
    reference_prompted(bundle, clip, stop, max_tokens, &[])
}

/// The reference fed `prompt` (token ids) after each prefix.
fn reference_prompted(
    bundle: &Path,
    clip: &Tensor,
    stop: i64,
    max_tokens: i64,
    prompt: &[i64],
) -> Vec<Reference> {
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let ids = ids.join(",");
    let emb = bundle.join("clip_embeddings.safetensors");
    Tensor::write_safetensors(&[("clip", clip)], &emb).unwrap();
    let out = bundle.join("reference.json");
    common::run_python(&[
        "scripts/ref/clipcap_reference.py",
        "--bundle",
        bundle.to_str().unwrap(),
        "--embeddings",
        emb.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stop-id",
        &stop.to_string(),
        "--max-tokens",
        &max_tokens.to_string(),
        "--prompt-ids",
        &ids,
    ]);
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// Captions `clip` with beam 5 (all 5 beams returned) and greedy, and compares them with the
/// reference. Returns how many beams matched exactly.
fn check_parity(bundle_dir: &Path, clip: &Tensor, max_tokens: i64) {
    let bundle = Arc::new(Bundle::load(bundle_dir, Device::Cpu, Kind::Float).unwrap());
    assert_eq!(bundle.stop_ids, vec![13], "'.' is GPT-2 token 13");
    let want = reference(bundle_dir, clip, bundle.stop_ids[0], max_tokens);
    let beam = GenOptions {
        strategy: Strategy::Beam,
        beam_size: 5,
        n: 5,
        max_tokens,
        ..Default::default()
    };
    let greedy = GenOptions {
        strategy: Strategy::Greedy,
        max_tokens,
        ..Default::default()
    };
    let got_beam = caption_embeddings(bundle.clone(), clip, &beam).unwrap();
    let got_greedy = caption_embeddings(bundle.clone(), clip, &greedy).unwrap();
    let mut max_score_diff = 0f64;
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            got_greedy[i][0].tokens, w.greedy,
            "image {i}: greedy tokens differ"
        );
        assert_eq!(
            got_beam[i][0].tokens, w.beam[0],
            "image {i}: best beam differs"
        );
        let mut got: Vec<_> = got_beam[i].iter().map(|c| c.tokens.clone()).collect();
        let mut exp = w.beam.clone();
        got.sort();
        exp.sort();
        assert_eq!(got, exp, "image {i}: the 5 beams differ");
        for (c, s) in got_beam[i].iter().zip(&w.beam_scores) {
            max_score_diff = max_score_diff.max((c.score - s).abs());
        }
    }
    println!(
        "{} images: greedy and beam tokens identical; max beam score diff {max_score_diff:.2e}",
        want.len()
    );
    assert!(max_score_diff < 1e-4);
    // The same captions when each image is decoded alone.
    for i in 0..clip.size()[0] {
        let alone = caption_embeddings(bundle.clone(), &clip.narrow(0, i, 1), &beam).unwrap();
        assert_eq!(
            alone[0][0].tokens, got_beam[i as usize][0].tokens,
            "image {i} alone vs batch"
        );
    }
}

#[test]
fn tiny_mlp_mapper_matches_clipcap() {
    let dir = tempfile::tempdir().unwrap();
    make_bundle(
        dir.path(),
        &["--size", "tiny", "--mapping", "mlp", "--seed", "1"],
    );
    tch::manual_seed(7);
    let clip = Tensor::randn([6, 32], (Kind::Float, Device::Cpu));
    check_parity(dir.path(), &clip, 67);
}

#[test]
fn tiny_transformer_mapper_matches_clipcap() {
    let dir = tempfile::tempdir().unwrap();
    make_bundle(
        dir.path(),
        &[
            "--size",
            "tiny",
            "--mapping",
            "transformer",
            "--prefix-length",
            "10",
            "--clip-length",
            "10",
            "--num-layers",
            "8",
            "--normalize-prefix",
            "--seed",
            "2",
        ],
    );
    tch::manual_seed(8);
    let clip = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
    check_parity(dir.path(), &clip, 67);
}

#[test]
fn long_prefix_single_linear_mapper_matches_clipcap() {
    let dir = tempfile::tempdir().unwrap();
    make_bundle(
        dir.path(),
        &[
            "--size",
            "tiny",
            "--mapping",
            "mlp",
            "--prefix-length",
            "12",
            "--seed",
            "3",
        ],
    );
    tch::manual_seed(9);
    let clip = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    check_parity(dir.path(), &clip, 30);
}

/// GPT-2 small shapes (12 layers, 768 wide, real vocabulary) with a 512-d prefix, as the
/// released COCO weights; 2 images and 20 tokens keep the uncached reference affordable.
#[test]
fn gpt2_small_shapes_match_clipcap() {
    let dir = tempfile::tempdir().unwrap();
    make_bundle(
        dir.path(),
        &["--size", "small", "--mapping", "mlp", "--seed", "4"],
    );
    tch::manual_seed(10);
    let clip = Tensor::randn([2, 512], (Kind::Float, Device::Cpu));
    check_parity(dir.path(), &clip, 20);
}

/// A prompt is the caption's given beginning: the decoder continues it exactly as ClipCap's
/// own decoders continue when fed the prefix followed by the prompt's embeddings, and the
/// caption is the prompt and the continuation.
#[test]
fn a_prompt_is_continued_as_clipcap_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    make_bundle(
        dir.path(),
        &["--size", "tiny", "--mapping", "mlp", "--seed", "3"],
    );
    let bundle = Arc::new(Bundle::load(dir.path(), Device::Cpu, Kind::Float).unwrap());
    tch::manual_seed(11);
    let clip = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    let prompt = "A photo of";
    let ids = bundle.encode(prompt).unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    let want = reference_prompted(dir.path(), &clip, bundle.stop_ids[0], 20, &ids);
    let beam = GenOptions {
        strategy: Strategy::Beam,
        beam_size: 5,
        n: 5,
        max_tokens: 20,
        prompt: prompt.into(),
        ..Default::default()
    };
    let greedy = GenOptions {
        strategy: Strategy::Greedy,
        max_tokens: 20,
        prompt: prompt.into(),
        ..Default::default()
    };
    let got_beam = caption_embeddings(bundle.clone(), &clip, &beam).unwrap();
    let got_greedy = caption_embeddings(bundle.clone(), &clip, &greedy).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got_greedy[i][0].tokens, w.greedy, "image {i}: greedy");
        assert_eq!(got_beam[i][0].tokens, w.beam[0], "image {i}: best beam");
        for c in got_beam[i].iter().chain(&got_greedy[i]) {
            let whole: Vec<i64> = ids.iter().chain(&c.tokens).copied().collect();
            assert_eq!(c.text, bundle.decode(&whole).trim(), "image {i}");
            assert!(c.text.starts_with(prompt), "{:?}", c.text);
        }
    }
    // Prompted and plain images decode side by side as they do alone.
    let plain = GenOptions {
        prompt: String::new(),
        ..greedy.clone()
    };
    let mut dec = clipcap::generate::Decoder::new(bundle.clone());
    let mut got = std::collections::HashMap::new();
    dec.add(&clip.narrow(0, 0, 2), &greedy, vec![0, 1]).unwrap();
    dec.add(&clip.narrow(0, 0, 2), &plain, vec![10, 11])
        .unwrap();
    let mut done = vec![];
    while !dec.is_empty() {
        done.extend(dec.step().unwrap());
    }
    for f in done {
        got.insert(f.id, f.captions[0].tokens.clone());
    }
    let alone_plain = caption_embeddings(bundle.clone(), &clip.narrow(0, 0, 2), &plain).unwrap();
    assert_eq!(got[&0], want[0].greedy);
    assert_eq!(got[&1], want[1].greedy);
    assert_eq!(got[&10], alone_plain[0][0].tokens);
    assert_eq!(got[&11], alone_plain[1][0].tokens);
}
