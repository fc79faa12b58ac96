//! GPU figures from NVML: memory, utilisation, power, and this process's memory per device.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

use crate::{Result, TelemetryError};

/// One NVML reading of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    /// NVML index (PCI order; the binary sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA agrees).
    pub index: u32,
    /// Device memory in use, all processes, bytes.
    pub memory_used: u64,
    /// Device memory in all, bytes.
    pub memory_total: u64,
    /// This process's memory on the device, bytes, when NVML reports it.
    pub process_memory: Option<u64>,
    /// GPU utilisation over the last sample period, percent.
    pub gpu_util: Option<u32>,
    /// Power draw, milliwatts.
    pub power_mw: Option<u32>,
}

/// An open NVML session.
pub struct GpuMonitor {
    nvml: Nvml,
    count: u32,
}

impl GpuMonitor {
    /// Opens NVML; the error says why it cannot (no driver library, no GPU).
    pub fn open() -> Result<Self> {
        let nvml = Nvml::init().map_err(TelemetryError::NvmlUnavailable)?;
        let count = nvml
            .device_count()
            .map_err(TelemetryError::nvml("device count"))?;
        Ok(Self { nvml, count })
    }

    /// Number of GPUs NVML sees.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The product name of GPU `index` (e.g. "NVIDIA H200"), so reports name the machine.
    pub fn name(&self, index: u32) -> Result<String> {
        self.nvml
            .device_by_index(index)
            .and_then(|d| d.name())
            .map_err(TelemetryError::nvml(format!("name of {index}")))
    }

    /// The driver version NVML reports.
    pub fn driver_version(&self) -> Result<String> {
        self.nvml
            .sys_driver_version()
            .map_err(TelemetryError::nvml("driver version"))
    }

    /// Reads GPU `index`; fields NVML refuses are `None`.
    pub fn sample(&self, index: u32) -> Result<GpuSample> {
        let d = self
            .nvml
            .device_by_index(index)
            .map_err(TelemetryError::nvml(format!("device {index}")))?;
        let mem = d
            .memory_info()
            .map_err(TelemetryError::nvml(format!("memory of {index}")))?;
        let processes = d.running_compute_processes().unwrap_or_default();
        let mine = processes.into_iter().find(|p| p.pid == std::process::id());
        let process_memory = match mine.map(|p| p.used_gpu_memory) {
            Some(UsedGpuMemory::Used(bytes)) => Some(bytes),
            _ => None,
        };
        Ok(GpuSample {
            index,
            memory_used: mem.used,
            memory_total: mem.total,
            process_memory,
            gpu_util: d.utilization_rates().ok().map(|u| u.gpu),
            power_mw: d.power_usage().ok(),
        })
    }
}

/// Names of all GPUs NVML sees, in NVML (PCI) order; the error says why NVML cannot tell.
pub fn gpu_names() -> Result<Vec<String>> {
    let m = GpuMonitor::open()?;
    (0..m.count()).map(|i| m.name(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where CUDA works the driver is there, so NVML must open, see every CUDA device and
    /// read the first; where NVML fails, CUDA must not work either and the error says NVML.
    #[test]
    fn nvml_opens_exactly_where_a_gpu_driver_is() {
        let cuda = tch::Cuda::device_count();
        match GpuMonitor::open() {
            Ok(m) => {
                assert!(
                    i64::from(m.count()) >= cuda,
                    "NVML {} < CUDA {cuda}",
                    m.count()
                );
                for i in 0..m.count() {
                    assert!(!m.name(i).unwrap().is_empty());
                }
                if m.count() > 0 {
                    let s = m.sample(0).unwrap();
                    assert!(
                        s.memory_total > 0 && s.memory_used <= s.memory_total,
                        "{s:?}"
                    );
                }
            }
            Err(e) => {
                assert_eq!(cuda, 0, "CUDA sees {cuda} GPUs but NVML failed: {e}");
                assert!(e.to_string().starts_with("NVML"), "{e}");
                assert!(gpu_names().is_err());
            }
        }
    }
}
