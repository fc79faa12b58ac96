//! Multi-device SID on one stage pipeline ([`StagedPipeline`]): a thread per stage (or the
//! stages one after another in the caller's thread), and stages in other processes over c10d.
//! It trains three things, with one schedule:
//! - staged SID: the backbone cut into stages, one per device, each trained by its own local
//!   losses; micro-batches flow from stage to stage and steps overlap, with no flush between
//!   them;
//! - the paper's SID with its modules spread out: the extractor as stage 1, then one stage per
//!   device owning a block of modules; every module stage runs its local updates as soon as
//!   its inputs arrive, with no global backward pass, and sends its gradient at `z` straight
//!   back to the extractor;
//! - the BP baseline cut at the same blocks, as a GPipe or 1F1B pipeline.
//!
//! - [`StagedConfig`]: the pipeline's settings and the method it trains;
//! - [`staged`]: the pipeline's coordinator (feeds micro-batches, collects reports);
//! - [`schedule`]: what a stage does with each message, written once;
//! - [`transport`]: how messages move between stages (one thread, or a thread per stage);
//! - [`ranks`] and [`links`]: stages and replicas in other processes, over c10d;
//! - [`paper`]: the paper's module blocks;
//! - [`ops`]: the order of a flushing stage's forwards and backwards (schedules as data);
//! - [`placement`]: which modules each device owns in the paper's SID;
//! - [`streams`]: CUDA streams from libtorch's pool, for several stages on one GPU;
//! - `fault`: injected faults for tests (cargo feature `fault-injection`).
//!
//! The pipeline implements [`sid_core::Network`]: the trainer drives it for every run, the
//! single device included (its stages one after another in the caller's thread).

mod config;
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

pub use config::{PipelineMethod, StagedConfig};
pub use error::{Failure, Result, RuntimeError};
#[cfg(feature = "fault-injection")]
pub use fault::{Fault, FaultKind};
pub use links::serve;
pub use ops::BpSchedule;
pub use placement::Placement;
pub use ranks::Ranks;
pub use staged::{StageMemory, StageStats, StagedPipeline};
pub use transport::{device_name, Transport};
