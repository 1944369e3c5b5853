//! ClipCap's prefix mappers: a CLIP embedding `[B, D]` becomes `L` GPT-2 input embeddings
//! `[B, L, E]`. Variable names follow the original `clip_project.*` state-dict keys, so the
//! released checkpoints load unchanged.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Tensor};

/// The prefix mapper: ClipCap's MLP, or its transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MappingType {
    Mlp,
    Transformer,
}

impl std::str::FromStr for MappingType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mlp" => Ok(MappingType::Mlp),
            "transformer" => Ok(MappingType::Transformer),
            _ => bail!("mapping must be mlp or transformer, got {s:?}"),
        }
    }
}

/// Shape of a mapper, as stored in the bundle manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapperConfig {
    pub mapping: MappingType,
    /// CLIP embedding width D.
    pub prefix_dim: i64,
    /// Number of GPT-2 prefix embeddings L.
    pub prefix_length: i64,
    /// Transformer mapper only: how many tokens the CLIP embedding is projected to.
    #[serde(default = "default_clip_length")]
    pub clip_length: i64,
    /// Transformer mapper only.
    #[serde(default = "default_layers")]
    pub num_layers: i64,
    /// L2-normalize the CLIP embedding before mapping.
    #[serde(default)]
    pub normalize_prefix: bool,
}

fn default_clip_length() -> i64 {
    10
}
fn default_layers() -> i64 {
    8
}

/// Heads of the transformer mapper's attention, fixed in the original.
const MAPPER_HEADS: i64 = 8;

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// `Linear(D, L·E/2) → Tanh → Linear(L·E/2, L·E)`, or one `Linear(D, L·E)` when L > 10
/// (the original's memory-saving branch).
#[derive(Debug)]
struct MlpMapper {
    layers: Vec<nn::Linear>,
}

#[derive(Debug)]
struct MapperLayer {
    norm1: nn::LayerNorm,
    to_queries: nn::Linear,
    to_keys_values: nn::Linear,
    project: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl MapperLayer {
    fn new(p: nn::Path, dim: i64) -> Self {
        let attn = &p / "attn";
        let mlp = &p / "mlp";
        MapperLayer {
            norm1: nn::layer_norm(&p / "norm1", vec![dim], Default::default()),
            to_queries: linear(&attn / "to_queries", dim, dim, false),
            to_keys_values: linear(&attn / "to_keys_values", dim, 2 * dim, false),
            project: linear(&attn / "project", dim, dim, true),
            norm2: nn::layer_norm(&p / "norm2", vec![dim], Default::default()),
            fc1: linear(&mlp / "fc1", dim, 2 * dim, true),
            fc2: linear(&mlp / "fc2", 2 * dim, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().unwrap();
        let hd = c / MAPPER_HEADS;
        let y = self.norm1.forward(x);
        let q = self
            .to_queries
            .forward(&y)
            .view([b, n, MAPPER_HEADS, hd])
            .transpose(1, 2);
        // The original reshapes to (b, m, 2, heads, hd): keys are the first half of the output.
        let kv = self
            .to_keys_values
            .forward(&y)
            .view([b, n, 2, MAPPER_HEADS, hd]);
        let k = kv.select(2, 0).transpose(1, 2);
        let v = kv.select(2, 1).transpose(1, 2);
        let a = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0., false, None, false,
        );
        let a = a.transpose(1, 2).reshape([b, n, c]);
        let x = x + self.project.forward(&a);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)).relu());
        x + m
    }
}

/// `Linear(D, clip_length·E)` → append learned `prefix_const [L, E]` → 8 pre-norm layers →
/// keep the last L positions.
#[derive(Debug)]
struct TransformerMapper {
    linear: nn::Linear,
    prefix_const: Tensor,
    layers: Vec<MapperLayer>,
    clip_length: i64,
}

#[derive(Debug)]
enum Inner {
    Mlp(MlpMapper),
    Transformer(TransformerMapper),
}

/// A prefix mapper with its variables under `clip_project`.
#[derive(Debug)]
pub struct Mapper {
    pub cfg: MapperConfig,
    embed_dim: i64,
    inner: Inner,
}

impl Mapper {
    /// Creates the variables under `p` (normally `root / "clip_project"`); `embed_dim` is GPT-2's
    /// width E.
    pub fn new(p: nn::Path, cfg: &MapperConfig, embed_dim: i64) -> Result<Self> {
        if cfg.prefix_dim <= 0 || cfg.prefix_length <= 0 {
            bail!("prefix_dim and prefix_length must be positive");
        }
        let (d, l, e) = (cfg.prefix_dim, cfg.prefix_length, embed_dim);
        let inner = match cfg.mapping {
            MappingType::Mlp if l > 10 => Inner::Mlp(MlpMapper {
                layers: vec![linear(p, d, l * e, true)],
            }),
            MappingType::Mlp => {
                let m = &p / "model";
                Inner::Mlp(MlpMapper {
                    layers: vec![
                        linear(&m / "0", d, l * e / 2, true),
                        linear(&m / "2", l * e / 2, l * e, true),
                    ],
                })
            }
            MappingType::Transformer => {
                if cfg.clip_length <= 0 || cfg.num_layers <= 0 {
                    bail!("clip_length and num_layers must be positive");
                }
                if e % MAPPER_HEADS != 0 {
                    bail!("GPT-2 width {e} is not divisible by the mapper's {MAPPER_HEADS} heads");
                }
                let t = &p / "transformer" / "layers";
                Inner::Transformer(TransformerMapper {
                    linear: linear(&p / "linear", d, cfg.clip_length * e, true),
                    prefix_const: p.var(
                        "prefix_const",
                        &[l, e],
                        nn::Init::Randn {
                            mean: 0.,
                            stdev: 1.,
                        },
                    ),
                    layers: (0..cfg.num_layers)
                        .map(|i| MapperLayer::new(&t / i, e))
                        .collect(),
                    clip_length: cfg.clip_length,
                })
            }
        };
        Ok(Mapper {
            cfg: cfg.clone(),
            embed_dim,
            inner,
        })
    }

    /// CLIP embeddings `[B, D]` (any float kind) to prefix embeddings `[B, L, E]`.
    pub fn forward(&self, clip: &Tensor) -> Tensor {
        let b = clip.size()[0];
        let x = if self.cfg.normalize_prefix {
            clip / clip.norm_scalaropt_dim(2, [-1], true)
        } else {
            clip.shallow_clone()
        };
        match &self.inner {
            Inner::Mlp(m) => {
                let mut h = m.layers[0].forward(&x);
                if m.layers.len() == 2 {
                    h = m.layers[1].forward(&h.tanh());
                }
                h.view([b, self.cfg.prefix_length, self.embed_dim])
            }
            Inner::Transformer(t) => {
                let h = t.linear.forward(&x).view([b, t.clip_length, -1]);
                let prefix = t.prefix_const.unsqueeze(0).expand([b, -1, -1], false);
                let mut h = Tensor::cat(&[&h, &prefix.to_kind(h.kind())], 1);
                for layer in &t.layers {
                    h = layer.forward(&h);
                }
                h.narrow(1, t.clip_length, self.cfg.prefix_length)
            }
        }
    }
}
