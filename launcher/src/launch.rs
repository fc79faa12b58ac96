//! `--nproc-per-node N`: starts this node's ranks as child processes of this one, like
//! torchrun, with the variables a rank reads (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), then waits for them and reports each
//! rank's exit. An interrupt is passed on to the ranks (rank 0 stops after the current step
//! with a checkpoint and closes the pipeline; the others follow).

use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::args::Cli;

/// How the ranks ended.
pub enum Outcome {
    /// Every rank exited 0.
    Done,
    /// Rank 0 was interrupted and saved a checkpoint (exit 130).
    Interrupted,
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Starts `n` ranks of this node and waits for all of them.
pub fn run(cli: &Cli, n: usize) -> Result<Outcome> {
    if n == 0 {
        bail!("--nproc-per-node must be at least 1");
    }
    if cli.nnodes == 0 || cli.node_rank >= cli.nnodes {
        bail!(
            "--node-rank {} does not fit --nnodes {} (nodes are 0..{})",
            cli.node_rank,
            cli.nnodes,
            cli.nnodes.saturating_sub(1)
        );
    }
    // Refuse bad settings once, here, rather than in every rank (a node that resumes without
    // the run directory learns the settings from rank 0, whose node checks them).
    let inv = cli.invocation(cli.node_rank > 0)?;
    let world = n * cli.nnodes;
    let k = inv.config.model.stages * inv.config.runtime.data_parallel;
    if k != world && !inv.follows_rank0 {
        bail!(
            "--stages {} × --data-parallel {} = {k} ranks, but --nproc-per-node {n} × --nnodes {} = {world}",
            inv.config.model.stages,
            inv.config.runtime.data_parallel,
            cli.nnodes
        );
    }
    let exe = std::env::current_exe().context("finding sid-launch's own executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = cli.node_rank * n + local;
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", cli.node_rank.to_string())
            .env("MASTER_ADDR", &cli.master_addr)
            .env("MASTER_PORT", cli.master_port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push((rank, child));
    }
    eprintln!(
        "launched ranks {}-{} of {world} on this node (node {} of {}); rendezvous at {}:{}",
        cli.node_rank * n,
        cli.node_rank * n + n - 1,
        cli.node_rank,
        cli.nnodes,
        cli.master_addr,
        cli.master_port
    );
    // After a rank fails, the others stop on their own once their links break or their step
    // timeout passes; past that (and a margin) they are killed.
    let grace = Duration::from_secs_f64(inv.config.runtime.step_timeout) + Duration::from_secs(30);
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut first_failure: Option<Instant> = None;
    let mut forwarded = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (_, c) in &children {
                // SAFETY: kill only sends a signal to our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            }
        }
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                if let Some(s) = c.try_wait().context("waiting for a rank")? {
                    statuses[i] = Some(s);
                    if !s.success() {
                        eprintln!("rank {rank} exited: {}", describe(s));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        if statuses.iter().all(|s| s.is_some()) {
            break;
        }
        if first_failure.is_some_and(|t| t.elapsed() > grace) {
            for (i, (rank, c)) in children.iter_mut().enumerate() {
                if statuses[i].is_none() {
                    eprintln!("rank {rank} did not stop after another rank failed: killing it");
                    let _ = c.kill();
                    statuses[i] = c.wait().ok();
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed: Vec<String> = children
        .iter()
        .zip(&statuses)
        .filter(|(_, s)| !s.is_some_and(|s| s.success()))
        .map(|((rank, _), s)| format!("rank {rank} ({})", s.map_or("no status".into(), describe)))
        .collect();
    if failed.is_empty() {
        eprintln!("all {n} ranks on this node finished");
        return Ok(Outcome::Done);
    }
    let rank0_interrupted = cli.node_rank == 0 && statuses[0].and_then(|s| s.code()) == Some(130);
    if rank0_interrupted && failed.len() == 1 {
        return Ok(Outcome::Interrupted);
    }
    bail!(
        "{} of {n} ranks on this node failed: {}",
        failed.len(),
        failed.join(", ")
    )
}
