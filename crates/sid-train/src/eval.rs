//! Early-exit evaluation of a saved run: each test sample stops at the first module whose
//! belief is confident enough, and the accuracy, the modules used and the time per sample are
//! measured for each confidence threshold, next to the full cascade.

use std::path::Path;
use std::time::Instant;

use sid_core::Network;
use tch::{Kind, Tensor};

use crate::checkpoint::{self, CHECKPOINT_FILE};
use crate::{Result, Run, RunConfig, TrainError};

/// One row of the early-exit table.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitRow {
    /// The threshold; `None` for the full cascade (every sample through every module).
    pub tau: Option<f64>,
    /// Test accuracy of the predictions made where samples left.
    pub accuracy: f64,
    /// Mean number of modules a sample passed through (1-based exit module).
    pub mean_modules: f64,
    /// Wall-clock milliseconds per sample of the inference that produced them.
    pub ms_per_sample: f64,
}

/// A saved run, ready to evaluate: its config, its network with the checkpoint loaded, and its
/// data.
pub struct Saved {
    /// The run's saved config, as evaluated (on `gpus`, when given).
    pub cfg: RunConfig,
    /// The network.
    pub net: Box<dyn Network>,
    /// The run's test split (and the rest of its data set).
    pub data: sid_data::Dataset,
}

/// Opens the run in `dir` (its `config.toml` and checkpoint), on `gpus` if given (else the
/// saved device list).
pub fn open(dir: &Path, gpus: Option<&str>) -> Result<Saved> {
    let cfg = saved_config_on(dir, gpus)?;
    let data = crate::trainer::load_data(&cfg)?;
    let net = load_network(dir, &cfg, data.spec.shape)?;
    let data = crate::trainer::data_on_input_device(data, net.as_ref());
    Ok(Saved { cfg, net, data })
}

/// The saved config of the run in `dir`, moved onto `gpus` if given.
pub(crate) fn saved_config_on(dir: &Path, gpus: Option<&str>) -> Result<RunConfig> {
    let mut cfg = Run::saved_config(dir)?;
    if let Some(g) = gpus {
        cfg.runtime.gpus = g.parse()?;
        if cfg.model.stages <= 1 {
            // A paper-mode placement belongs to the saved device list.
            cfg.runtime.placement = None;
        }
    }
    // A checkpoint moves between world sizes: one process evaluates what replicas trained.
    cfg.runtime.data_parallel = 1;
    Ok(cfg)
}

/// The network of `cfg` for data of `shape`, with the checkpoint in `dir` loaded. A missing
/// checkpoint is named before anything is built.
pub(crate) fn load_network(
    dir: &Path,
    cfg: &RunConfig,
    shape: sid_data::Shape,
) -> Result<Box<dyn Network>> {
    let path = dir.join(CHECKPOINT_FILE);
    let (named, _) = checkpoint::load(&path)?;
    let devices = cfg.runtime.gpus.resolve()?;
    let mut cfg = cfg.clone();
    cfg.data.loaded_shape = Some(shape);
    let plan = crate::plan::Plan::resolve(&cfg, &devices, false, false)?;
    let mut net = crate::network::build_network(&cfg, &plan, None)?;
    net.load_state(&named)
        .map_err(|e| TrainError::checkpoint(path, e))?;
    Ok(Box::new(net))
}

/// The full cascade, then early exit at each threshold in `taus`, on the run's test split.
pub fn exit_table(saved: &mut Saved, batch_size: i64, taus: &[f64]) -> Result<Vec<ExitRow>> {
    let (net, split) = (&mut saved.net, &saved.data.test);
    let n = split.len();
    let device = net.input_device();
    let batches = sid_data::num_batches(n, batch_size);
    let mut rows = Vec::with_capacity(taus.len() + 1);
    let count = |t: &Tensor| t.sum(Kind::Int64).int64_value(&[]);
    for tau in std::iter::once(None).chain(taus.iter().copied().map(Some)) {
        let (mut correct, mut modules) = (0i64, 0i64);
        let started = Instant::now();
        for b in 0..batches {
            let (x, y) = sid_data::batch(split, None, batch_size, b);
            let x = x.to_device(device);
            let (pred, used) = match tau {
                None => {
                    let c = net.cascade(&x)?;
                    let used = c.logits.len() as i64 * x.size()[0];
                    (c.prediction(), used)
                }
                Some(t) => {
                    let e = net.cascade_exit(&x, t)?;
                    (e.prediction, count(&e.exit_module))
                }
            };
            correct += count(&pred.eq_tensor(&y.to_device(pred.device())));
            modules += used;
        }
        let seconds = started.elapsed().as_secs_f64();
        rows.push(ExitRow {
            tau,
            accuracy: correct as f64 / n.max(1) as f64,
            mean_modules: modules as f64 / n.max(1) as f64,
            ms_per_sample: seconds * 1e3 / n.max(1) as f64,
        });
    }
    Ok(rows)
}
