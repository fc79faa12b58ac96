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
        self.logits
            .last()
            .expect("a cascade has at least one module")
            .argmax(-1, false)
    }

    /// Every module's belief `p_i = softmax(logits_i)`.
    pub fn beliefs(&self) -> Vec<Tensor> {
        self.logits
            .iter()
            .map(|l| l.softmax(-1, Kind::Float))
            .collect()
    }

    /// Number of correct predictions of each module against `labels`, on the CPU.
    pub fn correct_per_module(&self, labels: &Tensor) -> Vec<i64> {
        self.logits
            .iter()
            .map(|l| {
                let labels = labels.to_device(l.device());
                l.argmax(-1, false)
                    .eq_tensor(&labels)
                    .sum(Kind::Int64)
                    .int64_value(&[])
            })
            .collect()
    }
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
        Err(crate::CoreError::Graph(
            "this network cannot queue a step".into(),
        ))
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
    v.into_iter()
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).copy()))
        .collect()
}
