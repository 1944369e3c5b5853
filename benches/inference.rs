//! Criterion benchmarks of the inference path on a real-size random bundle (GPT-2 small
//! shapes, ViT-B/32-shaped TorchScript encoder) made by scripts/make_test_bundle.py:
//! preprocessing, encoder batches, mapper, one decode step, and a whole beam-5 caption; and
//! one decode step's attention over the KV cache (16 images × 5 beams), libtorch's SDPA beside
//! clipcap's one-query kernel on an f32 and an f16 cache.
//!
//!   cargo bench --profile dev --bench inference -- --noplot
//!
//! (`--profile dev`: the project's one optimized profile, so torch-sys's C++ is not compiled a
//! second time for the bench profile. Set CLIPCAP_BENCH_BUNDLE=DIR to reuse a bundle.)
#![allow(clippy::arc_with_non_send_sync)] // bundles stay on the test thread
use clipcap::generate::{caption_embeddings, Decoder};
use clipcap::model::bundle::Bundle;
use clipcap::options::GenOptions;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    std::env::var("CLIPCAP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/clipcap/venv-torch-2.11.0/bin/python")
        })
}

fn bundle_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CLIPCAP_BENCH_BUNDLE") {
        return PathBuf::from(d);
    }
    let dir = std::env::temp_dir().join("clipcap-bench-bundle-small-vit");
    if !dir.join("clipcap.json").exists() {
        let ok = std::process::Command::new(python())
            .args(["scripts/make_test_bundle.py", "--out"])
            .arg(&dir)
            .args(["--size", "small", "--encoder", "vit-b32", "--seed", "0"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    dir
}

fn photo(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8])
    });
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn attention(c: &mut Criterion) {
    use clipcap::model::attention;
    let cpu = Device::Cpu;
    // GPT-2 small's heads at 80 rows, 45 of 78 cached columns in use (mid-caption).
    let (rows, heads, cap, d, t) = (80, 12, 78, 64, 45);
    tch::manual_seed(0);
    let q = Tensor::randn([rows, heads, 1, d], (Kind::Float, cpu));
    let k = Tensor::randn([rows, heads, cap, d], (Kind::Float, cpu));
    let v = Tensor::randn([rows, heads, cap, d], (Kind::Float, cpu));
    let (k16, v16) = (k.to_kind(Kind::Half), v.to_kind(Kind::Half));
    let mut g = c.benchmark_group("attention_80_rows_45_keys");
    g.bench_function("sdpa_f32", |b| {
        b.iter(|| {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k.narrow(2, 0, t),
                &v.narrow(2, 0, t),
                None,
                0.0,
                false,
                None,
                false,
            )
        })
    });
    if attention::fits(&q, &k16) {
        for (name, k, v) in [("one_query_f32", &k, &v), ("one_query_f16", &k16, &v16)] {
            g.bench_function(name, |b| {
                b.iter(|| attention::one_query(&q, &k.narrow(2, 0, t), &v.narrow(2, 0, t), None))
            });
        }
    } else {
        eprintln!("SKIPPED one_query: this build has no attention kernel");
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let bundle = Arc::new(Bundle::load(&bundle_dir(), Device::Cpu, Kind::Float).unwrap());
    let cfg = clipcap::engine::pipeline::preprocess_config(&bundle.manifest.image, 40_000_000);
    let jpeg = photo(640, 480);
    c.bench_function("preprocess/jpeg_640x480", |b| {
        b.iter(|| clipcap::preprocess::preprocess_bytes(&jpeg, &cfg).unwrap())
    });
    let px = clipcap::preprocess::preprocess_bytes(&jpeg, &cfg).unwrap();
    let mut g = c.benchmark_group("encoder");
    g.sample_size(10);
    for n in [1usize, 16] {
        let pixels: Vec<&[f32]> = (0..n).map(|_| px.as_slice()).collect();
        g.bench_function(format!("vit_b32_batch_{n}"), |b| {
            b.iter(|| clipcap::engine::pipeline::encode(&bundle, &pixels, n).unwrap())
        });
    }
    g.finish();
    tch::manual_seed(0);
    let clip16 = Tensor::randn([16, bundle.encoder.dim], (Kind::Float, Device::Cpu));
    c.bench_function("mapper/mlp_batch_16", |b| {
        b.iter(|| tch::no_grad(|| bundle.net.prefix(&clip16)))
    });
    let beam = GenOptions::default();
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.bench_function("step_16_images_x_5_beams", |b| {
        b.iter_batched(
            || {
                let mut d = Decoder::new(bundle.clone());
                d.add(&clip16, &beam, (0..16).collect()).unwrap();
                d
            },
            |mut d| d.step().unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("caption_beam5_1_image", |b| {
        b.iter(|| caption_embeddings(bundle.clone(), &clip16.narrow(0, 0, 1), &beam).unwrap())
    });
    g.bench_function("caption_beam5_16_images_batched", |b| {
        b.iter(|| caption_embeddings(bundle.clone(), &clip16, &beam).unwrap())
    });
    g.finish();
}

criterion_group!(inference, attention, benches);
criterion_main!(inference);
