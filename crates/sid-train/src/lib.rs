//! Training runs for SID and its backprop baseline: resolved configuration, device lists, the
//! epoch loop with evaluation, `metrics.jsonl`, atomic checkpoints and exact resume.
//!
//! This crate prints nothing and parses no arguments: the `sid-launch` binary owns both. It
//! reports progress through [`Event`]s and stops cleanly when its stop flag is set.

pub mod checkpoint;
pub mod config;
pub mod devices;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod interop;
pub mod metrics;
pub mod network;
pub mod plan;
pub mod predict;
pub mod tensorboard;
pub mod trainer;

pub use config::RunConfig;
pub use error::{Result, TrainError};
pub use metrics::EpochMetrics;
pub use plan::{Graphs, Layout, Plan};
pub use trainer::{cascade_health, Event, Run, Summary};
