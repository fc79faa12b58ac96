//! Feature extractors `c(x; θ_c) → z ∈ R^d`.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::config::{ExtractorKind, ModelConfig};

/// Width of the hidden layer of the MLP extractor.
pub const MLP_HIDDEN: i64 = 512;

/// A feature extractor; its variables live under the path it was built on.
#[derive(Debug)]
pub enum Extractor {
    /// Reference SimpleCNN: conv3x3(in→32) ReLU, conv3x3(32→64) ReLU, maxpool2,
    /// conv3x3(64→128) ReLU, conv3x3(128→128) ReLU, maxpool2, global average pool, linear(128→d).
    Cnn {
        /// Convolutions in order (boxed: the variants differ a lot in size).
        convs: Box<[nn::Conv2D; 4]>,
        /// Final projection to d.
        fc: nn::Linear,
    },
    /// Flatten → linear(in→512) → ReLU → linear(512→d).
    Mlp {
        /// First layer.
        fc1: nn::Linear,
        /// Projection to d.
        fc2: nn::Linear,
    },
}

impl Extractor {
    /// Creates the extractor's variables under `p`, in a fixed order so that a seed fixes them.
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        match cfg.extractor {
            ExtractorKind::Cnn => {
                let conv = |name: &str, i: i64, o: i64| {
                    let c = nn::ConvConfig {
                        padding: 1,
                        ..Default::default()
                    };
                    nn::conv2d(p / name, i, o, 3, c)
                };
                let convs = Box::new([
                    conv("conv1", cfg.in_channels, 32),
                    conv("conv2", 32, 64),
                    conv("conv3", 64, 128),
                    conv("conv4", 128, 128),
                ]);
                let fc = nn::linear(p / "fc", 128, cfg.feature_dim, Default::default());
                Self::Cnn { convs, fc }
            }
            ExtractorKind::Mlp => {
                let inputs = cfg.in_channels * cfg.image_size * cfg.image_size;
                let fc1 = nn::linear(p / "fc1", inputs, MLP_HIDDEN, Default::default());
                let fc2 = nn::linear(p / "fc2", MLP_HIDDEN, cfg.feature_dim, Default::default());
                Self::Mlp { fc1, fc2 }
            }
        }
    }
}

impl Module for Extractor {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Self::Cnn { convs, fc } => xs
                .apply(&convs[0])
                .relu()
                .apply(&convs[1])
                .relu()
                .max_pool2d_default(2)
                .apply(&convs[2])
                .relu()
                .apply(&convs[3])
                .relu()
                .max_pool2d_default(2)
                .mean_dim([2i64, 3].as_slice(), false, None)
                .apply(fc),
            Self::Mlp { fc1, fc2 } => xs.flatten(1, -1).apply(fc1).relu().apply(fc2),
        }
    }
}
