//! Training steps replayed from a CUDA graph (`--cuda-graph`).
//!
//! The first steps run as usual (libtorch initialises lazily: cuBLAS handles, the fused Adam's
//! step counters, the gradients); then one step is captured with its inputs in fixed tensors,
//! and every later full-size batch is copied into them and the graph replayed. A batch of
//! another size (the last, partial one of an epoch) runs as usual. If the capture fails, the
//! run says why once and goes on without a graph.

use sid_core::graph::CudaGraph;
use sid_core::{Network, StepStats};
use tch::{Device, Tensor};

use crate::Result;

/// Steps run normally before the capture.
const WARMUP_STEPS: usize = 3;

enum State {
    /// Warm-up steps left, run on the graph's side stream.
    Warming(usize, CudaGraph),
    /// Fields drop in order: the tensors from the graph's memory pool before the graph.
    Captured {
        x: Tensor,
        y: Tensor,
        losses: Tensor,
        graph: CudaGraph,
    },
    Off,
}

/// Runs training steps, through a CUDA graph once one is captured.
pub(crate) struct GraphStepper {
    state: State,
}

impl GraphStepper {
    /// A stepper for `device`; `enabled` false runs every step as usual. If no graph can be
    /// made on `device`, the error says why.
    pub(crate) fn new(device: Device, enabled: bool) -> Result<Self> {
        let state = if enabled {
            State::Warming(WARMUP_STEPS, CudaGraph::new(device)?)
        } else {
            State::Off
        };
        Ok(Self { state })
    }

    /// Whether every step runs as usual (no graph).
    pub(crate) fn is_off(&self) -> bool {
        matches!(self.state, State::Off)
    }

    /// One training step on `x`, `y` (on the network's input device). `notice` receives a
    /// message when the graph cannot be used.
    pub(crate) fn step(
        &mut self,
        net: &mut dyn Network,
        x: &Tensor,
        y: &Tensor,
        notice: &mut dyn FnMut(String),
    ) -> Result<StepStats> {
        match &mut self.state {
            State::Off => Ok(net.train_step(x, y)?),
            State::Warming(n, graph) if *n > 0 => {
                *n -= 1;
                Ok(graph.on_side_stream(|| net.train_step(x, y))?)
            }
            State::Warming(_, graph) => {
                // Fixed inputs, allocated outside the graph, that every replay reads.
                let (sx, sy) = (x.copy(), y.copy());
                match graph.capture(|| net.train_step_queued(&sx, &sy)) {
                    Ok(losses) => {
                        // A capture runs nothing: replaying it is this step.
                        graph.replay()?;
                        let stats = net.read_step(&losses)?;
                        let State::Warming(_, graph) =
                            std::mem::replace(&mut self.state, State::Off)
                        else {
                            unreachable!("matched above")
                        };
                        self.state = State::Captured {
                            graph,
                            x: sx,
                            y: sy,
                            losses,
                        };
                        notice("CUDA graph captured: later steps replay it".into());
                        Ok(stats)
                    }
                    Err(e) => {
                        // Nothing ran during the failed capture: train on this batch as usual.
                        self.state = State::Off;
                        notice(format!("{e}; training without a CUDA graph"));
                        Ok(net.train_step(x, y)?)
                    }
                }
            }
            State::Captured {
                graph,
                x: sx,
                y: sy,
                losses,
            } => {
                if sx.size() != x.size() {
                    return Ok(net.train_step(x, y)?);
                }
                sx.copy_(x);
                sy.copy_(y);
                graph.replay()?;
                Ok(net.read_step(losses)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sid_core::{ExtractorKind, LossConfig, ModelConfig, SidNetwork};
    use tch::Kind;

    /// Trains a small SID network on cuda:0 for `steps` steps, through the stepper or not, and
    /// returns every step's loss and the final parameters.
    fn train(graph: bool, steps: usize) -> (Vec<f64>, Vec<(String, Tensor)>) {
        let gpu = Device::Cuda(0);
        let model = ModelConfig {
            extractor: ExtractorKind::Mlp,
            image_size: 12,
            num_classes: 5,
            feature_dim: 16,
            modules: 3,
            module_hidden: 32,
            ..ModelConfig::default()
        };
        tch::manual_seed(0);
        let mut net = SidNetwork::new(&model, LossConfig::default(), 1e-3, gpu).unwrap();
        let mut stepper = GraphStepper::new(gpu, graph).unwrap();
        let mut notices = Vec::new();
        let mut losses = Vec::new();
        for step in 0..steps {
            tch::manual_seed(1000 + step as i64);
            let x = Tensor::randn([24, 1, 12, 12], (Kind::Float, gpu));
            let y = Tensor::randint(5, [24], (Kind::Int64, gpu));
            let stats = stepper
                .step(&mut net, &x, &y, &mut |m| notices.push(m))
                .unwrap();
            losses.push(stats.loss);
        }
        if graph {
            assert_eq!(
                notices,
                vec!["CUDA graph captured: later steps replay it".to_string()]
            );
        }
        (losses, net.state().unwrap())
    }

    /// On a GPU: steps replayed from a CUDA graph give bit-identical losses and parameters to
    /// eager steps. Ignored by default; `--include-ignored` without CUDA or CUDA graphs fails.
    #[test]
    #[ignore = "needs CUDA and CUDA graphs (run on a GPU machine with --include-ignored)"]
    fn graph_replay_equals_eager_steps_bit_for_bit() {
        assert!(tch::Cuda::is_available(), "needs CUDA: not available here");
        assert!(CudaGraph::available(), "needs a build with CUDA graphs");
        let (eager, eager_state) = train(false, 12);
        let before = sid_core::graph::counts();
        let (graph, graph_state) = train(true, 12);
        // The graph was in effect: captured once, then every step after the warm-up (the
        // captured one included) replayed. SID_NO_CUDA_GRAPH=1 makes this fail.
        let after = sid_core::graph::counts();
        assert_eq!(after.captured - before.captured, 1, "captures");
        assert_eq!(after.replays - before.replays, 12 - WARMUP_STEPS, "replays");
        assert_eq!(eager, graph, "per-step losses");
        for ((n, a), (_, b)) in eager_state.iter().zip(&graph_state) {
            assert!(a.equal(b), "{n} differs");
        }
    }
}
