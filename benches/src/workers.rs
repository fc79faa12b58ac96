//! The multi-worker speed-up: the same SID model with 1 worker and with K workers, side by side.
//!
//! `cargo bench -p sid-benches --bench workers [-- --workers 2 --modules 7 --module-hidden 2048]`
//!
//! Each CPU worker stands for a device and gets one libtorch thread, so "1 worker" is one
//! device and "K workers" is K devices. For honesty the table also shows one worker using
//! every core (intra-op parallelism instead of module parallelism) and the single-device
//! trainer without threads. Then the share of the K-worker step spent in each part.

use std::time::Duration;

use crate::{interleaved, median, synthetic_batch};
use clap::Parser;
use sid_core::{ExtractorKind, LossConfig, Method, ModelConfig, Network};
use sid_runtime::{PipelineMethod, Placement, StagedConfig, StagedPipeline};
use tch::Device;

/// Options of this benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Devices of the K-worker run: cpu:2, 0,0,0,0 (streams on one GPU), 0,1 … The baseline is
    /// one worker on the first of them.
    #[arg(long, default_value = "cpu:2")]
    pub gpus: String,
    /// Belief modules L. With the phase-1 chain, 2 workers balance best at L = 7 (4 + 3).
    #[arg(long, default_value_t = 7)]
    pub modules: usize,
    /// Hidden width of each module: wide, so that module work dominates the step.
    #[arg(long, default_value_t = 2048)]
    pub module_hidden: i64,
    /// Feature extractor (mlp keeps the coordinator's share small).
    #[arg(long, default_value = "mlp")]
    pub model: ExtractorKind,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Use SID's fused schedule (the local steps' forwards are the teacher chain).
    #[arg(long)]
    pub fused_teacher: bool,
    /// Put every GPU worker on the default stream instead of its own.
    #[arg(long)]
    pub no_streams: bool,
    /// Explicit placement for the K-worker run.
    #[arg(long)]
    pub placement: Option<String>,
    /// Untimed steps per configuration first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Timed steps per configuration per round.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// The paper's SID on the stage pipeline: the extractor as stage 1 on the first device, then
/// one module stage per device. `threads`: intra-op threads per CPU stage (`None`: the module
/// stages share the cores, the extractor takes all of them).
pub(crate) fn pipeline(
    model: &ModelConfig,
    devices: Vec<Device>,
    threads: Option<i32>,
    placement: Option<Placement>,
    streams: bool,
    fused: bool,
) -> anyhow::Result<StagedPipeline> {
    let plan = sid_core::StagePlan::even(model, 1)?;
    let mut cfg = StagedConfig::new(model.clone(), devices, plan);
    cfg.method = PipelineMethod::Paper;
    cfg.streams = streams;
    cfg.fused_teacher = fused;
    cfg.loss = LossConfig::default();
    cfg.threads_per_stage = threads;
    cfg.placement = placement;
    tch::manual_seed(0);
    Ok(StagedPipeline::new(cfg)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark and prints its table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let devices = sid_train::devices::resolve_devices(&args.gpus)?;
    let k = devices.len();
    let first = devices[0];
    let on_cpu = first == Device::Cpu;
    let cores = crate::cores();
    let model = ModelConfig {
        extractor: args.model,
        modules: args.modules,
        module_hidden: args.module_hidden,
        ..ModelConfig::default()
    };
    let placement = match args.placement.as_deref() {
        Some(p) => Placement::parse(p, args.modules, k)?,
        None => Placement::even(args.modules, k)?,
    };
    let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, first);
    let dev = sid_train::devices::device_name(first);
    // On a CPU each worker stands for a device and gets one thread; a GPU worker gets its
    // device (and its own stream when several share one GPU).
    let per_worker = on_cpu.then_some(1);
    // The all-cores baselines are measured first, each alone: once several libtorch thread
    // teams exist in a process, GNU OpenMP throttles its spin-waiting and a multi-threaded
    // team pays a futex wake-up per op, which would make these baselines look worse than
    // they are.
    let mut all_cores = Vec::new();
    if on_cpu {
        tch::manual_seed(0);
        let mut s0 = crate::single_device(&model, Method::Sid, args.fused_teacher, first)?;
        all_cores.push(
            interleaved(&mut [&mut s0], &x, &y, args.warmup, args.rounds, args.steps)?.remove(0),
        );
        drop(s0);
        let mut p0 = pipeline(
            &model,
            vec![first],
            Some(cores),
            None,
            true,
            args.fused_teacher,
        )?;
        all_cores.push(
            interleaved(&mut [&mut p0], &x, &y, args.warmup, args.rounds, args.steps)?.remove(0),
        );
    }
    let mut one = pipeline(
        &model,
        vec![first],
        per_worker,
        None,
        !args.no_streams,
        args.fused_teacher,
    )?;
    let mut many = pipeline(
        &model,
        devices.clone(),
        per_worker,
        Some(placement.clone()),
        !args.no_streams,
        args.fused_teacher,
    )?;
    let mut nets: Vec<&mut dyn Network> = vec![&mut one, &mut many];
    let mut single_gpu = None;
    if !on_cpu {
        tch::manual_seed(0);
        single_gpu = Some(crate::single_device(
            &model,
            Method::Sid,
            args.fused_teacher,
            first,
        )?);
    }
    if let Some(s) = single_gpu.as_mut() {
        nets.push(s);
    }
    let mut times = interleaved(&mut nets, &x, &y, args.warmup, args.rounds, args.steps)?;
    // Same layout on both kinds of machine: [1 worker, K workers, single-device, 1 worker all cores].
    if on_cpu {
        times.extend(all_cores);
    } else {
        times.push(Vec::new());
    }
    let med: Vec<f64> = times.iter().map(|t| median(t)).collect();
    println!(
        "SID multi-worker speed-up ({}): {} extractor, L={}, module hidden {}, batch {}",
        if on_cpu {
            format!("cpu, {cores} cores")
        } else {
            devices_text(&devices)
        },
        args.model,
        args.modules,
        args.module_hidden,
        args.batch_size
    );
    println!(
        "K-worker devices: {}; placement {}",
        args.gpus,
        placement.to_spec()
    );
    println!(
        "{:<48} {:>10} {:>9}",
        "configuration", "ms/step", "speed-up"
    );
    let one_name = if on_cpu {
        "1 worker x 1 thread (one device)".to_string()
    } else {
        format!("1 worker on {dev}")
    };
    let many_name = if on_cpu {
        format!("{k} workers x 1 thread ({k} devices)")
    } else {
        format!("{k} workers on {}", args.gpus)
    };
    let mut rows = vec![(one_name, med[0])];
    if on_cpu {
        rows.push((
            format!("single-device trainer, {cores} threads (measured alone)"),
            med[2],
        ));
        rows.push((
            format!("1 worker x {cores} threads (measured alone)"),
            med[3],
        ));
    } else {
        rows.push((
            format!("single-device trainer on {dev}, no worker threads"),
            med[2],
        ));
    }
    rows.push((many_name, med[1]));
    for (name, m) in &rows {
        println!("{name:<48} {m:>10.2} {:>8.2}x", med[0] / m);
    }
    println!("speed-up, 1 worker / {k} workers: {:.2}x", med[0] / med[1]);
    if on_cpu {
        println!(
            "speed-up, single-device trainer on all {cores} cores / {k} workers x 1 thread: {:.2}x",
            med[2] / med[1]
        );
    }

    // Where the K-worker step goes: each stage's busy time per step over fresh steps (the
    // extractor is stage 1, the module blocks follow).
    let _ = many.take_stage_stats();
    let started = std::time::Instant::now();
    let n = args.rounds * args.steps;
    for _ in 0..n {
        many.train_step(&x, &y)?;
    }
    let total = ms(started.elapsed()) / n as f64;
    println!("{k}-worker step by stage (mean ms per step, share of the step busy):");
    for (s, t) in many.take_stage_stats().iter().enumerate() {
        let busy = ms(t.busy) / t.steps.max(1) as f64;
        let forward = ms(t.forward) / t.steps.max(1) as f64;
        println!(
            "  {:<46} {busy:>8.2} ms {:>5.1}%   (forward {forward:.2} ms)",
            many.describe(s),
            100.0 * busy / total
        );
    }
    println!("  {:<46} {total:>8.2} ms", "whole step");
    println!(
        "(medians over {} interleaved steps each after {} warm-up steps; stage times: {n} more steps)",
        args.rounds * args.steps,
        args.warmup
    );
    Ok(())
}

fn devices_text(devices: &[Device]) -> String {
    let names: Vec<String> = devices
        .iter()
        .map(|d| sid_train::devices::device_name(*d))
        .collect();
    names.join(",")
}
