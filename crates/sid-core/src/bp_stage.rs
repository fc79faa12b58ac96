//! Backprop cut into pipeline stages (GPipe, 1F1B): the BP baseline network split at the same
//! block boundaries as staged SID, so that both methods can be compared on the same devices.
//!
//! Stage s owns blocks of the extractor; the last stage also owns the extractor's head and
//! every belief module (they all read the final features). Unlike staged SID, the gradient
//! crosses every boundary: a stage's backward of micro-batch j needs the gradient of its
//! output from the next stage, and sends the gradient of its input back. With the gradients
//! of M micro-batches accumulated (each loss weighted by its share of the batch), one Adam
//! step equals one stage's step on the whole batch (tested against a hand-written reference).

use std::collections::BTreeMap;
use std::ops::Range;

use tch::nn::Module;
use tch::{Device, Kind, Tensor};

use crate::belief::{belief, uniform_belief, BeliefModule};
use crate::error::invalid;
use crate::extractor::{forward_blocks, Block, Net};
use crate::loss::{cross_entropy, scaled};
use crate::network::NamedTensors;
use crate::precision::{forward_all_f32, forward_f32};
use crate::stage::StagePlan;
use crate::unit::{
    add_next, module_prefix, Backward, Inferred, MicroBatch, ParamStore, Passed, Unit,
};
use crate::{CoreError, Result};

/// One stage of the pipelined BP network.
#[derive(Debug)]
pub struct BpStage {
    index: usize,
    last: bool,
    /// Saved with Adam's state under `adam.bp_stage_{index+1}` (one stage: `adam.all`, the
    /// single device's checkpoint name).
    params: ParamStore,
    blocks: Vec<Box<dyn Block>>,
    head: Option<(Box<dyn Module>, Vec<BeliefModule>)>,
    num_classes: i64,
    precision: crate::Precision,
    /// Each block's trainable parameters, then (last stage) the head's and modules': the
    /// groups a split backward's weight half computes one by one.
    groups: Vec<Vec<Tensor>>,
    /// Micro-batches between forward and backward.
    pending: BTreeMap<usize, Pending>,
    /// Micro-batches between the input and the weight half of a split backward: the gradient
    /// at each group's output.
    split: BTreeMap<usize, Vec<Tensor>>,
}

/// A micro-batch between its forward and its backward.
#[derive(Debug)]
struct Pending {
    /// The stage's input: a leaf that collects its gradient, except on stage 1.
    leaf: Tensor,
    /// Each block's output, with its graph.
    outs: Vec<Tensor>,
    /// The stage's output (the weighted loss on the last stage).
    out: Tensor,
}

fn missing(index: usize, micro: usize) -> CoreError {
    let index = index + 1;
    invalid(format!(
        "backprop stage {index}: backward of micro-batch {micro} before its forward"
    ))
}

/// Adds `grads` to the parameters' gradients.
fn accumulate(params: &[Tensor], grads: &[Tensor]) -> Result<()> {
    if params.iter().all(|p| p.grad().defined()) {
        for (p, g) in params.iter().zip(grads) {
            let mut acc = p.grad();
            let _ = acc.f_add_(g)?;
        }
        return Ok(());
    }
    // The first gradients ever: autograd creates them (∂/∂p Σ p·g = g, exactly).
    let mut sum: Option<Tensor> = None;
    for (p, g) in params.iter().zip(grads) {
        sum = Some(add_next(sum, (p * g).f_sum(Kind::Float)?));
    }
    if let Some(s) = sum {
        s.f_backward()?;
    }
    Ok(())
}

/// Builds the BP stages of `plan` (its block ranges: every module is on the last stage) on the
/// CPU, drawing the weights in the one order of every network here (extractor, then modules
/// 1..L): one seed gives the same network whatever the cut, and SID's.
pub fn build_bp_stages<'a>(
    net: impl Into<Net<'a>>,
    lr: f64,
    plan: &StagePlan,
) -> Result<Vec<BpStage>> {
    let net = net.into();
    let cfg = net.model;
    let (stages, head) = net.build_cut(plan)?;
    let k = stages.len();
    let last = &stages[k - 1].0;
    let module = |i| BeliefModule::new(&(last.root() / module_prefix(i)), cfg);
    let modules = (0..cfg.modules).map(module).collect();
    let mut head = Some((head, modules));
    let prefixes = net.block_prefixes();
    Ok(stages
        .into_iter()
        .zip(plan.stages())
        .enumerate()
        .map(|(index, ((vs, built), spec))| {
            let mut rest: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            rest.retain(|(_, v)| v.requires_grad());
            rest.sort_by(|a, b| a.0.cmp(&b.0));
            let mut groups: Vec<Vec<Tensor>> = prefixes[spec.blocks.clone()]
                .iter()
                .map(|prefix| {
                    (rest.extract_if(.., |(n, _)| n.starts_with(prefix.as_str())))
                        .map(|(_, v)| v)
                        .collect()
                })
                .collect();
            if !rest.is_empty() {
                groups.push(rest.into_iter().map(|(_, v)| v).collect());
            }
            let prefix = match k {
                1 => "adam.all".into(),
                _ => format!("adam.bp_stage_{}", index + 1),
            };
            BpStage {
                index,
                last: index + 1 == k,
                params: ParamStore::new(vs, lr, prefix),
                blocks: built,
                head: if index + 1 == k { head.take() } else { None },
                num_classes: cfg.num_classes,
                precision: cfg.precision,
                groups,
                pending: BTreeMap::new(),
                split: BTreeMap::new(),
            }
        })
        .collect())
}

impl BpStage {
    /// Every module's logits from the slice's output, float32, computed at the stage's
    /// precision.
    fn head_forward(&self, h: &Tensor) -> Vec<Tensor> {
        let (neck, modules) = self.head.as_ref().expect("the last stage has the head");
        forward_all_f32(self.precision, h.device(), || {
            let z = neck.forward(h);
            let mut p = uniform_belief(z.size()[0], self.num_classes, z.device());
            let mut logits = Vec::with_capacity(modules.len());
            for m in modules {
                let l = m.forward(&p, &z);
                p = belief(&l);
                logits.push(l);
            }
            logits
        })
    }

    fn take(&mut self, micro: usize) -> Result<Pending> {
        self.pending
            .remove(&micro)
            .ok_or_else(|| missing(self.index, micro))
    }

    fn output_grad<'g>(&self, grad: Option<&'g Tensor>) -> Result<&'g Tensor> {
        grad.ok_or_else(|| invalid("a middle stage's backward needs its output's gradient"))
    }
}

impl Unit for BpStage {
    fn stage(&self) -> usize {
        self.index
    }

    fn modules(&self) -> Range<usize> {
        0..self.head.as_ref().map_or(0, |(_, m)| m.len())
    }

    fn grads_needed(&self) -> usize {
        usize::from(!self.last)
    }

    /// Forward of micro-batch `micro`: returns the output for the next stage (detached), or
    /// `None` on the last stage, which keeps `scale ·` its cross-entropy for the backward.
    fn forward(&mut self, micro: usize, mb: MicroBatch<'_>) -> Result<Option<Passed>> {
        let leaf = if self.index == 0 {
            mb.input.shallow_clone()
        } else {
            mb.input.detach().set_requires_grad(true)
        };
        // Each block's output is kept for a split backward's weight half; the arithmetic is
        // the slice's.
        let mut outs = Vec::with_capacity(self.blocks.len());
        let h = forward_f32(self.precision, leaf.device(), || {
            self.blocks.iter().fold(leaf.shallow_clone(), |h, b| {
                let o = b.forward_t(&h, true);
                outs.push(o.shallow_clone());
                o
            })
        });
        // The slice's output as the next stage or the head sees it (float32).
        if let Some(last) = outs.last_mut() {
            *last = h.shallow_clone();
        }
        let (out, next) = if self.last {
            let logits = self.head_forward(&h);
            let loss = cross_entropy(logits.last().expect("at least one module"), mb.labels);
            (scaled(loss, mb.scale), None)
        } else {
            // Backprop stages pass no belief.
            let (input, p) = (h.detach(), Tensor::zeros([0], (Kind::Float, h.device())));
            (h, Some(Passed { input, p }))
        };
        self.pending.insert(micro, Pending { leaf, outs, out });
        Ok(next)
    }

    /// Backward of micro-batch `micro`, with the gradient of its output (`None` on the last
    /// stage). Returns the gradient of its input (for the previous stage; `None` on stage 1)
    /// and, on the last stage, its weighted loss.
    fn backward(&mut self, micro: usize, grad: Option<&Tensor>) -> Result<Backward> {
        let Pending { leaf, out, .. } = self.take(micro)?;
        let root = match self.last {
            true => out.shallow_clone(),
            false => (&out * self.output_grad(grad)?).f_sum(Kind::Float)?,
        };
        root.f_backward()?;
        let losses = self.last.then(|| out.detach());
        let grad = (self.index > 0).then(|| leaf.grad().detach());
        Ok(Backward { grad, losses })
    }

    /// The input half of a split backward (zero bubble): the gradient of the stage's input
    /// (for the previous stage; `None` on stage 1) and of each block's output, which
    /// [`Unit::backward_weight`] needs, but no weight gradient. Returns what
    /// [`Unit::backward`] returns.
    fn backward_input(&mut self, micro: usize, grad: Option<&Tensor>) -> Result<Backward> {
        let g = match self.last {
            true => None,
            false => Some(self.output_grad(grad)?.shallow_clone()),
        };
        let first = self.index == 0;
        let p = self
            .pending
            .get(&micro)
            .ok_or_else(|| missing(self.index, micro))?;
        let root = match &g {
            None => p.out.shallow_clone(),
            Some(g) => (&p.out * g).f_sum(Kind::Float)?,
        };
        // The last block's output gradient is the one received, except before the head.
        let outs = &p.outs[..p.outs.len() - usize::from(g.is_some())];
        let leaf = (!first).then_some(&p.leaf);
        let inputs: Vec<&Tensor> = leaf.into_iter().chain(outs).collect();
        let mut grads = if inputs.is_empty() {
            Vec::new()
        } else {
            Tensor::f_run_backward(&[root], &inputs, true, false)?
        };
        let grad_in = (!first).then(|| grads.remove(0));
        grads.extend(g);
        self.split.insert(micro, grads);
        Ok(Backward {
            grad: grad_in,
            losses: self.last.then(|| p.out.detach()),
        })
    }

    /// The weight half of a split backward, after [`Unit::backward_input`]: each block's
    /// (and the head's) weight gradients from its output's gradient, added to the stage's
    /// until [`Unit::apply`].
    fn backward_weight(&mut self, micro: usize) -> Result<()> {
        let p = self.take(micro)?;
        let grads = self.split.remove(&micro).ok_or_else(|| {
            let index = self.index + 1;
            invalid(format!(
                "backprop stage {index}: weight half of micro-batch {micro} before its input half"
            ))
        })?;
        for (k, params) in self.groups.iter().enumerate() {
            if params.is_empty() {
                continue;
            }
            let root = match (p.outs.get(k), grads.get(k)) {
                (Some(o), Some(g)) => (o * g).f_sum(Kind::Float)?,
                // The head's group: its modules end in the loss itself.
                _ => p.out.shallow_clone(),
            };
            let g = Tensor::f_run_backward(&[root], params, false, false)?;
            accumulate(params, &g)?;
        }
        Ok(())
    }

    fn apply(&mut self) {
        self.params.apply();
    }

    fn gradients(&self) -> Vec<Tensor> {
        self.params.opt.gradients()
    }

    fn read_losses(&self, losses: &Tensor) -> Result<Vec<f64>> {
        let v = losses.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        if !v.is_finite() {
            return Err(CoreError::NonFiniteLoss {
                what: "backprop".into(),
                module: None,
                value: v,
            });
        }
        Ok(vec![v])
    }

    /// The output for the next stage, or every module's logits on the last; `p` passes
    /// through.
    fn infer(&self, input: &Tensor, p: &Tensor) -> Inferred {
        tch::no_grad(|| {
            // The stage's blocks, float32, computed at the stage's precision.
            let h = forward_f32(self.precision, input.device(), || {
                forward_blocks(&self.blocks, input, false)
            });
            let (next, logits) = match self.last {
                true => (None, self.head_forward(&h)),
                false => (Some(h), Vec::new()),
            };
            let p = p.shallow_clone();
            Inferred { next, logits, p }
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ExtractorKind, ModelConfig};
    use crate::network::var_store_state;

    impl BpStage {
        /// [`Unit::forward`] on plain tensors: the output for the next stage, if any.
        fn forward_micro(
            &mut self,
            micro: usize,
            input: &Tensor,
            labels: &Tensor,
            scale: f64,
        ) -> Option<Tensor> {
            let mb = MicroBatch {
                input,
                p: input,
                labels,
                scale,
            };
            Unit::forward(self, micro, mb).unwrap().map(|out| out.input)
        }
    }
    use crate::reference::Reference;
    use tch::Kind;

    fn cfg(extractor: ExtractorKind) -> ModelConfig {
        ModelConfig {
            extractor,
            in_channels: 1,
            image_size: 8,
            num_classes: 4,
            feature_dim: 6,
            modules: 3,
            module_hidden: 5,
            init: crate::Init::default(),
            precision: crate::Precision::Fp32,
        }
    }

    /// With BatchNorm, one micro-batch per step (batch statistics over the whole batch):
    /// two stages of ResNet-18 are the whole network's step (the hand-written reference),
    /// running statistics included, and
    /// evaluate alike.
    #[test]
    fn batch_norm_stages_are_one_bp_step() {
        let _rng = crate::rng_lock();
        let cfg = cfg(ExtractorKind::Resnet18);
        tch::manual_seed(3);
        let mut bp = Reference::new(&cfg, 1e-3, Device::Cpu);
        tch::manual_seed(3);
        let mut st = build_bp_stages(&cfg, 1e-3, &StagePlan::even(&cfg, 2).unwrap()).unwrap();
        tch::manual_seed(8);
        let x = Tensor::randn([4, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
        for _ in 0..2 {
            let expected = bp.bp_step(&x, &y);
            let h = st[0].forward_micro(0, &x, &y, 1.0).unwrap();
            assert!(st[1].forward_micro(0, &h, &y, 1.0).is_none());
            let Backward {
                grad: g,
                losses: loss,
            } = st[1].backward(0, None).unwrap();
            st[0].backward(0, g.as_ref()).unwrap();
            st[0].apply();
            st[1].apply();
            let loss = loss.unwrap().double_value(&[]);
            assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
        }
        let theirs = bp.weights();
        for s in &st {
            for (name, t) in var_store_state(&s.params.vs) {
                let d = (&t - theirs.get(&name).unwrap())
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(d < 1e-4, "{name} differs by {d}");
            }
        }
        let h = st[0].infer(&x, &x).next.unwrap();
        let ours = st[1].infer(&h, &x).logits.pop().unwrap();
        let want = bp.cascade(&x).pop().unwrap();
        assert!(ours.allclose(&want, 1e-4, 1e-4, false));
    }

    /// Two stages, four micro-batches, forwards then backwards: the whole network's step.
    #[test]
    fn two_stages_with_micro_batches_are_one_bp_step() {
        let _rng = crate::rng_lock();
        let cfg = cfg(ExtractorKind::Cnn);
        tch::manual_seed(3);
        let mut bp = Reference::new(&cfg, 1e-3, Device::Cpu);
        tch::manual_seed(3);
        let mut st = build_bp_stages(&cfg, 1e-3, &StagePlan::even(&cfg, 2).unwrap()).unwrap();
        tch::manual_seed(8);
        let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 3, 2, 1, 0]);
        for _ in 0..3 {
            let expected = bp.bp_step(&x, &y);
            let mut total = 0.0;
            let outs: Vec<Tensor> = (0..4)
                .map(|j| {
                    st[0]
                        .forward_micro(j, &x.narrow(0, 2 * j as i64, 2), &y, 0.25)
                        .unwrap()
                })
                .collect();
            for (j, h) in outs.iter().enumerate() {
                assert!(st[1]
                    .forward_micro(j, h, &y.narrow(0, 2 * j as i64, 2), 0.25)
                    .is_none());
            }
            for j in (0..4).rev() {
                let Backward {
                    grad: g,
                    losses: loss,
                } = st[1].backward(j, None).unwrap();
                total += loss.unwrap().double_value(&[]);
                let none = st[0].backward(j, g.as_ref()).unwrap().grad;
                assert!(none.is_none());
            }
            st[0].apply();
            st[1].apply();
            assert!((total - expected).abs() < 1e-5, "{total} vs {expected}");
        }
        let theirs = bp.weights();
        for s in &st {
            for (name, t) in var_store_state(&s.params.vs) {
                let d = (&t - theirs.get(&name).unwrap())
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(d < 1e-5, "{name} differs by {d}");
            }
        }
    }

    /// Two BP stages' gradients, before any optimiser step, after a step on `x` in `micro`
    /// micro-batches, each weighted by `share / micro` (`share`: the batch's part `x` is).
    fn bp_gradients(
        cfg: &ModelConfig,
        x: &Tensor,
        y: &Tensor,
        micro: i64,
        share: f64,
    ) -> Vec<Tensor> {
        tch::manual_seed(3);
        let mut st = build_bp_stages(cfg, 1e-3, &StagePlan::even(cfg, 2).unwrap()).unwrap();
        let n = x.size()[0] / micro;
        for j in 0..micro {
            let (xj, yj) = (x.narrow(0, j * n, n), y.narrow(0, j * n, n));
            let w = share / micro as f64;
            let h = st[0].forward_micro(j as usize, &xj, &yj, w).unwrap();
            assert!(st[1].forward_micro(j as usize, &h, &yj, w).is_none());
        }
        for j in (0..micro as usize).rev() {
            let g = st[1].backward(j, None).unwrap().grad;
            st[0].backward(j, g.as_ref()).unwrap();
        }
        st.iter().flat_map(BpStage::gradients).collect()
    }

    /// Gradients, not parameters after Adam (which normalises their scale away): four
    /// micro-batches add up to the whole batch's, and so do two half-batch shards summed (what
    /// the replicas' all-reduce computes), on every parameter of both stages.
    #[test]
    fn micro_batch_and_shard_gradients_add_up_to_the_batch_gradient() {
        let _rng = crate::rng_lock();
        let cfg = cfg(ExtractorKind::Cnn);
        tch::manual_seed(8);
        let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 3, 2, 1, 0]);
        let whole = bp_gradients(&cfg, &x, &y, 1, 1.0);
        let micro = bp_gradients(&cfg, &x, &y, 4, 1.0);
        let shards: Vec<Vec<Tensor>> = (0..2)
            .map(|r| bp_gradients(&cfg, &x.narrow(0, 4 * r, 4), &y.narrow(0, 4 * r, 4), 1, 0.5))
            .collect();
        crate::assert_gradients_add_up(&whole, &micro, &shards);
    }
}
