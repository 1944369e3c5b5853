//! A bundle's f32 image encoder beside its int8 variant (`clipcap bench-encode`): how close
//! the int8 embeddings are, and both encoders' speed, timed in turn so a slow spell of the
//! host hits both.
use crate::model::clip::{stack_pixels, ImageEncoder};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The f32 encoder and the int8 one, both on the CPU.
pub fn load_pair(f32: &Path, int8: &Path, image_size: i64) -> Result<(ImageEncoder, ImageEncoder)> {
    let load = |p: &Path| {
        ImageEncoder::load(p, image_size, Device::Cpu, Kind::Float)
            .with_context(|| format!("loading {}", p.display()))
    };
    let int8 = ImageEncoder::load_int8(int8, image_size)
        .with_context(|| format!("loading {}", int8.display()))?;
    Ok((load(f32)?, int8))
}

/// int8 against f32 on some images.
#[derive(Debug)]
pub struct Agreement {
    /// Cosine of each image's int8 embedding to its f32 one (each image encoded alone).
    pub cosines: Vec<f64>,
    /// Largest difference between an image's int8 embedding alone and in the batch of all.
    pub alone_vs_batched: f64,
}

/// Normalized pixels (CHW f32 vectors of `size`²·3 values) as one `[N, 3, S, S]` batch.
fn stack(pixels: &[Vec<f32>], size: i64) -> Tensor {
    let rows: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    stack_pixels(&rows, size)
}

pub fn agreement(
    f32: &ImageEncoder,
    int8: &ImageEncoder,
    pixels: &[Vec<f32>],
) -> Result<Agreement> {
    let _g = tch::no_grad_guard();
    let x = stack(pixels, f32.image_size);
    let alone = |e: &ImageEncoder| -> Result<Tensor> {
        let rows: Result<Vec<Tensor>> = (0..x.size()[0])
            .map(|i| e.encode(&x.narrow(0, i, 1)))
            .collect();
        Ok(Tensor::cat(&rows?, 0))
    };
    let want = alone(f32)?;
    let got = alone(int8)?;
    let batched = int8.encode(&x)?;
    let cos = Tensor::cosine_similarity(&got, &want, 1, 1e-8).to_kind(Kind::Double);
    Ok(Agreement {
        cosines: Vec::try_from(&cos)?,
        alone_vs_batched: f64::try_from((&batched - &got).abs().max())?,
    })
}

/// Seconds per batch of each size for each encoder, the best of `rounds` (after one warm-up
/// round); batches cycle through `pixels`, or are seeded random pixels when it is empty.
pub fn time_batches(
    encoders: &[&ImageEncoder],
    pixels: &[Vec<f32>],
    batches: &[usize],
    rounds: usize,
) -> Result<Vec<Vec<f64>>> {
    let _g = tch::no_grad_guard();
    let size = encoders.first().map_or(224, |e| e.image_size);
    let pool = if pixels.is_empty() {
        tch::manual_seed(0);
        Tensor::randn([16, 3, size, size], (Kind::Float, Device::Cpu))
    } else {
        stack(pixels, size)
    };
    let n = pool.size()[0];
    let mut best = vec![vec![f64::INFINITY; encoders.len()]; batches.len()];
    for round in 0..rounds.max(1) + 1 {
        for (bi, &b) in batches.iter().enumerate() {
            let idx = Tensor::arange(b as i64, (Kind::Int64, Device::Cpu)).remainder(n);
            let x = pool.index_select(0, &idx);
            for (ei, e) in encoders.iter().enumerate() {
                let t0 = Instant::now();
                let _ = e.encode(&x)?;
                let secs = t0.elapsed().as_secs_f64();
                if round > 0 {
                    best[bi][ei] = best[bi][ei].min(secs);
                }
            }
        }
    }
    Ok(best)
}
