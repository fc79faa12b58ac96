//! Adam whose state can be saved and restored.
//!
//! tch's optimizer wraps libtorch's C++ optimizer, whose moment estimates cannot be read back;
//! an exact `--resume` needs them, so this holds PyTorch's `torch.optim.Adam` state (no weight
//! decay, no amsgrad) itself. The update runs libtorch's fused Adam kernel (what
//! `torch.optim.Adam(fused=True)` runs) through a small C++ shim when the crate was built with
//! libtorch's headers: one multi-tensor kernel per step instead of nine ops per parameter,
//! which on a GPU is most of an optimizer step's launch cost. Otherwise, or if the kernel
//! refuses the tensors, the same update runs as separate tensor ops.

use std::os::raw::{c_char, c_int};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use crate::{CoreError, Result};

/// PyTorch's default β₁, β₂ and ε, the reference's: no run sets others.
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Adam over a fixed set of named parameters.
#[derive(Debug)]
pub struct Adam {
    /// Each parameter's learning rate, in `params`' order.
    lrs: Vec<f64>,
    step: i64,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Use the fused kernel (when built in).
    fused: bool,
    /// The step count as a float32 scalar on the parameters' device, which the fused kernel
    /// reads; made at the first fused step and from then on the count itself: it is advanced
    /// on the device, so a replayed CUDA graph of the step counts too.
    step_t: Option<Tensor>,
}

sid_build::shim! {
    sid_fused_adam;
    fn sid_fused_adam(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        step: *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

impl Adam {
    /// Adam with PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8) over `params`, which are
    /// sorted by name so that the state layout does not depend on hash order.
    pub fn new(mut params: Vec<(String, Tensor)>, lr: f64) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &(String, Tensor)| p.1.zeros_like();
        let exp_avg = params.iter().map(zeros).collect();
        let exp_avg_sq = params.iter().map(zeros).collect();
        Self {
            lrs: vec![lr; params.len()],
            step: 0,
            params,
            exp_avg,
            exp_avg_sq,
            // Whether this build has libtorch's fused Adam kernel (see the module docs).
            fused: cfg!(sid_fused_adam),
            step_t: None,
        }
    }

    /// Adam over every trainable variable of a VarStore (not BatchNorm's running
    /// statistics, which are saved with the weights but never receive a gradient).
    pub fn for_var_store(vs: &tch::nn::VarStore, lr: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.retain(|(_, t)| t.requires_grad());
        Self::new(params, lr)
    }

    /// Gives the parameters whose names `pick` chooses the learning rate `lr` (a backbone's,
    /// for fine-tuning it slower than the rest).
    pub fn set_lr_where(&mut self, lr: f64, pick: &dyn Fn(&str) -> bool) {
        for ((name, _), l) in self.params.iter().zip(&mut self.lrs) {
            if pick(name) {
                *l = lr;
            }
        }
    }

    /// Moves the moment estimates to `device`. The parameters are shallow clones of VarStore
    /// variables, so they follow `VarStore::set_device` on their own.
    pub fn to_device(&mut self, device: tch::Device) {
        let moments = self.exp_avg.iter_mut().chain(&mut self.exp_avg_sq);
        for t in moments.chain(&mut self.step_t) {
            *t = t.to_device(device);
        }
    }

    /// Number of updates done so far (a read from the device once the fused kernel runs).
    pub fn steps(&self) -> i64 {
        match &self.step_t {
            Some(t) => t.double_value(&[]).round() as i64,
            None => self.step,
        }
    }

    /// The parameters' gradients (shallow copies, in the state's order; undefined where a
    /// parameter got none), e.g. to sum them over data-parallel replicas before a step.
    pub fn gradients(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, p)| p.grad()).collect()
    }

    /// Sets every parameter's gradient to zero.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// One update from the gradients currently stored in the parameters.
    pub fn step(&mut self) {
        self.step += 1;
        if self.fused {
            if let Err(e) = self.fused_step() {
                // Nothing was updated (the kernel checks its inputs first): fall back for good.
                tracing::warn!("fused Adam unavailable for these tensors ({e}); using tensor ops");
                self.fused = false;
                self.step_t = None;
            } else {
                return;
            }
        }
        self.ops_step();
    }

    fn fused_step(&mut self) -> std::result::Result<(), String> {
        let Some(first) = self.params.first() else {
            return Ok(());
        };
        let device = first.1.device();
        let done = self.step - 1;
        let step_t = self
            .step_t
            .get_or_insert_with(|| Tensor::full([], done as f64, (Kind::Float, device)));
        let _ = step_t.g_add_scalar_(1.0);
        // One kernel call per learning rate (one, unless a backbone has its own).
        let mut lrs = self.lrs.clone();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        for lr in lrs {
            self.fused_group(lr)?;
        }
        Ok(())
    }

    /// The fused kernel on the parameters whose learning rate is `lr`.
    fn fused_group(&self, lr: f64) -> std::result::Result<(), String> {
        let picked: Vec<(usize, Tensor)> = (self.params.iter().enumerate())
            .map(|(i, (_, p))| (i, p.grad()))
            .filter(|(i, g)| g.defined() && self.lrs[*i] == lr)
            .collect();
        if picked.is_empty() {
            return Ok(());
        }
        let step_t = self.step_t.as_ref().expect("made by fused_step");
        // The kernel's arrays: each picked parameter, its gradient and its two moments.
        let (mut p, mut g, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, grad) in &picked {
            p.push(self.params[*i].1.as_ptr());
            g.push(grad.as_ptr());
            m.push(self.exp_avg[*i].as_ptr());
            v.push(self.exp_avg_sq[*i].as_ptr());
        }
        // SAFETY: every pointer is a live tensor borrowed for the call; the shim only reads the
        // arrays, updates the tensors in place and catches every C++ exception.
        sid_build::call_shim::<1024>(|err, n| {
            tch::no_grad(|| unsafe {
                sid_fused_adam(
                    p.as_ptr(),
                    g.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    step_t.as_ptr(),
                    p.len(),
                    lr,
                    BETA1,
                    BETA2,
                    EPS,
                    err,
                    n,
                )
            })
        })
    }

    /// The update as separate tensor ops.
    fn ops_step(&mut self) {
        let bias1 = 1.0 - BETA1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - BETA2.powi(self.step as i32)).sqrt();
        // In-place ops with two temporaries per parameter: a step is memory-bound, and every
        // extra temporary of a wide layer costs an allocation and a pass over its bytes.
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let m = &mut self.exp_avg[i];
                let _ = m.lerp_(&g, 1.0 - BETA1);
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(BETA2);
                let _ = v.addcmul_(&(&g * (1.0 - BETA2)), &g);
                // p += m / (−(sqrt(v)/√bc2 + ε)/step_size) = p − step_size · m / (sqrt(v)/√bc2 + ε)
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt);
                let _ = denom.g_add_scalar_(EPS);
                let step_size = self.lrs[i] / bias1;
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                let _ = p.addcdiv_(m, &denom);
            }
        });
    }

    /// The optimizer state as named tensors (`{prefix}.{param}.exp_avg`, `.exp_avg_sq`, and
    /// `{prefix}.step`), for a checkpoint.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{prefix}.step"), Tensor::from(self.steps()))];
        let moments = self.exp_avg.iter().zip(&self.exp_avg_sq);
        for ((name, _), (m, v)) in self.params.iter().zip(moments) {
            out.push((format!("{prefix}.{name}.exp_avg"), m.shallow_clone()));
            out.push((format!("{prefix}.{name}.exp_avg_sq"), v.shallow_clone()));
        }
        out
    }

    /// Restores what [`Adam::state`] saved; every entry must be present with the right shape.
    pub fn load_state(&mut self, prefix: &str, named: &crate::NamedTensors) -> Result<()> {
        let step = named.get(&format!("{prefix}.step"))?;
        self.step = step.int64_value(&[]);
        if let Some(t) = &mut self.step_t {
            // In place: a captured graph holds this tensor.
            let _ = t.fill_(self.step as f64);
        }
        // The moments in place, through the shallow copies `state` names (after the step).
        for (name, mut dst) in self.state(prefix).into_iter().skip(1) {
            copy_checked(&mut dst, named.get(&name)?, &name)?;
        }
        Ok(())
    }
}

/// Copies `src` into `dst` in place (any device), after checking the shape.
pub(crate) fn copy_checked(dst: &mut Tensor, src: &Tensor, name: &str) -> Result<()> {
    let (saved, ours) = (src.size(), dst.size());
    if saved != ours {
        return Err(CoreError::StateMismatch(format!(
            "{name}: shape {saved:?} in checkpoint, {ours:?} in model"
        )));
    }
    tch::no_grad(|| dst.f_copy_(&src.to_kind(Kind::Float)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    impl Adam {
        /// Chooses the fused kernel (default when built in) or separate tensor ops; both compute
        /// PyTorch's update, up to float rounding. Asking for the kernel without it does nothing.
        fn set_fused(&mut self, on: bool) {
            self.fused = on && cfg!(sid_fused_adam);
        }

        /// Whether steps run the fused kernel.
        fn is_fused(&self) -> bool {
            self.fused
        }
    }

    #[test]
    fn first_steps_match_hand_computed_adam() {
        // With a constant gradient g, Adam's first update is −lr·sign(g) (up to ε), the second too.
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = Adam::new(vec![("w".into(), p.shallow_clone())], 0.1);
        for _ in 0..2 {
            opt.zero_grad();
            (&p * Tensor::from_slice(&[3.0f32, -0.5]))
                .sum(Kind::Float)
                .backward();
            opt.step();
        }
        let v: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        assert!(
            (v[0] - 0.8).abs() < 1e-5 && (v[1] + 1.8).abs() < 1e-5,
            "{v:?}"
        );
    }

    /// A group with a learning rate of its own steps exactly as an Adam of its own would,
    /// with either kernel; 0 freezes it.
    #[test]
    fn parameters_with_their_own_learning_rate_step_as_their_own_adam() {
        for fused in [true, false] {
            let w = || Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
            let (a, b, c) = (w(), w(), w());
            let named = |t: &Tensor, n: &str| (n.to_string(), t.shallow_clone());
            let mut both = Adam::new(vec![named(&a, "extractor.a"), named(&b, "head.b")], 0.1);
            both.set_lr_where(0.01, &|n| n.starts_with("extractor."));
            let mut alone = Adam::new(vec![named(&c, "c")], 0.01);
            let (frozen_w, mut frozen) = (w(), None);
            for opt in [&mut both, &mut alone] {
                opt.set_fused(fused);
            }
            for step in 0..3 {
                for (t, opt) in [(&a, &mut both), (&c, &mut alone)] {
                    opt.zero_grad();
                    let g = Tensor::from_slice(&[3.0f32, -0.5, step as f32]);
                    (t * &g).sum(Kind::Float).backward();
                    if t.data_ptr() == a.data_ptr() {
                        (&b * &g).sum(Kind::Float).backward();
                    }
                    opt.step();
                }
            }
            assert!(a.equal(&c), "fused {fused}: {a} vs {c}");
            assert!(!b.equal(&a), "the rest keeps lr 0.1");
            let mut zero = Adam::new(vec![named(&frozen_w, "extractor.f")], 0.1);
            zero.set_lr_where(0.0, &|_| true);
            zero.set_fused(fused);
            (&frozen_w * 2.0).sum(Kind::Float).backward();
            zero.step();
            frozen.get_or_insert(frozen_w.detach());
            assert!(frozen.unwrap().equal(&w().detach()), "lr 0 freezes");
        }
    }

    #[test]
    fn matches_pytorch_formula_on_varying_gradients() {
        // Reference values computed by hand from torch.optim.Adam's update rule.
        let p = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let mut opt = Adam::new(vec![("w".into(), p.shallow_clone())], 0.01);
        let (mut m, mut v, mut w) = (0.0f64, 0.0f64, 0.5f64);
        for t in 1..=5 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).backward(); // g = 2w
            opt.step();
            let g = 2.0 * w;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let mh = m / (1.0 - 0.9f64.powi(t));
            let vh = (v / (1.0 - 0.999f64.powi(t))).sqrt();
            w -= 0.01 * mh / (vh + 1e-8);
        }
        let got = p.double_value(&[0]);
        assert!((got - w).abs() < 1e-6, "{got} vs {w}");
        assert_eq!(opt.steps(), 5);
    }

    /// Runs `steps` Adam steps on a quadratic with per-element gradients, fused or not, and
    /// returns the parameters and both moments.
    fn run_adam(fused: bool, steps: usize) -> (Tensor, Tensor, Tensor) {
        let w = Tensor::from_slice(&[0.5f32, -1.5, 3.0, 0.7, 2.0, -0.25]).view([2, 3]);
        let w = w.set_requires_grad(true);
        let b = Tensor::from_slice(&[0.1f32, -0.2]).set_requires_grad(true);
        let mut opt = Adam::new(
            vec![
                ("w".into(), w.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            0.05,
        );
        opt.set_fused(fused);
        assert_eq!(opt.is_fused(), fused && cfg!(sid_fused_adam));
        for _ in 0..steps {
            opt.zero_grad();
            let loss = (&w * &w * &w).sum(Kind::Float) + (&b * 3.0).exp().sum(Kind::Float);
            loss.backward();
            opt.step();
        }
        (
            w.detach(),
            opt.exp_avg[1].shallow_clone(),
            opt.exp_avg_sq[1].shallow_clone(),
        )
    }

    #[test]
    fn fused_kernel_matches_tensor_ops() {
        let (w1, m1, v1) = run_adam(true, 7);
        let (w2, m2, v2) = run_adam(false, 7);
        for (a, b) in [(&w1, &w2), (&m1, &m2), (&v1, &v2)] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "fused vs ops differ by {diff}");
        }
        // And they did move: 7 steps of lr 0.05 change every weight.
        let moved = (&w1 - Tensor::from_slice(&[0.5f32, -1.5, 3.0, 0.7, 2.0, -0.25]).view([2, 3]))
            .abs()
            .min()
            .double_value(&[]);
        assert!(moved > 0.1, "{moved}");
    }

    #[test]
    fn step_count_on_the_device_survives_a_round_trip_in_place() {
        let run = |steps: usize, opt: &mut Adam, p: &Tensor| {
            for _ in 0..steps {
                opt.zero_grad();
                (p * p).sum(Kind::Float).backward();
                opt.step();
            }
        };
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut a = Adam::new(vec![("w".into(), p.shallow_clone())], 0.1);
        run(3, &mut a, &p);
        assert_eq!(a.steps(), 3);
        let named = crate::NamedTensors::from(a.state("opt"));
        assert_eq!(named.get("opt.step").unwrap().int64_value(&[]), 3);
        // An optimizer that has stepped already (so a captured graph may hold its counter)
        // takes the saved count into the same tensor.
        let q = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut b = Adam::new(vec![("w".into(), q.shallow_clone())], 0.1);
        run(5, &mut b, &q);
        let before = b.step_t.as_ref().map(|t| t.data_ptr());
        load_var_store_like(&q, &p);
        b.load_state("opt", &named).unwrap();
        assert_eq!(b.steps(), 3);
        assert_eq!(b.step_t.as_ref().map(|t| t.data_ptr()), before);
        // And both continue identically.
        run(2, &mut a, &p);
        run(2, &mut b, &q);
        assert_eq!(a.steps(), 5);
        assert_eq!(b.steps(), 5);
        assert!(p.allclose(&q, 0.0, 0.0, false), "{p} vs {q}");
    }

    /// Copies `src`'s values into the parameter `dst` in place.
    fn load_var_store_like(dst: &Tensor, src: &Tensor) {
        tch::no_grad(|| dst.shallow_clone().copy_(src));
    }

    #[test]
    fn state_round_trip() {
        let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut a = Adam::new(vec![("w".into(), p.shallow_clone())], 0.1);
        (&p * 2.0).sum(Kind::Float).backward();
        a.step();
        let named = crate::NamedTensors::from(a.state("opt"));
        let q = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut b = Adam::new(vec![("w".into(), q)], 0.1);
        b.load_state("opt", &named).unwrap();
        assert_eq!(b.steps(), 1);
        assert!(b.exp_avg[0].allclose(&a.exp_avg[0], 0.0, 0.0, false));
        let bad = crate::NamedTensors::from(vec![("opt.step".to_string(), Tensor::from(1i64))]);
        assert!(matches!(
            b.load_state("opt", &bad),
            Err(CoreError::StateMismatch(_))
        ));
    }
}
