//! `sid-launch`: train with SID or backprop from the command line.

mod args;
mod export;
mod launch;
mod predict;
mod progress;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use sid_train::devices::device_name;
use sid_train::{Run, TrainError};

/// Log lines on stderr (`RUST_LOG`, default warn), plus a Chrome trace with `--trace FILE`.
fn init_tracing(trace: Option<&std::path::Path>) -> Result<Option<tracing_chrome::FlushGuard>> {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::prelude::*;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()));
    let (chrome, guard) = match trace {
        Some(path) => {
            // A trace inside a run directory that this run is about to create is common.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "--trace {}: cannot create {}",
                        path.display(),
                        dir.display()
                    )
                })?;
            }
            std::fs::File::create(path)
                .with_context(|| format!("--trace {}: cannot write", path.display()))?;
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                .file(path)
                .include_args(true)
                .build();
            let targets = "sid_core=trace,sid_runtime=trace,sid_train=debug";
            let targets: Targets = targets.parse().expect("valid targets");
            (Some(layer.with_filter(targets)), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(chrome).init();
    Ok(guard)
}

fn main() -> ExitCode {
    // NVML numbers GPUs in PCI order; make CUDA agree before anything touches CUDA.
    if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    // libtorch's c10d logs every retry to reach the rendezvous store with a stack trace; our
    // own one-line errors say what failed (TORCH_CPP_LOG_LEVEL=INFO shows libtorch's view).
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        std::env::set_var("TORCH_CPP_LOG_LEVEL", "FATAL");
    }
    // A stage's panic is caught and reported by the coordinator as one line naming the stage,
    // device and cause; the default hook would print it a second time, with a backtrace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("sid-stage"))
        {
            tracing::debug!("stage panic: {info}");
        } else {
            default_hook(info);
        }
    }));
    // A write past a file-size limit (`ulimit -f`) fails with an error naming the file, as a
    // full disk's does, instead of killing the process.
    // SAFETY: ignoring a signal changes no memory of this program.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let cli = args::Cli::parse_with_resume_help();
    let _trace_guard = match init_tracing(cli.trace.as_deref()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(TrainError::Interrupted { checkpoint, .. }) = e.downcast_ref::<TrainError>()
            {
                eprintln!("stopped: {}", one_line(&e));
                if let Some(dir) = checkpoint.parent() {
                    eprintln!("continue with: sid-launch --resume {}", dir.display());
                }
                return ExitCode::from(130);
            }
            if e.downcast_ref::<launch::Interrupted>().is_some() {
                eprintln!("stopped: {}", one_line(&e));
                return ExitCode::from(130);
            }
            let line = one_line(&e);
            eprintln!("error: {line}");
            // A supervising launcher (--max-restarts) reads what failed.
            if let Some(path) = std::env::var_os(launch::FAILURE_FILE_VAR) {
                let _ = std::fs::write(path, &line);
            }
            let code = if restartable(&e) {
                1
            } else {
                launch::EXIT_NOT_RESTARTABLE
            };
            if std::env::var_os("RANK").is_some() {
                // A rank's link threads may still be blocked in Gloo: exit's C++ static
                // destructors would tear libtorch down under them (seen: a segfault after the
                // error line, which a launcher then reports as a crash). Files are only ever
                // replaced atomically and the error is written.
                use std::io::Write;
                let _ = std::io::stdout().flush();
                let _ = std::io::stderr().flush();
                // SAFETY: _exit only ends the process.
                unsafe { libc::_exit(i32::from(code)) }
            }
            ExitCode::from(code)
        }
    }
}

/// Whether a restart may get past `e`: a rank that died or hung, a failed stage or link, a
/// non-finite loss. A disk, setting, data or checkpoint error is the same after a restart.
fn restartable(e: &anyhow::Error) -> bool {
    use sid_runtime::RuntimeError;
    if let Some(f) = e.downcast_ref::<launch::Failed>() {
        return f.restartable;
    }
    match e.downcast_ref::<TrainError>() {
        Some(TrainError::Runtime(RuntimeError::Config(_) | RuntimeError::Placement(_))) => false,
        Some(TrainError::Runtime(_) | TrainError::Core(_)) => true,
        _ => false,
    }
}

/// An error and its causes on one line, `context: cause: cause`, each cause once: a cause
/// whose text its message already holds (`path: No such file or directory (os error 2)`
/// over the I/O error itself) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `sid-launch eval RUN_DIR`: the early-exit table of a saved run.
fn eval(a: &args::EvalArgs) -> Result<()> {
    if let Some(bad) = a.exit_confidence.iter().find(|&&t| !(t > 0.0 && t <= 1.0)) {
        anyhow::bail!("--exit-confidence {bad}: a threshold must be in (0, 1]");
    }
    let dir = &a.run_dir;
    let mut saved = sid_train::eval::open(dir, a.gpus.as_deref())
        .with_context(|| format!("eval {}", dir.display()))?;
    let (cfg, samples) = (&saved.cfg, saved.data.test.len());
    let batch = a.eval_batch_size.unwrap_or(cfg.runtime.eval_batch_size);
    anyhow::ensure!(batch >= 1, "--eval-batch-size must be at least 1");
    eprintln!(
        "early exit on the test set of {} ({samples} samples, {} with L={} on {})",
        dir.display(),
        cfg.optim.method,
        cfg.model.modules,
        device_name(saved.net.input_device())
    );
    let rows = sid_train::eval::exit_table(&mut saved, batch, &a.exit_confidence)?;
    println!(
        "{:<8} {:>9} {:>13} {:>10}",
        "τ", "accuracy", "mean modules", "ms/sample"
    );
    for r in rows {
        let tau = r.tau.map_or("full".to_string(), |t| format!("{t}"));
        println!(
            "{tau:<8} {:>8.2}% {:>13.2} {:>10.4}",
            r.accuracy * 100.0,
            r.mean_modules,
            r.ms_per_sample
        );
    }
    let health = sid_train::trainer::cascade_health(saved.net.as_mut(), &saved.data.test, batch)?;
    println!(
        "\n{:<8} {:>9} {:>12} {:>16}",
        "module", "accuracy", "KL(p_y‖p)", "KL(p_prev‖p)"
    );
    let label = health.mean_label_kl();
    let modules = health
        .accuracy()
        .into_iter()
        .zip(&label)
        .zip(health.mean_teacher_kl());
    for (i, ((acc, label), teacher)) in modules.enumerate() {
        let acc = acc * 100.0;
        println!("{:<8} {acc:>8.2}% {label:>12.4} {teacher:>16.4}", i + 1);
    }
    println!("{}", progress::cascade_verdict(&label).trim_start());
    Ok(())
}

fn run(cli: &args::Cli) -> Result<()> {
    match &cli.command {
        Some(args::Command::Eval(a)) => return eval(a),
        Some(args::Command::Predict(a)) => return predict::run(a),
        Some(args::Command::Export(a)) => return export::run(a),
        None => {}
    }
    let dist_env = sid_dist::DistEnv::from_env()?;
    match (cli.nproc_per_node, &dist_env) {
        (Some(n), None) => return launch::run(cli, n),
        // The run itself as a child that is restarted when it fails (unless this is that
        // child, or a rank that torchrun's agent restarts).
        (None, None) if cli.max_restarts > 0 && args::restart_env()?.is_none() => {
            return launch::run_one(cli)
        }
        _ => {}
    }
    let inv = cli.invocation(dist_env.as_ref().is_some_and(|e| e.rank > 0))?;
    if let Some(n) = inv.config.runtime.threads {
        tch::set_num_threads(n);
    }
    let rdv = match dist_env {
        Some(env) => {
            let rank = env.rank;
            let joined =
                sid_train::distributed::Rendezvous::join(env, &inv.config, inv.follows_rank0);
            Some(joined.with_context(|| format!("rank {rank}"))?)
        }
        None => None,
    };
    if let Some(r) = rdv.as_ref().filter(|r| r.rank() != 0) {
        // Rank 0 decides when to stop (after the current step, with a checkpoint) and
        // closes the pipeline; an interrupt here would only cut that short.
        ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
        let rank = r.rank();
        eprintln!(
            "rank {rank} of {} on {}: serving its stage for rank 0",
            r.world(),
            device_name(r.device())
        );
        // Every rank's telemetry beside rank 0's, each sample naming its rank; the sampler
        // writes its last sample when dropped, as this returns.
        let _sampler = if cli.telemetry_hz > 0.0 {
            let dir = r.wait_run_dir()?;
            let path = dir.join(format!("telemetry-rank{rank}.jsonl"));
            let interval = std::time::Duration::from_secs_f64(1.0 / cli.telemetry_hz);
            let (s, _) = sid_telemetry::Sampler::start_for_rank(&path, interval, Some(rank))
                .with_context(|| format!("starting telemetry into {}", path.display()))?;
            Some(s)
        } else {
            None
        };
        return sid_train::network::serve(r, &inv.config).with_context(|| format!("rank {rank}"));
    }
    if let Some(r) = &rdv {
        r.publish_run_dir(&inv.run_dir)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, mut first) = (stop.clone(), None::<std::time::Instant>);
    ctrlc::set_handler(move || match first {
        None => {
            first = Some(std::time::Instant::now());
            flag.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupt: stopping after the current step and writing a checkpoint (Ctrl-C again to quit now)");
        }
        // A wrapper such as `timeout` can deliver one interrupt twice at once (to the process
        // and to its group): only a later, second press means "quit now".
        Some(t) if t.elapsed() < std::time::Duration::from_millis(500) => {}
        Some(_) => {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            // _exit, not exit: exit's C++ static destructors would tear libtorch and CUDA down
            // under the training thread (seen: a segfault on a GPU). Files are only ever
            // replaced atomically, so nothing written is lost.
            // SAFETY: _exit only ends the process.
            unsafe { libc::_exit(130) }
        }
    })
    .context("installing the Ctrl-C handler")?;
    let cfg = &inv.config;
    if let Some(restart) = inv.starts_over {
        // Restarted before its first checkpoint: an epoch's record without the checkpoint
        // that goes with it would stop the new start.
        let stale = inv.run_dir.join(sid_train::trainer::METRICS_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
        eprintln!(
            "no checkpoint in {} yet: restart {restart} starts the run over",
            inv.run_dir.display()
        );
    }
    let mut run = if inv.resume {
        Run::resume_on(cfg.clone(), &inv.run_dir, rdv.as_ref())
    } else {
        Run::create_on(cfg.clone(), &inv.run_dir, rdv.as_ref())
    }
    .map_err(|e| hint(e, cfg))?;
    let devices: Vec<String> = run.devices().iter().map(|d| device_name(*d)).collect();
    eprintln!(
        "{} on {} with {} extractor, L={} modules, {} epochs, batch {}, lr {}, seed {} on [{}]; run dir {}",
        cfg.optim.method,
        cfg.data.dataset,
        cfg.model.extractor,
        cfg.model.modules,
        cfg.optim.epochs,
        cfg.optim.batch_size,
        cfg.optim.lr,
        cfg.optim.seed,
        devices.join(", "),
        run.dir().display()
    );
    eprintln!("{}", progress::params_line(&run.config().model_config()));
    eprintln!("{}", run.plan());
    for note in run.stage_notes().iter().chain(&run.plan().notes) {
        eprintln!("  {note}");
    }
    if let sid_train::Layout::Paper { devices, placement } = &run.plan().layout {
        for (k, (d, r)) in devices.iter().zip(placement.blocks()).enumerate() {
            eprintln!(
                "  stage {} ({}): modules {}-{}",
                k + 2,
                device_name(*d),
                r.start + 1,
                r.end
            );
        }
    }
    if cfg.optim.method == sid_core::Method::Bp
        && run.devices().len() > 1
        && matches!(run.plan().layout, sid_train::Layout::Whole(_))
    {
        eprintln!("note: backprop trains end to end on the first listed device only");
    }
    if run.epochs_done() > 0 || inv.resume {
        eprintln!("resuming after epoch {}", run.epochs_done());
    }
    let sampler = if cli.telemetry_hz > 0.0 {
        let path = run.dir().join("telemetry.jsonl");
        let interval = std::time::Duration::from_secs_f64(1.0 / cli.telemetry_hz);
        let rank = rdv.as_ref().map(|r| r.rank());
        let (sampler, gpu_off) = sid_telemetry::Sampler::start_for_rank(&path, interval, rank)
            .with_context(|| format!("starting telemetry into {}", path.display()))?;
        if let Some(why) = gpu_off {
            eprintln!("telemetry: GPU telemetry off ({why}); recording RSS and stage CPU time");
        }
        Some(sampler)
    } else {
        None
    };
    let steps = run.dir().join("steps.jsonl");
    let mut reporter =
        progress::Reporter::new(cfg.optim.batch_size, cli.log_steps.then_some(&*steps))
            .with_context(|| format!("--log-steps: cannot write {}", steps.display()))?;
    let mut tensorboard = match &cfg.runtime.tensorboard {
        Some(dir) => Some(
            sid_train::tensorboard::TensorBoard::create(dir, cfg.optim.lr)
                .with_context(|| format!("--tensorboard {}", dir.display()))?,
        ),
        None => None,
    };
    let mut tensorboard_failed = None;
    let result = run.train(&stop, &mut |e| {
        if let Some(tb) = tensorboard.as_mut() {
            // A full disk or a removed folder stops the event files, not the run.
            if let Err(err) = tb.on_event(&e) {
                tensorboard_failed = Some(err);
                tensorboard = None;
            }
        }
        reporter.on_event(e)
    });
    if let Some(err) = tensorboard_failed {
        eprintln!("warning: TensorBoard event files stopped: {err}");
    }
    let cpu_seconds = sampler.map(|s| s.stop());
    let summary = result?;
    println!(
        "final-epoch test accuracy: {:.2}% (epoch {}, {})",
        summary.final_test_acc * 100.0,
        summary.epochs,
        summary.method
    );
    let chosen = if summary.best_epoch_chosen_by == "validation" {
        "best epoch by validation accuracy"
    } else {
        "best epoch by test accuracy (selection on the test set; for reference only)"
    };
    println!(
        "{chosen}: epoch {}, test accuracy {:.2}%",
        summary.best_epoch,
        summary.best_epoch_test_acc * 100.0
    );
    let peaks: Vec<String> = summary
        .peak_memory
        .iter()
        .map(|p| {
            let mib = p.bytes as f64 / (1 << 20) as f64;
            format!("{} {mib:.1} MiB ({})", p.device, p.source)
        })
        .collect();
    if !peaks.is_empty() {
        println!(
            "peak memory per device during training: {}",
            peaks.join(", ")
        );
    }
    if let Some(cpu_seconds) = cpu_seconds {
        let busy: Vec<String> = cpu_seconds
            .iter()
            .filter(|(n, _)| n.starts_with("sid-stage"))
            .map(|(n, s)| format!("{n} {s:.1} s"))
            .collect();
        if !busy.is_empty() {
            println!("stage CPU time: {}", busy.join(", "));
        }
    }
    if run.plan().graphs != sid_train::Graphs::Off {
        // Whether the graphs were in effect: a failed capture falls back to eager steps.
        let g = sid_core::graph::counts();
        if g.captured > 0 {
            println!("CUDA graph: {} captured, {} replays", g.captured, g.replays);
        } else {
            println!("no CUDA graph: every step ran eagerly");
        }
    }
    println!("run directory: {}", run.dir().display());
    Ok(())
}

/// Adds the fix to errors a user can act on.
fn hint(e: TrainError, cfg: &sid_train::RunConfig) -> anyhow::Error {
    let missing_default = matches!(&e, TrainError::Data(sid_data::DataError::MissingDir(_)))
        && cfg.data.data_dir.is_none()
        && cfg.data.dataset == sid_data::DatasetKind::FashionMnist;
    if missing_default {
        anyhow::anyhow!(
            "{e} (install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir)"
        )
    } else {
        e.into()
    }
}

// Checks docs/usage.md against `--help`.
#[cfg(test)]
mod usage;
