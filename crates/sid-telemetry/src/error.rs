//! The error type of measurements.

use nvml_wrapper::error::NvmlError;

/// Why a measurement could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// NVML could not be loaded or initialised (no NVIDIA driver on this machine).
    #[error("NVML unavailable: {0}")]
    NvmlUnavailable(#[source] NvmlError),
    /// NVML works but sees no GPU.
    #[error("NVML sees no GPU")]
    NoGpu,
    /// An NVML query failed.
    #[error("NVML {what}: {source}")]
    Nvml {
        /// What was asked, e.g. `memory of 0`.
        what: String,
        /// NVML's answer.
        source: NvmlError,
    },
    /// The CUDA allocator's statistics cannot be read here: no CUDA, or a build without the
    /// C++ shim.
    #[error("CUDA allocator statistics unavailable: {0}")]
    CudaStatsUnavailable(&'static str),
    /// The allocator shim caught a C++ exception; its message.
    #[error("CUDA allocator statistics of cuda:{device}: {message}")]
    CudaStats {
        /// The GPU index.
        device: usize,
        /// The exception's `what()`.
        message: String,
    },
    /// Allocations cannot be charged to owners: a build without the shim, or the C++
    /// exception's message.
    #[error("per-owner memory accounting: {0}")]
    AllocTracking(String),
}

impl TelemetryError {
    /// An NVML query `what` that failed with `source`.
    pub(crate) fn nvml(what: impl Into<String>) -> impl FnOnce(NvmlError) -> Self {
        let what = what.into();
        move |source| Self::Nvml { what, source }
    }
}

/// Result alias for this crate.
pub type Result<T, E = TelemetryError> = std::result::Result<T, E>;
