//! Multi-device SID: a [`Pipeline`] (the coordinator) places the belief modules on devices,
//! one worker thread per device owns its modules' parameters and optimizers, and every step
//! runs the workers' local updates concurrently, with no global backward pass.
//!
//! - [`coordinator`]: the step schedule, broadcasts, gradient sum, the extractor;
//! - [`worker`]: the per-device thread and its messages;
//! - [`placement`]: which modules each worker owns;
//! - [`streams`]: CUDA streams from libtorch's pool, for several workers on one GPU;
//! - `fault`: injected faults for tests (cargo feature `fault-injection`).
//!
//! The pipeline implements [`sid_core::Network`], so the trainer drives it exactly like the
//! single-device network.

pub mod coordinator;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod placement;
pub mod streams;
pub mod worker;

pub use coordinator::{Pipeline, PipelineConfig, StepTiming};
pub use error::{Result, RuntimeError};
#[cfg(feature = "fault-injection")]
pub use fault::{Fault, FaultKind};
pub use placement::Placement;
