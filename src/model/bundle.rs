//! A model bundle: one directory with everything needed to caption.
//!
//! ```text
//! clipcap.json       manifest (format version, shapes, stop tokens, generation defaults, provenance)
//! clip_image.pt      CLIP image tower as TorchScript
//! model.safetensors  mapper (`clip_project.*`) + GPT-2 (`gpt.transformer.*`) weights
//! tokenizer.json     GPT-2 byte-level BPE for the `tokenizers` crate
//! ```
use crate::model::attention::DecodeAttention;
use crate::model::clip::ImageEncoder;
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::model::mapper::{Mapper, MapperConfig};
use crate::model::weights;
use crate::options::GenOptions;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};
use tokenizers::Tokenizer;

pub const MANIFEST: &str = "clipcap.json";
pub const FORMAT: &str = "clipcap-bundle";
pub const FORMAT_VERSION: u32 = 1;

/// Image preprocessing the encoder was trained with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub size: i64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            size: 224,
            mean: crate::preprocess::CLIP_MEAN,
            std: crate::preprocess::CLIP_STD,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleFiles {
    pub encoder: String,
    pub weights: String,
    pub tokenizer: String,
    /// The image encoder's int8 variant for `--dtype int8` on the CPU
    /// (`scripts/export_clip.py --quantize int8`); without it int8 encodes in f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_int8: Option<String>,
}

impl BundleFiles {
    /// Every file the manifest names, in a fixed order.
    pub fn all(&self) -> Vec<&String> {
        let mut files = vec![&self.encoder, &self.weights, &self.tokenizer];
        files.extend(self.encoder_int8.as_ref());
        files
    }
}

impl Default for BundleFiles {
    fn default() -> Self {
        BundleFiles {
            encoder: "clip_image.pt".into(),
            weights: "model.safetensors".into(),
            tokenizer: "tokenizer.json".into(),
            encoder_int8: None,
        }
    }
}

/// The manifest, `clipcap.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub name: String,
    pub mapper: MapperConfig,
    pub gpt2: Gpt2Config,
    #[serde(default)]
    pub image: ImageSpec,
    #[serde(default)]
    pub files: BundleFiles,
    /// Generation stops after any of these; `"."` for the released ClipCap weights (it is
    /// encoded and its first token used, as the original does), `"<|endoftext|>"` for ours.
    pub stop_tokens: Vec<String>,
    #[serde(default)]
    pub generation: GenOptions,
    /// Where the weights came from (free-form: source checkpoint, training run, dataset…).
    #[serde(default)]
    pub provenance: BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        // A named pipe or device here would block the reader forever.
        let size = regular_file(&path)?;
        if size > MAX_MANIFEST_BYTES {
            bail!(
                "{}: {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading bundle manifest {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing bundle manifest {}", path.display()))?;
        if m.format != FORMAT {
            bail!(
                "{}: format is {:?}, expected {FORMAT:?}",
                path.display(),
                m.format
            );
        }
        if m.version != FORMAT_VERSION {
            bail!(
                "{}: bundle format version {} is not supported (this build reads {FORMAT_VERSION})",
                path.display(),
                m.version
            );
        }
        m.gpt2
            .validate()
            .with_context(|| format!("{}: gpt2", path.display()))?;
        let mp = &m.mapper;
        for (name, value, max) in [
            ("prefix_dim", mp.prefix_dim, 1 << 16),
            ("prefix_length", mp.prefix_length, 4096),
            ("clip_length", mp.clip_length, 4096),
            ("num_layers", mp.num_layers, 128),
            ("image.size", m.image.size, 4096),
        ] {
            if value <= 0 || value > max {
                bail!(
                    "{}: mapper {name} is {value}; it must be 1 to {max}",
                    path.display()
                );
            }
        }
        if m.stop_tokens.is_empty() {
            bail!("{}: stop_tokens is empty", path.display());
        }
        Ok(m)
    }

    /// Writes the manifest atomically (temp file + rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::fsutil::write_atomic(&dir.join(MANIFEST), text.as_bytes())
    }
}

/// The largest manifest read (a real one is a few kB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The size of `path`, which must be a regular file (after symlinks): a named pipe, device
/// or folder is refused before anything opens it.
pub fn regular_file(path: &Path) -> Result<u64> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("bundle file {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(meta.len())
}

/// The trainable part of a bundle: mapper + GPT-2 in one `VarStore`, with ClipCap's names.
pub struct CaptionNet {
    pub vs: nn::VarStore,
    pub gpt: Gpt2,
    pub mapper: Mapper,
}

impl CaptionNet {
    /// Fresh (randomly initialised) variables.
    pub fn new(gpt2: &Gpt2Config, mapper: &MapperConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let gpt = Gpt2::new(vs.root() / "gpt", gpt2)?;
        let mapper = Mapper::new(vs.root() / "clip_project", mapper, gpt2.n_embd)?;
        Ok(CaptionNet { vs, gpt, mapper })
    }

    /// Loads `clip_project.*` and `gpt.*` tensors from a bundle weights file, strictly.
    pub fn load_weights(&mut self, file: &Path) -> Result<()> {
        let mut named = BTreeMap::new();
        for (name, t) in weights::read_safetensors(file)? {
            if name.starts_with("clip_project.") {
                named.insert(name, t);
            } else if let Some(v) = weights::gpt2_var_name(&name, "gpt.", "gpt.") {
                named.insert(v, t);
            } else {
                bail!("{}: unexpected tensor {name}", file.display());
            }
        }
        weights::untie_check(&mut named, "gpt.", file)?;
        weights::copy_into(&self.vs, "clip_project.", &named, file)?;
        weights::copy_into(&self.vs, "gpt.", &named, file)
    }

    /// Saves every variable (f32) to a safetensors file atomically.
    pub fn save_weights(&self, file: &Path) -> Result<()> {
        let vars = self.vs.variables();
        let named: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, t)| (n.clone(), t.to_kind(Kind::Float).to_device(Device::Cpu)))
            .collect();
        crate::fsutil::replace_with(file, |tmp| {
            Tensor::write_safetensors(&named, tmp)
                .with_context(|| format!("writing {}", file.display()))
        })
    }

    /// Prefix embeddings for CLIP embeddings `[B, D]`, in GPT-2's dtype.
    pub fn prefix(&self, clip: &Tensor) -> Tensor {
        self.mapper
            .forward(&clip.to_device(self.gpt.device()).to_kind(self.gpt.kind()))
    }
}

/// A loaded bundle, ready to caption on one device.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub encoder: ImageEncoder,
    pub net: CaptionNet,
    pub tokenizer: Arc<Tokenizer>,
    /// Token ids that end a caption.
    pub stop_ids: Vec<i64>,
    pub device: Device,
    pub kind: Kind,
    /// GPT-2's linear weights are int8 (`--dtype int8`; activations f32, CPU only).
    pub int8: bool,
}

impl Bundle {
    /// Loads and validates a bundle directory. `kind` is the compute dtype (f32, f16 or bf16,
    /// on either device; the lm_head and everything after it stay f32).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        // `Kind::QInt8` asks for int8 weights with f32 activations (`DtypeChoice::Int8`).
        let int8 = kind == Kind::QInt8;
        let kind = if int8 { Kind::Float } else { kind };
        if int8 && device != Device::Cpu {
            bail!("int8 weights run on the CPU only (fbgemm's kernels); on CUDA use f16 or bf16");
        }
        let manifest = Manifest::read(dir)?;
        let files = &manifest.files;
        for f in files.all() {
            regular_file(&dir.join(f))?;
        }
        // The shapes the manifest claims must fit in the weights file (stored at 2 bytes a
        // value or more) before anything is allocated for them.
        let weights = dir.join(&files.weights);
        let need = manifest.gpt2.parameters().saturating_mul(2) as u64;
        let have = regular_file(&weights)?;
        if have < need {
            bail!(
                "{}: the manifest's GPT-2 ({} parameters) needs at least {need} bytes of weights; the file has {have}",
                weights.display(),
                manifest.gpt2.parameters()
            );
        }
        let tok_path = dir.join(&files.tokenizer);
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", tok_path.display()))?;
        let vocab = tokenizer.get_vocab_size(true) as i64;
        if vocab > manifest.gpt2.vocab_size {
            bail!(
                "{}: tokenizer has {vocab} tokens but gpt2.vocab_size is {}",
                tok_path.display(),
                manifest.gpt2.vocab_size
            );
        }
        let stop_ids = stop_token_ids(&tokenizer, &manifest.stop_tokens)
            .with_context(|| format!("{}: stop_tokens", dir.join(MANIFEST).display()))?;

        let int8_encoder = files.encoder_int8.as_ref().filter(|_| int8);
        if int8 && int8_encoder.is_none() {
            tracing::warn!(
                bundle = %dir.display(),
                "the bundle has no int8 image encoder (files.encoder_int8; make one with scripts/export_clip.py --quantize int8): images are encoded in f32"
            );
        }
        let enc_path = dir.join(int8_encoder.unwrap_or(&files.encoder));
        let encoder = match int8_encoder {
            Some(_) => ImageEncoder::load_int8(&enc_path, manifest.image.size)?,
            None => ImageEncoder::load(&enc_path, manifest.image.size, device, kind)?,
        };
        if encoder.dim != manifest.mapper.prefix_dim {
            bail!(
                "{}: the encoder outputs {} values but mapper.prefix_dim is {}",
                enc_path.display(),
                encoder.dim,
                manifest.mapper.prefix_dim
            );
        }
        let mut net = CaptionNet::new(&manifest.gpt2, &manifest.mapper, device)?;
        net.load_weights(&dir.join(&files.weights))?;
        net.vs.freeze();
        if kind != Kind::Float {
            net.vs.set_kind(kind);
            net.gpt.keep_f32_head();
        }
        if int8 {
            let bytes = net.gpt.quantize_int8()?;
            tracing::debug!(bytes, "GPT-2 weights quantized to int8");
        } else {
            let packed = net.gpt.pack_for_cpu();
            tracing::debug!(packed, "GPT-2 weights packed for MKL");
        }
        net.gpt.decode_attention = DecodeAttention::from_env_or(net.gpt.decode_attention)?;
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            encoder,
            net,
            tokenizer: Arc::new(tokenizer),
            stop_ids,
            device,
            kind,
            int8,
        })
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Decodes generated ids to text (special tokens such as `<|endoftext|>` dropped).
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids, true).unwrap_or_default()
    }

    /// A caption's text: the prompt's tokens and the generated ones decoded together (so a
    /// character split between them comes out whole), trimmed.
    pub fn caption_text(&self, prompt: &[i64], generated: &[i64]) -> String {
        if prompt.is_empty() {
            return self.decode(generated).trim().to_string();
        }
        let all: Vec<i64> = prompt.iter().chain(generated).copied().collect();
        self.decode(&all).trim().to_string()
    }

    /// Encodes a prompt (no special tokens); empty text is no tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        encode_prompt(&self.tokenizer, text)
    }
}

/// A prompt's token ids (no special tokens added).
pub fn encode_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    if text.is_empty() {
        return Ok(vec![]);
    }
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

/// Resolves stop tokens: a special/added token by its id, anything else by the first token of
/// its encoding (ClipCap's `tokenizer.encode(stop_token)[0]`).
pub fn stop_token_ids(tok: &Tokenizer, stops: &[String]) -> Result<Vec<i64>> {
    let mut ids = vec![];
    for s in stops {
        if let Some(id) = tok.token_to_id(s) {
            if tok.get_added_vocabulary().is_special_token(s) || s.starts_with("<|") {
                ids.push(id as i64);
                continue;
            }
        }
        let enc = tok
            .encode(s.as_str(), false)
            .map_err(|e| anyhow::anyhow!("encoding stop token {s:?}: {e}"))?;
        match enc.get_ids().first() {
            Some(&id) => ids.push(id as i64),
            None => bail!("stop token {s:?} encodes to nothing"),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
