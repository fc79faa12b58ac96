//! The stage schedule, written once: what a stage does with each message, whatever moves the
//! messages ([`crate::transport`]).
//!
//! A training micro-batch: forward through the stage, **send `(sg(z), p)` downstream at once**,
//! then the local losses' backward into the stage's own parameters, gradients accumulated; the
//! step's last micro-batch also steps the optimisers and reports the losses. A stage needs
//! nothing back from later stages, so stage s works on step t+1 while stage s+1 is still on
//! step t: no flush between steps, and the result equals running the stages one after another
//! (each stage's input for a step was computed by the same parameters in both orders).

use std::time::{Duration, Instant};

use sid_core::{NamedTensors, Stage};
use tch::{Kind as TKind, Tensor};

use crate::fault::{Fault, FaultKind};
use crate::transport::{Message, Received, Report, Transport};

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
    stage: Stage,
    /// The step in progress and the next micro-batch expected.
    step: u64,
    next_micro: usize,
    /// This step's losses so far [n], on the device.
    losses: Option<Tensor>,
    busy: Duration,
    fault: Option<Fault>,
}

impl StageRunner {
    /// Wraps a stage; `fault` strikes when it names this stage (tests).
    pub fn new(stage: Stage, fault: Option<Fault>) -> Self {
        let fault = fault.filter(|f| f.worker == stage.index());
        Self {
            stage,
            step: 0,
            next_micro: 0,
            losses: None,
            busy: Duration::ZERO,
            fault,
        }
    }

    /// The stage.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// The stage, to move it to its device.
    pub fn stage_mut(&mut self) -> &mut Stage {
        &mut self.stage
    }

    /// Whether a step is half done (some of its micro-batches still to come).
    pub fn mid_step(&self) -> bool {
        self.next_micro != 0
    }

    fn strike(&self, step: u64, input: Tensor) -> Result<Tensor, Failure> {
        match self.fault.filter(|f| f.step == step).map(|f| f.kind) {
            Some(FaultKind::Panic) => panic!("injected fault at step {step}"),
            Some(FaultKind::Error) => Err(Failure::new(format!("injected error at step {step}"))),
            Some(FaultKind::Nan) => Ok(input * f64::NAN),
            Some(FaultKind::Hang) => {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(input)
            }
            None => Ok(input),
        }
    }

    /// Handles one message: the whole schedule of a stage.
    pub fn handle(&mut self, msg: Message, t: &mut dyn Transport) -> Result<(), Failure> {
        let index = self.stage.index();
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
                }
                let input = self.strike(tag.step, input)?;
                let target = self.stage.label_target(&labels);
                let out = self.stage.forward_micro(&input, &p, &target);
                if let Some(z) = out.z {
                    // Downstream can start on this micro-batch while this stage runs backward.
                    t.send_down(Message::Train {
                        tag,
                        micro_batches,
                        input: z,
                        p: out.p,
                        labels,
                        scale,
                    })?;
                }
                let l = self.stage.backward_micro(scale)?;
                self.losses = Some(match self.losses.take() {
                    None => l,
                    Some(acc) => acc + l,
                });
                self.next_micro = tag.micro + 1;
                if self.next_micro == micro_batches {
                    self.next_micro = 0;
                    self.stage.apply();
                    let losses = self.losses.take().expect("at least one micro-batch");
                    let first = self.stage.spec().modules.start;
                    let losses = sid_core::unit::read_losses(&losses.to_kind(TKind::Float), first)?;
                    self.busy += started.elapsed();
                    t.report(Report::Losses {
                        stage: index,
                        step: tag.step,
                        losses,
                        busy: self.busy,
                    })?;
                } else {
                    self.busy += started.elapsed();
                }
                Ok(())
            }
            Message::Eval { tag, input, p } => {
                let (z, logits, p_out) = self.stage.cascade(&input, &p);
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
                t.report(Report::State {
                    stage: index,
                    state: self.stage.state(),
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
                self.stage.load_state(&mine)?;
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
                self.stage.index() + 1,
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
/// receive, handle, repeat. A stage in the middle of a step waits at most `timeout` for the
/// rest of it, then fails naming the stage it waited for.
pub fn drive(
    runner: &mut StageRunner,
    t: &mut dyn Transport,
    timeout: Duration,
    local: bool,
) -> Result<(), Failure> {
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
                let index = runner.stage().index();
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
