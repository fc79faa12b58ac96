//! `cargo bench -p sid-benches --bench step_time [-- OPTIONS]`: see `sid-bench step-time --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    sid_benches::step_time::run(sid_benches::step_time::Args::parse())
}
