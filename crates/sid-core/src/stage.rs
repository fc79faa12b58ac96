//! Staged SID: the backbone cut into K consecutive slices, each with a neck and a block of
//! belief modules, trained by its own local losses only (see `sid-method.md`, "Staged SID").
//!
//! A [`Stage`] owns slice `c_s` of the backbone, its neck `n_s` (the extractor's own head on
//! the last stage) and modules; its one optimiser step is [`Stage::apply`]. Its micro-batch work
//! is [`Stage::forward_micro`] (returns what the next stage needs, at once) then
//! [`Stage::backward_micro`] (local losses into the stage's own parameters, gradients
//! accumulated). No gradient crosses a stage boundary: the next stage reads `sg(z_s)`.
//! K = 1 is the paper's SID: one slice holding the whole extractor, its head and every module,
//! trained by one backward of Σ L_i as the reference code does it.
//!
//! Where stages run and how tensors move between them is the runtime's business
//! (`sid-runtime`'s stage schedule); this module is the arithmetic.

use std::ops::Range;
use std::time::Instant;

use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::belief::{belief, uniform_belief};
use crate::config::LossConfig;
use crate::error::invalid;
use crate::extractor::{forward_blocks, Block, Neck, Net};
use crate::loss::{local_loss_for, scaled, LabelTarget};
use crate::network::NamedTensors;
use crate::precision::forward_f32;
use crate::unit::{
    infer_chain, Backward, Inferred, MicroBatch, ModuleUnit, ParamStore, Passed, Unit,
};
use crate::Result;

/// Which blocks of the backbone and which belief modules (0-based, half-open) one stage owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// Backbone blocks.
    pub blocks: Range<usize>,
    /// Belief modules.
    pub modules: Range<usize>,
}

/// How the backbone and the modules are cut into stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    stages: Vec<StageSpec>,
}

/// A stage's blocks, or its modules.
const BLOCKS: fn(&StageSpec) -> &Range<usize> = |s| &s.blocks;
const MODULES: fn(&StageSpec) -> &Range<usize> = |s| &s.modules;

/// `[0, n)` cut into `k` near-equal consecutive ranges.
fn even_ranges(n: usize, k: usize) -> Vec<Range<usize>> {
    (0..k).map(|s| s * n / k..(s + 1) * n / k).collect()
}

/// One stage per pair of a block range and a module range.
fn zip_specs(
    blocks: impl IntoIterator<Item = Range<usize>>,
    modules: impl IntoIterator<Item = Range<usize>>,
) -> Vec<StageSpec> {
    (blocks.into_iter().zip(modules))
        .map(|(blocks, modules)| StageSpec { blocks, modules })
        .collect()
}

fn parse_ranges(list: &str, what: &str) -> Result<Vec<Range<usize>>> {
    list.split(',')
        .map(|item| {
            let item = item.trim();
            let bad = || invalid(format!("{what} range {item:?} is not N or N-M"));
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            (a <= b).then_some(a..b + 1).ok_or_else(bad)
        })
        .collect()
}

impl StagePlan {
    /// Checks a plan against the network (a [`crate::ModelConfig`]'s built-in backbone, or a [`Net`]):
    /// every block and module in exactly one stage, in order, and no stage without a block or a
    /// module.
    pub fn new<'a>(stages: Vec<StageSpec>, net: impl Into<Net<'a>>) -> Result<Self> {
        let net = net.into();
        let (blocks, modules, k) = (net.blocks(), net.model.modules, stages.len());
        if k == 0 {
            return Err(invalid("a run needs at least one stage"));
        }
        if k > blocks {
            return Err(invalid(format!(
                "--stages {k} is more than the {blocks} block(s) of the {} backbone, which can be cut into at most {blocks} stage(s)",
                net.backbone.name()
            )));
        }
        if k > modules {
            return Err(invalid(format!(
                "--stages {k} is more than the {modules} belief module(s): every stage needs one"
            )));
        }
        let parts = [("blocks", blocks, BLOCKS), ("modules", modules, MODULES)];
        for (what, total, range) in parts {
            let mut next = 0;
            for (i, r) in stages.iter().map(range).enumerate() {
                if r.is_empty() {
                    return Err(invalid(format!("stage {} has no {what}", i + 1)));
                }
                if r.start != next {
                    let (stage, start) = (i + 1, r.start);
                    return Err(invalid(format!(
                        "stage {stage} starts at {what} {start} but {next} is next: ranges must be consecutive from 0"
                    )));
                }
                next = r.end;
            }
            if next != total {
                return Err(invalid(format!(
                    "the stages cover {what} 0-{} but there are {total}",
                    next.saturating_sub(1)
                )));
            }
        }
        Ok(Self { stages })
    }

    /// Blocks and modules split as evenly as possible over `k` stages.
    pub fn even<'a>(net: impl Into<Net<'a>>, k: usize) -> Result<Self> {
        let net = net.into();
        // An impossible `k` gives some empty ranges, and `new` says why.
        let stages = zip_specs(
            even_ranges(net.blocks(), k),
            even_ranges(net.model.modules, k),
        );
        Self::new(stages, net)
    }

    /// Parses `blocks=0-1,2-3;modules=0-4,5-9` (0-based, inclusive ranges, one per stage).
    pub fn parse<'a>(spec: &str, net: impl Into<Net<'a>>) -> Result<Self> {
        let (mut blocks, mut modules) = (None, None);
        for part in spec.split(';') {
            match part.trim().split_once('=') {
                Some(("blocks", list)) => blocks = Some(parse_ranges(list, "block")?),
                Some(("modules", list)) => modules = Some(parse_ranges(list, "module")?),
                _ => {
                    return Err(invalid(format!(
                        "stage placement {spec:?} is not blocks=A-B,...;modules=C-D,... (or auto, or even)"
                    )))
                }
            }
        }
        let (Some(blocks), Some(modules)) = (blocks, modules) else {
            return Err(invalid(format!(
                "stage placement {spec:?} needs both blocks=... and modules=..."
            )));
        };
        let (b, m) = (blocks.len(), modules.len());
        if b != m {
            return Err(invalid(format!(
                "stage placement {spec:?} gives {b} block ranges but {m} module ranges"
            )));
        }
        Self::new(zip_specs(blocks, modules), net)
    }

    /// The cut that minimises the slowest stage's time under `costs`: every way of cutting the
    /// blocks, each with modules added one at a time to the stage that is then the fastest
    /// (modules all cost the same, so only their count per stage matters).
    pub fn balanced<'a>(net: impl Into<Net<'a>>, k: usize, costs: &StageCosts) -> Result<Self> {
        let net = net.into();
        let (blocks, cfg) = (net.blocks(), net.model);
        if k == 0 || k > blocks || k > cfg.modules || costs.blocks.len() != blocks {
            return Self::even(net, k);
        }
        let mut best: Option<(f64, Vec<StageSpec>)> = None;
        for cut in block_cuts(blocks, k) {
            let mut load: Vec<f64> = cut.iter().map(|r| costs.stage(r, 1)).collect();
            let mut counts = vec![1usize; k];
            for _ in k..cfg.modules {
                let s = (0..k)
                    .min_by(|&a, &b| load[a].total_cmp(&load[b]))
                    .expect("k >= 1");
                counts[s] += 1;
                load[s] += costs.module;
            }
            let worst = load.iter().copied().fold(0.0, f64::max);
            if best.as_ref().is_none_or(|(w, _)| worst < *w) {
                // Stage s's modules follow the counts of the stages before it.
                let at = |s: usize| counts[..s].iter().sum::<usize>();
                best = Some((worst, zip_specs(cut, (0..k).map(|s| at(s)..at(s + 1)))));
            }
        }
        Self::new(best.expect("at least one cut").1, net)
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Whether there are none (never, for a checked plan).
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The stages, first to last.
    pub fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    /// The plan in `--placement` syntax: `blocks=0-1,2-3;modules=0-4,5-9`.
    pub fn to_spec(&self) -> String {
        let spec = |r: &Range<usize>| match r.len() {
            1 => r.start.to_string(),
            _ => format!("{}-{}", r.start, r.end - 1),
        };
        let list = |f| {
            let ranges: Vec<String> = self.stages.iter().map(f).map(spec).collect();
            ranges.join(",")
        };
        format!("blocks={};modules={}", list(BLOCKS), list(MODULES))
    }

    /// Each stage's predicted time per step under `costs`.
    pub fn predicted(&self, costs: &StageCosts) -> Vec<f64> {
        let time = |s: &StageSpec| costs.stage(&s.blocks, s.modules.len());
        self.stages.iter().map(time).collect()
    }
}

/// Every way of cutting `n` blocks into `k` non-empty consecutive ranges.
fn block_cuts(n: usize, k: usize) -> Vec<Vec<Range<usize>>> {
    if k == 1 {
        return vec![vec![0..n]];
    }
    let mut out = Vec::new();
    // The first range ends at e; the rest is a cut of the remaining blocks into k-1.
    for e in 1..=n - (k - 1) {
        for rest in block_cuts(n - e, k - 1) {
            let shifted = rest.into_iter().map(|r| r.start + e..r.end + e);
            out.push(std::iter::once(0..e).chain(shifted).collect());
        }
    }
    out
}

/// Measured cost (seconds per step, forward + backward) of each backbone block and of one
/// belief module with its loss: what [`StagePlan::balanced`] balances.
#[derive(Debug, Clone, PartialEq)]
pub struct StageCosts {
    /// Each block, first to last.
    pub blocks: Vec<f64>,
    /// One module.
    pub module: f64,
}

impl StageCosts {
    /// The time of a stage with `blocks` and `modules` modules.
    fn stage(&self, blocks: &Range<usize>, modules: usize) -> f64 {
        self.blocks[blocks.clone()].iter().sum::<f64>() + self.module * modules as f64
    }
}

/// Times each block of the backbone and one module, forward and backward, on a batch of
/// `batch` inputs of the model's size (`in_channels` × `image_size`²) on `device` (the median
/// of `reps` runs after one warm-up). Its layers draw their weights from libtorch's global RNG:
/// profile before seeding, not between a seed and the network it should fix.
pub fn profile_costs<'a>(
    net: impl Into<Net<'a>>,
    batch: i64,
    device: Device,
    reps: usize,
) -> StageCosts {
    let _span = tracing::info_span!("profile_stages").entered();
    let net = net.into();
    let cfg = net.model;
    let vs = VarStore::new(device);
    // A backbone without blocks has no costs; a plan for it fails on its own.
    let blocks = net
        .build_blocks(&vs.root(), 0..net.blocks())
        .unwrap_or_default();
    let module = crate::belief::BeliefModule::new(&(vs.root() / "module"), cfg);
    let shape = [batch, cfg.in_channels, cfg.image_size, cfg.image_size];
    let numel: i64 = shape.iter().product();
    let x = Tensor::arange(numel, (Kind::Float, device)).sin();
    let mut x = x.reshape(shape);
    // The median time of `reps` runs (after a warm-up) of the forward `f` and its backward.
    let time = |f: &dyn Fn() -> Tensor| {
        let mut t: Vec<f64> = (0..=reps.max(1))
            .map(|_| {
                let s = Instant::now();
                let y = f();
                y.sum(Kind::Float).backward();
                // Waits for the device by reading one value (timing on a GPU needs it).
                let _ = y.flatten(0, -1).get(0).double_value(&[]);
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.remove(0);
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let mut costs = Vec::with_capacity(blocks.len());
    for b in &blocks {
        let input = x.detach().set_requires_grad(true);
        costs.push(time(&|| b.forward_t(&input, true)));
        x = tch::no_grad(|| b.forward_t(&x, true));
    }
    let z = Tensor::ones([batch, cfg.feature_dim], (Kind::Float, device)).set_requires_grad(true);
    let p = uniform_belief(batch, cfg.num_classes, device);
    let labels = Tensor::zeros([batch], (Kind::Int64, device));
    let target = LabelTarget::new(&labels, cfg.num_classes, &LossConfig::default());
    let module = time(&|| local_loss_for(&module.forward(&p, &z), &p, &target));
    StageCosts {
        blocks: costs,
        module,
    }
}

/// One stage: a slice of the backbone, its neck, its belief modules and its optimisers.
#[derive(Debug)]
pub struct Stage {
    index: usize,
    spec: StageSpec,
    last: bool,
    /// The slice's and neck's, saved with Adam's state under `adam.stage_{index+1}` (one stage,
    /// the paper's extractor: `adam.extractor`, the single device's checkpoint names).
    params: ParamStore,
    blocks: Vec<Box<dyn Block>>,
    neck: Box<dyn Module>,
    modules: Vec<ModuleUnit>,
    num_classes: i64,
    precision: crate::Precision,
    /// Between [`Stage::forward_micro`] and [`Stage::backward_micro`]: the local losses [n]
    /// with their graph.
    pending: Option<Tensor>,
    /// The pending micro-batch's share of the batch (its losses' weight), when run as a
    /// [`Unit`].
    scale: f64,
}

/// What a stage passes downstream for one micro-batch.
#[derive(Debug)]
pub struct StageOutput {
    /// `sg(z_s)`, the slice's output before the neck: the next stage's input. `None` on the
    /// last stage.
    pub z: Option<Tensor>,
    /// The belief leaving the stage's last module, detached.
    pub p: Tensor,
}

/// Builds the stages of `plan` on the CPU. Weights are drawn in the one fixed order of every
/// network here (extractor blocks, its head, modules 1..L), then the necks of stages 1..K−1:
/// a seed gives the same backbone and modules whatever the plan, and K = 1 has exactly the
/// single device's weights.
pub fn build_stages<'a>(
    net: impl Into<Net<'a>>,
    loss: LossConfig,
    lr: f64,
    plan: &StagePlan,
) -> Result<Vec<Stage>> {
    let net = net.into();
    let cfg = net.model;
    loss.validate()?;
    let (built, head) = net.build_cut(plan)?;
    let k = plan.len();
    // Stage by stage is module by module: a checked plan's ranges are consecutive from 0.
    let unit = |i| ModuleUnit::new(i, cfg, loss, lr, Device::Cpu);
    let units: Vec<ModuleUnit> = (0..cfg.modules).map(unit).collect();
    let (mut units, mut head) = (units.into_iter(), Some(head));
    let stages = built.into_iter().zip(&plan.stages).enumerate();
    Ok(stages
        .map(|(index, ((vs, blocks), spec))| {
            let neck: Box<dyn Module> = if index + 1 == k {
                head.take().expect("one head")
            } else {
                let last = blocks.last().expect("a stage has blocks").output_shape();
                let p = vs.root() / format!("neck_{}", index + 1);
                Box::new(Neck::new(&p, "fc", &last, cfg.feature_dim, cfg.init))
            };
            let prefix = match k {
                1 => "adam.extractor".into(),
                _ => format!("adam.stage_{}", index + 1),
            };
            Stage {
                index,
                spec: spec.clone(),
                last: index + 1 == k,
                params: ParamStore::new(vs, lr, prefix),
                blocks,
                neck,
                modules: units.by_ref().take(spec.modules.len()).collect(),
                num_classes: cfg.num_classes,
                precision: cfg.precision,
                pending: None,
                scale: 1.0,
            }
        })
        .collect())
}

impl Stage {
    /// 0-based position in the pipeline.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Where its parameters live.
    pub fn device(&self) -> Device {
        self.params.vs.device()
    }

    /// The label side of the local losses for `labels` (its modules' loss settings).
    pub fn label_target(&self, labels: &Tensor) -> LabelTarget {
        self.modules[0].label_target(labels)
    }

    /// The slice's output `h` on `sg(input)` and the neck's features `z`, float32, each
    /// computed at the stage's precision; `train` is BatchNorm's mode.
    fn features(&self, input: &Tensor, train: bool) -> (Tensor, Tensor) {
        let _span = tracing::trace_span!("slice_forward", stage = self.index + 1).entered();
        let (precision, device) = (self.precision, self.device());
        let h = forward_f32(precision, device, || {
            forward_blocks(&self.blocks, &input.detach(), train)
        });
        let z = forward_f32(precision, device, || self.neck.forward(&h));
        (h, z)
    }

    /// Forward of one micro-batch: the slice on `sg(input)`, the neck, each module on the
    /// previous belief (from `p_in` on), the local losses kept with their graph for
    /// [`Stage::backward_micro`]. Returns at once what the next stage needs.
    pub fn forward_micro(
        &mut self,
        input: &Tensor,
        p_in: &Tensor,
        target: &LabelTarget,
    ) -> StageOutput {
        let (h, z) = self.features(input, true);
        let mut p = p_in.detach();
        let mut losses = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            let logits = m.logits(&p, &z);
            losses.push(local_loss_for(&logits, &p, target));
            p = belief(&logits.detach());
        }
        self.pending = Some(Tensor::stack(&losses, 0));
        let z = (!self.last).then(|| h.detach());
        StageOutput { z, p }
    }

    /// Backward of the pending micro-batch: `scale · Σ L_i` into this stage's slice, neck and
    /// modules (gradients add up over micro-batches until [`Stage::apply`]). `scale` is the
    /// micro-batch's share of the batch, so M micro-batches give the batch's gradient. Returns
    /// the scaled losses [n], detached, on the device.
    pub fn backward_micro(&mut self, scale: f64) -> Result<Tensor> {
        let stage = self.index + 1;
        let _span = tracing::trace_span!("stage_backward", stage).entered();
        let losses = (self.pending.take())
            .ok_or_else(|| invalid(format!("stage {stage}: backward without a forward")))?;
        let losses = scaled(losses, scale);
        losses.f_sum(Kind::Float)?.f_backward()?;
        Ok(losses.detach())
    }

    /// A whole step on one micro-batch — [`Stage::forward_micro`], [`Stage::backward_micro`]
    /// and [`Stage::apply`] — without reading anything back to the host: what a CUDA graph of
    /// the stage captures. Returns what the next stage needs and the losses [n] on the device.
    pub fn train_step_queued(
        &mut self,
        input: &Tensor,
        p_in: &Tensor,
        target: &LabelTarget,
    ) -> Result<(StageOutput, Tensor)> {
        let out = self.forward_micro(input, p_in, target);
        let losses = self.backward_micro(1.0)?;
        self.apply();
        Ok((out, losses))
    }

    /// The uniform belief `p_0` for a batch of `batch` samples on this stage's device.
    pub fn uniform(&self, batch: i64) -> Tensor {
        uniform_belief(batch, self.num_classes, self.device())
    }
}

impl Unit for Stage {
    fn stage(&self) -> usize {
        self.index
    }

    fn modules(&self) -> Range<usize> {
        self.spec.modules.clone()
    }

    fn forward(&mut self, _micro: usize, mb: MicroBatch<'_>) -> Result<Option<Passed>> {
        let target = self.label_target(mb.labels);
        self.scale = mb.scale;
        let out = self.forward_micro(mb.input, mb.p, &target);
        Ok(out.z.map(|z| Passed { input: z, p: out.p }))
    }

    fn backward(&mut self, _micro: usize, _grad: Option<&Tensor>) -> Result<Backward> {
        let losses = Some(self.backward_micro(self.scale)?);
        Ok(Backward { grad: None, losses })
    }

    fn apply(&mut self) {
        let _span = tracing::trace_span!("stage_apply", stage = self.index + 1).entered();
        self.params.apply();
        self.modules.iter_mut().for_each(ModuleUnit::apply);
    }

    fn gradients(&self) -> Vec<Tensor> {
        let mut g = self.params.opt.gradients();
        g.extend(self.modules.iter().flat_map(ModuleUnit::gradients));
        g
    }

    /// The slice's output (for the next stage; `None` on the last), every module's logits
    /// and the belief leaving the last module.
    fn infer(&self, input: &Tensor, p_in: &Tensor) -> Inferred {
        tch::no_grad(|| {
            let (h, z) = self.features(input, false);
            let (logits, p) = infer_chain(&self.modules, p_in, &z);
            let next = (!self.last).then_some(h);
            Inferred { next, logits, p }
        })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = self.params.state();
        v.extend(self.modules.iter().flat_map(ModuleUnit::state));
        v
    }

    fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        self.params.load_state(named)?;
        for m in &mut self.modules {
            m.load_state(named)?;
        }
        Ok(())
    }

    fn set_lr_where(&mut self, lr: f64, pick: &dyn Fn(&str) -> bool) {
        self.params.opt.set_lr_where(lr, pick);
    }

    fn to_device(&mut self, device: Device) {
        self.params.move_to(device);
        self.modules.iter_mut().for_each(|m| m.to_device(device));
    }

    fn as_stage_mut(&mut self) -> Option<&mut Stage> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ExtractorKind, ModelConfig};
    use crate::network::var_store_state;
    use crate::reference::Reference;

    fn cfg(modules: usize) -> ModelConfig {
        ModelConfig {
            extractor: ExtractorKind::Cnn,
            in_channels: 1,
            image_size: 8,
            num_classes: 4,
            feature_dim: 6,
            modules,
            module_hidden: 5,
            init: crate::Init::default(),
            precision: crate::Precision::Fp32,
        }
    }

    #[test]
    fn plans_check_their_ranges() {
        let c = cfg(5);
        assert_eq!(
            StagePlan::even(&c, 2).unwrap().to_spec(),
            "blocks=0-1,2-3;modules=0-1,2-4"
        );
        let p = StagePlan::parse("blocks=0,1-3;modules=0-3,4", &c).unwrap();
        assert_eq!(p.to_spec(), "blocks=0,1-3;modules=0-3,4");
        let err = |s: &str| StagePlan::parse(s, &c).unwrap_err().to_string();
        assert!(err("blocks=0-1,3;modules=0-1,2-4").contains("consecutive"));
        assert!(err("blocks=0-1,2-3;modules=0-1,2-3").contains("cover modules"));
        assert!(err("blocks=0-1;modules=0-1,2-4").contains("1 block ranges but 2"));
        assert!(err("blocks=0-3,;modules=0,1-4").contains("not N or N-M"));
        assert!(err("nonsense").contains("auto"));
        let e = StagePlan::even(&c, 5).unwrap_err().to_string();
        assert!(e.contains("--stages 5 is more than the 4 block(s)"), "{e}");
        let mlp = ModelConfig {
            extractor: ExtractorKind::Mlp,
            ..c.clone()
        };
        assert!(StagePlan::even(&mlp, 2).is_err());
        assert!(StagePlan::even(&cfg(1), 2)
            .unwrap_err()
            .to_string()
            .contains("every stage needs one"));
    }

    #[test]
    fn balanced_plan_minimises_the_slowest_stage() {
        let c = cfg(10);
        // Block costs like SimpleCNN's as once estimated: conv1+conv2 ≈ 154 ms, conv3+conv4 ≈ 216 ms.
        let costs = StageCosts {
            blocks: vec![0.030, 0.124, 0.100, 0.116],
            module: 0.002,
        };
        let p = StagePlan::balanced(&c, 2, &costs).unwrap();
        assert_eq!(p.stages()[0].blocks, 0..2);
        // Modules go where there is slack: the first stage is faster, so it takes all but one.
        assert_eq!(p.to_spec(), "blocks=0-1,2-3;modules=0-8,9");
        let t = p.predicted(&costs);
        assert!((t[1] - 0.218).abs() < 1e-12 && t[0] < t[1], "{t:?}");
        // A heavy first block stands alone; equal loads then share the modules equally.
        let costs = StageCosts {
            blocks: vec![0.3, 0.1, 0.1, 0.1],
            module: 0.02,
        };
        let p = StagePlan::balanced(&c, 2, &costs).unwrap();
        assert_eq!(p.to_spec(), "blocks=0,1-3;modules=0-4,5-9");
        let one = StagePlan::balanced(&c, 1, &costs).unwrap();
        assert_eq!(one.to_spec(), "blocks=0-3;modules=0-9");
        assert_eq!(block_cuts(4, 2).len(), 3);
        assert_eq!(block_cuts(4, 4).len(), 1);
    }

    #[test]
    fn profiling_times_every_block() {
        let _rng = crate::rng_lock();
        let costs = profile_costs(&cfg(2), 4, Device::Cpu, 1);
        assert_eq!(costs.blocks.len(), 4);
        assert!(costs.blocks.iter().all(|&t| t > 0.0) && costs.module > 0.0);
    }

    /// Every new backbone cuts into two stages whose necks read its block outputs (image
    /// maps, or ViT's token sequence through its class token); one step trains, evaluation
    /// runs on BatchNorm's running statistics, and the state restores the same cascade.
    #[test]
    fn new_backbones_train_in_two_stages() {
        let _rng = crate::rng_lock();
        for kind in [
            ExtractorKind::Vgg11,
            ExtractorKind::Resnet18,
            ExtractorKind::VitTiny,
        ] {
            // 4 px keeps ViT's sequence short (patch 1: 16 patches and the class token).
            let c = ModelConfig {
                extractor: kind,
                in_channels: 3,
                image_size: 4,
                ..cfg(2)
            };
            tch::manual_seed(5);
            let plan = StagePlan::even(&c, 2).unwrap();
            let mut stages = build_stages(&c, LossConfig::default(), 1e-3, &plan).unwrap();
            let x = Tensor::randn([4, 3, 4, 4], (Kind::Float, Device::Cpu));
            let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
            let (first, rest) = stages.split_at_mut(1);
            let (s1, s2) = (&mut first[0], &mut rest[0]);
            let out = s1.forward_micro(&x, &s1.uniform(4), &s1.label_target(&y));
            let z = out.z.expect("stage 1 sends features");
            let layout = crate::extractor::BlockLayout::of(&c);
            assert_eq!(
                z.size()[1..],
                layout.shapes[plan.stages()[0].blocks.end - 1][..]
            );
            s2.forward_micro(&z, &out.p, &s2.label_target(&y));
            for s in [&mut *s1, &mut *s2] {
                let l = Vec::<f64>::try_from(s.backward_micro(1.0).unwrap()).unwrap();
                assert!(l.iter().all(|v| v.is_finite()), "{kind}: {l:?}");
                s.apply();
            }
            let cascade = |s1: &Stage, s2: &Stage| {
                let Inferred { next, p, .. } = s1.infer(&x, &s1.uniform(4));
                s2.infer(&next.unwrap(), &p).logits.pop().unwrap()
            };
            let logits = cascade(s1, s2);
            assert_eq!(logits.size(), [4, 4]);
            // Restored stages: the same cascade, running statistics included.
            let saved: Vec<NamedTensors> = [&*s1, &*s2]
                .iter()
                .map(|s| NamedTensors::from(s.state()))
                .collect();
            tch::manual_seed(6);
            let mut fresh = build_stages(&c, LossConfig::default(), 1e-3, &plan).unwrap();
            for (s, named) in fresh.iter_mut().zip(&saved) {
                s.load_state(named).unwrap();
            }
            assert!(cascade(&fresh[0], &fresh[1]).equal(&logits), "{kind}");
        }
    }

    /// One stage is the paper's SID: the same initial weights and, step after step, the same
    /// parameters as the hand-written reference (float tolerance: each sums the gradient at z
    /// in its own order).
    #[test]
    fn one_stage_is_paper_sid() {
        let _rng = crate::rng_lock();
        let c = cfg(3);
        tch::manual_seed(9);
        let mut sid = Reference::new(&c, 1e-3, Device::Cpu);
        tch::manual_seed(9);
        let plan = StagePlan::even(&c, 1).unwrap();
        let mut stages = build_stages(&c, LossConfig::default(), 1e-3, &plan).unwrap();
        let st = &mut stages[0];
        let initial = NamedTensors::from(st.state());
        for (name, t) in var_store_state(&sid.vs) {
            assert_eq!(&t, initial.get(&name).unwrap(), "{name}");
        }
        tch::manual_seed(1);
        let x = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 1, 2]);
        for _ in 0..4 {
            let module_losses = sid.sid_step(&x, &y, &LossConfig::default());
            let target = st.label_target(&y);
            let out = st.forward_micro(&x, &st.uniform(6), &target);
            assert!(out.z.is_none());
            let l = Vec::<f64>::try_from(st.backward_micro(1.0).unwrap()).unwrap();
            st.apply();
            for (u, v) in module_losses.iter().zip(&l) {
                assert!(
                    (u - v).abs() < 1e-5 * u.abs().max(1.0),
                    "{module_losses:?} vs {l:?}"
                );
            }
        }
        let theirs = sid.weights();
        for (name, t) in st
            .state()
            .into_iter()
            .filter(|(n, _)| !n.starts_with("adam."))
        {
            let d = (&t - theirs.get(&name).unwrap())
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-5, "{name} differs by {d}");
        }
    }

    /// Staged SID in two stages (one micro-batch) against staged SID written out by hand
    /// (`Reference::staged_step`: no stage code): the same initial weights under the same
    /// names, then, step after step, the same losses and the same gradients before Adam.
    #[test]
    fn two_stages_are_the_hand_written_staged_step() {
        let _rng = crate::rng_lock();
        let c = cfg(4);
        let loss = LossConfig {
            alpha: 0.3,
            label_smoothing: 0.05,
        };
        let plan = StagePlan::even(&c, 2).unwrap();
        tch::manual_seed(6);
        let mut stages = build_stages(&c, loss, 1e-3, &plan).unwrap();
        let cuts: Vec<_> = plan
            .stages()
            .iter()
            .map(|s| (s.blocks.clone(), s.modules.clone()))
            .collect();
        tch::manual_seed(6);
        let mut reference = Reference::staged(&c, 1e-3, &[cuts[0].0.end]);
        let ours: Vec<(String, Tensor)> = stages
            .iter()
            .flat_map(|s| s.state())
            .filter(|(n, _)| !n.starts_with("adam."))
            .collect();
        let theirs = reference.weights();
        assert_eq!(ours.len(), theirs.len());
        for (name, t) in &ours {
            assert!(t.equal(theirs.get(name).unwrap()), "{name}");
        }
        tch::manual_seed(1);
        let x = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 1, 2]);
        for step in 0..3 {
            let want = reference.staged_step(&cuts, &x, &y, &loss);
            let (mut input, mut p) = (x.shallow_clone(), stages[0].uniform(6));
            let mut got = Vec::new();
            for st in &mut stages {
                let target = st.label_target(&y);
                let out = st.forward_micro(&input, &p, &target);
                got.extend(Vec::<f64>::try_from(st.backward_micro(1.0).unwrap()).unwrap());
                (input, p) = (out.z.unwrap_or_else(|| x.shallow_clone()), out.p);
            }
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-6 * b.abs().max(1.0),
                    "step {step}: {got:?} vs {want:?}"
                );
            }
            let vars = reference.vs.variables();
            for st in &stages {
                let named = st
                    .params
                    .vs
                    .variables()
                    .into_iter()
                    .chain(st.modules.iter().flat_map(|m| m.params.vs.variables()));
                for (name, var) in named.filter(|(_, v)| v.requires_grad()) {
                    let (g, h) = (var.grad(), vars[&name].grad());
                    let scale = h.abs().max().double_value(&[]);
                    let d = (&g - &h).abs().max().double_value(&[]);
                    assert!(
                        d <= 1e-5 * scale.max(1e-3),
                        "step {step}, {name}: {d} of {scale}"
                    );
                }
            }
            stages.iter_mut().for_each(Stage::apply);
        }
    }

    /// Two stages' gradients, before any optimiser step, after a step on `x` in `micro`
    /// micro-batches, each weighted by `share / micro` (`share`: the batch's part `x` is).
    fn staged_gradients(
        c: &ModelConfig,
        x: &Tensor,
        y: &Tensor,
        micro: i64,
        share: f64,
    ) -> Vec<Tensor> {
        tch::manual_seed(9);
        let plan = StagePlan::even(c, 2).unwrap();
        let mut st = build_stages(c, LossConfig::default(), 1e-3, &plan).unwrap();
        let n = x.size()[0] / micro;
        for j in 0..micro {
            let (xj, yj) = (x.narrow(0, j * n, n), y.narrow(0, j * n, n));
            let target = st[0].label_target(&yj);
            let p0 = st[0].uniform(n);
            let out = st[0].forward_micro(&xj, &p0, &target);
            st[1].forward_micro(&out.z.unwrap(), &out.p, &target);
            for s in &mut st {
                let _ = s.backward_micro(share / micro as f64).unwrap();
            }
        }
        st.iter().flat_map(Stage::gradients).collect()
    }

    /// Gradients, not parameters after Adam (which normalises their scale away): four
    /// micro-batches add up to the whole batch's, and so do two half-batch shards summed (what
    /// the replicas' all-reduce computes), on every parameter of both stages.
    #[test]
    fn micro_batch_and_shard_gradients_add_up_to_the_batch_gradient() {
        let _rng = crate::rng_lock();
        let c = cfg(3);
        tch::manual_seed(1);
        let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 3, 2, 1, 0]);
        let whole = staged_gradients(&c, &x, &y, 1, 1.0);
        let micro = staged_gradients(&c, &x, &y, 4, 1.0);
        let shards: Vec<Vec<Tensor>> = (0..2)
            .map(|r| staged_gradients(&c, &x.narrow(0, 4 * r, 4), &y.narrow(0, 4 * r, 4), 1, 0.5))
            .collect();
        crate::assert_gradients_add_up(&whole, &micro, &shards);
    }
}
