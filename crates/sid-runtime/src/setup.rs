//! What every engine of the stage pipeline shares: the stages' runners, built from its
//! settings ([`StagedConfig`]), and the thread that runs one stage over a [`ChannelTransport`] — used by
//! the coordinator ([`crate::staged`]) and by the ranks that serve a stage in another process
//! ([`crate::ranks`]).

use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use sid_core::bp_stage::build_bp_stages;
use sid_core::stage::build_stages;
use sid_core::unit::Unit;
use sid_core::Net;
use tch::Device;

use crate::config::{PipelineMethod, StagedConfig};
use crate::ops::Schedule;
use crate::placement::Placement;
use crate::schedule::{drive, StageRunner};
use crate::streams;
use crate::transport::{ChannelTransport, Filed, LocalQueues, Message, Report};
use crate::{Failure, Result};

/// How the coordinator reaches its stages.
pub(crate) enum Engine {
    /// Every stage in the caller's thread, one after another.
    Local {
        runners: Vec<StageRunner>,
        queues: LocalQueues,
    },
    /// A thread per stage (or per stage of this process, the others linked by c10d).
    Threads {
        /// Stage 1 of each replica.
        firsts: Vec<Sender<Message>>,
        reports: Receiver<Filed>,
        threads: Vec<StageThread>,
    },
}

/// A thread of the pipeline (a stage, or a link to another process) and the way to learn
/// that it has ended: `Some(cause)` when it failed.
pub(crate) struct StageThread {
    /// For messages: `stage 2`, `the link from rank 0 to rank 1`.
    pub(crate) name: String,
    pub(crate) thread: JoinHandle<()>,
    pub(crate) exited: Receiver<Option<String>>,
}

/// Every stage's runner (weights drawn on the CPU in the fixed order of every network here,
/// whichever stages this process keeps).
pub(crate) fn build_runners(cfg: &StagedConfig) -> Result<Vec<StageRunner>> {
    if cfg.backbone.is_some() && cfg.ranks.is_some() {
        // Other processes learn the run from a published config, which cannot carry code.
        return Err(crate::RuntimeError::Config(
            "your own backbone runs in this process only: no stages in other ranks".into(),
        ));
    }
    // The model with the backbone the stages build: `cfg.backbone`, or the built-in one.
    let net = match &cfg.backbone {
        Some(b) => Net::new(&cfg.model, b.as_ref()),
        None => Net::from(&cfg.model),
    };
    let units: Vec<(Box<dyn Unit>, Schedule)> = match cfg.method {
        PipelineMethod::Sid => build_stages(net, cfg.loss, cfg.lr, &cfg.plan)?
            .into_iter()
            .map(|s| (Box::new(s) as Box<dyn Unit>, Schedule::LocalLoss))
            .collect(),
        PipelineMethod::Bp(schedule) => build_bp_stages(net, cfg.lr, &cfg.plan)?
            .into_iter()
            .map(|s| (Box::new(s) as Box<dyn Unit>, Schedule::Bp(schedule)))
            .collect(),
        PipelineMethod::Paper => {
            // The module blocks of `cfg.devices`, checked against the model.
            let workers = cfg.devices.len();
            let placement = match cfg.placement.clone() {
                Some(p) if p.workers() != workers => {
                    return Err(crate::RuntimeError::Placement(format!(
                        "{} blocks for {workers} devices",
                        p.workers()
                    )))
                }
                Some(p) => p,
                None => Placement::even(cfg.model.modules, workers)?,
            };
            if placement.blocks().last().map(|b| b.end) != Some(cfg.model.modules) {
                return Err(crate::RuntimeError::Placement(format!(
                    "placement {} does not cover {} modules",
                    placement.to_spec(),
                    cfg.model.modules
                )));
            }
            let (extractor, blocks) = crate::paper::build_paper(
                net,
                cfg.loss,
                cfg.lr,
                placement.blocks(),
                cfg.fused_teacher,
            )?;
            std::iter::once((Box::new(extractor) as Box<dyn Unit>, Schedule::Extractor))
                .chain(
                    blocks
                        .into_iter()
                        .map(|b| (Box::new(b) as Box<dyn Unit>, Schedule::LocalLoss)),
                )
                .collect()
        }
    };
    let stages = units.len();
    let blocks = net.block_prefixes();
    let in_backbone = |name: &str| blocks.iter().any(|b| name.starts_with(b.as_str()));
    units
        .into_iter()
        .map(|(mut unit, schedule)| {
            if let Some(lr) = cfg.backbone_lr {
                unit.set_lr_where(lr, &in_backbone);
            }
            StageRunner::new(unit, schedule, stages, cfg)
        })
        .collect()
}

/// Starts the thread that runs one stage over `transport` until its input closes, on a CPU with
/// `cfg.threads_per_stage` intra-op threads or the cores shared among the `sharing` CPU stages
/// of this process, on a GPU with its own CUDA stream when `cfg.streams`. A failure
/// (error or panic) is reported to the coordinator through the transport's report channel
/// and returned through [`StageThread::exited`].
pub(crate) fn spawn_stage(
    cfg: &StagedConfig,
    mut runner: StageRunner,
    mut transport: ChannelTransport,
    sharing: usize,
) -> StageThread {
    let cores = cfg.threads_per_stage.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / sharing.max(1)).max(1) as i32
    });
    let (s, device, own_stream) = (transport.stage, transport.device, cfg.streams);
    spawn_thread(
        format!("sid-stage-{}", s + 1),
        format!("stage {}", s + 1),
        move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if device == Device::Cpu {
                    // A thread's first parallel op copies the process-wide count, which
                    // other stages overwrite: read it first, then set this thread's own.
                    let _ = tch::get_num_threads();
                    tch::set_num_threads(cores);
                }
                if let (Device::Cuda(i), true) = (device, own_stream) {
                    streams::use_pool_stream(i).map_err(|e| Failure::new(e.to_string()))?;
                }
                runner.unit_mut().to_device(device);
                streams::sync_device(device).map_err(|e| Failure::new(e.to_string()))?;
                drive(&mut runner, &mut transport)
            }));
            let failure = match outcome {
                Ok(done) => done.err(),
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Some(Failure::new(format!("panicked: {msg}")))
                }
            };
            if let Some(f) = &failure {
                let _ = transport.reports.send((s, Report::Failed(f.clone())));
            }
            // Dropping the transport closes the link to the next stage, which then stops.
            drop(transport);
            failure.map_or(Ok(()), |f| Err(f.cause))
        },
    )
}

/// A channel between neighbours of the pipeline (stages, links, the coordinator): room for
/// one step's micro-batches and one more, so a stage runs at most about a step ahead.
pub(crate) fn channel<T>(cfg: &StagedConfig) -> (Sender<T>, Receiver<T>) {
    crossbeam_channel::bounded(cfg.micro_batches.max(1) + 1)
}

/// A thread of the pipeline named `name` that runs `body`; a failure is returned through
/// [`StageThread::exited`], which `what` names in messages.
pub(crate) fn spawn_thread(
    name: String,
    what: String,
    body: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> StageThread {
    let (exit_tx, exited) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _ = exit_tx.send(body().err());
        })
        .expect("spawning a pipeline thread");
    StageThread {
        name: what,
        thread,
        exited,
    }
}
