//! Half precision on the CPU: the plumbing CUDA uses (bundle and encoder cast to f16/bf16,
//! the KV cache in the model's dtype, logits and scores in f32) exercised where no GPU is,
//! with captions compared against f32; and one f64 run to flush out hard-coded f32.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::device::{DeviceChoice, DtypeChoice};
use clipcap::engine::Engine;
use clipcap::generate::caption_embeddings;
use clipcap::model::bundle::Bundle;
use clipcap::options::{GenOptions, Strategy};
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};

fn bundle_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    // GPT-2's embedding scale (0.02), as real weights have: logits then land where bf16's
    // steps decide rankings.
    common::bundle_once(
        &DIR,
        &["--size", "tiny", "--seed", "41", "--wte-std", "0.02"],
    )
}

fn clip(n: i64) -> Tensor {
    tch::manual_seed(5);
    Tensor::randn([n, 32], (Kind::Float, Device::Cpu))
}

fn opts(strategy: Strategy) -> GenOptions {
    GenOptions {
        strategy,
        max_tokens: 20,
        ..Default::default()
    }
}

#[test]
fn bundles_load_encode_and_cache_in_half_precision_with_f32_logits() {
    let f32 = Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap();
    for kind in [Kind::BFloat16, Kind::Half] {
        let b = Bundle::load(bundle_dir(), Device::Cpu, kind).unwrap();
        assert_eq!(
            (b.kind, b.encoder.kind, b.net.gpt.kind()),
            (kind, kind, kind)
        );
        // The encoder runs in `kind` and answers f32 embeddings close to f32's.
        tch::manual_seed(1);
        let pixels = Tensor::randn([2, 3, 224, 224], (Kind::Float, Device::Cpu));
        let e = b.encoder.encode(&pixels).unwrap();
        let e32 = f32.encoder.encode(&pixels).unwrap();
        assert_eq!(e.kind(), Kind::Float);
        let cos = Tensor::cosine_similarity(&e, &e32, 1, 1e-8)
            .min()
            .double_value(&[]);
        assert!(cos > 0.99, "{kind:?}: encoder cosine to f32 {cos}");
        // The prefix and the KV cache are in `kind`; the logits are f32, and not merely
        // half values widened (bf16 logits of 10-20 sit on steps of 0.06-0.125).
        let prefix = b.net.prefix(&clip(2));
        assert_eq!(prefix.kind(), kind);
        let mut cache = b.net.gpt.new_cache(2, 32);
        let _g = tch::no_grad_guard();
        let h = b.net.gpt.forward(&prefix, None, &mut cache);
        assert_eq!(h.kind(), kind);
        let logits = b.net.gpt.logits(&h.select(1, 9));
        assert_eq!(logits.kind(), Kind::Float);
        let widened = logits.to_kind(kind).to_kind(Kind::Float);
        let off_grid = logits
            .ne_tensor(&widened)
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        let off_grid = off_grid.double_value(&[]);
        assert!(
            off_grid > 0.5,
            "{kind:?}: only {off_grid:.2} of the logits are finer than {kind:?}"
        );
    }
}

/// Share of images whose best caption is token for token the f32 one.
fn agreement(kind: Kind, strategy: Strategy, n: i64) -> (f64, f64) {
    let f32 = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let half = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, kind).unwrap());
    let c = clip(n);
    let want = caption_embeddings(f32, &c, &opts(strategy)).unwrap();
    let got = caption_embeddings(half, &c, &opts(strategy)).unwrap();
    let same = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a[0].tokens == b[0].tokens)
        .count();
    let first = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a[0].tokens.first() == b[0].tokens.first())
        .count();
    (same as f64 / n as f64, first as f64 / n as f64)
}

#[test]
fn half_precision_captions_agree_with_f32() {
    // Stated agreement on 16 random embeddings, 20 tokens: the first token on at least 14 of
    // 16 images and the whole best caption on at least 8 (a random model's distributions
    // are flat, real ones much less so; the measured shares are printed).
    for kind in [Kind::BFloat16, Kind::Half] {
        for strategy in [Strategy::Beam, Strategy::Greedy] {
            let (same, first) = agreement(kind, strategy, 16);
            println!("{kind:?} {strategy:?}: whole caption {same:.2}, first token {first:.2}");
            assert!(
                first >= 14.0 / 16.0,
                "{kind:?} {strategy:?}: first token {first}"
            );
            assert!(
                same >= 8.0 / 16.0,
                "{kind:?} {strategy:?}: whole caption {same}"
            );
        }
    }
}

#[test]
fn f64_decodes_what_f32_decodes() {
    // No f32 is assumed anywhere on the way: an f64 bundle loads, encodes and decodes.
    let f32 = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let f64 = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Double).unwrap());
    let c = clip(6);
    for strategy in [Strategy::Beam, Strategy::Greedy] {
        let want = caption_embeddings(f32.clone(), &c, &opts(strategy)).unwrap();
        let got = caption_embeddings(f64.clone(), &c, &opts(strategy)).unwrap();
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!(a[0].tokens, b[0].tokens, "{strategy:?} image {i}");
            assert!(
                (a[0].score - b[0].score).abs() < 1e-3,
                "{strategy:?} image {i}"
            );
        }
    }
}

#[test]
fn the_cli_captions_in_bf16_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.png");
    std::fs::write(&img, common::png(64, 48, 2)).unwrap();
    let run = |dtype: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
            .args(["caption", "--model"])
            .arg(bundle_dir())
            .args(["--dtype", dtype, "--json", "--max-tokens", "12"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dtype}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
        v
    };
    // The command line's caption is the engine's, in the same dtype on the same image.
    let bytes = std::fs::read(&img).unwrap();
    for (dtype, choice) in [("bf16", DtypeChoice::Bf16), ("f16", DtypeChoice::F16)] {
        let v = run(dtype);
        let (engine, model) =
            Engine::local(bundle_dir(), DeviceChoice::Cpu, choice, 1, 40_000_000).unwrap();
        let o = GenOptions {
            max_tokens: 12,
            ..model.generation.clone()
        };
        let want = engine
            .caption_blocking(&model, std::slice::from_ref(&bytes), o)
            .unwrap();
        engine.shutdown();
        assert_eq!(model.dtype, dtype);
        assert_eq!(
            v["captions"][0]["text"].as_str().unwrap(),
            want.images[0].captions[0].text,
            "{dtype}: {v}"
        );
    }
}
