//! Which device a rank computes on (`--device cpu|cuda[:N]`), and the device itself.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the ranks of a layout compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// A CUDA GPU: `Some(n)` GPU `n` for every rank, `None` rank `r` on GPU
    /// `r mod` the number of GPUs.
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// Whether this is the CPU, the default.
    pub fn is_cpu(&self) -> bool {
        *self == Self::Cpu
    }

    /// The GPU ordinal rank `rank` computes on, or `None` on the CPU. `None` for
    /// [`Cuda(None)`](Self::Cuda) asks the driver how many GPUs there are.
    pub fn ordinal(&self, rank: usize) -> Result<Option<usize>> {
        match *self {
            Self::Cpu => Ok(None),
            Self::Cuda(Some(n)) => Ok(Some(n)),
            Self::Cuda(None) => Ok(Some(rank % gpu_count()?)),
        }
    }

    /// The device rank `rank` computes on. Ranks of one process on the same GPU get
    /// the same candle device (one context and stream), so that the tensors they
    /// exchange stay on the GPU.
    pub fn device(&self, rank: usize) -> Result<Device> {
        match self.ordinal(rank)? {
            None => Ok(Device::Cpu),
            Some(ordinal) => cuda_device(ordinal),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownDevice(s.to_string());
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => {
                let index = s.strip_prefix("cuda:").ok_or_else(unknown)?;
                // Digits only: `cuda:+1` and `cuda: 1` are typos, not GPU 1.
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unknown());
                }
                Ok(Self::Cuda(Some(index.parse().map_err(|_| unknown())?)))
            }
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> Self {
        d.to_string()
    }
}

/// Whether this build computes on CUDA GPUs (the `cuda` feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The number of CUDA GPUs the driver sees.
pub fn gpu_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::CudaContext;
        let count = CudaContext::device_count()
            .map_err(|e| Error::Cuda(format!("counting the GPUs: {e:?}")))?;
        match usize::try_from(count) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::Cuda("the CUDA driver sees no GPU".into())),
        }
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::CudaNotBuilt)
}

/// This process's candle device for GPU `ordinal`, created on first use.
fn cuda_device(ordinal: usize) -> Result<Device> {
    if !CUDA_BUILT {
        return Err(Error::CudaNotBuilt);
    }
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    let count = gpu_count()?;
    if ordinal >= count {
        return Err(Error::Cuda(format!(
            "cuda:{ordinal} asked for, but the driver sees {count} GPU(s)"
        )));
    }
    let device = Device::new_cuda(ordinal)
        .map_err(|e| Error::Cuda(format!("opening cuda:{ordinal}: {e}")))?;
    devices.insert(ordinal, device.clone());
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip_and_typos_are_refused() {
        for name in ["cpu", "cuda", "cuda:0", "cuda:7"] {
            assert_eq!(name.parse::<DeviceSpec>().unwrap().to_string(), name);
        }
        for bad in [
            "gpu", "cuda:", "cuda:+1", "cuda: 1", "cuda:-1", "CUDA", "cuda1",
        ] {
            assert_eq!(
                bad.parse::<DeviceSpec>().unwrap_err().to_string(),
                format!("unknown device {bad:?} (known: cpu, cuda, cuda:N)")
            );
        }
    }

    #[test]
    fn the_cpu_is_every_rank_s_device_by_default() {
        let cpu = DeviceSpec::default();
        assert!(cpu.device(5).unwrap().is_cpu());
        assert_eq!(cpu.ordinal(5).unwrap(), None);
        assert_eq!(DeviceSpec::Cuda(Some(3)).ordinal(5).unwrap(), Some(3));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_says_so_when_asked_for_a_gpu() {
        for spec in [DeviceSpec::Cuda(None), DeviceSpec::Cuda(Some(0))] {
            let err = spec.device(0).unwrap_err().to_string();
            assert!(err.contains("built without the `cuda` feature"), "{err}");
        }
    }
}
