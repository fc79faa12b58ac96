//! A process's place among the ranks of a multi-process pipeline ([`Ranks`]): its process
//! groups (torch.distributed's c10d, through [`sid_dist`]), the layout of stages and replicas
//! over ranks, the tags of the links between them ([`crate::links`]), and the replicas'
//! gradient sum.
//!
//! Replica r's stage s is rank r·K + s, so a replica's stages are consecutive ranks (on one
//! node when they fit). Data-parallel replicas sum each stage's gradients with an all-reduce
//! in the stage's replica group (NCCL for CUDA stages when built in, else Gloo) before the
//! stage's optimiser step.

use std::collections::BTreeMap;
use std::sync::Arc;

use sid_dist::{Backend, Group};
use tch::{Device, Tensor};

use crate::{Result, RuntimeError};

/// Tag of messages down the chain.
pub const DOWN: u32 = 1;
/// Tag of reports to the coordinator.
pub const REPORTS: u32 = 2;
/// Tag of gradients up the chain.
pub const GRADS: u32 = 3;

/// Whether rank 0 is still there: `Err` says why not. A served rank asks every second, so
/// that it stops when rank 0 dies even while its own links are idle or its stage is stuck.
pub type Liveness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// This process's place among the ranks of a multi-process pipeline.
#[derive(Clone)]
pub struct Ranks {
    /// Every rank.
    pub world: Arc<Group>,
    /// Data-parallel replicas of the pipeline (world = replicas × stages).
    pub replicas: usize,
    /// The ranks that hold this rank's stage (one per replica); `None` with one replica.
    pub replica_group: Option<Arc<Group>>,
    /// How each rank names itself in messages, e.g. `rank 1, cuda:0 on node-b`.
    pub names: Vec<String>,
    /// Served ranks: how to tell that rank 0 is still there (`None`: links only).
    pub liveness: Option<Liveness>,
    /// Links whose tensors go GPU to GPU: (from rank, to rank, tag) → a two-rank NCCL group
    /// in which the sender is rank 0. Other links carry their tensors in host memory over
    /// `world`.
    pub direct: BTreeMap<(usize, usize, u32), Arc<Group>>,
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranks")
            .field("rank", &self.world.rank())
            .field("world", &self.world.world())
            .field("replicas", &self.replicas)
            .finish()
    }
}

impl Ranks {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    pub(crate) fn check(&self, stages: usize) -> Result<()> {
        let world = self.world.world();
        if self.replicas == 0 || stages * self.replicas != world {
            return Err(RuntimeError::Config(format!(
                "{stages} stages × {} replicas need {} ranks, but the world has {world}",
                self.replicas,
                stages * self.replicas
            )));
        }
        Ok(())
    }
}

/// Replica r's stage s: its rank.
pub fn rank_of(replica: usize, stage: usize, stages: usize) -> usize {
    replica * stages + stage
}

/// Sums `grads` in place over the replicas in `group` (the ranks that hold the same stage):
/// one flat all-reduce per optimiser step.
pub(crate) fn replica_sum(group: &Group, grads: &[Tensor]) -> Result<()> {
    let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
    let Some(first) = defined.first() else {
        return Ok(());
    };
    let device = first.device();
    let flat = Tensor::cat(
        &defined.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(),
        0,
    );
    let mut buf = match group.backend() {
        Backend::Gloo => flat.to_device(Device::Cpu),
        Backend::Nccl => flat,
    };
    group.all_reduce_sum(&mut buf)?;
    let sizes: Vec<i64> = defined.iter().map(|g| g.numel() as i64).collect();
    let sums = buf.to_device(device).split_with_sizes(sizes, 0);
    for (g, sum) in defined.into_iter().zip(sums) {
        g.shallow_clone().copy_(&sum.view_as(g));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sid_core::stage::{build_stages, Stage};
    use sid_core::unit::Unit;
    use sid_core::{ExtractorKind, LossConfig, ModelConfig, NamedTensors, StagePlan};
    use std::time::Duration;
    use tch::Kind;

    /// The replicas' real gradient sum ([`replica_sum`] over Gloo, two ranks as two threads of
    /// this test), before any optimiser step: each replica's stage gradient on its half of the
    /// batch, weighted by its share (½), summed by the all-reduce, is the whole batch's.
    #[test]
    fn replica_all_reduce_gives_the_whole_batch_gradient() {
        assert!(
            sid_dist::available().0,
            "needs c10d: a build with the Gloo headers (libgloo-dev; scripts/setup.sh)"
        );
        let model = ModelConfig {
            extractor: ExtractorKind::Cnn,
            in_channels: 1,
            image_size: 8,
            num_classes: 4,
            feature_dim: 6,
            modules: 2,
            module_hidden: 5,
            init: sid_core::Init::default(),
            precision: sid_core::Precision::Fp32,
        };
        let plan = StagePlan::even(&model, 1).unwrap();
        let build = || {
            build_stages(&model, LossConfig::default(), 1e-3, &plan)
                .unwrap()
                .remove(0)
        };
        // One set of weights for all three (no seed: other tests draw from the same RNG).
        let mut whole = build();
        let weights = NamedTensors::from(whole.state());
        // Inputs without the RNG, for the same reason.
        let x = (Tensor::arange(8 * 64, (Kind::Float, Device::Cpu)) * 0.37)
            .sin()
            .view([8, 1, 8, 8]);
        let y = Tensor::from_slice(&[0i64, 1, 2, 3, 3, 2, 1, 0]);
        let step = |st: &mut Stage, x: &Tensor, y: &Tensor, share: f64| {
            let target = st.label_target(y);
            let p0 = st.uniform(x.size()[0]);
            st.forward_micro(x, &p0, &target);
            let _ = st.backward_micro(share).unwrap();
        };
        step(&mut whole, &x, &y, 1.0);
        let want = whole.gradients();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Duration::from_secs(60);
        let handles: Vec<_> = (0..2usize)
            .map(|rank| {
                let mut st = build();
                st.load_state(&weights).unwrap();
                let (xr, yr) = (
                    x.narrow(0, 4 * rank as i64, 4),
                    y.narrow(0, 4 * rank as i64, 4),
                );
                std::thread::spawn(move || {
                    let store =
                        sid_dist::Store::connect("127.0.0.1", port, rank == 0, 2, t).unwrap();
                    let g = Group::new(&store, "replicas", rank, 2, Backend::Gloo, "127.0.0.1", t)
                        .unwrap();
                    step(&mut st, &xr, &yr, 0.5);
                    replica_sum(&g, &st.gradients()).unwrap();
                    st.gradients()
                })
            })
            .collect();
        // Unseeded weights may leave a unit dead (a zero gradient, which zero matches); most
        // gradients must be non-zero, or the comparison would prove nothing.
        let zero = want
            .iter()
            .filter(|w| w.abs().max().double_value(&[]) == 0.0)
            .count();
        assert!(
            2 * zero < want.len(),
            "{zero} of {} gradients are zero",
            want.len()
        );
        for (rank, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let scale = w.abs().max().double_value(&[]);
                let d = (g - w).abs().max().double_value(&[]);
                assert!(
                    d <= 1e-5 * scale.max(1e-3),
                    "rank {rank}: gradient {i} differs by {d} (largest {scale})"
                );
            }
        }
    }
}
