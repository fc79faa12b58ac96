//! The error type of the c10d layer.

/// What can go wrong talking to other ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Serving or reaching the store failed (port in use, master unreachable, timeout).
    #[error("rendezvous: {what} failed: {cause}")]
    Rendezvous {
        /// What was tried, with the address.
        what: String,
        /// libtorch's message.
        cause: String,
    },
    /// A store operation failed.
    #[error("store: {op} failed: {cause}")]
    Store {
        /// The operation and key.
        op: String,
        /// libtorch's message.
        cause: String,
    },
    /// A process-group operation failed or timed out.
    #[error("rank {rank} ({group} group): {op} failed: {cause}")]
    Op {
        /// The group's name.
        group: String,
        /// This rank within the group.
        rank: usize,
        /// The operation and the peer.
        op: String,
        /// libtorch's message.
        cause: String,
    },
    /// The environment (RANK, WORLD_SIZE, …) is unusable.
    #[error("{0}")]
    Env(String),
}

/// Result alias for this crate.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
