//! Half precision on the CPU: the plumbing CUDA uses (bundle and encoder cast to f16/bf16,
//! the KV cache in the model's dtype, logits and scores in f32) exercised where no GPU is,
//! with captions compared against f32; one f64 run to flush out hard-coded f32; and int8
//! weights (`--dtype int8`, `model::int8`): products against an f64 reference within a hard
//! per-element bound, a row's result bit for bit the same alone or in any batch, and a decode
//! that reads a quarter of f32's weight bytes (a trained bundle's int8 captions are compared
//! with f32's in `tests/train.rs`), for each int8 engine (clipcap's own, fused with its
//! LayerNorm, GELU and residual, in its vector and plain paths, and PyTorch's two); and the int8 image
//! encoder (`scripts/clip_int8.py`): embeddings against f32's, alone against batched; and
//! int8 decoding's one-query attention over an f16 cache: captions alone, batched and joined.
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
mod common;

use clipcap::device::{DeviceChoice, DtypeChoice};
use clipcap::engine::Engine;
use clipcap::generate::caption_embeddings;
use clipcap::model::bundle::Bundle;
use clipcap::model::int8::{Fused, Int8Activation, Int8Engine, Int8Matrix};
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

// int8 weights.

/// `|Δ_ij| ≤ Σ_k |x_jk|·δw_i + Σ_k |w_ik|·δx_j + in·δw_i·δx_j`, with the weight's rounding
/// `δw_i = max_k |w_ik| / 254` (half a step of 127 levels per row) and the activation's
/// `δx_j = max_k |x_jk| / 127` (half a step of 7-bit levels over [−max, max]), plus f32's
/// own rounding (relative 1e-5).
fn bound(x: &Tensor, w: &Tensor, y_ref: &Tensor) -> Tensor {
    let dw = w.abs().amax([1], false) / 254.0; // [out]
    let dx = x.abs().amax([1], true) / 127.0; // [rows, 1]
    let n = w.size()[1] as f64;
    let sx = x.abs().sum_dim_intlist(&[1i64][..], true, Kind::Double); // [rows, 1]
    let sw = w.abs().sum_dim_intlist(&[1i64][..], false, Kind::Double); // [out]
    &sx * &dw.unsqueeze(0)
        + &dx * sw.unsqueeze(0)
        + (&dx * dw.unsqueeze(0)) * n
        + y_ref.abs() * 1e-5
        + 1e-9
}

/// An int8 matrix packed for `engine`.
fn int8(w: &Tensor, engine: Int8Engine) -> Int8Matrix {
    Int8Matrix::new(engine, w).unwrap()
}

#[test]
fn int8_products_stay_within_their_rounding_bound_of_f64() {
    tch::manual_seed(11);
    let opts = (Kind::Double, Device::Cpu);
    for ((out, inp, rows), engine) in [(2304, 768, 5), (768, 3072, 17), (4000, 768, 1)]
        .into_iter()
        .flat_map(|shape| Int8Engine::ALL.map(|e| (shape, e)))
    {
        let w = Tensor::randn([out, inp], opts) * 0.02;
        let bias = Tensor::randn([out], opts) * 0.1;
        let q = int8(&w.to_kind(Kind::Float), engine);
        let engine = engine.name();
        let gaussian = Tensor::randn([rows, inp], opts);
        // With outliers, as GPT-2's activations have: the row's scale follows its largest value.
        let outliers = &gaussian + Tensor::randn([rows, inp], opts).pow_tensor_scalar(7) * 0.01;
        for (name, x, max_rel) in [("gaussian", &gaussian, 0.03), ("outliers", &outliers, 1.0)] {
            let y = q
                .linear(&x.to_kind(Kind::Float), Some(&bias.to_kind(Kind::Float)))
                .to_kind(Kind::Double);
            let prod = x.matmul(&w.tr());
            let y_ref = &prod + &bias;
            let err = (&y - &y_ref).abs();
            let worst = (&err / bound(x, &w, &prod)).max().double_value(&[]);
            let rel = ((&y - &y_ref).norm() / prod.norm()).double_value(&[]);
            println!("{engine} [{out}x{inp}] x {rows} {name} rows: worst error {worst:.3} of its bound, relative error {rel:.4}");
            assert!(
                worst <= 1.0,
                "an element is off by more than its bound ({worst})"
            );
            assert!(rel < max_rel, "relative error {rel}");
            assert_eq!(y.size(), [rows, out]);
        }
        assert_eq!(q.weight_bytes(), (out * inp) as u64);
    }
}

#[test]
fn a_rows_result_is_the_same_alone_or_in_any_batch() {
    for engine in Int8Engine::ALL {
        a_rows_result_is_the_same_alone_or_in_any_batch_with(engine);
    }
}

fn a_rows_result_is_the_same_alone_or_in_any_batch_with(engine: Int8Engine) {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([512, 256], opts) * 0.05;
    let bias = Tensor::randn([512], opts);
    let q = int8(&w, engine);
    // Rows of very different magnitudes: a shared activation scale would change the small ones.
    let x = Tensor::randn([9, 256], opts)
        * Tensor::from_slice(&[1e-3f32, 1., 50., 0.2, 7., 1e3, 0.01, 3., 0.]).reshape([9, 1]);
    let batched = q.linear(&x, Some(&bias));
    for i in 0..9 {
        let alone = q.linear(&x.narrow(0, i, 1), Some(&bias));
        assert!(
            batched.narrow(0, i, 1).equal(&alone),
            "{engine:?}: row {i} differs alone vs batched"
        );
    }
    let reordered = q.linear(&x.flip([0]), Some(&bias)).flip([0]);
    assert!(batched.equal(&reordered));
    // 3-D input, as GPT-2's blocks pass it.
    let x3 = x.reshape([3, 3, 256]);
    assert!(q.linear(&x3, Some(&bias)).reshape([9, 512]).equal(&batched));
}

/// GELU's tanh form, in f64.
fn gelu_tanh(y: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    y * 0.5
        * ((y + y.pow_tensor_scalar(3) * 0.044715) * c)
            .tanh()
            .g_add_scalar(1.0)
}

#[test]
fn clipcaps_gemm_fuses_layer_norm_gelu_and_residual_within_the_product_bound() {
    tch::manual_seed(12);
    let opts = (Kind::Double, Device::Cpu);
    // 3072 x 768 as GPT-2's c_fc; 100 x 30 leaves partial blocks, groups and vectors.
    for (out, inp, rows) in [(3072, 768, 6), (100, 30, 7)] {
        let w = Tensor::randn([out, inp], opts) * 0.02;
        let bias = Tensor::randn([out], opts) * 0.1;
        let (ln_w, ln_b) = (
            Tensor::randn([inp], opts) * 0.2 + 1.0,
            Tensor::randn([inp], opts) * 0.1,
        );
        let x = Tensor::randn([rows, inp], opts) * 3.0 + 0.5;
        let residual = Tensor::randn([rows, out], opts);
        let f = |t: &Tensor| t.to_kind(Kind::Float);
        let (ln_wf, ln_bf, rf) = (f(&ln_w), f(&ln_b), f(&residual));
        let fused = Fused {
            layer_norm: Some((&ln_wf, &ln_bf, 1e-5)),
            activation: Int8Activation::GeluTanh,
            residual: Some(&rf),
        };
        let normed = x.layer_norm([inp], Some(&ln_w), Some(&ln_b), 1e-5, false);
        let prod = normed.matmul(&w.tr());
        let y_ref = gelu_tanh(&(&prod + &bias)) + &residual;
        let vector = int8(&f(&w), Int8Engine::Clipcap);
        let plain = Int8Matrix::with_plain_loops(&f(&w)).unwrap();
        for (path, q) in [("vector", &vector), ("plain loops", &plain)] {
            let y = q
                .linear_fused(&f(&x), Some(&f(&bias)), fused)
                .to_kind(Kind::Double);
            // GELU's slope is at most 1.13; the LayerNorm's own f32 rounding adds to the
            // product's bound through |W|.
            let slack = w.abs().sum_dim_intlist(&[1i64][..], false, Kind::Double) * 1e-5;
            let b = bound(&normed, &w, &prod) * 1.13 + slack.unsqueeze(0) + y_ref.abs() * 1e-5;
            let worst = ((&y - &y_ref).abs() / b).max().double_value(&[]);
            println!("{path} [{out}x{inp}] x {rows} fused: worst error {worst:.3} of its bound");
            assert!(
                worst <= 1.0,
                "{path}: an element is off by more than its bound ({worst})"
            );
        }
        // With them, the two paths' LayerNorms sum in different orders, which can move an
        // input across a rounding step (each stays within the bound above). Without a
        // LayerNorm or GELU (whose exp is a polynomial in the vector path), both compute the
        // same integer sums and the same fused multiply-adds.
        let plain_fused = Fused {
            residual: Some(&rf),
            ..Fused::default()
        };
        let a = vector.linear_fused(&f(&x), Some(&f(&bias)), plain_fused);
        let b = plain.linear_fused(&f(&x), Some(&f(&bias)), plain_fused);
        assert!(a.equal(&b), "the vector path and the plain loops differ");
    }
}

#[test]
fn a_fused_rows_result_is_the_same_alone_or_in_any_batch() {
    tch::manual_seed(13);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([200, 96], opts) * 0.05;
    let (bias, ln_w, ln_b) = (
        Tensor::randn([200], opts),
        Tensor::randn([96], opts) + 1.0,
        Tensor::randn([96], opts),
    );
    let x = Tensor::randn([9, 96], opts)
        * Tensor::from_slice(&[1e-3f32, 1., 50., 0.2, 7., 1e3, 0.01, 3., 0.]).reshape([9, 1]);
    let residual = Tensor::randn([9, 200], opts);
    for q in [
        int8(&w, Int8Engine::Clipcap),
        Int8Matrix::with_plain_loops(&w).unwrap(),
    ] {
        let run = |x: &Tensor, r: &Tensor| {
            let fused = Fused {
                layer_norm: Some((&ln_w, &ln_b, 1e-5)),
                activation: Int8Activation::GeluTanh,
                residual: Some(r),
            };
            q.linear_fused(x, Some(&bias), fused)
        };
        let batched = run(&x, &residual);
        for i in 0..9 {
            let alone = run(&x.narrow(0, i, 1), &residual.narrow(0, i, 1));
            assert!(
                batched.narrow(0, i, 1).equal(&alone),
                "row {i} differs alone vs batched"
            );
        }
    }
}

#[test]
fn an_int8_bundle_decodes_and_reports_its_smaller_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    common::make_bundle(&model, &["--size", "tiny", "--seed", "4"]);
    let decode = |dtype: &str| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_clipcap"))
            .args([
                "bench-decode",
                "--images",
                "3",
                "--batch",
                "1,3",
                "--max-tokens",
                "12",
                "--dtype",
                dtype,
                "--model",
            ])
            .arg(&model)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let f32 = decode("f32");
    let int8 = decode("int8");
    assert_eq!(int8["dtype"], "int8");
    let (bf, bi) = (
        f32["weight_bytes_per_step"].as_u64().unwrap(),
        int8["weight_bytes_per_step"].as_u64().unwrap(),
    );
    assert_eq!(bf, 4 * bi, "int8 reads a quarter of f32's weight bytes");
    assert!(int8["steps"].as_u64().unwrap() >= 1);
}

/// int8 decoding attends with clipcap's one-query kernel over an f16 cache
/// (`model::attention`), per row: an image's captions are the same alone, batched, and joined
/// into a running batch, and close to f32's. The tokens are compared exactly; the scores to a
/// relative 1e-5, because the f32 mapper's product differs by batch size in the last bit (1.8e-7 here,
/// in f32 too), which an f16 key can round the other way.
#[test]
fn int8_decodes_over_an_f16_cache_and_captions_the_same_alone_or_batched() {
    use clipcap::generate::{Caption, Decoder};
    use clipcap::model::attention::DecodeAttention;
    let f32 = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let b = Arc::new(Bundle::load(bundle_dir(), Device::Cpu, Kind::QInt8).unwrap());
    assert_eq!(f32.net.gpt.decode_attention, DecodeAttention::Sdpa);
    assert_eq!(f32.net.gpt.new_cache(1, 4).kind(), Kind::Float);
    assert_eq!(b.net.gpt.decode_attention, DecodeAttention::OneQuery);
    assert_eq!(b.net.gpt.new_cache(1, 4).kind(), Kind::Half);
    let n = 6;
    let c = clip(n);
    for strategy in [Strategy::Beam, Strategy::Greedy] {
        let o = opts(strategy);
        let batched = caption_embeddings(b.clone(), &c, &o).unwrap();
        let same = |a: &[Caption], b: &[Caption], what: &str| {
            assert_eq!(a.len(), b.len(), "{strategy:?}: {what}");
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.tokens, y.tokens, "{strategy:?}: {what}");
                let tolerance = 1e-5 * x.score.abs().max(1.0);
                assert!(
                    (x.score - y.score).abs() < tolerance,
                    "{strategy:?}: {what}: {x:?} {y:?}"
                );
            }
        };
        for i in 0..n {
            let alone = caption_embeddings(b.clone(), &c.narrow(0, i, 1), &o).unwrap();
            same(&alone[0], &batched[i as usize], &format!("image {i} alone"));
        }
        // Images 3.. join a batch two steps into images 0..3: left-padded rows, masked keys.
        let mut d = Decoder::new(b.clone());
        d.add(&c.narrow(0, 0, 3), &o, vec![0, 1, 2]).unwrap();
        let mut done = d.step().unwrap();
        done.extend(d.step().unwrap());
        d.add(&c.narrow(0, 3, 3), &o, vec![3, 4, 5]).unwrap();
        while !d.is_empty() {
            done.extend(d.step().unwrap());
        }
        for f in done {
            let want = &batched[f.id as usize];
            assert_eq!(
                &f.captions, want,
                "{strategy:?}: image {} after a join",
                f.id
            );
        }
        let want = caption_embeddings(f32.clone(), &c, &o).unwrap();
        let first = (0..n as usize)
            .filter(|&i| want[i][0].tokens.first() == batched[i][0].tokens.first())
            .count();
        println!("{strategy:?}: int8 first tokens equal to f32's on {first}/{n}");
        assert!(
            first >= 4,
            "{strategy:?}: only {first}/{n} first tokens equal f32's"
        );
    }
}

#[test]
fn an_int8_encoder_embeds_like_f32_and_the_same_alone_or_batched() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    // CLIP's ViT structure (nn.MultiheadAttention, QuickGELU) at test size, with its int8 twin.
    common::make_bundle(
        &model,
        &[
            "--size",
            "tiny",
            "--encoder",
            "vit-tiny",
            "--int8-encoder",
            "--seed",
            "6",
        ],
    );
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (i, (w, h)) in [(320, 240), (224, 224), (97, 300), (640, 480)]
        .iter()
        .enumerate()
    {
        std::fs::write(
            images.join(format!("{i}.png")),
            common::png(*w, *h, i as u8 * 40),
        )
        .unwrap();
    }
    let lines = common::clipcap_json_lines(&[
        "bench-encode".as_ref(),
        "--batch".as_ref(),
        "1,3".as_ref(),
        "--repeat".as_ref(),
        "1".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        images.as_os_str(),
    ]);
    let per_image: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["cosine_int8_to_f32"].as_f64())
        .collect();
    assert_eq!(per_image.len(), 4, "{lines:?}");
    // The bar for real CLIP towers; per-token int8 rounding costs ~1e-4 of cosine here.
    assert!(per_image.iter().all(|&c| c >= 0.99), "{per_image:?}");
    let summary = lines
        .iter()
        .find(|l| l.get("cosine_min").is_some())
        .unwrap();
    // The int8 products are exact per row (above); the tower's f32 parts (convolution,
    // LayerNorm, attention) round by batch size at f32's ~1e-6.
    let diff = summary["int8_alone_vs_batched_max_abs_diff"]
        .as_f64()
        .unwrap();
    assert!(
        diff <= 1e-5,
        "an image's int8 embedding changes with its batch by {diff}"
    );
    let timed: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("batch").is_some()).collect();
    assert_eq!(timed.len(), 2);
    for t in timed {
        assert!(["fbgemm", "onednn"].contains(&t["int8_engine"].as_str().unwrap()));
        assert!(t["int8_images_per_s"].as_f64().unwrap() > 0.0);
    }

    // `--dtype int8` loads the int8 encoder; f32 the f32 one; a bundle without one encodes in f32.
    let px = Tensor::rand([2, 3, 224, 224], (Kind::Float, Device::Cpu));
    let (int8, f32, b) = common::check_int8_encoder(&model, &px);
    assert!(int8.net.gpt.int8_engine.is_some() && f32.net.gpt.int8_engine.is_none());
    let manifest = model.join("clipcap.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["files"].as_object_mut().unwrap().remove("encoder_int8");
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let fallback = Bundle::load(&model, Device::Cpu, Kind::QInt8).unwrap();
    assert!(fallback.encoder.int8.is_none() && fallback.int8);
    assert!(fallback.encoder.encode(&px).unwrap().equal(&b));
}
