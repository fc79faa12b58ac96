//! Shared pieces of the benchmarks: synthetic batches and step timing with medians.
//!
//! Timing uses random inputs of the real shapes: the cost of a step does not depend on the
//! pixel values, and the benchmarks then need no data files.

pub mod checkpoint_cost;
pub mod claims;
pub mod env_check;
pub mod harness;
pub mod pipeline;
pub mod pipeline_model;
pub mod ranks;
pub mod report;
pub mod step_time;
pub mod workers;

use std::time::Instant;

use sid_core::{Method, ModelConfig, Network};
use sid_runtime::{StagedConfig, StagedPipeline};
use tch::{Device, Kind, Tensor};

/// The whole network on one device as `sid-launch` trains it there (lr 1e-3; the caller
/// seeds): SID (with the fused schedule if `fused`) or BP.
pub fn single_device(
    model: &ModelConfig,
    method: Method,
    fused: bool,
    device: Device,
) -> anyhow::Result<StagedPipeline> {
    let mut cfg = StagedConfig::single_device(model.clone(), device, method)?;
    cfg.fused_teacher = fused;
    Ok(StagedPipeline::new(cfg)?)
}

/// Cores this process may use: what "all cores" means in the baselines.
pub fn cores() -> i32 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i32
}

/// A random batch of `batch` images `channels`×`size`×`size` with labels below `classes`.
pub fn synthetic_batch(
    batch: i64,
    channels: i64,
    size: i64,
    classes: i64,
    device: Device,
) -> (Tensor, Tensor) {
    tch::manual_seed(0);
    let x = Tensor::randn([batch, channels, size, size], (Kind::Float, device));
    let y = Tensor::randint(classes, [batch], (Kind::Int64, device));
    (x, y)
}

/// Runs `steps` training steps and returns each one's milliseconds.
pub fn time_steps(
    net: &mut dyn Network,
    x: &Tensor,
    y: &Tensor,
    steps: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        net.train_step(x, y)?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

pub use sid_train::metrics::median;

/// Measures several networks fairly on a shared, noisy machine: after `warmup` steps each,
/// `rounds` rounds each run `steps` steps of every network in turn, so that a slow period
/// hits all of them alike. Returns every measured step time per network.
pub fn interleaved(
    nets: &mut [&mut dyn Network],
    x: &Tensor,
    y: &Tensor,
    warmup: usize,
    rounds: usize,
    steps: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    for net in nets.iter_mut() {
        time_steps(*net, x, y, warmup)?;
    }
    let mut all = vec![Vec::new(); nets.len()];
    for _ in 0..rounds {
        for (i, net) in nets.iter_mut().enumerate() {
            all[i].extend(time_steps(*net, x, y, steps)?);
        }
    }
    Ok(all)
}

/// The stage cut a user's run of a `(backbone, modules, stages)` network with these settings
/// gets on as many devices like `device` as stages: sid-train's plan, so `auto` is what
/// `sid-launch` would choose. CPU stages are timed with one thread each, as the benchmarks
/// run them.
pub(crate) fn user_cut(
    (model, modules, stages): (sid_core::ExtractorKind, usize, usize),
    batch_size: i64,
    micro_batches: usize,
    placement: &str,
    device: tch::Device,
) -> anyhow::Result<sid_core::StagePlan> {
    let mut cfg = sid_train::RunConfig::default();
    cfg.model.extractor = model;
    cfg.model.modules = modules;
    cfg.model.stages = stages;
    cfg.optim.batch_size = batch_size;
    cfg.runtime.micro_batches = Some(micro_batches);
    cfg.runtime.placement = Some(placement.to_string());
    if device == tch::Device::Cpu {
        cfg.runtime.threads = Some(1);
    }
    let plan = sid_train::Plan::resolve(&cfg, &vec![device; stages], false, true)?;
    for note in &plan.notes {
        println!("{note}");
    }
    match plan.layout {
        sid_train::Layout::Stages { cut, .. } => Ok(cut),
        _ => Ok(sid_core::StagePlan::even(&cfg.model_config(), 1)?),
    }
}
