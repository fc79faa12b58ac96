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
    /// Creates the module's variables under `p`.
    pub fn new(p: &nn::Path, num_classes: i64, feature_dim: i64, hidden: i64) -> Self {
        let fc1 = nn::linear(
            p / "fc1",
            num_classes + feature_dim,
            hidden,
            Default::default(),
        );
        let fc2 = nn::linear(p / "fc2", hidden, num_classes, Default::default());
        Self { fc1, fc2 }
    }

    /// Logits over the N classes for the previous belief `p_prev` [B, N] and features `z` [B, d].
    pub fn forward(&self, p_prev: &Tensor, z: &Tensor) -> Tensor {
        Tensor::cat(&[p_prev, z], 1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

/// The uniform belief `p_0 = 1/N` for a batch of `batch` samples.
pub fn uniform_belief(batch: i64, num_classes: i64, device: tch::Device) -> Tensor {
    Tensor::full(
        [batch, num_classes],
        1.0 / num_classes as f64,
        (Kind::Float, device),
    )
}

/// `softmax` over classes, the belief a module's logits stand for.
pub fn belief(logits: &Tensor) -> Tensor {
    logits.softmax(-1, Kind::Float)
}
