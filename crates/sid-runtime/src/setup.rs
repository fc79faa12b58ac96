//! What every engine of the stage pipeline shares: its settings ([`StagedConfig`]), the
//! stages' runners, and the thread that runs one stage over a [`ChannelTransport`] — used by
//! the coordinator ([`crate::staged`]) and by the ranks that serve a stage in another process
//! ([`crate::ranks`]).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use sid_core::bp_stage::build_bp_stages;
use sid_core::stage::build_stages;
use sid_core::unit::Unit;
use sid_core::{Backbone, LossConfig, Method, ModelConfig, Net, StagePlan};
use tch::{Device, Tensor};

#[cfg(feature = "fault-injection")]
use crate::fault::Fault;
use crate::ops::BpSchedule;
use crate::ops::Schedule;
use crate::placement::Placement;
use crate::ranks::Ranks;
use crate::schedule::{drive, StageRunner};
use crate::streams;
use crate::transport::{ChannelTransport, Filed, Message, Report, Tag};
use crate::{Failure, Result};

/// How to build a [`crate::StagedPipeline`].
#[derive(Debug, Clone)]
pub struct StagedConfig {
    /// Network shape.
    pub model: ModelConfig,
    /// Your own backbone ([`sid_core::Backbone`]) in place of the built-in one that
    /// `model.extractor` names; `model` still gives the features' size, the modules and the
    /// input size. Not with stages in other processes ([`StagedConfig::ranks`]).
    pub backbone: Option<Arc<dyn Backbone>>,
    /// Local loss settings.
    pub loss: LossConfig,
    /// Adam learning rate.
    pub lr: f64,
    /// The backbone's blocks' own learning rate (fine-tuning a pretrained backbone slower
    /// than the necks, head and modules); `None`: `lr`.
    pub backbone_lr: Option<f64>,
    /// One device (the stages run one after another in the caller's thread) or one per stage
    /// (a thread each; a device may be named several times). [`PipelineMethod::Paper`]: one
    /// per module block, the extractor on the first.
    pub devices: Vec<Device>,
    /// Which blocks and modules each stage owns.
    pub plan: StagePlan,
    /// Micro-batches per step: each stage accumulates their gradients and steps once.
    pub micro_batches: usize,
    /// Longest wait for a stage before the step fails.
    pub timeout: Duration,
    /// Intra-op threads per CPU stage thread; `None` = the machine's cores split among them.
    pub threads_per_stage: Option<i32>,
    /// Give each GPU stage its own CUDA stream from libtorch's pool.
    pub streams: bool,
    /// A fault to inject (tests): `worker` is the 0-based stage.
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
    /// What the stages train: staged SID, or the BP baseline cut at the same blocks.
    pub method: PipelineMethod,
    /// The paper's SID ([`PipelineMethod::Paper`]): which modules each device of `devices`
    /// owns; `None` = as even as possible.
    pub placement: Option<Placement>,
    /// Staged SID with one micro-batch: each GPU stage replays its steps from a CUDA graph of
    /// its own (see `sid_core::graph::GraphedStep::stage`; no effect on CPU stages, other
    /// methods, or stages in other processes).
    pub cuda_graph: bool,
    /// The paper's SID: the fused schedule on the module stages (each module's local-step
    /// forward, detached, is the next one's teacher; the same values, one forward less).
    pub fused_teacher: bool,
    /// Charge each stage's libtorch allocations to it ([`sid_telemetry::allocations`]), so
    /// [`crate::StagedPipeline::take_stage_stats`] reports each stage's peak memory even when
    /// stages share a device (benchmarks; every allocation then takes a lock). Stages in
    /// other processes are not measured.
    pub track_memory: bool,
    /// Stages (and data-parallel replicas) in other processes, linked by c10d: this process
    /// is rank 0 and runs stage 1 of replica 1 itself; `devices` then names its device only.
    pub ranks: Option<Ranks>,
}

/// What a pipeline trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineMethod {
    /// Staged SID: no gradient crosses a stage boundary, no flush between steps.
    Sid,
    /// The BP baseline cut at the same blocks (its modules on the last stage), pipelined with
    /// this schedule; every step flushes.
    Bp(BpSchedule),
    /// The paper's SID (`--stages 1`, modules on several devices): stage 1 is the extractor
    /// (on the first device), then one stage per device of `devices` with its block of
    /// modules, which sends its gradient at `z` back to stage 1; every step flushes.
    Paper,
}

impl PipelineMethod {
    /// The stage that stage `s`'s backward sends its gradient to: the previous one in a
    /// backprop pipeline, the extractor from the paper's module stages; none in staged SID.
    pub(crate) fn grad_target(self, s: usize) -> Option<usize> {
        match self {
            Self::Sid => None,
            _ if s == 0 => None,
            Self::Bp(_) => Some(s - 1),
            Self::Paper => Some(0),
        }
    }
}

impl StagedConfig {
    /// The whole network on one device, its stages run one after another in the caller's
    /// thread: SID as the paper's layout with one block of modules (the extractor's stage,
    /// then every module's), BP as one stage. What `sid-launch` trains on one device.
    pub fn single_device(model: ModelConfig, device: Device, method: Method) -> Result<Self> {
        let plan = StagePlan::even(&model, 1)?;
        let mut cfg = Self::new(model, vec![device], plan);
        cfg.method = match method {
            Method::Sid => PipelineMethod::Paper,
            Method::Bp => PipelineMethod::Bp(BpSchedule::OneFOneB),
        };
        Ok(cfg)
    }

    /// Defaults for everything but the model, the devices and the plan: reference loss,
    /// lr 1e-3, one micro-batch, 300 s timeout, streams on.
    pub fn new(model: ModelConfig, devices: Vec<Device>, plan: StagePlan) -> Self {
        Self {
            model,
            backbone: None,
            loss: LossConfig::default(),
            lr: 1e-3,
            backbone_lr: None,
            devices,
            plan,
            micro_batches: 1,
            timeout: Duration::from_secs(300),
            threads_per_stage: None,
            streams: true,
            #[cfg(feature = "fault-injection")]
            fault: None,
            method: PipelineMethod::Sid,
            placement: None,
            fused_teacher: false,
            cuda_graph: false,
            track_memory: false,
            ranks: None,
        }
    }
}

/// How the coordinator reaches its stages.
pub(crate) enum Engine {
    /// Every stage in the caller's thread, one after another.
    Local {
        runners: Vec<StageRunner>,
        inboxes: Vec<VecDeque<Message>>,
        reports: VecDeque<Filed>,
        /// Gradients sent back, per receiving stage.
        grads: Vec<VecDeque<(Tag, Tensor)>>,
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
    pub(crate) thread: Option<JoinHandle<()>>,
    pub(crate) exited: Receiver<Option<String>>,
}

/// Every stage's runner (weights drawn on the CPU in the fixed order of every network here,
/// whichever stages this process keeps).
pub(crate) fn build_runners(cfg: &StagedConfig) -> Result<Vec<StageRunner>> {
    let specs = cfg.plan.stages();
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
        PipelineMethod::Bp(schedule) => {
            let blocks: Vec<_> = specs.iter().map(|s| s.blocks.clone()).collect();
            build_bp_stages(net, cfg.lr, &blocks)?
                .into_iter()
                .map(|s| (Box::new(s) as Box<dyn Unit>, Schedule::Bp(schedule)))
                .collect()
        }
        PipelineMethod::Paper => {
            let placement = paper_placement(cfg)?;
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

/// The paper's SID: the module blocks of `cfg.devices`, checked against the model.
pub(crate) fn paper_placement(cfg: &StagedConfig) -> Result<Placement> {
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
    Ok(placement)
}

/// Intra-op threads for each CPU stage of this process: `threads_per_stage`, or the cores
/// shared among them.
pub(crate) fn cpu_threads_per_stage(cfg: &StagedConfig, cpu_stages: usize) -> i32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cfg.threads_per_stage
        .unwrap_or_else(|| (cores / cpu_stages.max(1)).max(1) as i32)
}

/// Starts the thread that runs one stage over `transport` until its input closes, with `cores`
/// intra-op threads on a CPU and its own CUDA stream on a GPU when `cfg.streams`. A failure
/// (error or panic) is reported to the coordinator through the transport's report channel
/// and returned through [`StageThread::exited`].
pub(crate) fn spawn_stage(
    cfg: &StagedConfig,
    mut runner: StageRunner,
    mut transport: ChannelTransport,
    cores: i32,
) -> StageThread {
    let (s, device, own_stream) = (transport.stage, transport.device, cfg.streams);
    let fail_tx = transport.reports.clone();
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
                drive(&mut runner, &mut transport, false)
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
                let _ = fail_tx.send((s, Report::Failed(f.clone())));
            }
            // Dropping the transport closes the link to the next stage, which then stops.
            drop(transport);
            drop(fail_tx);
            failure.map_or(Ok(()), |f| Err(f.cause))
        },
    )
}

/// A thread of the pipeline named `name` that runs `body`; a failure is returned through
/// [`StageThread::exited`], which `what` names in messages.
pub(crate) fn spawn_thread(
    name: String,
    what: String,
    body: impl FnOnce() -> std::result::Result<(), String> + Send + 'static,
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
        thread: Some(thread),
        exited,
    }
}
