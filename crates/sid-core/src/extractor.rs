//! Feature extractors `c(x; θ_c) → z ∈ R^d`, written as a list of blocks and a head.
//!
//! A backbone ([`Backbone`]) is a sequence of [`Block`]s followed by a head (by default a
//! [`Neck`]: global pool + linear to `d`). Staged SID ([`crate::stage`]) cuts the block list
//! into consecutive slices; every slice but the last gets a neck of its own. The built-in
//! backbones ([`ExtractorKind`]) are the [`Backbone`] of a [`ModelConfig`]; a program can hand
//! in its own through [`Net`].

use std::ops::Range;

use tch::nn::{self, Module, ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::config::{ExtractorKind, ModelConfig};
use crate::error::invalid;
use crate::init::{ConvShape, Init};
use crate::{Result, StagePlan, StageSpec};

/// One block of a backbone: the unit a stage boundary may fall after. Implement it for your
/// own layers (see [`Backbone`]).
pub trait Block: std::fmt::Debug + Send {
    /// The block on `xs`. `train` is BatchNorm's (or dropout's) mode: `true` in training
    /// steps, `false` for inference; blocks without such layers ignore it.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor;

    /// The per-sample shape of its output (`[c, h, w]` for images, `[n, width]` for token
    /// sequences, `[features]` for flat features): what a stage's neck reads.
    fn output_shape(&self) -> Vec<i64>;

    /// Its trainable parameters (buffers such as running statistics not counted).
    fn param_count(&self) -> i64;
}

/// A whole backbone: its blocks, built one by one under paths the library gives, and the head
/// that maps the last block's output to the features `z ∈ R^d`.
///
/// Block `i` is built under `extractor.<block_names()[i]>`, in a variable store that the
/// library chooses (a stage's, or the whole network's): its variables' names say which block
/// they belong to, which the BP pipeline's split backward and checkpoints rely on. Blocks are
/// built first to last, then the head, so one seed fixes the weights whatever the cut.
///
/// ```
/// use sid_core::extractor::{Backbone, Block};
/// use sid_core::stage::build_stages;
/// use sid_core::{LossConfig, ModelConfig, Net, StagePlan};
/// use tch::{nn, Device, Kind, Tensor};
///
/// /// conv3x3 → ReLU → 2×2 max-pool.
/// #[derive(Debug)]
/// struct ConvPool { conv: nn::Conv2D, shape: Vec<i64> }
///
/// impl Block for ConvPool {
///     fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
///         xs.apply(&self.conv).relu().max_pool2d_default(2)
///     }
///     fn output_shape(&self) -> Vec<i64> { self.shape.clone() }
///     fn param_count(&self) -> i64 { self.conv.ws.numel() as i64 + self.shape[0] }
/// }
///
/// /// Two ConvPool blocks on 1×8×8 images.
/// #[derive(Debug)]
/// struct Tiny;
///
/// impl Backbone for Tiny {
///     fn block_names(&self) -> Vec<String> { vec!["a".into(), "b".into()] }
///     fn build_block(&self, p: &nn::Path, i: usize) -> Box<dyn Block> {
///         let (cin, cout, side) = [(1, 4, 4), (4, 8, 2)][i];
///         let conv = nn::conv2d(p / "conv", cin, cout, 3, nn::ConvConfig { padding: 1, ..Default::default() });
///         Box::new(ConvPool { conv, shape: vec![cout, side, side] })
///     }
/// }
///
/// let model = ModelConfig { image_size: 8, modules: 2, feature_dim: 16, ..ModelConfig::default() };
/// let net = Net::new(&model, &Tiny);
/// let plan = StagePlan::even(net, 2).unwrap(); // a block and a module per stage
/// let stages = build_stages(net, LossConfig::default(), 1e-3, &plan).unwrap();
/// assert_eq!(stages.len(), 2);
/// ```
pub trait Backbone: std::fmt::Debug + Send + Sync {
    /// What messages call it.
    fn name(&self) -> String {
        "custom".into()
    }

    /// Each block's name, first to last (distinct, no dots): block `i`'s variables live under
    /// `extractor.<name>.`.
    fn block_names(&self) -> Vec<String>;

    /// Builds block `i` (0-based) with its variables under `p` (`extractor.<name>`).
    fn build_block(&self, p: &nn::Path, i: usize) -> Box<dyn Block>;

    /// Builds the head under `p` (`extractor`): the last block's output, of per-sample shape
    /// `last`, to `model.feature_dim` features. By default a [`Neck`] (`extractor.fc`).
    fn build_head(&self, p: &nn::Path, last: &[i64], model: &ModelConfig) -> Box<dyn Module> {
        Box::new(Neck::new(p, "fc", last, model.feature_dim, model.init))
    }
}

/// Blocks of a backbone (all, or a stage's), first to last.
pub(crate) type Blocks = Vec<Box<dyn Block>>;

/// Each stage's variable store with its blocks, first to last.
pub(crate) type StageBlocks = Vec<(VarStore, Blocks)>;

/// A network's sizes ([`ModelConfig`]: classes, `d`, modules, precision) with the backbone it
/// runs: the built-in one `model.extractor` names (`Net::from(&model)`), or your own.
#[derive(Debug, Clone, Copy)]
pub struct Net<'a> {
    /// Sizes of the features and modules.
    pub model: &'a ModelConfig,
    /// The blocks and the head.
    pub backbone: &'a dyn Backbone,
}

impl<'a> From<&'a ModelConfig> for Net<'a> {
    fn from(model: &'a ModelConfig) -> Self {
        Self::new(model, model)
    }
}

impl<'a> Net<'a> {
    /// `model`'s sizes with `backbone`.
    pub fn new(model: &'a ModelConfig, backbone: &'a dyn Backbone) -> Self {
        Self { model, backbone }
    }

    /// Number of backbone blocks.
    pub fn blocks(&self) -> usize {
        self.backbone.block_names().len()
    }

    /// Each block's variable-name prefix, first to last: `extractor.<name>.`, where the
    /// library builds it (see [`Backbone`]).
    pub fn block_prefixes(&self) -> Vec<String> {
        let names = self.backbone.block_names();
        names.iter().map(|n| format!("extractor.{n}.")).collect()
    }

    /// Builds blocks `range` (all: `0..self.blocks()`), first to last, block `i` under
    /// `p / <its name>`.
    pub(crate) fn build_blocks(&self, p: &nn::Path, range: Range<usize>) -> Result<Blocks> {
        let (names, backbone) = (self.backbone.block_names(), self.backbone.name());
        if names.is_empty() {
            return Err(invalid(format!("the {backbone} backbone has no blocks")));
        }
        let block = |i: usize| self.backbone.build_block(&(p / names[i].as_str()), i);
        Ok(range.map(block).collect())
    }

    /// Builds each stage's blocks of `plan` on the CPU into a variable store of its own (under
    /// `extractor`), stage by stage, so block by block; then the head into the last store: each
    /// stage's store and blocks, and the head. Fails if the model's sizes or precision cannot
    /// run.
    pub(crate) fn build_cut(&self, plan: &StagePlan) -> Result<(StageBlocks, Box<dyn Module>)> {
        self.model.validate()?;
        self.model.precision.check(Device::Cpu)?;
        // The plan may have been checked against another network: checked again against this.
        let plan = StagePlan::new(plan.stages().to_vec(), *self)?;
        let stage = |s: &StageSpec| {
            let vs = VarStore::new(Device::Cpu);
            let blocks = self.build_blocks(&(vs.root() / "extractor"), s.blocks.clone())?;
            Ok((vs, blocks))
        };
        let built: StageBlocks = plan.stages().iter().map(stage).collect::<Result<_>>()?;
        let (vs, blocks) = built.last().expect("a checked plan has stages");
        let head = self.build_head(&(vs.root() / "extractor"), blocks);
        Ok((built, head))
    }

    /// Builds the head under `p`, after `blocks` (all of them, or a stage's last ones).
    pub(crate) fn build_head(&self, p: &nn::Path, blocks: &[Box<dyn Block>]) -> Box<dyn Module> {
        let last = blocks.last().expect("built backbones have blocks");
        let shape = last.output_shape();
        self.backbone.build_head(p, &shape, self.model)
    }
}

/// Width of the hidden layer of the MLP extractor.
pub const MLP_HIDDEN: i64 = 512;

/// The reference SimpleCNN's and VGG-11's (configuration "A") output channels of each conv,
/// and the convs (0-based) that a 2×2 max-pool follows.
const CNN: (&[i64], &[usize]) = (&[32, 64, 128, 128], &[1, 3]);
const VGG11: (&[i64], &[usize]) = (&[64, 128, 256, 256, 512, 512, 512, 512], &[0, 1, 3, 5, 7]);

/// ResNet-18's stages: width and number of BasicBlocks.
const RESNET18: [(i64, usize); 4] = [(64, 2), (128, 2), (256, 2), (512, 2)];

/// ViT-Tiny's width, depth, heads and MLP ratio.
pub const VIT_WIDTH: i64 = 192;
const VIT_DEPTH: usize = 12;
const VIT_HEADS: i64 = 3;
pub(crate) const VIT_MLP_RATIO: i64 = 4;

/// Inputs up to this side get ResNet's CIFAR stem (3×3, stride 1, no max-pool); larger ones
/// the ImageNet stem (7×7 stride 2, then a 3×3 stride-2 max-pool).
pub const RESNET_SMALL_INPUT: i64 = 64;

/// The ViT patch side for `image_size`: the divisor of the side nearest to side/8 (an 8×8
/// grid, as patch 4 gives at 32 px), at most 16 (ViT's own patch at 224 px); ties go to the
/// larger patch. 4 for 28 and 32 px, 8 for 64 px, 16 for 224 px.
pub fn vit_patch(image_size: i64) -> i64 {
    let target = (image_size as f64 / 8.0).min(16.0);
    (1..=image_size)
        .filter(|p| image_size % p == 0)
        .min_by(|a, b| {
            let (da, db) = ((*a as f64 - target).abs(), (*b as f64 - target).abs());
            da.total_cmp(&db).then(b.cmp(a))
        })
        .unwrap_or(1)
}

/// A max-pool after a convolution: 2×2 stride 2 (VGG, SimpleCNN), or ResNet's 3×3 stride 2
/// with padding 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaxPool(ConvShape);

impl MaxPool {
    const TWO: Self = Self(ConvShape::new(2, 2, 0));
    const RESNET: Self = Self(ConvShape::new(3, 2, 1));

    fn apply(&self, xs: &Tensor) -> Tensor {
        let (k, s, p) = (self.0.kernel, self.0.stride, self.0.padding);
        xs.max_pool2d([k, k], [s, s], [p, p], [1, 1], false)
    }
}

/// A ResNet BasicBlock: conv3x3(stride)-BN-ReLU, conv3x3-BN, plus the shortcut (1×1 conv-BN
/// where the shape changes), then ReLU.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    down: Option<(nn::Conv2D, nn::BatchNorm)>,
}

/// ViT's patch embedding: a patch×patch convolution of stride patch, the class token in
/// front, learned position embeddings added.
#[derive(Debug)]
struct PatchEmbed {
    proj: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
}

/// A pre-norm transformer encoder block: x + MHSA(LN(x)) ([`VIT_HEADS`] heads), then
/// x + MLP(LN(x)) (GELU).
#[derive(Debug)]
struct EncoderBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl EncoderBlock {
    /// Multi-head self-attention of `xs` [b, n, c], written out: softmax(q kᵀ/√d_h) v per head.
    fn attention(&self, xs: &Tensor) -> Tensor {
        let (b, n, c) = xs.size3().expect("tokens are [batch, n, width]");
        let dh = c / VIT_HEADS;
        // [b, n, 3c] → [3, b, heads, n, d_h]
        let qkv = xs
            .apply(&self.qkv)
            .reshape([b, n, 3, VIT_HEADS, dh])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn =
            (q.matmul(&k.transpose(-2, -1)) * (dh as f64).powf(-0.5)).softmax(-1, Kind::Float);
        let heads = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        heads.apply(&self.proj)
    }
}

/// BatchNorm of `xs` [b, c, h, w]: on the batch's statistics (updating the running ones) when
/// `train`, else on the running ones. A training batch with one value per channel (one
/// sample of a 1×1 map: a last partial batch or micro-batch) has no variance to normalise by
/// (PyTorch refuses it); it is normalised with the running statistics and leaves them alone.
fn batch_norm(bn: &nn::BatchNorm, xs: &Tensor, train: bool) -> Tensor {
    let size = xs.size();
    let per_channel: i64 = size[0] * size[2..].iter().product::<i64>();
    xs.apply_t(bn, train && per_channel > 1)
}

/// A layer of the built-in backbones.
#[derive(Debug)]
enum Layer {
    /// conv → BatchNorm (when there is one) → ReLU, then an optional max-pool: a SimpleCNN
    /// layer (no BatchNorm), a VGG-11-BN layer or ResNet's stem.
    Conv {
        /// The convolution.
        conv: nn::Conv2D,
        /// Its BatchNorm.
        bn: Option<Box<nn::BatchNorm>>,
        /// Max-pool after the ReLU.
        pool: Option<MaxPool>,
    },
    /// Flatten → linear → ReLU.
    Dense(nn::Linear),
    /// A ResNet BasicBlock.
    Basic(Box<BasicBlock>),
    /// ViT's patch embedding (image → tokens [b, n+1, width]).
    Patch(Box<PatchEmbed>),
    /// A transformer encoder block (tokens → tokens).
    Encoder(Box<EncoderBlock>),
}

/// A block of a built-in backbone: its layer, output shape and parameter count.
#[derive(Debug)]
struct Builtin {
    layer: Layer,
    shape: Vec<i64>,
    params: i64,
}

impl Block for Builtin {
    /// `train` picks BatchNorm's batch statistics (and updates its running ones) over its
    /// running statistics; the layers without BatchNorm ignore it.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match &self.layer {
            Layer::Conv { conv, bn, pool } => {
                let y = xs.apply(conv);
                let y = bn.iter().fold(y, |y, bn| batch_norm(bn, &y, train)).relu();
                pool.iter().fold(y, |y, pool| pool.apply(&y))
            }
            Layer::Dense(fc) => xs.flatten(1, -1).apply(fc).relu(),
            Layer::Basic(b) => {
                let y = batch_norm(&b.bn1, &xs.apply(&b.conv1), train).relu();
                let y = batch_norm(&b.bn2, &y.apply(&b.conv2), train);
                let shortcut = match &b.down {
                    Some((conv, bn)) => batch_norm(bn, &xs.apply(conv), train),
                    None => xs.shallow_clone(),
                };
                (y + shortcut).relu()
            }
            Layer::Patch(e) => {
                // [b, width, h/p, w/p] → [b, n, width], the class token first.
                let t = xs.apply(&e.proj).flatten(2, -1).transpose(1, 2);
                let b = t.size()[0];
                let cls = e.cls_token.expand([b, 1, -1], false);
                Tensor::cat(&[cls, t], 1) + &e.pos_embed
            }
            Layer::Encoder(e) => {
                let h = xs + e.attention(&xs.apply(&e.norm1));
                let m = h.apply(&e.norm2).apply(&e.fc1).gelu("none").apply(&e.fc2);
                h + m
            }
        }
    }

    fn output_shape(&self) -> Vec<i64> {
        self.shape.clone()
    }

    fn param_count(&self) -> i64 {
        self.params
    }
}

/// Pool → linear to `d`: the head of the extractor and the neck of every stage but the last.
/// Images [b, c, h, w] are averaged over space; token sequences [b, n, c] give their class
/// token, layer-normalised (ViT's final LayerNorm); flat features go straight in.
#[derive(Debug)]
pub struct Neck {
    norm: Option<nn::LayerNorm>,
    fc: nn::Linear,
}

impl Neck {
    /// A neck for block outputs of per-sample shape `shape` (see [`BlockLayout::shapes`]) to
    /// `d`: its linear layer at `p / fc` (`"fc"`; the MLP's head: `"fc2"`) and, for token
    /// sequences, its LayerNorm at `p / "norm"`.
    pub fn new(p: &nn::Path, fc: &str, shape: &[i64], feature_dim: i64, init: Init) -> Self {
        let (tokens, width) = neck_input(shape);
        Self {
            norm: tokens.then(|| crate::init::vit_layer_norm(p / "norm", width)),
            fc: crate::init::linear(p / fc, width, feature_dim, init),
        }
    }
}

/// Whether block outputs of per-sample shape `shape` are token sequences, and the width a
/// neck reads from them.
fn neck_input(shape: &[i64]) -> (bool, i64) {
    let tokens = shape.len() == 2;
    (tokens, if tokens { shape[1] } else { shape[0] })
}

impl Module for Neck {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let pooled = match xs.dim() {
            4 => xs.mean_dim([2i64, 3].as_slice(), false, None),
            3 => xs.select(1, 0),
            _ => xs.shallow_clone(),
        };
        let x = self.norm.iter().fold(pooled, |x, norm| x.apply(norm));
        x.apply(&self.fc)
    }
}

/// What one block is, before it is built: the layer sizes its parameters follow from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spec {
    /// A convolution: with BatchNorm (VGG-11-BN, ResNet's stem), the two named `conv` and `bn`;
    /// without (SimpleCNN), the convolution is the block itself.
    Conv {
        cin: i64,
        cout: i64,
        conv: ConvShape,
        bias: bool,
        bn: bool,
        pool: Option<MaxPool>,
    },
    /// The MLP's hidden layer, `inputs` → [`MLP_HIDDEN`].
    Dense {
        inputs: i64,
    },
    Basic {
        cin: i64,
        cout: i64,
        stride: i64,
    },
    Patch {
        cin: i64,
        patch: i64,
        tokens: i64,
    },
    Encoder,
}

impl Spec {
    /// Every variable of the block, named under it (`conv.weight`), with its shape: in the
    /// order of the reference layouts' `state_dict`s ([`crate::torch_names`]).
    pub(crate) fn variables(&self) -> Vec<(String, Vec<i64>)> {
        // A weight of `shape` under `layer`, and a bias of its first dimension when `bias`.
        let weights = |layer: &str, shape: &[i64], bias: bool| {
            let bias = bias.then(|| (format!("{layer}bias"), shape[..1].to_vec()));
            let weight = (format!("{layer}weight"), shape.to_vec());
            std::iter::once(weight).chain(bias).collect::<Vec<_>>()
        };
        // A convolution's weights, then its BatchNorm's (running statistics last).
        let conv_bn = |conv: &str, bn: &str, shape: [i64; 4], bias: bool| {
            let stats = ["weight", "bias", "running_mean", "running_var"];
            let stats = stats.map(|v| (format!("{bn}{v}"), vec![shape[0]]));
            [weights(conv, &shape, bias), stats.to_vec()].concat()
        };
        let (w, h) = (VIT_WIDTH, VIT_WIDTH * VIT_MLP_RATIO);
        match *self {
            Self::Dense { inputs } => weights("", &[MLP_HIDDEN, inputs], true),
            Self::Conv {
                cin,
                cout,
                conv: c,
                bias,
                bn,
                ..
            } => match bn {
                true => conv_bn("conv.", "bn.", [cout, cin, c.kernel, c.kernel], bias),
                false => weights("", &[cout, cin, c.kernel, c.kernel], bias),
            },
            Self::Basic { cin, cout, stride } => {
                let mut v = conv_bn("conv1.", "bn1.", [cout, cin, 3, 3], false);
                v.extend(conv_bn("conv2.", "bn2.", [cout, cout, 3, 3], false));
                if has_shortcut(cin, cout, stride) {
                    v.extend(conv_bn("down_conv.", "down_bn.", [cout, cin, 1, 1], false));
                }
                v
            }
            Self::Patch { cin, patch, tokens } => {
                let mut v = weights("proj.", &[w, cin, patch, patch], true);
                v.push(("cls_token".into(), vec![1, 1, w]));
                v.push(("pos_embed".into(), vec![1, tokens + 1, w]));
                v
            }
            Self::Encoder => [
                ("norm1.", vec![w]),
                ("qkv.", vec![3 * w, w]),
                ("proj.", vec![w, w]),
                ("norm2.", vec![w]),
                ("fc1.", vec![h, w]),
                ("fc2.", vec![w, h]),
            ]
            .iter()
            .flat_map(|(layer, shape)| weights(layer, shape, true))
            .collect(),
        }
    }

    /// Trainable parameters (BatchNorm's running statistics are buffers, not counted).
    fn params(&self) -> i64 {
        let vars = self.variables().into_iter();
        let trained = vars.filter(|(name, _)| !name.contains("running_"));
        trained.map(|(_, s)| s.iter().product::<i64>()).sum()
    }
}

/// Whether a ResNet BasicBlock's shortcut is a 1×1 conv-BN (where the shape changes).
fn has_shortcut(cin: i64, cout: i64, stride: i64) -> bool {
    stride != 1 || cin != cout
}

/// Every block of `cfg`'s backbone with its variable path and per-sample output shape.
pub(crate) fn specs(cfg: &ModelConfig) -> Vec<(String, Spec, Vec<i64>)> {
    let mut out = Vec::new();
    let mut add = |name: String, spec, shape: &[i64]| out.push((name, spec, shape.to_vec()));
    let (cin, side) = (cfg.in_channels, cfg.image_size);
    match cfg.extractor {
        ExtractorKind::Mlp => {
            let inputs = cin * side * side;
            add("fc1".into(), Spec::Dense { inputs }, &[MLP_HIDDEN]);
        }
        ExtractorKind::Cnn | ExtractorKind::Vgg11 => {
            let bn = cfg.extractor == ExtractorKind::Vgg11;
            let ((widths, pooled), name) = if bn { (VGG11, "block") } else { (CNN, "conv") };
            let (mut cin, mut side) = (cin, side);
            for (i, &cout) in widths.iter().enumerate() {
                // A pool that would leave less than 1×1 is skipped (VGG at 28 px has 4 pools).
                let pool = (pooled.contains(&i) && side >= 2).then_some(MaxPool::TWO);
                side = pool.map_or(side, |p| p.0.out_side(side));
                let spec = Spec::Conv {
                    cin,
                    cout,
                    conv: ConvShape::new(3, 1, 1),
                    bias: true,
                    bn,
                    pool,
                };
                add(format!("{name}{}", i + 1), spec, &[cout, side, side]);
                cin = cout;
            }
        }
        ExtractorKind::Resnet18 => {
            let (conv, pool) = if side <= RESNET_SMALL_INPUT {
                (ConvShape::new(3, 1, 1), None)
            } else {
                (ConvShape::new(7, 2, 3), Some(MaxPool::RESNET))
            };
            let side = conv.out_side(side);
            let mut side = pool.map_or(side, |p| p.0.out_side(side));
            let (cout, bias, bn) = (64, false, true);
            let stem = Spec::Conv {
                cin,
                cout,
                conv,
                bias,
                bn,
                pool,
            };
            add("stem".into(), stem, &[64, side, side]);
            let mut cin = 64;
            for (l, (cout, n)) in RESNET18.into_iter().enumerate() {
                for b in 0..n {
                    let stride = if l > 0 && b == 0 { 2 } else { 1 };
                    side = ConvShape::new(3, stride, 1).out_side(side);
                    let name = format!("layer{}_{}", l + 1, b + 1);
                    let spec = Spec::Basic { cin, cout, stride };
                    add(name, spec, &[cout, side, side]);
                    cin = cout;
                }
            }
        }
        ExtractorKind::VitTiny => {
            let patch = vit_patch(side);
            let tokens = (side / patch) * (side / patch);
            let shape = [tokens + 1, VIT_WIDTH];
            let spec = Spec::Patch { cin, patch, tokens };
            add("patch_embed".into(), spec, &shape);
            for j in 0..VIT_DEPTH {
                add(format!("block{}", j + 1), Spec::Encoder, &shape);
            }
        }
    }
    out
}

/// What a backbone's blocks are, without building them: their count and output shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Per-sample shape leaving each block: `[c, h, w]` for images, `[n, width]` for token
    /// sequences (class token first), `[features]` for flat features.
    pub shapes: Vec<Vec<i64>>,
}

impl BlockLayout {
    /// The layout of `cfg`'s extractor.
    pub fn of(cfg: &ModelConfig) -> Self {
        let shapes = specs(cfg).into_iter().map(|(_, _, s)| s).collect();
        Self { shapes }
    }

    /// Values per sample leaving block `i` (what a stage cut after it sends on), for inputs
    /// of `cfg`'s size.
    pub fn output_elems(cfg: &ModelConfig, i: usize) -> i64 {
        Self::of(cfg).shapes[i].iter().product()
    }
}

/// Trainable parameters of a network, by part (BatchNorm's running statistics, which are
/// saved but not trained, are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// The extractor: every block and its head.
    pub extractor: i64,
    /// All L belief modules together.
    pub modules: i64,
}

impl ParamCounts {
    /// The counts of `cfg`'s network (without the extra necks of a staged run).
    pub fn of(cfg: &ModelConfig) -> Self {
        let specs = specs(cfg);
        let (tokens, width) = neck_input(&specs.last().expect("a backbone has blocks").2);
        let (n, d, h) = (cfg.num_classes, cfg.feature_dim, cfg.module_hidden);
        let head = if tokens { 2 * width } else { 0 } + width * d + d;
        let module = (n + d) * h + h + h * n + n;
        Self {
            extractor: specs.iter().map(|(_, s, _)| s.params()).sum::<i64>() + head,
            modules: module * cfg.modules as i64,
        }
    }

    /// Extractor and modules together.
    pub fn total(&self) -> i64 {
        self.extractor + self.modules
    }
}

/// The built-in backbone `extractor` names, for inputs of `in_channels` × `image_size`², its
/// layers initialised by `init`. Variables: `conv{i+1}` for the CNN and `fc1` for the MLP (the
/// names the whole extractor has always had); `block{i+1}.conv` and `.bn` for VGG-11; `stem`
/// and `layer{l}_{b}` for ResNet-18; `patch_embed` and `block{j}` for ViT-Tiny. Heads: `fc` for
/// the CNN, VGG-11 and ResNet-18, `fc2` for the MLP, `head.norm` and `head.fc` for ViT-Tiny.
impl Backbone for ModelConfig {
    fn name(&self) -> String {
        self.extractor.to_string()
    }

    fn block_names(&self) -> Vec<String> {
        specs(self).into_iter().map(|(name, _, _)| name).collect()
    }

    fn build_block(&self, p: &nn::Path, i: usize) -> Box<dyn Block> {
        let (_, spec, shape) = specs(self).swap_remove(i);
        Box::new(Builtin {
            layer: build_layer(p, spec, self.init),
            shape,
            params: spec.params(),
        })
    }

    fn build_head(&self, p: &nn::Path, last: &[i64], model: &ModelConfig) -> Box<dyn Module> {
        let (p, fc) = match self.extractor {
            ExtractorKind::Mlp => (p.clone(), "fc2"),
            ExtractorKind::VitTiny => (p / "head", "fc"),
            ExtractorKind::Cnn | ExtractorKind::Vgg11 | ExtractorKind::Resnet18 => {
                (p.clone(), "fc")
            }
        };
        Box::new(Neck::new(&p, fc, last, model.feature_dim, model.init))
    }
}

/// Builds the layer `spec` describes under `p`.
fn build_layer(p: &nn::Path, spec: Spec, init: Init) -> Layer {
    let conv = |name: &str, cin, cout, shape, bias| {
        crate::init::conv(p / name, cin, cout, shape, bias, init)
    };
    let bn = |name: &str, c| crate::init::batch_norm2d(p / name, c);
    match spec {
        Spec::Dense { inputs } => {
            Layer::Dense(crate::init::linear(p.clone(), inputs, MLP_HIDDEN, init))
        }
        Spec::Conv {
            cin,
            cout,
            conv: shape,
            bias,
            bn: with_bn,
            pool,
        } => Layer::Conv {
            conv: match with_bn {
                true => conv("conv", cin, cout, shape, bias),
                false => crate::init::conv(p.clone(), cin, cout, shape, bias, init),
            },
            bn: with_bn.then(|| Box::new(bn("bn", cout))),
            pool,
        },
        Spec::Basic { cin, cout, stride } => {
            let c3 = |s| ConvShape::new(3, s, 1);
            Layer::Basic(Box::new(BasicBlock {
                conv1: conv("conv1", cin, cout, c3(stride), false),
                bn1: bn("bn1", cout),
                conv2: conv("conv2", cout, cout, c3(1), false),
                bn2: bn("bn2", cout),
                down: has_shortcut(cin, cout, stride).then(|| {
                    let shape = ConvShape::new(1, stride, 0);
                    (
                        conv("down_conv", cin, cout, shape, false),
                        bn("down_bn", cout),
                    )
                }),
            }))
        }
        Spec::Patch { cin, patch, tokens } => {
            let shape = ConvShape::new(patch, patch, 0);
            Layer::Patch(Box::new(PatchEmbed {
                proj: conv("proj", cin, VIT_WIDTH, shape, true),
                // torchvision's VisionTransformer: class token zeros, positions N(0, 0.02²).
                cls_token: p.zeros("cls_token", &[1, 1, VIT_WIDTH]),
                pos_embed: p.randn("pos_embed", &[1, tokens + 1, VIT_WIDTH], 0.0, 0.02),
            }))
        }
        Spec::Encoder => {
            let (w, hidden) = (VIT_WIDTH, VIT_WIDTH * VIT_MLP_RATIO);
            let linear = |name: &str, i, o| crate::init::linear(p / name, i, o, init);
            let norm = |name: &str| crate::init::vit_layer_norm(p / name, w);
            Layer::Encoder(Box::new(EncoderBlock {
                norm1: norm("norm1"),
                qkv: linear("qkv", w, 3 * w),
                proj: linear("proj", w, w),
                norm2: norm("norm2"),
                fc1: linear("fc1", w, hidden),
                fc2: linear("fc2", hidden, w),
            }))
        }
    }
}
/// A whole feature extractor: every block, then the head.
///
/// Reference SimpleCNN: conv3x3(in→32) ReLU, conv3x3(32→64) ReLU, maxpool2, conv3x3(64→128)
/// ReLU, conv3x3(128→128) ReLU, maxpool2, global average pool, linear(128→d) — four blocks.
/// MLP: flatten → linear(in→512) → ReLU (one block) → linear(512→d).
/// VGG-11-BN: eight conv3x3-BN-ReLU blocks (64, 128, 256, 256, 512, 512, 512, 512 channels,
/// max-pools after the 1st, 2nd, 4th, 6th and 8th unless the map is already 1×1), global
/// average pool, linear(512→d). ResNet-18: a stem and eight BasicBlocks (64..512 channels),
/// global average pool, linear(512→d). ViT-Tiny: patch embedding and twelve encoder blocks
/// (width 192, 3 heads), LayerNorm of the class token, linear(192→d).
#[derive(Debug)]
pub struct Extractor {
    pub(crate) blocks: Vec<Box<dyn Block>>,
    pub(crate) head: Box<dyn Module>,
}

impl Extractor {
    /// Creates the extractor's variables under `p`, in a fixed order so that a seed fixes them:
    /// the built-in backbone of a [`ModelConfig`], or any [`Net`].
    pub fn new<'a>(p: &nn::Path, net: impl Into<Net<'a>>) -> Result<Self> {
        let net = net.into();
        let blocks = net.build_blocks(p, 0..net.blocks())?;
        let head = net.build_head(p, &blocks);
        Ok(Self { blocks, head })
    }

    /// The last block's output, before the head: what a reference implementation's feature
    /// extractor gives (torchvision's `features` / `layer4`, timm's blocks), for comparing
    /// the two.
    pub fn features_t(&self, xs: &Tensor, train: bool) -> Tensor {
        forward_blocks(&self.blocks, xs, train)
    }
}

impl ModuleT for Extractor {
    /// `train`: BatchNorm on batch statistics (updating its running ones), else on its
    /// running statistics.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.head.forward(&self.features_t(xs, train))
    }
}

/// `xs` through `blocks`, first to last.
pub fn forward_blocks(blocks: &[Box<dyn Block>], xs: &Tensor, train: bool) -> Tensor {
    blocks
        .iter()
        .fold(xs.shallow_clone(), |h, b| b.forward_t(&h, train))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn cfg(extractor: ExtractorKind, in_channels: i64, image_size: i64, d: i64) -> ModelConfig {
        ModelConfig {
            extractor,
            in_channels,
            image_size,
            num_classes: 10,
            feature_dim: d,
            modules: 2,
            module_hidden: 16,
            init: Init::default(),
            precision: crate::Precision::Fp32,
        }
    }

    /// Trainable and buffer values of `cfg`'s extractor, built for real.
    fn built_counts(cfg: &ModelConfig) -> (i64, i64) {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Extractor::new(&(vs.root() / "extractor"), cfg).unwrap();
        let (mut trained, mut buffers) = (0, 0);
        for t in vs.variables().values() {
            if t.requires_grad() {
                trained += t.numel() as i64;
            } else {
                buffers += t.numel() as i64;
            }
        }
        (trained, buffers)
    }

    /// The counts written out by hand, layer by layer, checked against the layout's count and
    /// the built variables; and the published totals of the standard models.
    #[test]
    fn parameter_counts_match_hand_computed_figures() {
        let _rng = crate::rng_lock();
        let conv = |cin: i64, cout: i64, k: i64| k * k * cin * cout;
        for c in [1i64, 3] {
            let d = 128;
            // VGG-11-BN: convs with bias, BN weight + bias, head linear(512 → d).
            let vgg_convs = conv(c, 64, 3)
                + 64
                + conv(64, 128, 3)
                + 128
                + conv(128, 256, 3)
                + 256
                + conv(256, 256, 3)
                + 256
                + conv(256, 512, 3)
                + 512
                + 3 * (conv(512, 512, 3) + 512);
            let vgg_bn = 2 * (64 + 128 + 256 + 256 + 4 * 512);
            let vgg = vgg_convs + vgg_bn + 512 * d + d;
            // ResNet-18, 3×3 stem: convs without bias, BN 2c each, 1×1 shortcuts when the
            // width changes.
            let basic = |cin: i64, cout: i64| {
                let down = if cin != cout {
                    conv(cin, cout, 1) + 2 * cout
                } else {
                    0
                };
                conv(cin, cout, 3) + conv(cout, cout, 3) + 4 * cout + down
            };
            let body = basic(64, 64) * 2
                + basic(64, 128)
                + basic(128, 128)
                + basic(128, 256)
                + basic(256, 256)
                + basic(256, 512)
                + basic(512, 512);
            let resnet = conv(c, 64, 3) + 2 * 64 + body + 512 * d + d;
            // ViT-Tiny at 32 px: patch 4, 64 patches + the class token.
            let w = 192;
            let block = 2 * w
                + (w * 3 * w + 3 * w)
                + (w * w + w)
                + 2 * w
                + (w * 4 * w + 4 * w)
                + (4 * w * w + w);
            let vit = (conv(c, w, 4) + w) + w + 65 * w + 12 * block + 2 * w + (w * d + d);
            for (kind, expected, bn_channels) in [
                (ExtractorKind::Vgg11, vgg, 64 + 128 + 256 + 256 + 4 * 512),
                (
                    ExtractorKind::Resnet18,
                    resnet,
                    64 + 2 * 64 * 2 + 128 * 5 + 256 * 5 + 512 * 5,
                ),
                (ExtractorKind::VitTiny, vit, 0),
            ] {
                let m = cfg(kind, c, 32, d);
                assert_eq!(ParamCounts::of(&m).extractor, expected, "{kind} c={c}");
                // Running mean and variance: two buffers per BatchNorm channel.
                assert_eq!(
                    built_counts(&m),
                    (expected, 2 * bn_channels),
                    "{kind} c={c}"
                );
                // Belief modules: linear(N+d → h) and linear(h → N), L of them.
                assert_eq!(
                    ParamCounts::of(&m).modules,
                    2 * ((10 + d) * 16 + 16 + 16 * 10 + 10)
                );
            }
        }
        // Published totals: torchvision's resnet18 (ImageNet stem, 1000 classes) and timm's
        // vit_tiny_patch16_224, with the head as the linear to d = 1000.
        let imagenet = |kind| ParamCounts::of(&cfg(kind, 3, 224, 1000)).extractor;
        assert_eq!(imagenet(ExtractorKind::Resnet18), 11_689_512);
        assert_eq!(imagenet(ExtractorKind::VitTiny), 5_717_416);
        assert_eq!(
            built_counts(&cfg(ExtractorKind::VitTiny, 3, 224, 1000)).0,
            5_717_416
        );
        // The existing backbones count right too.
        let simple = cfg(ExtractorKind::Cnn, 1, 28, 128);
        assert_eq!(ParamCounts::of(&simple).extractor, built_counts(&simple).0);
        let mlp = cfg(ExtractorKind::Mlp, 3, 8, 128);
        assert_eq!(
            ParamCounts::of(&mlp).extractor,
            (192 * 512 + 512) + (512 * 128 + 128)
        );
    }

    #[test]
    fn patch_sizes_divide_the_image() {
        for (side, patch) in [
            (28, 4),
            (32, 4),
            (64, 8),
            (224, 16),
            (8, 1),
            (12, 2),
            (96, 12),
        ] {
            assert_eq!(vit_patch(side), patch, "{side}");
        }
    }

    /// Grey 28 px and colour 32 px inputs (and a tiny 8 px one) through every backbone: each
    /// block's output has the layout's shape and the extractor gives [b, d].
    #[test]
    fn every_backbone_takes_grey_and_colour_inputs_of_any_size() {
        let _rng = crate::rng_lock();
        tch::manual_seed(0);
        for kind in [
            ExtractorKind::Vgg11,
            ExtractorKind::Resnet18,
            ExtractorKind::VitTiny,
            ExtractorKind::Cnn,
        ] {
            for (c, side) in [(1, 28), (3, 32), (3, 8)] {
                let m = cfg(kind, c, side, 6);
                let vs = nn::VarStore::new(Device::Cpu);
                let layout = BlockLayout::of(&m);
                let net = Net::from(&m);
                let blocks = net.build_blocks(&vs.root(), 0..net.blocks()).unwrap();
                let trained: i64 = vs
                    .trainable_variables()
                    .iter()
                    .map(|t| t.numel() as i64)
                    .sum();
                let counted: i64 = blocks.iter().map(|b| b.param_count()).sum();
                assert_eq!(counted, trained, "{kind} {c}x{side}");
                let head = net.build_head(&vs.root(), &blocks);
                let mut h = Tensor::randn([2, c, side, side], (Kind::Float, Device::Cpu));
                for (i, b) in blocks.iter().enumerate() {
                    // Shapes only: no graph needed.
                    h = tch::no_grad(|| b.forward_t(&h, true));
                    assert_eq!(
                        h.size()[1..],
                        layout.shapes[i][..],
                        "{kind} {c}x{side} block {i}"
                    );
                    assert_eq!(b.output_shape(), layout.shapes[i]);
                }
                assert_eq!(head.forward(&h).size(), [2, 6], "{kind}");
            }
        }
        // VGG-11 at 28 px: the fifth pool would leave 0×0, so it is skipped.
        let vgg = BlockLayout::of(&cfg(ExtractorKind::Vgg11, 1, 28, 6));
        assert_eq!(vgg.shapes.last().unwrap(), &vec![512, 1, 1]);
        assert_eq!(vgg.shapes.len(), 8);
        assert_eq!(
            BlockLayout::of(&cfg(ExtractorKind::Resnet18, 3, 32, 6))
                .shapes
                .len(),
            9
        );
        assert_eq!(
            BlockLayout::of(&cfg(ExtractorKind::VitTiny, 3, 32, 6))
                .shapes
                .len(),
            13
        );
        // Above 64 px ResNet starts with the ImageNet stem: 7×7/2 and a max-pool.
        let big = BlockLayout::of(&cfg(ExtractorKind::Resnet18, 3, 96, 6));
        assert_eq!(big.shapes[0], vec![64, 24, 24]);
        assert_eq!(big.shapes[8], vec![512, 3, 3]);
    }

    /// The attention written out equals libtorch's fused scaled-dot-product attention on
    /// the same q, k, v; the block is pre-norm with residuals around both halves.
    #[test]
    fn attention_matches_libtorch_and_the_block_is_pre_norm() {
        let _rng = crate::rng_lock();
        tch::manual_seed(2);
        let m = cfg(ExtractorKind::VitTiny, 3, 8, 6);
        let vs = nn::VarStore::new(Device::Cpu);
        let Layer::Encoder(e) = build_layer(&vs.root(), Spec::Encoder, m.init) else {
            panic!("an encoder block")
        };
        let x = Tensor::randn([2, 5, VIT_WIDTH], (Kind::Float, Device::Cpu));
        let ours = e.attention(&x);
        let qkv = x
            .apply(&e.qkv)
            .reshape([2, 5, 3, VIT_HEADS, VIT_WIDTH / VIT_HEADS])
            .permute([2, 0, 3, 1, 4]);
        let fused = Tensor::scaled_dot_product_attention(
            &qkv.get(0),
            &qkv.get(1),
            &qkv.get(2),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2)
        .reshape([2, 5, VIT_WIDTH])
        .apply(&e.proj);
        assert!(ours.allclose(&fused, 1e-5, 1e-5, false));
        let h = &x + e.attention(&x.apply(&e.norm1));
        let want = &h + h.apply(&e.norm2).apply(&e.fc1).gelu("none").apply(&e.fc2);
        // Only its forward is checked here.
        let (shape, params) = (Vec::new(), 0);
        let block = Builtin {
            layer: Layer::Encoder(e),
            shape,
            params,
        };
        assert!(block.forward_t(&x, true).allclose(&want, 1e-6, 1e-6, false));
    }

    /// Training forwards normalise with the batch's statistics and move the running ones;
    /// evaluation uses the running ones, so a sample's output does not depend on its batch.
    #[test]
    fn batch_norm_follows_train_and_eval_mode() {
        let _rng = crate::rng_lock();
        tch::manual_seed(1);
        let m = cfg(ExtractorKind::Resnet18, 3, 4, 6);
        let vs = nn::VarStore::new(Device::Cpu);
        let ext = Extractor::new(&(vs.root() / "extractor"), &m).unwrap();
        let mean = || vs.variables()["extractor.stem.bn.running_mean"].copy();
        let x = Tensor::randn([4, 3, 4, 4], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let before = mean();
        let _ = tch::no_grad(|| ext.forward_t(&x, false));
        assert_eq!(mean(), before, "evaluation leaves the running statistics");
        let _ = ext.forward_t(&x, true);
        assert!(mean().ne_tensor(&before).any().int64_value(&[]) == 1);
        let moved = mean();
        let alone = tch::no_grad(|| ext.forward_t(&x.narrow(0, 0, 1), false));
        let together = tch::no_grad(|| ext.forward_t(&x, false)).narrow(0, 0, 1);
        assert!(alone.allclose(&together, 1e-5, 1e-5, false));
        assert_eq!(mean(), moved);
        // In training mode the same sample's output depends on the rest of its batch.
        let t_alone = ext.forward_t(&x.narrow(0, 0, 2), true).narrow(0, 0, 1);
        let t_together = ext.forward_t(&x, true).narrow(0, 0, 1);
        assert!(!t_alone.allclose(&t_together, 1e-4, 1e-4, false));
        // One sample whose last maps are 1×1 (a last partial batch): trains on the running
        // statistics instead of failing, and leaves them alone where it cannot use its own.
        let vgg = cfg(ExtractorKind::Vgg11, 3, 4, 6);
        let vs = nn::VarStore::new(Device::Cpu);
        let ext = Extractor::new(&(vs.root() / "extractor"), &vgg).unwrap();
        let last = || vs.variables()["extractor.block8.bn.running_mean"].copy();
        let before = last();
        let z = ext.forward_t(&x.narrow(0, 0, 1), true);
        assert_eq!(z.size(), [1, 6]);
        assert_eq!(last(), before);
    }
}
