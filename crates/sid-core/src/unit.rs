//! Units of work that own their parameters and optimizer: one belief module, or the extractor.
//!
//! A [`ModuleUnit`] is the self-contained phase-2 job of SID: given the teacher belief
//! `P[i-1]` and the features `z`, it computes its local loss, backpropagates it into its own
//! parameters only, steps its own Adam and returns its loss and the gradient that reached `z`.
//! It holds no reference to anything else, so a worker thread can own it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::adam::Adam;
use crate::belief::{belief, BeliefModule};
use crate::config::{LossConfig, ModelConfig};
use crate::error::invalid;
use crate::extractor::Extractor;
use crate::loss::{local_loss_for, scaled, LabelTarget};
use crate::network::{load_var_store, to_cpu, var_store_state, NamedTensors};
use crate::precision::{forward_f32, Precision};
use crate::{CoreError, Result};

/// The variable-path prefix of module `index` (0-based): `module_1` … `module_L`.
pub fn module_prefix(index: usize) -> String {
    format!("module_{}", index + 1)
}

/// A variable store with its own Adam, whose state a checkpoint keeps under `prefix`: what
/// every unit trains.
#[derive(Debug)]
pub(crate) struct ParamStore {
    pub(crate) vs: VarStore,
    pub(crate) opt: Adam,
    prefix: String,
}

impl ParamStore {
    /// Adam at `lr` over the trainable variables of `vs`, its state saved under `prefix`.
    pub(crate) fn new(vs: VarStore, lr: f64, prefix: String) -> Self {
        let opt = Adam::for_var_store(&vs, lr);
        Self { vs, opt, prefix }
    }

    /// Moves the variables and Adam's state to `device`.
    pub(crate) fn move_to(&mut self, device: Device) {
        self.vs.set_device(device);
        self.opt.to_device(device);
    }

    /// One Adam step from the accumulated gradients, then clears them.
    pub(crate) fn apply(&mut self) {
        self.opt.step();
        self.opt.zero_grad();
    }

    /// The variables, then Adam's state, as named CPU tensors.
    pub(crate) fn state(&self) -> Vec<(String, Tensor)> {
        let mut v = var_store_state(&self.vs);
        v.extend(to_cpu(self.opt.state(&self.prefix)));
        v
    }

    /// Restores what [`ParamStore::state`] saved.
    pub(crate) fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        load_var_store(&self.vs, named)?;
        self.opt.load_state(&self.prefix, named)
    }
}

/// Output of one module's phase-2 work.
#[derive(Debug)]
pub struct LocalOutput {
    /// The local loss L_i: a detached scalar on the unit's device. It is not read back here:
    /// reading a GPU value waits for the GPU, and one wait per module would stall the queue
    /// L times a step. Read a step's losses together with [`read_losses`].
    pub loss: Tensor,
    /// ∂L_i/∂z [B, d], on the unit's device.
    pub grad_z: Tensor,
}

/// One belief module with its own VarStore and Adam.
#[derive(Debug)]
pub struct ModuleUnit {
    index: usize,
    /// Saved with Adam's state under `adam.module_{index+1}`.
    pub(crate) params: ParamStore,
    net: BeliefModule,
    loss: LossConfig,
    num_classes: i64,
    precision: Precision,
    /// Between [`ModuleUnit::accumulate_forward`] and [`ModuleUnit::accumulate_backward`]: the features
    /// that receive gradient, the logits with their graph, and the teacher belief.
    pending: Option<(Tensor, Tensor, Tensor)>,
    /// Forwards run so far (see [`ModuleUnit::forward_count`]); atomic only because
    /// [`ModuleUnit::logits`] takes `&self`.
    forwards: AtomicUsize,
}

impl ModuleUnit {
    /// Builds module `index` (0-based) on `device`; its variables are `module_{index+1}.*`.
    /// Weights are drawn on the CPU and then moved, so a seed gives the same initial weights
    /// whatever the device.
    pub fn new(index: usize, cfg: &ModelConfig, loss: LossConfig, lr: f64, device: Device) -> Self {
        let mut vs = VarStore::new(Device::Cpu);
        let net = BeliefModule::new(&(vs.root() / module_prefix(index)), cfg);
        vs.set_device(device);
        Self {
            index,
            params: ParamStore::new(vs, lr, format!("adam.{}", module_prefix(index))),
            net,
            loss,
            num_classes: cfg.num_classes,
            precision: cfg.precision,
            pending: None,
            forwards: AtomicUsize::new(0),
        }
    }

    /// Moves parameters and optimizer state to `device` (a worker does this in its own thread).
    pub fn to_device(&mut self, device: Device) {
        self.params.move_to(device);
    }

    /// 0-based position in the cascade.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The module's logits for `p_prev` and `z`, float32, computed at the unit's precision:
    /// every forward of the module goes through here.
    pub fn logits(&self, p_prev: &Tensor, z: &Tensor) -> Tensor {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        forward_f32(self.precision, self.params.vs.device(), || {
            self.net.forward(p_prev, z)
        })
    }

    /// How many forwards of the module have run (training and inference), so a test can
    /// tell which schedule ran: the fused teacher saves one per module per step.
    pub fn forward_count(&self) -> usize {
        self.forwards.load(Ordering::Relaxed)
    }

    /// The label side of this step's local losses under this unit's loss settings; the same
    /// for every module of a step, so build it once and pass it to each module's step.
    pub fn label_target(&self, labels: &Tensor) -> LabelTarget {
        LabelTarget::new(labels, self.num_classes, &self.loss)
    }

    /// The first half of [`ModuleUnit::accumulate_step`]: the forward with its graph kept,
    /// returning this module's belief, detached — the same values as its phase-1 teacher
    /// belief ([`teacher_chain`]: same inputs, same parameters), so the fused schedule passes
    /// it on as the next module's teacher instead of running a separate phase-1 forward.
    pub fn accumulate_forward(&mut self, p_prev: &Tensor, z: &Tensor) -> Tensor {
        let _span = tracing::trace_span!("forward_module", module = self.index + 1).entered();
        let z_in = z.detach().set_requires_grad(true);
        let logits = self.logits(p_prev, &z_in);
        let next = belief(&logits.detach());
        self.pending = Some((z_in, logits, p_prev.shallow_clone()));
        next
    }

    /// A local step on one micro-batch of a step: forward, backward of `scale · L_i` into this
    /// module's gradients, which add up over the step's micro-batches until
    /// [`ModuleUnit::apply`]. `scale` is the micro-batch's share of the batch, so the returned
    /// loss and `∂(scale·L_i)/∂z` sum over micro-batches to the batch's.
    pub fn accumulate_step(
        &mut self,
        p_prev: &Tensor,
        z: &Tensor,
        target: &LabelTarget,
        scale: f64,
    ) -> Result<LocalOutput> {
        let _ = self.accumulate_forward(p_prev, z);
        self.accumulate_backward(target, scale)
    }

    /// The second half of [`ModuleUnit::accumulate_step`]: the pending forward's loss scaled by
    /// `scale`, backward into this module's gradients (no optimiser step).
    pub fn accumulate_backward(&mut self, target: &LabelTarget, scale: f64) -> Result<LocalOutput> {
        let (z_in, logits, p_prev) = self.pending.take().ok_or_else(|| {
            let index = self.index + 1;
            invalid(format!("module {index}: a backward without its forward"))
        })?;
        let loss = tracing::trace_span!("local_loss")
            .in_scope(|| scaled(local_loss_for(&logits, &p_prev, target), scale));
        tracing::trace_span!("module_backward").in_scope(|| loss.f_backward())?;
        let (loss, grad_z) = (loss.detach(), z_in.grad().detach());
        Ok(LocalOutput { loss, grad_z })
    }

    /// One Adam step from the gradients accumulated since the last one (a stage's micro-batches
    /// add up), then clears them.
    pub fn apply(&mut self) {
        self.params.apply();
    }

    /// The gradients [`ModuleUnit::apply`] would use (see [`crate::Adam::gradients`]).
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params.opt.gradients()
    }

    /// Weights and Adam state as named CPU tensors.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params.state()
    }

    /// Restores weights and Adam state saved by [`ModuleUnit::state`].
    pub fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        self.params.load_state(named)
    }
}

/// Phase 1 for consecutive modules whose first one's teacher is `p_in` (the uniform `p_0`,
/// or the belief leaving the modules before them): each module's teacher belief, and the
/// belief leaving the last one, `p_i = softmax(f_i(p_{i-1}, z))` without gradient.
pub fn teacher_chain<'a>(
    modules: impl Iterator<Item = &'a ModuleUnit>,
    p_in: Tensor,
    z: &Tensor,
) -> (Vec<Tensor>, Tensor) {
    let _span = tracing::trace_span!("phase1").entered();
    let mut p = p_in;
    let mut teachers = Vec::new();
    for m in modules {
        let next = tch::no_grad(|| belief(&m.logits(&p, z)));
        teachers.push(p);
        p = next;
    }
    (teachers, p)
}

/// Inference over consecutive modules from `p_in`: every module's logits on `z`, each one's
/// belief the next one's input, and the belief leaving the last one, without gradient.
pub fn infer_chain(modules: &[ModuleUnit], p_in: &Tensor, z: &Tensor) -> (Vec<Tensor>, Tensor) {
    tch::no_grad(|| {
        let mut p = p_in.shallow_clone();
        let mut logits = Vec::with_capacity(modules.len());
        for m in modules {
            let l = m.logits(&p, z);
            p = belief(&l);
            logits.push(l);
        }
        (logits, p)
    })
}

/// `((g_1 + g_2) + g_3) + …`, one gradient at a time: the one order every schedule sums
/// module gradients in.
pub fn add_next(acc: Option<Tensor>, g: Tensor) -> Tensor {
    match acc {
        None => g,
        Some(acc) => acc + g,
    }
}

/// Reads the losses [n] of consecutive modules, the first being module `first_index`
/// (0-based), in one transfer (one wait for the device), and reports the first non-finite one
/// by name.
pub fn read_losses(losses: &Tensor, first_index: usize) -> Result<Vec<f64>> {
    let all = losses.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?;
    let values = Vec::<f64>::try_from(&all)?;
    if let Some((i, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CoreError::NonFiniteLoss {
            what: format!("module {}", first_index + i + 1),
            module: Some(first_index + i + 1),
            value,
        });
    }
    Ok(values)
}

/// The feature extractor with its own VarStore and Adam: the paper mode's stage 1. A forward
/// sends `(sg(z), p_0)` down and keeps `z`'s graph; a backward takes the module stages'
/// gradients at `z`, summed in stage order, through it.
#[derive(Debug)]
pub struct ExtractorUnit {
    /// Saved with Adam's state under `adam.extractor`.
    pub(crate) params: ParamStore,
    net: Extractor,
    precision: Precision,
    /// The module stages whose gradients each backward waits for.
    module_stages: usize,
    /// Each micro-batch's features, with their graph, until its backward.
    pending: BTreeMap<usize, Tensor>,
}

impl ExtractorUnit {
    /// Builds the extractor (a [`ModelConfig`]'s built-in backbone, or any
    /// [`crate::Net`]) on the CPU (its stage moves it); its variables are `extractor.*`, and
    /// each backward waits for the gradients of `module_stages` module stages.
    pub fn new<'a>(net: impl Into<crate::Net<'a>>, lr: f64, module_stages: usize) -> Result<Self> {
        let net = net.into();
        let vs = VarStore::new(Device::Cpu);
        let extractor = Extractor::new(&(vs.root() / "extractor"), net)?;
        Ok(Self {
            params: ParamStore::new(vs, lr, "adam.extractor".into()),
            net: extractor,
            precision: net.model.precision,
            module_stages,
            pending: BTreeMap::new(),
        })
    }

    /// `c(x)`, float32, computed at the unit's precision; `train` is BatchNorm's mode.
    fn run(&self, x: &Tensor, train: bool) -> Tensor {
        forward_f32(self.precision, self.params.vs.device(), || {
            self.net.forward_t(x, train)
        })
    }
}

impl Unit for ExtractorUnit {
    fn stage(&self) -> usize {
        0
    }

    fn modules(&self) -> Range<usize> {
        0..0
    }

    fn grads_needed(&self) -> usize {
        self.module_stages
    }

    /// `z = c(x)` with gradient, float32 (BatchNorm normalises with the batch's statistics and
    /// updates its running ones), kept for the backward; `sg(z)` and `p` go on.
    fn forward(&mut self, micro: usize, mb: MicroBatch<'_>) -> Result<Option<Passed>> {
        let z = tracing::trace_span!("extractor_forward").in_scope(|| self.run(mb.input, true));
        let passed = Passed {
            input: z.detach(),
            p: mb.p.shallow_clone(),
        };
        self.pending.insert(micro, z);
        Ok(Some(passed))
    }

    /// Backpropagates `grad` through micro-batch `micro`'s `z` into the extractor's gradients,
    /// which add up over a step's micro-batches until [`Unit::apply`].
    fn backward(&mut self, micro: usize, grad: Option<&Tensor>) -> Result<Backward> {
        let z = self.pending.remove(&micro).ok_or_else(|| {
            invalid(format!(
                "the extractor's backward of micro-batch {micro} before its forward"
            ))
        })?;
        let grad = grad.ok_or_else(|| invalid("the extractor has no module stages to wait for"))?;
        let _span = tracing::trace_span!("extractor_backward").entered();
        (&z * grad.detach()).f_sum(Kind::Float)?.f_backward()?;
        Ok(Backward::default())
    }

    fn apply(&mut self) {
        self.params.apply();
    }

    fn gradients(&self) -> Vec<Tensor> {
        self.params.opt.gradients()
    }

    /// `z = c(x)`: no gradient, BatchNorm on its running statistics.
    fn infer(&self, input: &Tensor, p: &Tensor) -> Inferred {
        let z = tracing::trace_span!("extractor_infer")
            .in_scope(|| tch::no_grad(|| self.run(input, false)));
        Inferred {
            next: Some(z),
            logits: Vec::new(),
            p: p.shallow_clone(),
        }
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.params.state()
    }

    fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        self.params.load_state(named)
    }

    fn set_lr_where(&mut self, lr: f64, pick: &dyn Fn(&str) -> bool) {
        self.params.opt.set_lr_where(lr, pick);
    }

    fn to_device(&mut self, device: Device) {
        self.params.move_to(device);
    }
}

/// One micro-batch as a pipeline unit receives it.
#[derive(Debug)]
pub struct MicroBatch<'a> {
    /// The unit's input: images on the first stage, the previous stage's output after.
    pub input: &'a Tensor,
    /// The belief entering the unit's first module (unused by backprop units).
    pub p: &'a Tensor,
    /// Labels [b].
    pub labels: &'a Tensor,
    /// The micro-batch's share of the batch: its losses' weight, so that M micro-batches
    /// accumulate the batch's gradient.
    pub scale: f64,
}

/// What a unit's forward passes to the next stage.
#[derive(Debug)]
pub struct Passed {
    /// The next stage's input, detached.
    pub input: Tensor,
    /// The belief entering the next stage's first module.
    pub p: Tensor,
}

/// What a backward (or its input half) produced.
#[derive(Debug, Default)]
pub struct Backward {
    /// The gradient an earlier stage waits for: a backprop stage's input gradient, or a paper
    /// module stage's `Σ ∂L_i/∂z` for the extractor.
    pub grad: Option<Tensor>,
    /// The micro-batch's losses (weighted by its share), on the device: summed over the step.
    pub losses: Option<Tensor>,
}

/// Inference through a unit.
#[derive(Debug)]
pub struct Inferred {
    /// The next stage's input (`None` when nothing comes after).
    pub next: Option<Tensor>,
    /// Its modules' logits, first to last.
    pub logits: Vec<Tensor>,
    /// The belief leaving its last module.
    pub p: Tensor,
}

/// What a unit that cannot split its backward answers a zero-bubble schedule.
fn cannot_split(stage: usize, micro: usize) -> CoreError {
    let stage = stage + 1;
    invalid(format!(
        "stage {stage} cannot split the backward of micro-batch {micro}"
    ))
}

/// The one interface every pipeline unit offers the step interpreter (`sid-runtime`'s
/// schedule): a staged-SID stage, a backprop stage, the paper mode's extractor and its module
/// blocks. A unit computes; where its inputs come from and where its outputs go is the
/// interpreter's and the transport's business.
pub trait Unit: Send {
    /// 0-based stage.
    fn stage(&self) -> usize;
    /// The belief modules it owns (0-based), for reports and early exit.
    fn modules(&self) -> Range<usize>;
    /// Gradients its backward waits for per micro-batch: one from the next stage (backprop),
    /// one from each module stage (the paper's extractor), or none (SID's local losses).
    fn grads_needed(&self) -> usize {
        0
    }
    /// Forward of micro-batch `micro`, keeping what its backward needs; returns what the
    /// next stage gets, if anything.
    fn forward(&mut self, micro: usize, mb: MicroBatch<'_>) -> Result<Option<Passed>>;
    /// The whole backward of micro-batch `micro` with the gradient from later stages (the sum
    /// of [`Unit::grads_needed`] of them, in stage order), accumulated until [`Unit::apply`].
    fn backward(&mut self, micro: usize, grad: Option<&Tensor>) -> Result<Backward>;
    /// The input-gradient half of [`Unit::backward`] (zero-bubble schedules).
    fn backward_input(&mut self, micro: usize, _grad: Option<&Tensor>) -> Result<Backward> {
        Err(cannot_split(self.stage(), micro))
    }
    /// The weight-gradient half of [`Unit::backward`], after [`Unit::backward_input`].
    fn backward_weight(&mut self, micro: usize) -> Result<()> {
        Err(cannot_split(self.stage(), micro))
    }
    /// One optimiser step from the accumulated gradients, which it then clears.
    fn apply(&mut self);
    /// The gradients [`Unit::apply`] would use (data-parallel replicas sum them first).
    fn gradients(&self) -> Vec<Tensor>;
    /// A step's summed losses read to the host (one wait), a non-finite one an error naming it.
    fn read_losses(&self, losses: &Tensor) -> Result<Vec<f64>> {
        read_losses(losses, self.modules().start)
    }
    /// Inference (no gradient, BatchNorm on its running statistics).
    fn infer(&self, input: &Tensor, p: &Tensor) -> Inferred;
    /// Weights and optimiser state as named CPU tensors.
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restores the unit's entries of a whole checkpoint.
    fn load_state(&mut self, named: &NamedTensors) -> Result<()>;
    /// Moves parameters and optimiser state to `device` (a stage's thread does this itself).
    fn to_device(&mut self, device: Device);
    /// Gives the parameters whose names `pick` chooses the learning rate `lr` (the backbone's
    /// blocks, `--backbone-lr`); a unit without backbone parameters ignores it.
    fn set_lr_where(&mut self, _lr: f64, _pick: &dyn Fn(&str) -> bool) {}
    /// The staged-SID stage inside, which a CUDA graph can capture whole.
    fn as_stage_mut(&mut self) -> Option<&mut crate::Stage> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExtractorKind;
    use crate::reference::Reference;
    use tch::Kind;

    /// The paper's reference computes one backward of Σ L_i through the whole graph with the
    /// teachers detached. The units — teacher chain, each module's local step, the summed
    /// `∂L/∂z` into the extractor, every Adam on its own — must give the same gradients and
    /// parameters; a gradient from module i reaches neither module i−1 nor the teachers.
    #[test]
    fn unit_steps_equal_one_backward_of_the_summed_losses() {
        let _rng = crate::rng_lock();
        let cfg = ModelConfig {
            extractor: ExtractorKind::Cnn,
            in_channels: 1,
            image_size: 8,
            num_classes: 4,
            feature_dim: 6,
            modules: 3,
            module_hidden: 5,
            ..ModelConfig::default()
        };
        let loss = LossConfig {
            alpha: 0.4,
            label_smoothing: 0.1,
        };
        tch::manual_seed(3);
        let mut extractor = ExtractorUnit::new(&cfg, 1e-2, 1).unwrap();
        let mut modules: Vec<ModuleUnit> = (0..3)
            .map(|i| ModuleUnit::new(i, &cfg, loss, 1e-2, Device::Cpu))
            .collect();
        tch::manual_seed(3);
        let mut reference = Reference::new(&cfg, 1e-2, Device::Cpu);
        tch::manual_seed(42);
        let x = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 1, 2]);
        for step in 0..3 {
            let expected = reference.sid_step(&x, &y, &loss);
            let target = modules[0].label_target(&y);
            let p0 = crate::belief::uniform_belief(6, 4, Device::Cpu);
            let mb = MicroBatch {
                input: &x,
                p: &p0,
                labels: &y,
                scale: 1.0,
            };
            let z = extractor.forward(0, mb).unwrap().unwrap().input;
            let (teachers, _) = teacher_chain(modules.iter(), p0, &z);
            let mut grad_z = None;
            for (i, (m, t)) in modules.iter_mut().zip(&teachers).enumerate() {
                let out = m.accumulate_step(t, &z, &target, 1.0).unwrap();
                let l = out.loss.double_value(&[]);
                assert!((l - expected[i]).abs() < 1e-6, "step {step}, module {i}");
                grad_z = Some(add_next(grad_z, out.grad_z));
            }
            extractor.backward(0, grad_z.as_ref()).unwrap();
            // Gradients, before Adam (whose first steps divide by |g| and so magnify
            // summation-order noise in near-zero entries), relative to the largest entry.
            let theirs = reference.vs.variables();
            let ours = extractor.params.vs.variables().into_iter().chain(
                modules
                    .iter()
                    .flat_map(|m| m.params.vs.variables().into_iter().collect::<Vec<_>>()),
            );
            for (name, var) in ours.filter(|(_, v)| v.requires_grad()) {
                let (g, h) = (var.grad(), theirs[&name].grad());
                let scale = h.abs().max().double_value(&[]);
                let d = (&g - &h).abs().max().double_value(&[]);
                assert!(
                    d <= 1e-5 * scale.max(1e-3),
                    "step {step}, {name}: {d} of {scale}"
                );
            }
            extractor.apply();
            modules.iter_mut().for_each(ModuleUnit::apply);
        }
    }
}
