//! The coordinator: owns the data-facing side (the extractor and its Adam, on the first
//! device), places the modules on the workers, and orders each step.
//!
//! One synchronous step:
//! 1. `z = c(x)` with gradient; `z` (detached) and the labels are **broadcast** to every worker;
//! 2. phase 1 — the graph-free teacher chain: the uniform `p_0` goes to worker 0, which runs
//!    its modules' teachers and returns the belief leaving its last module; the coordinator
//!    forwards it to worker 1, and so on;
//! 3. phase 2 — each worker starts its modules' local updates as soon as its own teacher
//!    inputs are known, concurrently with the others and without waiting on any of them, and
//!    returns its losses and the sum of its gradients at `z`;
//! 4. the coordinator sums those gradients (in worker order, so the result is deterministic)
//!    and finishes the extractor's backward and Adam step.
//!
//! The arithmetic is exactly the single-device [`sid_core::SidNetwork`]'s; only the order of
//! floating-point additions at `z` differs.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use sid_core::belief::uniform_belief;
use sid_core::{
    Cascade, ExtractorUnit, LossConfig, Method, ModelConfig, ModuleUnit, NamedTensors, Network,
    StepStats,
};
use tch::{Device, Tensor};

#[cfg(feature = "fault-injection")]
use crate::fault::Fault;
use crate::placement::Placement;
use crate::streams;
use crate::worker::{self, device_name, Envelope, Reply, Request, WorkerHandle, WorkerSetup};
use crate::{Result, RuntimeError};

/// Where the time of one training step went, as the coordinator and workers measured it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTiming {
    /// The whole step, on the coordinator.
    pub total: Duration,
    /// `z = c(x)`.
    pub extractor_forward: Duration,
    /// Copying `z` and the labels to every worker.
    pub broadcast: Duration,
    /// Time the coordinator spent blocked waiting for workers.
    pub wait: Duration,
    /// Summing the gradients at `z`, the extractor's backward and Adam step.
    pub extractor_backward: Duration,
    /// Each worker's phase-1 time (its part of the teacher chain).
    pub phase1: Vec<Duration>,
    /// Each worker's phase-2 time (local losses, backward, Adam).
    pub phase2: Vec<Duration>,
}

/// How to build a [`Pipeline`].
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Network shape.
    pub model: ModelConfig,
    /// Local loss settings.
    pub loss: LossConfig,
    /// Adam learning rate (extractor and every module).
    pub lr: f64,
    /// One worker per entry; the same device may appear several times.
    pub devices: Vec<Device>,
    /// Module blocks per worker; `None` = as even as possible.
    pub placement: Option<Placement>,
    /// Longest wait for any worker before the step fails.
    pub timeout: Duration,
    /// Intra-op threads per CPU worker; `None` = the machine's cores split among CPU workers.
    pub threads_per_worker: Option<i32>,
    /// Give each GPU worker its own CUDA stream from libtorch's pool.
    pub streams: bool,
    /// Fused schedule: each module's local-step forward, detached, is the next module's
    /// teacher (same result as the reference schedule, one forward per module instead of two).
    pub fused_teacher: bool,
    /// A fault to inject (tests).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
}

impl PipelineConfig {
    /// Defaults for everything but the model and devices: reference loss, lr 1e-3, even
    /// placement, 300 s timeout, streams on.
    pub fn new(model: ModelConfig, devices: Vec<Device>) -> Self {
        Self {
            model,
            loss: LossConfig::default(),
            lr: 1e-3,
            devices,
            placement: None,
            timeout: Duration::from_secs(300),
            threads_per_worker: None,
            streams: true,
            fused_teacher: false,
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }
}

/// SID across several devices: a coordinator plus one worker thread per device.
///
/// ```
/// use sid_core::{ExtractorKind, ModelConfig, Network};
/// use sid_runtime::{Pipeline, PipelineConfig};
/// use tch::{Device, Kind, Tensor};
///
/// let model = ModelConfig { extractor: ExtractorKind::Mlp, modules: 4, ..ModelConfig::default() };
/// tch::manual_seed(0);
/// let mut pipeline = Pipeline::new(PipelineConfig::new(model, vec![Device::Cpu; 2])).unwrap();
/// assert_eq!(pipeline.placement().to_spec(), "0:0-1,1:2-3");
/// let x = Tensor::randn([16, 1, 28, 28], (Kind::Float, Device::Cpu));
/// let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
/// let stats = pipeline.train_step(&x, &y).unwrap();
/// assert_eq!(stats.module_losses.len(), 4);
/// let predictions = pipeline.cascade(&x).unwrap().prediction();
/// assert_eq!(predictions.size(), vec![16]);
/// ```
pub struct Pipeline {
    num_classes: i64,
    modules: usize,
    extractor: ExtractorUnit,
    workers: Vec<WorkerHandle>,
    replies: Receiver<Envelope>,
    placement: Placement,
    timeout: Duration,
    step: u64,
    last_timing: StepTiming,
}

impl Pipeline {
    /// Builds the extractor on the first device and modules 1..L (drawn on the CPU in the same
    /// order as [`sid_core::SidNetwork`], so one seed gives both the same weights), then
    /// starts one worker per device, which moves its modules to its device.
    pub fn new(cfg: PipelineConfig) -> Result<Self> {
        cfg.model.validate()?;
        cfg.loss.validate()?;
        let k = cfg.devices.len();
        let placement = match cfg.placement.clone() {
            Some(p) if p.workers() != k => {
                return Err(RuntimeError::Placement(format!(
                    "{} blocks for {k} devices",
                    p.workers()
                )))
            }
            Some(p) => p,
            None => Placement::even(cfg.model.modules, k)?,
        };
        if placement.blocks().last().map(|b| b.end) != Some(cfg.model.modules) {
            return Err(RuntimeError::Placement(format!(
                "placement {} does not cover {} modules",
                placement.to_spec(),
                cfg.model.modules
            )));
        }
        let first = cfg.devices[0];
        let extractor = ExtractorUnit::new(&cfg.model, cfg.lr, first);
        let mut units: Vec<Option<ModuleUnit>> = (0..cfg.model.modules)
            .map(|i| {
                Some(ModuleUnit::new(
                    i,
                    &cfg.model,
                    cfg.loss,
                    cfg.lr,
                    Device::Cpu,
                ))
            })
            .collect();
        let cpu_workers = cfg
            .devices
            .iter()
            .filter(|d| **d == Device::Cpu)
            .count()
            .max(1);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cpu_threads = cfg
            .threads_per_worker
            .unwrap_or_else(|| (cores / cpu_workers).max(1) as i32);
        // Fix this thread's libtorch thread count before workers change the process-wide one
        // (a thread copies it at its first parallel op).
        let _ = tch::get_num_threads();
        let (reply_tx, replies) = crossbeam_channel::bounded(2 * k + 2);
        let workers = cfg
            .devices
            .iter()
            .zip(placement.blocks())
            .enumerate()
            .map(|(index, (&device, block))| {
                let mine = block
                    .clone()
                    .map(|i| units[i].take().expect("blocks do not overlap"))
                    .collect();
                let setup = WorkerSetup {
                    index,
                    device,
                    modules: block.clone(),
                    threads: (device == Device::Cpu && (k > 1 || cfg.threads_per_worker.is_some()))
                        .then_some(cpu_threads),
                    own_stream: cfg.streams,
                    fused: cfg.fused_teacher,
                    #[cfg(feature = "fault-injection")]
                    fault: cfg.fault,
                };
                worker::spawn(setup, mine, reply_tx.clone())
            })
            .collect();
        // Only the workers hold senders: if every worker is gone, receiving fails at once.
        drop(reply_tx);
        Ok(Self {
            num_classes: cfg.model.num_classes,
            modules: cfg.model.modules,
            extractor,
            workers,
            replies,
            placement,
            timeout: cfg.timeout,
            step: 0,
            last_timing: StepTiming::default(),
        })
    }

    /// Where the time of the last training step went.
    pub fn last_timing(&self) -> &StepTiming {
        &self.last_timing
    }

    /// Which modules each worker owns.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Each worker's device and module block (0-based), in order.
    pub fn layout(&self) -> Vec<(Device, std::ops::Range<usize>)> {
        self.workers
            .iter()
            .map(|w| (w.device, w.modules.clone()))
            .collect()
    }

    fn send(&self, worker: usize, request: Request) -> Result<()> {
        let w = &self.workers[worker];
        let tx =
            w.tx.as_ref()
                .expect("workers are alive while the pipeline is");
        tx.send_timeout(request, self.timeout).map_err(|e| match e {
            crossbeam_channel::SendTimeoutError::Timeout(_) => RuntimeError::Timeout {
                waiter: "coordinator".into(),
                waited_for: format!("{} to accept a request", w.describe()),
                timeout: self.timeout,
            },
            crossbeam_channel::SendTimeoutError::Disconnected(_) => self.gone(worker),
        })
    }

    /// Copies tensors to a worker's device and waits for the copies: a copy to another GPU is
    /// queued on that device's stream of this thread, while the worker reads on its own.
    fn for_worker<const N: usize>(
        &self,
        worker: usize,
        tensors: [&Tensor; N],
    ) -> Result<[Tensor; N]> {
        let dev = self.workers[worker].device;
        let out = tensors.map(|t| t.to_device(dev));
        streams::sync_device(dev)?;
        Ok(out)
    }

    fn gone(&self, worker: usize) -> RuntimeError {
        let w = &self.workers[worker];
        // A worker that failed sent its reason before stopping: prefer it.
        while let Ok(env) = self.replies.try_recv() {
            if let Reply::Failed { module, cause } = env.reply {
                return self.failed(env.worker, module, cause);
            }
        }
        RuntimeError::Worker {
            worker,
            device: device_name(w.device),
            module: None,
            cause: "the worker thread has exited".into(),
        }
    }

    fn failed(&self, worker: usize, module: Option<usize>, cause: String) -> RuntimeError {
        RuntimeError::Worker {
            worker,
            device: device_name(self.workers[worker].device),
            module,
            cause,
        }
    }

    /// Next reply; `pending` names the workers still owing one, for the timeout message.
    fn recv(&self, pending: &[usize], what: &str) -> Result<Envelope> {
        match self.replies.recv_timeout(self.timeout) {
            Ok(Envelope {
                worker,
                reply: Reply::Failed { module, cause },
            }) => Err(self.failed(worker, module, cause)),
            Ok(env) => Ok(env),
            Err(RecvTimeoutError::Timeout) => {
                let who: Vec<String> = pending
                    .iter()
                    .map(|&w| self.workers[w].describe())
                    .collect();
                Err(RuntimeError::Timeout {
                    waiter: "coordinator".into(),
                    waited_for: format!("{} to return {what}", who.join(", ")),
                    timeout: self.timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(RuntimeError::Worker {
                worker: pending.first().copied().unwrap_or(0),
                device: pending
                    .first()
                    .map(|&w| device_name(self.workers[w].device))
                    .unwrap_or_default(),
                module: None,
                cause: "every worker thread has exited".into(),
            }),
        }
    }

    fn wrong(&self, worker: usize, got: &str, expected: &str) -> RuntimeError {
        RuntimeError::Protocol(format!(
            "{} sent {got} while the coordinator expected {expected}",
            self.workers[worker].describe()
        ))
    }

    fn step_inner(&mut self, x: &Tensor, y: &Tensor) -> Result<StepStats> {
        self.step += 1;
        let step = self.step;
        let k = self.workers.len();
        let mut timing = StepTiming {
            phase1: vec![Duration::ZERO; k],
            phase2: vec![Duration::ZERO; k],
            ..Default::default()
        };
        let started = Instant::now();
        let coord = self.extractor.device();
        let z = self.extractor.forward(x);
        let z_detached = z.detach();
        streams::sync_device(coord)?;
        timing.extractor_forward = started.elapsed();
        let mark = Instant::now();
        {
            let _span = tracing::info_span!("broadcast", step).entered();
            for w in 0..self.workers.len() {
                let [z, labels] = self.for_worker(w, [&z_detached, y])?;
                self.send(w, Request::Begin { step, z, labels })?;
            }
        }
        let p0 = uniform_belief(x.size()[0], self.num_classes, coord);
        let [p_in] = self.for_worker(0, [&p0])?;
        self.send(0, Request::Teacher { step, p_in })?;
        timing.broadcast = mark.elapsed();
        let mut losses: Vec<Option<Vec<f64>>> = vec![None; k];
        let mut grads: Vec<Option<Tensor>> = (0..k).map(|_| None).collect();
        // The workers' own gradients, kept until the copies read from them are done (rule 4).
        let mut received: Vec<Tensor> = Vec::with_capacity(k);
        let mut pending: Vec<usize> = (0..k).collect();
        let wait = tracing::info_span!("coordinator_wait", step);
        while !pending.is_empty() {
            let mark = Instant::now();
            let env = wait.in_scope(|| self.recv(&pending, &format!("results of step {step}")))?;
            timing.wait += mark.elapsed();
            let w = env.worker;
            match env.reply {
                Reply::Teacher { step: s, p_out } => {
                    if s != step {
                        return Err(RuntimeError::Protocol(format!(
                            "{} returned teacher beliefs of step {s} during step {step}",
                            self.workers[w].describe()
                        )));
                    }
                    if w + 1 < k {
                        let next = w + 1;
                        let [p_in] = self.for_worker(next, [&p_out])?;
                        self.send(next, Request::Teacher { step, p_in })?;
                    }
                }
                Reply::Local {
                    step: s,
                    losses: l,
                    grad_z,
                    phase1,
                    phase2,
                } => {
                    timing.phase1[w] = phase1;
                    timing.phase2[w] = phase2;
                    if s != step || losses[w].is_some() {
                        return Err(RuntimeError::Protocol(format!(
                            "{} returned phase-2 results of step {s} during step {step}",
                            self.workers[w].describe()
                        )));
                    }
                    if l.len() != self.workers[w].modules.len() {
                        return Err(self.wrong(w, "the wrong number of losses", "one per module"));
                    }
                    losses[w] = Some(l);
                    grads[w] = Some(grad_z.to_device(coord));
                    received.push(grad_z);
                    pending.retain(|&p| p != w);
                }
                _ => return Err(self.wrong(w, "an unexpected reply", "step results")),
            }
        }
        let mark = Instant::now();
        let mut grad_sum = z_detached.zeros_like();
        for g in grads.iter().flatten() {
            grad_sum += g;
        }
        self.extractor.backward_step(&z, &grad_sum)?;
        streams::sync_device(coord)?;
        // A copy from another GPU also runs on this thread's stream of the source device.
        for g in &received {
            if g.device() != coord {
                streams::sync_device(g.device())?;
            }
        }
        // Dropped only now: a worker's gradient was allocated on its stream, and the caching
        // allocator may hand its memory out again as soon as it is freed.
        drop(grads);
        drop(received);
        timing.extractor_backward = mark.elapsed();
        timing.total = started.elapsed();
        self.last_timing = timing;
        let module_losses: Vec<f64> = losses.into_iter().flatten().flatten().collect();
        debug_assert_eq!(module_losses.len(), self.modules);
        Ok(StepStats {
            loss: module_losses.iter().sum(),
            module_losses,
        })
    }

    fn cascade_inner(&mut self, x: &Tensor) -> Result<Cascade> {
        let coord = self.extractor.device();
        let z = self.extractor.infer(x);
        streams::sync_device(coord)?;
        let mut p = uniform_belief(x.size()[0], self.num_classes, coord);
        let mut logits = Vec::with_capacity(self.modules);
        for w in 0..self.workers.len() {
            let [z, p_in] = self.for_worker(w, [&z, &p])?;
            self.send(w, Request::Cascade { z, p_in })?;
            match self.recv(&[w], "inference results")? {
                Envelope {
                    worker,
                    reply: Reply::Cascade { logits: l, p_out },
                } if worker == w => {
                    logits.extend(l.into_iter().map(|t| t.to_device(coord)));
                    p = p_out;
                }
                Envelope { worker, .. } => {
                    return Err(self.wrong(worker, "an unexpected reply", "inference results"))
                }
            }
        }
        Ok(Cascade { logits })
    }
}

impl Network for Pipeline {
    fn method(&self) -> Method {
        Method::Sid
    }

    fn input_device(&self) -> Device {
        self.extractor.device()
    }

    fn train_step(&mut self, x: &Tensor, y: &Tensor) -> sid_core::Result<StepStats> {
        Ok(self.step_inner(x, y)?)
    }

    fn cascade(&mut self, x: &Tensor) -> sid_core::Result<Cascade> {
        Ok(self.cascade_inner(x)?)
    }

    fn state(&mut self) -> sid_core::Result<Vec<(String, Tensor)>> {
        let mut all = self.extractor.state();
        for w in 0..self.workers.len() {
            self.send(w, Request::State)?;
            match self.recv(&[w], "its state")? {
                Envelope {
                    worker,
                    reply: Reply::State(s),
                } if worker == w => all.extend(s),
                Envelope { worker, .. } => {
                    return Err(self
                        .wrong(worker, "an unexpected reply", "its state")
                        .into())
                }
            }
        }
        Ok(all)
    }

    fn load_state(&mut self, named: &NamedTensors) -> sid_core::Result<()> {
        self.extractor.load_state(named)?;
        for w in 0..self.workers.len() {
            let prefixes: Vec<String> = self.workers[w]
                .modules
                .clone()
                .flat_map(|i| {
                    let p = sid_core::unit::module_prefix(i);
                    [format!("{p}."), format!("adam.{p}.")]
                })
                .collect();
            let mine: Vec<(String, Tensor)> = named
                .0
                .iter()
                .filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p.as_str())))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            self.send(w, Request::Load(mine))?;
            match self.recv(&[w], "confirmation of a state load")? {
                Envelope {
                    worker,
                    reply: Reply::Loaded,
                } if worker == w => {}
                Envelope { worker, .. } => {
                    return Err(self.wrong(worker, "an unexpected reply", "Loaded").into())
                }
            }
        }
        Ok(())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let grace = self.timeout.min(Duration::from_secs(10));
        for w in &mut self.workers {
            w.shut_down(grace);
        }
    }
}
