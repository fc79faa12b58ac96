//! The epoch loop: data feed, steps, evaluation, metrics, checkpoints, stop requests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use sid_core::{Method, Network};
use sid_data::{Dataset, LoadOptions, Split};
use tch::Device;

use crate::checkpoint::{self, Position, CHECKPOINT_FILE};
use crate::config::{flag_of, resume_may_change_flags, RunConfig};
use crate::distributed::Rendezvous;
use crate::metrics::{self, EpochMetrics};
use crate::network::build_network;
use crate::plan::{Graphs, Layout, Plan};
use crate::{Result, TrainError};

pub use crate::checkpoint::{CONFIG_FILE, INPUT_FILE, METRICS_FILE, PLAN_FILE, SUMMARY_FILE};

/// Progress reported to the caller while a run trains; the library itself prints nothing.
#[derive(Debug)]
pub enum Event<'a> {
    /// Data is loaded.
    Loaded {
        /// Training samples.
        train: i64,
        /// Validation samples, if held out.
        val: Option<i64>,
        /// Test samples.
        test: i64,
        /// Training labels flipped by `label_noise`.
        noisy_labels: usize,
    },
    /// An epoch begins (or resumes at `first_step`).
    EpochStart {
        /// 1-based epoch.
        epoch: usize,
        /// Epochs in the run.
        epochs: usize,
        /// Steps in the epoch.
        steps: usize,
        /// Steps already done (after a resume).
        first_step: usize,
    },
    /// A training step finished.
    Step {
        /// 1-based number of steps done in this epoch.
        step: usize,
        /// The step's loss.
        loss: f64,
    },
    /// The epoch's evaluation and metrics are done.
    EpochEnd(&'a EpochMetrics),
    /// Something the user should know that does not stop the run.
    Notice(String),
}

/// The outcome of a finished run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Method trained.
    pub method: Method,
    /// Epochs trained.
    pub epochs: usize,
    /// Test accuracy of the final module after the final epoch: the headline result.
    pub final_test_acc: f64,
    /// Every module's test accuracy after the final epoch.
    pub final_module_test_acc: Vec<f64>,
    /// The best epoch, chosen by validation accuracy when a validation split exists,
    /// otherwise by test accuracy (then it is selection on the test set: for reference only).
    pub best_epoch: usize,
    /// The test accuracy at that epoch.
    pub best_epoch_test_acc: f64,
    /// `"validation"` or `"test"`: what chose the best epoch.
    pub best_epoch_chosen_by: String,
    /// Mean seconds of training per epoch.
    pub mean_epoch_seconds: f64,
    /// Highest per-epoch peak memory of each device over the run.
    pub peak_memory: Vec<sid_telemetry::DevicePeak>,
}

/// A training run bound to a run directory.
pub struct Run {
    cfg: RunConfig,
    dir: PathBuf,
    data: Dataset,
    /// The network: a stage pipeline in every layout.
    net: sid_runtime::StagedPipeline,
    plan: Plan,
    position: Position,
    /// Notices found while opening the run, handed to the first `train` call's events.
    notices: Vec<String>,
    /// The checkpoint being written in the background, if one is.
    saving: Option<std::thread::JoinHandle<Result<()>>>,
}

/// On a GPU the data set lives on the input device (Fashion-MNIST and CIFAR take well under a
/// GiB): batches are gathered there instead of on the CPU and copied every step.
pub(crate) fn data_on_input_device(data: Dataset, net: &dyn Network) -> Dataset {
    match net.input_device() {
        d @ Device::Cuda(_) => data.to_device(d),
        _ => data,
    }
}

pub(crate) fn load_data(cfg: &RunConfig) -> Result<Dataset> {
    let opts = LoadOptions {
        limit_train: cfg.data.limit_train,
        limit_test: cfg.data.limit_test,
        val_split: cfg.data.val_split,
        label_noise: cfg.data.label_noise,
        seed: cfg.optim.seed,
        image_size: cfg.data.image_size,
        cache_dir: cfg.data.cache_dir.clone(),
    };
    // The data folder: the one given, or the data set's default.
    let dir = cfg.data.data_dir.clone();
    let dir = dir.unwrap_or_else(|| cfg.data.dataset.default_dir());
    Ok(sid_data::load(cfg.data.dataset, &dir, &opts)?)
}

impl Run {
    /// Starts a new run in `dir`, which must not already hold one. Writes `config.toml`. With
    /// `rdv`, as rank 0 of a multi-process run (see [`crate::distributed`]).
    pub fn create_on(cfg: RunConfig, dir: &Path, rdv: Option<&Rendezvous>) -> Result<Self> {
        cfg.validate()?;
        if dir.join(CHECKPOINT_FILE).exists() || dir.join(METRICS_FILE).exists() {
            return Err(TrainError::Config(format!(
                "run directory {} already holds a run; continue it with --resume {0} or choose another --run-dir",
                dir.display()
            )));
        }
        let position = Position::start(cfg.optim.method, cfg.optim.seed);
        Self::open(cfg, dir, rdv, position, |cfg, net| {
            let init = crate::interop::init_from(cfg, net)?;
            cfg.data.augment = Some(cfg.resolved_augment());
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
            Ok(init.into_iter().collect())
        })
    }

    /// What creating and resuming a run share: the devices, the data, the plan, the network
    /// built on them, `start` (which readies the network and returns the notices for the first
    /// `train` call), and the resolved settings saved.
    fn open(
        mut cfg: RunConfig,
        dir: &Path,
        rdv: Option<&Rendezvous>,
        position: Position,
        start: impl FnOnce(&mut RunConfig, &mut dyn Network) -> Result<Vec<String>>,
    ) -> Result<Self> {
        let devices = cfg.runtime.gpus.resolve()?;
        let data = load_data(&cfg)?;
        cfg.data.loaded_shape = Some(data.spec.shape);
        // Under ranks, this process's device.
        let on = rdv.map_or(devices, |r| vec![r.device()]);
        let plan = Plan::resolve(&cfg, &on, rdv.is_some(), true)?;
        // Save what was resolved, not what was left to defaults; the other ranks, which build
        // the same stages from it, wait for it before they link to this one.
        cfg.runtime.placement = plan.placement();
        cfg.runtime.micro_batches = Some(plan.micro_batches);
        if let Some(rdv) = rdv {
            rdv.publish_config(&cfg)?;
        }
        let mut net = build_network(&cfg, &plan, rdv)?;
        let data = data_on_input_device(data, &net);
        let notices = start(&mut cfg, &mut net)?;
        checkpoint::write_atomic(&dir.join(CONFIG_FILE), cfg.to_toml().as_bytes())?;
        checkpoint::write_atomic(&dir.join(PLAN_FILE), plan.to_toml().as_bytes())?;
        // Runs from before input.json get one on resume.
        let spec = serde_json::to_string_pretty(&data.spec).expect("an input spec serialises");
        checkpoint::write_atomic(&dir.join(INPUT_FILE), spec.as_bytes())?;
        Ok(Self {
            cfg,
            dir: dir.into(),
            data,
            net,
            plan,
            position,
            notices,
            saving: None,
        })
    }

    /// Reads the config saved in a run directory.
    pub fn saved_config(dir: &Path) -> Result<RunConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        RunConfig::from_toml(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    /// Continues the run in `dir` from its checkpoint with `cfg` (normally the saved config,
    /// perhaps with more epochs); settings that shape the model or the data must not change.
    /// `rdv`: this process is rank 0 of a multi-process run (see [`crate::distributed`]), and
    /// the checkpoint may come from a run with any other number of ranks.
    pub fn resume_on(cfg: RunConfig, dir: &Path, rdv: Option<&Rendezvous>) -> Result<Self> {
        cfg.validate()?;
        let conflicts = cfg.resume_conflicts(&Self::saved_config(dir)?);
        let changed: Vec<String> = conflicts.iter().map(|k| flag_of(k)).collect();
        if !changed.is_empty() {
            return Err(TrainError::Config(format!(
                "--resume {}: {} differ from the saved config.toml; only {} may change",
                dir.display(),
                changed.join(", "),
                resume_may_change_flags()
            )));
        }
        // The newest checkpoint that loads: an older one kept by --keep-checkpoints when the
        // newest is damaged (cut short by a full disk or a crash outside our atomic writes).
        let newest = checkpoint::load_newest(dir)?;
        let (named, position, ckpt_path) = (newest.tensors, newest.position, newest.path);
        let mut notices = Vec::new();
        if !newest.skipped.is_empty() {
            let (used, skipped) = (ckpt_path.display(), newest.skipped.join("; "));
            notices.push(format!(
                "warning: resuming from {used}, the newest checkpoint that loads, instead of: {skipped}"
            ));
        }
        if position.method != cfg.optim.method || position.seed != cfg.optim.seed {
            return Err(TrainError::checkpoint(
                ckpt_path,
                "it was written by a different method or seed than config.toml says",
            ));
        }
        let epochs_done = position.epochs_done;
        Self::open(cfg, dir, rdv, position, |_, net| {
            net.load_state(&named)
                .map_err(|e| TrainError::checkpoint(ckpt_path, e))?;
            let kept = metrics::truncate_to(&dir.join(METRICS_FILE), epochs_done)?;
            notices.extend(kept.dropped_last_line);
            Ok(notices)
        })
    }

    /// Each stage (and replica) of a pipeline, described for the user.
    pub fn stage_notes(&self) -> Vec<String> {
        let Layout::Stages { cut, .. } = &self.plan.layout else {
            return Vec::new();
        };
        // Without ranks a plan has one replica.
        let slots = cut.len() * self.plan.replicas;
        (0..slots).map(|s| self.net.describe(s)).collect()
    }

    /// The run's resolved plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The resolved config.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// The devices in use.
    pub fn devices(&self) -> &[Device] {
        self.cfg.runtime.gpus.devices()
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Epochs already completed (non-zero after a resume).
    pub fn epochs_done(&self) -> usize {
        self.position.epochs_done
    }

    /// Books finished steps: each one's losses, its time (since the previous one finished: with
    /// steps in flight that is the pipeline's pace; the epoch's training time is their sum), the
    /// position.
    fn record(
        &mut self,
        finished: Vec<sid_core::StepStats>,
        last_done: &mut Instant,
        on_event: &mut dyn FnMut(Event<'_>),
    ) {
        for stats in finished {
            let p = &mut self.position.partial;
            let seconds = last_done.elapsed().as_secs_f64();
            *last_done = Instant::now();
            p.step_ms.push(seconds * 1e3);
            p.seconds += seconds;
            p.loss_sum += stats.loss;
            let modules = p.module_loss_sums.len().max(stats.module_losses.len());
            p.module_loss_sums.resize(modules, 0.0);
            for (s, l) in p.module_loss_sums.iter_mut().zip(&stats.module_losses) {
                *s += l;
            }
            self.position.step_in_epoch += 1;
            self.position.global_step += 1;
            on_event(Event::Step {
                step: self.position.step_in_epoch,
                loss: stats.loss,
            });
        }
    }

    /// Starts writing the checkpoint: the state is copied to host memory here, at the step
    /// boundary, and a thread of its own writes it (atomically) while training goes on. A save
    /// still writing is waited for first, never overlapped; with `--keep-checkpoints K` the
    /// checkpoint it replaces stays under its position's name and only the K − 1 newest stay.
    fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.wait_for_save()?;
        let path = self.dir.join(CHECKPOINT_FILE);
        let state = self.net.state()?;
        let (dir, position) = (self.dir.clone(), self.position.clone());
        let keep = self.cfg.runtime.keep_checkpoints;
        let writer = std::thread::Builder::new()
            .name("sid-checkpoint".into())
            .spawn(move || {
                if keep > 1 {
                    checkpoint::keep_previous(&dir, keep - 1)?;
                }
                checkpoint::save(&dir.join(CHECKPOINT_FILE), &state, &position)
            })
            .map_err(|e| TrainError::io(&path, e))?;
        self.saving = Some(writer);
        Ok(path)
    }

    /// Waits for the checkpoint being written, if any, and returns its outcome.
    fn wait_for_save(&mut self) -> Result<()> {
        self.saving.take().map_or(Ok(()), |writer| {
            writer.join().unwrap_or_else(|_| {
                Err(TrainError::Config("the checkpoint writer panicked".into()))
            })
        })
    }

    /// Trains until `cfg.optim.epochs` are done or `stop` is set (then a checkpoint is written and
    /// [`TrainError::Interrupted`] returned). Every epoch appends to `metrics.jsonl` and
    /// rewrites the checkpoint.
    pub fn train(
        &mut self,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Summary> {
        let trained = self.train_epochs(stop, on_event);
        // Whatever ended the run, the checkpoint being written is complete before it returns.
        let saved = self.wait_for_save();
        trained.and_then(|summary| saved.map(|()| summary))
    }

    fn train_epochs(
        &mut self,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Summary> {
        for notice in self.notices.drain(..) {
            on_event(Event::Notice(notice));
        }
        on_event(Event::Loaded {
            train: self.data.train.len(),
            val: self.data.val.as_ref().map(|v| v.len()),
            test: self.data.test.len(),
            noisy_labels: self.data.noisy_labels,
        });
        if let Some(folder) = &self.data.folder {
            let s = self.data.spec.shape;
            let (n, c, side) = (s.num_classes, s.channels, s.image_size);
            let notice = format!("{n} classes, {c}x{side}x{side} images; {folder}");
            on_event(Event::Notice(notice));
        }
        let n = self.data.train.len();
        let steps = sid_data::num_batches(n, self.cfg.optim.batch_size) as usize;
        let device = self.net.input_device();
        let augment = self.cfg.resolved_augment();
        let (batch_size, seed) = (self.cfg.optim.batch_size, self.cfg.optim.seed);
        let checkpoint_every = self.cfg.runtime.checkpoint_every;
        let mut tracked: Vec<Device> = vec![device];
        tracked.extend(self.net.layout().iter().map(|(d, _)| *d));
        let peaks = sid_telemetry::PeakTracker::new(&tracked);
        let mut stepper = match self.plan.graphs == Graphs::WholeStep {
            true => sid_core::graph::GraphedStep::new(device)?,
            false => sid_core::graph::GraphedStep::off(),
        };
        while self.position.epochs_done < self.cfg.optim.epochs {
            let epoch = self.position.epochs_done + 1;
            let first_step = self.position.step_in_epoch;
            on_event(Event::EpochStart {
                epoch,
                epochs: self.cfg.optim.epochs,
                steps,
                first_step,
            });
            let perm = sid_data::epoch_permutation(n, seed, epoch as u64);
            peaks.start();
            let mut last_done = Instant::now();
            for step in first_step..steps {
                let batch_span = tracing::debug_span!("batch").entered();
                let (x, y) =
                    sid_data::batch(&self.data.train, Some(&perm), batch_size, step as i64);
                let x = match augment {
                    true => sid_data::augment_batch(&x, 4, seed, epoch as u64, step as u64),
                    false => x,
                };
                drop(batch_span);
                let (x, y) = (x.to_device(device), y.to_device(device));
                // A pipelined network hands back the steps that have finished, perhaps none
                // yet; every other network finishes this one.
                let finished = if stepper.is_off() {
                    self.net.submit_step(&x, &y)?
                } else {
                    vec![stepper.network(&mut self.net, &x, &y, |n| {
                        on_event(Event::Notice(n.to_string()))
                    })?]
                };
                self.record(finished, &mut last_done, on_event);
                let stopping = stop.load(Ordering::SeqCst);
                let due = checkpoint_every.is_some_and(|n| (step + 1) % n == 0);
                if (stopping || due) && step + 1 < steps {
                    let flushed = self.net.flush()?;
                    self.record(flushed, &mut last_done, on_event);
                    let checkpoint = self.save_checkpoint()?;
                    if stopping {
                        return Err(TrainError::Interrupted {
                            epoch,
                            step: step + 1,
                            checkpoint,
                        });
                    }
                }
            }
            // The pipeline's last steps (its fill is paid once an epoch, here).
            let flushed = self.net.flush()?;
            self.record(flushed, &mut last_done, on_event);
            let peak_memory = peaks.finish();
            let p = std::mem::take(&mut self.position.partial);
            let eval_start = Instant::now();
            let eval_batch = self.cfg.runtime.eval_batch_size;
            let net: &mut dyn Network = &mut self.net;
            let health = cascade_health(net, &self.data.test, eval_batch)?;
            let module_test_acc = health.accuracy();
            let val = self.data.val.as_ref();
            let val = val.map(|v| cascade_health(net, v, eval_batch));
            let val_acc = val.transpose()?.and_then(|h| h.accuracy().last().copied());
            let per_step = |sum: &f64| sum / steps as f64;
            let m = EpochMetrics {
                epoch,
                train_loss: per_step(&p.loss_sum),
                module_train_loss: p.module_loss_sums.iter().map(per_step).collect(),
                test_acc: module_test_acc.last().copied().unwrap_or(0.0),
                module_test_acc,
                module_test_label_kl: health.mean_label_kl(),
                module_test_teacher_kl: health.mean_teacher_kl(),
                val_acc,
                epoch_seconds: p.seconds,
                eval_seconds: eval_start.elapsed().as_secs_f64(),
                samples_per_second: n as f64 / p.seconds.max(1e-9),
                median_step_ms: metrics::median(&p.step_ms),
                peak_memory,
            };
            metrics::append(&self.dir.join(METRICS_FILE), &m)?;
            self.position.epochs_done = epoch;
            self.position.step_in_epoch = 0;
            let checkpoint = self.save_checkpoint()?;
            on_event(Event::EpochEnd(&m));
            if stop.load(Ordering::SeqCst) && epoch < self.cfg.optim.epochs {
                return Err(TrainError::Interrupted {
                    epoch,
                    step: steps,
                    checkpoint,
                });
            }
        }
        let recorded = metrics::read_all(&self.dir.join(METRICS_FILE))?;
        if let Some(notice) = recorded.dropped_last_line {
            on_event(Event::Notice(notice));
        }
        let summary = summarize(self.cfg.optim.method, &recorded.records)?;
        let text = serde_json::to_string_pretty(&summary).expect("summary serialises");
        checkpoint::write_atomic(&self.dir.join(SUMMARY_FILE), text.as_bytes())?;
        Ok(summary)
    }
}

/// The cascade's health on `split` ([`sid_core::CascadeHealth`]: every module's accuracy and
/// both terms of its local loss), from one inference pass.
pub fn cascade_health(
    net: &mut dyn Network,
    split: &Split,
    batch_size: i64,
) -> Result<sid_core::CascadeHealth> {
    let _span = tracing::debug_span!("evaluate").entered();
    let device = net.input_device();
    let mut health = sid_core::CascadeHealth::default();
    for b in 0..sid_data::num_batches(split.len(), batch_size) {
        let (x, y) = sid_data::batch(split, None, batch_size, b);
        health.add(&net.cascade(&x.to_device(device))?.health(&y)?);
    }
    Ok(health)
}

/// The end-of-run summary from the metrics of every epoch.
pub fn summarize(method: Method, all: &[EpochMetrics]) -> Result<Summary> {
    let last = all
        .last()
        .ok_or_else(|| TrainError::Config("no epoch was recorded".into()))?;
    let by_val = all.iter().all(|m| m.val_acc.is_some());
    // With `by_val` every epoch has a validation accuracy.
    let score = |m: &EpochMetrics| m.val_acc.filter(|_| by_val).unwrap_or(m.test_acc);
    let best = all
        .iter()
        .fold(last, |b, m| if score(m) > score(b) { m } else { b });
    Ok(Summary {
        method,
        epochs: last.epoch,
        final_test_acc: last.test_acc,
        final_module_test_acc: last.module_test_acc.clone(),
        best_epoch: best.epoch,
        best_epoch_test_acc: best.test_acc,
        best_epoch_chosen_by: if by_val { "validation" } else { "test" }.into(),
        mean_epoch_seconds: all.iter().map(|m| m.epoch_seconds).sum::<f64>() / all.len() as f64,
        peak_memory: max_peaks(all),
    })
}

/// Per device, the highest of the epochs' peaks.
fn max_peaks(all: &[EpochMetrics]) -> Vec<sid_telemetry::DevicePeak> {
    let mut out: Vec<sid_telemetry::DevicePeak> = Vec::new();
    for p in all.iter().flat_map(|m| &m.peak_memory) {
        match out.iter_mut().find(|o| o.device == p.device) {
            Some(o) => o.bytes = o.bytes.max(p.bytes),
            None => out.push(p.clone()),
        }
    }
    out
}
