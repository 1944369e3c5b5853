//! Image bytes → normalized pixels → CLIP embeddings: the worker's encoder step, and
//! `prepare`'s feature extraction.
use crate::model::bundle::{Bundle, ImageSpec};
use crate::preprocess::{self, ImageError, PreprocessConfig};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// Preprocessing settings for a bundle's encoder.
pub fn preprocess_config(spec: &ImageSpec, max_pixels: u64) -> PreprocessConfig {
    PreprocessConfig {
        size: spec.size as u32,
        mean: spec.mean,
        std: spec.std,
        max_pixels,
    }
}

/// Decodes and preprocesses many images on all cores, keeping order.
pub fn preprocess_many(
    images: &[Vec<u8>],
    cfg: &PreprocessConfig,
) -> Vec<Result<Vec<f32>, ImageError>> {
    crate::parallel::map_chunks(images, |b| preprocess::preprocess_bytes(b, cfg))
}

pub use crate::model::clip::stack_pixels;

/// CLIP embeddings `[B, D]` (f32, on the bundle's device) for preprocessed images, encoded in
/// chunks of `batch`.
pub fn encode(bundle: &Bundle, pixels: &[&[f32]], batch: usize) -> Result<Tensor> {
    let size = bundle.manifest.image.size;
    let mut parts = vec![];
    for chunk in pixels.chunks(batch.max(1)) {
        let x = stack_pixels(chunk, size).to_device(bundle.device);
        parts.push(bundle.encoder.encode(&x)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros(
            [0, bundle.encoder.dim],
            (Kind::Float, bundle.device),
        ));
    }
    Ok(Tensor::cat(&parts, 0))
}

/// Caller-provided embeddings (one `[D]` row per image) as a `[B, D]` f32 tensor on `device`.
pub fn embeddings_tensor(rows: &[Vec<f32>], device: Device) -> Tensor {
    let dim = rows.first().map_or(0, |r| r.len()) as i64;
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, dim])
        .to_device(device)
}
