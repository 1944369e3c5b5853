//! int8 weights for CPU decoding: GPT-2's linear layers and its lm_head with per-output-channel
//! int8 weights and f32 activations (dynamic quantization). A decode step is bound by the bytes
//! of weights it reads; int8 reads a quarter of f32's. tch wraps no int8 kernels, so C++ shims
//! built by `build.rs` against libtorch's headers provide them, in two kinds of engine:
//!
//! - [`Int8Engine::Clipcap`], the default for GPT-2 where the CPU has AVX-512 VNNI
//!   (`int8_gemm.cpp`): our own GEMM, which quantizes each input row by its own largest
//!   magnitude and fuses what surrounds the product (the LayerNorm before it, the bias, GELU
//!   and the residual after it) into the one call, one parallel region each;
//! - fbgemm and oneDNN through PyTorch's `quantized::linear_dynamic` (`int8.cpp`), which the
//!   TorchScript image encoder also uses. PyTorch's op quantizes the activations with one
//!   scale per call, taken from the whole input's range, so a row's result would depend on the
//!   rows it shares the call with. [`Int8Matrix::linear`] makes it depend on that row only:
//!   each row is divided by its own largest magnitude (per-token scaling, as LLM.int8 does),
//!   and two guard rows of +1 and −1 pin the range the op sees to exactly [−1, 1] whatever the
//!   batch; the product is scaled back per row and the bias added in f32.
//!
//! Either way captions are the same alone or batched, as in f32.
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
/// clipcap's own GEMM (`int8_gemm.cpp`) computes the same products as fbgemm but for its
/// rounding of the activations (8 bits per row against 7 bits over [−1, 1]); it serves GPT-2
/// only, since TorchScript archives pack their weights for one of PyTorch's two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Engine {
    Clipcap,
    Fbgemm,
    Onednn,
}

impl Int8Engine {
    pub const ALL: [Int8Engine; 3] = [Int8Engine::Clipcap, Int8Engine::Fbgemm, Int8Engine::Onednn];
    /// PyTorch's own, which TorchScript archives can be packed for.
    pub const TORCH: [Int8Engine; 2] = [Int8Engine::Fbgemm, Int8Engine::Onednn];

    pub fn name(self) -> &'static str {
        match self {
            Int8Engine::Clipcap => "clipcap",
            Int8Engine::Fbgemm => "fbgemm",
            Int8Engine::Onednn => "onednn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == s)
    }

    /// `at::QEngine`'s value (PyTorch's engines only).
    #[cfg(clipcap_int8)]
    fn code(self) -> Option<i32> {
        match self {
            Int8Engine::Clipcap => None,
            Int8Engine::Fbgemm => Some(1),
            Int8Engine::Onednn => Some(3),
        }
    }

    /// The engine for GPT-2's int8 weights: `CLIPCAP_INT8_ENGINE` when set, else clipcap's
    /// own where the CPU has AVX-512 VNNI (its plain loops elsewhere are far slower than
    /// fbgemm's).
    pub fn for_gpt2() -> Result<Self> {
        Ok(engine_from_env()?.unwrap_or(if gemm_has_vnni() {
            Int8Engine::Clipcap
        } else {
            Int8Engine::Fbgemm
        }))
    }
}

/// Whether clipcap's int8 GEMM can run AVX-512 VNNI on this CPU.
pub fn gemm_has_vnni() -> bool {
    #[cfg(clipcap_int8)]
    {
        // SAFETY: reads the CPU's features.
        unsafe { clipcap_int8_gemm_vnni() != 0 }
    }
    #[cfg(not(clipcap_int8))]
    false
}

/// How many threads clipcap's C++ kernels (int8 GEMM, attention, beam candidates, sampling)
/// split their loops over (`src/model/pool.cpp`): libtorch's intra-op thread count, or 1
/// without the shims.
pub fn kernel_threads() -> usize {
    #[cfg(clipcap_int8)]
    {
        // SAFETY: runs a parallel loop that only records thread numbers.
        unsafe { clipcap_kernel_threads().max(1) as usize }
    }
    #[cfg(not(clipcap_int8))]
    1
}

/// PyTorch's engine setting is process-wide: packings (and the archive loads that pack) take
/// turns.
static ENGINE: Mutex<()> = Mutex::new(());

/// Runs `f` with PyTorch's int8 weights packed for `engine` (fbgemm or oneDNN): the packed
/// weights of a TorchScript archive loaded meanwhile (PyTorch packs them at load). A packed
/// weight keeps its engine after.
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
        let Some(code) = engine.code() else {
            bail!("{} is not one of PyTorch's int8 engines", engine.name());
        };
        // SAFETY: reads a libtorch global.
        let before = unsafe { clipcap_int8_engine() };
        set(code)?;
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

/// The engine `CLIPCAP_INT8_ENGINE` names (`clipcap` | `fbgemm` | `onednn`), if it is set.
pub fn engine_from_env() -> Result<Option<Int8Engine>> {
    match std::env::var("CLIPCAP_INT8_ENGINE") {
        Ok(name) => Int8Engine::parse(&name).map(Some).ok_or_else(|| {
            anyhow::anyhow!("CLIPCAP_INT8_ENGINE is {name:?}; expected clipcap, fbgemm or onednn")
        }),
        Err(_) => Ok(None),
    }
}

/// PyTorch's engine for a TorchScript archive's int8 products of `rows` rows:
/// `CLIPCAP_INT8_ENGINE` when it names fbgemm or onednn, else whichever computes a
/// `[rows, 768] x [768, 3072]` product faster on this CPU (best of 3), measured once per row
/// count in a process.
pub fn engine_for(rows: i64) -> Result<Int8Engine> {
    if let Some(e) = engine_from_env()?.filter(|e| Int8Engine::TORCH.contains(e)) {
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
    for engine in Int8Engine::TORCH {
        let m = Int8Matrix::new(engine, &w)?;
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
    fn clipcap_int8_gemm_pack(
        weight: *const c_void,
        plain_loops: i32,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    #[allow(clippy::too_many_arguments)]
    fn clipcap_int8_gemm(
        x: *const c_void,
        packed: *mut c_void,
        ln_weight: *const c_void,
        ln_bias: *const c_void,
        ln_eps: f64,
        bias: *const c_void,
        residual: *const c_void,
        activation: i32,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn clipcap_int8_gemm_free(packed: *mut c_void);
    fn clipcap_int8_gemm_vnni() -> i32;
    fn clipcap_kernel_threads() -> i32;
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

/// An activation [`Int8Matrix::linear_fused`] applies to the product (plus bias).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Int8Activation {
    #[default]
    None,
    /// GELU, tanh form (GPT-2's `gelu_new`).
    GeluTanh,
    Relu,
}

impl Int8Activation {
    /// The shim's code.
    #[cfg(clipcap_int8)]
    fn code(self) -> i32 {
        match self {
            Int8Activation::None => 0,
            Int8Activation::GeluTanh => 1,
            Int8Activation::Relu => 2,
        }
    }

    fn apply(self, y: Tensor) -> Tensor {
        match self {
            Int8Activation::None => y,
            Int8Activation::GeluTanh => y.gelu("tanh"),
            Int8Activation::Relu => y.relu(),
        }
    }
}

/// What surrounds a product in [`Int8Matrix::linear_fused`]:
/// `activation(layer_norm(x) W^T + bias) + residual`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fused<'a> {
    /// A LayerNorm of each input row first: weight `[in]`, bias `[in]`, epsilon.
    pub layer_norm: Option<(&'a Tensor, &'a Tensor, f64)>,
    pub activation: Int8Activation,
    /// Added last, `[.., out]` as the result.
    pub residual: Option<&'a Tensor>,
}

/// A weight matrix quantized to int8 per output row and packed for one engine.
#[derive(Debug)]
pub struct Int8Matrix {
    packed: *mut c_void,
    pub engine: Int8Engine,
    pub rows_out: i64,
    pub cols_in: i64,
}

// SAFETY: the packed weight is immutable after packing; the kernels read it from any thread.
unsafe impl Send for Int8Matrix {}

impl Int8Matrix {
    /// Quantizes `weight` `[out, in]` (any float kind, CPU) per output row, packed for `engine`.
    pub fn new(engine: Int8Engine, weight: &Tensor) -> Result<Self> {
        Self::pack(engine, weight, false)
    }

    /// clipcap's engine in its plain loops even where the CPU has VNNI, for tests that compare
    /// the two paths.
    #[doc(hidden)]
    pub fn with_plain_loops(weight: &Tensor) -> Result<Self> {
        Self::pack(Int8Engine::Clipcap, weight, true)
    }

    fn pack(engine: Int8Engine, weight: &Tensor, plain_loops: bool) -> Result<Self> {
        if weight.device() != Device::Cpu || weight.dim() != 2 {
            bail!("int8 weights are packed from a 2-D CPU matrix");
        }
        let (rows_out, cols_in) = (weight.size()[0], weight.size()[1]);
        #[cfg(clipcap_int8)]
        {
            let w = weight.detach().to_kind(Kind::Float).contiguous();
            let mut err: *mut c_char = std::ptr::null_mut();
            let wp = w.as_ptr() as *const c_void;
            // SAFETY: tch's tensor pointers are `at::Tensor*`; the shims copy what they keep.
            let packed = match engine {
                Int8Engine::Clipcap => unsafe {
                    clipcap_int8_gemm_pack(wp, plain_loops as i32, &mut err)
                },
                _ => with_engine(engine, || unsafe {
                    clipcap_int8_pack(wp, std::ptr::null(), &mut err)
                })?,
            };
            if packed.is_null() {
                bail!("packing int8 weights: {}", take_error(err));
            }
            Ok(Int8Matrix {
                packed,
                engine,
                rows_out,
                cols_in,
            })
        }
        #[cfg(not(clipcap_int8))]
        {
            let _ = (engine, rows_out, cols_in, plain_loops);
            bail!("this build has no int8 kernels (build.rs found no libtorch headers)")
        }
    }

    /// `x` `[.., in]` times the weight, plus `bias` `[out]`: `[.., out]` (f32). Each row's
    /// result depends on that row only (see the module's notes).
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        self.linear_fused(x, bias, Fused::default())
    }

    /// `activation(layer_norm(x) W^T + bias) + residual` (see [`Fused`]): one call for
    /// clipcap's engine, separate passes for PyTorch's.
    pub fn linear_fused(&self, x: &Tensor, bias: Option<&Tensor>, fused: Fused) -> Tensor {
        let mut shape = x.size();
        *shape.last_mut().unwrap() = self.rows_out;
        let x2 = x.reshape([-1, self.cols_in]).to_kind(Kind::Float);
        let y = if self.engine == Int8Engine::Clipcap {
            self.gemm(&x2, bias, &fused)
        } else {
            let x2 = match fused.layer_norm {
                Some((w, b, eps)) => x2.layer_norm([self.cols_in], Some(w), Some(b), eps, false),
                None => x2,
            };
            let y = fused.activation.apply(self.torch_linear(&x2, bias));
            match fused.residual {
                Some(r) => y + r.reshape([-1, self.rows_out]),
                None => y,
            }
        };
        y.reshape(shape)
    }

    /// clipcap's GEMM: everything in one call.
    fn gemm(&self, x2: &Tensor, bias: Option<&Tensor>, fused: &Fused) -> Tensor {
        #[cfg(clipcap_int8)]
        {
            let f32c = |t: &Tensor| t.to_kind(Kind::Float).contiguous();
            let x2 = x2.contiguous();
            let bias = bias.map(f32c);
            let residual = fused
                .residual
                .map(|r| f32c(&r.reshape([-1, self.rows_out])));
            let ln = fused.layer_norm.map(|(w, b, eps)| (f32c(w), f32c(b), eps));
            let ptr =
                |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr() as *const c_void);
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: as in `new`; every pointer outlives the call; the result is a new
            // tensor the shim hands over.
            let out = unsafe {
                clipcap_int8_gemm(
                    x2.as_ptr() as *const c_void,
                    self.packed,
                    ptr(ln.as_ref().map(|l| &l.0)),
                    ptr(ln.as_ref().map(|l| &l.1)),
                    ln.as_ref().map_or(0.0, |l| l.2),
                    ptr(bias.as_ref()),
                    ptr(residual.as_ref()),
                    fused.activation.code(),
                    &mut err,
                )
            };
            if out.is_null() {
                panic!("int8 gemm: {}", take_error(err));
            }
            // SAFETY: `out` is a heap `at::Tensor*` owned by nobody else.
            unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) }
        }
        #[cfg(not(clipcap_int8))]
        {
            let _ = (x2, bias, fused);
            unreachable!("no Int8Matrix exists without the kernels")
        }
    }

    /// PyTorch's op with the row scaling and guard rows described in the module's notes.
    fn torch_linear(&self, x2: &Tensor, bias: Option<&Tensor>) -> Tensor {
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
        match bias {
            Some(b) => b.addcmul(&y, &scale),
            None => y * &scale,
        }
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
        // SAFETY: packed came from the engine's pack call and is freed once.
        unsafe {
            match self.engine {
                Int8Engine::Clipcap => clipcap_int8_gemm_free(self.packed),
                _ => clipcap_int8_free(self.packed),
            }
        };
    }
}
