//! How a decode step attends over the KV cache. libtorch's SDPA runs one new token's
//! attention as one small matrix-vector product per (row, head), which at 16 images × 5 beams
//! × 12 heads was a quarter of an int8 step; `attention.cpp` streams each (row, head)'s keys
//! and values once instead (f32, f32 sums). Its roundings differ from SDPA's, so the f32 path
//! keeps SDPA, whose captions are held token for token to the original's; int8, which already
//! rounds differently, takes the kernel, with its cache in f16: half the bytes a step streams
//! (keys and values of GPT-2 are far inside f16's range, and its 11-bit mantissa rounds 20×
//! finer than the int8 weights do).
use anyhow::{bail, Result};
#[cfg_attr(not(clipcap_int8), allow(unused_imports))]
use std::ffi::{c_char, c_void};
use tch::{Device, Kind, Tensor};

/// The attention of one-token decode steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeAttention {
    /// libtorch's `scaled_dot_product_attention`.
    Sdpa,
    /// `attention.cpp`'s one-query kernel (f32 on the CPU; other steps use SDPA).
    OneQuery,
}

impl DecodeAttention {
    pub fn name(self) -> &'static str {
        match self {
            DecodeAttention::Sdpa => "sdpa",
            DecodeAttention::OneQuery => "one-query",
        }
    }

    /// `CLIPCAP_DECODE_ATTENTION` (`sdpa` | `one-query`) when set, else `default`: the knob
    /// that lets a benchmark compare the two on one dtype.
    pub fn from_env_or(default: DecodeAttention) -> Result<DecodeAttention> {
        match std::env::var("CLIPCAP_DECODE_ATTENTION") {
            Err(_) => Ok(default),
            Ok(v) => match v.as_str() {
                "sdpa" => Ok(DecodeAttention::Sdpa),
                "one-query" => Ok(DecodeAttention::OneQuery),
                other => bail!("CLIPCAP_DECODE_ATTENTION is {other:?}; expected sdpa or one-query"),
            },
        }
    }
}

#[cfg(clipcap_int8)]
unsafe extern "C" {
    fn clipcap_attend_one(
        q: *const c_void,
        keys: *const c_void,
        values: *const c_void,
        keep: *const c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
}

/// Whether [`one_query`] can take these tensors: f32 on the CPU, outside autograd, one query,
/// and the kernel built (`build.rs` found libtorch's headers).
pub fn fits(q: &Tensor, keys: &Tensor) -> bool {
    cfg!(clipcap_int8)
        && q.device() == Device::Cpu
        && q.kind() == Kind::Float
        && matches!(keys.kind(), Kind::Float | Kind::Half)
        && !q.requires_grad()
        && !keys.requires_grad()
        && q.size().get(2) == Some(&1)
}

/// One-query attention: `q` `[B, H, 1, D]` (f32), `keys` and `values` `[B, H, T, D]` (f32 or
/// f16), `keep` `[B, 1, 1, T]` (true = may attend) or none; returns `[B, 1, H·D]`. Check
/// [`fits`] first.
pub fn one_query(q: &Tensor, keys: &Tensor, values: &Tensor, keep: Option<&Tensor>) -> Tensor {
    #[cfg(clipcap_int8)]
    {
        let keep = keep.map(|m| m.contiguous());
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: tch's tensor pointers are `at::Tensor*`; the kernel only reads them and
        // returns a new tensor it hands over (or null with a malloc'd message).
        let out = unsafe {
            clipcap_attend_one(
                q.as_ptr() as *const c_void,
                keys.as_ptr() as *const c_void,
                values.as_ptr() as *const c_void,
                keep.as_ref()
                    .map_or(std::ptr::null(), |m| m.as_ptr() as *const c_void),
                &mut err,
            )
        };
        if out.is_null() {
            panic!("one-query attention: {}", super::int8::take_error(err));
        }
        // SAFETY: `out` is a heap `at::Tensor*` owned by nobody else.
        unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) }
    }
    #[cfg(not(clipcap_int8))]
    {
        let _ = (q, keys, values, keep);
        unreachable!("fits() is false without the kernel")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against an f64 reference (softmax(q·k/√d)·v) on strided keys as the cache
    /// holds them (a narrowed `[B, H, cap, D]` buffer), with and without a mask, for an f32
    /// and an f16 cache, at GPT-2's head width (the AVX-512 path where the CPU has it) and at
    /// a width that takes the plain loops.
    #[test]
    fn one_query_attention_matches_an_f64_reference() {
        let cpu = Device::Cpu;
        let probe = Tensor::zeros([1, 1, 1, 1], (Kind::Float, cpu));
        if !fits(&probe, &probe) {
            eprintln!("SKIPPED: this build has no attention kernel (no libtorch headers)");
            return;
        }
        tch::manual_seed(7);
        for (d, kind) in [
            (64, Kind::Float),
            (64, Kind::Half),
            (24, Kind::Float),
            (24, Kind::Half),
        ] {
            let (b, h, cap, t) = (3, 4, 20, 13);
            let kc = Tensor::randn([b, h, cap, d], (Kind::Float, cpu)).to_kind(kind);
            let vc = Tensor::randn([b, h, cap, d], (Kind::Float, cpu)).to_kind(kind);
            let (k, v) = (kc.narrow(2, 0, t), vc.narrow(2, 0, t));
            // q as GPT-2 makes it: a split of [B, 1, 3E] viewed as heads.
            let qkv = Tensor::randn([b, 1, 3 * h * d], (Kind::Float, cpu));
            let q = qkv.narrow(2, 0, h * d).view([b, 1, h, d]).transpose(1, 2);
            let last = Tensor::arange(t, (Kind::Int64, cpu))
                .eq(t - 1)
                .view([1, 1, 1, t]);
            let keep = Tensor::rand([b, 1, 1, t], (Kind::Float, cpu))
                .gt(0.3)
                .logical_or(&last);
            for mask in [None, Some(&keep)] {
                let got = one_query(&q, &k, &v, mask).to_kind(Kind::Double);
                let f64_ = |x: &Tensor| x.to_kind(Kind::Double);
                let mut s = f64_(&q).matmul(&f64_(&k).transpose(-1, -2)) / (d as f64).sqrt();
                if let Some(m) = mask {
                    s = s.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
                }
                let want = s
                    .softmax(-1, Kind::Double)
                    .matmul(&f64_(&v))
                    .transpose(1, 2)
                    .reshape([b, 1, h * d]);
                let err = f64::try_from((&got - &want).abs().max()).unwrap();
                // f32 sums of 64 products and 13 weighted values of size ~1: a few ulps.
                assert!(
                    err < 1e-5,
                    "d {d} {kind:?} mask {}: error {err}",
                    mask.is_some()
                );
            }
        }
    }
}
