//! The error type of the multi-device runtime.

use std::time::Duration;

/// What can stop the multi-device runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `--placement` or the device list is unusable.
    #[error("placement: {0}")]
    Placement(String),
    /// Another runtime setting is unusable.
    #[error("{0}")]
    Config(String),
    /// A pipeline stage reported an error or panicked.
    #[error("stage {stage} on {device} failed{}: {cause}", module.map(|m| format!(" in module {m}")).unwrap_or_default())]
    Stage {
        /// 1-based stage.
        stage: usize,
        /// Its device, e.g. `cuda:1`.
        device: String,
        /// 1-based module, when the failure belongs to one.
        module: Option<usize>,
        /// What happened.
        cause: String,
    },
    /// A wait ran out of time.
    #[error("{waiter} waited {} s for {waited_for} and gave up", timeout.as_secs())]
    Timeout {
        /// Who waited.
        waiter: String,
        /// For whom and what.
        waited_for: String,
        /// How long.
        timeout: Duration,
    },
    /// A stage answered out of order (a result of another step, or the wrong kind).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A link to another process (rank) failed: it died, hung up or sent garbage.
    #[error("{0}")]
    Link(String),
    /// c10d itself failed (rendezvous, a collective).
    #[error(transparent)]
    Dist(#[from] sid_dist::DistError),
    /// A CUDA stream could not be used or synchronised.
    #[error(transparent)]
    Stream(#[from] crate::streams::StreamError),
    /// Per-stage memory accounting could not be set up.
    #[error(transparent)]
    Telemetry(#[from] sid_telemetry::TelemetryError),
    /// The method itself failed on the coordinator.
    #[error(transparent)]
    Core(#[from] sid_core::CoreError),
}

impl From<RuntimeError> for sid_core::CoreError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Core(c) => c,
            other => sid_core::CoreError::Runtime(Box::new(other)),
        }
    }
}

/// Why a stage stopped.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 1-based module, when the failure belongs to one.
    pub module: Option<usize>,
    /// What happened.
    pub cause: String,
}

impl Failure {
    /// A failure that belongs to no module.
    pub(crate) fn new(cause: impl Into<String>) -> Self {
        Self {
            module: None,
            cause: cause.into(),
        }
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Self {
        Self::new(e.to_string())
    }
}

impl From<sid_core::CoreError> for Failure {
    fn from(e: sid_core::CoreError) -> Self {
        let module = match &e {
            sid_core::CoreError::NonFiniteLoss { module, .. } => *module,
            _ => None,
        };
        Self {
            module,
            cause: e.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
