//! The models being served, as every door may see them (names, shapes, versions), and the
//! default. The worker owns the bundles themselves; this is the shared, read-mostly view.
use crate::engine::error::EngineError;
use crate::model::bundle::{Bundle, ImageSpec};
use crate::options::GenOptions;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// What callers may know about a served model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub dir: PathBuf,
    pub device: String,
    pub dtype: String,
    /// The image encoder's dtype: `dtype`, except int8 without an int8 encoder (f32).
    pub encoder_dtype: String,
    /// int8: the engine GPT-2's int8 weights are packed for (`clipcap` where the CPU has
    /// VNNI, else `fbgemm`), and the encoder's (`fbgemm` or `onednn`, the faster on this
    /// CPU); `CLIPCAP_INT8_ENGINE` chooses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8_engine: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_int8_engine: Option<String>,
    /// How decode steps attend over the KV cache: `sdpa` (libtorch's), or `one-query`
    /// (clipcap's CPU kernel, int8's default; `CLIPCAP_DECODE_ATTENTION` chooses).
    pub decode_attention: String,
    pub image: ImageSpec,
    pub prefix_length: i64,
    pub mapping: String,
    pub gpt2_layers: i64,
    pub gpt2_width: i64,
    /// Width of the image embeddings the mapper takes (the encoder's output).
    pub embedding_dim: i64,
    /// Bytes of GPT-2 weights one decode step reads (int8: a quarter of f32's).
    pub weight_bytes_per_step: u64,
    pub generation: GenOptions,
    /// Increments each time a model is installed under this name.
    pub version: u64,
    pub loaded_at_unix: u64,
    /// Where the weights came from (the manifest's `provenance`; `notice` is a warning for
    /// people who use it, e.g. that the demo knows synthetic shapes only).
    pub provenance: std::collections::BTreeMap<String, serde_json::Value>,
    /// The bundle's tokenizer (prompts are checked before they queue).
    #[serde(skip)]
    pub tokenizer: Arc<tokenizers::Tokenizer>,
}

impl ModelInfo {
    pub fn describe(name: &str, bundle: &Bundle, version: u64) -> Self {
        let m = &bundle.manifest;
        ModelInfo {
            name: name.to_string(),
            dir: bundle.dir.clone(),
            device: crate::device::device_name(bundle.device),
            dtype: if bundle.int8 {
                "int8".into()
            } else {
                crate::device::dtype_name(bundle.kind).into()
            },
            encoder_dtype: if bundle.encoder.int8.is_some() {
                "int8".into()
            } else {
                crate::device::dtype_name(bundle.encoder.kind).into()
            },
            int8_engine: bundle.net.gpt.int8_engine.map(|e| e.name().into()),
            encoder_int8_engine: bundle.encoder.int8.map(|e| e.name().into()),
            decode_attention: bundle.net.gpt.decode_attention.name().into(),
            image: m.image.clone(),
            prefix_length: m.mapper.prefix_length,
            mapping: format!("{:?}", m.mapper.mapping).to_lowercase(),
            gpt2_layers: m.gpt2.n_layer,
            gpt2_width: m.gpt2.n_embd,
            embedding_dim: m.mapper.prefix_dim,
            weight_bytes_per_step: bundle.net.gpt.weight_bytes_per_step(),
            generation: m.generation.clone(),
            provenance: m.provenance.clone(),
            tokenizer: bundle.tokenizer.clone(),
            version,
            loaded_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

#[derive(Default)]
pub struct Registry {
    models: RwLock<HashMap<String, ModelInfo>>,
    default_model: RwLock<String>,
}

impl Registry {
    /// The model a request names, or the default.
    pub fn resolve(&self, name: Option<&str>) -> Result<ModelInfo, EngineError> {
        let models = self.models.read().unwrap();
        let name = match name {
            Some(n) => n.to_string(),
            None => self.default_model.read().unwrap().clone(),
        };
        models.get(&name).cloned().ok_or_else(|| {
            if models.is_empty() {
                EngineError::NoModel
            } else {
                let mut served: Vec<_> = models.keys().cloned().collect();
                served.sort();
                // The name is the caller's: echoed cut, never whole.
                let name = if name.chars().count() > 64 {
                    format!("{}…", name.chars().take(64).collect::<String>())
                } else {
                    name
                };
                EngineError::UnknownModel { name, served }
            }
        })
    }

    /// Every served model, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = self.models.read().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn len(&self) -> usize {
        self.models.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn default_model(&self) -> String {
        self.default_model.read().unwrap().clone()
    }

    /// Makes `name` the default, if it is served.
    pub(crate) fn set_default(&self, name: &str) -> bool {
        let models = self.models.read().unwrap();
        if !models.contains_key(name) {
            return false;
        }
        *self.default_model.write().unwrap() = name.to_string();
        true
    }

    /// Records `info` (replacing its name's previous version); returns the replaced one.
    pub(crate) fn insert(&self, info: ModelInfo, make_default: bool) -> Option<ModelInfo> {
        let name = info.name.clone();
        let old = self.models.write().unwrap().insert(name.clone(), info);
        let mut default = self.default_model.write().unwrap();
        if make_default || default.is_empty() {
            *default = name;
        }
        old
    }

    /// Forgets `name`; the default moves to the first remaining name.
    pub(crate) fn remove(&self, name: &str) -> Option<ModelInfo> {
        let mut models = self.models.write().unwrap();
        let old = models.remove(name);
        let mut d = self.default_model.write().unwrap();
        if *d == name {
            *d = models.keys().min().cloned().unwrap_or_default();
        }
        old
    }
}
