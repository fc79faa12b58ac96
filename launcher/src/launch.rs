//! `--nproc-per-node N`: starts this node's ranks as child processes of this one, like
//! torchrun, with the variables a rank reads (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), then waits for them and reports each
//! rank's exit. An interrupt is passed on to the ranks (rank 0 stops after the current step
//! with a checkpoint and closes the pipeline; the others follow). When a rank fails, the
//! others are stopped within seconds.
//!
//! `--max-restarts R` (torchrun's semantics): after a failure every rank is stopped and all are
//! started again, with `TORCHELASTIC_RESTART_COUNT` set as torchrun sets it, so that each
//! resumes from the run's newest checkpoint that loads; up to R times. Without
//! `--nproc-per-node` the run itself is started as one such child and watched the same way.
//! Not restarted: an interrupt, a failure a restart cannot fix (a disk or setting error: the
//! rank exits with [`EXIT_NOT_RESTARTABLE`]), and a failure that repeats at the same point (the
//! same error, no newer checkpoint, no rank killed from outside).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::args::Cli;

/// A rank's exit code for a failure that a restart cannot fix: a disk full or unwritable, a
/// bad setting, data or checkpoint.
pub const EXIT_NOT_RESTARTABLE: u8 = 3;

/// The variable naming the file a supervised rank writes its one-line error to.
pub const FAILURE_FILE_VAR: &str = "SID_FAILURE_FILE";

/// How long the other ranks have to stop on their own after one failed (rank 0 names the
/// failed stage in its own error) before they are stopped.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// After SIGTERM, how long before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// The ranks failed (and were not, or no longer, restarted): whether a restart of the whole
/// launch could get past it decides the launcher's own exit code (1, or
/// [`EXIT_NOT_RESTARTABLE`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    message: String,
    /// Whether a restart may get past it.
    pub restartable: bool,
}

/// How the ranks ended.
pub enum Outcome {
    /// Every rank exited 0.
    Done,
    /// Rank 0 was interrupted and saved a checkpoint (exit 130).
    Interrupted,
}

/// `exited with code 1`, `was killed by SIGKILL (signal 9)`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by {}signal {s}", signal_name(s)),
        _ => "ended with an unknown status".into(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL, ",
        libc::SIGTERM => "SIGTERM, ",
        libc::SIGINT => "SIGINT, ",
        libc::SIGSEGV => "SIGSEGV, ",
        libc::SIGABRT => "SIGABRT, ",
        libc::SIGBUS => "SIGBUS, ",
        _ => "",
    }
}

/// One process to start: its rank, its name in messages and the variables that place it.
struct Spec {
    rank: usize,
    name: String,
    env: Vec<(&'static str, String)>,
}

/// How one rank of an attempt ended.
struct Exit {
    rank: usize,
    name: String,
    status: Option<ExitStatus>,
    /// Stopped by this launcher after another rank failed.
    stopped: bool,
    /// Its own one-line error, if it wrote one.
    error: Option<String>,
}

impl Exit {
    fn failed(&self) -> bool {
        !self.status.is_some_and(|s| s.success())
    }

    fn cause(&self) -> String {
        let status = self.status.map_or("ended with no status".into(), describe);
        let stopped = if self.stopped { " (stopped)" } else { "" };
        let error = self.error.as_ref().map(|e| format!(" ({e})"));
        let error = error.unwrap_or_default();
        format!("{} {status}{stopped}{error}", self.name)
    }
}

/// Starts `n` ranks of this node and waits for all of them; restarts them as `--max-restarts`
/// allows.
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
    if cli.max_restarts > 0 && cli.nnodes > 1 {
        bail!(
            "--max-restarts with --nnodes {}: each node restarts only its own ranks; restart a job of several nodes with torchrun's --max-restarts and --run-dir",
            cli.nnodes
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
    let specs = (0..n)
        .map(|local| {
            let rank = cli.node_rank * n + local;
            Spec {
                rank,
                name: format!("rank {rank}"),
                env: vec![
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", world.to_string()),
                    ("LOCAL_RANK", local.to_string()),
                    ("LOCAL_WORLD_SIZE", n.to_string()),
                    ("GROUP_RANK", cli.node_rank.to_string()),
                    ("MASTER_ADDR", cli.master_addr.clone()),
                    ("MASTER_PORT", cli.master_port.to_string()),
                ],
            }
        })
        .collect();
    let launched = format!(
        "launched ranks {}-{} of {world} on this node (node {} of {}); rendezvous at {}:{}",
        cli.node_rank * n,
        cli.node_rank * n + n - 1,
        cli.node_rank,
        cli.nnodes,
        cli.master_addr,
        cli.master_port
    );
    supervise(cli, &inv, specs, &launched)
}

/// `--max-restarts` without `--nproc-per-node`: the run as one child process, restarted as
/// the ranks of [`run`] are.
pub fn run_one(cli: &Cli) -> Result<Outcome> {
    let inv = cli.invocation(false)?;
    let spec = Spec {
        rank: 0,
        name: "the run".into(),
        env: Vec::new(),
    };
    supervise(cli, &inv, vec![spec], "")
}

/// The arguments for the children: this command line, with the run directory made explicit
/// (a default one is named after the time, and a restart must find the same one).
fn child_args(cli: &Cli, run_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if cli.run_dir.is_none() && cli.resume.is_none() {
        args.push("--run-dir".into());
        args.push(run_dir.into());
    }
    args
}

fn supervise(
    cli: &Cli,
    inv: &crate::args::Invocation,
    specs: Vec<Spec>,
    launched: &str,
) -> Result<Outcome> {
    let exe = std::env::current_exe().context("finding sid-launch's own executable")?;
    let args = child_args(cli, &inv.run_dir);
    // Static, so that the handler needs no handle of its own: one supervisor a process.
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    // Removed when dropped.
    let reports = tempfile::Builder::new()
        .prefix("sid-launch-")
        .tempdir()
        .context("creating a folder for the ranks' failure files")?;
    let n = specs.len();
    // The previous failure: its errors and the checkpoint it left, for spotting a repeat.
    let mut previous: Option<(Vec<String>, Option<u64>)> = None;
    for attempt in 0..=cli.max_restarts {
        let exits = run_attempt(
            &exe,
            &args,
            &specs,
            attempt,
            cli.max_restarts,
            reports.path(),
            &INTERRUPTED,
            inv.config.runtime.step_timeout,
            launched,
        )?;
        let failed: Vec<&Exit> = exits.iter().filter(|e| e.failed()).collect();
        if failed.is_empty() {
            if n > 1 {
                eprintln!("all {n} ranks on this node finished");
            }
            return Ok(Outcome::Done);
        }
        let rank0 = exits.iter().find(|e| e.rank == 0);
        let rank0_interrupted = rank0.is_some_and(|e| e.status.and_then(|s| s.code()) == Some(130));
        let causes: Vec<String> = failed.iter().map(|e| e.cause()).collect();
        let causes = causes.join(", ");
        if rank0_interrupted && failed.len() == 1 {
            return Ok(Outcome::Interrupted);
        }
        // Several are the ranks of `run`.
        let summary = match failed.len() {
            k if n > 1 => format!("{k} of {n} ranks on this node failed: {causes}"),
            _ => causes.clone(),
        };
        // Failed on their own (not stopped here).
        let own: Vec<&&Exit> = failed.iter().filter(|e| !e.stopped).collect();
        let fatal = own
            .iter()
            .any(|e| e.status.and_then(|s| s.code()) == Some(i32::from(EXIT_NOT_RESTARTABLE)));
        let fail = |message: String, restartable: bool| -> anyhow::Error {
            Failed {
                message,
                restartable,
            }
            .into()
        };
        if INTERRUPTED.load(Ordering::SeqCst) || cli.max_restarts == 0 {
            return Err(fail(summary, !fatal));
        }
        if fatal {
            return Err(fail(
                format!("{summary}; not restarted: a disk, setting, data or checkpoint error, which a restart cannot fix"),
                false,
            ));
        }
        if attempt == cli.max_restarts {
            return Err(fail(
                format!(
                    "{summary}; no restart left (--max-restarts {})",
                    cli.max_restarts
                ),
                true,
            ));
        }
        let checkpoint = sid_train::checkpoint::load_newest(&inv.run_dir).ok();
        let at = checkpoint.as_ref().map(|c| c.position.global_step);
        // A repeat: the same error again from the same checkpoint, with no rank killed from
        // outside (a signal is no evidence that the failure is the run's own).
        let errors: Vec<String> = own.iter().filter_map(|e| e.error.clone()).collect();
        let external = own
            .iter()
            .any(|e| e.status.is_some_and(|s| s.code().is_none()));
        if let Some((before, was_at)) = &previous {
            if !external && *was_at == at && errors.iter().any(|e| before.contains(e)) {
                return Err(fail(
                    format!(
                        "{summary}; not restarted again: the same failure came back at the same point (restart {attempt} of {} resumed from the same checkpoint)",
                        cli.max_restarts
                    ),
                    false,
                ));
            }
        }
        previous = Some((if external { Vec::new() } else { errors }, at));
        let from = match checkpoint.as_ref().map(|c| (c.path.display(), &c.position)) {
            Some((path, p)) if p.step_in_epoch > 0 => {
                let (e, s, all) = (p.epochs_done + 1, p.step_in_epoch, p.global_step);
                format!("{path} (epoch {e}, step {s} of it, {all} steps in all)")
            }
            Some((path, p)) => {
                let (e, all) = (p.epochs_done, p.global_step);
                format!("{path} (the end of epoch {e}, {all} steps in all)")
            }
            None => "the start (no checkpoint yet)".into(),
        };
        eprintln!(
            "restart {} of {}: {}; starting {} again from {from}",
            attempt + 1,
            cli.max_restarts,
            causes,
            if n > 1 { "every rank" } else { "the run" }
        );
    }
    unreachable!("the last attempt returns")
}

/// Starts every rank once and waits until all have ended; after the first failure, the others
/// have [`STOP_GRACE`] to stop on their own, then are stopped (SIGTERM, then SIGKILL).
#[allow(clippy::too_many_arguments)]
fn run_attempt(
    exe: &Path,
    args: &[std::ffi::OsString],
    specs: &[Spec],
    attempt: u32,
    max_restarts: u32,
    reports: &Path,
    interrupted: &AtomicBool,
    step_timeout: f64,
    launched: &str,
) -> Result<Vec<Exit>> {
    let mut children: Vec<(&Spec, Child, PathBuf)> = Vec::with_capacity(specs.len());
    for spec in specs {
        let report = reports.join(format!("rank{}-attempt{attempt}", spec.rank));
        let _ = std::fs::remove_file(&report);
        let mut cmd = Command::new(exe);
        cmd.args(args).env(FAILURE_FILE_VAR, &report);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if max_restarts > 0 {
            // What torchrun's agent sets: a rank with a restart count above 0 resumes.
            cmd.env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
                .env("TORCHELASTIC_MAX_RESTARTS", max_restarts.to_string());
        }
        match cmd.spawn() {
            Ok(child) => children.push((spec, child, report)),
            Err(e) => {
                for (_, c, _) in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("starting rank {}", spec.rank));
            }
        }
    }
    if !launched.is_empty() {
        eprintln!("{launched}");
    }
    // While an interrupt is handled (rank 0 writing its checkpoint), the others get as long as
    // their own timeouts need.
    let interrupt_grace = Duration::from_secs_f64(step_timeout) + Duration::from_secs(30);
    let n = children.len();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut stopped = vec![false; n];
    let mut first_failure: Option<Instant> = None;
    let mut forwarded = false;
    let mut terminated: Option<Instant> = None;
    loop {
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (_, c, _) in &children {
                // SAFETY: kill only sends a signal to our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            }
        }
        for (i, (spec, c, _)) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                if let Some(s) = c.try_wait().context("waiting for a rank")? {
                    statuses[i] = Some(s);
                    if !s.success() && !stopped[i] {
                        eprintln!("{} {}", spec.name, describe(s));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        if statuses.iter().all(|s| s.is_some()) {
            break;
        }
        let grace = if forwarded {
            interrupt_grace
        } else {
            STOP_GRACE
        };
        match (first_failure, terminated) {
            (Some(t), None) if t.elapsed() > grace => {
                for (i, (spec, c, _)) in children.iter().enumerate() {
                    if statuses[i].is_none() {
                        eprintln!("stopping {}: another rank failed", spec.name);
                        stopped[i] = true;
                        // SAFETY: kill only sends a signal to our own child.
                        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    }
                }
                terminated = Some(Instant::now());
            }
            (_, Some(t)) if t.elapsed() > KILL_GRACE => {
                for (i, (_, c, _)) in children.iter_mut().enumerate() {
                    if statuses[i].is_none() {
                        let _ = c.kill();
                        statuses[i] = c.wait().ok();
                    }
                }
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(children
        .into_iter()
        .zip(statuses)
        .zip(stopped)
        .map(|(((spec, _, report), status), stopped)| Exit {
            rank: spec.rank,
            name: spec.name.clone(),
            status,
            stopped,
            error: std::fs::read_to_string(&report)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        })
        .collect())
}
