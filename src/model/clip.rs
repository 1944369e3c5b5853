//! CLIP's image tower, loaded as TorchScript.
//!
//! OpenAI's JIT archives expose `encode_image`; exported image towers (scripts/export_clip.py)
//! and our tiny test encoders expose `forward`. The embedding width is read from the module by
//! running it once, never assumed.
use crate::model::int8::{self, Int8Engine};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

#[derive(Debug)]
pub struct ImageEncoder {
    module: CModule,
    use_encode_image: bool,
    /// Embedding width D (512 for ViT-B/32, 640 for RN50x4, 768 for ViT-L/14).
    pub dim: i64,
    /// Input side length the module expects (224 for most CLIP models).
    pub image_size: i64,
    pub device: Device,
    pub kind: Kind,
    /// An int8 variant (`files.encoder_int8`): int8 weights, f32 activations, CPU only;
    /// with the library its weights were packed for.
    pub int8: Option<Int8Engine>,
}

impl ImageEncoder {
    /// Loads `path` onto `device`, casts it to `kind` (f32, f16 or bf16) and probes it. An
    /// encoder that cannot run in a half type (a trace with baked f32 casts) runs in f32, its
    /// output cast, with a warning: slower, but the bundle serves.
    pub fn load(path: &Path, image_size: i64, device: Device, kind: Kind) -> Result<Self> {
        refuse_baked_devices(path, device)?;
        match Self::load_as(path, image_size, device, kind) {
            Err(half) if kind != Kind::Float => {
                let f32 = Self::load_as(path, image_size, device, Kind::Float).map_err(|_| half)?;
                tracing::warn!(
                    encoder = %path.display(),
                    dtype = crate::device::dtype_name(kind),
                    "the image encoder cannot run in this dtype (a TorchScript trace with baked casts?); it runs in f32. Re-export it with scripts/export_clip.py, which scripts it"
                );
                Ok(f32)
            }
            r => r,
        }
    }

    /// Loads an int8 archive (`scripts/export_clip.py --quantize int8`) on the CPU, its
    /// weights packed for the int8 engine faster at 16 images of 50 tokens (ViT-B/32's).
    pub fn load_int8(path: &Path, image_size: i64) -> Result<Self> {
        let engine = int8::engine_for(16 * 50)?;
        let mut enc = int8::with_engine(engine, || {
            Self::load_as(path, image_size, Device::Cpu, Kind::Float)
        })??;
        enc.int8 = Some(engine);
        Ok(enc)
    }

    fn load_as(path: &Path, image_size: i64, device: Device, kind: Kind) -> Result<Self> {
        let mut module = CModule::load_on_device(path, device)
            .with_context(|| format!("loading TorchScript image encoder {}", path.display()))?;
        module.set_eval();
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        let probe = Tensor::zeros([1, 3, image_size, image_size], (kind, device));
        let _g = tch::no_grad_guard();
        let (use_encode_image, out) = match module.method_ts("encode_image", &[&probe]) {
            Ok(out) => (true, out),
            Err(first) => match module.forward_ts(&[&probe]) {
                Ok(out) => (false, out),
                // Both errors: an encoder whose encode_image fails (e.g. a trace with baked f32
                // casts run in half precision) must not be reported as forward's complaint.
                Err(second) => bail!(
                    "{}: neither encode_image nor forward takes a [1, 3, {image_size}, {image_size}] {} image on {}.\n  encode_image: {}\n  forward: {}",
                    path.display(),
                    crate::device::dtype_name(kind),
                    crate::device::device_name(device),
                    first_line(&first.to_string()),
                    first_line(&second.to_string()),
                ),
            },
        };
        let size = out.size();
        if size.len() != 2 || size[0] != 1 {
            bail!(
                "{}: the encoder returned shape {size:?}, expected [1, D]",
                path.display()
            );
        }
        Ok(ImageEncoder {
            module,
            use_encode_image,
            dim: size[1],
            image_size,
            device,
            kind,
            int8: None,
        })
    }

    /// Normalized pixels `[B, 3, S, S]` (f32, any device) to embeddings `[B, D]` in f32.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = pixels.to_device(self.device).to_kind(self.kind);
        let _g = tch::no_grad_guard();
        let out = if self.use_encode_image {
            self.module.method_ts("encode_image", &[&x])?
        } else {
            self.module.forward_ts(&[&x])?
        };
        Ok(out.to_kind(Kind::Float))
    }
}

/// The devices a TorchScript archive's code names as constants (`torch.device("cpu")`), each
/// with how often: a trace bakes the device it ran on into every `device=x.device`, and such
/// an archive then fails on any other device with a bare device-mismatch error. A scripted
/// archive names none.
pub fn baked_devices(path: &Path) -> Result<Vec<(String, usize)>> {
    const NEEDLE: &str = "torch.device(\"";
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening TorchScript archive {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a TorchScript archive (zip)", path.display()))?;
    let mut found: std::collections::BTreeMap<String, usize> = Default::default();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let name = entry.name().to_string();
        if !(name.contains("/code/") && name.ends_with(".py")) {
            continue;
        }
        let mut code = String::new();
        std::io::Read::read_to_string(&mut entry, &mut code)
            .with_context(|| format!("reading {name} in {}", path.display()))?;
        let mut rest = code.as_str();
        while let Some(at) = rest.find(NEEDLE) {
            rest = &rest[at + NEEDLE.len()..];
            let Some(end) = rest.find('"') else { break };
            *found.entry(rest[..end].to_string()).or_default() += 1;
            rest = &rest[end..];
        }
    }
    Ok(found.into_iter().collect())
}

/// Refuses an archive whose code bakes a device of another type than `device`, naming what
/// it baked and how to fix it, instead of libtorch's device-mismatch error at the probe.
fn refuse_baked_devices(path: &Path, device: Device) -> Result<()> {
    let want = if device.is_cuda() { "cuda" } else { "cpu" };
    let other: Vec<String> = baked_devices(path)?
        .into_iter()
        .filter(|(d, _)| d.split(':').next() != Some(want))
        .map(|(d, n)| format!("{d} ({n}x)"))
        .collect();
    if !other.is_empty() {
        bail!(
            "{}: the image encoder was traced with its device baked into the graph ({}), so it cannot run on {}. Re-export it with scripts/export_clip.py, which scripts the tower and keeps the device a run-time value",
            path.display(),
            other.join(", "),
            crate::device::device_name(device)
        );
    }
    Ok(())
}

/// Stacks CHW pixel buffers into a `[B, 3, S, S]` f32 tensor on the CPU.
pub fn stack_pixels(pixels: &[&[f32]], size: i64) -> Tensor {
    let mut flat = Vec::with_capacity(pixels.len() * (3 * size * size) as usize);
    for p in pixels {
        flat.extend_from_slice(p);
    }
    Tensor::from_slice(&flat).view([pixels.len() as i64, 3, size, size])
}

/// The line of a TorchScript error that says what went wrong (its last `...Error:` line),
/// else its first line; the rest is the interpreter's and C++'s backtraces.
fn first_line(e: &str) -> &str {
    e.lines()
        .rev()
        .find(|l| l.trim_start().starts_with("RuntimeError:") || l.contains("Error: "))
        .or_else(|| e.lines().find(|l| !l.trim().is_empty()))
        .map(str::trim)
        .unwrap_or(e)
}
