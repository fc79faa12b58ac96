//! Adam, written out so that its state can be saved and restored.
//!
//! tch's optimizer wraps libtorch's C++ optimizer, whose moment estimates cannot be read back;
//! an exact `--resume` needs them, so this is PyTorch's `torch.optim.Adam` update (no weight
//! decay, no amsgrad) over named parameters, in tensor ops.

use tch::{Kind, Tensor};

use crate::{CoreError, Result};

/// Adam over a fixed set of named parameters.
#[derive(Debug)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i64,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
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
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            params,
            exp_avg,
            exp_avg_sq,
        }
    }

    /// Adam over every variable of a VarStore.
    pub fn for_var_store(vs: &tch::nn::VarStore, lr: f64) -> Self {
        Self::new(vs.variables().into_iter().collect(), lr)
    }

    /// Moves the moment estimates to `device`. The parameters are shallow clones of VarStore
    /// variables, so they follow `VarStore::set_device` on their own.
    pub fn to_device(&mut self, device: tch::Device) {
        for t in self.exp_avg.iter_mut().chain(self.exp_avg_sq.iter_mut()) {
            *t = t.to_device(device);
        }
    }

    /// Number of updates done so far.
    pub fn steps(&self) -> i64 {
        self.step
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
        let bias1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        let step_size = self.lr / bias1;
        // In-place ops with two temporaries per parameter: a step is memory-bound, and every
        // extra temporary of a wide layer costs an allocation and a pass over its bytes.
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let m = &mut self.exp_avg[i];
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.addcmul_(&(&g * (1.0 - self.beta2)), &g);
                // p += m / (−(sqrt(v)/√bc2 + ε)/step_size) = p − step_size · m / (sqrt(v)/√bc2 + ε)
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bias2_sqrt);
                let _ = denom.g_add_scalar_(self.eps);
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                let _ = p.addcdiv_(m, &denom);
            }
        });
    }

    /// The optimizer state as named tensors (`{prefix}.{param}.exp_avg`, `.exp_avg_sq`, and
    /// `{prefix}.step`), for a checkpoint.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{prefix}.step"), Tensor::from(self.step))];
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((
                format!("{prefix}.{name}.exp_avg"),
                self.exp_avg[i].shallow_clone(),
            ));
            out.push((
                format!("{prefix}.{name}.exp_avg_sq"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        out
    }

    /// Restores what [`Adam::state`] saved; every entry must be present with the right shape.
    pub fn load_state(&mut self, prefix: &str, named: &crate::NamedTensors) -> Result<()> {
        let step = named.get(&format!("{prefix}.step"))?;
        self.step = step.int64_value(&[]);
        for (i, (name, _)) in self.params.iter().enumerate() {
            for (suffix, dst) in [
                ("exp_avg", &mut self.exp_avg[i]),
                ("exp_avg_sq", &mut self.exp_avg_sq[i]),
            ] {
                let src = named.get(&format!("{prefix}.{name}.{suffix}"))?;
                copy_checked(dst, src, &format!("{prefix}.{name}.{suffix}"))?;
            }
        }
        Ok(())
    }
}

/// Copies `src` into `dst` in place (any device), after checking the shape.
pub(crate) fn copy_checked(dst: &mut Tensor, src: &Tensor, name: &str) -> Result<()> {
    if dst.size() != src.size() {
        return Err(CoreError::StateMismatch(format!(
            "{name}: shape {:?} in checkpoint, {:?} in model",
            src.size(),
            dst.size()
        )));
    }
    tch::no_grad(|| dst.f_copy_(&src.to_kind(Kind::Float)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
