//! `sid-bench ranks`: staged SID with its K stages in K processes (ranks linked by c10d's
//! Gloo over 127.0.0.1) against the same stages in K threads of one process and the same
//! stages one after another on one device, side by side in one run.
//!
//! Each stage gets one libtorch thread in these three, so the ranks-vs-threads ratio is the
//! cost of going through processes: frames through Gloo's TCP instead of channels. The fair
//! baselines run first, alone: the single-device trainer and the same stages in turn, each on
//! every core.
//! This process is rank 0; it starts ranks 1..K-1 as copies of itself (`--serve-rank`).
//! Times are medians over interleaved rounds with the pipeline full (as in `pipeline`).

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use sid_core::{ExtractorKind, Method, ModelConfig, Network, StagePlan};
use sid_dist::{Backend, Group, Store};
use sid_runtime::{Ranks, StagedConfig, StagedPipeline};
use tch::Device;

use crate::pipeline::timed_round;
use crate::{median, synthetic_batch};

/// Options of this benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Stages K (= ranks).
    #[arg(long, default_value_t = 2)]
    pub stages: usize,
    /// Feature extractor.
    #[arg(long, default_value = "cnn")]
    pub model: ExtractorKind,
    /// Belief modules L.
    #[arg(long, default_value_t = 10)]
    pub modules: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Stage cut: auto (time each block with one thread, balance), even, or blocks=…;modules=….
    #[arg(long, default_value = "auto")]
    pub placement: String,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Timed steps per configuration per round.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Port of the rendezvous store (0: a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Internal: serve this rank for a rank 0 started by `sid-bench ranks`.
    #[arg(long, hide = true)]
    pub serve_rank: Option<usize>,
}

const TIMEOUT: Duration = Duration::from_secs(120);

fn model(args: &Args) -> ModelConfig {
    ModelConfig {
        extractor: args.model,
        modules: args.modules,
        ..ModelConfig::default()
    }
}

fn config(model: &ModelConfig, plan: &StagePlan, devices: Vec<Device>) -> StagedConfig {
    let mut cfg = StagedConfig::new(model.clone(), devices, plan.clone());
    cfg.threads_per_stage = Some(1);
    cfg.timeout = TIMEOUT;
    cfg
}

fn join(rank: usize, world: usize, port: u16) -> anyhow::Result<Ranks> {
    let store = Store::connect("127.0.0.1", port, rank == 0, world, TIMEOUT)?;
    let g = Group::new(
        &store,
        "bench",
        rank,
        world,
        Backend::Gloo,
        "127.0.0.1",
        TIMEOUT,
    )?;
    Ok(Ranks {
        world: Arc::new(g),
        replicas: 1,
        replica_group: None,
        names: (0..world).map(|r| format!("rank {r}, cpu")).collect(),
        liveness: None,
        direct: Default::default(),
    })
}

/// Runs the benchmark (or, with `--serve-rank`, one of its ranks).
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.stages >= 2, "--stages must be at least 2");
    let model = model(&args);
    tch::set_num_threads(1);
    if let Some(rank) = args.serve_rank {
        let plan = StagePlan::parse(&args.placement, &model)?;
        let ranks = join(rank, args.stages, args.port)?;
        let mut cfg = config(&model, &plan, vec![Device::Cpu]);
        cfg.ranks = Some(ranks.clone());
        tch::manual_seed(0);
        sid_runtime::serve(&cfg, &ranks)?;
        return Ok(());
    }
    let plan = crate::user_cut(
        (args.model, args.modules, args.stages),
        args.batch_size,
        1,
        &args.placement,
        Device::Cpu,
    )?;
    // The fair baselines first, alone (no other process running): what a user with this
    // machine would run instead — the single-device trainer and the same stages in turn, each
    // on every core.
    let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, Device::Cpu);
    let cores = crate::cores();
    tch::set_num_threads(cores);
    tch::manual_seed(0);
    let mut single = crate::single_device(&model, Method::Sid, false, Device::Cpu)?;
    let mut all_cores = StagedPipeline::new(config(&model, &plan, vec![Device::Cpu]))?;
    let base = rounds(&mut [&mut single, &mut all_cores], &x, &y, &args)?;
    drop((single, all_cores));
    tch::set_num_threads(1);
    let port = if args.port == 0 {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        args.port
    };
    let exe = std::env::current_exe()?;
    let children: Vec<Child> = (1..args.stages)
        .map(|r| {
            Command::new(&exe)
                .args(["ranks", "--serve-rank", &r.to_string()])
                .args(["--stages", &args.stages.to_string()])
                .args(["--model", &args.model.to_string()])
                .args(["--modules", &args.modules.to_string()])
                .args(["--placement", &plan.to_spec()])
                .args(["--port", &port.to_string()])
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let ranks = join(0, args.stages, port)?;
    let k = args.stages;
    tch::manual_seed(0);
    let mut one = StagedPipeline::new(config(&model, &plan, vec![Device::Cpu]))?;
    tch::manual_seed(0);
    let mut threads = StagedPipeline::new(config(&model, &plan, vec![Device::Cpu; k]))?;
    let mut cfg = config(&model, &plan, vec![Device::Cpu]);
    cfg.ranks = Some(ranks);
    tch::manual_seed(0);
    let mut procs = StagedPipeline::new(cfg)?;
    let med = rounds(&mut [&mut one, &mut threads, &mut procs], &x, &y, &args)?;
    drop(procs);
    for mut c in children {
        let _ = c.wait();
    }
    println!(
        "staged SID across processes: {} backbone, L={}, batch {}, K={k}, placement {}; one libtorch thread per stage; medians of {} rounds x {} steps",
        args.model,
        args.modules,
        args.batch_size,
        plan.to_spec(),
        args.rounds,
        args.steps
    );
    println!("{:<52} {:>10}", "configuration", "ms/step");
    println!(
        "{:<52} {:>10.2}",
        format!("single-device trainer (paper SID), {cores} threads"),
        base[0]
    );
    println!(
        "{:<52} {:>10.2}",
        format!("K={k} stages, one device, {cores} threads"),
        base[1]
    );
    let rows = [
        format!("K={k} stages, one device, one after another"),
        format!("K={k} stages, {k} threads (channels)"),
        format!("K={k} stages, {k} ranks (Gloo, 127.0.0.1)"),
    ];
    for (name, m) in rows.iter().zip(&med) {
        println!("{name:<52} {m:>10.2}");
    }
    println!(
        "threads over one device: {:.2}x; ranks over one device: {:.2}x; ranks / threads (overhead of processes): {:.3}",
        med[0] / med[1],
        med[0] / med[2],
        med[2] / med[1]
    );
    println!(
        "ranks over the single-device trainer on {cores} threads: {:.2}x; over the same stages on {cores} threads: {:.2}x",
        base[0] / med[2],
        base[1] / med[2]
    );
    Ok(())
}

/// Medians over interleaved rounds, after one warm-up round each.
fn rounds(
    nets: &mut [&mut dyn Network],
    x: &tch::Tensor,
    y: &tch::Tensor,
    args: &Args,
) -> anyhow::Result<Vec<f64>> {
    let mut t = vec![Vec::new(); nets.len()];
    for n in nets.iter_mut() {
        timed_round(*n, x, y, 1)?;
    }
    for _ in 0..args.rounds {
        for (i, n) in nets.iter_mut().enumerate() {
            t[i].push(timed_round(*n, x, y, args.steps)?);
        }
    }
    Ok(t.iter().map(|v| median(v)).collect())
}
