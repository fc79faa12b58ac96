//! Measurement for sid, so speed and memory claims rest on numbers:
//! - [`sampler`]: a background thread writing `telemetry.jsonl` (RSS, per-stage CPU time,
//!   NVML's GPU memory/utilisation/power where NVML loads);
//! - [`memory`]: exact CUDA allocator peaks (via a small C++ shim) and CPU peak RSS, per period;
//! - [`allocations`]: libtorch's allocations charged to owners (pipeline stages sharing a
//!   process or a GPU), each with the bytes it holds and its peak;
//! - [`nvml`]: the NVML readings.
//!
//! Without an NVIDIA driver (as on CPU-only machines) everything still works and reports the
//! reason GPU telemetry is off.

pub mod allocations;
pub mod error;
pub mod memory;
pub mod nvml;
pub mod sampler;

pub use allocations::{AllocCounts, AllocOwner};
pub use error::{Result, TelemetryError};
pub use memory::{DevicePeak, PeakTracker};
pub use sampler::{Sample, Sampler};
