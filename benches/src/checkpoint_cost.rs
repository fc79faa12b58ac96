//! What a checkpoint costs a training step: the same short run through `sid_train::Run`
//! (real data, the real trainer) without step checkpoints and with one after every step
//! (`--checkpoint-every 1`: the state copied to host memory at the step boundary, written by a
//! thread of its own), in interleaved rounds; each round's median step time comes from the
//! run's `metrics.jsonl`.

use clap::Parser;
use sid_core::ExtractorKind;

use crate::median;

/// Options of this benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Backbone.
    #[arg(long, default_value = "cnn")]
    pub model: ExtractorKind,
    /// Belief modules L.
    #[arg(long, default_value_t = 10)]
    pub modules: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Training samples per run (Fashion-MNIST's first ones).
    #[arg(long, default_value_t = 2560)]
    pub limit_train: usize,
    /// Device list, as `sid-launch --gpus`.
    #[arg(long, default_value = "cpu")]
    pub gpus: String,
    /// Interleaved rounds (a run without and a run with step checkpoints each).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One run's median step time, in ms.
fn median_step_ms(args: &Args, every: Option<usize>) -> anyhow::Result<f64> {
    let mut cfg = sid_train::RunConfig::default();
    cfg.model.extractor = args.model;
    cfg.model.modules = args.modules;
    cfg.optim.batch_size = args.batch_size;
    cfg.optim.epochs = 1;
    cfg.data.limit_train = Some(args.limit_train);
    cfg.runtime.gpus = args.gpus.parse()?;
    cfg.runtime.checkpoint_every = every;
    let dir = tempfile::tempdir()?;
    let mut run = sid_train::Run::create_on(cfg, &dir.path().join("run"), None)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    run.train(&stop, &mut |_| {})?;
    let m = sid_train::metrics::read_all(&run.dir().join(sid_train::trainer::METRICS_FILE))?;
    Ok(m.records.last().map_or(0.0, |r| r.median_step_ms))
}

/// Runs the benchmark and prints its table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (mut plain, mut saving) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        plain.push(median_step_ms(&args, None)?);
        saving.push(median_step_ms(&args, Some(1))?);
    }
    let (a, b) = (median(&plain), median(&saving));
    println!(
        "checkpoint cost: {} backbone, L={}, batch {}, {} samples on {}; median step ms of {} interleaved runs",
        args.model, args.modules, args.batch_size, args.limit_train, args.gpus, args.rounds
    );
    println!("no step checkpoints        {a:>9.2}   (runs: {plain:.2?})");
    println!("a checkpoint every step    {b:>9.2}   (runs: {saving:.2?})");
    println!("ratio (with / without): {:.2}x", b / a.max(1e-9));
    Ok(())
}
