//! Shared pieces of the benchmarks: synthetic batches and step timing with medians.
//!
//! Timing uses random inputs of the real shapes: the cost of a step does not depend on the
//! pixel values, and the benchmarks then need no data files.

pub mod env_check;
pub mod harness;
pub mod pipeline;
pub mod pipeline_model;
pub mod ranks;
pub mod report;
pub mod step_time;
pub mod workers;

use std::time::Instant;

use sid_core::Network;
use tch::{Device, Kind, Tensor};

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
