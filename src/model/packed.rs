//! Weight matrices pre-packed for MKL's GEMM, for f32 inference on the CPU.
//!
//! A decode step multiplies a handful of rows (images × beams) by every weight of GPT-2, so on
//! the CPU it is bound by how fast ~500 MB of weights stream from memory. libtorch's `addmm`
//! reaches about 6 GB/s on such skinny products here (`python scripts/bench_step_floor.py`);
//! the same products on matrices packed once with MKL's `cblas_sgemm_pack` reach 15–17 GB/s
//! (with transparent huge pages), which more than halves the time per token. The result is an
//! ordinary f32 GEMM (same maths, another summation order; a row's result does not depend on
//! how many rows share the call), and captions stay token for token the original's.
//!
//! libtorch's x86-64 builds link MKL statically and export its CBLAS symbols; they are looked up
//! at run time, so a libtorch without MKL (other CPUs) simply keeps the plain `addmm`.
//! `CLIPCAP_PACKED_GEMM=0` turns packing off (for comparisons).

use std::alloc::{alloc, dealloc, Layout};
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;
const CBLAS_PACKED: c_int = 151;
const CBLAS_B_MATRIX: c_int = 162;

type PackGetSize = unsafe extern "C" fn(c_int, c_int, c_int, c_int) -> usize;
/// `cblas_sgemm_pack(layout, identifier, trans, m, n, k, alpha, src, ld, dest)`.
type Pack = unsafe extern "C" fn(
    layout: c_int,
    identifier: c_int,
    trans: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    src: *const f32,
    ld: c_int,
    dest: *mut f32,
);
/// `cblas_sgemm_compute(layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc)`.
type Compute = unsafe extern "C" fn(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

// `dlsym(RTLD_DEFAULT = NULL, …)` and `MADV_HUGEPAGE = 14` are glibc/Linux facts, and MKL is
// only inside x86-64 libtorch builds: elsewhere packing is simply unavailable.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
unsafe fn dlsym(_handle: *mut c_void, _symbol: *const c_char) -> *mut c_void {
    std::ptr::null_mut()
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
unsafe fn madvise(_addr: *mut c_void, _len: usize, _advice: c_int) -> c_int {
    0
}

/// Linux `MADV_HUGEPAGE`.
const MADV_HUGEPAGE: c_int = 14;
/// The row count matrices are packed for (any count works; see `PackedMatrix::new`).
const PACKED_FOR_ROWS: c_int = 80;
/// Transparent huge page size on x86-64.
const HUGE_PAGE: usize = 2 << 20;

struct Mkl {
    get_size: PackGetSize,
    pack: Pack,
    compute: Compute,
}

/// MKL's packed-GEMM entry points from the loaded libtorch, if it has them.
fn mkl() -> Option<&'static Mkl> {
    static MKL: OnceLock<Option<Mkl>> = OnceLock::new();
    MKL.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT (null) searches the global scope, which holds
        // libtorch_cpu (a DT_NEEDED library of this binary); the names are C symbols whose
        // signatures are MKL's documented CBLAS ones (LP64: 32-bit MKL_INT).
        unsafe {
            let find = |name: &[u8]| dlsym(std::ptr::null_mut(), name.as_ptr().cast());
            let (g, p, c) = (
                find(b"cblas_sgemm_pack_get_size\0"),
                find(b"cblas_sgemm_pack\0"),
                find(b"cblas_sgemm_compute\0"),
            );
            if g.is_null() || p.is_null() || c.is_null() {
                return None;
            }
            Some(Mkl {
                get_size: std::mem::transmute::<*mut c_void, PackGetSize>(g),
                pack: std::mem::transmute::<*mut c_void, Pack>(p),
                compute: std::mem::transmute::<*mut c_void, Compute>(c),
            })
        }
    })
    .as_ref()
}

/// Whether packed matrices can be made here: MKL present, `CLIPCAP_PACKED_GEMM` not `0`, and
/// a packed product checked against libtorch's `addmm` once per process (on a mismatch the
/// plain `addmm` is used, with a warning).
pub fn available() -> bool {
    static CHECKED: OnceLock<bool> = OnceLock::new();
    std::env::var("CLIPCAP_PACKED_GEMM").map_or(true, |v| v != "0")
        && mkl().is_some()
        && *CHECKED.get_or_init(|| match self_check() {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(%why, "MKL's packed GEMM disagrees with addmm here; not using it");
                false
            }
        })
}

/// Whether decoding uses packed weights here, and if not, why (for `clipcap info`).
pub fn status() -> String {
    if mkl().is_none() {
        "unavailable (this libtorch has no MKL)".into()
    } else if std::env::var("CLIPCAP_PACKED_GEMM").is_ok_and(|v| v == "0") {
        "off (CLIPCAP_PACKED_GEMM=0)".into()
    } else {
        match self_check() {
            Ok(()) => "in use (MKL packed GEMM, self-check passed)".into(),
            Err(why) => format!("refused on this CPU: {why}"),
        }
    }
}

/// One product of a small packed matrix against `addmm` at a few row counts, and the property
/// captions rely on: a row's result is bit-identical whatever the number of rows multiplied
/// with it (MKL's code path is chosen per CPU; on some, e.g. AVX2-only hosts, it is not).
/// Deterministic inputs, no draw from libtorch's generator.
fn self_check() -> Result<(), String> {
    let (n_in, n_out) = (64i64, 48i64);
    let w = Tensor::arange(n_in * n_out, (Kind::Float, Device::Cpu))
        .sin()
        .view([n_in, n_out]);
    let packed = PackedMatrix::pack(&w, WeightLayout::InOut).ok_or("packing failed")?;
    for m in [1i64, 5, 17] {
        let x = Tensor::arange(m * n_in, (Kind::Float, Device::Cpu))
            .cos()
            .view([m, n_in]);
        let d = f64::try_from((packed.matmul(&x, None) - x.mm(&w)).abs().max())
            .map_err(|e| e.to_string())?;
        if d.is_nan() || d >= 1e-3 {
            return Err(format!("{m} rows: max difference {d} from addmm"));
        }
    }
    let x = Tensor::arange(80 * n_in, (Kind::Float, Device::Cpu))
        .cos()
        .view([80, n_in]);
    let alone = packed.matmul(&x.narrow(0, 0, 1), None);
    for m in [2i64, 5, 13, 80] {
        if !packed
            .matmul(&x.narrow(0, 0, m), None)
            .narrow(0, 0, 1)
            .equal(&alone)
        {
            return Err(format!(
                "a row's result changes when {m} rows are multiplied together"
            ));
        }
    }
    Ok(())
}

/// How the source weight is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]` (HF's Conv1D).
    InOut,
    /// `[out, in]` (nn.Linear, the tied lm_head `wte`).
    OutIn,
}

/// The right-hand matrix of `y = x · W` (`W` as `[in, out]`), packed once.
pub struct PackedMatrix {
    buf: *mut f32,
    layout: Layout,
    n_in: i64,
    n_out: i64,
}

// SAFETY: the buffer is owned, written once in `new` and only read afterwards (MKL's compute
// reads packed matrices without modifying them).
unsafe impl Send for PackedMatrix {}
unsafe impl Sync for PackedMatrix {}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({}x{})", self.n_in, self.n_out)
    }
}

impl PackedMatrix {
    /// Packs a 2-D f32 CPU `weight`. `None` if packing is unavailable here (see
    /// [`available`]) or the tensor does not fit.
    pub fn new(weight: &Tensor, src: WeightLayout) -> Option<PackedMatrix> {
        if !available() {
            return None;
        }
        Self::pack(weight, src)
    }

    fn pack(weight: &Tensor, src: WeightLayout) -> Option<PackedMatrix> {
        let mkl = mkl()?;
        if weight.device() != Device::Cpu || weight.kind() != Kind::Float || weight.dim() != 2 {
            return None;
        }
        let w = weight.contiguous();
        let (rows, cols) = w.size2().ok()?;
        let (n_in, n_out) = match src {
            WeightLayout::InOut => (rows, cols),
            WeightLayout::OutIn => (cols, rows),
        };
        if n_in == 0 || n_out == 0 || n_in > i32::MAX as i64 || n_out > i32::MAX as i64 {
            return None;
        }
        // MKL packs for a row count of the left matrix, yet any row count may be multiplied by
        // the result, and a row's result does not depend on it (checked with MKL 2024.2; see
        // the test). Packed for 80 rows (16 images x 5 beams), the GEMMs of a whole GPT-2 step
        // take 33 ms at 5 rows, 49 at 16, 148 at 80 and 580 at 320 rows, against 75, 90, 231
        // and 636 ms for plain addmm; packed for 8 rows, 80 rows took 252 ms.
        // SAFETY: plain integer arguments.
        let bytes = unsafe {
            (mkl.get_size)(
                CBLAS_B_MATRIX,
                PACKED_FOR_ROWS,
                n_out as c_int,
                n_in as c_int,
            )
        };
        // 2 MiB-aligned and advised for transparent huge pages: streaming 500 MB of weights per
        // token through 4 KiB pages costs TLB misses (5-10% of the step time here).
        let layout =
            Layout::from_size_align(bytes.max(1).next_multiple_of(HUGE_PAGE), HUGE_PAGE).ok()?;
        // SAFETY: non-zero size; `w` is a contiguous f32 `[rows, cols]` matrix that outlives
        // the call; `buf` holds `bytes` bytes as MKL asked for.
        unsafe {
            let buf = alloc(layout).cast::<f32>();
            if buf.is_null() {
                return None;
            }
            // Advice only: where THP is off this changes nothing.
            madvise(buf.cast(), layout.size(), MADV_HUGEPAGE);
            let (trans, ld) = match src {
                WeightLayout::InOut => (CBLAS_NO_TRANS, n_out),
                WeightLayout::OutIn => (CBLAS_TRANS, n_in),
            };
            (mkl.pack)(
                CBLAS_ROW_MAJOR,
                CBLAS_B_MATRIX,
                trans,
                PACKED_FOR_ROWS,
                n_out as c_int,
                n_in as c_int,
                1.0,
                w.data_ptr() as *const f32,
                ld as c_int,
                buf,
            );
            Some(PackedMatrix {
                buf,
                layout,
                n_in,
                n_out,
            })
        }
    }

    /// `x · W (+ bias)` for `x` `[M, in]` (f32, CPU): `[M, out]`. Panics on any other
    /// input (a CUDA tensor's data pointer must never reach MKL).
    pub fn matmul(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        assert!(
            x.device() == Device::Cpu && x.kind() == Kind::Float,
            "packed matmul takes f32 CPU input, got {:?} on {:?}",
            x.kind(),
            x.device()
        );
        if let Some(b) = bias {
            assert!(
                b.device() == Device::Cpu && b.kind() == Kind::Float,
                "packed matmul: the bias must be f32 on the CPU"
            );
        }
        let m = x.size()[0];
        let mut out = Tensor::empty([m, self.n_out], (Kind::Float, Device::Cpu));
        match bias {
            // Start from a copy of the bias and accumulate onto it: no second pass. (A fresh
            // buffer always: `expand(..).contiguous()` of a one-row expand is the bias itself.)
            Some(b) => {
                out.copy_(&b.expand([m, self.n_out], false));
                self.gemm(x, out, 1.0)
            }
            None => self.gemm(x, out, 0.0),
        }
    }

    fn gemm(&self, x: &Tensor, out: Tensor, beta: f32) -> Tensor {
        let mkl = mkl().expect("a PackedMatrix exists only when MKL does");
        let x = x.contiguous();
        let (m, k) = x.size2().expect("packed matmul takes a 2-D input");
        assert_eq!(
            k, self.n_in,
            "packed matmul: input width differs from the weight"
        );
        assert!(
            x.kind() == Kind::Float && x.device() == Device::Cpu,
            "packed matmul: f32 CPU input only"
        );
        assert_eq!(out.size(), [m, self.n_out], "packed matmul: output shape");
        assert!(
            out.kind() == Kind::Float && out.device() == Device::Cpu && out.is_contiguous(),
            "packed matmul: the output must be a contiguous f32 CPU tensor"
        );
        if m == 0 {
            return out;
        }
        // SAFETY: `x` is a contiguous `[m, k]` f32 matrix and `out` a contiguous `[m, n_out]`
        // one (checked above), both alive across the call; `buf` holds this weight packed for
        // k = n_in, n = n_out.
        unsafe {
            (mkl.compute)(
                CBLAS_ROW_MAJOR,
                CBLAS_NO_TRANS,
                CBLAS_PACKED,
                m as c_int,
                self.n_out as c_int,
                k as c_int,
                x.data_ptr() as *const f32,
                k as c_int,
                self.buf,
                self.n_out as c_int,
                beta,
                out.data_ptr() as *mut f32,
                self.n_out as c_int,
            );
        }
        out
    }
}

impl Drop for PackedMatrix {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.buf.cast(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_products_match_libtorch_for_any_row_count_and_layout() {
        if mkl().is_none() {
            eprintln!("SKIPPED: this libtorch has no MKL, so nothing is ever packed");
            return;
        }
        if !available() {
            // Packing is refused on this CPU; the refusal itself must be for a stated reason.
            let why = self_check().expect_err("unavailable although the self-check passes");
            eprintln!("packing refused on this CPU ({why}); checking products only");
        }
        tch::manual_seed(1);
        let w = Tensor::randn([96, 200], (Kind::Float, Device::Cpu)); // [in, out]
        let b = Tensor::randn([200], (Kind::Float, Device::Cpu));
        let inout = PackedMatrix::pack(&w, WeightLayout::InOut).unwrap();
        let outin = PackedMatrix::pack(&w.tr().contiguous(), WeightLayout::OutIn).unwrap();
        for m in [0, 1, 5, 8, 13, 80] {
            let x = Tensor::randn([m, 96], (Kind::Float, Device::Cpu));
            let want = b.addmm(&x, &w).to_kind(Kind::Double);
            for (got, what) in [
                (inout.matmul(&x, Some(&b)), "[in,out] + bias"),
                (outin.matmul(&x, None) + &b, "[out,in]"),
            ] {
                assert_eq!(got.size(), [m, 200]);
                if m > 0 {
                    let d = f64::try_from((got.to_kind(Kind::Double) - &want).abs().max()).unwrap();
                    assert!(d < 1e-4, "{what}, {m} rows: max diff {d}");
                }
            }
        }
        // The bias is only read (a one-row product once wrote into it).
        let b0 = b.copy();
        let x = Tensor::randn([1, 96], (Kind::Float, Device::Cpu));
        let _ = inout.matmul(&x, Some(&b));
        assert!(b.equal(&b0), "the bias changed");
        // Where packing is used, a row's result does not depend on how many rows are
        // multiplied with it (captions are the same alone or in a batch).
        let x = Tensor::randn([80, 96], (Kind::Float, Device::Cpu));
        let alone = inout.matmul(&x.narrow(0, 0, 1), Some(&b));
        for m in [2, 5, 13, 80] {
            let rows = inout.matmul(&x.narrow(0, 0, m), Some(&b));
            assert!(
                !available() || rows.narrow(0, 0, 1).equal(&alone),
                "row 0 differs with {m} rows, yet packing is in use"
            );
        }
        // Only f32 CPU input is taken: anything else panics before MKL sees a pointer.
        let half = Tensor::randn([2, 96], (Kind::Float, Device::Cpu)).to_kind(Kind::Half);
        let refused =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inout.matmul(&half, None)));
        assert!(refused.is_err(), "an f16 input reached MKL");
        assert!(!available() || self_check().is_ok());
        // A transposed (non-contiguous) input is made contiguous first.
        let x = Tensor::randn([96, 3], (Kind::Float, Device::Cpu)).tr();
        let d = f64::try_from((inout.matmul(&x, Some(&b)) - b.addmm(&x, &w)).abs().max()).unwrap();
        assert!(d < 1e-4);
    }
}
