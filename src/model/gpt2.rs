//! GPT-2 (Radford et al. 2019) in tch, shaped like Hugging Face's `GPT2LMHeadModel` so its
//! safetensors load as they are.
//!
//! ClipCap feeds GPT-2 a prefix of *embeddings*, so the model takes input embeddings; token ids
//! go through [`Gpt2::embed`]. Incremental decoding uses an explicit [`KvCache`] whose rows may
//! have different lengths (left padding, tracked by a per-row validity mask and position
//! counter), be gathered (beam search), dropped (finished requests) or joined by new rows
//! (continuous batching).
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

use crate::model::attention::{self, DecodeAttention};
use crate::model::int8::{Fused, Int8Activation, Int8Engine, Int8Matrix};
use crate::model::kv_cache::KvCache;
use crate::model::packed::{self, PackedMatrix, WeightLayout};

/// The fields of a Hugging Face GPT-2 `config.json` that shape the network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// MLP width; `None` means 4 × n_embd, as in HF.
    #[serde(default)]
    pub n_inner: Option<i64>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}

impl Gpt2Config {
    /// GPT-2 small (124M), the model the released ClipCap weights use.
    pub fn gpt2_small() -> Self {
        Gpt2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            n_inner: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading GPT-2 config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing GPT-2 config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in GPT-2 config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_embd <= 0 || self.n_head <= 0 || self.n_embd % self.n_head != 0 {
            bail!(
                "n_embd ({}) must be a positive multiple of n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if self.n_layer <= 0 || self.vocab_size <= 0 || self.n_positions <= 0 {
            bail!("n_layer, vocab_size and n_positions must be positive");
        }
        // Far above any GPT-2 (50257 tokens, 1600 wide, 48 layers, 1024 positions): a
        // manifest past these is a mistake, and would allocate without bound before the
        // weights could say so.
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("n_positions", self.n_positions, 1 << 17),
            ("n_embd", self.n_embd, 1 << 14),
            ("n_layer", self.n_layer, 512),
            ("n_head", self.n_head, 1024),
            ("n_inner", self.inner(), 1 << 16),
        ] {
            if value > max {
                bail!("{name} is {value}; at most {max}");
            }
        }
        if self.inner() <= 0 {
            bail!("n_inner must be positive");
        }
        Activation::parse(&self.activation_function)?;
        Ok(())
    }

    /// Parameters of the network (the tied lm_head counted once).
    pub fn parameters(&self) -> i64 {
        let (e, inner) = (self.n_embd, self.inner());
        let layer =
            4 * e + (3 * e * e + 3 * e) + (e * e + e) + (e * inner + inner) + (inner * e + e);
        (self.vocab_size + self.n_positions) * e + self.n_layer * layer + 2 * e
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    fn inner(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    GeluTanh,
    GeluExact,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluExact,
            "relu" => Activation::Relu,
            other => bail!("unsupported activation_function {other:?}"),
        })
    }

    /// The same activation fused into an int8 product, where the kernel has it.
    fn for_int8(self) -> Option<Int8Activation> {
        match self {
            Activation::GeluTanh => Some(Int8Activation::GeluTanh),
            Activation::Relu => Some(Int8Activation::Relu),
            Activation::GeluExact => None,
        }
    }

    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::GeluExact => x.gelu("none"),
            Activation::Relu => x.relu(),
        }
    }
}

/// HF's `Conv1D`: a linear layer whose weight is stored `[in, out]`. Kept in that layout so the
/// checkpoint loads without a transpose, and applied with one fused `addmm`.
#[derive(Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    /// `weight` packed for MKL, when packed for CPU inference (see `Gpt2::pack_for_cpu`).
    packed: Option<PackedMatrix>,
    /// `weight` in int8, for int8 inference (see `Gpt2::quantize_int8`).
    int8: Option<Int8Matrix>,
}

impl Conv1D {
    fn new(p: nn::Path, n_in: i64, n_out: i64) -> Self {
        let weight = p.var(
            "weight",
            &[n_in, n_out],
            nn::Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        );
        let bias = p.var("bias", &[n_out], nn::Init::Const(0.));
        Conv1D {
            weight,
            bias,
            packed: None,
            int8: None,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let n_in = *shape.last().unwrap();
        let x2 = x.reshape([-1, n_in]);
        let out = match (&self.int8, &self.packed) {
            (Some(q), _) if packed_input(x) => q.linear(&x2, Some(&self.bias)),
            (_, Some(p)) if packed_input(x) => p.matmul(&x2, Some(&self.bias)),
            _ => self.bias.addmm(&x2, &self.weight),
        };
        *shape.last_mut().unwrap() = self.weight.size()[1];
        out.reshape(shape)
    }

    /// `act(self(ln(x)))`: one fused call on int8 weights (when the kernel has `act`), else
    /// the three passes `forward` and its neighbours make.
    fn after(&self, ln: &LayerNorm, x: &Tensor, act: Option<Activation>) -> Tensor {
        if let Some(q) = self.int8.as_ref().filter(|_| packed_input(x)) {
            let fusable = match act {
                None => Some(Int8Activation::None),
                Some(a) => a.for_int8(),
            };
            if let Some(activation) = fusable {
                let fused = Fused {
                    layer_norm: Some((&ln.weight, &ln.bias, ln.eps)),
                    activation,
                    residual: None,
                };
                return q.linear_fused(x, Some(&self.bias), fused);
            }
        }
        let y = self.forward(&ln.forward(x));
        match act {
            Some(a) => a.apply(&y),
            None => y,
        }
    }

    /// `residual + self(x)`, in one call on int8 weights. (Float addition commutes exactly, so
    /// f32 gets the same bits as `residual + forward(x)`.)
    fn plus(&self, x: &Tensor, residual: &Tensor) -> Tensor {
        if let Some(q) = self
            .int8
            .as_ref()
            .filter(|_| packed_input(x) && packed_input(residual))
        {
            let fused = Fused {
                residual: Some(residual),
                ..Fused::default()
            };
            return q.linear_fused(x, Some(&self.bias), fused);
        }
        residual + self.forward(x)
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.)),
            bias: p.var("bias", &[dim], nn::Init::Const(0.)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *x.size().last().unwrap();
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

impl Block {
    /// The four linear layers, for packing or quantizing them alike.
    fn linears_mut(&mut self) -> [&mut Conv1D; 4] {
        [
            &mut self.c_attn,
            &mut self.attn_proj,
            &mut self.c_fc,
            &mut self.mlp_proj,
        ]
    }

    fn new(p: nn::Path, cfg: &Gpt2Config) -> Self {
        let e = cfg.n_embd;
        let attn = &p / "attn";
        let mlp = &p / "mlp";
        Block {
            ln_1: LayerNorm::new(&p / "ln_1", e, cfg.layer_norm_epsilon),
            c_attn: Conv1D::new(&attn / "c_attn", e, 3 * e),
            attn_proj: Conv1D::new(&attn / "c_proj", e, e),
            ln_2: LayerNorm::new(&p / "ln_2", e, cfg.layer_norm_epsilon),
            c_fc: Conv1D::new(&mlp / "c_fc", e, cfg.inner()),
            mlp_proj: Conv1D::new(&mlp / "c_proj", cfg.inner(), e),
        }
    }
}

/// What attention may look at during one forward call.
enum AttnMask {
    /// Every cached key is valid and the new tokens are causal among themselves.
    None,
    Causal,
    /// Explicit `[B, 1, T, S]` boolean mask (true = may attend).
    Explicit(Tensor),
}

/// Whether a packed weight may take `x`: f32 on the CPU, outside autograd.
fn packed_input(x: &Tensor) -> bool {
    x.device() == Device::Cpu && x.kind() == Kind::Float && !x.requires_grad()
}

/// GPT-2 with its language-model head tied to the token embedding.
#[derive(Debug)]
pub struct Gpt2 {
    pub cfg: Gpt2Config,
    act: Activation,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `wte` packed as the lm_head's matrix, when packed for CPU inference.
    lm_head: Option<PackedMatrix>,
    /// `wte` in int8 as the lm_head's matrix, for int8 inference.
    lm_head_int8: Option<Int8Matrix>,
    /// The library the int8 weights are packed for (`quantize_int8`).
    pub int8_engine: Option<Int8Engine>,
    /// An f32 copy of `wte` for the lm_head of a half-precision model (see
    /// [`Gpt2::keep_f32_head`]).
    head_f32: Option<Tensor>,
    /// How one-token steps attend over the cache (`model::attention`): SDPA, except int8.
    pub decode_attention: DecodeAttention,
}

impl Gpt2 {
    /// Creates the variables under `p` with `GPT2LMHeadModel` names: `p/transformer/wte/weight`,
    /// `p/transformer/h/0/attn/c_attn/weight`, … (`lm_head` is tied to `wte`).
    pub fn new(p: nn::Path, cfg: &Gpt2Config) -> Result<Self> {
        cfg.validate()?;
        let t = &p / "transformer";
        let init = nn::Init::Randn {
            mean: 0.,
            stdev: 0.02,
        };
        let wte = (&t / "wte").var("weight", &[cfg.vocab_size, cfg.n_embd], init);
        let wpe = (&t / "wpe").var("weight", &[cfg.n_positions, cfg.n_embd], init);
        let h = &t / "h";
        let blocks = (0..cfg.n_layer).map(|i| Block::new(&h / i, cfg)).collect();
        let ln_f = LayerNorm::new(&t / "ln_f", cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Gpt2 {
            cfg: cfg.clone(),
            act: Activation::parse(&cfg.activation_function)?,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head: None,
            lm_head_int8: None,
            int8_engine: None,
            head_f32: None,
            decode_attention: DecodeAttention::Sdpa,
        })
    }

    /// Packs every linear weight and the lm_head for MKL's GEMM (f32 on the CPU only; see
    /// `model::packed`), about twice as fast per decoded token. Only for weights that no longer
    /// change (a loaded bundle): the packed copies do not follow later updates. Returns whether
    /// it packed.
    pub fn pack_for_cpu(&mut self) -> bool {
        if self.device() != Device::Cpu || self.kind() != Kind::Float || !packed::available() {
            return false;
        }
        let _guard = tch::no_grad_guard();
        for blk in &mut self.blocks {
            for lin in blk.linears_mut() {
                lin.packed = PackedMatrix::new(&lin.weight, WeightLayout::InOut);
                if lin.packed.is_none() {
                    return false;
                }
            }
        }
        self.lm_head = PackedMatrix::new(&self.wte, WeightLayout::OutIn);
        self.lm_head.is_some()
    }

    /// Quantizes every linear weight and the lm_head to int8 per output channel, for f32
    /// activations on the CPU (`model::int8`); LayerNorm, attention, softmax and everything
    /// after the logits stay f32. Only for weights that no longer change (a loaded bundle).
    /// Returns the bytes of weights a decode step then reads.
    pub fn quantize_int8(&mut self) -> Result<u64> {
        if self.device() != Device::Cpu || self.kind() != Kind::Float {
            anyhow::bail!("int8 weights need an f32 model on the CPU");
        }
        let _guard = tch::no_grad_guard();
        // clipcap's own GEMM where the CPU has VNNI, else fbgemm (not timed: one product does
        // not predict a whole step; on a Xeon one favoured oneDNN, whose one-image steps were
        // 1.6x slower while 16 images gained 1.1x).
        let engine = Int8Engine::for_gpt2()?;
        let mut bytes = 0;
        for blk in &mut self.blocks {
            for lin in blk.linears_mut() {
                let q = Int8Matrix::new(engine, &lin.weight.tr())?;
                bytes += q.weight_bytes();
                lin.int8 = Some(q);
                lin.packed = None;
            }
        }
        let head = Int8Matrix::new(engine, &self.wte)?;
        bytes += head.weight_bytes();
        self.lm_head_int8 = Some(head);
        self.lm_head = None;
        self.int8_engine = Some(engine);
        self.decode_attention = DecodeAttention::OneQuery;
        Ok(bytes)
    }

    /// Bytes of weights one decode step reads: every linear weight and the lm_head, at the
    /// width they are stored in for inference.
    pub fn weight_bytes_per_step(&self) -> u64 {
        let per = |n: i64, q: &Option<Int8Matrix>| -> u64 {
            match q {
                Some(m) => m.weight_bytes(),
                None => n as u64 * self.kind().elt_size_in_bytes() as u64,
            }
        };
        let mut bytes = per(self.wte.numel() as i64, &self.lm_head_int8);
        for blk in &self.blocks {
            for lin in [&blk.c_attn, &blk.attn_proj, &blk.c_fc, &blk.mlp_proj] {
                bytes += per(lin.weight.numel() as i64, &lin.int8);
            }
        }
        bytes
    }

    pub fn device(&self) -> Device {
        self.wte.device()
    }

    pub fn kind(&self) -> Kind {
        self.wte.kind()
    }

    /// Token ids `[B, T]` to input embeddings `[B, T, E]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.wte, ids, -1, false, false)
    }

    /// For inference in f16/bf16: computes the lm_head in f32 from an f32 copy of `wte`
    /// (vocab × width × 4 bytes more). In bf16, logits of 10-20 would land on steps of
    /// 0.06-0.125, and beam search would rank ties by top-k's order. Only for weights that no
    /// longer change (a loaded bundle).
    pub fn keep_f32_head(&mut self) {
        if self.kind() != Kind::Float {
            let _guard = tch::no_grad_guard();
            self.head_f32 = Some(self.wte.detach().to_kind(Kind::Float));
        }
    }

    /// Hidden states `[.., E]` to vocabulary logits `[.., V]` (tied head); f32 for a model
    /// that kept an f32 head.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        if let Some(w) = &self.head_f32 {
            return hidden.to_kind(Kind::Float).matmul(&w.tr());
        }
        if let Some(q) = &self.lm_head_int8 {
            if packed_input(hidden) {
                return q.linear(hidden, None);
            }
        }
        match &self.lm_head {
            Some(p) if packed_input(hidden) => {
                let mut shape = hidden.size();
                let e = *shape.last().unwrap();
                *shape.last_mut().unwrap() = self.cfg.vocab_size;
                p.matmul(&hidden.reshape([-1, e]), None).reshape(shape)
            }
            _ => hidden.matmul(&self.wte.tr()),
        }
    }

    /// Runs `embeds` `[B, T, E]` after what `cache` already holds and appends their keys and
    /// values to it. `valid` `[B, T]` (bool) marks real tokens; `None` means all are real.
    /// Returns the final hidden states `[B, T, E]` (after `ln_f`).
    pub fn forward(&self, embeds: &Tensor, valid: Option<&Tensor>, cache: &mut KvCache) -> Tensor {
        self.forward_with_dropout(embeds, valid, cache, 0.0)
    }

    /// `forward` with GPT-2's training-time dropout of probability `p` (HF's embd_pdrop,
    /// attn_pdrop and resid_pdrop, all 0.1 in GPT-2's config): on the input embeddings, the
    /// attention weights, and each block's two residual branches. `p = 0` is `forward`.
    // `x = x + …` on purpose: an in-place `+=` would break autograd when training.
    #[allow(clippy::assign_op_pattern)]
    fn forward_with_dropout(
        &self,
        embeds: &Tensor,
        valid: Option<&Tensor>,
        cache: &mut KvCache,
        p: f64,
    ) -> Tensor {
        let drop_out = |x: Tensor| if p > 0.0 { x.dropout(p, true) } else { x };
        let (b, t, e) = embeds.size3().expect("embeds must be [B, T, E]");
        assert_eq!(b, cache.rows(), "cache rows and batch size differ");
        assert_eq!(e, self.cfg.n_embd, "embedding width differs from n_embd");
        let device = embeds.device();
        let valid = match valid {
            Some(v) => {
                let v = v.to_kind(Kind::Bool);
                // One host read per prefill (never per decoded token): does any row pad?
                if !bool::try_from(v.all()).unwrap_or(false) {
                    cache.padded = true;
                }
                v
            }
            None => Tensor::ones([b, t], (Kind::Bool, device)),
        };
        cache.reserve(t);
        // Position ids count only real tokens, so left padding does not shift them.
        let counts = valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
        let positions =
            (cache.next_pos.unsqueeze(1) + &counts - 1).clamp(0, self.cfg.n_positions - 1);
        let _ = cache.next_pos.g_add_(&counts.select(1, t - 1));

        let start = cache.len;
        cache.valid.narrow(1, start, t).copy_(&valid);
        let total = start + t;
        let causal_from = |start: i64| {
            let q = Tensor::arange_start(start, total, (Kind::Int64, device)).view([t, 1]);
            let k = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
            (
                k.le_tensor(&q).view([1, 1, t, total]),
                k.eq_tensor(&q).view([1, 1, t, total]),
            )
        };
        let mask = if cache.padded {
            let keys = cache.valid.narrow(1, 0, total).view([b, 1, 1, total]);
            let (causal, diag) = causal_from(start);
            // A query may always see itself, so fully padded rows stay finite (no NaN).
            AttnMask::Explicit(keys.logical_and(&causal).logical_or(&diag))
        } else if t == 1 {
            AttnMask::None
        } else if start == 0 {
            AttnMask::Causal
        } else {
            AttnMask::Explicit(causal_from(start).0)
        };

        let mut x = drop_out(
            embeds
                + self
                    .wpe
                    .index_select(0, &positions.view([-1]))
                    .view([b, t, e]),
        );
        let (h, d) = (self.cfg.n_head, self.cfg.head_dim());
        for (i, blk) in self.blocks.iter().enumerate() {
            let qkv = blk.c_attn.after(&blk.ln_1, &x, None);
            let parts = qkv.split(e, 2);
            let heads = |t_: &Tensor| t_.view([b, t, h, d]).transpose(1, 2);
            let (q, k, v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
            cache.k[i].narrow(2, start, t).copy_(&k);
            cache.v[i].narrow(2, start, t).copy_(&v);
            let mut keys = cache.k[i].narrow(2, 0, total);
            let mut values = cache.v[i].narrow(2, 0, total);
            let one_query = self.decode_attention == DecodeAttention::OneQuery
                && p == 0.0
                && attention::fits(&q, &keys);
            if !one_query && keys.kind() != q.kind() {
                // SDPA takes one dtype: an f16 cache is widened (prefills, not decode steps).
                keys = keys.to_kind(q.kind());
                values = values.to_kind(q.kind());
            }
            let a = match &mask {
                _ if one_query => {
                    let keep = match &mask {
                        AttnMask::Explicit(m) => Some(m),
                        _ => None,
                    };
                    attention::one_query(&q, &keys, &values, keep)
                }
                AttnMask::None => Tensor::scaled_dot_product_attention::<Tensor>(
                    &q, &keys, &values, None, p, false, None, false,
                ),
                AttnMask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(
                    &q, &keys, &values, None, p, true, None, false,
                ),
                AttnMask::Explicit(m) => Tensor::scaled_dot_product_attention(
                    &q,
                    &keys,
                    &values,
                    Some(m),
                    p,
                    false,
                    None,
                    false,
                ),
            };
            let a = if one_query {
                a // already [B, 1, E]
            } else {
                a.transpose(1, 2).reshape([b, t, e])
            };
            // Without dropout, the residual additions fuse into int8 products.
            x = if p > 0.0 {
                x + drop_out(blk.attn_proj.forward(&a))
            } else {
                blk.attn_proj.plus(&a, &x)
            };
            let m = blk.c_fc.after(&blk.ln_2, &x, Some(self.act));
            x = if p > 0.0 {
                x + drop_out(blk.mlp_proj.forward(&m))
            } else {
                blk.mlp_proj.plus(&m, &x)
            };
        }
        cache.len = total;
        self.ln_f.forward(&x)
    }

    /// Full-sequence forward without keeping a cache (training, scoring).
    pub fn forward_full(&self, embeds: &Tensor, valid: Option<&Tensor>) -> Tensor {
        self.forward_full_with_dropout(embeds, valid, 0.0)
    }

    /// `forward_full` with training-time dropout `p` (see `forward_with_dropout`).
    pub fn forward_full_with_dropout(
        &self,
        embeds: &Tensor,
        valid: Option<&Tensor>,
        p: f64,
    ) -> Tensor {
        let (b, t, _) = embeds.size3().expect("embeds must be [B, T, E]");
        let mut cache = KvCache::new(&self.cfg, b, t, embeds.device(), embeds.kind());
        self.forward_with_dropout(embeds, valid, &mut cache, p)
    }

    /// A fresh cache for `rows` sequences of up to `capacity` tokens, on this model's device,
    /// in the model's dtype, except int8's one-query decoding: f16, half the bytes the kernel
    /// streams (SDPA would widen an f16 cache at every step).
    pub fn new_cache(&self, rows: i64, capacity: i64) -> KvCache {
        let f16 = self.lm_head_int8.is_some() && self.decode_attention == DecodeAttention::OneQuery;
        let kind = if f16 { Kind::Half } else { self.kind() };
        KvCache::new(&self.cfg, rows, capacity, self.device(), kind)
    }
}

/// A GPT-2 that owns its variables (for inference and tests).
pub struct Gpt2Model {
    pub vs: nn::VarStore,
    pub gpt: Gpt2,
}

impl Gpt2Model {
    /// Loads a Hugging Face GPT-2 (`config.json` + `model.safetensors`) from a folder.
    pub fn load_hf(dir: &Path, device: Device) -> Result<Self> {
        let cfg = Gpt2Config::from_file(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let gpt = Gpt2::new(vs.root() / "gpt", &cfg)?;
        let file = dir.join("model.safetensors");
        crate::model::weights::load_gpt2_safetensors(&mut vs, &file, "", "gpt.")?;
        Ok(Gpt2Model { vs, gpt })
    }
}
