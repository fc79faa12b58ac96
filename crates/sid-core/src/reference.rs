//! Hand-written references for the tests: the whole network in one VarStore with one Adam,
//! trained as the paper's reference code writes it — SID by one backward of Σ L_i with the
//! teacher beliefs detached, BP end to end — and nothing of the units, stages or pipelines it
//! checks.

use std::ops::Range;

use tch::nn::{Module, ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::adam::Adam;
use crate::belief::{belief, uniform_belief, BeliefModule};
use crate::config::{LossConfig, ModelConfig};
use crate::extractor::{forward_blocks, Extractor, Neck};
use crate::loss::{cross_entropy, local_loss};
use crate::network::{var_store_state, NamedTensors};
use crate::precision::forward_f32;
use crate::unit::module_prefix;

/// Extractor and modules under the names every network here uses, drawn in the same order
/// (extractor, then modules 1..L), so one seed gives them the same initial weights.
pub(crate) struct Reference {
    pub vs: VarStore,
    pub extractor: Extractor,
    pub modules: Vec<BeliefModule>,
    pub opt: Adam,
    /// Staged SID's necks, after stages 1..K−1 (none for the whole network).
    pub necks: Vec<Neck>,
    cfg: ModelConfig,
}

impl Reference {
    pub fn new(cfg: &ModelConfig, lr: f64, device: Device) -> Self {
        let mut vs = VarStore::new(Device::Cpu);
        let extractor = Extractor::new(&(vs.root() / "extractor"), cfg).unwrap();
        let modules = (0..cfg.modules)
            .map(|i| BeliefModule::new(&(vs.root() / module_prefix(i)), cfg))
            .collect();
        vs.set_device(device);
        let opt = Adam::for_var_store(&vs, lr);
        Self {
            vs,
            extractor,
            modules,
            opt,
            necks: Vec::new(),
            cfg: cfg.clone(),
        }
    }

    /// The network of staged SID cut after the blocks ending at each of `cut_ends` (all but
    /// the last stage's): a neck `neck_s` there, drawn after everything else.
    pub fn staged(cfg: &ModelConfig, lr: f64, cut_ends: &[usize]) -> Self {
        let mut r = Self::new(cfg, lr, Device::Cpu);
        r.necks = cut_ends
            .iter()
            .enumerate()
            .map(|(s, &end)| {
                let shape = r.extractor.blocks[end - 1].output_shape();
                let p = r.vs.root() / format!("neck_{}", s + 1);
                Neck::new(&p, "fc", &shape, cfg.feature_dim, cfg.init)
            })
            .collect();
        r.opt = Adam::for_var_store(&r.vs, lr);
        r
    }

    /// One step of staged SID, written out: stage s runs its blocks on the previous stage's
    /// output, detached; then its neck (the extractor's head on the last stage); then its
    /// modules from the belief the previous stage left, detached, each module's teacher its
    /// predecessor's belief, detached. One backward of every loss (no graph spans two
    /// stages), one Adam step. `stages`: each stage's blocks and modules. Returns each
    /// module's loss.
    pub fn staged_step(
        &mut self,
        stages: &[(Range<usize>, Range<usize>)],
        x: &Tensor,
        y: &Tensor,
        loss: &LossConfig,
    ) -> Vec<f64> {
        self.opt.zero_grad();
        let mut input = x.shallow_clone();
        let mut p = uniform_belief(x.size()[0], self.cfg.num_classes, x.device());
        let mut losses = Vec::new();
        for (s, (blocks, modules)) in stages.iter().enumerate() {
            let h = forward_blocks(
                &self.extractor.blocks[blocks.clone()],
                &input.detach(),
                true,
            );
            let z = match self.necks.get(s) {
                Some(neck) => neck.forward(&h),
                None => self.extractor.head.forward(&h),
            };
            for m in &self.modules[modules.clone()] {
                let logits = m.forward(&p, &z);
                losses.push(local_loss(&logits, &p, y, loss));
                p = belief(&logits).detach();
            }
            input = h;
        }
        Tensor::stack(&losses, 0).sum(Kind::Float).backward();
        self.opt.step();
        losses.iter().map(|l| l.double_value(&[])).collect()
    }

    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        forward_f32(self.cfg.precision, x.device(), || {
            self.extractor.forward_t(x, train)
        })
    }

    /// One SID step: the teachers from detached features without gradient, then one backward
    /// of Σ L_i through modules and extractor, one Adam step. Returns each module's loss.
    pub fn sid_step(&mut self, x: &Tensor, y: &Tensor, loss: &LossConfig) -> Vec<f64> {
        self.opt.zero_grad();
        let z = self.features(x, true);
        let b = x.size()[0];
        let teachers: Vec<Tensor> = tch::no_grad(|| {
            let mut p = uniform_belief(b, self.cfg.num_classes, x.device());
            self.modules
                .iter()
                .map(|m| {
                    let prev = p.shallow_clone();
                    p = belief(&self.module_logits(m, &p, &z.detach()));
                    prev
                })
                .collect()
        });
        let losses: Vec<Tensor> = self
            .modules
            .iter()
            .zip(&teachers)
            .map(|(m, t)| local_loss(&self.module_logits(m, t, &z), t, y, loss))
            .collect();
        Tensor::stack(&losses, 0).sum(Kind::Float).backward();
        self.opt.step();
        losses.iter().map(|l| l.double_value(&[])).collect()
    }

    /// One BP step: cross-entropy on the last module's logits, end to end. Returns the loss.
    pub fn bp_step(&mut self, x: &Tensor, y: &Tensor) -> f64 {
        self.opt.zero_grad();
        let logits = self.cascade_with(x, true).pop().unwrap();
        let loss = cross_entropy(&logits, y);
        loss.backward();
        self.opt.step();
        loss.double_value(&[])
    }

    fn module_logits(&self, m: &BeliefModule, p: &Tensor, z: &Tensor) -> Tensor {
        forward_f32(self.cfg.precision, z.device(), || m.forward(p, z))
    }

    fn cascade_with(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let z = self.features(x, train);
        let mut p = uniform_belief(x.size()[0], self.cfg.num_classes, x.device());
        self.modules
            .iter()
            .map(|m| {
                let l = self.module_logits(m, &p, &z);
                p = belief(&l);
                l
            })
            .collect()
    }

    /// Every module's logits for inference (BatchNorm on its running statistics).
    pub fn cascade(&self, x: &Tensor) -> Vec<Tensor> {
        tch::no_grad(|| self.cascade_with(x, false))
    }

    /// The weights and buffers.
    pub fn weights(&self) -> NamedTensors {
        NamedTensors::from(var_store_state(&self.vs))
    }
}
