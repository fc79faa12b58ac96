//! SID vs backprop: milliseconds per training step for the same model, side by side.
//!
//! `cargo bench -p sid-benches --bench step_time [-- --model cnn --modules 5 --batch-size 128]`
//!
//! Both run on one device in this thread (SID's single-device schedule: phase 1 teacher chain,
//! then each module's local update, then the extractor's backward). Medians after warm-up,
//! measured in interleaved rounds.

use clap::Parser;
use sid_benches::{interleaved, median, synthetic_batch};
use sid_core::{BpNetwork, ExtractorKind, LossConfig, ModelConfig, SidNetwork};
use tch::Device;

#[derive(Parser)]
struct Args {
    /// Extractors to measure (comma-separated).
    #[arg(long, default_value = "mlp,cnn", value_delimiter = ',')]
    model: Vec<ExtractorKind>,
    #[arg(long, default_value_t = 5)]
    modules: usize,
    #[arg(long, default_value_t = 256)]
    module_hidden: i64,
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    println!(
        "SID vs BP step time on cpu, Fashion-MNIST-shaped input 1x28x28, L={}, hidden {}, batch {}, {} threads",
        args.modules,
        args.module_hidden,
        args.batch_size,
        tch::get_num_threads()
    );
    println!("{:<6} {:>12} {:>12} {:>10}", "model", "SID ms/step", "BP ms/step", "SID/BP");
    for extractor in &args.model {
        let cfg = ModelConfig { extractor: *extractor, modules: args.modules, module_hidden: args.module_hidden, ..ModelConfig::default() };
        let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, Device::Cpu);
        tch::manual_seed(0);
        let mut sid = SidNetwork::new(&cfg, LossConfig::default(), 1e-3, Device::Cpu)?;
        tch::manual_seed(0);
        let mut bp = BpNetwork::new(&cfg, 1e-3, Device::Cpu)?;
        let times = interleaved(&mut [&mut sid, &mut bp], &x, &y, args.warmup, args.rounds, args.steps)?;
        let (s, b) = (median(&times[0]), median(&times[1]));
        println!("{:<6} {:>12.2} {:>12.2} {:>10.3}", extractor.to_string(), s, b, s / b);
    }
    println!("(medians over {} steps each after {} warm-up steps)", args.rounds * args.steps, args.warmup);
    Ok(())
}
