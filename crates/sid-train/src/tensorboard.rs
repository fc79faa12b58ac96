//! TensorBoard event files of a run (`--tensorboard DIR`), written from the run's
//! [`Event`]s as they come: each step's training loss, and at each epoch's end what
//! `metrics.jsonl` records for it (the train loss, every module's test accuracy, samples per
//! second, peak memory) and the learning rate.
//!
//! Written with the `tboard` crate (the tch author's): a small TFRecord/protobuf writer
//! with nothing else attached. Every scalar's step is the run's global training step, so the
//! curves of one run share their x axis; an epoch's scalars sit at its last step.

use std::path::Path;

use crate::metrics::EpochMetrics;
use crate::trainer::Event;
use crate::{Result, TrainError};

/// Tag of each step's training loss.
pub const STEP_LOSS: &str = "train/step_loss";
/// Tag of an epoch's mean training loss (`metrics.jsonl`'s `train_loss`).
pub const EPOCH_LOSS: &str = "train/loss";
/// Tag of the final module's test accuracy (`test_acc`).
pub const TEST_ACC: &str = "test/accuracy";
/// Tag of the validation accuracy (`val_acc`), when a validation split is held out.
pub const VAL_ACC: &str = "val/accuracy";
/// Tag of the training throughput (`samples_per_second`).
pub const SAMPLES_PER_SECOND: &str = "speed/samples_per_second";
/// Tag of the median step time (`median_step_ms`).
pub const STEP_MS: &str = "speed/median_step_ms";
/// Tag of the learning rate.
pub const LEARNING_RATE: &str = "optim/learning_rate";

/// Tag of module `i`'s (1-based) test accuracy (`module_test_acc[i-1]`).
pub fn module_acc_tag(i: usize) -> String {
    format!("test/module_{i}_accuracy")
}

/// Tag of module `i`'s (1-based) mean local loss (`module_train_loss[i-1]`).
pub fn module_loss_tag(i: usize) -> String {
    format!("train/module_{i}_loss")
}

/// Tag of a device's peak memory in MiB (`peak_memory`); `:` is not a tag character.
pub fn memory_tag(device: &str) -> String {
    format!("memory/{}_peak_mib", device.replace(':', "_"))
}

/// An open event file and where the run is.
pub struct TensorBoard {
    writer: tboard::EventWriter<std::fs::File>,
    lr: f64,
    /// Global steps before the current epoch.
    base: i64,
    /// Steps per epoch (from the epoch's start).
    steps: i64,
}

fn tb_error(dir: &Path, e: tboard::Error) -> TrainError {
    TrainError::io(dir, std::io::Error::other(format!("TensorBoard: {e}")))
}

impl TensorBoard {
    /// A new event file in `dir` (created if missing) for a run at learning rate `lr`.
    pub fn create(dir: &Path, lr: f64) -> Result<Self> {
        let writer = tboard::EventWriter::create(dir).map_err(|e| tb_error(dir, e))?;
        Ok(Self {
            writer,
            lr,
            base: 0,
            steps: 0,
        })
    }

    /// The event file's path.
    pub fn file(&self) -> Option<&Path> {
        self.writer.filename().map(|p| p.as_path())
    }

    fn scalar(&mut self, step: i64, tag: &str, value: f64) -> Result<()> {
        let dir = self.file().map(Path::to_path_buf).unwrap_or_default();
        self.writer
            .write_scalar(step, tag, value as f32)
            .map_err(|e| tb_error(&dir, e))
    }

    /// Records what `event` reports.
    pub fn on_event(&mut self, event: &Event<'_>) -> Result<()> {
        match event {
            Event::EpochStart { epoch, steps, .. } => {
                self.steps = *steps as i64;
                self.base = (*epoch as i64 - 1) * self.steps;
            }
            Event::Step { step, loss } => {
                let at = self.base + *step as i64;
                self.scalar(at, STEP_LOSS, *loss)?;
            }
            Event::EpochEnd(m) => self.epoch_end(m)?,
            Event::Loaded { .. } | Event::Notice(_) => {}
        }
        Ok(())
    }

    fn epoch_end(&mut self, m: &EpochMetrics) -> Result<()> {
        // An epoch's last step; `EpochStart` gave the steps per epoch.
        let at = (m.epoch as i64) * self.steps.max(1);
        self.scalar(at, EPOCH_LOSS, m.train_loss)?;
        for (i, l) in m.module_train_loss.iter().enumerate() {
            self.scalar(at, &module_loss_tag(i + 1), *l)?;
        }
        self.scalar(at, TEST_ACC, m.test_acc)?;
        for (i, a) in m.module_test_acc.iter().enumerate() {
            self.scalar(at, &module_acc_tag(i + 1), *a)?;
        }
        if let Some(v) = m.val_acc {
            self.scalar(at, VAL_ACC, v)?;
        }
        self.scalar(at, SAMPLES_PER_SECOND, m.samples_per_second)?;
        self.scalar(at, STEP_MS, m.median_step_ms)?;
        for p in &m.peak_memory {
            self.scalar(
                at,
                &memory_tag(&p.device),
                p.bytes as f64 / (1 << 20) as f64,
            )?;
        }
        self.scalar(at, LEARNING_RATE, self.lr)?;
        let dir = self.file().map(Path::to_path_buf).unwrap_or_default();
        self.writer.flush().map_err(|e| tb_error(&dir, e))
    }
}
