//! The step interpreter, written once: a stage runs its step's operation list
//! ([`crate::ops`]) on whatever moves the messages ([`crate::transport`]), for every method.
//!
//! A training micro-batch arrives; the interpreter runs the step's operations from where it
//! stopped until one needs a micro-batch that has not arrived yet (then it waits for the next
//! message) or the list ends (then the optimiser step and the report):
//! - `Forward(j)`: micro-batch j through the unit, its output sent on **at once**;
//! - `Backward(j)`: the gradients the unit waits for (none for SID's local losses; the next
//!   stage's for backprop; every module stage's for the paper's extractor, summed in stage
//!   order), the unit's backward, its gradient for an earlier stage sent back;
//! - `BackwardInput(j)` / `BackwardWeight(j)`: the two halves of a split backward.
//!
//! Staged SID's list needs nothing back from later stages, so stage s works on step t+1 while
//! stage s+1 is still on step t: no flush between steps. Inference, checkpoints and failures
//! are handled the same way for every unit.

use std::time::{Duration, Instant};

use sid_core::graph::GraphedStep;
use sid_core::stage::StageOutput;
use sid_core::unit::{add_next, MicroBatch, Unit};
use sid_core::NamedTensors;
use sid_telemetry::AllocOwner;
use tch::Tensor;

use crate::config::StagedConfig;
#[cfg(feature = "fault-injection")]
use crate::fault::{Fault, FaultKind};
use crate::ops::{Op, Schedule};
use crate::transport::{Message, Received, Report, Tag, Transport};
use crate::Failure;

/// The step in progress on a stage.
#[derive(Default)]
struct Step {
    micro_batches: usize,
    ops: Vec<Op>,
    /// The next operation to run.
    next_op: usize,
    /// The next micro-batch expected from upstream.
    next_micro: usize,
    /// The step's losses so far, on the device.
    losses: Option<Tensor>,
    /// Time spent computing (waits for gradients excluded), and the part in forwards.
    busy: Duration,
    forward: Duration,
    /// A CUDA graph's replay ran the whole step, optimiser step included.
    applied: bool,
    /// The gradients of the backward in progress received so far, summed, and their count
    /// (stages in one thread: the senders may not have run yet).
    grad_sum: Option<Tensor>,
    grads_got: usize,
    /// A training micro-batch that arrived while the step waited for a gradient.
    early: Option<Message>,
}

/// A stage: its unit, its schedule and where it is in its step.
pub struct StageRunner {
    unit: Box<dyn Unit>,
    schedule: Schedule,
    /// Stages in the pipeline (backprop schedules depend on the stage's place).
    stages: usize,
    /// The last step begun (the one in progress, if any).
    step: u64,
    current: Option<Step>,
    /// Longest wait for a gradient inside a step, or for the rest of a step begun.
    timeout: Duration,
    /// A fault to inject (tests), struck when it names this stage.
    #[cfg(feature = "fault-injection")]
    fault: Option<Fault>,
    /// A staged-SID stage on a GPU with one micro-batch: each step replayed from a CUDA graph
    /// of its own ([`GraphedStep::stage`]).
    cuda_graph: Option<GraphedStep<(StageOutput, Tensor)>>,
    /// Who this stage's allocations are charged to, when measured.
    memory: Option<AllocOwner>,
    /// Leave a step's losses on the device, for [`StageRunner::take_queued_losses`], instead
    /// of reading them (a step captured into a CUDA graph must not read anything back).
    queue_losses: bool,
    queued: Option<Tensor>,
    /// Data-parallel replicas of this stage in other processes, if any: its gradients are
    /// summed over them, in place, before its optimiser step.
    pub(crate) replicas: Option<std::sync::Arc<sid_dist::Group>>,
}

impl StageRunner {
    /// Runs `unit` as stage `unit.stage()` of `stages`, its steps in the order of `schedule`,
    /// with `cfg`'s timeout, CUDA graphs and injected fault (tests; it strikes when it names
    /// this stage). When `cfg` tracks memory, what the stage allocates while it runs
    /// ([`drive`]) is charged to it (weights and optimiser state, made before, are counted by
    /// [`StageRunner::memory`]).
    pub(crate) fn new(
        mut unit: Box<dyn Unit>,
        schedule: Schedule,
        stages: usize,
        cfg: &StagedConfig,
    ) -> crate::Result<Self> {
        // A staged-SID stage on a GPU, one micro-batch a step: each step is replayed from a
        // CUDA graph (`GraphedStep::stage`); nothing changes on a CPU.
        let graphed = cfg.cuda_graph && cfg.micro_batches == 1 && cfg.ranks.is_none();
        let memory = (cfg.track_memory && cfg.ranks.is_none()).then(AllocOwner::new);
        Ok(Self {
            cuda_graph: (graphed && unit.as_stage_mut().is_some())
                .then(GraphedStep::on_first_gpu_step),
            unit,
            schedule,
            stages,
            step: 0,
            current: None,
            timeout: cfg.timeout,
            #[cfg(feature = "fault-injection")]
            fault: cfg.fault,
            memory: memory.transpose()?,
            queue_losses: false,
            queued: None,
            replicas: None,
        })
    }

    /// With `on`, the steps that follow leave their losses on the device (reported as none),
    /// for [`StageRunner::take_queued_losses`]: nothing of the step is read back to the host.
    pub fn queue_losses(&mut self, on: bool) {
        self.queue_losses = on;
    }

    /// The losses [n] of the last step run with [`StageRunner::queue_losses`], on the device.
    pub fn take_queued_losses(&mut self) -> Option<Tensor> {
        self.queued.take()
    }

    /// When measured: who the stage's allocations are charged to, and the bytes of its
    /// weights and optimiser state.
    pub fn memory(&self) -> Option<(AllocOwner, u64)> {
        let state = || self.unit.state();
        let bytes = || sid_telemetry::allocations::tensor_bytes(state().iter().map(|(_, t)| t));
        self.memory.as_ref().map(|o| (o.clone(), bytes()))
    }

    /// The unit it runs.
    pub fn unit(&self) -> &dyn Unit {
        self.unit.as_ref()
    }

    /// The unit, to move it to its device.
    pub fn unit_mut(&mut self) -> &mut dyn Unit {
        self.unit.as_mut()
    }

    /// Whether a step is half done (some of its micro-batches still to come).
    pub fn mid_step(&self) -> bool {
        self.current.is_some()
    }

    /// Handles one message.
    pub fn handle(&mut self, msg: Message, t: &mut dyn Transport) -> Result<(), Failure> {
        match msg {
            Message::Train {
                tag, micro_batches, ..
            } => {
                self.take_in_order(tag, micro_batches)?;
                let _span = tracing::info_span!(
                    "stage_micro",
                    stage = self.unit.stage() + 1,
                    step = tag.step,
                    micro = tag.micro
                )
                .entered();
                self.run(t, Some(msg))
            }
            Message::Eval { tag, input, p } => {
                self.idle("an inference batch")?;
                let out = self.unit.infer(&input, &p);
                if let Some(next) = out.next {
                    t.send_down(Message::Eval {
                        tag,
                        input: next,
                        p: out.p,
                    })?;
                }
                t.report(Report::Logits {
                    step: tag.step,
                    logits: out.logits,
                })
                .map_err(Failure::from)
            }
            Message::State { tag } => {
                self.idle("a state request")?;
                t.report(Report::State(self.unit.state()))?;
                t.send_down(Message::State { tag }).map_err(Failure::from)
            }
            Message::Load { tag, named } => {
                self.idle("a checkpoint")?;
                let mine = named.iter().map(|(n, t)| (n.clone(), t.shallow_clone()));
                self.unit.load_state(&NamedTensors(mine.collect()))?;
                t.send_down(Message::Load { tag, named })?;
                t.report(Report::Loaded).map_err(Failure::from)
            }
        }
    }

    /// Checks that `tag` is the micro-batch this stage expects (a new step begins with its
    /// micro-batch 0) and begins the step's operation list at a new step.
    fn take_in_order(&mut self, tag: Tag, micro_batches: usize) -> Result<(), Failure> {
        let (step, micro, fits) = match &self.current {
            Some(s) => (
                self.step,
                s.next_micro,
                (tag.step, tag.micro) == (self.step, s.next_micro),
            ),
            None => (self.step + 1, 0, tag.step > self.step && tag.micro == 0),
        };
        if !fits {
            return Err(Failure::new(format!(
                "stage {} got micro-batch {} of step {} while expecting micro-batch {micro} of step {step}",
                self.unit.stage() + 1,
                tag.micro,
                tag.step,
            )));
        }
        if self.current.is_none() {
            self.step = tag.step;
            self.current = Some(Step {
                micro_batches,
                ops: self
                    .schedule
                    .ops(self.stages, self.unit.stage(), micro_batches),
                ..Step::default()
            });
        }
        Ok(())
    }

    /// Runs the step's operations from where it stopped, `arrived` being the training
    /// micro-batch the next forward takes, until a forward needs one more or a backward a gradient not sent
    /// yet (it returns to wait for it) or the list ends (the optimiser step and the report).
    fn run(&mut self, t: &mut dyn Transport, mut arrived: Option<Message>) -> Result<(), Failure> {
        let started = Instant::now();
        let mut waiting = Duration::ZERO;
        let mut s = self.current.take().expect("a step in progress");
        while let Some(&op) = s.ops.get(s.next_op) {
            match op {
                Op::Forward(j) => {
                    // One that came while the step waited for a gradient came first.
                    let Some(Message::Train {
                        tag,
                        input,
                        p,
                        labels,
                        scale,
                        ..
                    }) = s.early.take().or_else(|| arrived.take())
                    else {
                        break;
                    };
                    let input = self.strike(self.step, input)?;
                    let f = Instant::now();
                    let graph = self
                        .cuda_graph
                        .as_mut()
                        .filter(|_| input.device().is_cuda());
                    let graphed = match (s.micro_batches, self.unit.as_stage_mut(), graph) {
                        // The whole step at once: forward, backward, optimiser step.
                        (1, Some(stage), Some(g)) => Some(g.stage(stage, &input, &p, &labels)?),
                        _ => None,
                    };
                    let passed = match graphed {
                        Some((out, losses)) => {
                            s.losses = Some(losses);
                            s.applied = true;
                            s.next_op = s.ops.len() - 1;
                            out.z.map(|z| sid_core::unit::Passed { input: z, p: out.p })
                        }
                        None => self.unit.forward(
                            j,
                            MicroBatch {
                                input: &input,
                                p: &p,
                                labels: &labels,
                                scale,
                            },
                        )?,
                    };
                    s.forward += f.elapsed();
                    if let Some(out) = passed {
                        // The next stage starts on this micro-batch while this one goes on.
                        t.send_down(Message::Train {
                            tag,
                            micro_batches: s.micro_batches,
                            input: out.input,
                            p: out.p,
                            labels,
                            scale,
                        })?;
                    }
                    s.next_micro = j + 1;
                }
                Op::Backward(j) | Op::BackwardInput(j) => {
                    let w = Instant::now();
                    let got = self.gradients_for(t, &mut s, j)?;
                    waiting += w.elapsed();
                    let Some(grad) = got else {
                        s.early = s.early.take().or(arrived.take());
                        break;
                    };
                    let b = match op {
                        Op::Backward(_) => self.unit.backward(j, grad.as_ref())?,
                        _ => self.unit.backward_input(j, grad.as_ref())?,
                    };
                    if let Some(g) = b.grad {
                        t.send_grad(Tag::new(self.step, j), g)?;
                    }
                    if let Some(l) = b.losses {
                        s.losses = Some(add_next(s.losses.take(), l));
                    }
                }
                Op::BackwardWeight(j) => self.unit.backward_weight(j)?,
            }
            s.next_op += 1;
        }
        if s.next_op < s.ops.len() {
            s.busy += started.elapsed().saturating_sub(waiting);
            self.current = Some(s);
            return Ok(());
        }
        if !s.applied {
            if let Some(g) = &self.replicas {
                crate::ranks::replica_sum(g, &self.unit.gradients())?;
            }
            self.unit.apply();
        }
        let losses = match s.losses {
            Some(l) if self.queue_losses => {
                self.queued = Some(l);
                Vec::new()
            }
            Some(l) => self.unit.read_losses(&l)?,
            None => Vec::new(),
        };
        s.busy += started.elapsed().saturating_sub(waiting);
        t.report(Report::Losses {
            step: self.step,
            losses,
            busy: s.busy,
            forward: s.forward,
        })
        .map_err(Failure::from)
    }

    /// The gradient micro-batch `j`'s backward needs: none, or the sum, in stage order, of
    /// one from each of the later stages the unit waits for; `None` while some have not been
    /// sent yet (stages in one thread).
    fn gradients_for(
        &mut self,
        t: &mut dyn Transport,
        s: &mut Step,
        j: usize,
    ) -> Result<Option<Option<Tensor>>, Failure> {
        let index = self.unit.stage();
        let step = self.step;
        for w in s.grads_got..self.unit.grads_needed() {
            let Some((tag, g)) = t.recv_grad(self.timeout)? else {
                return Ok(None);
            };
            if tag.step != step || tag.micro != j {
                return Err(Failure::new(format!(
                    "stage {} got stage {}'s gradient of micro-batch {} of step {} while expecting micro-batch {j} of step {step}",
                    index + 1,
                    index + 2 + w,
                    tag.micro,
                    tag.step,
                )));
            }
            s.grad_sum = Some(add_next(s.grad_sum.take(), g));
            s.grads_got += 1;
        }
        s.grads_got = 0;
        Ok(Some(s.grad_sum.take()))
    }

    /// The injected fault of this stage at `step`, if any (tests); otherwise `input` as is.
    fn strike(&self, step: u64, input: Tensor) -> Result<Tensor, Failure> {
        #[cfg(feature = "fault-injection")]
        let here = |f: &Fault| f.worker == self.unit.stage() && f.step == step;
        #[cfg(feature = "fault-injection")]
        match self.fault.filter(here).map(|f| f.kind) {
            Some(FaultKind::Panic) => panic!("injected fault at step {step}"),
            Some(FaultKind::Error) => {
                return Err(Failure::new(format!("injected error at step {step}")))
            }
            Some(FaultKind::Nan) => return Ok(input * f64::NAN),
            Some(FaultKind::Hang) => std::thread::sleep(Duration::from_secs(3600)),
            Some(FaultKind::Kill) => {
                // SAFETY: kill only sends a signal, to this process.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL ends the process")
            }
            None => {}
        }
        let _ = step;
        Ok(input)
    }

    fn idle(&self, what: &str) -> Result<(), Failure> {
        if self.mid_step() {
            return Err(Failure::new(format!(
                "stage {} got {what} in the middle of step {}",
                self.unit.stage() + 1,
                self.step
            )));
        }
        Ok(())
    }
}

/// How long a stage that is between steps waits before looking again: it waits for the
/// coordinator, which has its own timeouts, so an idle stage never gives up.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs a stage until its upstream closes (threads) or its inbox is empty (one thread):
/// receive, handle, repeat. A stage in the middle of a step waits at most its timeout for the
/// rest of it, then fails naming the stage it waited for.
pub fn drive(runner: &mut StageRunner, t: &mut dyn Transport) -> Result<(), Failure> {
    // What the stage allocates from here on is its own, inputs copied to its device included.
    let _charged = runner
        .memory
        .as_ref()
        .map(AllocOwner::enter)
        .transpose()
        .map_err(|e| Failure::new(e.to_string()))?;
    if runner.mid_step() {
        // Stages in one thread: a step that stopped for a gradient goes on if the sender has
        // run since.
        runner.run(t, None)?;
    }
    loop {
        let wait = if runner.mid_step() {
            runner.timeout
        } else {
            IDLE_POLL
        };
        match t.recv(wait)? {
            Received::Message(m) => runner.handle(m, t)?,
            Received::Nothing => {
                let Some(s) = &runner.current else { continue };
                let index = runner.unit.stage();
                return Err(Failure::new(format!(
                    "stage {} waited {} s for micro-batch {} of step {} from {} and gave up",
                    index + 1,
                    wait.as_secs(),
                    s.next_micro,
                    runner.step,
                    if index == 0 {
                        "the coordinator".to_string()
                    } else {
                        format!("stage {index}")
                    }
                )));
            }
            Received::Closed => return Ok(()),
        }
    }
}
