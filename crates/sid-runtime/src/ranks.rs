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

use crate::transport::GradReducer;
use crate::{Result, RuntimeError};

/// Tag of messages down the chain.
pub const DOWN: u32 = 1;
/// Tag of reports to the coordinator.
pub const REPORTS: u32 = 2;
/// Tag of gradients up the chain.
pub const GRADS: u32 = 3;

/// Whether rank 0 is still there: `Err` says why not. A served rank asks every second, so
/// that it stops when rank 0 dies even while its own links are idle or its stage is stuck.
pub type Liveness = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

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

    pub(crate) fn direct(&self, from: usize, to: usize, tag: u32) -> Option<Arc<Group>> {
        self.direct.get(&(from, to, tag)).cloned()
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

/// Sums gradients over a stage's replicas: one flat all-reduce per optimiser step.
pub(crate) struct ReplicaSum {
    group: Arc<Group>,
}

impl GradReducer for ReplicaSum {
    fn all_reduce(&mut self, grads: &[Tensor]) -> Result<()> {
        let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        let Some(first) = defined.first() else {
            return Ok(());
        };
        let device = first.device();
        let flat = Tensor::cat(
            &defined.iter().map(|g| g.flatten(0, -1)).collect::<Vec<_>>(),
            0,
        );
        let mut buf = match self.group.backend() {
            Backend::Gloo => flat.to_device(Device::Cpu),
            Backend::Nccl => flat,
        };
        self.group.all_reduce_sum(&mut buf)?;
        let buf = buf.to_device(device);
        let mut offset = 0;
        for g in defined {
            let n = g.numel() as i64;
            let mut g = g.shallow_clone();
            g.copy_(&buf.narrow(0, offset, n).view_as(&g));
            offset += n;
        }
        Ok(())
    }
}

pub(crate) fn replica_reducer(ranks: &Ranks) -> Option<Box<dyn GradReducer>> {
    ranks
        .replica_group
        .as_ref()
        .map(|g| Box::new(ReplicaSum { group: g.clone() }) as Box<dyn GradReducer>)
}
