//! The error type of the method crate.

/// What can go wrong while building, training or restoring a network.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A configuration value is out of range.
    #[error("invalid model setting: {0}")]
    InvalidConfig(String),
    /// A module's local loss (or the backprop loss) became NaN or infinite.
    #[error("non-finite loss {value} in {what}")]
    NonFiniteLoss {
        /// Which loss: `module 3`, `backprop`.
        what: String,
        /// The module (1-based) when it is a module's local loss.
        module: Option<usize>,
        /// The offending value.
        value: f64,
    },
    /// A checkpoint does not match the network it is loaded into.
    #[error("checkpoint does not match the model: {0}")]
    StateMismatch(String),
    /// Reference weights (torchvision / timm names) do not fit the backbone.
    #[error("{0}")]
    Reference(String),
    /// A CUDA graph could not be captured or replayed.
    #[error("CUDA graph: {0}")]
    Graph(String),
    /// A failure in the multi-device runtime (a worker failed, a wait timed out).
    #[error(transparent)]
    Runtime(Box<dyn std::error::Error + Send + Sync>),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A [`CoreError::InvalidConfig`] saying `msg`.
pub(crate) fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidConfig(msg.into())
}
