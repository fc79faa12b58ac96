//! A worker: one OS thread per device that owns its modules' parameters and Adam state and
//! runs their phase-1 teacher chain and phase-2 local updates when the coordinator asks.

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use sid_core::{ModuleUnit, NamedTensors};
use tch::{Device, Tensor};

#[cfg(feature = "fault-injection")]
use crate::fault::{Fault, FaultKind};
use crate::streams;

/// What the coordinator asks a worker to do.
pub(crate) enum Request {
    /// The broadcast of a step: detached features and labels, on this worker's device.
    Begin {
        step: u64,
        z: Tensor,
        labels: Tensor,
    },
    /// The belief entering this worker's first module: run the teacher chain through its
    /// modules, answer with the belief leaving the last one, then run phase 2 at once.
    Teacher { step: u64, p_in: Tensor },
    /// Inference: the chain through this worker's modules for features `z`.
    Cascade { z: Tensor, p_in: Tensor },
    /// Send weights and optimizer state (CPU tensors).
    State,
    /// Restore weights and optimizer state.
    Load(Vec<(String, Tensor)>),
}

/// What a worker answers.
pub(crate) enum Reply {
    /// Phase 1 done: the belief leaving this worker's last module.
    Teacher { step: u64, p_out: Tensor },
    /// Phase 2 done: local losses of this worker's modules (in order) and the sum of their
    /// gradients at `z`.
    Local {
        step: u64,
        losses: Vec<f64>,
        grad_z: Tensor,
        phase1: Duration,
        phase2: Duration,
    },
    /// Inference: logits of this worker's modules and the belief leaving the last one.
    Cascade { logits: Vec<Tensor>, p_out: Tensor },
    /// Weights and optimizer state.
    State(Vec<(String, Tensor)>),
    /// `Load` done.
    Loaded,
    /// The worker failed and has stopped.
    Failed {
        module: Option<usize>,
        cause: String,
    },
}

/// A reply tagged with the worker that sent it.
pub(crate) struct Envelope {
    pub worker: usize,
    pub reply: Reply,
}

/// How a worker is set up.
pub(crate) struct WorkerSetup {
    pub index: usize,
    pub device: Device,
    pub modules: Range<usize>,
    /// libtorch intra-op threads for this worker's thread (CPU workers share the cores).
    pub threads: Option<i32>,
    /// Run on a stream of its own from libtorch's pool (CUDA only).
    pub own_stream: bool,
    /// Fused schedule: the local steps' forwards are the teacher chain.
    pub fused: bool,
    #[cfg(feature = "fault-injection")]
    pub fault: Option<Fault>,
}

/// The coordinator's handle on a worker thread.
pub(crate) struct WorkerHandle {
    pub index: usize,
    pub device: Device,
    pub modules: Range<usize>,
    pub tx: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    exited: Receiver<()>,
}

impl WorkerHandle {
    /// Human description: `worker 1 (cuda:1, modules 3-4)`, modules 1-based.
    pub fn describe(&self) -> String {
        format!(
            "worker {} ({}, modules {}-{})",
            self.index,
            device_name(self.device),
            self.modules.start + 1,
            self.modules.end
        )
    }

    /// Closes the request channel and joins the thread if it ends within `grace`.
    pub fn shut_down(&mut self, grace: Duration) {
        self.tx = None;
        if self.exited.recv_timeout(grace).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            tracing::warn!(
                "{} did not stop within {:?}; leaving it",
                self.describe(),
                grace
            );
        }
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A failure inside a request, before it becomes a `Reply::Failed`.
struct Failure {
    module: Option<usize>,
    cause: String,
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        Failure {
            module: None,
            cause: e.to_string(),
        }
    }
}

impl From<streams::StreamError> for Failure {
    fn from(e: streams::StreamError) -> Self {
        from_stream(e.to_string())
    }
}

fn from_stream(cause: String) -> Failure {
    Failure {
        module: None,
        cause,
    }
}

/// Starts a worker thread that owns `units` (moved to its device inside the thread).
pub(crate) fn spawn(
    setup: WorkerSetup,
    units: Vec<ModuleUnit>,
    replies: Sender<Envelope>,
) -> WorkerHandle {
    let (tx, rx) = crossbeam_channel::bounded::<Request>(4);
    let (exit_tx, exited) = crossbeam_channel::bounded::<()>(1);
    let (index, device, modules) = (setup.index, setup.device, setup.modules.clone());
    let thread = std::thread::Builder::new()
        .name(format!("sid-worker-{index}"))
        .spawn(move || {
            run(setup, units, rx, replies);
            let _ = exit_tx.send(());
        })
        .expect("spawning a worker thread");
    WorkerHandle {
        index,
        device,
        modules,
        tx: Some(tx),
        thread: Some(thread),
        exited,
    }
}

struct State {
    setup: WorkerSetup,
    units: Vec<ModuleUnit>,
    step: u64,
    z: Option<Tensor>,
    labels: Option<Tensor>,
}

fn run(
    setup: WorkerSetup,
    mut units: Vec<ModuleUnit>,
    rx: Receiver<Request>,
    replies: Sender<Envelope>,
) {
    let index = setup.index;
    let send = |reply| {
        replies
            .send(Envelope {
                worker: index,
                reply,
            })
            .is_ok()
    };
    let init = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), Failure> {
        if let Some(n) = setup.threads {
            // The thread count is per thread in libtorch (OpenMP/MKL), but a thread's first
            // parallel op copies the process-wide count, which other workers overwrite. Asking
            // for the count first does that copy now; then this thread's own setting sticks.
            let _ = tch::get_num_threads();
            tch::set_num_threads(n);
        }
        if let (Device::Cuda(i), true) = (setup.device, setup.own_stream) {
            streams::use_pool_stream(i)?;
        }
        for u in &mut units {
            u.to_device(setup.device);
        }
        streams::sync_device(setup.device).map_err(Failure::from)
    }));
    if let Err(f) = flatten(init) {
        send(Reply::Failed {
            module: f.module,
            cause: f.cause,
        });
        return;
    }
    let mut state = State {
        setup,
        units,
        step: 0,
        z: None,
        labels: None,
    };
    while let Ok(request) = rx.recv() {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| state.handle(request, &send)));
        match flatten(outcome) {
            Ok(true) => {}
            Ok(false) => return, // the coordinator is gone
            Err(f) => {
                send(Reply::Failed {
                    module: f.module,
                    cause: f.cause,
                });
                return;
            }
        }
    }
}

/// `panicked: MESSAGE` for a caught panic's payload (worker and stage threads alike).
pub(crate) fn panic_cause(panic: &(dyn std::any::Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {msg}")
}

fn flatten<T>(r: std::thread::Result<Result<T, Failure>>) -> Result<T, Failure> {
    match r {
        Ok(inner) => inner,
        Err(panic) => Err(Failure {
            module: None,
            cause: panic_cause(panic.as_ref()),
        }),
    }
}

impl State {
    /// Applies the injected fault when it is this worker's and this step's.
    #[cfg(feature = "fault-injection")]
    fn inject_fault(&self, step: u64, z: Tensor) -> Result<Tensor, Failure> {
        let Some(kind) = self
            .setup
            .fault
            .filter(|f| f.worker == self.setup.index && f.step == step)
            .map(|f| f.kind)
        else {
            return Ok(z);
        };
        match kind {
            FaultKind::Panic => panic!("injected fault at step {step}"),
            FaultKind::Error => Err(from_stream(format!("injected error at step {step}"))),
            FaultKind::Nan => Ok(&z * f64::NAN),
            FaultKind::Hang => {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(z)
            }
        }
    }

    /// Handles one request; `Ok(false)` when replies can no longer be sent.
    fn handle(&mut self, request: Request, send: &dyn Fn(Reply) -> bool) -> Result<bool, Failure> {
        let device = self.setup.device;
        match request {
            Request::Begin { step, z, labels } => {
                self.step = step;
                self.z = Some(z);
                self.labels = Some(labels);
                Ok(true)
            }
            Request::Teacher { step, p_in } => {
                let _span =
                    tracing::info_span!("worker_step", worker = self.setup.index, step).entered();
                if step != self.step {
                    return Err(from_stream(format!(
                        "teacher belief for step {step} arrived during step {}",
                        self.step
                    )));
                }
                let (Some(z), Some(labels)) = (self.z.take(), self.labels.take()) else {
                    return Err(from_stream(format!(
                        "step {step}: no broadcast of z before the teacher belief"
                    )));
                };
                #[cfg(feature = "fault-injection")]
                let z = self.inject_fault(step, z)?;
                // Phase 1: the teacher chain through this worker's modules — graph-free
                // (reference), or the local steps' own forwards, detached (fused).
                let started = Instant::now();
                let fused = self.setup.fused;
                let teachers = {
                    let _p1 = tracing::info_span!("phase1", worker = self.setup.index).entered();
                    let mut p = p_in;
                    let mut teachers = Vec::with_capacity(self.units.len());
                    for u in self.units.iter_mut() {
                        let next = if fused {
                            u.forward_step(&p, &z)
                        } else {
                            u.teacher(&p, &z)
                        };
                        teachers.push(p);
                        p = next;
                    }
                    streams::sync_device(device)?;
                    if !send(Reply::Teacher { step, p_out: p }) {
                        return Ok(false);
                    }
                    teachers
                };
                let phase1 = started.elapsed();
                let started = Instant::now();
                // Phase 2 right away: it needs nothing from any other worker.
                let _p2 = tracing::info_span!("phase2", worker = self.setup.index).entered();
                let first = self.units[0].index();
                let target = self.units[0].label_target(&labels);
                let failure = |e: sid_core::CoreError| {
                    let module = match &e {
                        sid_core::CoreError::NonFiniteLoss { module, .. } => *module,
                        _ => None,
                    };
                    Failure {
                        module,
                        cause: e.to_string(),
                    }
                };
                let (losses, grad_z) = if fused {
                    // The forwards ran in phase 1: one backward for all of them.
                    sid_core::unit::finish_steps(&mut self.units, &target).map_err(failure)?
                } else {
                    // One module's graph at a time: working memory flat in the module count.
                    let mut losses = Vec::with_capacity(self.units.len());
                    let mut grad_z = None;
                    for (u, p_prev) in self.units.iter_mut().zip(&teachers) {
                        let out = u.local_step(p_prev, &z, &target).map_err(|e| Failure {
                            module: Some(u.index() + 1),
                            cause: e.to_string(),
                        })?;
                        losses.push(out.loss);
                        // A running sum: one gradient held at a time, in module order.
                        grad_z = Some(sid_core::unit::add_next(grad_z, out.grad_z));
                    }
                    let stacked = Tensor::f_stack(&losses, 0).map_err(|e| Failure {
                        module: None,
                        cause: e.to_string(),
                    })?;
                    let grad_z = grad_z.expect("a worker owns at least one module");
                    (stacked, grad_z)
                };
                streams::sync_device(device)?;
                // All of this worker's losses in one read, after its only wait of phase 2.
                let losses = sid_core::unit::read_losses(&losses, first).map_err(failure)?;
                Ok(send(Reply::Local {
                    step,
                    losses,
                    grad_z,
                    phase1,
                    phase2: started.elapsed(),
                }))
            }
            Request::Cascade { z, p_in } => {
                let mut p = p_in;
                let mut logits = Vec::with_capacity(self.units.len());
                tch::no_grad(|| {
                    for u in &self.units {
                        let l = u.logits(&p, &z);
                        p = sid_core::belief::belief(&l);
                        logits.push(l);
                    }
                });
                streams::sync_device(device)?;
                Ok(send(Reply::Cascade { logits, p_out: p }))
            }
            Request::State => {
                let state = self.units.iter().flat_map(|u| u.state()).collect();
                Ok(send(Reply::State(state)))
            }
            Request::Load(named) => {
                let named = NamedTensors::from(named);
                for u in &mut self.units {
                    u.load_state(&named).map_err(|e| Failure {
                        module: Some(u.index() + 1),
                        cause: e.to_string(),
                    })?;
                }
                streams::sync_device(device)?;
                Ok(send(Reply::Loaded))
            }
        }
    }
}
