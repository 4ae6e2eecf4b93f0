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
    #[error("bad device {0:?} (expected BACKEND or BACKEND:INDEX, e.g. wgpu:1)")]
    BadSpec(String),
    #[error("no device {spec} on this machine: it has {count} {backend} device(s), {backend}:0 to {backend}:{last}", last = .count.saturating_sub(1))]
    NoSuchIndex {
        spec: DeviceSpec,
        backend: &'static str,
        count: usize,
    },
    #[error("device {0} is listed twice")]
    Repeated(DeviceSpec),
    #[error("devices {0} and {1} are of different backends; one run uses one backend")]
    Mixed(DeviceSpec, DeviceSpec),
    #[error("the device list is empty")]
    NoDevices,
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

    /// The device of this backend (its first), or why there is none.
    pub fn device(self) -> Result<Device, DeviceError> {
        Ok(self.devices()?.swap_remove(0))
    }

    /// Every device of this backend on the machine, in Burn's enumeration order (what
    /// `wgpu:N` indexes), or why there is none. The CPU backend has one device.
    pub fn devices(self) -> Result<Vec<Device>, DeviceError> {
        if !self.compiled() {
            return Err(DeviceError::NotCompiled(self.name()));
        }
        match self {
            Backend::Cpu => Ok(vec![Device::flex()]),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => all(
                DeviceType::Wgpu,
                "wgpu",
                " (no Vulkan/Metal/DX12 adapter; on Linux without a GPU install Mesa's lavapipe: mesa-vulkan-drivers)",
            ),
            #[cfg(feature = "cuda")]
            Backend::Cuda => all(DeviceType::Cuda, "cuda", " (no NVIDIA driver or GPU)"),
            #[allow(unreachable_patterns)]
            _ => unreachable!("checked by compiled()"),
        }
    }
}

impl Backend {
    /// The backend's devices that are cards on a bus, once each, in [`devices`](Self::devices)'
    /// order: what "every GPU" means, without software adapters such as Mesa's lavapipe, which
    /// wgpu lists beside them. The CPU backend's one device stands for itself.
    pub fn gpus(self) -> Result<Vec<Device>, DeviceError> {
        let devices = self.devices()?;
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        if self != Backend::Cpu {
            let cards = Device::enumerate_physical();
            return Ok(devices
                .into_iter()
                .filter(|d| cards.iter().any(|card| card.devices.contains(d)))
                .collect());
        }
        Ok(devices)
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn all(kind: DeviceType, name: &'static str, hint: &'static str) -> Result<Vec<Device>, DeviceError> {
    let devices = Device::enumerate(kind).into_vec();
    match devices.is_empty() {
        true => Err(DeviceError::Absent(name, hint)),
        false => Ok(devices),
    }
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

/// One device of a backend, as a device list names it: `wgpu:1` (or `wgpu`, its first device).
/// Written and read as that text, in flags and run files alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceSpec {
    pub backend: Backend,
    /// Position among the backend's devices on this machine, in Burn's enumeration order.
    pub index: usize,
}

impl DeviceSpec {
    /// The device, or why this machine or binary has none by that name. The CPU backend has
    /// one device, `cpu:0`.
    pub fn device(self) -> Result<Device, DeviceError> {
        let devices = self.backend.devices()?;
        let count = devices.len();
        devices.into_iter().nth(self.index).ok_or(DeviceError::NoSuchIndex {
            spec: self,
            backend: self.backend.name(),
            count,
        })
    }

    /// Checks what a list can get wrong without looking at the machine: it must be non-empty,
    /// name each device once and stay on one backend (gradients are combined through one
    /// backend's tensors).
    pub fn check_list(specs: &[DeviceSpec]) -> Result<(), DeviceError> {
        let first = specs.first().ok_or(DeviceError::NoDevices)?;
        for (i, spec) in specs.iter().enumerate() {
            if spec.backend != first.backend {
                return Err(DeviceError::Mixed(*first, *spec));
            }
            if specs[..i].contains(spec) {
                return Err(DeviceError::Repeated(*spec));
            }
        }
        Ok(())
    }

    /// Every device of the list, checked as [`check_list`](Self::check_list) does, then found on
    /// the machine; the first error wins.
    pub fn devices(specs: &[DeviceSpec]) -> Result<Vec<Device>, DeviceError> {
        Self::check_list(specs)?;
        specs.iter().map(|s| s.device()).collect()
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, index) = match s.split_once(':') {
            Some((name, index)) => {
                let index = index.parse().map_err(|_| DeviceError::BadSpec(s.to_string()))?;
                (name, index)
            }
            None => (s, 0),
        };
        Ok(DeviceSpec {
            backend: name.parse()?,
            index,
        })
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = DeviceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(spec: DeviceSpec) -> Self {
        spec.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.backend, self.index)
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
    fn device_lists_parse_and_say_what_is_wrong() {
        let spec = |s: &str| s.parse::<DeviceSpec>();
        assert_eq!(
            spec("wgpu:1"),
            Ok(DeviceSpec {
                backend: Backend::Wgpu,
                index: 1
            })
        );
        assert_eq!(spec("cpu").unwrap().to_string(), "cpu:0");
        assert_eq!(spec("wgpu:x"), Err(DeviceError::BadSpec("wgpu:x".into())));
        assert_eq!(spec("tpu:0"), Err(DeviceError::Unknown("tpu".into())));
        let list = |s: &str| s.split(',').map(|d| spec(d).unwrap()).collect::<Vec<_>>();
        assert_eq!(DeviceSpec::check_list(&list("wgpu:0,wgpu:1")), Ok(()));
        let err = DeviceSpec::check_list(&list("wgpu:0,wgpu:1,wgpu")).unwrap_err();
        assert_eq!(err.to_string(), "device wgpu:0 is listed twice");
        let err = DeviceSpec::check_list(&list("cpu,wgpu")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "devices cpu:0 and wgpu:0 are of different backends; one run uses one backend"
        );
        assert_eq!(DeviceSpec::check_list(&[]), Err(DeviceError::NoDevices));
        assert_eq!(DeviceSpec::devices(&list("cpu")).unwrap().len(), 1);
        let err = spec("cpu:1").unwrap().device().unwrap_err().to_string();
        assert_eq!(
            err,
            "no device cpu:1 on this machine: it has 1 cpu device(s), cpu:0 to cpu:0"
        );
        let json = serde_json::to_string(&list("cpu:0")).unwrap();
        assert_eq!(json, r#"["cpu:0"]"#);
        assert!(serde_json::from_str::<Vec<DeviceSpec>>(r#"["cpu:a"]"#).is_err());
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
