//! The multi-worker speed-up: the same SID model with 1 worker and with K workers, side by side.
//!
//! `cargo bench -p sid-benches --bench workers [-- --workers 2 --modules 7 --module-hidden 2048]`
//!
//! Each CPU worker stands for a device and gets one libtorch thread, so "1 worker" is one
//! device and "K workers" is K devices. For honesty the table also shows one worker using
//! every core (intra-op parallelism instead of module parallelism) and the single-device
//! trainer without threads. Then the share of the K-worker step spent in each part.

use std::time::Duration;

use clap::Parser;
use sid_benches::{interleaved, median, synthetic_batch};
use sid_core::{ExtractorKind, LossConfig, ModelConfig, Network, SidNetwork};
use sid_runtime::{Pipeline, PipelineConfig, Placement};
use tch::Device;

#[derive(Parser)]
struct Args {
    /// Number of CPU workers to compare with one.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Belief modules L. With the phase-1 chain, 2 workers balance best at L = 7 (4 + 3).
    #[arg(long, default_value_t = 7)]
    modules: usize,
    /// Hidden width of each module: wide, so that module work dominates the step.
    #[arg(long, default_value_t = 2048)]
    module_hidden: i64,
    #[arg(long, default_value = "mlp")]
    model: ExtractorKind,
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
    /// Explicit placement for the K-worker run.
    #[arg(long)]
    placement: Option<String>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

fn pipeline(model: &ModelConfig, workers: usize, threads: Option<i32>, placement: Option<Placement>) -> anyhow::Result<Pipeline> {
    let mut cfg = PipelineConfig::new(model.clone(), vec![Device::Cpu; workers]);
    cfg.loss = LossConfig::default();
    cfg.threads_per_worker = threads;
    cfg.placement = placement;
    tch::manual_seed(0);
    Ok(Pipeline::new(cfg)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as i32;
    let model = ModelConfig {
        extractor: args.model,
        modules: args.modules,
        module_hidden: args.module_hidden,
        ..ModelConfig::default()
    };
    let placement = args.placement.as_deref().map(|p| Placement::parse(p, args.modules, args.workers)).transpose()?;
    let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, Device::Cpu);
    let mut one = pipeline(&model, 1, Some(1), None)?;
    let mut one_all = pipeline(&model, 1, Some(cores), None)?;
    let mut many = pipeline(&model, args.workers, Some(1), placement)?;
    tch::manual_seed(0);
    let mut single = SidNetwork::new(&model, LossConfig::default(), 1e-3, Device::Cpu)?;
    let times = interleaved(
        &mut [&mut one, &mut one_all, &mut many, &mut single as &mut dyn Network],
        &x,
        &y,
        args.warmup,
        args.rounds,
        args.steps,
    )?;
    let med: Vec<f64> = times.iter().map(|t| median(t)).collect();
    println!(
        "SID multi-worker speed-up on cpu ({cores} cores): {} extractor, L={}, module hidden {}, batch {}",
        args.model, args.modules, args.module_hidden, args.batch_size
    );
    println!("K-worker placement: {}", many.placement().to_spec());
    println!("{:<44} {:>10} {:>9}", "configuration", "ms/step", "speed-up");
    let rows = [
        ("1 worker x 1 thread (one device)", med[0]),
        (&*format!("1 worker x {cores} threads (all cores, intra-op)"), med[1]),
        ("single-device trainer, no worker threads", med[3]),
        (&*format!("{} workers x 1 thread ({} devices)", args.workers, args.workers), med[2]),
    ];
    for (name, m) in rows {
        println!("{name:<44} {m:>10.2} {:>8.2}x", med[0] / m);
    }
    println!("ratio 1 worker / {} workers (1 thread each): {:.2}x", args.workers, med[0] / med[2]);
    println!("ratio 1 worker x {cores} threads / {} workers: {:.2}x", args.workers, med[1] / med[2]);

    // Where the K-worker step goes: medians of each part over fresh steps.
    let mut parts: Vec<Vec<f64>> = vec![Vec::new(); 6];
    for _ in 0..args.rounds * args.steps {
        many.train_step(&x, &y)?;
        let t = many.last_timing();
        let row = [
            ms(t.total),
            ms(t.extractor_forward) + ms(t.extractor_backward),
            t.phase1.iter().map(|d| ms(*d)).sum(),
            t.phase2.iter().map(|d| ms(*d)).fold(0.0, f64::max),
            ms(t.wait),
            ms(t.broadcast),
        ];
        for (p, v) in parts.iter_mut().zip(row) {
            p.push(v);
        }
    }
    let total = median(&parts[0]);
    println!("{}-worker step breakdown (median ms, share of the step):", args.workers);
    for (name, i) in [
        ("extractor forward + backward (coordinator)", 1),
        ("phase 1, teacher chain (sum over workers)", 2),
        ("phase 2, local updates (slowest worker)", 3),
        ("coordinator waiting for workers", 4),
        ("broadcast of z and labels", 5),
    ] {
        let m = median(&parts[i]);
        println!("  {name:<44} {m:>8.2} ms {:>5.1}%", 100.0 * m / total);
    }
    println!("  {:<44} {total:>8.2} ms", "whole step");
    println!("(medians over {} interleaved steps each after {} warm-up steps)", args.rounds * args.steps, args.warmup);
    Ok(())
}
