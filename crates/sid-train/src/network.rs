//! The network a run trains, built from its config: the single-device trainer, or the stage
//! pipeline (staged SID, BP, or the paper's SID with its modules spread out) on one device or
//! a thread per device — or, as one rank of a
//! multi-process run ([`crate::distributed`]), the pipeline linked to the other ranks
//! (rank 0 builds it with [`build_network_on`]; every other rank builds its own stage and
//! serves it with [`serve`]).

use sid_core::{BpNetwork, Method, Network, SidNetwork};
use tch::Device;

use crate::config::RunConfig;
use crate::distributed::Rendezvous;
use crate::{Result, TrainError};

/// A built network and where its modules live.
pub struct Built {
    /// The network.
    pub net: Box<dyn Network>,
    /// Each device and its 0-based module block, in cascade order.
    pub layout: Vec<(Device, std::ops::Range<usize>)>,
    /// The placement in `--placement` syntax when several devices or stages are used.
    pub placement: Option<String>,
    /// How the stages were balanced, for the user (staged runs).
    pub notes: Vec<String>,
}

/// The stage cut a staged run asks for: `auto` (the default) times each block on the first
/// device and balances the slowest stage, `even` splits evenly, anything else is an explicit
/// `blocks=…;modules=…`. Returns the plan and a line on its balance.
fn stage_plan(
    cfg: &RunConfig,
    model: &sid_core::ModelConfig,
    device: Device,
    devices: usize,
) -> Result<(sid_core::StagePlan, Option<String>)> {
    let core = |e: sid_core::CoreError| TrainError::Config(e.to_string());
    Ok(match cfg.runtime.placement.as_deref() {
        None | Some("auto") if cfg.model.stages > 1 => {
            // Profiling draws its layers from the global RNG: it runs before the seed is set.
            let batch = (cfg.optim.batch_size / cfg.resolved_micro_batches() as i64).max(1);
            // Time blocks with the threads a stage will have: CPU stages in threads of their
            // own split the cores, and relative costs change with the thread count.
            let before = tch::get_num_threads();
            if device == Device::Cpu && devices > 1 {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tch::set_num_threads(
                    cfg.runtime
                        .threads
                        .unwrap_or((cores / devices).max(1) as i32),
                );
            }
            let costs = sid_core::stage::profile_costs(model, batch, device, 3);
            tch::set_num_threads(before);
            let plan =
                sid_core::StagePlan::balanced(model, cfg.model.stages, &costs).map_err(core)?;
            let ms: Vec<String> = plan
                .predicted(&costs)
                .iter()
                .map(|t| format!("{:.1}", t * 1e3))
                .collect();
            let note = format!(
                "auto placement from timing each block on {}: predicted ms per micro-batch of {batch} by stage: {}",
                crate::devices::device_name(device),
                ms.join(" | ")
            );
            (plan, Some(note))
        }
        None | Some("auto") | Some("even") => (
            sid_core::StagePlan::even(model, cfg.model.stages).map_err(core)?,
            None,
        ),
        Some(spec) => (sid_core::StagePlan::parse(spec, model).map_err(core)?, None),
    })
}

/// Builds the network a config asks for on the given devices, seeded by `cfg.optim.seed`:
/// SID on one device runs in this thread; SID on several devices runs on the multi-device
/// runtime; backprop runs on the first device.
pub fn build_network(cfg: &RunConfig, devices: &[Device]) -> Result<Built> {
    build_network_on(cfg, devices, None)
}

/// The stage pipeline's settings for a run (the same on every rank of a multi-process run).
pub(crate) fn staged_config(
    cfg: &RunConfig,
    devices: Vec<Device>,
    plan: sid_core::StagePlan,
) -> sid_runtime::StagedConfig {
    let mut sc = sid_runtime::StagedConfig::new(cfg.model_config(), devices, plan);
    sc.loss = cfg.loss_config();
    sc.lr = cfg.optim.lr;
    sc.micro_batches = cfg.resolved_micro_batches();
    if cfg.optim.method == Method::Bp {
        // Backprop's modules all read the final features: they sit on the last stage.
        sc.method = sid_runtime::PipelineMethod::Bp(cfg.runtime.pipeline_schedule);
    }
    sc.timeout = std::time::Duration::from_secs_f64(cfg.runtime.step_timeout);
    sc.threads_per_stage = cfg.runtime.threads;
    sc.streams = cfg.runtime.streams;
    sc.cuda_graph = cfg.stage_cuda_graphs();
    sc.fused_teacher = cfg.runtime.fused_teacher;
    sc
}

/// [`build_network`], as rank 0 of a multi-process run when `rdv` is given: the stage
/// pipeline then links to the other ranks, which serve the other stages and replicas.
pub fn build_network_on(
    cfg: &RunConfig,
    devices: &[Device],
    rdv: Option<&Rendezvous>,
) -> Result<Built> {
    let model = cfg.model_config();
    let devices: Vec<Device> = match rdv {
        Some(r) => vec![r.device()],
        None => devices.to_vec(),
    };
    let devices = devices.as_slice();
    let first = devices.first().copied().unwrap_or(Device::Cpu);
    if rdv.is_some() && cfg.runtime.cuda_graph == Some(true) {
        return Err(TrainError::Config(
            "--cuda-graph does not work across processes yet (the steps go through other ranks); leave it off".into(),
        ));
    }
    if cfg.runtime.data_parallel > 1 && rdv.is_none() {
        return Err(TrainError::Config(format!(
            "--data-parallel {} needs one process per replica and stage: add --nproc-per-node {} (or run under torchrun)",
            cfg.runtime.data_parallel,
            cfg.runtime.data_parallel * cfg.model.stages
        )));
    }
    // The paper's SID on several devices: modules spread out, whatever the micro-batches.
    let paper = cfg.optim.method == Method::Sid && cfg.model.stages == 1 && devices.len() > 1;
    let staged_plan = if (cfg.staged() && !paper) || rdv.is_some() {
        // Ranks each hold one stage: time the blocks with the threads one rank will have.
        Some(stage_plan(
            cfg,
            &model,
            first,
            devices.len().max(cfg.model.stages),
        )?)
    } else {
        None
    };
    tch::manual_seed(cfg.optim.seed as i64);
    let whole = vec![(first, 0..model.modules)];
    let runtime = TrainError::Runtime;
    if let Some((plan, note)) = staged_plan {
        let mut sc = staged_config(cfg, devices.to_vec(), plan.clone());
        #[cfg(feature = "fault-injection")]
        {
            sc.fault = injected_fault(cfg)?;
        }
        if let Some(rdv) = rdv {
            let mut shared = cfg.clone();
            shared.runtime.placement = Some(plan.to_spec());
            rdv.publish_config(&shared)?;
            let ranks = rdv.groups(
                plan.len(),
                cfg.runtime.data_parallel,
                cfg.optim.method == Method::Bp,
            )?;
            if sc.threads_per_stage.is_none() {
                sc.threads_per_stage = Some(rdv.cpu_threads());
            }
            sc.ranks = Some(ranks);
            // The weights must be drawn exactly as on the other ranks: reseed after the
            // timing above.
            tch::manual_seed(cfg.optim.seed as i64);
        }
        let pipeline = sid_runtime::StagedPipeline::new(sc).map_err(runtime)?;
        let slots = pipeline.plan().len() * cfg.runtime.data_parallel.max(1);
        let slots = if rdv.is_some() {
            slots
        } else {
            pipeline.plan().len()
        };
        let mut notes: Vec<String> = (0..slots).map(|s| pipeline.describe(s)).collect();
        notes.extend(note);
        return Ok(Built {
            layout: pipeline.layout(),
            // One stage (paper SID, replicated over ranks) has no cut to keep.
            placement: (pipeline.plan().len() > 1).then(|| pipeline.plan().to_spec()),
            net: Box::new(pipeline),
            notes,
        });
    }
    Ok(match cfg.optim.method {
        Method::Sid if devices.len() > 1 => {
            // The paper's SID on several devices: the extractor as stage 1 of a stage
            // pipeline, the module blocks after it; with micro-batches it forwards micro-batch
            // j+1 while the module stages work on j.
            let placement = match &cfg.runtime.placement {
                Some(spec) => sid_runtime::Placement::parse(spec, model.modules, devices.len()),
                None => sid_runtime::Placement::even(model.modules, devices.len()),
            }
            .map_err(runtime)?;
            let plan = sid_core::StagePlan::even(&model, 1).map_err(TrainError::Core)?;
            let mut sc = staged_config(cfg, devices.to_vec(), plan);
            sc.method = sid_runtime::PipelineMethod::Paper;
            sc.placement = Some(placement.clone());
            #[cfg(feature = "fault-injection")]
            {
                // Worker k's modules are stage k+1 (stage 0 is the extractor).
                sc.fault = injected_fault(cfg)?.map(|f| sid_runtime::Fault {
                    worker: f.worker + 1,
                    ..f
                });
            }
            let pipeline = sid_runtime::StagedPipeline::new(sc).map_err(runtime)?;
            Built {
                layout: pipeline.layout(),
                net: Box::new(pipeline),
                placement: Some(placement.to_spec()),
                notes: Vec::new(),
            }
        }
        Method::Sid => Built {
            net: Box::new(
                SidNetwork::new(&model, cfg.loss_config(), cfg.optim.lr, first)?
                    .with_fused_teacher(cfg.runtime.fused_teacher),
            ),
            layout: whole,
            placement: None,
            notes: Vec::new(),
        },
        Method::Bp => Built {
            net: Box::new(BpNetwork::new(&model, cfg.optim.lr, first)?),
            layout: whole,
            placement: None,
            notes: Vec::new(),
        },
    })
}

/// The fault `--inject-fault` asks for (tests), for either runtime.
#[cfg(feature = "fault-injection")]
pub(crate) fn injected_fault(cfg: &RunConfig) -> Result<Option<sid_runtime::Fault>> {
    cfg.runtime
        .inject_fault
        .as_deref()
        .map(sid_runtime::Fault::parse)
        .transpose()
        .map_err(|e| TrainError::Config(e.to_string()))
}

/// Every rank but 0: builds this rank's stage from the config rank 0 published and serves
/// it until rank 0 closes the pipeline. `own` is this rank's own settings, for what is never
/// published (a fault to inject, in tests).
pub fn serve(rdv: &Rendezvous, own: &RunConfig) -> Result<()> {
    let mut cfg = rdv.wait_config()?;
    cfg.runtime.inject_fault = own.runtime.inject_fault.clone();
    let model = cfg.model_config();
    let spec = cfg.runtime.placement.as_deref().ok_or_else(|| {
        TrainError::Config("rank 0 published a config without its stage cut".into())
    })?;
    let plan = sid_core::StagePlan::parse(spec, &model)?;
    let ranks = rdv.groups(
        plan.len(),
        cfg.runtime.data_parallel,
        cfg.optim.method == sid_core::Method::Bp,
    )?;
    tch::manual_seed(cfg.optim.seed as i64);
    let mut sc = staged_config(&cfg, vec![rdv.device()], plan);
    if sc.threads_per_stage.is_none() {
        sc.threads_per_stage = Some(rdv.cpu_threads());
    }
    sc.ranks = Some(ranks.clone());
    #[cfg(feature = "fault-injection")]
    {
        sc.fault = injected_fault(&cfg)?;
    }
    sid_runtime::serve(&sc, &ranks).map_err(TrainError::Runtime)
}
