//! Choosing the compute device and dtype from user-facing names.
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
pub fn parse_device(name: &str) -> Result<Device> {
    let d = match name {
        "cpu" => Device::Cpu,
        "auto" => Device::cuda_if_available(),
        "cuda" => Device::Cuda(0),
        s if s.starts_with("cuda:") => match s[5..].parse::<usize>() {
            Ok(i) => Device::Cuda(i),
            Err(_) => bail!("unknown device {name:?} (use cpu, cuda, cuda:N or auto)"),
        },
        _ => bail!("unknown device {name:?} (use cpu, cuda, cuda:N or auto)"),
    };
    if let Device::Cuda(i) = d {
        if !tch::Cuda::is_available() {
            bail!("device {name:?} asked for, but CUDA is not available in this build or host");
        }
        if i >= tch::Cuda::device_count() as usize {
            bail!(
                "device {name:?} asked for, but only {} CUDA device(s) exist",
                tch::Cuda::device_count()
            );
        }
    }
    Ok(d)
}

/// `f32`, `f16`, `bf16` or `auto` (f32 on CPU, f16 on CUDA); half types only on CUDA.
pub fn parse_dtype(name: &str, device: Device) -> Result<Kind> {
    let k = match name {
        "f32" | "float32" => Kind::Float,
        "f16" | "float16" | "half" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "auto" => {
            if device.is_cuda() {
                Kind::Half
            } else {
                Kind::Float
            }
        }
        _ => bail!("unknown dtype {name:?} (use f32, f16, bf16 or auto)"),
    };
    if k != Kind::Float && !device.is_cuda() {
        bail!("dtype {name} needs a CUDA device; the CPU runs f32");
    }
    Ok(k)
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
