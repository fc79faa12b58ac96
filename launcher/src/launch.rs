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

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

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

/// The ranks were interrupted and rank 0 saved a checkpoint (exit 130, like a one-process
/// run).
#[derive(Debug, thiserror::Error)]
#[error("interrupted: rank 0 stopped after the current step and wrote a checkpoint")]
pub struct Interrupted;

/// `exited with code 1`, `was killed by SIGKILL, signal 9`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
            Ok(name) => format!("was killed by {name}, signal {s}"),
            Err(_) => format!("was killed by signal {s}"),
        },
        _ => "ended with an unknown status".into(),
    }
}

/// One process to start: its rank, its name in messages and the variables that place it.
struct Spec {
    rank: usize,
    name: String,
    env: Vec<(&'static str, String)>,
}

/// One rank of an attempt: its process, then how it ended.
struct Exit<'a> {
    spec: &'a Spec,
    child: Child,
    /// The file it writes its one-line error to.
    report: PathBuf,
    status: Option<ExitStatus>,
    /// Stopped by this launcher after another rank failed.
    stopped: bool,
}

impl Exit<'_> {
    fn failed(&self) -> bool {
        !self.status.is_some_and(|s| s.success())
    }

    fn exited(&self, code: i32) -> bool {
        self.status.and_then(|s| s.code()) == Some(code)
    }

    /// Its own one-line error, if it wrote one.
    fn error(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.report).ok()?;
        Some(text.trim().to_string()).filter(|s| !s.is_empty())
    }

    fn cause(&self) -> String {
        let status = self.status.map_or("ended with no status".into(), describe);
        let stopped = if self.stopped { " (stopped)" } else { "" };
        let error = self.error().map(|e| format!(" ({e})")).unwrap_or_default();
        format!("{} {status}{stopped}{error}", self.spec.name)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

/// Starts `n` ranks of this node and waits for all of them; restarts them as `--max-restarts`
/// allows. Fails with [`Interrupted`] when rank 0 was interrupted.
pub fn run(cli: &Cli, n: usize) -> Result<()> {
    let (node, nodes) = (cli.node_rank, cli.nnodes);
    ensure!(n > 0, "--nproc-per-node must be at least 1");
    let last = nodes.saturating_sub(1);
    ensure!(
        node < nodes,
        "--node-rank {node} does not fit --nnodes {nodes} (nodes are 0..{last})"
    );
    ensure!(cli.max_restarts == 0 || nodes == 1, "--max-restarts with --nnodes {nodes}: each node restarts only its own ranks; restart a job of several nodes with torchrun's --max-restarts and --run-dir");
    // Refuse bad settings once, here, rather than in every rank (a node that resumes without
    // the run directory learns the settings from rank 0, whose node checks them).
    let inv = cli.invocation(node > 0)?;
    let world = n * nodes;
    let (stages, replicas) = (inv.config.model.stages, inv.config.runtime.data_parallel);
    let k = stages * replicas;
    ensure!(k == world || inv.follows_rank0, "--stages {stages} × --data-parallel {replicas} = {k} ranks, but --nproc-per-node {n} × --nnodes {nodes} = {world}");
    let (first, addr, port) = (node * n, &cli.master_addr, cli.master_port);
    let specs = (0..n)
        .map(|local| {
            let rank = first + local;
            Spec {
                rank,
                name: format!("rank {rank}"),
                env: vec![
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", world.to_string()),
                    ("LOCAL_RANK", local.to_string()),
                    ("LOCAL_WORLD_SIZE", n.to_string()),
                    ("GROUP_RANK", node.to_string()),
                    ("MASTER_ADDR", addr.clone()),
                    ("MASTER_PORT", port.to_string()),
                ],
            }
        })
        .collect();
    let last = first + n - 1;
    let launched = format!("launched ranks {first}-{last} of {world} on this node (node {node} of {nodes}); rendezvous at {addr}:{port}");
    supervise(cli, &inv, specs, &launched)
}

/// `--max-restarts` without `--nproc-per-node`: the run as one child process, restarted as
/// the ranks of [`run`] are.
pub fn run_one(cli: &Cli) -> Result<()> {
    let inv = cli.invocation(false)?;
    let spec = Spec {
        rank: 0,
        name: "the run".into(),
        env: Vec::new(),
    };
    supervise(cli, &inv, vec![spec], "")
}

/// Set by the Ctrl-C handler of [`supervise`] (one supervisor a process).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn supervise(
    cli: &Cli,
    inv: &crate::args::Invocation,
    specs: Vec<Spec>,
    launched: &str,
) -> Result<()> {
    let exe = std::env::current_exe().context("finding sid-launch's own executable")?;
    // The children's arguments: this command line, with the run directory made explicit (a
    // default one is named after the time, and a restart must find the same one).
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if cli.run_dir.is_none() && cli.resume.is_none() {
        args.extend(["--run-dir".into(), inv.run_dir.clone().into()]);
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    // Removed when dropped.
    let reports = tempfile::Builder::new()
        .prefix("sid-launch-")
        .tempdir()
        .context("creating a folder for the ranks' failure files")?;
    // While an interrupt is handled (rank 0 writing its checkpoint), the others get as long as
    // their own timeouts need.
    let step_timeout = Duration::from_secs_f64(inv.config.runtime.step_timeout);
    let interrupt_grace = step_timeout + Duration::from_secs(30);
    let (n, max) = (specs.len(), cli.max_restarts);
    // The previous failure: its errors and the checkpoint it left, for spotting a repeat.
    let mut previous: Option<(Vec<String>, Option<u64>)> = None;
    for attempt in 0..=max {
        let commands = specs.iter().map(|spec| {
            let report = format!("rank{}-attempt{attempt}", spec.rank);
            let report = reports.path().join(report);
            let mut cmd = Command::new(&exe);
            cmd.args(&args).env(FAILURE_FILE_VAR, &report);
            cmd.envs(spec.env.iter().cloned());
            if max > 0 {
                // What torchrun's agent sets: a rank with a restart count above 0 resumes.
                cmd.env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
                    .env("TORCHELASTIC_MAX_RESTARTS", max.to_string());
            }
            (spec, cmd, report)
        });
        let exits = run_attempt(commands, launched, interrupt_grace)?;
        let failed: Vec<&Exit> = exits.iter().filter(|e| e.failed()).collect();
        if failed.is_empty() {
            if n > 1 {
                eprintln!("all {n} ranks on this node finished");
            }
            return Ok(());
        }
        if failed.len() == 1 && failed[0].spec.rank == 0 && failed[0].exited(130) {
            return Err(Interrupted.into());
        }
        let causes: Vec<String> = failed.iter().map(|e| e.cause()).collect();
        let causes = causes.join(", ");
        // Several are the ranks of `run`.
        let summary = match failed.len() {
            k if n > 1 => format!("{k} of {n} ranks on this node failed: {causes}"),
            _ => causes.clone(),
        };
        // Failed on their own (not stopped here).
        let own: Vec<&&Exit> = failed.iter().filter(|e| !e.stopped).collect();
        let fatal = own.iter().any(|e| e.exited(EXIT_NOT_RESTARTABLE.into()));
        let fail = |message: String, restartable: bool| -> anyhow::Error {
            Failed {
                message,
                restartable,
            }
            .into()
        };
        if INTERRUPTED.load(Ordering::SeqCst) || max == 0 {
            return Err(fail(summary, !fatal));
        }
        if fatal {
            return Err(fail(
                format!("{summary}; not restarted: a disk, setting, data or checkpoint error, which a restart cannot fix"),
                false,
            ));
        }
        if attempt == max {
            let message = format!("{summary}; no restart left (--max-restarts {max})");
            return Err(fail(message, true));
        }
        let checkpoint = sid_train::checkpoint::load_newest(&inv.run_dir).ok();
        let at = checkpoint.as_ref().map(|c| c.position.global_step);
        // A repeat: the same error again from the same checkpoint, with no rank killed from
        // outside (a signal is no evidence that the failure is the run's own).
        let errors: Vec<String> = own.iter().filter_map(|e| e.error()).collect();
        let external = own
            .iter()
            .any(|e| e.status.is_some_and(|s| s.code().is_none()));
        if let Some((before, was_at)) = &previous {
            if !external && *was_at == at && errors.iter().any(|e| before.contains(e)) {
                return Err(fail(
                    format!("{summary}; not restarted again: the same failure came back at the same point (restart {attempt} of {max} resumed from the same checkpoint)"),
                    false,
                ));
            }
        }
        previous = Some((if external { Vec::new() } else { errors }, at));
        let from = match &checkpoint {
            Some(c) => {
                let p = &c.position;
                let at = match p.step_in_epoch {
                    0 => format!("the end of epoch {}", p.epochs_done),
                    s => format!("epoch {}, step {s} of it", p.epochs_done + 1),
                };
                let (path, all) = (c.path.display(), p.global_step);
                format!("{path} ({at}, {all} steps in all)")
            }
            None => "the start (no checkpoint yet)".into(),
        };
        let (next, who) = (attempt + 1, if n > 1 { "every rank" } else { "the run" });
        eprintln!("restart {next} of {max}: {causes}; starting {who} again from {from}");
    }
    unreachable!("the last attempt returns")
}

/// Starts every rank once and waits until all have ended; after the first failure, the others
/// have [`STOP_GRACE`] (`interrupt_grace` after an interrupt) to stop on their own, then are
/// stopped (SIGTERM, then SIGKILL).
fn run_attempt<'a>(
    commands: impl Iterator<Item = (&'a Spec, Command, PathBuf)>,
    launched: &str,
    interrupt_grace: Duration,
) -> Result<Vec<Exit<'a>>> {
    let mut ranks: Vec<Exit> = Vec::new();
    for (spec, mut cmd, report) in commands {
        match cmd.spawn() {
            Ok(child) => ranks.push(Exit {
                spec,
                child,
                report,
                status: None,
                stopped: false,
            }),
            Err(e) => {
                for r in &mut ranks {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
                return Err(e).with_context(|| format!("starting rank {}", spec.rank));
            }
        }
    }
    if !launched.is_empty() {
        eprintln!("{launched}");
    }
    let (mut first_failure, mut terminated) = (None::<Instant>, None::<Instant>);
    // After an interrupt is forwarded, the others get `interrupt_grace`.
    let (mut forwarded, mut grace) = (false, STOP_GRACE);
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) && !forwarded {
            (forwarded, grace) = (true, interrupt_grace);
            ranks.iter().for_each(|r| r.signal(libc::SIGINT));
        }
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            if let Some(s) = r.child.try_wait().context("waiting for a rank")? {
                r.status = Some(s);
                if !s.success() && !r.stopped {
                    eprintln!("{} {}", r.spec.name, describe(s));
                    first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        let mut running: Vec<&mut Exit> = ranks.iter_mut().filter(|r| r.status.is_none()).collect();
        if running.is_empty() {
            break;
        }
        match (first_failure, terminated) {
            (Some(t), None) if t.elapsed() > grace => {
                for r in running {
                    eprintln!("stopping {}: another rank failed", r.spec.name);
                    r.stopped = true;
                    r.signal(libc::SIGTERM);
                }
                terminated = Some(Instant::now());
            }
            (_, Some(t)) if t.elapsed() > KILL_GRACE => {
                for r in &mut running {
                    let _ = r.child.kill();
                    r.status = r.child.wait().ok();
                }
                break;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ranks)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn an_exit_status_reads_as_a_code_or_a_named_signal() {
        let status = |raw| describe(ExitStatus::from_raw(raw));
        assert_eq!(status(3 << 8), "exited with code 3");
        assert_eq!(status(libc::SIGKILL), "was killed by SIGKILL, signal 9");
        assert_eq!(status(libc::SIGUSR1), "was killed by SIGUSR1, signal 10");
        // Real-time signals have no name of their own.
        assert_eq!(
            status(libc::SIGRTMIN() + 1),
            format!("was killed by signal {}", libc::SIGRTMIN() + 1)
        );
    }
}
