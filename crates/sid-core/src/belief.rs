//! The belief module `f_i(p_{i-1}, z)`: the reference two-layer MLP.

use tch::nn;
use tch::{Kind, Tensor};

/// linear(N + d → hidden) → ReLU → linear(hidden → N) on the concatenation `[p_{i-1}, z]`
/// (belief first, as in the reference).
#[derive(Debug)]
pub struct BeliefModule {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl BeliefModule {
    /// Creates the module's variables under `p`, with the shape and initialisation of `cfg`.
    pub fn new(p: &nn::Path, cfg: &crate::ModelConfig) -> Self {
        let (n, d, h) = (cfg.num_classes, cfg.feature_dim, cfg.module_hidden);
        let fc1 = crate::init::linear(p / "fc1", n + d, h, cfg.init);
        let fc2 = crate::init::linear(p / "fc2", h, n, cfg.init);
        Self { fc1, fc2 }
    }

    /// Logits over the N classes for the previous belief `p_prev` [B, N] and features `z` [B, d].
    pub fn forward(&self, p_prev: &Tensor, z: &Tensor) -> Tensor {
        let h = Tensor::cat(&[p_prev, z], 1).apply(&self.fc1).relu();
        h.apply(&self.fc2)
    }
}

/// The uniform belief `p_0 = 1/N` for a batch of `batch` samples.
pub fn uniform_belief(batch: i64, num_classes: i64, device: tch::Device) -> Tensor {
    let p = 1.0 / num_classes as f64;
    Tensor::full([batch, num_classes], p, (Kind::Float, device))
}

/// `softmax` over classes, the belief a module's logits stand for.
pub fn belief(logits: &Tensor) -> Tensor {
    logits.softmax(-1, Kind::Float)
}
