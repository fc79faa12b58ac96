//! The stage schedule, written once: what a stage does with each message, whatever moves the
//! messages ([`crate::transport`]).
//!
//! A training micro-batch: forward through the stage, **send `(sg(z), p)` downstream at once**,
//! then the local losses' backward into the stage's own parameters, gradients accumulated; the
//! step's last micro-batch also steps the optimisers and reports the losses. A stage needs
//! nothing back from later stages, so stage s works on step t+1 while stage s+1 is still on
//! step t: no flush between steps, and the result equals running the stages one after another
//! (each stage's input for a step was computed by the same parameters in both orders).
//!
//! A backprop pipeline stage ([`Work::Bp`]) runs a step as a list of forward and backward
//! operations on its micro-batches ([`BpSchedule`]: GPipe's fill-drain or 1F1B), waiting for
//! activations from the previous stage and gradients from the next. Inference, checkpoints and
//! failures are handled the same way for both methods.

use std::time::{Duration, Instant};

use sid_core::bp_stage::BpStage;
use sid_core::{ExtractorUnit, NamedTensors, Stage};
use sid_telemetry::AllocOwner;
use tch::{Kind as TKind, Tensor};

#[cfg(feature = "fault-injection")]
use crate::fault::{Fault, FaultKind};
use crate::ops::{extractor_ops, BpSchedule, Op};
use crate::paper::ModuleBlock;
use crate::stage_graph::GraphSlot;
use crate::transport::{Kind, Message, Received, Report, Tag, Transport};

/// What a stage trains.
pub enum Work {
    /// A staged-SID stage.
    Sid(Stage),
    /// A stage of the pipelined BP baseline, its schedule and the number of stages.
    Bp(BpStage, BpSchedule, usize),
    /// The paper's SID, stage 1: the extractor alone, and the number of module stages whose
    /// gradients it sums.
    Extractor(ExtractorUnit, usize),
    /// The paper's SID, a later stage: a block of belief modules.
    Modules(ModuleBlock),
}

impl Work {
    fn index(&self) -> usize {
        match self {
            Self::Sid(s) => s.index(),
            Self::Bp(s, ..) => s.index(),
            Self::Extractor(..) => 0,
            Self::Modules(b) => b.index(),
        }
    }

    /// Moves the stage to `device`.
    pub fn to_device(&mut self, device: tch::Device) {
        match self {
            Self::Sid(s) => s.to_device(device),
            Self::Bp(s, ..) => s.to_device(device),
            Self::Extractor(e, _) => e.to_device(device),
            Self::Modules(b) => b.to_device(device),
        }
    }

    /// Weights and optimiser state, named as in checkpoints.
    fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Sid(stage) => stage.state(),
            Self::Bp(stage, ..) => stage.state(),
            Self::Extractor(e, _) => e.state(),
            Self::Modules(block) => block.state(),
        }
    }
}

/// Why a stage stopped.
#[derive(Debug)]
pub struct Failure {
    /// 1-based module, when the failure belongs to one.
    pub module: Option<usize>,
    /// What happened.
    pub cause: String,
}

impl Failure {
    /// A failure that belongs to no module.
    pub fn from_cause(cause: String) -> Self {
        Self::new(cause)
    }

    fn new(cause: impl Into<String>) -> Self {
        Self {
            module: None,
            cause: cause.into(),
        }
    }
}

/// What a caught panic said, for the error that names the stage.
pub(crate) fn panic_cause(panic: &(dyn std::any::Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    format!("panicked: {msg}")
}

impl From<tch::TchError> for Failure {
    fn from(e: tch::TchError) -> Self {
        Self::new(e.to_string())
    }
}

impl From<crate::RuntimeError> for Failure {
    fn from(e: crate::RuntimeError) -> Self {
        Self::new(e.to_string())
    }
}

impl From<sid_core::CoreError> for Failure {
    fn from(e: sid_core::CoreError) -> Self {
        let module = match &e {
            sid_core::CoreError::NonFiniteLoss { module, .. } => *module,
            _ => None,
        };
        Self {
            module,
            cause: e.to_string(),
        }
    }
}

/// A stage and where it is in its step.
pub struct StageRunner {
    work: Work,
    /// The step in progress and the next micro-batch expected.
    step: u64,
    next_micro: usize,
    /// This step's losses so far [n], on the device.
    losses: Option<Tensor>,
    busy: Duration,
    forward: Duration,
    #[cfg(feature = "fault-injection")]
    fault: Option<Fault>,
    /// Longest wait inside a backprop step (for activations and gradients).
    bp_timeout: Duration,
    /// Staged SID on a GPU with one micro-batch: replay each step from a CUDA graph
    /// ([`crate::stage_graph`]).
    cuda_graph: GraphSlot,
    /// Who this stage's allocations are charged to, when measured.
    memory: Option<AllocOwner>,
}

impl StageRunner {
    /// Wraps a stage.
    pub fn new(work: Work) -> Self {
        Self {
            work,
            step: 0,
            next_micro: 0,
            losses: None,
            busy: Duration::ZERO,
            forward: Duration::ZERO,
            #[cfg(feature = "fault-injection")]
            fault: None,
            bp_timeout: Duration::from_secs(300),
            cuda_graph: GraphSlot::Off,
            memory: None,
        }
    }

    /// Charges what the stage allocates while it runs ([`drive`]) to `owner` (weights and
    /// optimiser state, made before, are counted by [`StageRunner::state_bytes`]).
    pub fn with_memory(mut self, owner: Option<AllocOwner>) -> Self {
        self.memory = owner;
        self
    }

    /// Who the stage's allocations are charged to, when measured.
    pub fn memory(&self) -> Option<&AllocOwner> {
        self.memory.as_ref()
    }

    /// Bytes of the stage's weights and optimiser state.
    pub fn state_bytes(&self) -> u64 {
        sid_telemetry::allocations::tensor_bytes(self.work.state().iter().map(|(_, t)| t))
    }

    /// Replays each training step of a staged-SID stage on a GPU from a CUDA graph, when a
    /// step is one micro-batch (see [`crate::stage_graph`]); nothing changes on a CPU.
    pub fn with_cuda_graph(mut self, on: bool) -> Self {
        self.cuda_graph = if on && matches!(self.work, Work::Sid(_)) {
            GraphSlot::Wanted
        } else {
            GraphSlot::Off
        };
        self
    }

    /// Sets the fault to inject; it strikes when it names this stage (tests).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault.filter(|f| f.worker == self.work.index());
        self
    }

    /// Sets the longest wait inside a backprop step.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.bp_timeout = timeout;
        self
    }

    /// The stage's 0-based position.
    pub fn index(&self) -> usize {
        self.work.index()
    }

    /// The stage.
    pub fn work(&self) -> &Work {
        &self.work
    }

    /// The stage, to move it to its device.
    pub fn work_mut(&mut self) -> &mut Work {
        &mut self.work
    }

    /// Whether a step is half done (some of its micro-batches still to come).
    pub fn mid_step(&self) -> bool {
        self.next_micro != 0
    }

    fn strike(&self, step: u64, input: Tensor) -> Result<Tensor, Failure> {
        #[cfg(feature = "fault-injection")]
        {
            if let Some(f) = self.fault.filter(|f| f.step == step) {
                return strike(f.kind, step, input);
            }
        }
        let _ = step;
        Ok(input)
    }

    /// Handles one message: the whole schedule of a stage.
    pub fn handle(&mut self, msg: Message, t: &mut dyn Transport) -> Result<(), Failure> {
        let index = self.work.index();
        match (&msg, &self.work) {
            (Message::Train { .. }, Work::Bp(..)) => return self.bp_step(msg, t),
            (Message::Train { .. }, Work::Extractor(..)) => return self.extractor_step(msg, t),
            _ => {}
        }
        match msg {
            Message::Train {
                tag,
                micro_batches,
                input,
                p,
                labels,
                scale,
            } => {
                let expected = if self.next_micro == 0 {
                    tag.step > self.step && tag.micro == 0
                } else {
                    tag.step == self.step && tag.micro == self.next_micro
                };
                if !expected {
                    return Err(Failure::new(format!(
                        "stage {} got micro-batch {} of step {} while expecting micro-batch {} of step {}",
                        index + 1,
                        tag.micro,
                        tag.step,
                        self.next_micro,
                        if self.next_micro == 0 { self.step + 1 } else { self.step }
                    )));
                }
                let _span = tracing::info_span!(
                    "stage_micro",
                    stage = index + 1,
                    step = tag.step,
                    micro = tag.micro
                )
                .entered();
                let started = Instant::now();
                if tag.micro == 0 {
                    self.step = tag.step;
                    self.busy = Duration::ZERO;
                    self.forward = Duration::ZERO;
                }
                let input = self.strike(tag.step, input)?;
                // The step's optimiser update already ran (inside a CUDA graph's replay).
                let mut applied = false;
                let l = match &mut self.work {
                    Work::Sid(stage) => {
                        let graph = match micro_batches {
                            1 => self.cuda_graph.for_input(&input, index),
                            _ => None,
                        };
                        let (out, whole_step) = match graph {
                            Some(graph) => {
                                // The whole step at once: forward, backward, optimiser step.
                                let (out, l) = graph.step(stage, &input, &p, &labels)?;
                                (out, Some(l))
                            }
                            None => {
                                let target = stage.label_target(&labels);
                                (stage.forward_micro(&input, &p, &target), None)
                            }
                        };
                        self.forward += started.elapsed();
                        if let Some(z) = out.z {
                            // Downstream can start on this micro-batch while this stage runs
                            // backward (eagerly; a graphed step has run it already).
                            t.send_down(Message::Train {
                                tag,
                                micro_batches,
                                input: z,
                                p: out.p,
                                labels,
                                scale,
                            })?;
                        }
                        match whole_step {
                            Some(l) => {
                                applied = true;
                                l
                            }
                            None => stage.backward_micro(scale)?,
                        }
                    }
                    Work::Modules(block) => {
                        // Phase 1 (graph-free), passed on at once; then phase 2, whose
                        // gradient at z goes straight to the extractor.
                        let p_out = block.forward_micro(&input, &p, &labels);
                        self.forward += started.elapsed();
                        t.send_down(Message::Train {
                            tag,
                            micro_batches,
                            input: input.shallow_clone(),
                            p: p_out,
                            labels,
                            scale,
                        })?;
                        let (l, grad_z) = block.backward_micro(scale)?;
                        t.send_grad_to_first(tag, grad_z)?;
                        l
                    }
                    Work::Bp(..) | Work::Extractor(..) => {
                        unreachable!("whole steps are handled above")
                    }
                };
                self.losses = Some(match self.losses.take() {
                    None => l,
                    Some(acc) => acc + l,
                });
                self.next_micro = tag.micro + 1;
                if self.next_micro == micro_batches {
                    self.next_micro = 0;
                    let first = match &mut self.work {
                        Work::Sid(stage) => {
                            if !applied {
                                t.reduce_gradients(&stage.gradients())?;
                                stage.apply();
                            }
                            stage.spec().modules.start
                        }
                        Work::Modules(block) => {
                            block.apply();
                            block.range().start
                        }
                        Work::Bp(..) | Work::Extractor(..) => {
                            unreachable!("whole steps are handled above")
                        }
                    };
                    let losses = self.losses.take().expect("at least one micro-batch");
                    let losses = sid_core::unit::read_losses(&losses.to_kind(TKind::Float), first)?;
                    self.busy += started.elapsed();
                    t.report(Report::Losses {
                        stage: index,
                        step: tag.step,
                        losses,
                        busy: self.busy,
                        forward: self.forward,
                    })?;
                } else {
                    self.busy += started.elapsed();
                }
                Ok(())
            }
            Message::Eval { tag, input, p } => {
                let (z, logits, p_out) = match &self.work {
                    Work::Sid(stage) => stage.cascade(&input, &p),
                    Work::Bp(stage, ..) => {
                        let (h, logits) = stage.cascade(&input);
                        (h, logits, p)
                    }
                    Work::Extractor(e, _) => (Some(e.infer(&input)), Vec::new(), p),
                    Work::Modules(block) => {
                        let (logits, p_out) = block.cascade(&input, &p);
                        (Some(input), logits, p_out)
                    }
                };
                if let Some(z) = z {
                    t.send_down(Message::Eval {
                        tag,
                        input: z,
                        p: p_out,
                    })?;
                }
                t.report(Report::Logits {
                    stage: index,
                    step: tag.step,
                    logits,
                })?;
                Ok(())
            }
            Message::State { tag } => {
                self.idle("a state request")?;
                let state = self.work.state();
                t.report(Report::State {
                    stage: index,
                    state,
                })?;
                t.send_down(Message::State { tag })?;
                Ok(())
            }
            Message::Load { tag, named } => {
                self.idle("a checkpoint")?;
                let mine = NamedTensors::from(
                    named
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect::<Vec<_>>(),
                );
                match &mut self.work {
                    Work::Sid(stage) => stage.load_state(&mine)?,
                    Work::Bp(stage, ..) => stage.load_state(&mine)?,
                    Work::Extractor(e, _) => e.load_state(&mine)?,
                    Work::Modules(block) => block.load_state(&mine)?,
                }
                t.send_down(Message::Load { tag, named })?;
                t.report(Report::Loaded { stage: index })?;
                Ok(())
            }
        }
    }

    fn idle(&self, what: &str) -> Result<(), Failure> {
        if self.mid_step() {
            return Err(Failure::new(format!(
                "stage {} got {what} in the middle of step {}",
                self.work.index() + 1,
                self.step
            )));
        }
        Ok(())
    }

    /// Starts a flushing step (a backprop stage's, or the paper's extractor's) from its first
    /// micro-batch, which must begin a new step.
    fn begin_flush(&mut self, first: Message) -> Result<Flush, Failure> {
        let Message::Train {
            tag, micro_batches, ..
        } = &first
        else {
            unreachable!("called with a training message")
        };
        let (step, m) = (tag.step, *micro_batches);
        let index = self.work.index();
        if tag.micro != 0 || step <= self.step {
            return Err(Failure::new(format!(
                "stage {} got micro-batch {} of step {step} while expecting the start of step {}",
                index + 1,
                tag.micro,
                self.step + 1
            )));
        }
        self.step = step;
        Ok(Flush {
            index,
            step,
            micro_batches: m,
            timeout: self.bp_timeout,
            #[cfg(feature = "fault-injection")]
            fault: self.fault.filter(|f| f.step == step),
            started: Instant::now(),
            forward: Duration::ZERO,
            waiting: Duration::ZERO,
            next: Some(first),
        })
    }

    /// A whole backprop step from its first micro-batch: the schedule's operations in order,
    /// each forward's input from the previous stage (the first is `first`), each backward's
    /// gradient from the next; then one Adam step and the report.
    fn bp_step(&mut self, first: Message, t: &mut dyn Transport) -> Result<(), Failure> {
        let mut f = self.begin_flush(first)?;
        let (index, step, m) = (f.index, f.step, f.micro_batches);
        let Work::Bp(stage, schedule, stages) = &mut self.work else {
            unreachable!("a backprop stage")
        };
        let mut loss: Option<Tensor> = None;
        for op in schedule.ops(*stages, index, m) {
            match op {
                Op::Forward(j) => {
                    let (tag, input, _, labels, scale) = f.micro_batch(t, j)?;
                    let out = f.forward(|| stage.forward_micro(j, &input, &labels, scale));
                    if let Some(h) = out {
                        // Backprop stages pass no belief.
                        let p = Tensor::zeros([0], (TKind::Float, h.device()));
                        t.send_down(Message::Train {
                            tag,
                            micro_batches: m,
                            input: h,
                            p,
                            labels,
                            scale,
                        })?;
                    }
                }
                Op::Backward(j) => {
                    let grad = if stage.is_last() {
                        None
                    } else {
                        Some(f.gradient(t, j, &format!("stage {}", index + 2))?)
                    };
                    let (g_in, l) = stage.backward_micro(j, grad.as_ref())?;
                    if let Some(g) = g_in {
                        t.send_up(
                            Tag {
                                step,
                                micro: j,
                                kind: Kind::Train,
                            },
                            g,
                        )?;
                    }
                    if let Some(l) = l {
                        loss = Some(match loss {
                            None => l,
                            Some(acc) => acc + l,
                        });
                    }
                }
            }
        }
        t.reduce_gradients(&stage.gradients())?;
        stage.apply();
        let losses = match loss {
            Some(l) => {
                let v = l.to_kind(TKind::Double).double_value(&[]);
                if !v.is_finite() {
                    return Err(Failure::from(sid_core::CoreError::NonFiniteLoss {
                        what: "backprop".into(),
                        module: None,
                        value: v,
                    }));
                }
                vec![v]
            }
            None => Vec::new(),
        };
        f.report(t, losses)
    }

    /// The paper's SID, stage 1: a whole step from its first micro-batch, in the order of
    /// [`extractor_ops`]. A forward sends `(sg(z), p_0)` down and keeps `z`'s graph; a
    /// backward waits for every module stage's gradient of that micro-batch, sums them in
    /// stage order and backpropagates the sum through `z`. Then one Adam step and the report.
    fn extractor_step(&mut self, first: Message, t: &mut dyn Transport) -> Result<(), Failure> {
        let mut f = self.begin_flush(first)?;
        let m = f.micro_batches;
        let Work::Extractor(extractor, module_stages) = &mut self.work else {
            unreachable!("the extractor stage")
        };
        // Each micro-batch's features keep their graph until its backward.
        let mut zs: Vec<Option<Tensor>> = (0..m).map(|_| None).collect();
        for op in extractor_ops(m) {
            match op {
                Op::Forward(j) => {
                    let (tag, input, p, labels, scale) = f.micro_batch(t, j)?;
                    let z = f.forward(|| extractor.forward(&input));
                    t.send_down(Message::Train {
                        tag,
                        micro_batches: m,
                        input: z.detach(),
                        p,
                        labels,
                        scale,
                    })?;
                    zs[j] = Some(z);
                }
                Op::Backward(j) => {
                    let mut grad_z = None;
                    for w in 0..*module_stages {
                        let g = f.gradient(t, j, &format!("stage {}", w + 2))?;
                        grad_z = Some(sid_core::unit::add_next(grad_z, g));
                    }
                    let z = zs[j].take().expect("a forward precedes its backward");
                    let grad_z = grad_z.ok_or_else(|| {
                        Failure::new("the extractor has no module stages to wait for")
                    })?;
                    extractor.accumulate_backward(&z, &grad_z)?;
                }
            }
        }
        extractor.apply();
        f.report(t, Vec::new())
    }
}

/// Where a flushing step (a backprop stage's, the paper extractor's) is: its micro-batches
/// taken from upstream one by one, the time spent computing forwards and waiting.
struct Flush {
    /// 0-based stage.
    index: usize,
    step: u64,
    micro_batches: usize,
    /// Longest wait for a micro-batch or a gradient.
    timeout: Duration,
    /// The fault to inject in this step (tests).
    #[cfg(feature = "fault-injection")]
    fault: Option<Fault>,
    started: Instant,
    forward: Duration,
    waiting: Duration,
    /// The step's first micro-batch, until taken.
    next: Option<Message>,
}

impl Flush {
    /// Micro-batch `j`'s tag, input, belief, labels and share of the batch.
    fn micro_batch(
        &mut self,
        t: &mut dyn Transport,
        j: usize,
    ) -> Result<(Tag, Tensor, Tensor, Tensor, f64), Failure> {
        let msg = next_micro_batch(
            &mut self.next,
            t,
            self.timeout,
            &mut self.waiting,
            self.index,
            self.step,
            j,
        )?;
        let Message::Train {
            tag,
            input,
            p,
            labels,
            scale,
            ..
        } = msg
        else {
            unreachable!("next_micro_batch returns training messages")
        };
        #[cfg(feature = "fault-injection")]
        let input = match self.fault {
            Some(f) if j == 0 => strike(f.kind, self.step, input)?,
            _ => input,
        };
        Ok((tag, input, p, labels, scale))
    }

    /// Runs a forward pass, timing it.
    fn forward<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let out = f();
        self.forward += started.elapsed();
        out
    }

    /// The gradient of micro-batch `j` from `from` (for messages), waiting at most the timeout.
    fn gradient(&mut self, t: &mut dyn Transport, j: usize, from: &str) -> Result<Tensor, Failure> {
        let wait = Instant::now();
        let (gtag, g) = t.recv_grad(self.timeout)?;
        self.waiting += wait.elapsed();
        if gtag.step != self.step || gtag.micro != j {
            return Err(Failure::new(format!(
                "stage {} got {from}'s gradient of micro-batch {} of step {} while expecting micro-batch {j} of step {}",
                self.index + 1,
                gtag.micro,
                gtag.step,
                self.step
            )));
        }
        Ok(g)
    }

    /// Reports the step's losses and where its time went.
    fn report(self, t: &mut dyn Transport, losses: Vec<f64>) -> Result<(), Failure> {
        t.report(Report::Losses {
            stage: self.index,
            step: self.step,
            losses,
            busy: self.started.elapsed().saturating_sub(self.waiting),
            forward: self.forward,
        })?;
        Ok(())
    }
}

/// Micro-batch `j` of `step` for stage `index` (0-based) inside a flushing step: `next` when
/// one is in hand (the step's first), else the next message from upstream, waited for at most
/// `timeout` (added to `waiting`). Anything but that training micro-batch is a failure.
fn next_micro_batch(
    next: &mut Option<Message>,
    t: &mut dyn Transport,
    timeout: Duration,
    waiting: &mut Duration,
    index: usize,
    step: u64,
    j: usize,
) -> Result<Message, Failure> {
    let msg = match next.take() {
        Some(m) => m,
        None => {
            let w = Instant::now();
            let got = t.recv(timeout)?;
            *waiting += w.elapsed();
            match got {
                Received::Message(m) => m,
                _ => {
                    let from = if index == 0 {
                        "the coordinator".to_string()
                    } else {
                        format!("stage {index}")
                    };
                    return Err(Failure::new(format!(
                        "stage {} waited {} s for micro-batch {j} of step {step} from {from} and gave up",
                        index + 1,
                        timeout.as_secs(),
                    )));
                }
            }
        }
    };
    let tag = match &msg {
        Message::Train { tag, .. } => *tag,
        _ => {
            return Err(Failure::new(format!(
                "stage {} got another message in the middle of step {step}",
                index + 1
            )))
        }
    };
    if tag.step != step || tag.micro != j {
        return Err(Failure::new(format!(
            "stage {} got micro-batch {} of step {} while expecting micro-batch {j} of step {step}",
            index + 1,
            tag.micro,
            tag.step
        )));
    }
    Ok(msg)
}

#[cfg(feature = "fault-injection")]
fn strike(kind: FaultKind, step: u64, input: Tensor) -> Result<Tensor, Failure> {
    match kind {
        FaultKind::Panic => panic!("injected fault at step {step}"),
        FaultKind::Error => Err(Failure::new(format!("injected error at step {step}"))),
        FaultKind::Nan => Ok(input * f64::NAN),
        FaultKind::Hang => {
            std::thread::sleep(Duration::from_secs(3600));
            Ok(input)
        }
    }
}

/// How long a stage that is between steps waits before looking again: it waits for the
/// coordinator, which has its own timeouts, so an idle stage never gives up.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs a stage until its upstream closes (threads) or its inbox is empty (one thread):
/// receive, handle, repeat. A stage in the middle of a step waits at most `timeout` for the
/// rest of it, then fails naming the stage it waited for.
pub fn drive(
    runner: &mut StageRunner,
    t: &mut dyn Transport,
    timeout: Duration,
    local: bool,
) -> Result<(), Failure> {
    // What the stage allocates from here on is its own, inputs copied to its device included.
    let _charged = runner
        .memory
        .as_ref()
        .map(AllocOwner::enter)
        .transpose()
        .map_err(|e| Failure::new(e.to_string()))?;
    let mut waited = Duration::ZERO;
    loop {
        let wait = if runner.mid_step() {
            timeout
        } else {
            IDLE_POLL
        };
        match t.recv(wait)? {
            Received::Message(m) => {
                waited = Duration::ZERO;
                runner.handle(m, t)?;
            }
            Received::Nothing if local => return Ok(()),
            Received::Nothing if runner.mid_step() => {
                waited += wait;
                let index = runner.index();
                return Err(Failure::new(format!(
                    "stage {} waited {} s for micro-batch {} of step {} from {} and gave up",
                    index + 1,
                    waited.as_secs(),
                    runner.next_micro,
                    runner.step,
                    if index == 0 {
                        "the coordinator".to_string()
                    } else {
                        format!("stage {index}")
                    }
                )));
            }
            Received::Nothing => {}
            Received::Closed => return Ok(()),
        }
    }
}
