//! The network a run trains, built from its plan ([`crate::plan`]): the stage pipeline (the
//! single-device trainer as its one stage, staged SID, BP, or the paper's SID with its modules
//! spread out) on one device or a thread per device — or, as one rank of a multi-process run
//! ([`crate::distributed`]), the pipeline linked to the other ranks (rank 0 builds it with
//! [`build_network`]; every other rank builds its own stage and serves it with [`serve`]).

use sid_core::Method;
use sid_runtime::StagedPipeline;
use tch::Device;

use crate::config::RunConfig;
use crate::distributed::Rendezvous;
use crate::plan::{Graphs, Layout, Plan};
use crate::{Result, TrainError};

/// The stage pipeline's settings for a run (the same on every rank of a multi-process run);
/// with `rdv`, one rank's: linked to the other ranks, its CPU stages sharing the node's cores.
fn staged_config(
    cfg: &RunConfig,
    plan: &Plan,
    devices: Vec<Device>,
    cut: sid_core::StagePlan,
    rdv: Option<&Rendezvous>,
) -> Result<sid_runtime::StagedConfig> {
    let backprop = plan.method == Method::Bp;
    let ranks = rdv.map(|r| r.groups(cut.len(), plan.replicas, backprop));
    let mut sc = sid_runtime::StagedConfig::new(cfg.model_config(), devices, cut);
    sc.ranks = ranks.transpose()?;
    sc.loss = cfg.loss_config();
    sc.lr = cfg.optim.lr;
    sc.backbone_lr = cfg.optim.backbone_lr;
    sc.micro_batches = plan.micro_batches;
    if backprop {
        // Backprop's modules all read the final features: they sit on the last stage.
        sc.method = sid_runtime::PipelineMethod::Bp(plan.schedule);
    }
    sc.timeout = std::time::Duration::from_secs_f64(cfg.runtime.step_timeout);
    sc.threads_per_stage = cfg.runtime.threads.or(rdv.map(Rendezvous::cpu_threads));
    sc.streams = cfg.runtime.streams;
    sc.cuda_graph = plan.graphs == Graphs::PerStage;
    sc.fused_teacher = cfg.runtime.fused_teacher;
    #[cfg(feature = "fault-injection")]
    if let Some(f) = &cfg.runtime.inject_fault {
        sc.fault = Some(sid_runtime::Fault::parse(f)?);
    }
    Ok(sc)
}

/// Builds the network `plan` lays out, seeded by `cfg.optim.seed`: always a stage pipeline (the
/// whole network on one device is one stage in this thread), on one device or a thread per
/// device — as rank 0 of a multi-process run when `rdv` is given, linked to the other ranks,
/// which serve the other stages and replicas.
pub fn build_network(
    cfg: &RunConfig,
    plan: &Plan,
    rdv: Option<&Rendezvous>,
) -> Result<StagedPipeline> {
    let model = cfg.model_config();
    tch::manual_seed(cfg.optim.seed as i64);
    let one = || sid_core::StagePlan::even(&model, 1).map_err(TrainError::Core);
    // The extractor as stage 1 of a stage pipeline, the module blocks after it; with
    // micro-batches it forwards micro-batch j+1 while the module stages work on j.
    let paper = |devices: Vec<Device>, placement| -> Result<sid_runtime::StagedConfig> {
        let mut sc = staged_config(cfg, plan, devices, one()?, None)?;
        sc.method = sid_runtime::PipelineMethod::Paper;
        sc.placement = placement;
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &mut sc.fault {
            // Device k's modules are stage k+2 (stage 1 is the extractor).
            f.worker += 1;
        }
        Ok(sc)
    };
    let sc = match &plan.layout {
        // One device: BP as one stage, SID as the paper's layout with one module block; all
        // in this thread.
        Layout::Whole(device) if plan.method == Method::Bp => {
            staged_config(cfg, plan, vec![*device], one()?, None)?
        }
        Layout::Whole(device) => paper(vec![*device], None)?,
        Layout::Paper { devices, placement } => paper(devices.clone(), Some(placement.clone()))?,
        Layout::Stages { devices, cut } => {
            staged_config(cfg, plan, devices.clone(), cut.clone(), rdv)?
        }
    };
    Ok(StagedPipeline::new(sc)?)
}

/// Every rank but 0: builds this rank's stage from the config rank 0 published and serves
/// it until rank 0 closes the pipeline. `own` is this rank's own settings, for what is never
/// published (a fault to inject, in tests).
pub fn serve(rdv: &Rendezvous, own: &RunConfig) -> Result<()> {
    let mut cfg = rdv.wait_config()?;
    cfg.runtime.inject_fault = own.runtime.inject_fault.clone();
    // Rank 0 published its cut and micro-batches: this resolves to the same plan.
    let plan = Plan::resolve(&cfg, &[rdv.device()], true, false)?;
    let Layout::Stages { devices, cut } = &plan.layout else {
        return Err(TrainError::Config(
            "rank 0 published a config that is not a stage pipeline".into(),
        ));
    };
    tch::manual_seed(cfg.optim.seed as i64);
    let sc = staged_config(&cfg, &plan, devices.clone(), cut.clone(), Some(rdv))?;
    let ranks = sc.ranks.clone().expect("linked to the other ranks");
    Ok(sid_runtime::serve(&sc, &ranks)?)
}
