//! `clipcap bench-encode`: a bundle's image encoder in f32 beside its int8 variant
//! (`files.encoder_int8`), interleaved in one run: images/s per batch size, and how close the
//! int8 embeddings are to f32's (cosine per image) on the given images.
use crate::model::bundle::Manifest;
use crate::model::clip_compare;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchEncodeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Batch sizes to time, comma-separated.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Rounds; each round times every batch size in f32 then int8, and the best round is
    /// reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// libtorch intra-op threads (0 = default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Images to encode (files, folders, or `-` for paths on stdin, as `caption` reads them):
    /// their embeddings are compared and they fill the timed batches; seeded random pixels if
    /// none.
    pub images: Vec<PathBuf>,
}

pub fn run(a: BenchEncodeArgs) -> Result<()> {
    if a.threads > 0 {
        crate::device::set_threads(a.threads as usize);
    }
    let manifest = Manifest::read(&a.model)?;
    let Some(int8_file) = &manifest.files.encoder_int8 else {
        bail!(
            "{}: the bundle has no int8 encoder (files.encoder_int8); make one with scripts/export_clip.py --quantize int8",
            a.model.display()
        );
    };
    let size = manifest.image.size;
    let (f32_enc, int8_enc) = clip_compare::load_pair(
        &a.model.join(&manifest.files.encoder),
        &a.model.join(int8_file),
        size,
    )?;
    let engine = int8_enc.int8.map(|e| e.name());

    let (names, pixels) = pixels(&a.images, &manifest)?;
    if !pixels.is_empty() {
        let agree = clip_compare::agreement(&f32_enc, &int8_enc, &pixels)?;
        for (name, c) in names.iter().zip(&agree.cosines) {
            println!(
                "{}",
                serde_json::json!({"image": name, "cosine_int8_to_f32": c})
            );
        }
        let cos = &agree.cosines;
        println!(
            "{}",
            serde_json::json!({
                "images": cos.len(),
                "cosine_min": cos.iter().copied().fold(f64::INFINITY, f64::min),
                "cosine_mean": cos.iter().sum::<f64>() / cos.len() as f64,
                "int8_alone_vs_batched_max_abs_diff": agree.alone_vs_batched,
            })
        );
    }
    let best = clip_compare::time_batches(&[&f32_enc, &int8_enc], &pixels, &a.batch, a.repeat)?;
    for (&b, secs) in a.batch.iter().zip(&best) {
        let (f, q) = (secs[0], secs[1]);
        println!(
            "{}",
            serde_json::json!({
                "batch": b,
                "f32_images_per_s": b as f64 / f,
                "int8_images_per_s": b as f64 / q,
                "int8_speedup": f / q,
                "rounds": a.repeat.max(1),
                "int8_engine": engine,
                "cpu": crate::device::cpu_model(),
                "threads": crate::device::threads(),
            })
        );
    }
    Ok(())
}

/// The given images preprocessed as the server does, with their names.
fn pixels(paths: &[PathBuf], manifest: &Manifest) -> Result<(Vec<String>, Vec<Vec<f32>>)> {
    let cfg = crate::engine::pipeline::preprocess_config(&manifest.image, 40_000_000);
    let files = super::image_paths(paths)?;
    let mut names = vec![];
    let mut rows = vec![];
    for f in files {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let px = crate::preprocess::preprocess_bytes(&bytes, &cfg)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        names.push(f.display().to_string());
        rows.push(px);
    }
    if !paths.is_empty() && rows.is_empty() {
        bail!("no image files among the given paths");
    }
    Ok((names, rows))
}
