//! Image bytes → normalized pixel batch → CLIP embeddings, shared by the CLI, eval, prepare
//! and the server.
use crate::model::bundle::{Bundle, ImageSpec};
use crate::preprocess::{self, ImageError, PreprocessConfig};
use anyhow::Result;
use tch::{Kind, Tensor};

/// Preprocessing settings for a bundle's encoder.
pub fn preprocess_config(spec: &ImageSpec, max_pixels: u64) -> PreprocessConfig {
    PreprocessConfig {
        size: spec.size as u32,
        mean: spec.mean,
        std: spec.std,
        max_pixels,
    }
}

/// Decodes and preprocesses many images on all cores (`std::thread::scope`), keeping order.
pub fn preprocess_many(
    images: &[Vec<u8>],
    cfg: &PreprocessConfig,
) -> Vec<Result<Vec<f32>, ImageError>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(images.len().max(1));
    let chunk = images.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|b| preprocess::preprocess_bytes(b, cfg))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("preprocessing thread panicked"))
            .collect()
    })
}

/// Stacks CHW pixel buffers into a `[B, 3, S, S]` f32 tensor on the CPU.
pub fn stack_pixels(pixels: &[&[f32]], size: i64) -> Tensor {
    let mut flat = Vec::with_capacity(pixels.len() * (3 * size * size) as usize);
    for p in pixels {
        flat.extend_from_slice(p);
    }
    Tensor::from_slice(&flat).view([pixels.len() as i64, 3, size, size])
}

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
