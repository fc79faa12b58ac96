//! `cargo bench -p sid-benches --bench workers [-- OPTIONS]`: see `sid-bench workers --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    sid_benches::workers::run(sid_benches::workers::Args::parse())
}
