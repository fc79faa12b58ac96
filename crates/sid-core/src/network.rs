//! What every trainable network offers the trainer: a step, the cascade forward, its state.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::Method;
use crate::{CoreError, Result};

/// Losses of one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The step's training loss: the sum of the local losses for SID, the cross-entropy for BP.
    pub loss: f64,
    /// Each module's local loss L_i (SID); empty for BP.
    pub module_losses: Vec<f64>,
}

/// The forward chain's output: the logits of every module, first to last.
#[derive(Debug)]
pub struct Cascade {
    /// `logits[i]` is module i+1's logits [B, N]; the last entry is the network's output.
    pub logits: Vec<Tensor>,
}

impl Cascade {
    /// The prediction: argmax of the last module's logits [B].
    pub fn prediction(&self) -> Tensor {
        let last = self
            .logits
            .last()
            .expect("a cascade has at least one module");
        last.argmax(-1, false)
    }

    /// The cascade's health on a batch with `labels` ([`CascadeHealth`]): one read from the
    /// device for every module's sums.
    pub fn health(&self, labels: &Tensor) -> crate::Result<CascadeHealth> {
        let Some(first) = self.logits.first() else {
            return Ok(CascadeHealth::default());
        };
        let device = first.device();
        let labels = labels.to_device(device);
        let (b, n) = (first.size()[0], first.size()[1]);
        let mut log_prev = Tensor::full([b, n], -(n as f64).ln(), (Kind::Float, device));
        let (mut rows, at_label) = (Vec::with_capacity(self.logits.len()), labels.unsqueeze(1));
        for l in &self.logits {
            let log_p = l.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
            let label_kl = -log_p.gather(1, &at_label, false).sum(Kind::Float);
            let teacher_kl = (log_prev.exp() * (&log_prev - &log_p)).sum(Kind::Float);
            // On the logits, as early exit compares them.
            let correct = l.argmax(-1, false).eq_tensor(&labels).sum(Kind::Float);
            rows.push(Tensor::stack(&[correct, label_kl, teacher_kl], 0));
            log_prev = log_p;
        }
        let all = Tensor::stack(&rows, 0).f_to_kind(Kind::Double)?;
        let v = Vec::<f64>::try_from(all.f_to_device(Device::Cpu)?.flatten(0, -1))?;
        let col = |k: usize| v.chunks(3).map(|r| r[k]).collect::<Vec<f64>>();
        Ok(CascadeHealth {
            samples: b,
            correct: col(0).into_iter().map(|c| c as i64).collect(),
            label_kl: col(1),
            teacher_kl: col(2),
        })
    }
}

/// Whether a cascade behaves as SID says it should, summed over the samples seen: per module,
/// the correct predictions and the two terms of the local loss, `KL(p_y‖p_i)` (with a one-hot
/// `p_y`: the cross-entropy) and `KL(p_{i−1}‖p_i)` (`p_0` uniform). The paper's monotone-descent
/// proposition says module i should do no worse than module i−1 on `KL(p_y‖p)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CascadeHealth {
    /// Samples summed over.
    pub samples: i64,
    /// Correct predictions of each module.
    pub correct: Vec<i64>,
    /// Σ over samples of `KL(p_y‖p_i)`, each module.
    pub label_kl: Vec<f64>,
    /// Σ over samples of `KL(p_{i−1}‖p_i)`, each module.
    pub teacher_kl: Vec<f64>,
}

impl CascadeHealth {
    /// Adds another batch's sums.
    pub fn add(&mut self, other: &CascadeHealth) {
        if self.correct.is_empty() {
            *self = other.clone();
            return;
        }
        self.samples += other.samples;
        fn add<T: Copy + std::ops::AddAssign>(sums: &mut [T], more: &[T]) {
            sums.iter_mut().zip(more).for_each(|(x, y)| *x += *y);
        }
        add(&mut self.correct, &other.correct);
        add(&mut self.label_kl, &other.label_kl);
        add(&mut self.teacher_kl, &other.teacher_kl);
    }

    /// Each module's accuracy.
    pub fn accuracy(&self) -> Vec<f64> {
        self.mean(&self.correct.iter().map(|&c| c as f64).collect::<Vec<_>>())
    }

    /// Each module's mean `KL(p_y‖p_i)`.
    pub fn mean_label_kl(&self) -> Vec<f64> {
        self.mean(&self.label_kl)
    }

    /// Each module's mean `KL(p_{i−1}‖p_i)`.
    pub fn mean_teacher_kl(&self) -> Vec<f64> {
        self.mean(&self.teacher_kl)
    }

    fn mean(&self, sums: &[f64]) -> Vec<f64> {
        let n = self.samples.max(1) as f64;
        sums.iter().map(|s| s / n).collect()
    }
}

/// The first module (1-based) whose `KL(p_y‖p)` in `label_kl` (each module's, in order) is
/// higher than the module before it; `None`: monotone.
pub fn first_worse(label_kl: &[f64]) -> Option<usize> {
    label_kl.windows(2).position(|w| w[1] > w[0]).map(|i| i + 2)
}

/// A network the trainer can drive: SID on one device, SID across devices, or backprop.
pub trait Network: Send {
    /// Which method trains it.
    fn method(&self) -> Method;
    /// The device inputs should be on.
    fn input_device(&self) -> Device;
    /// One training step on a batch (`x` [B, C, H, W] float, `y` [B] int64).
    fn train_step(&mut self, x: &Tensor, y: &Tensor) -> Result<StepStats>;
    /// One training step that leaves its losses on the device, unread: nothing in it waits
    /// for the device, so a CUDA graph can capture it ([`crate::graph`]). Read the losses with
    /// [`Network::read_step`]. Networks that cannot run a step this way say so.
    fn train_step_queued(&mut self, _x: &Tensor, _y: &Tensor) -> Result<Tensor> {
        Err(crate::CoreError::Graph(format!(
            "a {} network of this kind cannot queue a whole step on one device",
            self.method()
        )))
    }
    /// The statistics of a step from the losses [`Network::train_step_queued`] returned (one
    /// wait for the device); a non-finite loss is an error naming it.
    fn read_step(&self, _losses: &Tensor) -> Result<StepStats> {
        Err(CoreError::Graph("this network cannot queue a step".into()))
    }
    /// Hands a training step to a pipelined network and returns the statistics of the steps
    /// that have finished since the last call, oldest first (perhaps none yet: a pipeline
    /// keeps several steps in flight). [`Network::flush`] waits for the rest. A network that
    /// is not pipelined runs the step at once.
    fn submit_step(&mut self, x: &Tensor, y: &Tensor) -> Result<Vec<StepStats>> {
        Ok(vec![self.train_step(x, y)?])
    }
    /// Waits for every submitted step and returns the statistics not yet returned.
    fn flush(&mut self) -> Result<Vec<StepStats>> {
        Ok(Vec::new())
    }
    /// The forward chain without gradient: every module's logits.
    fn cascade(&mut self, x: &Tensor) -> Result<Cascade>;
    /// Early-exit inference: each sample stops at the first module whose belief's top
    /// probability reaches `tau`. Networks that can skip the work after a sample's exit do;
    /// this default computes the whole cascade and picks the exits from it.
    fn cascade_exit(&mut self, x: &Tensor, tau: f64) -> Result<EarlyExit> {
        Ok(early_exit(&self.cascade(x)?.logits, tau))
    }
    /// Weights and optimizer state as named CPU tensors, for a checkpoint.
    fn state(&mut self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what [`Network::state`] returned.
    fn load_state(&mut self, named: &NamedTensors) -> Result<()>;
}

/// Named tensors looked up by name, with a clear error for a missing one.
#[derive(Debug, Default)]
pub struct NamedTensors(pub HashMap<String, Tensor>);

impl NamedTensors {
    /// The tensor called `name`, or a [`CoreError::StateMismatch`] naming it.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.0.get(name).ok_or_else(|| {
            CoreError::StateMismatch(format!("{name} is missing from the checkpoint"))
        })
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(String, Tensor)>> for NamedTensors {
    fn from(v: Vec<(String, Tensor)>) -> Self {
        Self(v.into_iter().collect())
    }
}

/// Copies every variable of `vs` from `named` (same names), checking shapes.
pub fn load_var_store(vs: &tch::nn::VarStore, named: &NamedTensors) -> Result<()> {
    for (name, mut var) in vs.variables() {
        crate::adam::copy_checked(&mut var, named.get(&name)?, &name)?;
    }
    Ok(())
}

/// Every variable of `vs` as named CPU tensors (copies, safe to keep).
pub fn var_store_state(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v = to_cpu(vs.variables().into_iter().collect());
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Turns an optimizer state into CPU copies.
pub fn to_cpu(v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let cpu = |(n, t): (String, Tensor)| (n, t.detach().to_device(Device::Cpu).copy());
    v.into_iter().map(cpu).collect()
}

/// Where each sample of a batch left the belief cascade (early exit).
#[derive(Debug)]
pub struct EarlyExit {
    /// The class predicted by the module each sample left at [B].
    pub prediction: Tensor,
    /// That module, 1-based [B].
    pub exit_module: Tensor,
    /// The top probability of that module's belief [B] (float): the confidence of the
    /// prediction.
    pub confidence: Tensor,
}

/// Early exit over a cascade computed part by part: records, for the samples still in it, the
/// first module whose belief's top probability reaches `tau` (the last module takes the rest),
/// and says which samples go on, so that the caller computes later parts for them only.
#[derive(Debug)]
pub struct ExitTracker {
    tau: f64,
    modules: usize,
    /// Original positions of the samples still in the cascade.
    remaining: Tensor,
    /// The exits recorded so far (the last module for the samples still in).
    exits: EarlyExit,
}

impl ExitTracker {
    /// A tracker for a batch of `batch` samples through `modules` modules, on `device`.
    pub fn new(batch: i64, modules: usize, tau: f64, device: Device) -> Self {
        let opts = (Kind::Int64, device);
        Self {
            tau,
            modules,
            remaining: Tensor::arange(batch, opts),
            exits: EarlyExit {
                prediction: Tensor::zeros([batch], opts),
                exit_module: Tensor::full([batch], modules as i64, opts),
                confidence: Tensor::zeros([batch], (Kind::Float, device)),
            },
        }
    }

    /// Takes the logits of consecutive modules (the first is module `first`, 0-based) for the
    /// samples still in the cascade. Returns which of them go on ([n] bool), or `None` when no
    /// sample is left.
    pub fn update(&mut self, logits: &[Tensor], first: usize) -> Option<Tensor> {
        let n = self.remaining.size()[0];
        let device = self.remaining.device();
        let mut going_on = Tensor::ones([n], (Kind::Bool, device));
        for (k, l) in logits.iter().enumerate() {
            let module = first + k;
            let (conf, class) = l.softmax(-1, Kind::Float).max_dim(-1, false);
            let leaves = if module + 1 == self.modules {
                going_on.shallow_clone()
            } else {
                conf.ge(self.tau).logical_and(&going_on)
            };
            let at = self.remaining.masked_select(&leaves);
            let put = |t: &mut Tensor, v: &Tensor| drop(t.index_put_(&[Some(&at)], v, false));
            let exit = Tensor::full_like(&at, module as i64 + 1);
            let confidence = conf.masked_select(&leaves).to_kind(Kind::Float);
            put(&mut self.exits.prediction, &class.masked_select(&leaves));
            put(&mut self.exits.exit_module, &exit);
            put(&mut self.exits.confidence, &confidence);
            going_on = going_on.logical_and(&leaves.logical_not());
        }
        self.remaining = self.remaining.masked_select(&going_on);
        (self.remaining.size()[0] > 0).then_some(going_on)
    }

    /// The result.
    pub fn finish(self) -> EarlyExit {
        self.exits
    }
}

/// Early exit from a whole cascade's logits (every module computed for every sample).
pub fn early_exit(logits: &[Tensor], tau: f64) -> EarlyExit {
    let b = logits.first().map(|l| l.size()[0]).unwrap_or(0);
    let device = logits.first().map(|l| l.device()).unwrap_or(Device::Cpu);
    let mut t = ExitTracker::new(b, logits.len(), tau, device);
    t.update(logits, 0);
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cascade_health_is_the_local_loss_terms_by_hand() {
        // One sample of class 0; module 1 believes [0.5, 0.5], module 2 [0.75, 0.25].
        let l1 = Tensor::from_slice(&[0.0f32, 0.0]).reshape([1, 2]);
        let l2 = Tensor::from_slice(&[3f32.ln(), 0.0]).reshape([1, 2]);
        let y = Tensor::from_slice(&[0i64]);
        let h = Cascade {
            logits: vec![l1.shallow_clone(), l2.shallow_clone()],
        }
        .health(&y)
        .unwrap();
        let want_label = [2f64.ln(), -(0.75f64.ln())];
        let want_teacher = [0.0, 0.5 * (4.0f64 / 3.0).ln()];
        for i in 0..2 {
            assert!((h.label_kl[i] - want_label[i]).abs() < 1e-6, "{h:?}");
            assert!((h.teacher_kl[i] - want_teacher[i]).abs() < 1e-6, "{h:?}");
        }
        assert_eq!((h.samples, h.correct.clone()), (1, vec![1, 1]));
        assert_eq!(first_worse(&h.mean_label_kl()), None);
        // The other order gets worse at module 2; sums add up over batches.
        let mut worse = Cascade {
            logits: vec![l2, l1],
        }
        .health(&y)
        .unwrap();
        assert_eq!(first_worse(&worse.mean_label_kl()), Some(2));
        worse.add(&worse.clone());
        assert_eq!(worse.samples, 2);
        assert!((worse.mean_label_kl()[1] - 2f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn each_sample_leaves_at_its_first_confident_module() {
        // Three samples, three modules, two classes; confidences by hand.
        let logit = |p: f64| (p / (1.0 - p)).ln(); // softmax([x, 0]) gives p for class 0
        let m = |ps: [f64; 3]| {
            Tensor::from_slice(&ps.map(|p| [logit(p) as f32, 0.0]).concat()).reshape([3, 2])
        };
        let logits = [
            m([0.95, 0.6, 0.3]),
            m([0.99, 0.97, 0.2]),
            m([0.5, 0.5, 0.6]),
        ];
        let e = early_exit(&logits, 0.9);
        assert_eq!(Vec::<i64>::try_from(&e.exit_module).unwrap(), [1, 2, 3]);
        // Sample 3 reaches no confidence of 0.9: the last module's class (0 at 0.6).
        assert_eq!(Vec::<i64>::try_from(&e.prediction).unwrap(), [0, 0, 0]);
        let conf = Vec::<f32>::try_from(&e.confidence).unwrap();
        for (c, want) in conf.iter().zip([0.95, 0.97, 0.6]) {
            assert!((f64::from(*c) - want).abs() < 1e-6, "{conf:?}");
        }
        let all = early_exit(&logits, 1.1);
        assert_eq!(Vec::<i64>::try_from(&all.exit_module).unwrap(), [3, 3, 3]);
        // Part by part gives the same as the whole.
        let mut t = ExitTracker::new(3, 3, 0.9, Device::Cpu);
        let on = t.update(&logits[..1], 0).unwrap();
        assert_eq!(Vec::<bool>::try_from(&on).unwrap(), [false, true, true]);
        let rest: Vec<Tensor> = logits[1..]
            .iter()
            .map(|l| l.index_select(0, &Tensor::from_slice(&[1i64, 2])))
            .collect();
        assert!(t.update(&rest, 1).is_none());
        assert_eq!(
            Vec::<i64>::try_from(&t.finish().exit_module).unwrap(),
            [1, 2, 3]
        );
    }
}
