//! Choosing the compute device and dtype from user-facing names.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use tch::{Device, Kind};

/// A device as users name it: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> Result<Self> {
        Ok(match name {
            "cpu" => DeviceChoice::Cpu,
            "auto" => DeviceChoice::Auto,
            "cuda" => DeviceChoice::Cuda(0),
            s if s.starts_with("cuda:") => match s[5..].parse::<usize>() {
                Ok(i) => DeviceChoice::Cuda(i),
                Err(_) => bail!("unknown device {name:?} (use cpu, cuda, cuda:N or auto)"),
            },
            _ => bail!("unknown device {name:?} (use cpu, cuda, cuda:N or auto)"),
        })
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(d: DeviceChoice) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceChoice {
    /// The libtorch device, refusing CUDA that this build or host does not have.
    pub fn resolve(self) -> Result<Device> {
        let d = match self {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cuda(i) => Device::Cuda(i),
        };
        if let Device::Cuda(i) = d {
            if !tch::Cuda::is_available() {
                bail!("device {self} asked for, but CUDA is not available in this build or host");
            }
            if i >= tch::Cuda::device_count() as usize {
                bail!(
                    "device {self} asked for, but only {} CUDA device(s) exist",
                    tch::Cuda::device_count()
                );
            }
        }
        Ok(d)
    }
}

/// A compute dtype as users name it: `f32`, `f16`, `bf16` or `auto` (f16 on CUDA, f32 on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DtypeChoice {
    Auto,
    F32,
    F16,
    Bf16,
    /// int8 weights with f32 activations (GPT-2's linear layers; CPU only).
    Int8,
}

impl FromStr for DtypeChoice {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> Result<Self> {
        Ok(match name {
            "f32" | "float32" => DtypeChoice::F32,
            "f16" | "float16" | "half" => DtypeChoice::F16,
            "bf16" | "bfloat16" => DtypeChoice::Bf16,
            "int8" => DtypeChoice::Int8,
            "auto" => DtypeChoice::Auto,
            _ => bail!("unknown dtype {name:?} (use f32, f16, bf16, int8 or auto)"),
        })
    }
}

impl TryFrom<String> for DtypeChoice {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DtypeChoice> for String {
    fn from(d: DtypeChoice) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::F16 => "f16",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::Int8 => "int8",
        })
    }
}

impl DtypeChoice {
    /// The libtorch kind on `device` (`auto`: f16 on CUDA, f32 on the CPU). `int8` is
    /// `Kind::QInt8`, which the bundle loader reads as "f32 with int8 linear weights".
    pub fn resolve(self, device: Device) -> Result<Kind> {
        let k = match self {
            DtypeChoice::Int8 if device.is_cuda() => {
                bail!("dtype int8 runs on the CPU only (fbgemm's kernels); on CUDA use f16 or bf16")
            }
            DtypeChoice::Int8 => Kind::QInt8,
            DtypeChoice::F32 => Kind::Float,
            DtypeChoice::F16 => Kind::Half,
            DtypeChoice::Bf16 => Kind::BFloat16,
            DtypeChoice::Auto if device.is_cuda() => Kind::Half,
            DtypeChoice::Auto => Kind::Float,
        };
        // Half types run on the CPU too (libtorch's bf16/f16 kernels; bf16 is fast where the
        // CPU has AVX512-BF16): the same plumbing as on CUDA, testable without a GPU.
        let _ = device;
        Ok(k)
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        _ => "f32",
    }
}

/// Sets libtorch's intra-op thread count (CPU kernels).
pub fn set_threads(n: usize) {
    tch::set_num_threads(n as i32);
}

/// libtorch's intra-op thread count.
pub fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

/// The CPU's model name (from /proc/cpuinfo), for benchmark output.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The version of the torch package whose libtorch this binary links (its `version.py`).
pub fn torch_version() -> String {
    option_env!("CLIPCAP_LIBTORCH_LIB")
        .map(|lib| std::path::Path::new(lib).join("../version.py"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// What this build and host can use, as `clipcap info` prints it.
pub fn describe() -> Vec<(&'static str, String)> {
    vec![
        ("torch", torch_version()),
        (
            "libtorch",
            option_env!("CLIPCAP_LIBTORCH_LIB")
                .unwrap_or("?")
                .to_string(),
        ),
        ("cpu", cpu_model()),
        ("torch threads", tch::get_num_threads().to_string()),
        ("cuda available", tch::Cuda::is_available().to_string()),
        ("cuda devices", tch::Cuda::device_count().to_string()),
        (
            "cudnn available",
            tch::Cuda::cudnn_is_available().to_string(),
        ),
        (
            "cuda memory",
            match crate::cuda::memory(Device::Cuda(0)) {
                _ if !tch::Cuda::is_available() => "-".into(),
                Ok(Some((free, total))) => format!(
                    "cuda:0 {:.1} GiB free of {:.1} GiB",
                    free as f64 / GIB,
                    total as f64 / GIB
                ),
                Ok(None) => "-".into(),
                Err(e) => format!("{e:#}"),
            },
        ),
    ]
}

const GIB: f64 = (1u64 << 30) as f64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for n in ["cpu", "auto", "cuda:0", "cuda:3"] {
            assert_eq!(n.parse::<DeviceChoice>().unwrap().to_string(), n);
        }
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!("half".parse::<DtypeChoice>().unwrap(), DtypeChoice::F16);
        assert!("f8".parse::<DtypeChoice>().is_err());
        assert_eq!(DtypeChoice::Auto.resolve(Device::Cpu).unwrap(), Kind::Float);
        // Half types run on the CPU too (the plumbing CUDA uses, testable without a GPU).
        assert_eq!(
            DtypeChoice::Bf16.resolve(Device::Cpu).unwrap(),
            Kind::BFloat16
        );
        assert_eq!(
            DtypeChoice::Auto.resolve(Device::Cuda(0)).unwrap(),
            Kind::Half
        );
        // int8 weights are CPU-only, with a clear refusal on CUDA.
        assert_eq!("int8".parse::<DtypeChoice>().unwrap().to_string(), "int8");
        assert_eq!(DtypeChoice::Int8.resolve(Device::Cpu).unwrap(), Kind::QInt8);
        let e = DtypeChoice::Int8.resolve(Device::Cuda(0)).unwrap_err();
        assert!(e.to_string().contains("CPU only"), "{e}");
    }

    /// A thread's nice value is its own, inherited by the threads it starts, and refused
    /// outside 0..=19.
    #[test]
    fn a_thread_lowers_its_own_priority_and_its_children_inherit_it() {
        let before = thread_nice();
        // Raised, never lowered: that needs no privilege.
        let target = (before + 3).min(19);
        let (mine, child) = std::thread::spawn(move || {
            set_thread_nice(target).unwrap();
            let child = std::thread::spawn(thread_nice).join().unwrap();
            (thread_nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!((mine, child), (target, target));
        assert_eq!(thread_nice(), before, "other threads keep theirs");
        assert!(set_thread_nice(20).is_err());
        assert!(set_thread_nice(-1).is_err());
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn malloc_trim(pad: usize) -> i32;
    fn gettid() -> i32;
    fn setpriority(which: i32, who: u32, prio: i32) -> i32;
    fn getpriority(which: i32, who: u32) -> i32;
}

/// Sets the calling thread's nice value (0-19: higher yields the CPU to others). Threads it
/// starts later inherit it, as libtorch's OpenMP workers for this thread's kernels do. Only
/// ever raised: an unprivileged process cannot take it back.
pub fn set_thread_nice(nice: i32) -> Result<()> {
    if !(0..=19).contains(&nice) {
        bail!("nice must be in 0..=19, not {nice}");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: plain system calls on this thread's own id (PRIO_PROCESS = 0 with a thread
        // id addresses that one thread on Linux).
        let rc = unsafe { setpriority(0, gettid() as u32, nice) };
        if rc != 0 {
            bail!("setpriority: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The calling thread's nice value (0 where it cannot be read).
pub fn thread_nice() -> i32 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: reads this thread's own priority.
    unsafe {
        getpriority(0, gettid() as u32)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Hands freed heap memory back to the operating system. glibc keeps what a burst of
/// requests freed (decode buffers, image tensors) for reuse, so without this the resident
/// size stays at the last peak; the worker calls it when it goes idle.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        malloc_trim(0);
    }
}
