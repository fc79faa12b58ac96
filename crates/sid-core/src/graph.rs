//! CUDA graphs of a training step: capture its kernels once, then replay them with one launch.
//!
//! A small step on a GPU is bound by the host, not the GPU: every tensor op costs several
//! microseconds of dispatch and launch, and SID runs more, smaller ops than backprop (a loss and
//! an optimizer per module). A graph replays all of a step's kernels at GPU speed. What it needs
//! from the step (all true of [`crate::Network::train_step_queued`]): no host reads of device
//! values, tensors allocated during capture reused in place (the graph's private memory pool
//! does that), inputs copied into the same tensors every step, and the optimizer's step count
//! on the device. libtorch's `at::cuda::CUDAGraph` through a C++ shim (`src/cuda_graph.cpp`);
//! builds without CUDA headers have [`CudaGraph::available`] false.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{Device, Tensor};

use crate::{CoreError, Result};

/// Set (to anything but empty or `0`), every capture fails at once, saying so: runs go on
/// eagerly, and the checks that a graph was captured fail. This is how those checks (the GPU
/// scripts', the GPU tests') are shown to fail when the feature is forced off.
pub const DISABLE_VAR: &str = "SID_NO_CUDA_GRAPH";

// Process-wide, so a run's binary reads them without plumbing from every stage's thread.
static CAPTURED: AtomicUsize = AtomicUsize::new(0);
static REPLAYS: AtomicUsize = AtomicUsize::new(0);

/// CUDA graphs captured and replays run in this process so far, by every thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Successful captures.
    pub captured: usize,
    /// Successful replays (a captured step runs as a replay too).
    pub replays: usize,
}

/// The process's [`GraphCounts`]: whether a graph was in effect, not silently replaced by
/// eager steps after a failed capture.
pub fn counts() -> GraphCounts {
    GraphCounts {
        captured: CAPTURED.load(Ordering::Relaxed),
        replays: REPLAYS.load(Ordering::Relaxed),
    }
}

/// The shape of the shim's begin/end functions.
type ShimFn = unsafe extern "C" fn(*mut c_void, *mut c_char, usize) -> c_int;

sid_build::shim! {
    sid_cuda_graph;
    fn sid_graph_new(
        device: c_int,
        local: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        n: usize,
    ) -> c_int;
    fn sid_graph_free(g: *mut c_void);
    fn sid_graph_enter_side(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    fn sid_graph_leave_side(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    fn sid_graph_begin(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    fn sid_graph_end(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
    fn sid_graph_replay(g: *mut c_void, err: *mut c_char, n: usize) -> c_int;
}

/// A CUDA graph on one device with its own side stream: made empty (`CudaGraph::new`),
/// captured once ([`CudaGraph::capture`]), then replayed ([`CudaGraph::replay`]).
#[derive(Debug)]
pub struct CudaGraph {
    ptr: *mut c_void,
}

// SAFETY: the graph is only used through &mut self / &self by one thread at a time; libtorch's
// CUDAGraph may be replayed from any thread.
unsafe impl Send for CudaGraph {}

fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    sid_build::call_shim::<1024>(f).map_err(CoreError::Graph)
}

impl CudaGraph {
    /// Whether this build has CUDA graphs (it needs CUDA's headers at build time).
    pub fn available() -> bool {
        cfg!(sid_cuda_graph)
    }

    /// A graph-to-be on CUDA device `index`, with its own side stream; nothing is captured
    /// yet. With `local`, for one thread among several that launch work on the same device
    /// (the stages of a pipeline): it captures in CUDA's thread-local mode, so the other
    /// threads' work neither fails nor breaks the capture, and its warm-up and capture wait for
    /// this thread's stream only, never for the whole device.
    fn new(index: usize, local: bool) -> Result<Self> {
        if !cfg!(sid_cuda_graph) {
            return Err(CoreError::Graph(
                "this build has no CUDA graphs (CUDA headers were not found when it was compiled)"
                    .into(),
            ));
        }
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the shim writes a new graph into `ptr` or an error message.
        call(|e, n| unsafe { sid_graph_new(index as i32, i32::from(local), &mut ptr, e, n) })?;
        Ok(Self { ptr })
    }

    /// Runs `work` with the graph's side stream current (after the device's queued work, and
    /// waited for at the end): warm-up steps run there before [`CudaGraph::capture`], so lazy
    /// per-stream set-up happens outside the capture.
    pub fn on_side_stream<R>(&mut self, work: impl FnOnce() -> Result<R>) -> Result<R> {
        self.bracket(false, work)
    }

    /// Captures what `step` queues on the device into this graph. Nothing runs during a
    /// capture: [`CudaGraph::replay`] runs the step. The step must not read device values on
    /// the host or synchronise. If the capture fails, the error says why and the caller can go
    /// on without the graph.
    pub fn capture<R>(&mut self, step: impl FnOnce() -> Result<R>) -> Result<R> {
        if std::env::var(DISABLE_VAR).is_ok_and(|v| !v.is_empty() && v != "0") {
            return Err(CoreError::Graph(format!(
                "CUDA graph capture disabled by {DISABLE_VAR}"
            )));
        }
        let out = self.bracket(true, step)?;
        CAPTURED.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Runs `work` on the side stream, between the shim's opening and closing call: with
    /// `capture`, capturing it; the closing call runs whatever `work` did (error or panic), so
    /// the device's current stream is always restored.
    fn bracket<R>(&mut self, capture: bool, work: impl FnOnce() -> Result<R>) -> Result<R> {
        let (open, close): (ShimFn, ShimFn) = match capture {
            true => (sid_graph_begin, sid_graph_end),
            false => (sid_graph_enter_side, sid_graph_leave_side),
        };
        // SAFETY: `self.ptr` is live until `self` drops; the shim writes only into `e`.
        call(|e, n| unsafe { open(self.ptr, e, n) })?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let closed = call(|e, n| unsafe { close(self.ptr, e, n) });
        let out = match out {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        closed?;
        Ok(out)
    }

    /// Runs the captured kernels again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a live graph (only a build with the shim makes one).
        call(|e, n| unsafe { sid_graph_replay(self.ptr, e, n) })?;
        REPLAYS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the pointer came from sid_graph_new and is freed once.
        unsafe { sid_graph_free(self.ptr) };
    }
}

/// Eager steps before a capture (libtorch initialises lazily: cuBLAS handles, the fused Adam's
/// step counters, the gradients).
const WARMUP_STEPS: usize = 3;

/// A training step replayed from a CUDA graph, from asked for to made — the one way every
/// graph here is used: the single GPU's whole step ([`GraphedStep::network`]) and each
/// staged-SID stage's own ([`GraphedStep::stage`]). The first steps run eagerly on the graph's
/// side stream; then one is captured with its inputs copied into fixed tensors, and every later
/// step whose inputs have the same sizes is copied into them and replayed. A step of other
/// sizes (an epoch's last, partial batch) runs eagerly; a capture that fails is said once, and
/// the steps go on eagerly. Loading a checkpoint copies into the parameters in place (see
/// [`crate::Adam::load_state`]), so a captured step stays valid.
pub struct GraphedStep<O>(GraphState<O>);

enum GraphState<O> {
    /// Made at the first step on a GPU (a graph of this thread only: other stages keep
    /// launching work on the same device), rather than at once.
    Deferred,
    Warming(usize, CudaGraph),
    /// Fields drop in order: the tensors from the graph's memory pool before the graph.
    Captured {
        inputs: Vec<Tensor>,
        outputs: O,
        graph: CudaGraph,
    },
    Off,
}

/// What a graphed step tells its owner once: the capture happened, or why not.
pub enum GraphNews {
    /// Later steps replay the graph.
    Captured,
    /// Every step runs eagerly from now on.
    Failed(String),
}

impl std::fmt::Display for GraphNews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Captured => write!(f, "CUDA graph captured: later steps replay it"),
            Self::Failed(why) => write!(f, "{why}; training without a CUDA graph"),
        }
    }
}

impl<O> GraphedStep<O> {
    /// Every step eager.
    pub fn off() -> Self {
        Self(GraphState::Off)
    }

    /// Steps on `device` through a graph; if none can be made there, the error says why.
    pub fn new(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            let msg = format!("CUDA graphs need a CUDA device, not {device:?}");
            return Err(CoreError::Graph(msg));
        };
        let graph = CudaGraph::new(index, false)?;
        Ok(Self(GraphState::Warming(WARMUP_STEPS, graph)))
    }

    /// A graph of this thread only, made at the first step whose inputs are on a GPU (a
    /// pipeline stage's, whose thread moves it to its device first).
    pub fn on_first_gpu_step() -> Self {
        Self(GraphState::Deferred)
    }

    /// Whether every step runs eagerly.
    pub fn is_off(&self) -> bool {
        matches!(self.0, GraphState::Off)
    }

    /// One step on `inputs`: `run` computes it on the tensors it is given (fixed copies while
    /// capturing) without reading anything back. Returns its outputs — after a replay, the
    /// graph's own, which the next replay overwrites. `news` hears of the capture or its
    /// failure.
    pub fn step(
        &mut self,
        inputs: &[&Tensor],
        mut run: impl FnMut(&[Tensor]) -> Result<O>,
        news: impl FnOnce(GraphNews),
    ) -> Result<Stepped<'_, O>> {
        let owned = || inputs.iter().map(|t| t.shallow_clone()).collect::<Vec<_>>();
        if let (GraphState::Deferred, Some(Device::Cuda(index))) =
            (&self.0, inputs.first().map(|t| t.device()))
        {
            match CudaGraph::new(index, true) {
                Ok(g) => self.0 = GraphState::Warming(WARMUP_STEPS, g),
                Err(e) => {
                    self.0 = GraphState::Off;
                    news(GraphNews::Failed(e.to_string()));
                    return Ok(Stepped::Ran(run(&owned())?));
                }
            }
        }
        if matches!(self.0, GraphState::Warming(0, _)) {
            return self.capture(inputs, run, news);
        }
        match &mut self.0 {
            GraphState::Warming(n, graph) => {
                *n -= 1;
                Ok(Stepped::Ran(graph.on_side_stream(|| run(&owned()))?))
            }
            GraphState::Captured {
                inputs: fixed,
                outputs,
                graph,
            } if fixed.iter().zip(inputs).all(|(f, t)| f.size() == t.size()) => {
                for (f, t) in fixed.iter_mut().zip(inputs) {
                    f.copy_(t);
                }
                graph.replay()?;
                Ok(Stepped::Replayed(outputs))
            }
            GraphState::Deferred | GraphState::Off | GraphState::Captured { .. } => {
                Ok(Stepped::Ran(run(&owned())?))
            }
        }
    }

    /// The step that captures the graph (or, if the capture fails, runs eagerly).
    fn capture(
        &mut self,
        inputs: &[&Tensor],
        mut run: impl FnMut(&[Tensor]) -> Result<O>,
        news: impl FnOnce(GraphNews),
    ) -> Result<Stepped<'_, O>> {
        let GraphState::Warming(_, mut graph) = std::mem::replace(&mut self.0, GraphState::Off)
        else {
            unreachable!("called while warming")
        };
        // Fixed inputs, allocated outside the graph, that every replay reads.
        let fixed: Vec<Tensor> = inputs.iter().map(|t| t.copy()).collect();
        match graph.capture(|| run(&fixed)) {
            Ok(outputs) => {
                // A capture runs nothing: replaying it is this step.
                graph.replay()?;
                news(GraphNews::Captured);
                self.0 = GraphState::Captured {
                    inputs: fixed,
                    outputs,
                    graph,
                };
                let GraphState::Captured { outputs, .. } = &self.0 else {
                    unreachable!("just set")
                };
                Ok(Stepped::Replayed(outputs))
            }
            Err(e) => {
                // Nothing ran during the failed capture: this step runs eagerly.
                news(GraphNews::Failed(e.to_string()));
                let owned: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
                Ok(Stepped::Ran(run(&owned)?))
            }
        }
    }
}

/// A graphed step's outputs.
pub enum Stepped<'a, O> {
    /// Computed eagerly.
    Ran(O),
    /// The graph's, which the next replay overwrites.
    Replayed(&'a O),
}

impl GraphedStep<Tensor> {
    /// The single GPU's whole step ([`crate::Network::train_step_queued`]), its losses read
    /// after it.
    pub fn network(
        &mut self,
        net: &mut dyn crate::Network,
        x: &Tensor,
        y: &Tensor,
        news: impl FnOnce(GraphNews),
    ) -> Result<crate::StepStats> {
        let losses = self.step(&[x, y], |i| net.train_step_queued(&i[0], &i[1]), news)?;
        match losses {
            Stepped::Ran(l) => net.read_step(&l),
            Stepped::Replayed(l) => net.read_step(l),
        }
    }
}

impl GraphedStep<(crate::stage::StageOutput, Tensor)> {
    /// A staged-SID stage's whole step ([`crate::Stage::train_step_queued`]) on one
    /// micro-batch: its output for the next stage and its losses, copies a later replay does
    /// not overwrite. The next stage gets them after the whole step instead of after the
    /// forward, which staged SID's pipeline (no gradient crosses a stage, no flush between
    /// steps) does not need for its steady-state rate.
    pub fn stage(
        &mut self,
        stage: &mut crate::Stage,
        input: &Tensor,
        p: &Tensor,
        labels: &Tensor,
    ) -> Result<(crate::stage::StageOutput, Tensor)> {
        let index = stage.index() + 1;
        let run = |i: &[Tensor]| {
            let target = stage.label_target(&i[2]);
            stage.train_step_queued(&i[0], &i[1], &target)
        };
        let news = |n: GraphNews| match n {
            GraphNews::Captured => tracing::info!(stage = index, "{n}"),
            GraphNews::Failed(_) => tracing::warn!("stage {index}: {n}"),
        };
        Ok(match self.step(&[input, p, labels], run, news)? {
            Stepped::Ran(out) => out,
            Stepped::Replayed((out, losses)) => {
                let (z, p) = (out.z.as_ref().map(Tensor::copy), out.p.copy());
                (crate::stage::StageOutput { z, p }, losses.copy())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_on_the_cpu_is_refused_with_a_reason() {
        let err = GraphedStep::<Tensor>::new(Device::Cpu)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("CUDA"), "{err}");
    }
}
