//! Memory measurements: the CUDA caching allocator's bytes (exact, resettable peak) and the
//! process's resident set on the CPU (peak resettable through `/proc/self/clear_refs`).

use std::ffi::c_char;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::nvml::GpuMonitor;
use crate::TelemetryError;

/// The CUDA caching allocator's counters for one device, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaMemory {
    /// Bytes held by live tensors.
    pub allocated: i64,
    /// Peak of `allocated` since the last reset.
    pub peak_allocated: i64,
}

sid_build::shim! {
    sid_cuda_stats;
    fn sid_cuda_memory_stats(
        device: i32,
        allocated: *mut i64,
        peak_allocated: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sid_cuda_reset_peak(device: i32, err: *mut c_char, err_len: usize) -> i32;
}

/// Calls an allocator shim function on `device`; a non-zero code becomes the C++ message.
fn call_shim(
    device: usize,
    f: impl FnOnce(*mut c_char, usize) -> i32,
) -> Result<(), TelemetryError> {
    let unavailable = TelemetryError::CudaStatsUnavailable;
    if !cfg!(sid_cuda_stats) {
        return Err(unavailable(
            "this build has no allocator shim (CUDA headers were not found)",
        ));
    }
    if !tch::Cuda::is_available() {
        return Err(unavailable("CUDA is not available"));
    }
    sid_build::call_shim::<512>(f).map_err(|message| TelemetryError::CudaStats { device, message })
}

/// The allocator's counters for CUDA device `index`; an error without CUDA, without the shim,
/// or with the C++ exception's message when libtorch refuses.
pub fn cuda_memory(index: usize) -> Result<CudaMemory, TelemetryError> {
    let mut m = CudaMemory::default();
    let (a, pa) = (&mut m.allocated, &mut m.peak_allocated);
    // SAFETY: two valid out-pointers and a buffer of `len` bytes; the shim catches every C++
    // exception.
    call_shim(index, |err, len| unsafe {
        sid_cuda_memory_stats(index as i32, a, pa, err, len)
    })?;
    Ok(m)
}

/// Resets the allocator's peak counters of CUDA device `index`.
pub fn reset_cuda_peak(index: usize) -> Result<(), TelemetryError> {
    // SAFETY: a buffer of `len` bytes; the shim catches every C++ exception.
    call_shim(index, |err, len| unsafe {
        sid_cuda_reset_peak(index as i32, err, len)
    })
}

fn status() -> Option<procfs::process::Status> {
    procfs::process::Process::myself().ok()?.status().ok()
}

/// The process's resident set size in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    status()?.vmrss.map(|k| k * 1024)
}

/// The process's peak resident set size in bytes since start or the last reset (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status()?.vmhwm.map(|k| k * 1024)
}

/// Resets the peak resident set to the current one; false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes the C heap has handed out and not yet taken back (all arenas plus mmapped blocks):
/// libtorch's CPU tensors live there, so this follows live tensor memory closely, unlike the
/// resident set, which keeps freed pages.
pub fn heap_in_use_bytes() -> u64 {
    // SAFETY: glibc ≥ 2.33; returns a plain struct by value.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

/// Samples [`heap_in_use_bytes`] from a background thread every few microseconds and keeps the
/// maximum: the peak of live CPU memory during a piece of work.
pub struct HeapPeak {
    stop: Arc<AtomicBool>,
    // The running peak, shared so a test can wait until a sample has seen its work.
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl HeapPeak {
    /// Starts sampling.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(heap_in_use_bytes()));
        let (flag, seen) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Relaxed) {
                seen.fetch_max(heap_in_use_bytes(), Relaxed);
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            // One last sample once stopped.
            seen.fetch_max(heap_in_use_bytes(), Relaxed);
        });
        Self { stop, peak, thread }
    }

    /// Stops sampling and returns the peak seen, in bytes.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Relaxed);
        self.thread.join().map_or(0, |()| self.peak.load(Relaxed))
    }
}

/// One device's peak memory over a period, and where the number comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePeak {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Peak bytes.
    pub bytes: u64,
    /// `cuda-allocator` (tensor bytes, exact), `nvml-process-at-end` (NVML's figure for this
    /// process when the period ends: the fallback), or `process-rss` (the whole process, CPU).
    pub source: String,
}

/// Tracks per-device peak memory over periods (epochs): [`PeakTracker::start`] resets the
/// peaks, [`PeakTracker::finish`] reads them. On a GPU whose allocator statistics cannot be
/// read (a build without the C++ shim), NVML's figure for this process is the fallback.
pub struct PeakTracker {
    devices: Vec<Device>,
    nvml: Option<GpuMonitor>,
}

impl PeakTracker {
    /// Tracks each distinct device of `devices` (the CPU once: its figure is the process's).
    pub fn new(devices: &[Device]) -> Self {
        let (mut devices, mut seen) = (devices.to_vec(), std::collections::HashSet::new());
        devices.retain(|d| seen.insert(*d));
        let fallback = devices.iter().any(|x| x.is_cuda()) && !cfg!(sid_cuda_stats);
        let nvml = fallback.then(GpuMonitor::open).and_then(Result::ok);
        Self { devices, nvml }
    }

    /// Starts a period: resets every peak that can be reset.
    pub fn start(&self) {
        for d in &self.devices {
            if let Device::Cuda(i) = d {
                // Unreadable statistics fall back to NVML in `finish`.
                let _ = reset_cuda_peak(*i);
            } else {
                reset_peak_rss();
            }
        }
    }

    /// The peaks since [`PeakTracker::start`].
    pub fn finish(&self) -> Vec<DevicePeak> {
        let peak = |device: String, (bytes, source): (u64, &str)| DevicePeak {
            device,
            bytes,
            source: source.into(),
        };
        self.devices
            .iter()
            .filter_map(|d| match d {
                Device::Cuda(i) => cuda_memory(*i)
                    .map(|m| (m.peak_allocated.max(0) as u64, "cuda-allocator"))
                    .ok()
                    .or_else(|| {
                        let sample = self.nvml.as_ref()?.sample(*i as u32).ok()?;
                        Some((sample.process_memory?, "nvml-process-at-end"))
                    })
                    .map(|b| peak(format!("cuda:{i}"), b)),
                _ => peak_rss_bytes().map(|b| peak("cpu".into(), (b, "process-rss"))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory figures are process-wide: tests that allocate must not overlap.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn rss_is_read_and_peak_follows_a_large_allocation() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let before = rss_bytes().expect("Linux /proc");
        assert!(before > 1 << 20);
        let tracker = PeakTracker::new(&[Device::Cpu, Device::Cpu]);
        tracker.start();
        // Touch 200 MB, free it, and check the peak saw it.
        let t = tch::Tensor::ones([50_000_000], (tch::Kind::Float, Device::Cpu));
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 5e7);
        drop(t);
        let peaks = tracker.finish();
        assert_eq!(peaks.len(), 1);
        assert!(
            peaks[0].bytes >= before + 150_000_000,
            "{peaks:?} vs rss {before}"
        );
        assert_eq!(peaks[0].source, "process-rss");
    }

    /// The sampler sees a 100 MB tensor while it lives. The tensor is kept until a sample is as
    /// high as the heap now stands with it (at most 20 s), not for a fixed window a loaded
    /// machine may not schedule the sampler in; a sampler that never samples still fails, at the
    /// deadline. No figure is taken before the tensor: other tests in this process allocate and
    /// free meanwhile, so only heights measured while it lives and after it are compared.
    #[test]
    fn heap_peak_sees_a_short_lived_tensor() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let probe = HeapPeak::start();
        let t = tch::Tensor::ones([25_000_000], (tch::Kind::Float, Device::Cpu)); // 100 MB
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while probe.peak.load(Relaxed) < heap_in_use_bytes() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let alive = heap_in_use_bytes();
        drop(t);
        let after = heap_in_use_bytes();
        let peak = probe.finish();
        assert!(alive >= 100_000_000, "the heap with the tensor: {alive}");
        assert!(after + 90_000_000 <= peak, "freed: {after} vs peak {peak}");
    }

    /// The allocator's figures exist exactly where CUDA and the shim do, and then they count a
    /// live tensor; elsewhere both calls say why not.
    #[test]
    fn cuda_figures_exist_exactly_with_cuda_and_the_shim() {
        if tch::Cuda::is_available() && cfg!(sid_cuda_stats) {
            let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            let t = tch::Tensor::ones([1 << 20], (tch::Kind::Float, Device::Cuda(0))); // 4 MiB
            reset_cuda_peak(0).unwrap();
            let m = cuda_memory(0).unwrap();
            assert!(m.allocated >= 4 << 20, "{m:?}");
            assert!(m.peak_allocated >= m.allocated, "{m:?}");
            drop(t);
        } else {
            for e in [cuda_memory(0).unwrap_err(), reset_cuda_peak(0).unwrap_err()] {
                assert!(matches!(e, TelemetryError::CudaStatsUnavailable(_)), "{e}");
            }
        }
    }

    /// The shim carries a C++ exception's message back: a device that does not exist makes
    /// libtorch throw (on a GPU machine; without CUDA the call is refused before the shim).
    /// Ignored by default; `--include-ignored` without CUDA or the shim fails.
    #[test]
    #[ignore = "needs CUDA and the allocator shim (run on a GPU machine with --include-ignored)"]
    fn a_cpp_exception_message_comes_back() {
        assert!(tch::Cuda::is_available(), "needs CUDA: not available here");
        if !cfg!(sid_cuda_stats) {
            panic!("this build has no allocator shim");
        }
        {
            let e = cuda_memory(100).unwrap_err();
            match &e {
                TelemetryError::CudaStats { device, message } => {
                    assert_eq!(*device, 100);
                    assert!(!message.is_empty(), "{e}");
                }
                other => panic!("expected the shim's message, got {other}"),
            }
            assert!(reset_cuda_peak(100).is_err());
        }
    }
}
