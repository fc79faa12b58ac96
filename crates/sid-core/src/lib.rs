//! The SID method as the paper's reference code does it, on one device.
//!
//! Synergistic Information Distillation trains a feature extractor `c` and a cascade of `L`
//! belief modules `f_i(p_{i-1}, z)` without a global backward pass: each module learns from its
//! own local loss ([`loss::local_loss`]) against the label and the previous module's belief.
//!
//! The pieces are kept separate so that the multi-device runtime can reuse them:
//! - [`extractor`]: the feature extractors (reference SimpleCNN, small MLP, and the paper's
//!   VGG-11-BN, ResNet-18 and ViT-Tiny), each a list of blocks and a head; your own through
//!   the [`Backbone`] and [`Block`] traits, handed in as a [`Net`];
//! - [`belief`]: the belief module (reference two-layer MLP);
//! - [`loss`]: the local SID loss;
//! - [`adam`]: Adam with inspectable state (checkpoints need it);
//! - [`graph`]: CUDA graphs of a whole training step;
//! - [`unit`]: a module or extractor together with its own parameters and optimizer, the
//!   self-contained piece of work that a worker thread runs;
//! - [`sid`] and [`bp`]: the SID network and its backprop baseline, both implementing
//!   [`Network`];
//! - [`stage`]: staged SID, the backbone cut into slices trained by their own local losses
//!   (the arithmetic of one stage; `sid-runtime` runs stages as a pipeline);
//! - [`bp_stage`]: the BP baseline cut at the same points, for GPipe and 1F1B pipelines;
//! - [`precision`]: float32 or bfloat16-autocast forward passes.
//!
//! ```no_run
//! use sid_core::{ModelConfig, Network, SidNetwork, LossConfig};
//! use tch::{Device, Kind, Tensor};
//! tch::manual_seed(0);
//! let cfg = ModelConfig::default(); // SimpleCNN on 28x28 grey images, L = 10
//! let mut net = SidNetwork::new(&cfg, LossConfig::default(), 1e-3, Device::Cpu).unwrap();
//! let x = Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu));
//! let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
//! let stats = net.train_step(&x, &y).unwrap();
//! assert_eq!(stats.module_losses.len(), 10);
//! let cascade = net.cascade(&x).unwrap();
//! let prediction = cascade.prediction(); // argmax of the last module's logits
//! ```

pub mod adam;
pub mod belief;
pub mod bp;
pub mod bp_stage;
pub mod config;
pub mod error;
pub mod extractor;
pub mod graph;
pub mod init;
pub mod loss;
pub mod network;
pub mod precision;
pub mod sid;
pub mod stage;
pub mod unit;

pub use adam::Adam;
pub use belief::BeliefModule;
pub use bp::BpNetwork;
pub use config::{ExtractorKind, LossConfig, Method, ModelConfig};
pub use error::CoreError;
pub use extractor::{Backbone, Block, Extractor, Net};
pub use init::Init;
pub use network::{
    early_exit, Cascade, CascadeHealth, EarlyExit, ExitTracker, NamedTensors, Network, StepStats,
};
pub use precision::Precision;
pub use sid::SidNetwork;
pub use stage::{Stage, StageCosts, StagePlan, StageSpec};
pub use unit::{ExtractorUnit, LocalOutput, ModuleUnit};

/// Serialises tests that use libtorch's global RNG: a seed only fixes what is drawn after it
/// if no other test thread draws in between.
#[cfg(test)]
pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks that the gradients of `micro` (M micro-batches) and of two `shards` summed (what the
/// replicas' all-reduce computes) equal the whole batch's, each of which must be non-zero (a
/// zero gradient would make the comparison prove nothing).
#[cfg(test)]
pub(crate) fn assert_gradients_add_up(
    whole: &[tch::Tensor],
    micro: &[tch::Tensor],
    shards: &[Vec<tch::Tensor>],
) {
    assert_eq!(whole.len(), micro.len());
    for (i, w) in whole.iter().enumerate() {
        let scale = w.abs().max().double_value(&[]);
        assert!(
            scale > 0.0,
            "gradient {i} is zero: the comparison would prove nothing"
        );
        let summed = &shards[0][i] + &shards[1][i];
        for (what, g) in [("micro-batches", &micro[i]), ("2 shards summed", &summed)] {
            let d = (g - w).abs().max().double_value(&[]);
            assert!(
                d <= 1e-5 * scale.max(1e-3),
                "{what}: gradient {i} differs by {d} (largest {scale})"
            );
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
