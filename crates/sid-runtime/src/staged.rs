//! The staged pipeline's coordinator: builds the stages, places one per device (or runs them
//! one after another on a single device), feeds micro-batches into stage 1 and collects what
//! the stages report. Stages talk to each other directly; the schedule each one runs is
//! [`crate::schedule`], the same whether they share this thread or have one each.
//!
//! Steps are pipelined: [`Network::submit_step`] returns before a step has left the last
//! stage, so stage 1 starts step t+1 while later stages finish step t. Statistics come back
//! in step order; [`Network::flush`] waits for the rest (the trainer flushes before evaluating
//! or saving).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use crossbeam_channel::SendTimeoutError;
use sid_core::{
    Cascade, EarlyExit, ExitTracker, Method, NamedTensors, Network, StagePlan, StepStats,
};
use tch::{Device, Tensor};

use crate::config::{PipelineMethod, StagedConfig};
use crate::schedule::{drive, StageRunner};
use crate::setup::{build_runners, channel, spawn_stage, Engine};
use crate::streams;
use crate::transport::{
    device_name, ChannelTransport, Filed, LocalQueues, LocalTransport, Message, Report, Tag,
};
use crate::{Failure, Result, RuntimeError};
use sid_telemetry::AllocOwner;

/// Staged SID as a pipeline of stages ([`sid_core::stage`]), on one device or one per stage;
/// also the BP baseline cut at the same blocks, and the paper's SID with its modules spread
/// over devices ([`PipelineMethod::Paper`]: the extractor as stage 1, see [`crate::paper`]).
///
/// ```
/// use sid_core::{ExtractorKind, ModelConfig, Network, StagePlan};
/// use sid_runtime::{StagedConfig, StagedPipeline};
/// use tch::{Device, Kind, Tensor};
///
/// let model = ModelConfig { image_size: 8, modules: 4, ..ModelConfig::default() };
/// let plan = StagePlan::even(&model, 2).unwrap();
/// tch::manual_seed(0);
/// let mut cfg = StagedConfig::new(model, vec![Device::Cpu; 2], plan);
/// cfg.micro_batches = 2;
/// let mut pipeline = StagedPipeline::new(cfg).unwrap();
/// let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
/// let y = Tensor::randint(10, [8], (Kind::Int64, Device::Cpu));
/// let mut stats = pipeline.submit_step(&x, &y).unwrap(); // perhaps still in flight
/// stats.extend(pipeline.flush().unwrap());
/// assert_eq!(stats.len(), 1);
/// assert_eq!(stats[0].module_losses.len(), 4);
/// assert_eq!(pipeline.cascade(&x).unwrap().logits.len(), 4);
/// ```
pub struct StagedPipeline {
    engine: Engine,
    /// The settings it was built from.
    cfg: StagedConfig,
    devices: Vec<Device>,
    /// Who computes each slot (replica r's stage s is slot r·K + s, its rank in a
    /// multi-process run), for messages.
    names: Vec<String>,
    /// Each stage's modules (0-based).
    modules: Vec<Range<usize>>,
    submitted: u64,
    requests: u64,
    pending: BTreeMap<u64, Vec<Option<Vec<f64>>>>,
    done: VecDeque<StepStats>,
    busy: Vec<StageStats>,
    /// Per stage, when measured ([`StagedConfig::track_memory`]): who its allocations are
    /// charged to, and the bytes of its weights and optimiser state.
    memory: Vec<Option<(AllocOwner, u64)>>,
}

/// What a stage spent on training steps over a period: time, and memory when measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageStats {
    /// Steps counted.
    pub steps: u64,
    /// All of it.
    pub busy: Duration,
    /// The forward passes (what the next stage waits for).
    pub forward: Duration,
    /// The stage's memory, when measured.
    pub memory: Option<StageMemory>,
}

/// A stage's memory over a period, in bytes, wherever its device is shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageMemory {
    /// Weights and optimiser state (counted from the tensors).
    pub state: u64,
    /// The most the stage held of what it allocated itself, at any moment of the period:
    /// gradients, activations kept for backward, messages on their way to the next stage,
    /// temporaries (measured; see [`sid_telemetry::allocations`]).
    pub working: u64,
}

impl StageMemory {
    /// Everything the stage needed at its peak: `state + working`.
    pub fn peak(&self) -> u64 {
        self.state + self.working
    }
}

impl StagedPipeline {
    /// Builds the stages (weights drawn on the CPU in the fixed order of every network here,
    /// see [`sid_core::stage::build_stages`]) and starts a thread per stage when there is a
    /// device per stage.
    pub fn new(cfg: StagedConfig) -> Result<Self> {
        let paper = cfg.method == PipelineMethod::Paper;
        let d = cfg.devices.len();
        let k = if paper { d + 1 } else { cfg.plan.len() };
        if paper && (cfg.plan.len() != 1 || cfg.ranks.is_some() || d == 0) {
            return Err(RuntimeError::Config(
                "the paper's SID pipeline takes a one-stage plan, at least one device and no other ranks".into(),
            ));
        }
        if !paper && d != 1 && d != k {
            return Err(RuntimeError::Placement(format!(
                "{k} stages on {d} devices: give one device (the stages then run one after another) or one per stage"
            )));
        }
        if cfg.micro_batches == 0 {
            return Err(RuntimeError::Config(
                "--micro-batches must be at least 1".into(),
            ));
        }
        let mut runners = build_runners(&cfg)?;
        let (devices, modules) = if paper {
            // The extractor (no module) shares the first device with the first module block.
            let modules = runners.iter().map(|r| r.unit().modules()).collect();
            ([&cfg.devices[..1], &cfg.devices].concat(), modules)
        } else {
            let modules = cfg.plan.stages().iter().map(|s| s.modules.clone());
            (
                (0..k).map(|s| cfg.devices[s % d]).collect(),
                modules.collect(),
            )
        };
        let memory = runners.iter().map(StageRunner::memory).collect();
        let mut names: Vec<String> = devices.iter().map(|d| device_name(*d)).collect();
        // Several backprop stages wait on each other within a step: they get a thread each
        // (one BP stage, or SID's stages, on one device run in this thread).
        let engine = if let Some(ranks) = &cfg.ranks {
            names = ranks.names.clone();
            crate::links::spawn_coordinator_links(&cfg, ranks, runners)?
        } else if d == 1 && (k == 1 || !matches!(cfg.method, PipelineMethod::Bp(_))) {
            for r in &mut runners {
                r.unit_mut().to_device(devices[0]);
            }
            Engine::Local {
                runners,
                queues: LocalQueues::new(k),
            }
        } else {
            spawn_threads(&cfg, runners, &devices)
        };
        Ok(Self {
            engine,
            cfg,
            devices,
            names,
            modules,
            submitted: 0,
            requests: 0,
            pending: BTreeMap::new(),
            done: VecDeque::new(),
            busy: vec![StageStats::default(); k],
            memory,
        })
    }

    /// Data-parallel replicas of the pipeline (1 unless stages are in other processes).
    fn replicas(&self) -> usize {
        self.cfg.ranks.as_ref().map_or(1, |r| r.replicas)
    }

    /// The cut of blocks and modules into stages.
    pub fn plan(&self) -> &StagePlan {
        &self.cfg.plan
    }

    /// Each stage's device and 0-based module block, in order.
    pub fn layout(&self) -> Vec<(Device, Range<usize>)> {
        self.devices
            .iter()
            .zip(&self.modules)
            // The paper's extractor stage owns no module.
            .filter(|(_, m)| !m.is_empty())
            .map(|(d, m)| (*d, m.clone()))
            .collect()
    }

    /// Whether the stages run in threads of their own (one device per stage).
    pub fn threaded(&self) -> bool {
        matches!(self.engine, Engine::Threads { .. })
    }

    /// Time each stage spent computing training steps since the last call, and its memory at
    /// its peak since then (when measured; a new period starts).
    pub fn take_stage_stats(&mut self) -> Vec<StageStats> {
        let mut stats = std::mem::replace(
            &mut self.busy,
            vec![StageStats::default(); self.modules.len()],
        );
        for (s, m) in stats.iter_mut().zip(&self.memory) {
            if let Some((owner, state)) = m {
                s.memory = Some(StageMemory {
                    state: *state,
                    working: owner.counts().peak,
                });
                owner.reset_peak();
            }
        }
        stats
    }

    /// `stage 2 (cpu, blocks 3-4, modules 6-10)`, 1-based; `slot` is replica r's stage s as
    /// r·K + s (in a multi-process run, its rank).
    pub fn describe(&self, slot: usize) -> String {
        let k = self.modules.len();
        let m = &self.modules[slot % k];
        let modules = format!("modules {}-{}", m.start + 1, m.end);
        // Staged SID's and backprop's stages are the plan's.
        let blocks = || {
            let b = &self.cfg.plan.stages()[slot % k].blocks;
            format!("blocks {}-{}", b.start + 1, b.end)
        };
        let what = match self.cfg.method {
            PipelineMethod::Paper if m.is_empty() => "the extractor".to_string(),
            PipelineMethod::Paper => modules,
            PipelineMethod::Sid => format!("{}, {modules}", blocks()),
            // Backprop's modules all read the final features: they sit on the last stage.
            PipelineMethod::Bp(_) if slot % k + 1 == k => {
                format!("{}, modules 1-{}", blocks(), self.cfg.model.modules)
            }
            PipelineMethod::Bp(_) => blocks(),
        };
        let replica = (self.replicas() > 1).then(|| format!(" of replica {}", slot / k + 1));
        let replica = replica.unwrap_or_default();
        format!(
            "stage {}{replica} ({}, {what})",
            slot % k + 1,
            self.names[slot]
        )
    }

    fn failed(&self, slot: usize, f: Failure) -> RuntimeError {
        RuntimeError::Stage {
            stage: slot % self.modules.len() + 1,
            device: self.names[slot].clone(),
            module: f.module,
            cause: f.cause,
        }
    }

    /// The first failure a stage reports within `grace` (other reports are dropped: the run is
    /// ending).
    fn reported_failure(&self, grace: Duration) -> Option<RuntimeError> {
        let Engine::Threads { reports, .. } = &self.engine else {
            return None;
        };
        let until = std::time::Instant::now() + grace;
        while let Ok(r) = reports.recv_deadline(until) {
            if let (slot, Report::Failed(f)) = r {
                return Some(self.failed(slot, f));
            }
        }
        None
    }

    /// Passes `msg` to stage 1 of `replica`.
    fn feed_replica(&mut self, replica: usize, msg: Message) -> Result<()> {
        match &mut self.engine {
            Engine::Local { runners, queues } => {
                queues.inboxes[0].push_back(msg);
                // Stage after stage, again while any took something: a stage that stopped
                // for a gradient goes on once a later stage has sent it.
                loop {
                    let mut taken = 0;
                    for (s, runner) in runners.iter_mut().enumerate() {
                        let mut t = LocalTransport {
                            stage: s,
                            queues,
                            grad_to: self.cfg.method.grad_target(s),
                            taken: 0,
                        };
                        let driven = drive(runner, &mut t);
                        taken += t.taken;
                        if let Err(f) = driven {
                            return Err(self.failed(s, f));
                        }
                    }
                    if taken == 0 {
                        return Ok(());
                    }
                }
            }
            Engine::Threads { firsts, .. } => {
                let Err(e) = firsts[replica].send_timeout(msg, self.cfg.timeout) else {
                    return Ok(());
                };
                let (grace, otherwise) = match e {
                    // Stage 1 is stuck because it waits for another stage, which it will name
                    // when its own wait (begun a little earlier) runs out: prefer that.
                    SendTimeoutError::Timeout(_) => (
                        self.cfg.timeout.min(Duration::from_secs(3)),
                        RuntimeError::Timeout {
                            waiter: "coordinator".into(),
                            waited_for: format!(
                                "{} to take its input",
                                self.describe(replica * self.modules.len())
                            ),
                            timeout: self.cfg.timeout,
                        },
                    ),
                    // A stage that failed reported why before it stopped: prefer that.
                    SendTimeoutError::Disconnected(_) => (
                        Duration::from_millis(200),
                        RuntimeError::Protocol("the stages stopped before taking the input".into()),
                    ),
                };
                Err(self.reported_failure(grace).unwrap_or(otherwise))
            }
        }
    }

    /// The next report (`None`: nothing yet, when not blocking); `owing` says who is waited
    /// for, for the timeout message.
    fn next_report(
        &mut self,
        owing: &dyn Fn(&Self) -> String,
        block: bool,
    ) -> Result<Option<Filed>> {
        let timeout = self.cfg.timeout;
        // `Err(true)`: every stage thread has exited; `Err(false)`: nothing yet.
        let got = match &mut self.engine {
            Engine::Local { queues, .. } => queues.reports.pop_front().ok_or(false),
            Engine::Threads { reports, .. } if block => reports
                .recv_timeout(timeout)
                .map_err(|e| e.is_disconnected()),
            Engine::Threads { reports, .. } => reports.try_recv().map_err(|e| e.is_disconnected()),
        };
        match got {
            Ok((slot, Report::Failed(f))) => Err(self.failed(slot, f)),
            Ok(r) => Ok(Some(r)),
            Err(false) if !block => Ok(None),
            Err(false) if self.threaded() => Err(RuntimeError::Timeout {
                waiter: "coordinator".into(),
                waited_for: owing(self),
                timeout,
            }),
            Err(false) => Err(RuntimeError::Protocol(format!(
                "the stages ran but {} did not report",
                owing(self)
            ))),
            Err(true) => Err(RuntimeError::Protocol(format!(
                "every stage thread has exited while the coordinator waited for {}",
                owing(self)
            ))),
        }
    }

    /// Files a training report; any other kind is a protocol error.
    fn file(&mut self, (stage, r): Filed) -> Result<()> {
        let Report::Losses {
            step,
            losses,
            busy,
            forward,
        } = r
        else {
            return Err(unexpected(&r, "training results"));
        };
        let k = self.modules.len();
        let expected = match self.cfg.method {
            PipelineMethod::Sid | PipelineMethod::Paper => self.modules[stage % k].len(),
            PipelineMethod::Bp(_) => usize::from(stage % k + 1 == k),
        };
        let bad = RuntimeError::Protocol(format!(
            "{} reported step {step}, which is not in flight (or twice, or with the wrong number of losses)",
            self.describe(stage)
        ));
        let slot = self
            .pending
            .get_mut(&step)
            .and_then(|v| v.get_mut(stage))
            .filter(|s| s.is_none() && losses.len() == expected)
            .ok_or(bad)?;
        *slot = Some(losses);
        // Replica 1 stands for the others, which run the same shapes.
        if let Some(t) = self.busy.get_mut(stage) {
            t.steps += 1;
            t.busy += busy;
            t.forward += forward;
        }
        // Steps finish in order: the last stage runs them in order.
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().iter().any(|s| s.is_none()) {
                break;
            }
            let mut slots = entry.remove().into_iter().flatten();
            // Each replica's losses are already weighted by its share of the batch: sum
            // them per stage, replica after replica, then list the stages in order.
            let mut losses: Vec<Vec<f64>> = slots.by_ref().take(k).collect();
            for (i, more) in slots.enumerate() {
                for (a, b) in losses[i % k].iter_mut().zip(more) {
                    *a += b;
                }
            }
            let losses = losses.concat();
            let loss = losses.iter().sum();
            // Backprop has one loss, not one per module.
            let bp = matches!(self.cfg.method, PipelineMethod::Bp(_));
            let module_losses = if bp { Vec::new() } else { losses };
            self.done.push_back(StepStats {
                loss,
                module_losses,
            });
        }
        Ok(())
    }

    fn owing_steps(&self) -> String {
        let Some((step, slots)) = self.pending.iter().next() else {
            return "nothing".into();
        };
        format!("{} to finish step {step}", self.missing(slots))
    }

    /// The slots of `got` that have not answered yet, described.
    fn missing<T>(&self, got: &[Option<T>]) -> String {
        let who: Vec<String> = (0..got.len())
            .filter(|&i| got[i].is_none())
            .map(|i| self.describe(i))
            .collect();
        who.join(", ")
    }

    fn submit(&mut self, x: &Tensor, y: &Tensor) -> Result<()> {
        let b = x.size()[0];
        if b == 0 {
            return Err(RuntimeError::Config("an empty batch".into()));
        }
        let r = self.replicas() as i64;
        if b < r {
            return Err(RuntimeError::Config(format!(
                "a batch of {b} cannot be shared by {r} data-parallel replicas"
            )));
        }
        self.submitted += 1;
        let step = self.submitted;
        // A slot for replica r's stage s, for every r and s.
        let slots = self.modules.len() * self.replicas();
        self.pending.insert(step, vec![None; slots]);
        let first = self.devices[0];
        let mut start = 0;
        for replica in 0..r {
            // Each replica takes a disjoint shard; sizes differ by at most one.
            let shard = b / r + i64::from(replica < b % r);
            let m = (self.cfg.micro_batches as i64).min(shard);
            for j in 0..m {
                // Sizes differ by at most one when m does not divide the shard.
                let len = shard / m + i64::from(j < shard % m);
                let msg = Message::Train {
                    tag: Tag::new(step, j as usize),
                    micro_batches: m as usize,
                    input: x.narrow(0, start, len),
                    p: sid_core::belief::uniform_belief(len, self.cfg.model.num_classes, first),
                    labels: y.narrow(0, start, len),
                    // The share of the whole batch: summed over replicas, the gradients and
                    // losses are those of one replica on the whole batch.
                    scale: len as f64 / b as f64,
                };
                start += len;
                self.feed_replica(replica as usize, msg)?;
            }
        }
        Ok(())
    }

    /// Sends a request, tagged with the next request number, down the chain and collects one
    /// report per stage, in stage order; with `all_replicas`, down every replica's chain (one
    /// report per slot).
    fn request(
        &mut self,
        msg: impl Fn(Tag) -> Message,
        what: &str,
        all_replicas: bool,
    ) -> Result<Vec<Report>> {
        self.drain_to(0)?;
        self.requests += 1;
        let tag = Tag::new(self.requests, 0);
        let replicas = if all_replicas { self.replicas() } else { 1 };
        // Stage 1 of this process's replica last.
        for r in (1..replicas).chain([0]) {
            self.feed_replica(r, msg(tag))?;
        }
        let k = self.modules.len() * replicas;
        let mut got: Vec<Option<Report>> = (0..k).map(|_| None).collect();
        while got.iter().any(|g| g.is_none()) {
            let owing = |p: &Self| format!("{} to return {what}", p.missing(&got));
            let (stage, r) = self.next_report(&owing, true)?.expect("blocking");
            if !matches!(r, Report::Logits { .. } | Report::State(_) | Report::Loaded) {
                return Err(unexpected(&r, what));
            }
            let Some(entry) = got.get_mut(stage) else {
                return Err(RuntimeError::Protocol(format!(
                    "{} returned {what}, which was not asked of it",
                    self.describe(stage)
                )));
            };
            if entry.replace(r).is_some() {
                return Err(RuntimeError::Protocol(format!(
                    "{} returned {what} twice",
                    self.describe(stage)
                )));
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Waits for the oldest steps in flight until at most `in_flight` are, keeping their
    /// statistics for the next caller.
    fn drain_to(&mut self, in_flight: usize) -> Result<()> {
        while self.pending.len() > in_flight {
            let r = self.next_report(&|p: &Self| p.owing_steps(), true)?;
            self.file(r.expect("blocking"))?;
        }
        Ok(())
    }
}

fn unexpected(r: &Report, expected: &str) -> RuntimeError {
    let got = match r {
        Report::Losses { .. } => "training results",
        Report::Logits { .. } => "inference results",
        Report::State(_) => "its state",
        Report::Loaded => "a load confirmation",
        Report::Failed(_) => "a failure",
    };
    RuntimeError::Protocol(format!(
        "a stage sent {got} while the coordinator expected {expected}"
    ))
}

fn spawn_threads(cfg: &StagedConfig, runners: Vec<StageRunner>, devices: &[Device]) -> Engine {
    let k = runners.len();
    let paper = cfg.method == PipelineMethod::Paper;
    // The paper's extractor is nearly all of a step and the module stages wait for it (and it
    // for them): it gets every core, the module stages share them.
    let sharing = &devices[usize::from(paper)..];
    let cpu_stages = sharing.iter().filter(|d| **d == Device::Cpu).count();
    // Fix this thread's libtorch thread count before stages change the process-wide one.
    let _ = tch::get_num_threads();
    let (report_tx, reports) = crossbeam_channel::unbounded();
    // Stage s reads channel s and sends into channel s + 1; the coordinator feeds channel 0.
    let (first, mut upstream) = channel(cfg);
    let mut transports: Vec<ChannelTransport> = Vec::with_capacity(k);
    for (s, &device) in devices.iter().enumerate() {
        let (down, next_up) = channel(cfg);
        let up = std::mem::replace(&mut upstream, next_up);
        let down = (s + 1 < k).then_some(down);
        let mut t = ChannelTransport::new(s, device, up, down, report_tx.clone(), cfg.timeout);
        // A gradient channel from each stage whose backward sends one to the (earlier) stage
        // that takes it.
        if let Some(to) = cfg.method.grad_target(s) {
            let (tx, rx) = channel(cfg);
            t.grad_out = Some((to, tx));
            transports[to].grads_in.push((s, rx));
        }
        transports.push(t);
    }
    let threads = runners
        .into_iter()
        .zip(transports)
        .map(|(runner, transport)| {
            let alone = paper && transport.stage == 0;
            spawn_stage(cfg, runner, transport, if alone { 1 } else { cpu_stages })
        })
        .collect();
    Engine::Threads {
        firsts: vec![first],
        reports,
        threads,
    }
}

impl Network for StagedPipeline {
    fn method(&self) -> Method {
        match self.cfg.method {
            PipelineMethod::Sid | PipelineMethod::Paper => Method::Sid,
            PipelineMethod::Bp(_) => Method::Bp,
        }
    }

    fn input_device(&self) -> Device {
        self.devices[0]
    }

    fn train_step(&mut self, x: &Tensor, y: &Tensor) -> sid_core::Result<StepStats> {
        self.submit(x, y)?;
        self.drain_to(0)?;
        let last = self.done.drain(..).next_back();
        Ok(last.expect("the step just finished"))
    }

    /// Stages in this thread only (one device): the step runs through every stage as usual,
    /// but its losses stay on the device, so a CUDA graph can capture it.
    fn train_step_queued(&mut self, x: &Tensor, y: &Tensor) -> sid_core::Result<Tensor> {
        let Engine::Local { runners, .. } = &mut self.engine else {
            return Err(RuntimeError::Config(
                "a step of stages in threads cannot be captured as one".into(),
            )
            .into());
        };
        runners.iter_mut().for_each(|r| r.queue_losses(true));
        let submitted = self.submit(x, y);
        let Engine::Local { runners, queues } = &mut self.engine else {
            unreachable!("checked above")
        };
        runners.iter_mut().for_each(|r| r.queue_losses(false));
        // The step's reports carry no losses: they are these.
        queues.reports.clear();
        self.pending.remove(&self.submitted);
        submitted?;
        let losses: Vec<Tensor> = runners
            .iter_mut()
            .filter_map(|r| r.take_queued_losses())
            // Backprop's one loss is a scalar.
            .map(|l| l.reshape([-1]))
            .collect();
        Ok(Tensor::f_cat(&losses, 0)?)
    }

    fn read_step(&self, losses: &Tensor) -> sid_core::Result<StepStats> {
        let _s = tracing::trace_span!("read_losses").entered();
        Ok(match (&self.cfg.method, &self.engine) {
            (PipelineMethod::Bp(_), Engine::Local { runners, .. }) => {
                let last = runners.last().expect("a stage").unit();
                StepStats {
                    loss: last.read_losses(losses)?.iter().sum(),
                    module_losses: Vec::new(),
                }
            }
            _ => {
                let module_losses = sid_core::unit::read_losses(losses, 0)?;
                StepStats {
                    loss: module_losses.iter().sum(),
                    module_losses,
                }
            }
        })
    }

    fn submit_step(&mut self, x: &Tensor, y: &Tensor) -> sid_core::Result<Vec<StepStats>> {
        self.submit(x, y)?;
        // Take what has finished; wait only when too many steps are in flight.
        while let Some(r) = self.next_report(&|p: &Self| p.owing_steps(), false)? {
            self.file(r)?;
        }
        // One step in flight per stage, and one more.
        self.drain_to(self.modules.len() + 1)?;
        Ok(self.done.drain(..).collect())
    }

    fn flush(&mut self) -> sid_core::Result<Vec<StepStats>> {
        self.drain_to(0)?;
        Ok(self.done.drain(..).collect())
    }

    fn cascade(&mut self, x: &Tensor) -> sid_core::Result<Cascade> {
        let first = self.devices[0];
        let p = sid_core::belief::uniform_belief(x.size()[0], self.cfg.model.num_classes, first);
        let eval = |tag| Message::Eval {
            tag,
            input: x.shallow_clone(),
            p: p.shallow_clone(),
        };
        let reports = self.request(eval, "inference results", false)?;
        // The batch just asked for.
        let asked = self.requests;
        let mut logits = Vec::with_capacity(self.cfg.model.modules);
        for r in reports {
            if let Report::Logits { step, logits: l } = r {
                if step != asked {
                    return Err(RuntimeError::Protocol(format!(
                        "inference results of batch {step} arrived for batch {asked}"
                    ))
                    .into());
                }
                logits.extend(l.into_iter().map(|t| t.to_device(first)));
            }
        }
        streams::sync_device(first).map_err(RuntimeError::from)?;
        Ok(Cascade { logits })
    }

    fn cascade_exit(&mut self, x: &Tensor, tau: f64) -> sid_core::Result<EarlyExit> {
        self.drain_to(0)?;
        let Engine::Local { runners, .. } = &self.engine else {
            // Stage threads run whole batches: the default picks exits from the full cascade.
            return Ok(sid_core::early_exit(&self.cascade(x)?.logits, tau));
        };
        let b = x.size()[0];
        let first = self.devices[0];
        let mut exits = ExitTracker::new(b, self.cfg.model.modules, tau, first);
        let mut input = x.shallow_clone();
        let mut p = sid_core::belief::uniform_belief(b, self.cfg.model.num_classes, first);
        for r in runners {
            let unit = r.unit();
            let out = unit.infer(&input, &p);
            // Later stages run for the samples still in the cascade only: their backbone
            // slices are skipped for the rest.
            let (Some(on), Some(z)) = (exits.update(&out.logits, unit.modules().start), out.next)
            else {
                break;
            };
            let keep = on.nonzero().squeeze_dim(1);
            input = z.index_select(0, &keep);
            p = out.p.index_select(0, &keep);
        }
        Ok(exits.finish())
    }

    fn state(&mut self) -> sid_core::Result<Vec<(String, Tensor)>> {
        let reports = self.request(|tag| Message::State { tag }, "its state", false)?;
        Ok(reports
            .into_iter()
            .flat_map(|r| match r {
                Report::State(state) => state,
                _ => Vec::new(),
            })
            .collect())
    }

    fn load_state(&mut self, named: &NamedTensors) -> sid_core::Result<()> {
        let load = |tag| Message::Load {
            tag,
            named: named
                .0
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
        };
        self.request(load, "confirmation of a state load", true)?;
        Ok(())
    }
}

impl Drop for StagedPipeline {
    fn drop(&mut self) {
        if let Engine::Threads {
            firsts, threads, ..
        } = &mut self.engine
        {
            // Closing stage 1's input stops it, which closes stage 2's, and so on.
            firsts.clear();
            // One grace period for all of them: a thread stuck on a peer that hangs (another
            // process, say) is left behind, not waited for one after another.
            let grace = self.cfg.timeout.min(Duration::from_secs(10));
            let deadline = std::time::Instant::now() + grace;
            for t in threads.drain(..) {
                if t.exited.recv_deadline(deadline).is_ok() {
                    let _ = t.thread.join();
                } else {
                    tracing::warn!("{} did not stop within {grace:?}; leaving it", t.name);
                }
            }
        }
    }
}
