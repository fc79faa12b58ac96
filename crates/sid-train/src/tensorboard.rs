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

/// An open event file and where the run is.
pub struct TensorBoard {
    writer: tboard::EventWriter<std::fs::File>,
    lr: f64,
    /// Global steps before the current epoch.
    base: i64,
    /// Steps per epoch (from the epoch's start).
    steps: i64,
}

/// A writer's error, as an I/O error on `path`.
fn tb_error(path: &Path, e: tboard::Error) -> TrainError {
    TrainError::io(path, std::io::Error::other(format!("TensorBoard: {e}")))
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

    fn scalar(&mut self, step: i64, tag: &str, value: f64) -> Result<()> {
        let written = self.writer.write_scalar(step, tag, value as f32);
        written.map_err(|e| self.error(e))
    }

    /// A writer's error, on the event file.
    fn error(&self, e: tboard::Error) -> TrainError {
        let file = self.writer.filename();
        tb_error(file.map_or(Path::new(""), |p| p.as_path()), e)
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
                self.scalar(at, "train/step_loss", *loss)?;
            }
            Event::EpochEnd(m) => self.epoch_end(m)?,
            Event::Loaded { .. } | Event::Notice(_) => {}
        }
        Ok(())
    }

    fn epoch_end(&mut self, m: &EpochMetrics) -> Result<()> {
        // An epoch's last step; `EpochStart` gave the steps per epoch.
        let at = (m.epoch as i64) * self.steps.max(1);
        // The tags of `metrics.jsonl`'s fields (1-based modules), and the learning rate.
        self.scalar(at, "train/loss", m.train_loss)?;
        for (i, l) in m.module_train_loss.iter().enumerate() {
            self.scalar(at, &format!("train/module_{}_loss", i + 1), *l)?;
        }
        self.scalar(at, "test/accuracy", m.test_acc)?;
        for (i, a) in m.module_test_acc.iter().enumerate() {
            self.scalar(at, &format!("test/module_{}_accuracy", i + 1), *a)?;
        }
        if let Some(v) = m.val_acc {
            self.scalar(at, "val/accuracy", v)?;
        }
        self.scalar(at, "speed/samples_per_second", m.samples_per_second)?;
        self.scalar(at, "speed/median_step_ms", m.median_step_ms)?;
        for p in &m.peak_memory {
            // `:` is not a tag character.
            let tag = format!("memory/{}_peak_mib", p.device.replace(':', "_"));
            self.scalar(at, &tag, p.bytes as f64 / (1 << 20) as f64)?;
        }
        self.scalar(at, "optim/learning_rate", self.lr)?;
        self.writer.flush().map_err(|e| self.error(e))
    }
}
