//! SID on one device: the two-phase step of the reference code, module by module.

use tch::{Device, Tensor};

use crate::belief::uniform_belief;
use crate::config::{LossConfig, Method, ModelConfig};
use crate::network::{Cascade, NamedTensors, Network, StepStats};
use crate::unit::{ExtractorUnit, ModuleUnit};
use crate::Result;

/// The SID network on one device: an extractor and L module units, each with its own Adam.
#[derive(Debug)]
pub struct SidNetwork {
    num_classes: i64,
    precision: crate::Precision,
    fused: bool,
    pub(crate) extractor: ExtractorUnit,
    modules: Vec<ModuleUnit>,
}

impl SidNetwork {
    /// Builds the extractor, then modules 1..L, on `device`. Creation order is fixed (the same
    /// as [`crate::BpNetwork`]), so one `tch::manual_seed` gives both the same initial weights.
    pub fn new(cfg: &ModelConfig, loss: LossConfig, lr: f64, device: Device) -> Result<Self> {
        cfg.validate()?;
        loss.validate()?;
        cfg.precision.check(device)?;
        let extractor = ExtractorUnit::new(cfg, lr, device)?;
        let modules = (0..cfg.modules)
            .map(|i| ModuleUnit::new(i, cfg, loss, lr, device))
            .collect();
        Ok(Self {
            num_classes: cfg.num_classes,
            precision: cfg.precision,
            fused: false,
            extractor,
            modules,
        })
    }

    /// Chooses the schedule. Reference (`false`, the default): phase 1 computes every teacher
    /// belief without gradient, then each module runs its local step. Fused (`true`): module
    /// i's local-step forward, detached, is the teacher of module i+1 — the same values with one
    /// forward per module instead of two, and still one module's graph at a time.
    pub fn with_fused_teacher(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    /// The module units, first to last.
    pub fn modules(&self) -> &[ModuleUnit] {
        &self.modules
    }
}

/// Phase 1: the teacher beliefs `P = [p_0, …, p_{L-1}]` from the detached features `z`,
/// computed with the parameters as they are before this step's update.
pub fn teacher_beliefs<'a>(
    modules: impl Iterator<Item = &'a ModuleUnit>,
    z: &Tensor,
    num_classes: i64,
) -> Vec<Tensor> {
    let p0 = uniform_belief(z.size()[0], num_classes, z.device());
    teacher_chain(modules, p0, z).0
}

/// Phase 1 for consecutive modules whose first one's teacher is `p_in` (the uniform `p_0`,
/// or the belief leaving the modules before them): each module's teacher belief, and the
/// belief leaving the last one.
pub fn teacher_chain<'a>(
    modules: impl Iterator<Item = &'a ModuleUnit>,
    p_in: Tensor,
    z: &Tensor,
) -> (Vec<Tensor>, Tensor) {
    let _span = tracing::trace_span!("phase1").entered();
    let mut p = p_in;
    let mut teachers = Vec::new();
    for m in modules {
        let next = m.teacher(&p, z);
        teachers.push(p);
        p = next;
    }
    (teachers, p)
}

/// The forward chain without gradient: every module's logits for features `z`, computed at
/// `precision`, float32.
pub fn cascade_from_features<'a>(
    modules: impl Iterator<Item = &'a crate::BeliefModule>,
    z: &Tensor,
    num_classes: i64,
    precision: crate::Precision,
) -> Cascade {
    tch::no_grad(|| {
        let logits = crate::precision::forward_all_f32(precision, z.device(), || {
            let mut p = uniform_belief(z.size()[0], num_classes, z.device());
            let mut logits = Vec::new();
            for m in modules {
                let l = m.forward(&p, z);
                p = crate::belief::belief(&l);
                logits.push(l);
            }
            logits
        });
        Cascade { logits }
    })
}

impl Network for SidNetwork {
    fn method(&self) -> Method {
        Method::Sid
    }

    fn input_device(&self) -> Device {
        self.extractor.device()
    }

    fn train_step(&mut self, x: &Tensor, y: &Tensor) -> Result<StepStats> {
        let losses = self.train_step_queued(x, y)?;
        self.read_step(&losses)
    }

    fn read_step(&self, losses: &Tensor) -> Result<StepStats> {
        // The step's one wait for the device.
        let _s = tracing::trace_span!("read_losses").entered();
        let module_losses = crate::unit::read_losses(losses, 0)?;
        Ok(StepStats {
            loss: module_losses.iter().sum(),
            module_losses,
        })
    }

    fn train_step_queued(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("sid_step").entered();
        let z = self.extractor.forward(x);
        let z_detached = z.detach();
        let target = self.modules[0].label_target(y);
        let (losses, grad_z) = if self.fused {
            // All forwards first (each module's detached belief is the next one's teacher,
            // from parameters before any update, exactly as in phase 1), then one backward.
            let mut p = uniform_belief(z.size()[0], self.num_classes, z.device());
            for m in self.modules.iter_mut() {
                p = m.forward_step(&p, &z_detached);
            }
            crate::unit::finish_steps(&mut self.modules, &target)?
        } else {
            // One module's graph at a time: SID's working memory stays flat in L.
            let teachers = teacher_beliefs(self.modules.iter(), &z_detached, self.num_classes);
            let mut losses = Vec::with_capacity(self.modules.len());
            let mut grad_z = None;
            for (m, p_prev) in self.modules.iter_mut().zip(&teachers) {
                let out = m.local_step(p_prev, &z_detached, &target)?;
                losses.push(out.loss);
                grad_z = Some(crate::unit::add_next(grad_z, out.grad_z));
            }
            let grad_z = grad_z.expect("at least one module");
            (Tensor::f_stack(&losses, 0)?, grad_z)
        };
        self.extractor.backward_step(&z, &grad_z)?;
        Ok(losses)
    }

    fn cascade(&mut self, x: &Tensor) -> Result<Cascade> {
        let z = self.extractor.infer(x);
        Ok(cascade_from_features(
            self.modules.iter().map(|m| m.module()),
            &z,
            self.num_classes,
            self.precision,
        ))
    }

    fn cascade_exit(&mut self, x: &Tensor, tau: f64) -> Result<crate::EarlyExit> {
        tch::no_grad(|| {
            let mut z = self.extractor.infer(x);
            let b = z.size()[0];
            let mut exits = crate::ExitTracker::new(b, self.modules.len(), tau, z.device());
            let mut p = uniform_belief(b, self.num_classes, z.device());
            for (i, m) in self.modules.iter().enumerate() {
                let l = m.logits(&p, &z);
                // Later modules run for the samples still in the cascade only.
                let Some(on) = exits.update(std::slice::from_ref(&l), i) else {
                    break;
                };
                let keep = on.nonzero().squeeze_dim(1);
                z = z.index_select(0, &keep);
                p = crate::belief::belief(&l).index_select(0, &keep);
            }
            Ok(exits.finish())
        })
    }

    fn state(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut v = self.extractor.state();
        for m in &self.modules {
            v.extend(m.state());
        }
        Ok(v)
    }

    fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        self.extractor.load_state(named)?;
        for m in &mut self.modules {
            m.load_state(named)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExtractorKind;
    use crate::loss::local_loss;
    use crate::BpNetwork;
    use tch::nn::ModuleT;
    use tch::Kind;

    fn small_cfg(extractor: ExtractorKind) -> ModelConfig {
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

    fn batch() -> (Tensor, Tensor) {
        tch::manual_seed(42);
        let x = Tensor::randn([6, 1, 8, 8], (Kind::Float, Device::Cpu));
        (x, Tensor::from_slice(&[0i64, 1, 2, 3, 1, 2]))
    }

    fn max_diff(a: &[(String, Tensor)], b: &NamedTensors, filter: &str) -> f64 {
        a.iter()
            .filter(|(n, _)| n.starts_with(filter))
            .map(|(n, t)| (t - b.get(n).unwrap()).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn sid_and_bp_share_initial_weights_and_forward() {
        let _rng = crate::rng_lock();
        for kind in [ExtractorKind::Cnn, ExtractorKind::Mlp] {
            let cfg = small_cfg(kind);
            tch::manual_seed(7);
            let mut sid = SidNetwork::new(&cfg, LossConfig::default(), 1e-3, Device::Cpu).unwrap();
            tch::manual_seed(7);
            let mut bp = BpNetwork::new(&cfg, 1e-3, Device::Cpu).unwrap();
            let (x, y) = batch();
            // Train SID a little so the weights are not the initial ones, then copy them over.
            for _ in 0..3 {
                sid.train_step(&x, &y).unwrap();
            }
            bp.load_weights(&NamedTensors::from(sid.state().unwrap()))
                .unwrap();
            let a = sid.cascade(&x).unwrap();
            let b = bp.cascade(&x).unwrap();
            assert_eq!(a.logits.len(), 3);
            for (la, lb) in a.logits.iter().zip(&b.logits) {
                assert!(la.allclose(lb, 1e-6, 1e-6, false));
            }
        }
    }

    /// The reference computes one backward of Σ L_i through the whole graph with P detached.
    /// The unit-by-unit step must give the same parameters.
    #[test]
    fn unit_step_equals_reference_single_backward_of_summed_losses() {
        let _rng = crate::rng_lock();
        const STEPS: usize = 3;
        let cfg = small_cfg(ExtractorKind::Cnn);
        let loss_cfg = LossConfig {
            alpha: 0.4,
            label_smoothing: 0.1,
        };
        tch::manual_seed(3);
        let mut sid = SidNetwork::new(&cfg, loss_cfg, 1e-2, Device::Cpu).unwrap();
        tch::manual_seed(3);
        let mut reference = BpNetwork::new(&cfg, 1e-2, Device::Cpu).unwrap();
        let (x, y) = batch();
        for _ in 0..STEPS {
            sid.train_step(&x, &y).unwrap();
            // Reference step: z with grad, P from detached z, Σ L_i, one backward, Adam.
            reference.opt.zero_grad();
            let z = reference.extractor.forward_t(&x, true);
            let mut p = uniform_belief(6, 4, Device::Cpu);
            let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
            let teachers: Vec<Tensor> = tch::no_grad(|| {
                let zd = z.detach();
                reference
                    .modules
                    .iter()
                    .map(|m| {
                        let prev = p.shallow_clone();
                        p = crate::belief::belief(&m.forward(&p, &zd));
                        prev
                    })
                    .collect()
            });
            for (m, t) in reference.modules.iter().zip(&teachers) {
                total += local_loss(&m.forward(t, &z), t, &y, &loss_cfg);
            }
            total.backward();
            reference.opt.step();
        }
        let ours = sid.state().unwrap();
        let theirs = NamedTensors::from(reference.state().unwrap());
        let d_mod = max_diff(&ours, &theirs, "module_");
        assert!(d_mod < 1e-6, "modules differ by {d_mod}");
        // The extractor's gradient of the last step (still held by its parameters) must be the
        // same sum. Its weights are compared on the gradient, not after Adam: Adam's first steps
        // divide by |g|, which turns float-ordering noise in near-zero gradients into ~lr·1e-2.
        let ext = sid.extractor.vs.variables();
        let reference_vars = reference.vs.variables();
        for (name, var) in ext {
            let (g, h) = (var.grad(), reference_vars[&name].grad());
            let scale = h.abs().max().double_value(&[]);
            let d = (&g - &h).abs().max().double_value(&[]);
            // Relative to the largest entry: near-zero entries carry only summation-order noise
            // (its size depends on the CPU's kernels).
            assert!(
                d <= 1e-5 * scale.max(1e-3),
                "{name}: gradients differ by {d} (largest {scale})"
            );
        }
    }

    #[test]
    fn fused_schedule_gives_the_reference_parameters() {
        let _rng = crate::rng_lock();
        let cfg = small_cfg(ExtractorKind::Cnn);
        let (x, y) = batch();
        let build = |fused: bool| {
            tch::manual_seed(21);
            SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu)
                .unwrap()
                .with_fused_teacher(fused)
        };
        let (mut a, mut b) = (build(false), build(true));
        for _ in 0..4 {
            let (la, lb) = (a.train_step(&x, &y).unwrap(), b.train_step(&x, &y).unwrap());
            assert_eq!(la, lb, "same losses step by step");
        }
        let sb = NamedTensors::from(b.state().unwrap());
        assert_eq!(max_diff(&a.state().unwrap(), &sb, ""), 0.0);
        // The fused path ran: one forward per module per step fewer (4 steps).
        for (ma, mb) in a.modules().iter().zip(b.modules()) {
            assert_eq!(
                ma.forward_count(),
                2 * 4,
                "reference: teacher and local step"
            );
            assert_eq!(
                mb.forward_count(),
                4,
                "fused: the local step's forward only"
            );
        }
    }

    #[test]
    fn earlier_modules_do_not_see_later_losses() {
        let _rng = crate::rng_lock();
        // Perturb module 3 only: its loss changes (and module 3's output), yet modules 1 and 2
        // must update exactly as before: no gradient crosses from module i to module i−1.
        let cfg = small_cfg(ExtractorKind::Mlp);
        let build = || {
            tch::manual_seed(11);
            SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap()
        };
        let (x, y) = batch();
        let mut a = build();
        let mut b = build();
        let mut state = b.state().unwrap();
        for (name, t) in state.iter_mut() {
            if name.starts_with("module_3.") {
                *t = &*t + 0.5;
            }
        }
        b.load_state(&NamedTensors::from(state)).unwrap();
        let la = a.train_step(&x, &y).unwrap();
        let lb = b.train_step(&x, &y).unwrap();
        assert_eq!(la.module_losses[..2], lb.module_losses[..2]);
        assert_ne!(la.module_losses[2], lb.module_losses[2]);
        let sa = a.state().unwrap();
        let sb = NamedTensors::from(b.state().unwrap());
        assert_eq!(max_diff(&sa, &sb, "module_1."), 0.0);
        assert_eq!(max_diff(&sa, &sb, "module_2."), 0.0);
        assert!(max_diff(&sa, &sb, "module_3.") > 0.1);
        assert!(
            max_diff(&sa, &sb, "extractor.") > 0.0,
            "the extractor sums every module's gradient"
        );
    }

    #[test]
    fn state_round_trip_restores_training_exactly() {
        let _rng = crate::rng_lock();
        let cfg = small_cfg(ExtractorKind::Mlp);
        let (x, y) = batch();
        tch::manual_seed(5);
        let mut a = SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap();
        a.train_step(&x, &y).unwrap();
        let saved = NamedTensors::from(a.state().unwrap());
        tch::manual_seed(99);
        let mut b = SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap();
        b.load_state(&saved).unwrap();
        let la = a.train_step(&x, &y).unwrap();
        let lb = b.train_step(&x, &y).unwrap();
        assert_eq!(la, lb);
    }

    /// BatchNorm's running statistics are part of the state: a network restored from it
    /// evaluates exactly as the saved one, and SID and BP both save them.
    #[test]
    fn batch_norm_statistics_are_saved_and_restored() {
        let _rng = crate::rng_lock();
        let cfg = ModelConfig {
            image_size: 8,
            ..small_cfg(ExtractorKind::Vgg11)
        };
        let (x, y) = batch();
        tch::manual_seed(4);
        let mut a = SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap();
        for _ in 0..2 {
            a.train_step(&x, &y).unwrap();
        }
        let saved = a.state().unwrap();
        let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"extractor.block1.bn.running_mean"),
            "{names:?}"
        );
        assert!(names.contains(&"extractor.block8.bn.running_var"));
        // Buffers get no Adam moments.
        assert!(!names
            .iter()
            .any(|n| n.starts_with("adam.") && n.contains("running")));
        let saved = NamedTensors::from(saved);
        let mean = saved.get("extractor.block1.bn.running_mean").unwrap();
        assert!(
            mean.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "training moved it"
        );
        tch::manual_seed(99);
        let mut b = SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap();
        b.load_state(&saved).unwrap();
        let (la, lb) = (a.cascade(&x).unwrap(), b.cascade(&x).unwrap());
        assert!(la.logits[2].equal(&lb.logits[2]));
        assert_eq!(a.train_step(&x, &y).unwrap(), b.train_step(&x, &y).unwrap());
        // BP on the identical network carries the same buffers.
        let mut bp = BpNetwork::new(&cfg, 1e-2, Device::Cpu).unwrap();
        bp.load_weights(&NamedTensors::from(b.state().unwrap()))
            .unwrap();
        let bp_state = NamedTensors::from(bp.state().unwrap());
        let theirs = NamedTensors::from(b.state().unwrap());
        let name = "extractor.block4.bn.running_var";
        assert!(bp_state.get(name).unwrap().equal(theirs.get(name).unwrap()));
        assert!(bp.cascade(&x).unwrap().logits[2].allclose(
            &b.cascade(&x).unwrap().logits[2],
            1e-6,
            1e-6,
            false
        ));
    }

    /// Skipping the modules after a sample's exit gives the exits and predictions read off
    /// the whole cascade.
    #[test]
    fn early_exit_skipping_work_equals_exits_from_the_whole_cascade() {
        let _rng = crate::rng_lock();
        let cfg = small_cfg(ExtractorKind::Mlp);
        tch::manual_seed(2);
        let mut net = SidNetwork::new(&cfg, LossConfig::default(), 3e-2, Device::Cpu).unwrap();
        let (x, y) = batch();
        for _ in 0..30 {
            net.train_step(&x, &y).unwrap();
        }
        for tau in [0.3, 0.5, 0.8, 1.1] {
            let fast = net.cascade_exit(&x, tau).unwrap();
            let whole = crate::early_exit(&net.cascade(&x).unwrap().logits, tau);
            assert_eq!(fast.exit_module, whole.exit_module, "tau {tau}");
            assert_eq!(fast.prediction, whole.prediction, "tau {tau}");
            assert!(fast
                .confidence
                .allclose(&whole.confidence, 1e-6, 1e-6, false));
        }
        let some = net.cascade_exit(&x, 0.3).unwrap().exit_module;
        assert!(
            some.min().int64_value(&[]) < 3,
            "confident samples leave early"
        );
    }

    #[test]
    fn non_finite_input_is_reported_as_such() {
        let _rng = crate::rng_lock();
        let cfg = small_cfg(ExtractorKind::Mlp);
        let mut net = SidNetwork::new(&cfg, LossConfig::default(), 1e-2, Device::Cpu).unwrap();
        let (x, y) = batch();
        let x = x * f64::NAN;
        let err = net.train_step(&x, &y).unwrap_err();
        assert!(
            matches!(err, crate::CoreError::NonFiniteLoss { ref what, .. } if what == "module 1"),
            "{err}"
        );
    }
}
