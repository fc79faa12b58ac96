//! Progress display: a bar on a terminal, plain log lines otherwise.

use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use sid_train::{EpochMetrics, Event};

/// The bar of an epoch.
const BAR: &str = "{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}";

/// Turns training events into what the user sees on stderr.
pub struct Reporter {
    bar: Option<ProgressBar>,
    batch_size: i64,
    steps: usize,
    epoch: usize,
    epochs: usize,
    started: std::time::Instant,
    first_step: usize,
    /// `--log-steps`: each step's loss, one JSON line, appended.
    step_log: Option<File>,
}

impl Reporter {
    /// A reporter for batches of `batch_size`; a bar only while stderr is a terminal. With
    /// `step_log` (`--log-steps`), each step's loss is also appended to that file.
    pub fn new(batch_size: i64, step_log: Option<&Path>) -> std::io::Result<Self> {
        let append = |path| File::options().create(true).append(true).open(path);
        Ok(Self {
            bar: None,
            batch_size,
            steps: 0,
            epoch: 0,
            epochs: 0,
            started: std::time::Instant::now(),
            first_step: 0,
            step_log: step_log.map(append).transpose()?,
        })
    }

    /// Handles one event.
    pub fn on_event(&mut self, event: Event<'_>) {
        match event {
            Event::Loaded {
                train,
                val,
                test,
                noisy_labels,
            } => {
                let val = val.map(|v| format!(", {v} validation")).unwrap_or_default();
                let noise = match noisy_labels {
                    0 => String::new(),
                    n => format!(", {n} noisy labels"),
                };
                eprintln!("data: {train} training{val}, {test} test samples{noise}");
            }
            Event::EpochStart {
                epoch,
                epochs,
                steps,
                first_step,
            } => {
                (self.epoch, self.epochs, self.steps, self.first_step) =
                    (epoch, epochs, steps, first_step);
                self.started = std::time::Instant::now();
                if first_step > 0 {
                    eprintln!("epoch {epoch}/{epochs}: resuming at step {first_step}/{steps}");
                }
                if std::io::stderr().is_terminal() {
                    let style = ProgressStyle::with_template(BAR).expect("valid template");
                    let bar = ProgressBar::new(steps as u64)
                        .with_position(first_step as u64)
                        .with_style(style.progress_chars("=> "))
                        .with_prefix(format!("epoch {epoch}/{epochs}"));
                    bar.reset_eta();
                    self.bar = Some(bar);
                }
            }
            Event::Step { step, loss } => {
                if let Some(f) = &mut self.step_log {
                    use std::io::Write;
                    let line = serde_json::json!({"epoch": self.epoch, "step": step, "loss": loss});
                    // A lost line of a log must not stop training; the next step tries again.
                    let _ = writeln!(f, "{line}");
                }
                let done = (step - self.first_step) as f64 * self.batch_size as f64;
                let rate = done / self.started.elapsed().as_secs_f64().max(1e-9);
                if let Some(bar) = &self.bar {
                    bar.set_position(step as u64);
                    bar.set_message(format!("loss {loss:.4} {rate:.0} samples/s"));
                } else if step == self.steps
                    || (step * 10 / self.steps.max(1)) != ((step - 1) * 10 / self.steps.max(1))
                {
                    eprintln!(
                        "epoch {}/{} step {step}/{} loss {loss:.4} {rate:.0} samples/s",
                        self.epoch, self.epochs, self.steps
                    );
                }
            }
            Event::Notice(msg) => match &self.bar {
                Some(bar) => bar.println(format!("note: {msg}")),
                None => eprintln!("note: {msg}"),
            },
            Event::EpochEnd(m) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("{}", epoch_line(m, self.epochs));
            }
        }
    }
}

/// One line per epoch: loss, accuracies (final module and the whole cascade), time.
pub fn epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    let modules: Vec<String> = m
        .module_test_acc
        .iter()
        .map(|a| format!("{:.2}", a * 100.0))
        .collect();
    let val = m
        .val_acc
        .map(|v| format!(" val_acc {:.2}%", v * 100.0))
        .unwrap_or_default();
    format!(
        "epoch {}/{epochs} train_loss {:.4} test_acc {:.2}%{val} modules [{}] {:.1}s {:.0} samples/s{}",
        m.epoch,
        m.train_loss,
        m.test_acc * 100.0,
        modules.join(" "),
        m.epoch_seconds,
        m.samples_per_second,
        cascade_verdict(&m.module_test_label_kl)
    )
}

/// Whether each module does no worse than the one before it on `KL(p_y‖p)` (test set): the
/// paper's monotone descent, checked live.
pub fn cascade_verdict(label_kl: &[f64]) -> String {
    match sid_core::network::first_worse(label_kl) {
        _ if label_kl.len() < 2 => String::new(),
        None => " cascade monotone ✓".into(),
        Some(i) => format!(
            " cascade: module {i} worse than {} on KL(p_y‖p) ({:.3} > {:.3})",
            i - 1,
            label_kl[i - 1],
            label_kl[i - 2]
        ),
    }
}

/// `n` with thousands separators: 11,689,512.
fn grouped(n: i64) -> String {
    // Parameter counts are never negative.
    indicatif::HumanCount(n.unsigned_abs()).to_string()
}

/// The model's trainable parameter counts, printed at start.
pub fn params_line(model: &sid_core::ModelConfig) -> String {
    let c = sid_core::extractor::ParamCounts::of(model);
    format!(
        "parameters: {} in the {} extractor, {} in {} belief modules, {} in all",
        grouped(c.extractor),
        model.extractor,
        grouped(c.modules),
        model.modules,
        grouped(c.total())
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(super::grouped(11_689_512), "11,689,512");
        assert_eq!(super::grouped(512), "512");
        assert_eq!(super::grouped(1000), "1,000");
    }
}
