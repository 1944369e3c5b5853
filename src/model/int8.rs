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
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Mutex;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// PyTorch's two x86 libraries for int8 products. They compute the same products with
/// different roundings (so one model keeps one engine: a row's result must not depend on the
/// batch), and which is faster depends on the CPU and the row count: on one 2-core Xeon host
/// fbgemm was 1.15x faster for 5 rows and oneDNN 1.5x for 80 and 2.1x for 800 (one product);
/// a whole GPT-2 step for one image took 21-22 ms with fbgemm and 32-38 ms with oneDNN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Engine {
    Fbgemm,
    Onednn,
}

impl Int8Engine {
    pub const ALL: [Int8Engine; 2] = [Int8Engine::Fbgemm, Int8Engine::Onednn];

    pub fn name(self) -> &'static str {
        match self {
            Int8Engine::Fbgemm => "fbgemm",
            Int8Engine::Onednn => "onednn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == s)
    }

    /// `at::QEngine`'s value.
    #[cfg(clipcap_int8)]
    fn code(self) -> i32 {
        match self {
            Int8Engine::Fbgemm => 1,
            Int8Engine::Onednn => 3,
        }
    }
}

/// PyTorch's engine setting is process-wide: packings (and the archive loads that pack) take
/// turns.
static ENGINE: Mutex<()> = Mutex::new(());

/// Runs `f` with int8 weights packed for `engine`: `Int8Matrix::new`, and the packed weights
/// of a TorchScript archive loaded meanwhile (PyTorch packs them at load). A packed weight
/// keeps its engine after.
pub fn with_engine<T>(engine: Int8Engine, f: impl FnOnce() -> T) -> Result<T> {
    let _turn = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    #[cfg(clipcap_int8)]
    {
        let set = |code: i32| -> Result<()> {
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: sets a libtorch global; the error, if any, is a malloc'd copy.
            if unsafe { clipcap_int8_set_engine(code, &mut err) } != 0 {
                bail!("int8 engine {code}: {}", take_error(err));
            }
            Ok(())
        };
        // SAFETY: reads a libtorch global.
        let before = unsafe { clipcap_int8_engine() };
        set(engine.code())?;
        let out = f();
        set(before)?;
        Ok(out)
    }
    #[cfg(not(clipcap_int8))]
    {
        let _ = (engine, f);
        bail!("this build has no int8 kernels (build.rs found no libtorch headers)")
    }
}

/// The engine `CLIPCAP_INT8_ENGINE` names (`fbgemm` | `onednn`), if it is set.
pub fn engine_from_env() -> Result<Option<Int8Engine>> {
    match std::env::var("CLIPCAP_INT8_ENGINE") {
        Ok(name) => Int8Engine::parse(&name).map(Some).ok_or_else(|| {
            anyhow::anyhow!("CLIPCAP_INT8_ENGINE is {name:?}; expected fbgemm or onednn")
        }),
        Err(_) => Ok(None),
    }
}

/// The engine for int8 products of `rows` rows: `CLIPCAP_INT8_ENGINE` (`fbgemm` | `onednn`)
/// when set, else whichever computes a `[rows, 768] x [768, 3072]` product faster on this CPU
/// (best of 3), measured once per row count in a process.
pub fn engine_for(rows: i64) -> Result<Int8Engine> {
    if let Some(e) = engine_from_env()? {
        return Ok(e);
    }
    static CHOSEN: Mutex<BTreeMap<i64, Int8Engine>> = Mutex::new(BTreeMap::new());
    if let Some(&e) = CHOSEN.lock().unwrap().get(&rows) {
        return Ok(e);
    }
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let w = Tensor::randn([3072, 768], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([rows, 768], (Kind::Float, Device::Cpu));
    let mut best = (f64::INFINITY, Int8Engine::Fbgemm);
    for engine in Int8Engine::ALL {
        let m = with_engine(engine, || Int8Matrix::new(&w))??;
        let _ = m.linear(&x, None); // warm-up
        let mut secs = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            let _ = m.linear(&x, None);
            secs = secs.min(t0.elapsed().as_secs_f64());
        }
        tracing::debug!(
            engine = engine.name(),
            rows,
            ms = secs * 1e3,
            "int8 engine timed"
        );
        if secs < best.0 {
            best = (secs, engine);
        }
    }
    CHOSEN.lock().unwrap().insert(rows, best.1);
    Ok(best.1)
}

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
    fn clipcap_int8_set_engine(engine: i32, error: *mut *mut c_char) -> i32;
    fn clipcap_int8_engine() -> i32;
}

/// Whether this build has the int8 kernels (`build.rs` found libtorch's headers).
pub fn available() -> bool {
    cfg!(clipcap_int8)
}

#[cfg(clipcap_int8)]
pub(super) fn take_error(e: *mut c_char) -> String {
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
        // max |x| per row as max(max x, -min x): two plain reductions are 4x faster than
        // abs() then amax, and 9x faster than an inf-norm; then one pass writes the scaled
        // rows into a buffer that ends with the guard rows.
        let scale = x2
            .amax([1], true)
            .maximum(&x2.amin([1], true).neg())
            .clamp_min(1e-30);
        let input = Tensor::empty([rows + 2, self.cols_in], (Kind::Float, Device::Cpu));
        let _ = x2.div_out(&input.narrow(0, 0, rows), &scale);
        let _ = input.narrow(0, rows, 1).fill_(1.0);
        let _ = input.narrow(0, rows + 1, 1).fill_(-1.0);
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
