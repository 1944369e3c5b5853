//! int8 weights for CPU decoding: GPT-2's linear layers and its lm_head with per-output-channel
//! int8 weights and f32 activations (dynamic quantization), computed by PyTorch's
//! `quantized::linear_dynamic` (fbgemm's kernels on x86-64, which do not depend on MKL's
//! dispatch). A decode step is bound by the bytes of weights it reads; int8 reads a quarter of
//! f32's. tch does not wrap these ops: `int8.cpp`, built by `build.rs` against libtorch's
//! headers, reaches them through the dispatcher.
//!
//! PyTorch's op quantizes the activations with one scale and zero point per call, taken from
//! the whole input's range, so a row's result would depend on the rows it shares the call
//! with. [`Int8Matrix::linear`] makes it depend on that row only: each row is divided by its
//! own largest magnitude (per-token scaling, as LLM.int8 does), and two guard rows of +1 and
//! −1 pin the range the op sees to exactly [−1, 1] whatever the batch; the product is scaled
//! back per row and the bias added in f32. Captions are then the same alone or batched, as in
//! f32.
use anyhow::{bail, Result};
use std::ffi::{c_char, c_void, CStr};
use tch::{Device, Kind, Tensor};

#[cfg(clipcap_int8)]
unsafe extern "C" {
    fn clipcap_int8_pack(
        weight: *const c_void,
        bias: *const c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn clipcap_int8_linear(
        x: *const c_void,
        packed: *mut c_void,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn clipcap_int8_free(packed: *mut c_void);
    fn clipcap_int8_free_error(error: *mut c_char);
}

/// Whether this build has the int8 kernels (`build.rs` found libtorch's headers).
pub fn available() -> bool {
    cfg!(clipcap_int8)
}

#[cfg(clipcap_int8)]
fn take_error(e: *mut c_char) -> String {
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd copy, freed here once.
    let s = unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned();
    unsafe { clipcap_int8_free_error(e) };
    s
}

/// A weight matrix quantized to int8 per output row and packed for fbgemm.
#[derive(Debug)]
pub struct Int8Matrix {
    packed: *mut c_void,
    pub rows_out: i64,
    pub cols_in: i64,
}

// SAFETY: the packed weight is immutable after packing; fbgemm reads it from any thread.
unsafe impl Send for Int8Matrix {}

impl Int8Matrix {
    /// Quantizes `weight` `[out, in]` (any float kind, CPU) per output row.
    pub fn new(weight: &Tensor) -> Result<Self> {
        if weight.device() != Device::Cpu || weight.dim() != 2 {
            bail!("int8 weights are packed from a 2-D CPU matrix");
        }
        let (rows_out, cols_in) = (weight.size()[0], weight.size()[1]);
        #[cfg(clipcap_int8)]
        {
            let w = weight.detach().to_kind(Kind::Float).contiguous();
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: tch's tensor pointers are `at::Tensor*`; the shim copies what it keeps.
            let packed = unsafe {
                clipcap_int8_pack(w.as_ptr() as *const c_void, std::ptr::null(), &mut err)
            };
            if packed.is_null() {
                bail!("packing int8 weights: {}", take_error(err));
            }
            Ok(Int8Matrix {
                packed,
                rows_out,
                cols_in,
            })
        }
        #[cfg(not(clipcap_int8))]
        {
            let _ = (rows_out, cols_in);
            bail!("this build has no int8 kernels (build.rs found no libtorch headers)")
        }
    }

    /// `x` `[.., in]` times the weight, plus `bias` `[out]`: `[.., out]` (f32). Each row's
    /// result depends on that row only (see the module's notes).
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let mut shape = x.size();
        *shape.last_mut().unwrap() = self.rows_out;
        let x2 = x.reshape([-1, self.cols_in]).to_kind(Kind::Float);
        let rows = x2.size()[0];
        let scale = x2.abs().amax([1], true).clamp_min(1e-30);
        let guard = Tensor::ones([1, self.cols_in], (Kind::Float, Device::Cpu));
        let input = Tensor::cat(&[&x2 / &scale, guard.shallow_clone(), -guard], 0);
        let y = self.raw(&input).narrow(0, 0, rows);
        let y = match bias {
            Some(b) => b.addcmul(&y, &scale),
            None => y * &scale,
        };
        y.reshape(shape)
    }

    /// PyTorch's `quantized::linear_dynamic` on `x2` `[rows, in]` (f32, contiguous).
    fn raw(&self, x2: &Tensor) -> Tensor {
        let x2 = x2.contiguous();
        #[cfg(clipcap_int8)]
        {
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: as in `new`; the result is a new tensor the shim hands over.
            let out =
                unsafe { clipcap_int8_linear(x2.as_ptr() as *const c_void, self.packed, &mut err) };
            if out.is_null() {
                panic!("int8 linear: {}", take_error(err));
            }
            // SAFETY: `out` is a heap `at::Tensor*` owned by nobody else.
            unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) }
        }
        #[cfg(not(clipcap_int8))]
        {
            let _ = x2;
            unreachable!("no Int8Matrix exists without the kernels")
        }
    }

    /// Bytes of weights one product reads (int8 values; scales and bias are small).
    pub fn weight_bytes(&self) -> u64 {
        (self.rows_out * self.cols_in) as u64
    }
}

impl Drop for Int8Matrix {
    fn drop(&mut self) {
        #[cfg(clipcap_int8)]
        // SAFETY: packed came from clipcap_int8_pack and is freed once.
        unsafe {
            clipcap_int8_free(self.packed)
        };
    }
}
