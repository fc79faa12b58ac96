//! Your own backbone trained with staged SID and with its BP twin.
//!
//! `SmallNet` below is a network of our own (three conv blocks, BatchNorm in the first two),
//! not one of the built-in `--model`s. It is cut into K = 2 stages, one CPU thread each, and
//! trained on 512 Fashion-MNIST images for 80 steps, first with staged SID (each stage learns
//! from its own local losses), then as the backprop baseline cut at the same block
//! (1F1B pipeline); both report their loss and their accuracy on 1000 test images.
//!
//! ```text
//! cargo run -p sid-runtime --example own_backbone [FASHION_MNIST_DIR]
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use sid_core::{Backbone, Block, ModelConfig, Net, Network, StagePlan};
use sid_data::{DatasetKind, LoadOptions, Split};
use sid_runtime::{BpSchedule, PipelineMethod, StagedConfig, StagedPipeline};
use tch::{nn, Device, Kind, Tensor};

/// conv3x3 → BatchNorm (optional) → ReLU → 2×2 max-pool (optional).
#[derive(Debug)]
pub struct ConvBlock {
    conv: nn::Conv2D,
    bn: Option<nn::BatchNorm>,
    pool: bool,
    shape: Vec<i64>,
    params: i64,
}

impl Block for ConvBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let y = xs.apply(&self.conv);
        let y = match &self.bn {
            Some(bn) => y.apply_t(bn, train),
            None => y,
        };
        let y = y.relu();
        if self.pool {
            y.max_pool2d_default(2)
        } else {
            y
        }
    }

    fn output_shape(&self) -> Vec<i64> {
        self.shape.clone()
    }

    fn param_count(&self) -> i64 {
        self.params
    }
}

/// Each block's name, width, and whether it has BatchNorm and a max-pool.
const BLOCKS: [(&str, i64, bool); 3] = [("stem", 16, true), ("mid", 32, true), ("top", 64, false)];

/// Three [`ConvBlock`]s on `side`² images of `channels` channels; the default head (global
/// average pool, linear to `d`).
#[derive(Debug)]
pub struct SmallNet {
    /// Input channels.
    pub channels: i64,
    /// Input side.
    pub side: i64,
}

impl Backbone for SmallNet {
    fn name(&self) -> String {
        "small-net".into()
    }

    fn block_names(&self) -> Vec<String> {
        BLOCKS.iter().map(|(name, _, _)| name.to_string()).collect()
    }

    fn build_block(&self, p: &nn::Path, i: usize) -> Box<dyn Block> {
        let cin = if i == 0 {
            self.channels
        } else {
            BLOCKS[i - 1].1
        };
        let (_, cout, norm_pool) = BLOCKS[i];
        let pools = BLOCKS[..=i].iter().filter(|b| b.2).count();
        let side = self.side >> pools;
        let padded = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Box::new(ConvBlock {
            conv: nn::conv2d(p / "conv", cin, cout, 3, padded),
            bn: norm_pool.then(|| nn::batch_norm2d(p / "bn", cout, Default::default())),
            pool: norm_pool,
            shape: vec![cout, side, side],
            params: cin * cout * 9 + cout + if norm_pool { 2 * cout } else { 0 },
        })
    }
}

/// The model around the backbone: 28 px grey images, 10 classes, d = 64, 4 belief modules.
pub fn model() -> ModelConfig {
    ModelConfig {
        in_channels: 1,
        image_size: 28,
        num_classes: 10,
        feature_dim: 64,
        modules: 4,
        module_hidden: 64,
        ..ModelConfig::default()
    }
}

/// `backbone` cut into two stages (blocks and modules as even as possible) on `devices` CPU
/// devices (2: a thread per stage; 1: the stages one after another), training with `method`
/// (Adam, learning rate 0.005) on 2 micro-batches per step.
pub fn config(
    model: &ModelConfig,
    backbone: Arc<dyn Backbone>,
    method: PipelineMethod,
    devices: usize,
) -> sid_core::Result<StagedConfig> {
    let plan = StagePlan::even(Net::new(model, backbone.as_ref()), 2)?;
    let mut cfg = StagedConfig::new(model.clone(), vec![Device::Cpu; devices], plan);
    cfg.backbone = Some(backbone);
    cfg.method = method;
    cfg.lr = 5e-3;
    cfg.micro_batches = 2;
    cfg.threads_per_stage = Some(1);
    Ok(cfg)
}

/// Trains one step per batch, steps in flight, and returns each step's loss.
pub fn train(
    pipeline: &mut StagedPipeline,
    batches: &[(Tensor, Tensor)],
) -> sid_core::Result<Vec<f64>> {
    let mut stats = Vec::new();
    for (x, y) in batches {
        stats.extend(pipeline.submit_step(x, y)?);
    }
    stats.extend(pipeline.flush()?);
    Ok(stats.into_iter().map(|s| s.loss).collect())
}

/// The share of `split` the last module classifies right.
fn accuracy(pipeline: &mut StagedPipeline, split: &Split) -> sid_core::Result<f64> {
    let right = pipeline
        .cascade(&split.images)?
        .prediction()
        .eq_tensor(&split.labels)
        .sum(Kind::Float)
        .double_value(&[]);
    Ok(right / split.len() as f64)
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| DatasetKind::FashionMnist.default_dir());
    let options = LoadOptions {
        limit_train: Some(512),
        ..Default::default()
    };
    let data = sid_data::load(DatasetKind::FashionMnist, &dir, &options)?;
    let test = Split {
        images: data.test.images.narrow(0, 0, 1000),
        labels: data.test.labels.narrow(0, 0, 1000),
    };
    // Five epochs of 32-image batches, each epoch in its own order.
    let batches: Vec<(Tensor, Tensor)> = (0..5)
        .flat_map(|epoch| {
            let order = sid_data::epoch_permutation(data.train.len(), 0, epoch);
            let n = sid_data::num_batches(data.train.len(), 32);
            (0..n)
                .map(|i| sid_data::batch(&data.train, Some(&order), 32, i))
                .collect::<Vec<_>>()
        })
        .collect();
    let model = model();
    let backbone: Arc<dyn Backbone> = Arc::new(SmallNet {
        channels: 1,
        side: 28,
    });
    for (name, method) in [
        ("staged SID", PipelineMethod::Sid),
        ("BP, 1F1B", PipelineMethod::Bp(BpSchedule::OneFOneB)),
    ] {
        tch::manual_seed(0);
        let mut pipeline = StagedPipeline::new(config(&model, backbone.clone(), method, 2)?)?;
        let losses = train(&mut pipeline, &batches)?;
        let accuracy = accuracy(&mut pipeline, &test)?;
        println!(
            "{name:>10}: loss {:.3} -> {:.3} over {} steps, test accuracy {:.1}%",
            losses[0],
            losses[losses.len() - 1],
            losses.len(),
            100.0 * accuracy
        );
    }
    Ok(())
}
