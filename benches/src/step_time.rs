//! SID vs backprop: milliseconds per training step for the same model, side by side, with
//! SID's reference schedule and its fused one (same result, one forward per module fewer).
//!
//! `cargo bench -p sid-benches --bench step_time [-- --model cnn --modules 5 --batch-size 128]`
//!
//! Both run on one device in this thread (SID's single-device schedule: phase 1 teacher chain,
//! then each module's local update, then the extractor's backward). Medians after warm-up,
//! measured in interleaved rounds.

use clap::Parser;
use sid_core::{ExtractorKind, Method, ModelConfig};

use crate::{interleaved, median, synthetic_batch};

/// Options of this benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Extractors to measure (comma-separated).
    #[arg(long, default_value = "mlp,cnn", value_delimiter = ',')]
    pub model: Vec<ExtractorKind>,
    /// Belief modules L.
    #[arg(long, default_value_t = 5)]
    pub modules: usize,
    /// Hidden width of each module.
    #[arg(long, default_value_t = 256)]
    pub module_hidden: i64,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Device: cpu or a GPU index.
    #[arg(long, default_value = "cpu")]
    pub gpus: String,
    /// Untimed steps per network first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Timed steps per network per round.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Runs the benchmark and prints its table.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let devices = sid_train::devices::resolve_devices(&args.gpus)?;
    anyhow::ensure!(
        devices.len() == 1,
        "step-time measures one device; got --gpus {}",
        args.gpus
    );
    let device = devices[0];
    println!(
        "SID vs BP step time on {}, Fashion-MNIST-shaped input 1x28x28, L={}, hidden {}, batch {}, {} threads",
        sid_train::devices::device_name(device),
        args.modules,
        args.module_hidden,
        args.batch_size,
        tch::get_num_threads()
    );
    println!(
        "{:<6} {:>12} {:>14} {:>12} {:>8} {:>12}",
        "model", "SID ms/step", "fused ms/step", "BP ms/step", "SID/BP", "fused/BP"
    );
    for extractor in &args.model {
        let cfg = ModelConfig {
            extractor: *extractor,
            modules: args.modules,
            module_hidden: args.module_hidden,
            ..ModelConfig::default()
        };
        let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, device);
        tch::manual_seed(0);
        let mut sid = crate::single_device(&cfg, Method::Sid, false, device)?;
        tch::manual_seed(0);
        let mut fused = crate::single_device(&cfg, Method::Sid, true, device)?;
        tch::manual_seed(0);
        let mut bp = crate::single_device(&cfg, Method::Bp, false, device)?;
        let times = interleaved(
            &mut [&mut sid, &mut fused, &mut bp],
            &x,
            &y,
            args.warmup,
            args.rounds,
            args.steps,
        )?;
        let (s, f, b) = (median(&times[0]), median(&times[1]), median(&times[2]));
        println!(
            "{:<6} {:>12.2} {:>14.2} {:>12.2} {:>8.3} {:>12.3}",
            extractor.to_string(),
            s,
            f,
            b,
            s / b,
            f / b
        );
    }
    println!(
        "(medians over {} steps each after {} warm-up steps)",
        args.rounds * args.steps,
        args.warmup
    );
    Ok(())
}
