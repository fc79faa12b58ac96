//! The stage pipeline's settings: [`StagedConfig`] and the method it trains
//! ([`PipelineMethod`]).

use std::sync::Arc;
use std::time::Duration;

use sid_core::{Backbone, LossConfig, Method, ModelConfig, StagePlan};
use tch::Device;

#[cfg(feature = "fault-injection")]
use crate::fault::Fault;
use crate::ops::BpSchedule;
use crate::placement::Placement;
use crate::ranks::Ranks;
use crate::Result;

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
