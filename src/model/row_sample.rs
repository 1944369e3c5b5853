//! One sampled token per row: top-k and top-p (nucleus) filtering and the inverse-CDF draw.
//! On the CPU, `row_sample.cpp` finds the nucleus by a selection by mass, in a few linear
//! passes per row, where libtorch's way sorts every row (3.5 ms a row of 50257 here, more than
//! a beam-5 step of 8 images); elsewhere the same rule in libtorch's ops, on the device.
#[cfg_attr(not(clipcap_int8), allow(unused_imports))]
use std::ffi::{c_char, c_void};
#[cfg_attr(not(clipcap_int8), allow(unused_imports))]
use tch::Device;
use tch::{Kind, Tensor};

#[cfg(clipcap_int8)]
unsafe extern "C" {
    fn clipcap_row_sample(
        probs: *const c_void,
        uniforms: *const c_void,
        top_k: i64,
        top_p: f64,
        error: *mut *mut c_char,
    ) -> *mut c_void;
}

/// Each row's token `[R]` from `probs` `[R, V]` (a softmax) and one uniform in `[0, 1)` per
/// row, `u` `[R]`. Tokens survive top-k when their probability is at least the k-th largest
/// (`top_k` 0 = off) and top-p when they belong to the smallest set of most probable tokens
/// whose mass reaches `top_p` of what top-k kept (1 = off); the draw is the first surviving
/// index, in vocabulary order, whose running mass reaches `u` × the survivors' mass. On the
/// CPU, among tokens equal at the nucleus boundary the earlier ones stay; libtorch's sort on
/// other devices breaks such ties its own way.
pub fn row_sample(probs: &Tensor, u: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    #[cfg(clipcap_int8)]
    if probs.device() == Device::Cpu && probs.kind() == Kind::Float && probs.dim() == 2 {
        let p = if probs.stride()[1] == 1 {
            probs.shallow_clone()
        } else {
            probs.contiguous()
        };
        let u = u.to_kind(Kind::Float).contiguous();
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: tch's tensor pointers are `at::Tensor*`; the kernel reads `p` and `u` and
        // returns a new tensor it hands over (or null with a malloc'd message).
        let out = unsafe {
            clipcap_row_sample(
                p.as_ptr() as *const c_void,
                u.as_ptr() as *const c_void,
                top_k,
                top_p,
                &mut err,
            )
        };
        if out.is_null() {
            panic!("row sample: {}", super::int8::take_error(err));
        }
        // SAFETY: `out` is a heap `at::Tensor*` owned by nobody else.
        return unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) };
    }
    sample_with_sort(probs, u, top_k, top_p)
}

/// [`row_sample`] in libtorch's ops: no host read, for devices without the kernel.
pub fn sample_with_sort(probs: &Tensor, u: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let vocab = probs.size()[1];
    let zero = probs.zeros_like();
    let mut w = probs.clamp_min(0.0).nan_to_num(0.0, None, None);
    if top_k > 0 && top_k < vocab {
        let (kth, _) = w.topk(top_k, -1, true, true);
        let floor = kth.narrow(1, top_k - 1, 1);
        w = w.where_self(&w.ge_tensor(&floor), &zero);
    }
    // Running sums in f64, as the kernel keeps them: an f32 sum's rounding depends on the
    // order libtorch adds in (which differs by CPU), and can move a draw at a boundary.
    if top_p < 1.0 {
        let (sorted, idx) = w.sort(-1, true);
        let sorted64 = sorted.to_kind(Kind::Double);
        let total = sorted64.sum_dim_intlist(-1, true, Kind::Double);
        // Drop a token once the mass before it already reaches p (the first always stays).
        let before = sorted64.cumsum(-1, Kind::Double) - &sorted64;
        let dropped = before.ge_tensor(&(total * top_p));
        let kept = sorted.masked_fill(&dropped, 0.0);
        w = zero.scatter(1, &idx, &kept);
    }
    let cdf = w.cumsum(-1, Kind::Double);
    let target = u.to_kind(Kind::Double).view([-1, 1]) * cdf.narrow(1, vocab - 1, 1);
    let has_mass = w.gt(0.0);
    // The first index with mass whose running mass reaches the target; if rounding left the
    // target above every partial sum, the last index with mass; with no mass at all, 0.
    let hits = cdf.ge_tensor(&target).logical_and(&has_mass);
    let first = hits.to_kind(Kind::Int64).argmax(-1, false);
    let last = -has_mass.flip([-1]).to_kind(Kind::Int64).argmax(-1, false) + (vocab - 1);
    let last = last.where_self(&has_mass.any_dim(-1, false), &last.zeros_like());
    first.where_self(&hits.any_dim(-1, false), &last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule read directly, in f64: most probable first (earlier index first among ties),
    /// top-k by value, the nucleus by the mass before each token, the draw in index order.
    fn by_the_rule(p: &[f32], top_k: i64, top_p: f64, u: f32) -> i64 {
        let w: Vec<f32> = p.iter().map(|&x| if x > 0.0 { x } else { 0.0 }).collect();
        let mut order: Vec<usize> = (0..w.len()).filter(|&i| w[i] > 0.0).collect();
        order.sort_by(|&a, &b| w[b].partial_cmp(&w[a]).unwrap().then(a.cmp(&b)));
        if top_k > 0 && (top_k as usize) < order.len() {
            let floor = w[order[top_k as usize - 1]];
            order.retain(|&i| w[i] >= floor);
        }
        if top_p < 1.0 {
            let total: f64 = order.iter().map(|&i| w[i] as f64).sum();
            let mut before = 0f64;
            let mut keep = 0;
            for &i in &order {
                if before >= top_p * total {
                    break;
                }
                before += w[i] as f64;
                keep += 1;
            }
            order.truncate(keep.max(1));
        }
        let mut kept = vec![false; w.len()];
        for &i in &order {
            kept[i] = true;
        }
        let mass: f64 = order.iter().map(|&i| w[i] as f64).sum();
        let (mut run, mut last) = (0f64, 0);
        for i in (0..w.len()).filter(|&i| kept[i]) {
            run += w[i] as f64;
            last = i as i64;
            if run >= u as f64 * mass {
                return i as i64;
            }
        }
        last
    }

    fn tokens(t: &Tensor) -> Vec<i64> {
        Vec::try_from(t).unwrap()
    }

    /// Random rows from peaked to flat, every filter setting: the kernel and libtorch's ops
    /// draw the rule's token on every row.
    #[test]
    fn every_row_draws_the_token_the_rule_gives() {
        tch::manual_seed(11);
        let vocab = 50257;
        for scale in [8.0, 3.0, 1.0, 0.05] {
            let probs = (Tensor::randn([6, vocab], (Kind::Float, Device::Cpu)) * scale)
                .softmax(-1, Kind::Float);
            let u = Tensor::rand([6], (Kind::Float, Device::Cpu));
            let rows: Vec<Vec<f32>> = Vec::try_from(&probs).unwrap();
            let us: Vec<f32> = Vec::try_from(&u).unwrap();
            for top_k in [0, 1, 7, 50, 2000] {
                for top_p in [1.0, 0.95, 0.5, 1e-6] {
                    let want: Vec<i64> = (0..6)
                        .map(|r| by_the_rule(&rows[r], top_k, top_p, us[r]))
                        .collect();
                    let at = format!("scale {scale}, top_k {top_k}, top_p {top_p}");
                    assert_eq!(tokens(&row_sample(&probs, &u, top_k, top_p)), want, "{at}");
                    assert_eq!(
                        tokens(&sample_with_sort(&probs, &u, top_k, top_p)),
                        want,
                        "libtorch's ops, {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn ties_at_the_nucleus_boundary_keep_the_earlier_tokens() {
        let quarter = Tensor::from_slice(&[0.25f32; 4]).view([1, 4]);
        let draw = |p: &Tensor, k, top_p, u: f32| {
            tokens(&row_sample(p, &Tensor::from_slice(&[u]), k, top_p))[0]
        };
        // Half the mass: tokens 0 and 1, split evenly by u.
        assert_eq!(draw(&quarter, 0, 0.5, 0.49), 0);
        assert_eq!(draw(&quarter, 0, 0.5, 0.51), 1);
        assert_eq!(draw(&quarter, 0, 0.5, 0.999), 1);
        assert_eq!(draw(&quarter, 0, 1.0, 0.999), 3);
        // Top-k keeps every value tied with the k-th.
        let pairs = Tensor::from_slice(&[0.1f32, 0.4, 0.1, 0.4]).view([1, 4]);
        assert_eq!(draw(&pairs, 1, 1.0, 0.6), 3);
        assert_eq!(draw(&pairs, 1, 1.0, 0.4), 1);
        // No mass at all (a row of NaN): token 0, not a panic.
        let nan = Tensor::from_slice(&[f32::NAN; 3]).view([1, 3]);
        assert_eq!(draw(&nan, 0, 0.9, 0.5), 0);
        assert_eq!(draw(&nan, 0, 1.0, 0.5), 0);
    }
}
