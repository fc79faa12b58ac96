//! A staged-SID stage's training step replayed from a CUDA graph (`--cuda-graph` on a staged
//! run with GPU stages, one micro-batch per step).
//!
//! Why: a small stage on a GPU is bound by its thread's kernel launches, not by the GPU, and
//! several stages on one GPU only overlap on the device if each thread launches its step
//! faster than the GPU runs it. A graph launches the whole step at once.
//!
//! How, as the single-GPU trainer's graph (`sid_train`'s `graph_step.rs`): the first steps run
//! eagerly on the graph's side stream (libtorch sets up lazily); then one step
//! ([`Stage::train_step_queued`]: forward, backward, optimiser step, no host reads) is captured
//! with its inputs in fixed tensors, and every later step of the same batch size is copied
//! into them and replayed. The graph is made with [`CudaGraph::new_thread_local`]: the other
//! stages keep launching work on the same device while this one captures. A step of another
//! size (an epoch's last, partial batch) runs eagerly; a capture that fails is said once and the
//! stage goes on eagerly. Loading a checkpoint copies into the stage's tensors in place (see
//! `Adam::load_state`), so the captured step stays valid. The step is the same arithmetic either way; only the send moves: the
//! next stage gets this stage's output after its whole step instead of after its forward,
//! which staged SID's pipeline (no gradient crosses a stage, no flush between steps) does not
//! need for its steady-state rate.
//!
//! Runs only on a GPU; nothing here is reached on a CPU stage.

use sid_core::graph::CudaGraph;
use sid_core::stage::StageOutput;
use sid_core::Stage;
use tch::{Device, Tensor};

/// Eager steps before the capture.
const WARMUP_STEPS: usize = 3;

enum State {
    /// Warm-up steps left, run on the graph's side stream.
    Warming(usize, CudaGraph),
    /// The captured step. Fields drop in order: tensors from the graph's pool before it.
    Captured {
        input: Tensor,
        p: Tensor,
        labels: Tensor,
        z: Option<Tensor>,
        p_out: Tensor,
        losses: Tensor,
        graph: CudaGraph,
    },
    Off,
}

/// A stage's CUDA graph, from asked for to made.
pub(crate) enum GraphSlot {
    /// Not asked for, or it could not be made.
    Off,
    /// Asked for: made at the first step whose input is on a GPU.
    Wanted,
    /// Made.
    Made(StageGraph),
}

impl GraphSlot {
    /// The graph for a step of stage `index` (0-based) on `input`, made at the first step on a
    /// GPU; `None` when there is none (a failure to make it is logged once, and the stage stays
    /// eager).
    pub(crate) fn for_input(&mut self, input: &Tensor, index: usize) -> Option<&mut StageGraph> {
        let device = input.device();
        if let (Self::Wanted, Device::Cuda(_)) = (&*self, device) {
            *self = match StageGraph::new(device, index + 1) {
                Ok(g) => Self::Made(g),
                Err(e) => {
                    tracing::warn!("stage {}: {e}; training without a CUDA graph", index + 1);
                    Self::Off
                }
            };
        }
        match self {
            Self::Made(g) => Some(g),
            _ => None,
        }
    }
}

/// A stage's training steps, through a CUDA graph once one is captured.
pub(crate) struct StageGraph {
    /// 1-based stage, for the log.
    stage: usize,
    state: State,
}

impl StageGraph {
    /// A graph for stage `stage` (1-based) on `device` (a GPU), or why there cannot be one.
    pub(crate) fn new(device: Device, stage: usize) -> sid_core::Result<Self> {
        Ok(Self {
            stage,
            state: State::Warming(WARMUP_STEPS, CudaGraph::new_thread_local(device)?),
        })
    }

    /// One whole training step of `stage` on a batch: its output for the next stage (copies,
    /// which the next replay does not overwrite) and its losses [n], on the device.
    pub(crate) fn step(
        &mut self,
        stage: &mut Stage,
        input: &Tensor,
        p: &Tensor,
        labels: &Tensor,
    ) -> sid_core::Result<(StageOutput, Tensor)> {
        let eager = |stage: &mut Stage| {
            let target = stage.label_target(labels);
            stage.train_step_queued(input, p, &target)
        };
        match &mut self.state {
            State::Off => eager(stage),
            State::Warming(n, graph) if *n > 0 => {
                *n -= 1;
                graph.on_side_stream(|| eager(stage))
            }
            State::Warming(..) => {
                let State::Warming(_, mut graph) = std::mem::replace(&mut self.state, State::Off)
                else {
                    unreachable!("matched above")
                };
                // Fixed inputs, allocated outside the graph, that every replay reads.
                let (si, sp, sl) = (input.copy(), p.copy(), labels.copy());
                let captured = graph.capture(|| {
                    let target = stage.label_target(&sl);
                    stage.train_step_queued(&si, &sp, &target)
                });
                match captured {
                    Ok((out, losses)) => {
                        // A capture runs nothing: replaying it is this step.
                        graph.replay()?;
                        let result = copies(&out.z, &out.p, &losses);
                        self.state = State::Captured {
                            input: si,
                            p: sp,
                            labels: sl,
                            z: out.z,
                            p_out: out.p,
                            losses,
                            graph,
                        };
                        tracing::info!(
                            stage = self.stage,
                            "CUDA graph captured: later steps replay it"
                        );
                        Ok(result)
                    }
                    Err(e) => {
                        // Nothing ran during the failed capture: this batch trains eagerly.
                        tracing::warn!("stage {}: {e}; training without a CUDA graph", self.stage);
                        eager(stage)
                    }
                }
            }
            State::Captured {
                input: si,
                p: sp,
                labels: sl,
                z,
                p_out,
                losses,
                graph,
            } => {
                if si.size() != input.size() {
                    return eager(stage);
                }
                si.copy_(input);
                sp.copy_(p);
                sl.copy_(labels);
                graph.replay()?;
                Ok(copies(z, p_out, losses))
            }
        }
    }
}

/// Copies of a replay's outputs, which the next replay does not overwrite.
fn copies(z: &Option<Tensor>, p: &Tensor, losses: &Tensor) -> (StageOutput, Tensor) {
    let out = StageOutput {
        z: z.as_ref().map(Tensor::copy),
        p: p.copy(),
    };
    (out, losses.copy())
}
