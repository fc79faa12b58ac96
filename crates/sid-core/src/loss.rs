//! The local SID loss
//! `L_i = α · KL(p_y ‖ p_i) + (1 − α) · KL(sg(p_{i-1}) ‖ p_i)`.

use tch::{Kind, Tensor};

use crate::config::LossConfig;

/// The label side of a step's local losses, the same for every module: built once per step.
#[derive(Debug)]
pub struct LabelTarget {
    /// `p_y` [B, N]: one-hot labels, smoothed by ε towards uniform.
    p_y: Tensor,
    /// `Σ_c p_y ln p_y` of one sample (the same for every sample: 0 without smoothing).
    neg_entropy: f64,
    alpha: f64,
}

impl LabelTarget {
    /// `p_y` for integer `labels` [B] over `num_classes`, with the loss settings of `cfg`.
    pub fn new(labels: &Tensor, num_classes: i64, cfg: &LossConfig) -> Self {
        let eps = cfg.label_smoothing;
        let n = num_classes as f64;
        let xlnx = |x: f64| if x > 0.0 { x * x.ln() } else { 0.0 };
        let one_hot = labels.one_hot(num_classes).to_kind(Kind::Float);
        Self {
            p_y: match eps {
                0.0 => one_hot,
                _ => one_hot * (1.0 - eps) + eps / n,
            },
            neg_entropy: xlnx(1.0 - eps + eps / n) + (n - 1.0) * xlnx(eps / n),
            alpha: cfg.alpha,
        }
    }
}

/// Module i's local loss for its `logits` [B, N], the previous belief `p_prev` [B, N] (treated
/// as a constant) and the step's label side `target`. Computed as
/// `α·KL(p_y‖p) + (1−α)·KL(q‖p) = [α·Σ p_y ln p_y + (1−α)·Σ q ln q − Σ m ln p] / B` with the
/// mixture `m = α·p_y + (1−α)·q`: the same value and gradient as the two KL terms, in half the
/// tensor ops and with one term in the backward pass (a step on a GPU is launch-bound).
pub fn local_loss_for(logits: &Tensor, p_prev: &Tensor, target: &LabelTarget) -> Tensor {
    let batch = logits.size()[0] as f64;
    let alpha = target.alpha;
    let log_p = logits.log_softmax(-1, Kind::Float);
    let teacher = p_prev.detach();
    let mix = teacher.lerp(&target.p_y, alpha);
    // Mask rather than multiply: 0 · (−∞) would be NaN where a belief underflows.
    let masked = (&mix * &log_p).where_scalarother(&mix.gt(0.0), 0.0);
    let cross = masked.sum(Kind::Float);
    let teacher_term = teacher.xlogy(&teacher).sum(Kind::Float) * (1.0 - alpha);
    (teacher_term - cross) / batch + alpha * target.neg_entropy
}

/// `loss · scale`: a micro-batch's loss weighted by its share of the batch.
pub fn scaled(loss: Tensor, scale: f64) -> Tensor {
    // Multiplying by 1 would still be exact, but skip it: one kernel less.
    if scale == 1.0 {
        loss
    } else {
        loss * scale
    }
}

/// Cross-entropy of `logits` against `labels`, the backprop baseline's loss.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.log_softmax(-1, Kind::Float).nll_loss(labels)
}

// Only the tests and the hand-written reference compute the loss from its definition.
/// `KL(target ‖ softmax)` with "batchmean" reduction: summed over classes and batch, divided by
/// the batch size (libtorch's `kl_div` with mean reduction divides by B·N, which is not the
/// method's loss). Zero targets contribute zero thanks to `xlogy`.
#[cfg(test)]
pub(crate) fn kl_batchmean(target: &Tensor, log_p: &Tensor) -> Tensor {
    let batch = target.size()[0] as f64;
    // Mask rather than multiply: 0 · (−∞) would be NaN where a belief underflows.
    let cross = (target * log_p).where_self(&target.gt(0.0), &target.zeros_like());
    (target.xlogy(target) - cross).sum(Kind::Float) / batch
}

/// [`local_loss_for`] from integer `labels` [B], its label side built on the spot.
#[cfg(test)]
pub(crate) fn local_loss(
    logits: &Tensor,
    p_prev: &Tensor,
    labels: &Tensor,
    cfg: &LossConfig,
) -> Tensor {
    local_loss_for(
        logits,
        p_prev,
        &LabelTarget::new(labels, logits.size()[1], cfg),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t2(rows: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 3])
    }

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[])
    }

    /// The loss as the method states it: two batchmean KL terms.
    fn two_kl_loss(logits: &Tensor, prev: &Tensor, labels: &Tensor, cfg: &LossConfig) -> Tensor {
        let log_p = logits.log_softmax(-1, Kind::Float);
        let target = LabelTarget::new(labels, logits.size()[1], cfg).p_y;
        kl_batchmean(&target, &log_p) * cfg.alpha
            + kl_batchmean(&prev.detach(), &log_p) * (1.0 - cfg.alpha)
    }

    #[test]
    fn mixture_form_equals_two_kl_terms_in_value_and_gradient() {
        let _rng = crate::rng_lock();
        tch::manual_seed(3);
        let logits =
            (Tensor::randn([16, 10], (Kind::Float, Device::Cpu)) * 3.0).set_requires_grad(true);
        let prev =
            (Tensor::randn([16, 10], (Kind::Float, Device::Cpu)) * 4.0).softmax(-1, Kind::Float);
        // A teacher with exact zeros, as an underflowing softmax gives.
        let _ = prev.get(0).fill_(0.0);
        let _ = prev.get(0).get(3).fill_(1.0);
        let labels = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
        for (alpha, eps) in [(0.5, 0.0), (0.2, 0.1), (1.0, 0.0), (0.0, 0.05)] {
            let cfg = LossConfig {
                alpha,
                label_smoothing: eps,
            };
            let a = local_loss(&logits, &prev, &labels, &cfg);
            let ga = Tensor::run_backward(&[&a], &[&logits], false, false).remove(0);
            let b = two_kl_loss(&logits, &prev, &labels, &cfg);
            let gb = Tensor::run_backward(&[&b], &[&logits], false, false).remove(0);
            let (va, vb) = (scalar(&a), scalar(&b));
            assert!(
                (va - vb).abs() < 1e-5 * vb.abs().max(1.0),
                "α {alpha} ε {eps}: {va} vs {vb}"
            );
            let dg = (&ga - &gb).abs().max().double_value(&[]);
            assert!(dg < 1e-6, "α {alpha} ε {eps}: gradients differ by {dg}");
        }
    }

    #[test]
    fn loss_matches_hand_computed_value() {
        // One sample, logits [0, ln 2, 0] → p = [1/4, 1/2, 1/4]; label 1; p_prev = [1/2, 1/4, 1/4].
        let logits = t2(&[[0.0, 2f32.ln(), 0.0]]);
        let prev = t2(&[[0.5, 0.25, 0.25]]);
        let labels = Tensor::from_slice(&[1i64]);
        // KL(onehot(1) ‖ p) = −ln(1/2) = ln 2.
        // KL(prev ‖ p) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln(0.25/0.25) = 0.25 ln 2.
        let cfg = LossConfig {
            alpha: 0.5,
            label_smoothing: 0.0,
        };
        let got = scalar(&local_loss(&logits, &prev, &labels, &cfg));
        let want = 0.5 * 2f64.ln() + 0.5 * 0.25 * 2f64.ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // α = 0.2 weighs them 0.2 / 0.8.
        let cfg = LossConfig {
            alpha: 0.2,
            label_smoothing: 0.0,
        };
        let got = scalar(&local_loss(&logits, &prev, &labels, &cfg));
        let want = 0.2 * 2f64.ln() + 0.8 * 0.25 * 2f64.ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn kl_is_batchmean_not_elementwise_mean() {
        // Two identical samples: batchmean equals the one-sample KL (elementwise mean would be /6).
        let logits = t2(&[[0.0, 2f32.ln(), 0.0], [0.0, 2f32.ln(), 0.0]]);
        let target = t2(&[[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]);
        let got = scalar(&kl_batchmean(&target, &logits.log_softmax(-1, Kind::Float)));
        assert!((got - 0.25 * 2f64.ln()).abs() < 1e-6, "{got}");
    }

    #[test]
    fn zero_targets_contribute_zero_even_where_log_p_is_minus_infinity() {
        let log_p = t2(&[[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]]);
        let target = t2(&[[0.0, 1.0, 0.0]]);
        assert_eq!(scalar(&kl_batchmean(&target, &log_p)), 0.0);
    }

    #[test]
    fn label_smoothing_target() {
        let cfg = LossConfig {
            label_smoothing: 0.2,
            ..LossConfig::default()
        };
        let t = LabelTarget::new(&Tensor::from_slice(&[2i64]), 4, &cfg).p_y;
        let v: Vec<f32> = Vec::try_from(t.view([-1])).unwrap();
        assert_eq!(v, vec![0.05, 0.05, 0.85, 0.05]);
    }

    #[test]
    fn first_term_equals_cross_entropy() {
        let _rng = crate::rng_lock();
        let logits = Tensor::randn([5, 7], (Kind::Float, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 6, 3, 3, 1]);
        let prev = logits.softmax(-1, Kind::Float); // consistency term is then zero
        let cfg = LossConfig {
            alpha: 1.0,
            label_smoothing: 0.0,
        };
        let a = scalar(&local_loss(&logits, &prev, &labels, &cfg));
        let b = scalar(&cross_entropy(&logits, &labels));
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn cascade_optimum_is_the_closed_form_mixture() {
        // Minimise L over free logits by gradient descent: the minimiser is α·p_y + (1−α)·p_prev.
        let alpha = 0.3;
        let prev = t2(&[[0.2, 0.5, 0.3]]);
        let labels = Tensor::from_slice(&[0i64]);
        let cfg = LossConfig {
            alpha,
            label_smoothing: 0.0,
        };
        let mut logits = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        for _ in 0..3000 {
            logits.zero_grad();
            let loss = local_loss(&logits, &prev, &labels, &cfg);
            loss.backward();
            tch::no_grad(|| {
                let g = logits.grad();
                let _ = logits.g_sub_(&(g * 0.5));
            });
        }
        let p: Vec<f32> = Vec::try_from(logits.softmax(-1, Kind::Float).view([-1])).unwrap();
        let want = [
            alpha + (1.0 - alpha) * 0.2,
            (1.0 - alpha) * 0.5,
            (1.0 - alpha) * 0.3,
        ];
        for (g, w) in p.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{p:?} vs {want:?}");
        }
        // And the loss there is lower than at nearby beliefs.
        let at = |q: [f32; 3]| {
            let l = Tensor::from_slice(&q).log().view([1, 3]);
            scalar(&local_loss(&l, &prev, &labels, &cfg))
        };
        let best = at([want[0] as f32, want[1] as f32, want[2] as f32]);
        assert!(best < at([want[0] as f32 + 0.02, want[1] as f32 - 0.02, want[2] as f32]));
        assert!(best < at([want[0] as f32 - 0.02, want[1] as f32, want[2] as f32 + 0.02]));
    }
}
