//! Feature extractors `c(x; θ_c) → z ∈ R^d`, written as a list of blocks and a head.
//!
//! A backbone is a sequence of [`Block`]s followed by a [`Neck`] (global pool + linear to `d`,
//! the extractor's own head). Staged SID ([`crate::stage`]) cuts the block list into
//! consecutive slices; every slice but the last gets a neck of its own.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::config::{ExtractorKind, ModelConfig};
use crate::init::Init;

/// Width of the hidden layer of the MLP extractor.
pub const MLP_HIDDEN: i64 = 512;

/// One block of a backbone: the unit a stage boundary may fall after.
#[derive(Debug)]
pub enum Block {
    /// conv3x3 (padding 1) → ReLU, then an optional 2×2 max-pool.
    Conv {
        /// The convolution.
        conv: nn::Conv2D,
        /// Max-pool after the ReLU.
        pool: bool,
    },
    /// Flatten → linear → ReLU.
    Dense {
        /// The layer.
        fc: nn::Linear,
    },
}

impl Module for Block {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Self::Conv { conv, pool } => {
                let y = xs.apply(conv).relu();
                if *pool {
                    y.max_pool2d_default(2)
                } else {
                    y
                }
            }
            Self::Dense { fc } => xs.flatten(1, -1).apply(fc).relu(),
        }
    }
}

/// Global average pool (for image-shaped inputs) → linear to `d`: the head of the extractor
/// and the neck of every stage but the last.
#[derive(Debug)]
pub struct Neck {
    fc: nn::Linear,
}

impl Neck {
    /// A neck from `width` channels (or features) to `d`, its linear layer at `p / "fc"`.
    pub fn new(p: &nn::Path, width: i64, feature_dim: i64, init: Init) -> Self {
        Self {
            fc: crate::init::linear(p / "fc", width, feature_dim, init),
        }
    }
}

impl Module for Neck {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if xs.dim() == 4 {
            xs.mean_dim([2i64, 3].as_slice(), false, None)
                .apply(&self.fc)
        } else {
            xs.apply(&self.fc)
        }
    }
}

/// What a backbone's blocks are, without building them: their count and output widths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Channels (or features) leaving each block, first to last.
    pub widths: Vec<i64>,
}

impl BlockLayout {
    /// The layout of `cfg`'s extractor.
    pub fn of(cfg: &ModelConfig) -> Self {
        let widths = match cfg.extractor {
            ExtractorKind::Cnn => vec![32, 64, 128, 128],
            ExtractorKind::Mlp => vec![MLP_HIDDEN],
        };
        Self { widths }
    }

    /// Values per sample leaving block `i` (what a stage cut after it sends on), for inputs
    /// of `cfg`'s size.
    pub fn output_elems(cfg: &ModelConfig, i: usize) -> i64 {
        let widths = Self::of(cfg).widths;
        match cfg.extractor {
            ExtractorKind::Cnn => {
                // Max-pools after blocks 2 and 4 halve the side.
                let pools = [0, 1, 1, 2][i];
                let side = cfg.image_size >> pools;
                widths[i] * side * side
            }
            ExtractorKind::Mlp => widths[i],
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.widths.len()
    }

    /// Whether there are none (never, for the built-in backbones).
    pub fn is_empty(&self) -> bool {
        self.widths.is_empty()
    }
}

/// Builds block `i` (0-based) of `cfg`'s extractor under `p` (variables `conv{i+1}` for the
/// CNN, `fc1` for the MLP: the names the whole extractor has always had).
pub fn build_block(p: &nn::Path, cfg: &ModelConfig, i: usize) -> Block {
    match cfg.extractor {
        ExtractorKind::Cnn => {
            let (inp, out) = [(cfg.in_channels, 32), (32, 64), (64, 128), (128, 128)][i];
            Block::Conv {
                conv: crate::init::conv3x3(p / format!("conv{}", i + 1), inp, out, cfg.init),
                pool: i == 1 || i == 3,
            }
        }
        ExtractorKind::Mlp => {
            let inputs = cfg.in_channels * cfg.image_size * cfg.image_size;
            Block::Dense {
                fc: crate::init::linear(p / "fc1", inputs, MLP_HIDDEN, cfg.init),
            }
        }
    }
}

/// Builds the extractor's head (its last neck) under `p`: `fc` for the CNN, `fc2` for the MLP.
pub fn build_head(p: &nn::Path, cfg: &ModelConfig) -> Neck {
    let width = *BlockLayout::of(cfg)
        .widths
        .last()
        .expect("a backbone has blocks");
    let name = match cfg.extractor {
        ExtractorKind::Cnn => "fc",
        ExtractorKind::Mlp => "fc2",
    };
    Neck {
        fc: crate::init::linear(p / name, width, cfg.feature_dim, cfg.init),
    }
}

/// A whole feature extractor: every block, then the head.
///
/// Reference SimpleCNN: conv3x3(in→32) ReLU, conv3x3(32→64) ReLU, maxpool2, conv3x3(64→128)
/// ReLU, conv3x3(128→128) ReLU, maxpool2, global average pool, linear(128→d) — four blocks.
/// MLP: flatten → linear(in→512) → ReLU (one block) → linear(512→d).
#[derive(Debug)]
pub struct Extractor {
    blocks: Vec<Block>,
    head: Neck,
}

impl Extractor {
    /// Creates the extractor's variables under `p`, in a fixed order so that a seed fixes them.
    pub fn new(p: &nn::Path, cfg: &ModelConfig) -> Self {
        let blocks = (0..BlockLayout::of(cfg).len())
            .map(|i| build_block(p, cfg, i))
            .collect();
        let head = build_head(p, cfg);
        Self { blocks, head }
    }
}

impl Module for Extractor {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self
            .blocks
            .iter()
            .fold(xs.shallow_clone(), |h, b| b.forward(&h));
        self.head.forward(&h)
    }
}
