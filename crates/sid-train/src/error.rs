//! The error type of training runs.

use std::path::PathBuf;

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is out of range or inconsistent.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The device list names something this machine does not have.
    #[error("{0}")]
    Device(String),
    /// Loading the data failed.
    #[error(transparent)]
    Data(#[from] sid_data::DataError),
    /// The method failed (non-finite loss, libtorch error, shape mismatch).
    #[error(transparent)]
    Core(#[from] sid_core::CoreError),
    /// The multi-device runtime refused its settings or failed to start. Its setting errors
    /// read as the other settings' do (`invalid setting: ...`).
    #[error("{}", runtime_message(.0))]
    // Not a `source`: the message above already is the runtime's, and error chains would
    // print it twice.
    Runtime(sid_runtime::RuntimeError),
    /// A file could not be read or written: the file, and the cause.
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A checkpoint is unreadable or does not belong to this run: the checkpoint file, and
    /// what is wrong with it.
    #[error("bad checkpoint {0}: {1}")]
    Checkpoint(PathBuf, String),
    /// A weights file (`--init-from`, an export) is unreadable or does not fit the model: the
    /// file, and what is wrong with it.
    #[error("{0}: {1}")]
    Weights(PathBuf, String),
    /// The run was asked to stop; a checkpoint was written first.
    #[error(
        "interrupted during epoch {epoch} after step {step}; checkpoint saved to {checkpoint}"
    )]
    Interrupted {
        /// 1-based epoch that was running.
        epoch: usize,
        /// Steps of that epoch completed.
        step: usize,
        /// Where the checkpoint is.
        checkpoint: PathBuf,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io(path.into(), source)
    }

    /// The checkpoint at `path` is unreadable or does not belong to the run, for `reason`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Checkpoint(path.into(), reason.to_string())
    }
}

impl From<sid_runtime::RuntimeError> for TrainError {
    fn from(e: sid_runtime::RuntimeError) -> Self {
        Self::Runtime(e)
    }
}

impl From<sid_dist::DistError> for TrainError {
    fn from(e: sid_dist::DistError) -> Self {
        Self::Runtime(sid_runtime::RuntimeError::Dist(e))
    }
}

fn runtime_message(e: &sid_runtime::RuntimeError) -> String {
    use sid_runtime::RuntimeError::{Config, Placement};
    match e {
        Placement(_) | Config(_) => format!("invalid setting: {e}"),
        other => other.to_string(),
    }
}

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_errors_stay_typed_and_read_as_before() {
        let e = TrainError::from(sid_runtime::RuntimeError::Placement(
            "blocks overlap".into(),
        ));
        assert!(matches!(
            e,
            TrainError::Runtime(sid_runtime::RuntimeError::Placement(_))
        ));
        assert_eq!(e.to_string(), "invalid setting: placement: blocks overlap");
        let e = TrainError::from(sid_runtime::RuntimeError::Protocol("late reply".into()));
        assert_eq!(e.to_string(), "protocol error: late reply");
    }
}
