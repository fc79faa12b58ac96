//! How messages move between pipeline stages: the one thing that differs between stages run
//! one after another in the caller's thread ([`LocalTransport`]) and stages run by threads
//! ([`ChannelTransport`]). The schedule itself ([`crate::schedule`]) is written once, against
//! the [`Transport`] trait.
//!
//! Every message carries a [`Tag`] (step, micro-batch); stages check that tags arrive in
//! order. Every wait of the threaded transport has a timeout and names who waited for whom.

use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use tch::{Device, Tensor};

use crate::streams;
use crate::{Failure, Result, RuntimeError};

/// The label of every message: which step (or inference batch), which micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tag {
    /// Training step (1-based), or the number of an inference batch or state request.
    pub step: u64,
    /// Micro-batch within the step (0-based); 0 for everything else.
    pub micro: usize,
}

impl Tag {
    /// Micro-batch `micro` of `step`.
    pub fn new(step: u64, micro: usize) -> Self {
        Self { step, micro }
    }
}

/// What flows down the chain of stages, from the coordinator into stage 1 and on from there.
/// Control messages (state, load) travel the same way, so each stage handles them after
/// everything sent before them.
pub enum Message {
    /// A training micro-batch: the input of the stage (images for stage 1, `sg(z)` after),
    /// the belief entering its first module, the labels, and the micro-batch's share of the
    /// batch (its loss weight).
    Train {
        /// Step and micro-batch.
        tag: Tag,
        /// Micro-batches in this step.
        micro_batches: usize,
        /// Stage input.
        input: Tensor,
        /// Belief entering the stage.
        p: Tensor,
        /// Labels [b].
        labels: Tensor,
        /// `b / B`.
        scale: f64,
    },
    /// Inference on a batch.
    Eval {
        /// Which batch.
        tag: Tag,
        /// Stage input.
        input: Tensor,
        /// Belief entering the stage.
        p: Tensor,
    },
    /// Report weights and optimiser state.
    State {
        /// Which request.
        tag: Tag,
    },
    /// Restore weights and optimiser state; each stage takes its own entries.
    Load {
        /// Which request.
        tag: Tag,
        /// The whole checkpoint (shallow copies).
        named: Vec<(String, Tensor)>,
    },
}

impl Message {
    /// The message's tag, and what it is (`Train`, `Eval`, `State` or `Load`).
    pub fn tag(&self) -> (Tag, &'static str) {
        match self {
            Self::Train { tag, .. } => (*tag, "Train"),
            Self::Eval { tag, .. } => (*tag, "Eval"),
            Self::State { tag } => (*tag, "State"),
            Self::Load { tag, .. } => (*tag, "Load"),
        }
    }

    /// The same message with its tensors on `device` (a no-op for tensors already there).
    pub fn to_device(mut self, device: Device) -> Self {
        let tensors = match &mut self {
            Self::Train {
                input, p, labels, ..
            } => vec![input, p, labels],
            Self::Eval { input, p, .. } => vec![input, p],
            Self::State { .. } | Self::Load { .. } => Vec::new(),
        };
        for t in tensors {
            *t = t.to_device(device);
        }
        self
    }
}

/// What a stage tells the coordinator; the transport adds the (0-based) stage it comes from.
pub enum Report {
    /// A step is done on this stage: its modules' losses (summed over micro-batches, in
    /// module order) and the time the stage spent computing it.
    Losses {
        /// The step.
        step: u64,
        /// Losses of the stage's modules.
        losses: Vec<f64>,
        /// Busy time for this step.
        busy: Duration,
        /// The part of it spent in forward passes (what the next stage waits for).
        forward: Duration,
    },
    /// Inference: the stage's modules' logits, on the stage's device.
    Logits {
        /// The batch.
        step: u64,
        /// One per module.
        logits: Vec<Tensor>,
    },
    /// Weights and optimiser state, as CPU tensors.
    State(Vec<(String, Tensor)>),
    /// A load is done.
    Loaded,
    /// The stage failed and has stopped.
    Failed(Failure),
}

/// A report and the stage it comes from (0-based; to the coordinator, replica r's stage s is
/// r·K + s).
pub type Filed = (usize, Report);

/// What a receive found.
pub enum Received {
    /// A message.
    Message(Message),
    /// Nothing within the wait.
    Nothing,
    /// Nothing more will come: the sender is gone, the pipeline is shutting down (a local
    /// queue: nothing is queued, the stage has done what it can for now).
    Closed,
}

/// Moves messages for one stage.
pub trait Transport {
    /// The next message for this stage, waiting at most `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Received>;
    /// Passes a message to the next stage; the last stage has none, and drops it.
    fn send_down(&mut self, msg: Message) -> Result<()>;
    /// Tells the coordinator.
    fn report(&mut self, report: Report) -> Result<()>;
    /// Sends a gradient of micro-batch `tag` back to the stage that waits for it: a backprop
    /// stage's input gradient to the previous stage, a paper module stage's `Σ ∂L/∂z` straight
    /// to stage 1, the extractor (which receives these with [`Transport::recv_grad`], from
    /// module stages 2, 3, … in turn). Staged SID never calls it.
    fn send_grad(&mut self, tag: Tag, grad: Tensor) -> Result<()>;
    /// Backprop pipelines: the next gradient of this stage's output from the next stage; the
    /// paper's SID, on stage 1: the next module stage's gradient at `z`, from stages 2, 3, …
    /// in turn (so one micro-batch's gradients arrive together, in stage order). Waits at most
    /// `timeout`; `None`: not sent yet, and waiting cannot help (stages in one thread: the
    /// stage steps back and resumes once the sender has run).
    fn recv_grad(&mut self, timeout: Duration) -> Result<Option<(Tag, Tensor)>>;
}

/// The queues of stages run one after another in one thread: each stage's inbox, the
/// coordinator's reports, and the gradients sent back (backprop, the paper's module stages),
/// which wait in the receiving stage's queue until that stage runs again.
pub struct LocalQueues {
    /// Each stage's inbox.
    pub inboxes: Vec<VecDeque<Message>>,
    /// The coordinator's reports.
    pub reports: VecDeque<Filed>,
    /// Every stage's gradients waiting to be taken, one queue per stage.
    pub grads: Vec<VecDeque<(Tag, Tensor)>>,
}

impl LocalQueues {
    /// Empty queues for `stages` stages.
    pub fn new(stages: usize) -> Self {
        Self {
            inboxes: (0..stages).map(|_| VecDeque::new()).collect(),
            reports: VecDeque::new(),
            grads: (0..stages).map(|_| VecDeque::new()).collect(),
        }
    }
}

/// One stage of stages run one after another in one thread, over their [`LocalQueues`]:
/// receiving never waits.
pub struct LocalTransport<'a> {
    /// 0-based stage.
    pub stage: usize,
    /// Every stage's queues.
    pub queues: &'a mut LocalQueues,
    /// The stage this one's backward sends its gradient to, if any.
    pub grad_to: Option<usize>,
    /// Messages and gradients taken so far (the engine runs the stages again while any are).
    pub taken: usize,
}

impl Transport for LocalTransport<'_> {
    fn recv(&mut self, _timeout: Duration) -> Result<Received> {
        let m = self.queues.inboxes[self.stage].pop_front();
        self.taken += usize::from(m.is_some());
        Ok(m.map_or(Received::Closed, Received::Message))
    }

    fn send_down(&mut self, msg: Message) -> Result<()> {
        if let Some(next) = self.queues.inboxes.get_mut(self.stage + 1) {
            next.push_back(msg);
        }
        Ok(())
    }

    fn report(&mut self, report: Report) -> Result<()> {
        self.queues.reports.push_back((self.stage, report));
        Ok(())
    }

    fn send_grad(&mut self, tag: Tag, grad: Tensor) -> Result<()> {
        let to = self.grad_to.ok_or_else(|| no_grad_target(self.stage))?;
        self.queues.grads[to].push_back((tag, grad));
        Ok(())
    }

    fn recv_grad(&mut self, _timeout: Duration) -> Result<Option<(Tag, Tensor)>> {
        let g = self.queues.grads[self.stage].pop_front();
        self.taken += usize::from(g.is_some());
        Ok(g)
    }
}

fn no_grad_target(stage: usize) -> RuntimeError {
    RuntimeError::Protocol(format!(
        "stage {} has no stage to send its gradient to",
        stage + 1
    ))
}

/// A stage run by its own thread: bounded crossbeam channels to the next stage and to the
/// coordinator, and gradient channels where the method sends gradients back (a backprop
/// stage's to the previous stage; the paper's module stages' to the extractor). Before a
/// message leaves, the stage's CUDA stream is synchronised (tensors cross threads only once
/// computed); a received message is moved to the stage's device and that copy waited for
/// before the original may be dropped (ARCHITECTURE.md rule 4). Whether the channels join two
/// threads or are carried between processes by `links.rs` is invisible here.
pub struct ChannelTransport {
    /// 0-based stage.
    pub stage: usize,
    /// The stage's device.
    pub device: Device,
    /// From the previous stage (or the coordinator).
    pub upstream: Receiver<Message>,
    /// To the next stage; `None` on the last.
    pub downstream: Option<Sender<Message>>,
    /// To the coordinator.
    pub reports: Sender<Filed>,
    /// Longest wait for the next stage to take a message.
    pub timeout: Duration,
    /// The gradients this stage's backward waits for, each from a later stage (0-based), in
    /// the order [`Transport::recv_grad`] takes them in turn.
    pub(crate) grads_in: Vec<(usize, Receiver<(Tag, Tensor)>)>,
    /// Where this stage's backward sends its gradient: the receiving stage (0-based).
    pub(crate) grad_out: Option<(usize, Sender<(Tag, Tensor)>)>,
    /// The entry of `grads_in` taken next.
    next_grad_from: usize,
}

impl ChannelTransport {
    /// Stage `stage` on `device` between `upstream` and `downstream`, reporting to `reports`;
    /// no gradient channels until set.
    pub fn new(
        stage: usize,
        device: Device,
        upstream: Receiver<Message>,
        downstream: Option<Sender<Message>>,
        reports: Sender<Filed>,
        timeout: Duration,
    ) -> Self {
        Self {
            stage,
            device,
            upstream,
            downstream,
            reports,
            timeout,
            grads_in: Vec::new(),
            grad_out: None,
            next_grad_from: 0,
        }
    }

    /// Sends `item` over `tx` once this stage's stream has computed it; a full channel past
    /// the timeout (waiting for what `taking` says) or a stopped receiver (`stopped`) is an
    /// error.
    fn send_on<T>(
        &self,
        tx: &Sender<T>,
        item: T,
        taking: impl FnOnce() -> String,
        stopped: impl FnOnce() -> String,
    ) -> Result<()> {
        streams::sync_device(self.device)?;
        tx.send_timeout(item, self.timeout).map_err(|e| match e {
            SendTimeoutError::Timeout(_) => RuntimeError::Timeout {
                waiter: format!("stage {} ({})", self.stage + 1, device_name(self.device)),
                waited_for: taking(),
                timeout: self.timeout,
            },
            SendTimeoutError::Disconnected(_) => RuntimeError::Protocol(stopped()),
        })
    }
}

impl Transport for ChannelTransport {
    fn recv(&mut self, timeout: Duration) -> Result<Received> {
        match self.upstream.recv_timeout(timeout) {
            Ok(m) => {
                let m = m.to_device(self.device);
                streams::sync_device(self.device)?;
                Ok(Received::Message(m))
            }
            Err(RecvTimeoutError::Timeout) => Ok(Received::Nothing),
            Err(RecvTimeoutError::Disconnected) => Ok(Received::Closed),
        }
    }

    fn send_down(&mut self, msg: Message) -> Result<()> {
        let Some(tx) = &self.downstream else {
            return Ok(());
        };
        let (me, next, (tag, kind)) = (self.stage + 1, self.stage + 2, msg.tag());
        let (micro, step) = (tag.micro, tag.step);
        self.send_on(
            tx,
            msg,
            || format!("stage {next} to take {kind} micro-batch {micro} of step {step}"),
            || format!("stage {next} has stopped, so stage {me} cannot pass on step {step}"),
        )
    }

    fn report(&mut self, report: Report) -> Result<()> {
        streams::sync_device(self.device)?;
        self.reports
            .send((self.stage, report))
            .map_err(|_| RuntimeError::Protocol("the coordinator is gone".into()))
    }

    fn send_grad(&mut self, tag: Tag, grad: Tensor) -> Result<()> {
        let Some((to, tx)) = &self.grad_out else {
            return Err(no_grad_target(self.stage));
        };
        let to = match to {
            0 => "stage 1 (the extractor)".to_string(),
            s => format!("stage {}", s + 1),
        };
        let (me, micro, step) = (self.stage + 1, tag.micro, tag.step);
        self.send_on(
            tx,
            (tag, grad),
            || format!("{to} to take the gradient of micro-batch {micro} of step {step}"),
            || format!("{to} has stopped, so stage {me} cannot send its gradient of step {step}"),
        )
    }

    fn recv_grad(&mut self, timeout: Duration) -> Result<Option<(Tag, Tensor)>> {
        // Several senders (the paper's module stages): one gradient from each in turn.
        let Some((from, rx)) = self.grads_in.get(self.next_grad_from) else {
            return Err(RuntimeError::Protocol(format!(
                "stage {} receives no gradients",
                self.stage + 1
            )));
        };
        let from = from + 1;
        self.next_grad_from = (self.next_grad_from + 1) % self.grads_in.len();
        match rx.recv_timeout(timeout) {
            Ok((tag, g)) => {
                let g = g.to_device(self.device);
                streams::sync_device(self.device)?;
                Ok(Some((tag, g)))
            }
            Err(RecvTimeoutError::Timeout) => Err(RuntimeError::Timeout {
                waiter: format!("stage {} ({})", self.stage + 1, device_name(self.device)),
                waited_for: format!("a gradient from stage {from}"),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(RuntimeError::Protocol(format!(
                "stage {from} stopped before sending its gradient"
            ))),
        }
    }
}

/// A short human name for messages: `cpu` or `cuda:1`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}
