//! `sid-bench`: the benchmark harness.
//!
//! - `sid-bench run [EXPERIMENTS]`: SID vs BP on real data, sweeps (depth, workers, width,
//!   label noise), the memory check and the speed-up check, into a results folder;
//! - `sid-bench step-time`: SID vs backprop ms/step on the same model;
//! - `sid-bench workers`: the same SID model on 1 worker and on K workers (`--gpus`);
//! - `sid-bench pipeline`: staged SID on K devices vs one device vs the all-cores trainer,
//!   bubble, and the pipeline model's prediction;
//! - `sid-bench ranks`: staged SID in K processes (c10d) vs K threads vs one device;
//! - `sid-bench checkpoint`: a training step's time without and with a checkpoint every step;
//! - `sid-bench claims`: the tables and plots of docs/claims.md from benches/claims.sh's runs;
//! - `sid-bench env`: what libtorch sees (CUDA, devices, streams).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sid-bench",
    version,
    about = "Benchmarks for sid: step time, multi-worker speed-up."
)]
enum Cli {
    /// SID vs BP side by side, sweeps, memory and speed-up checks → results.csv, report.md, plots.
    Run(sid_benches::harness::RunArgs),
    /// SID vs backprop milliseconds per step for the same model.
    StepTime(sid_benches::step_time::Args),
    /// 1 worker vs K workers on the same SID model, with the step breakdown.
    Workers(sid_benches::workers::Args),
    /// Staged SID on K devices vs the same stages on one device vs the all-cores trainer.
    Pipeline(sid_benches::pipeline::Args),
    /// Staged SID in K processes (c10d, Gloo) vs K threads vs one device.
    Ranks(sid_benches::ranks::Args),
    /// A training step's time without and with a checkpoint every step.
    Checkpoint(sid_benches::checkpoint_cost::Args),
    /// The tables and plots of docs/claims.md from the runs of benches/claims.sh.
    Claims(sid_benches::claims::Args),
    /// What libtorch sees on this machine.
    Env(sid_benches::env_check::Args),
}

fn main() {
    let result = match Cli::parse() {
        Cli::Run(a) => sid_benches::harness::run(a),
        Cli::StepTime(a) => sid_benches::step_time::run(a),
        Cli::Workers(a) => sid_benches::workers::run(a),
        Cli::Pipeline(a) => sid_benches::pipeline::run(a),
        Cli::Ranks(a) => sid_benches::ranks::run(a),
        Cli::Checkpoint(a) => sid_benches::checkpoint_cost::run(a),
        Cli::Claims(a) => sid_benches::claims::run(a),
        Cli::Env(a) => sid_benches::env_check::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
