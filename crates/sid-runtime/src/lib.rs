//! Multi-device SID, two ways:
//! - staged SID as a real pipeline ([`StagedPipeline`]): the backbone cut into stages, one per
//!   device, each trained by its own local losses; micro-batches flow from stage to stage and
//!   steps overlap, with no flush between them;
//! - the paper's SID with its modules spread out ([`Pipeline`]): one worker thread per device
//!   owns its modules' parameters and optimizers, and every step runs the workers' local
//!   updates concurrently, with no global backward pass.
//!
//! - [`staged`]: the staged pipeline's coordinator;
//! - [`schedule`]: what a stage does with each message, written once;
//! - [`transport`]: how messages move between stages (one thread, or a thread per stage);
//! - [`ranks`] and [`links`]: stages and replicas in other processes, over c10d;
//! - [`paper`]: the paper's SID on the stage pipeline (the extractor as stage 1, module
//!   blocks after it), used with micro-batches;
//! - [`coordinator`]: the paper-mode step schedule, broadcasts, gradient sum, the extractor;
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
pub mod links;
pub mod ops;
pub mod paper;
pub mod placement;
pub mod ranks;
pub mod schedule;
mod setup;
pub mod staged;
pub mod streams;
pub mod transport;
pub mod worker;

pub use coordinator::{Pipeline, PipelineConfig, StepTiming};
pub use error::{Result, RuntimeError};
#[cfg(feature = "fault-injection")]
pub use fault::{Fault, FaultKind};
pub use links::serve;
pub use ops::BpSchedule;
pub use placement::Placement;
pub use ranks::Ranks;
pub use setup::{PipelineMethod, StagedConfig};
pub use staged::{StageTime, StagedPipeline};
pub use transport::Transport;
