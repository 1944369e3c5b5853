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
