//! The SID method as the paper's reference code does it: its pieces and their arithmetic.
//!
//! Synergistic Information Distillation trains a feature extractor `c` and a cascade of `L`
//! belief modules `f_i(p_{i-1}, z)` without a global backward pass: each module learns from its
//! own local loss ([`loss::local_loss_for`]) against the label and the previous module's belief.
//!
//! The pieces are kept separate so that the runtime (`sid-runtime`, which runs them as a
//! pipeline of stages on one device or many) can compose them:
//! - [`extractor`]: the feature extractors (reference SimpleCNN, small MLP, and the paper's
//!   VGG-11-BN, ResNet-18 and ViT-Tiny), each a list of blocks and a head; your own through
//!   the [`Backbone`] and [`Block`] traits, handed in as a [`Net`];
//! - [`belief`]: the belief module (reference two-layer MLP);
//! - [`loss`]: the local SID loss;
//! - [`adam`]: Adam with inspectable state (checkpoints need it);
//! - [`graph`]: CUDA graphs of a whole training step;
//! - [`unit`]: a module or extractor together with its own parameters and optimizer, and the
//!   [`unit::Unit`] trait every pipeline stage's work implements;
//! - [`network`]: the [`Network`] trait the trainer drives, and what a cascade predicts;
//! - [`stage`]: staged SID, the backbone cut into slices trained by their own local losses
//!   (the arithmetic of one stage; `sid-runtime` runs stages as a pipeline);
//! - [`bp_stage`]: the BP baseline cut at the same points, for GPipe and 1F1B pipelines;
//! - [`precision`]: float32 or bfloat16-autocast forward passes.
//!
//! One module's local step, on features `z` from the extractor:
//!
//! ```
//! use sid_core::unit::ModuleUnit;
//! use sid_core::{LossConfig, ModelConfig};
//! use tch::{Device, Kind, Tensor};
//! tch::manual_seed(0);
//! let cfg = ModelConfig::default(); // SimpleCNN features, 10 classes
//! let mut module = ModuleUnit::new(0, &cfg, LossConfig::default(), 1e-3, Device::Cpu);
//! let z = Tensor::randn([8, cfg.feature_dim], (Kind::Float, Device::Cpu));
//! let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
//! let p0 = sid_core::belief::uniform_belief(8, cfg.num_classes, Device::Cpu);
//! let out = module.accumulate_step(&p0, &z, &module.label_target(&y), 1.0).unwrap();
//! assert_eq!(out.grad_z.size(), z.size()); // ∂L_1/∂z, for the extractor
//! module.apply(); // Adam, from the gradients accumulated since the last step
//! ```

/// `FromStr` and `Display` for an enum of unit variants, each spelled as given (what
/// `config.toml` and the flags use); a name that is none of them is an error listing them all.
macro_rules! spelled_enum {
    ($ty:ident, $what:literal, $($variant:ident = $name:literal),+) => {
        impl std::str::FromStr for $ty {
            type Err = $crate::CoreError;
            fn from_str(s: &str) -> $crate::Result<Self> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    _ => {
                        let names = [$($name),+];
                        let (last, rest) = names.split_last().expect("at least one variant");
                        Err($crate::CoreError::InvalidConfig(format!(
                            "unknown {} {s:?} (expected {} or {last})",
                            $what,
                            rest.join(", ")
                        )))
                    }
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $name),+
                })
            }
        }
    };
}

pub mod adam;
pub mod belief;
pub mod bp_stage;
pub mod config;
pub mod error;
pub mod extractor;
pub mod graph;
pub mod init;
pub mod loss;
pub mod network;
pub mod precision;
pub mod stage;
pub mod torch_names;
pub mod unit;

pub use adam::Adam;
pub use belief::BeliefModule;
pub use config::{ExtractorKind, LossConfig, Method, ModelConfig};
pub use error::CoreError;
pub use extractor::{Backbone, Block, Extractor, Net};
pub use init::Init;
pub use network::{
    early_exit, Cascade, CascadeHealth, EarlyExit, ExitTracker, NamedTensors, Network, StepStats,
};
pub use precision::Precision;
pub use stage::{Stage, StageCosts, StagePlan, StageSpec};
pub use unit::{ExtractorUnit, LocalOutput, ModuleUnit};

#[cfg(test)]
mod reference;

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
