//! Runtime choice of the compute backend. The model itself names no backend; this is the one
//! place that does, each behind its Cargo feature (`wgpu`, `cuda`; the pure-Rust CPU backend,
//! Burn's `flex`, is always compiled in).

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use burn::tensor::DeviceType;

/// A backend a binary can be asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Burn's pure-Rust `flex` backend (SIMD + threads).
    #[default]
    Cpu,
    /// Vulkan, Metal or DX12 through wgpu.
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeviceError {
    #[error("unknown device {0:?} (expected cpu, wgpu or cuda)")]
    Unknown(String),
    #[error("the {0} backend is not compiled into this binary; rebuild with `--features {0}`")]
    NotCompiled(&'static str),
    #[error("no {0} device found on this machine{1}")]
    Absent(&'static str, &'static str),
    #[error("the {0} device does not support {1} (try f32)")]
    Unsupported(&'static str, &'static str),
    #[error("cannot set the float type: {0}")]
    Configure(String),
}

/// The float type every tensor of a device is made in (weights are converted on load).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            Precision::F32 => burn::tensor::FloatDType::F32,
            Precision::F16 => burn::tensor::FloatDType::F16,
            Precision::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Precision::F32, Precision::F16, Precision::Bf16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown dtype {s:?} (expected f32, f16 or bf16)"))
    }
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Wgpu, Backend::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend.
    pub fn compiled(self) -> bool {
        match self {
            Backend::Cpu => true,
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The device of this backend computing in `precision`, which must be set before the
    /// device makes its first tensor.
    pub fn device_in(self, precision: Precision) -> Result<Device, DeviceError> {
        let mut device = self.device()?;
        if precision != Precision::F32 {
            let dtype = precision.float_dtype();
            if !device.supports_dtype(burn::tensor::DType::from(dtype)) {
                return Err(DeviceError::Unsupported(self.name(), precision.name()));
            }
            device
                .configure(burn::tensor::DeviceConfig::default().float_dtype(dtype))
                .map_err(|e| DeviceError::Configure(format!("{e:?}")))?;
        }
        Ok(device)
    }

    /// The device of this backend, or why there is none.
    pub fn device(self) -> Result<Device, DeviceError> {
        if !self.compiled() {
            return Err(DeviceError::NotCompiled(self.name()));
        }
        match self {
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => first(
                DeviceType::Wgpu,
                "wgpu",
                " (no Vulkan/Metal/DX12 adapter; on Linux without a GPU install Mesa's lavapipe: mesa-vulkan-drivers)",
            ),
            #[cfg(feature = "cuda")]
            Backend::Cuda => first(DeviceType::Cuda, "cuda", " (no NVIDIA driver or GPU)"),
            #[allow(unreachable_patterns)]
            _ => unreachable!("checked by compiled()"),
        }
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn first(kind: DeviceType, name: &'static str, hint: &'static str) -> Result<Device, DeviceError> {
    Device::enumerate(kind)
        .into_vec()
        .into_iter()
        .next()
        .ok_or(DeviceError::Absent(name, hint))
}

impl FromStr for Backend {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| DeviceError::Unknown(s.to_string()))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), where the OS reports one:
/// what the benchmarks report as memory (on the CPU backend, where the tensors live).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// The process's resident set now (`VmRSS`), where the OS reports one: what a soak test
/// watches for growth.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// A size field of `/proc/self/status` (given in KiB), in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        assert_eq!("cpu".parse(), Ok(Backend::Cpu));
        assert_eq!("WGPU".parse(), Ok(Backend::Wgpu));
        assert_eq!("tpu".parse::<Backend>(), Err(DeviceError::Unknown("tpu".into())));
    }

    #[test]
    fn cpu_always_works_and_missing_backends_say_why() {
        assert!(Backend::Cpu.device().is_ok());
        if !Backend::Cuda.compiled() {
            let err = Backend::Cuda.device().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
