//! Mixed precision: libtorch's autocast for a chosen device type and dtype.
//!
//! tch only exposes the old `at::autocast::set_enabled`, which switches CUDA autocast on with
//! its default dtype (f16): asking for bf16 that way silently trains in f16 without loss
//! scaling. libtorch's per-device API (`set_autocast_enabled(DeviceType, bool)`,
//! `set_autocast_dtype(DeviceType, ScalarType)`) takes plain 8-bit enums and a bool, so it is
//! called directly from libtorch_cpu (linked by torch-sys) under its C++ symbol names. That also
//! makes CPU autocast (bf16) available, which is how the tests exercise this path without a GPU.

use serde::{Deserialize, Serialize};
use tch::Device;

/// fp16's dynamic loss scale, as `torch.cuda.amp.GradScaler` keeps it: a step whose gradients
/// overflowed is skipped and halves the scale; the scale doubles after `GROWTH_INTERVAL`
/// overflow-free steps in a row (never right after an overflow). Saved in checkpoints, so a
/// resumed run continues with the scale it had.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Overflow-free steps since the last change of scale.
    pub good_steps: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// After a backward pass whose unscaled gradient norm is `grad_norm`: whether to apply
    /// the step.
    pub fn update(&mut self, grad_norm: f64) -> bool {
        if !grad_norm.is_finite() {
            self.scale /= 2.0;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// `c10::DeviceType` values (an `int8_t` enum).
const DEVICE_CPU: i8 = 0;
const DEVICE_CUDA: i8 = 1;
/// `c10::ScalarType` values (an `int8_t` enum).
const SCALAR_HALF: i8 = 5;
const SCALAR_BFLOAT16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_set_autocast_enabled(device: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_is_autocast_enabled(device: i8) -> bool;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device: i8) -> i8;
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_clear_cache();
}

/// The reduced precision autocast runs eligible ops (matmuls, linear layers) in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmpDtype {
    Bf16,
    F16,
}

impl AmpDtype {
    /// Parses the spec's `amp` field: `None` for "none".
    pub fn parse(s: &str) -> Option<AmpDtype> {
        match s {
            "bf16" => Some(AmpDtype::Bf16),
            "fp16" => Some(AmpDtype::F16),
            _ => None,
        }
    }

    fn scalar_type(self) -> i8 {
        match self {
            AmpDtype::Bf16 => SCALAR_BFLOAT16,
            AmpDtype::F16 => SCALAR_HALF,
        }
    }
}

/// Autocast on for `device` while alive; the previous state is restored on drop.
pub struct Autocast {
    device: i8,
    was_enabled: bool,
    old_dtype: i8,
}

impl Autocast {
    pub fn new(device: Device, dtype: AmpDtype) -> Autocast {
        let device = if device.is_cuda() {
            DEVICE_CUDA
        } else {
            DEVICE_CPU
        };
        // SAFETY: plain scalar arguments; these functions only touch thread-local state.
        unsafe {
            let was_enabled = at_is_autocast_enabled(device);
            let old_dtype = at_get_autocast_dtype(device);
            at_set_autocast_dtype(device, dtype.scalar_type());
            at_set_autocast_enabled(device, true);
            at_increment_nesting();
            Autocast {
                device,
                was_enabled,
                old_dtype,
            }
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            // Casted weight copies are cached per autocast region; free them when the
            // outermost region ends (what torch.autocast's __exit__ does).
            if at_decrement_nesting() == 0 {
                at_clear_cache();
            }
            at_set_autocast_enabled(self.device, self.was_enabled);
            at_set_autocast_dtype(self.device, self.old_dtype);
        }
    }
}

/// Runs `f` under autocast (or as it is when `dtype` is `None`).
pub fn with_autocast<T>(device: Device, dtype: Option<AmpDtype>, f: impl FnOnce() -> T) -> T {
    let _guard = dtype.map(|d| Autocast::new(device, d));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loss_scale_halves_on_overflow_and_grows_only_after_a_clean_interval() {
        let mut s = LossScaler::default();
        assert!(!s.update(f64::INFINITY), "an overflowed step is skipped");
        assert!(!s.update(f64::NAN));
        assert_eq!(s.scale, 16384.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            assert!(s.update(1.0));
        }
        assert_eq!(s.scale, 16384.0, "not yet");
        // An overflow one step before growth resets the count: no growth right after it.
        assert!(!s.update(f64::INFINITY));
        assert_eq!((s.scale, s.good_steps), (8192.0, 0));
        assert!(s.update(1.0));
        assert_eq!(s.scale, 8192.0);
        for _ in 1..LossScaler::GROWTH_INTERVAL {
            s.update(2.0);
        }
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
    }
    use tch::{Kind, Tensor};

    #[test]
    fn cpu_bf16_autocast_runs_matmuls_in_bf16_and_restores_state() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let inside = with_autocast(Device::Cpu, Some(AmpDtype::Bf16), || a.matmul(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        // Off again afterwards, and the f32 result is close to the bf16 one.
        let outside = a.matmul(&b);
        assert_eq!(outside.kind(), Kind::Float);
        let diff = f64::try_from((inside.to_kind(Kind::Float) - &outside).abs().max()).unwrap();
        assert!(diff < 0.1, "bf16 matmul far from f32: {diff}");
        // SAFETY: scalar query.
        assert!(!unsafe { at_is_autocast_enabled(DEVICE_CPU) });
        assert_eq!(
            unsafe { at_get_autocast_dtype(DEVICE_CPU) },
            SCALAR_BFLOAT16
        );
    }

    #[test]
    fn nested_regions_keep_the_outer_dtype_after_the_inner_ends() {
        let a = Tensor::randn([2, 2], (Kind::Float, Device::Cpu));
        with_autocast(Device::Cpu, Some(AmpDtype::Bf16), || {
            let _ = with_autocast(Device::Cpu, Some(AmpDtype::F16), || a.matmul(&a));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        });
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
    }
}
