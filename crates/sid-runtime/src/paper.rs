//! The paper's SID (one extractor, its modules spread over devices) as a stage pipeline:
//! stage 1 is the extractor alone, stages 2..W+1 are the module blocks of a [`Placement`].
//! The interpreter is [`crate::schedule`]; this file holds the unit of a module stage
//! ([`ModuleBlock`]) and builds the stages' units, the extractor stage's being sid-core's
//! [`ExtractorUnit`] (run in the order of [`crate::ops::extractor_ops`]).
//!
//! Unlike staged SID, the extractor needs every module's `∂L/∂z` for a micro-batch before its
//! backward: module stages send their summed gradient straight to stage 1
//! ([`crate::Transport::send_grad`]), and stage 1 forwards micro-batch j+1 before it
//! waits for micro-batch j's gradients, so its forward overlaps the modules' work. A step still
//! flushes: the extractor steps its optimiser only after the last micro-batch's backward.

use std::ops::Range;

use sid_core::loss::LabelTarget;
use sid_core::unit::{infer_chain, teacher_chain, Backward, Inferred, MicroBatch, Passed, Unit};
use sid_core::{CoreError, ExtractorUnit, LossConfig, ModuleUnit, NamedTensors, Net};
use tch::{Device, Tensor};

use crate::Result;

/// A block of consecutive belief modules on one stage of the paper-mode pipeline.
#[derive(Debug)]
pub struct ModuleBlock {
    stage: usize,
    modules: Vec<ModuleUnit>,
    /// The fused schedule: each module's local-step forward, detached, is the next module's
    /// teacher (one forward per module instead of two; the same values).
    fused: bool,
    /// Between a micro-batch's forward and its backward: the
    /// features, each module's teacher belief (the reference schedule; the fused one keeps
    /// its forwards in the modules instead), the label target and the micro-batch's share of
    /// the batch.
    pending: Option<(Tensor, Option<Vec<Tensor>>, LabelTarget, f64)>,
}

impl Unit for ModuleBlock {
    fn stage(&self) -> usize {
        self.stage
    }

    fn modules(&self) -> Range<usize> {
        let start = self.modules.first().map_or(0, |m| m.index());
        start..start + self.modules.len()
    }

    /// Phase 1 of one micro-batch on `z` (detached features): the block's teacher chain from
    /// `p`, kept for the backward (fused: the local steps' forwards, their graphs kept). The
    /// features go on at once, unchanged, with the belief leaving the block.
    fn forward(&mut self, _micro: usize, mb: MicroBatch<'_>) -> sid_core::Result<Option<Passed>> {
        let _span = tracing::trace_span!("phase1", stage = self.stage + 1).entered();
        let (z, target) = (mb.input, self.modules[0].label_target(mb.labels));
        let (teachers, p) = if self.fused {
            let mut p = mb.p.detach();
            for m in &mut self.modules {
                p = m.accumulate_forward(&p, z);
            }
            (None, p)
        } else {
            let (teachers, p) = teacher_chain(self.modules.iter(), mb.p.detach(), z);
            (Some(teachers), p)
        };
        self.pending = Some((z.shallow_clone(), teachers, target, mb.scale));
        let input = z.shallow_clone();
        Ok(Some(Passed { input, p }))
    }

    /// Phase 2 of the pending micro-batch: every module's local step, its gradient scaled by
    /// the micro-batch's share and added to the module's until [`Unit::apply`]. Its losses [n],
    /// and `Σ ∂L_i/∂z` over the block, summed in module order, straight to the extractor.
    fn backward(&mut self, _micro: usize, _grad: Option<&Tensor>) -> sid_core::Result<Backward> {
        let stage = self.stage + 1;
        let _span = tracing::trace_span!("phase2", stage).entered();
        let (z, teachers, target, scale) = self.pending.take().ok_or_else(|| {
            CoreError::InvalidConfig(format!("stage {stage}: backward without a forward"))
        })?;
        let mut losses = Vec::with_capacity(self.modules.len());
        let mut grad_z = None;
        for (i, m) in self.modules.iter_mut().enumerate() {
            let out = match &teachers {
                Some(t) => m.accumulate_step(&t[i], &z, &target, scale)?,
                None => m.accumulate_backward(&target, scale)?,
            };
            losses.push(out.loss);
            grad_z = Some(sid_core::unit::add_next(grad_z, out.grad_z));
        }
        Ok(Backward {
            grad: Some(grad_z.expect("a block has at least one module")),
            losses: Some(Tensor::f_stack(&losses, 0)?),
        })
    }

    fn apply(&mut self) {
        self.modules.iter_mut().for_each(|m| m.apply());
    }

    fn gradients(&self) -> Vec<Tensor> {
        self.modules.iter().flat_map(|m| m.gradients()).collect()
    }

    /// Every module's logits on `input` from `p`, and the belief leaving the block.
    fn infer(&self, input: &Tensor, p: &Tensor) -> Inferred {
        let (logits, p) = infer_chain(&self.modules, p, input);
        let next = Some(input.shallow_clone());
        Inferred { next, logits, p }
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.modules.iter().flat_map(|m| m.state()).collect()
    }

    fn load_state(&mut self, named: &NamedTensors) -> sid_core::Result<()> {
        self.modules
            .iter_mut()
            .try_for_each(|m| m.load_state(named))
    }

    fn to_device(&mut self, device: Device) {
        self.modules.iter_mut().for_each(|m| m.to_device(device));
    }
}

/// The extractor and the module blocks of `blocks`, drawn on the CPU in the one order of every
/// network here (extractor, then modules 1..L), so one seed gives the same weights whatever
/// the placement.
pub(crate) fn build_paper(
    net: Net<'_>,
    loss: LossConfig,
    lr: f64,
    blocks: &[Range<usize>],
    fused: bool,
) -> Result<(ExtractorUnit, Vec<ModuleBlock>)> {
    let model = net.model;
    model.validate()?;
    loss.validate()?;
    model.precision.check(Device::Cpu)?;
    let extractor = ExtractorUnit::new(net, lr, blocks.len())?;
    let mut units = (0..model.modules)
        .map(|i| ModuleUnit::new(i, model, loss, lr, Device::Cpu))
        .collect::<Vec<_>>()
        .into_iter();
    let blocks: Vec<ModuleBlock> = blocks
        .iter()
        .enumerate()
        .map(|(w, r)| ModuleBlock {
            stage: w + 1,
            modules: units.by_ref().take(r.len()).collect(),
            fused,
            pending: None,
        })
        .collect();
    Ok((extractor, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sid_core::{ExtractorKind, ModelConfig};
    use tch::Kind;

    /// The fused schedule of the module stages ran: one module forward per micro-batch fewer
    /// than the reference schedule's two (teacher, then local step), on every module.
    #[test]
    fn fused_module_stages_run_one_forward_per_module_fewer() {
        let model = ModelConfig {
            extractor: ExtractorKind::Mlp,
            in_channels: 1,
            image_size: 4,
            num_classes: 3,
            feature_dim: 6,
            modules: 4,
            module_hidden: 8,
            init: sid_core::Init::default(),
            precision: sid_core::Precision::Fp32,
        };
        let (steps, micro) = (3, 2);
        let counts = |fused: bool| {
            let (_, mut blocks) = build_paper(
                Net::from(&model),
                LossConfig::default(),
                1e-3,
                &[0..1, 1..4],
                fused,
            )
            .unwrap();
            for _ in 0..steps * micro {
                let z = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
                let y = Tensor::randint(3, [5], (Kind::Int64, Device::Cpu));
                let mut p = sid_core::belief::uniform_belief(5, 3, Device::Cpu);
                for b in &mut blocks {
                    let mb = MicroBatch {
                        input: &z,
                        p: &p,
                        labels: &y,
                        scale: 1.0 / micro as f64,
                    };
                    p = b.forward(0, mb).unwrap().unwrap().p;
                    let _ = b.backward(0, None).unwrap();
                }
            }
            blocks.iter_mut().for_each(ModuleBlock::apply);
            blocks
                .iter()
                .flat_map(|b| b.modules.iter().map(ModuleUnit::forward_count))
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(false), vec![2 * steps * micro; 4], "reference");
        assert_eq!(counts(true), vec![steps * micro; 4], "fused");
    }
}
