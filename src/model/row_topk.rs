//! The indices of each row's largest values: beam search's candidates. On the CPU, one
//! vectorized pass per row (`row_topk.cpp`) instead of libtorch's partial sort, which was the
//! costliest of a batched beam step's vocabulary-wide passes; elsewhere libtorch's `topk`.
#[cfg_attr(not(clipcap_int8), allow(unused_imports))]
use std::ffi::{c_char, c_void};
#[cfg_attr(not(clipcap_int8), allow(unused_imports))]
use tch::{Device, Kind, Tensor};

#[cfg(clipcap_int8)]
unsafe extern "C" {
    fn clipcap_row_topk(x: *const c_void, c: i64, error: *mut *mut c_char) -> *mut c_void;
}

/// The indices `[R, c]` of the `c` largest values of each row of `x` `[R, V]`, largest first
/// (`1 <= c <= V`). Among equal values the kernel puts the earlier index first, and it ranks
/// NaN as -inf; libtorch's order among ties, and its NaN (as largest), are its own.
pub fn row_topk(x: &Tensor, c: i64) -> Tensor {
    #[cfg(clipcap_int8)]
    if x.device() == Device::Cpu && x.kind() == Kind::Float && x.dim() == 2 {
        let x = if x.stride()[1] == 1 {
            x.shallow_clone()
        } else {
            x.contiguous()
        };
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: tch's tensor pointers are `at::Tensor*`; the kernel reads `x` and returns
        // a new tensor it hands over (or null with a malloc'd message).
        let out = unsafe { clipcap_row_topk(x.as_ptr() as *const c_void, c, &mut err) };
        if out.is_null() {
            panic!("row top-k: {}", super::int8::take_error(err));
        }
        // SAFETY: `out` is a heap `at::Tensor*` owned by nobody else.
        return unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) };
    }
    x.topk(c, -1, true, true).1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same sets and values as libtorch's topk on random rows, and the earlier index
    /// first among ties.
    #[test]
    fn row_topk_agrees_with_libtorch() {
        tch::manual_seed(3);
        let x = Tensor::randn([7, 50257], (Kind::Float, Device::Cpu));
        for c in [1, 10, 33] {
            let got = row_topk(&x, c);
            let want = x.topk(c, -1, true, true);
            let got_values = x.gather(1, &got, false);
            assert!(got_values.equal(&want.0), "values differ at c = {c}");
            assert!(got.equal(&want.1), "indices differ at c = {c}");
        }
        // Ties: rows of equal values, and a row whose largest sit at the end.
        let ties = Tensor::from_slice(&[1f32, 3., 3., 0., 3., 2., 3., 3.]).view([1, 8]);
        let got: Vec<i64> = Vec::try_from(row_topk(&ties, 4).view([-1])).unwrap();
        assert_eq!(got, vec![1, 2, 4, 6]);
        // NaN ranks as -inf, even among the first c values.
        let nan = Tensor::from_slice(&[1f32, f32::NAN, 5., 6.]).view([1, 4]);
        let got: Vec<i64> = Vec::try_from(row_topk(&nan, 2).view([-1])).unwrap();
        assert_eq!(got, vec![3, 2]);
        let flat = Tensor::zeros([2, 40], (Kind::Float, Device::Cpu));
        let got: Vec<i64> = Vec::try_from(row_topk(&flat, 3).view([-1])).unwrap();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }
}
