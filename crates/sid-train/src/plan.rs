//! The run's plan, resolved once from its settings ([`Plan::resolve`]): which network on which
//! devices, cut how into stages, in how many micro-batches, over how many processes, with or
//! without CUDA graphs. Every invalid combination is refused here, with the message the user
//! sees; nothing after it parses a placement or decides a mode again. The plan is printed at
//! the start of a run and saved beside its config (`plan.toml`).

use std::fmt;

use sid_core::{ExtractorKind, Method, ModelConfig, StagePlan};
use sid_runtime::{BpSchedule, Placement};
use tch::Device;

use crate::config::RunConfig;
use crate::devices::device_name;
use crate::{Result, TrainError};

/// What runs where.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// The whole network on one device: the single-device trainer.
    Whole(Device),
    /// The paper's SID with its modules spread out: the extractor on the first device, then a
    /// block of modules on each device.
    Paper {
        /// One per module block.
        devices: Vec<Device>,
        /// Which modules each device owns.
        placement: Placement,
    },
    /// A stage pipeline: staged SID, or the BP baseline cut at the same blocks.
    Stages {
        /// One (the stages run one after another) or one per stage; under ranks, this
        /// process's own device.
        devices: Vec<Device>,
        /// Which blocks and modules each stage owns.
        cut: StagePlan,
    },
}

/// Where training steps are replayed from CUDA graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graphs {
    /// Every step runs eagerly.
    Off,
    /// The single-GPU trainer captures its whole step.
    WholeStep,
    /// Each staged-SID stage on its GPU captures its own step.
    PerStage,
}

/// The resolved shape of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// SID or backprop.
    pub method: Method,
    /// What runs where.
    pub layout: Layout,
    /// Micro-batches per step.
    pub micro_batches: usize,
    /// A backprop pipeline's schedule.
    pub schedule: BpSchedule,
    /// Data-parallel replicas of the pipeline (one process each per stage).
    pub replicas: usize,
    /// CUDA graphs.
    pub graphs: Graphs,
    /// Why the cut and the micro-batches are what they are, for the user.
    pub notes: Vec<String>,
}

/// How far the timed cut must beat the cost model's before a run leaves the model's cut: the
/// same command then builds the same network on a busy machine too.
const TIMED_MARGIN: f64 = 0.2;

/// Micro-batches a staged-SID run on CPU stages uses unless told otherwise: on `cpu:2`,
/// SimpleCNN K = 2 ran at 0.93-0.96x the all-cores trainer with one and 1.00x with four (see
/// docs/speed-cpu.md); each micro-batch's working set then fits the caches.
const CPU_STAGED_MICRO_BATCHES: usize = 4;

impl Plan {
    /// The plan for `cfg` on `devices` (as `--gpus` lists them; under ranks, this process's
    /// device), `ranked` when other processes hold other stages or replicas. `time_blocks`:
    /// an `auto` cut may time the blocks on the first device (else it takes the cost model's
    /// cut without timing: the checks are the same).
    pub fn resolve(
        cfg: &RunConfig,
        devices: &[Device],
        ranked: bool,
        time_blocks: bool,
    ) -> Result<Self> {
        let bad = |msg: String| Err(TrainError::Config(msg));
        let gpus = &cfg.runtime.gpus;
        let first = *devices.first().unwrap_or(&Device::Cpu);
        if cfg.model.precision == sid_core::Precision::Bf16 {
            if let Some(d) = devices.iter().find(|d| !matches!(d, Device::Cuda(_))) {
                return bad(format!(
                    "--precision bf16 needs a CUDA device; --gpus {gpus} puts a stage on {} (train there with --precision fp32)",
                    device_name(*d)
                ));
            }
            if !cfg.model.precision.available() {
                return bad("--precision bf16: this build has no autocast (libtorch's C++ headers were not found when it was compiled; run scripts/setup.sh and rebuild)".into());
            }
        }
        let (stages, replicas) = (cfg.model.stages, cfg.runtime.data_parallel);
        let (micro, why) = match cfg.runtime.micro_batches {
            Some(m) => (m, None),
            None => default_micro_batches(cfg, devices),
        };
        let mut notes: Vec<String> = why.into_iter().collect();
        if stages == 0 || micro == 0 || replicas == 0 {
            return bad("--stages, --micro-batches and --data-parallel must be at least 1".into());
        }
        let batch = cfg.optim.batch_size;
        // The micro-batch check first: with one replica it is the whole story, and its message
        // names the flag at fault.
        if micro as i64 > batch || batch % micro as i64 != 0 {
            return bad(format!(
                "--micro-batches {micro} does not divide --batch-size {batch} into equal micro-batches"
            ));
        }
        if batch % replicas as i64 != 0 || (batch / replicas as i64) % micro as i64 != 0 {
            return bad(format!(
                "--batch-size {batch} does not split into {replicas} equal replica shards of {micro} equal micro-batches"
            ));
        }
        if replicas > 1 && !ranked {
            return bad(format!(
                "--data-parallel {replicas} needs one process per replica and stage: add --nproc-per-node {} (or run under torchrun)",
                replicas * stages
            ));
        }
        let model = cfg.model_config();
        let sid = cfg.optim.method == Method::Sid;
        let asked = cfg.runtime.cuda_graph == Some(true);
        if ranked && asked {
            return bad("--cuda-graph does not work across processes yet (the steps go through other ranks); leave it off".into());
        }
        let all_gpus = devices.iter().all(|d| matches!(d, Device::Cuda(_)));
        let per_stage =
            asked && sid && stages > 1 && devices.len() == stages && all_gpus && micro == 1;
        if asked && !matches!(devices, [Device::Cuda(_)]) && !per_stage {
            return bad(format!(
                "--cuda-graph needs exactly one GPU (--gpus N), or staged SID with a GPU per stage and one micro-batch (--stages K --gpus 0,1,..); got --gpus {gpus}"
            ));
        }
        if asked && !sid_core::graph::CudaGraph::available() {
            return bad("--cuda-graph: this build has no CUDA graphs (CUDA headers were not found when it was compiled; run scripts/setup.sh and rebuild)".into());
        }
        let paper = sid && stages == 1 && replicas == 1 && devices.len() > 1 && !ranked;
        let staged = stages > 1 || micro > 1 || ranked || replicas > 1;
        let layout = if staged && !paper {
            if asked && !per_stage {
                return bad("--cuda-graph with --stages needs staged SID, a GPU per stage (--gpus 0,1 or 0,0) and one micro-batch per step; leave it off otherwise".into());
            }
            if devices.len() != 1 && devices.len() != stages {
                return bad(format!(
                    "--stages {stages} on {} devices (--gpus {gpus}): give one device (the stages then run one after another) or one per stage",
                    devices.len()
                ));
            }
            let (cut, note) = stage_cut(cfg, &model, micro, first, devices.len(), time_blocks)?;
            notes.extend(note);
            Layout::Stages {
                devices: devices.to_vec(),
                cut,
            }
        } else {
            let placement = match cfg.runtime.placement.as_deref() {
                Some(spec) => Placement::parse(spec, model.modules, devices.len())?,
                None => Placement::even(model.modules, devices.len())?,
            };
            if paper {
                Layout::Paper {
                    devices: devices.to_vec(),
                    placement,
                }
            } else {
                Layout::Whole(first)
            }
        };
        let on_one_gpu = !ranked && matches!(layout, Layout::Whole(Device::Cuda(_)));
        let graphs = match cfg.runtime.cuda_graph {
            _ if per_stage => Graphs::PerStage,
            None if on_one_gpu && sid_core::graph::CudaGraph::available() => Graphs::WholeStep,
            Some(true) if on_one_gpu => Graphs::WholeStep,
            _ => Graphs::Off,
        };
        Ok(Self {
            method: cfg.optim.method,
            layout,
            micro_batches: micro,
            schedule: cfg.runtime.pipeline_schedule,
            replicas,
            graphs,
            notes,
        })
    }

    /// Checks every setting of `cfg` ([`RunConfig::validate`]) and their combination, as
    /// [`Plan::resolve`] would on its `--gpus`, without timing anything: a run with replicas is
    /// taken to have its ranks.
    pub fn check(cfg: &RunConfig) -> Result<()> {
        cfg.validate()?;
        let ranked = cfg.runtime.data_parallel > 1;
        Self::resolve(cfg, cfg.runtime.gpus.devices(), ranked, false).map(|_| ())
    }

    /// The placement to save in `config.toml`: a stage cut (always, so a resume keeps it) or
    /// the paper mode's module blocks; `None` for the whole network on one device.
    pub fn placement(&self) -> Option<String> {
        match &self.layout {
            Layout::Whole(_) => None,
            Layout::Paper { placement, .. } => Some(placement.to_spec()),
            Layout::Stages { cut, .. } if cut.len() > 1 => Some(cut.to_spec()),
            Layout::Stages { .. } => None,
        }
    }

    /// The plan as `plan.toml` records it.
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        t.insert("method".into(), self.method.to_string().into());
        let (kind, devs) = match &self.layout {
            Layout::Whole(d) => ("whole", names(&[*d])),
            Layout::Paper { devices, .. } => ("paper", names(devices)),
            Layout::Stages { devices, .. } => ("stages", names(devices)),
        };
        t.insert("layout".into(), kind.into());
        t.insert("devices".into(), devs.into());
        if let Some(p) = self.placement() {
            t.insert("placement".into(), p.into());
        }
        t.insert("micro_batches".into(), (self.micro_batches as i64).into());
        if self.method == Method::Bp && matches!(self.layout, Layout::Stages { .. }) {
            t.insert("pipeline_schedule".into(), self.schedule.to_string().into());
        }
        t.insert("replicas".into(), (self.replicas as i64).into());
        let graphs = match self.graphs {
            Graphs::Off => "off",
            Graphs::WholeStep => "whole step",
            Graphs::PerStage => "per stage",
        };
        t.insert("cuda_graphs".into(), graphs.into());
        if !self.notes.is_empty() {
            t.insert("notes".into(), self.notes.clone().into());
        }
        toml::to_string(&t).expect("a plan serialises")
    }
}

/// The devices' names.
fn names(devices: &[Device]) -> Vec<String> {
    devices.iter().map(|d| device_name(*d)).collect()
}

impl fmt::Display for Plan {
    /// One line: `plan: staged SID, 2 stages on [cpu, cpu] (blocks=…), 4 micro-batches, …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |d: &[Device]| names(d).join(", ");
        match (&self.layout, self.method) {
            (Layout::Whole(d), m) => write!(f, "plan: {m} on {}", device_name(*d))?,
            (Layout::Paper { devices, placement }, _) => {
                let (on, spec) = (list(devices), placement.to_spec());
                write!(
                    f,
                    "plan: the paper's SID with its modules on [{on}] ({spec})"
                )?
            }
            (Layout::Stages { devices, cut }, m) => {
                let what = match m {
                    Method::Sid => "staged SID".to_string(),
                    Method::Bp => format!("backprop pipeline ({})", self.schedule),
                };
                let (k, on, spec) = (cut.len(), list(devices), cut.to_spec());
                write!(f, "plan: {what}, {k} stage(s) on [{on}] ({spec})")?
            }
        }
        write!(f, ", {} micro-batch(es) per step", self.micro_batches)?;
        if self.replicas > 1 {
            write!(f, ", {} replicas", self.replicas)?;
        }
        match self.graphs {
            Graphs::Off => Ok(()),
            Graphs::WholeStep => write!(f, ", CUDA graph"),
            Graphs::PerStage => write!(f, ", a CUDA graph per stage"),
        }
    }
}

/// Micro-batches when `--micro-batches` is not given, and why (when not the obvious 1): a
/// backprop pipeline takes the largest divisor of the batch up to 2K (to keep every stage
/// busy); staged SID on CPU stages takes four where the batch divides and no BatchNorm reads
/// the batch's statistics; everything else one.
fn default_micro_batches(cfg: &RunConfig, devices: &[Device]) -> (usize, Option<String>) {
    let (stages, batch) = (cfg.model.stages, cfg.optim.batch_size.max(1));
    if stages < 2 {
        return (1, None);
    }
    if cfg.optim.method == Method::Bp {
        let most = (2 * stages as i64).min(batch);
        let m = (1..=most).rev().find(|m| batch % m == 0).unwrap_or(1) as usize;
        return (m, None);
    }
    use ExtractorKind::{Resnet18, Vgg11};
    let batch_norm = matches!(cfg.model.extractor, Vgg11 | Resnet18);
    let cpu_stages = devices.iter().all(|d| *d == Device::Cpu) && devices.len() > 1;
    let m = CPU_STAGED_MICRO_BATCHES;
    let per_replica = batch / cfg.runtime.data_parallel.max(1) as i64;
    if cpu_stages && !batch_norm && per_replica % m as i64 == 0 {
        let why = format!("{m} micro-batches per step: the faster choice for CPU stages (--micro-batches 1 for whole batches)");
        return (m, Some(why));
    }
    (1, None)
}

/// The stage cut: `even`, an explicit `blocks=…;modules=…`, or `auto` (the default): the even
/// cut unless timing each block on the first device (with the threads a stage will have)
/// finds a cut whose slowest stage is [`TIMED_MARGIN`] faster. Returns the cut and a line on
/// how it was chosen.
fn stage_cut(
    cfg: &RunConfig,
    model: &ModelConfig,
    micro: usize,
    device: Device,
    devices: usize,
    time_blocks: bool,
) -> Result<(StagePlan, Option<String>)> {
    let stages = cfg.model.stages;
    let core = |e: sid_core::CoreError| TrainError::Config(e.to_string());
    let even = StagePlan::even(model, stages).map_err(core)?;
    let auto = match cfg.runtime.placement.as_deref() {
        None | Some("auto") => stages > 1,
        Some("even") => false,
        Some(spec) => {
            let cut = StagePlan::parse(spec, model).map_err(core)?;
            if cut.len() != stages {
                return Err(TrainError::Config(format!(
                    "--placement {spec} has {} stages but --stages is {stages}",
                    cut.len()
                )));
            }
            return Ok((cut, None));
        }
    };
    if !auto || !time_blocks {
        return Ok((even, None));
    }
    // Profiling draws its layers from the global RNG: the network is seeded after this.
    let batch = (cfg.optim.batch_size / micro as i64).max(1);
    // Time blocks with the threads a stage will have: CPU stages in threads of their own split
    // the cores, and relative costs change with the thread count.
    let before = tch::get_num_threads();
    let stage_processes = devices.max(stages);
    if device == Device::Cpu && stage_processes > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = (cores / stage_processes).max(1) as i32;
        tch::set_num_threads(cfg.runtime.threads.unwrap_or(shared));
    }
    let costs = sid_core::stage::profile_costs(model, batch, device, 3);
    tch::set_num_threads(before);
    let timed = StagePlan::balanced(model, stages, &costs).map_err(core)?;
    let timed_spec = timed.to_spec();
    let slowest = |p: &StagePlan| p.predicted(&costs).into_iter().fold(0.0, f64::max);
    let (even_ms, timed_ms) = (slowest(&even) * 1e3, slowest(&timed) * 1e3);
    let (cut, how) = if timed_ms < (1.0 - TIMED_MARGIN) * even_ms {
        (timed, "the timed cut")
    } else {
        (even, "the even cut")
    };
    let (on, margin) = (device_name(device), TIMED_MARGIN * 100.0);
    let note = format!(
        "auto placement: {how} (slowest stage per micro-batch of {batch} on {on}: even {even_ms:.1} ms, timed {timed_spec} {timed_ms:.1} ms; the timed cut is taken only when {margin:.0}% faster)"
    );
    Ok((cut, Some(note)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `RunConfig::default()` changed by `f`.
    fn with(f: impl FnOnce(&mut RunConfig)) -> RunConfig {
        let mut c = RunConfig::default();
        f(&mut c);
        c
    }

    fn plan(c: &RunConfig) -> Result<Plan> {
        Plan::resolve(c, c.runtime.gpus.devices(), false, false)
    }

    #[test]
    fn cuda_graph_is_on_by_default_for_exactly_one_gpu() {
        let on = |spec: &str, graph: Option<bool>| {
            with(|c| {
                c.runtime.gpus = spec.parse().unwrap();
                c.runtime.cuda_graph = graph;
            })
        };
        let built_in = sid_core::graph::CudaGraph::available();
        let whole = |c: &RunConfig| plan(c).unwrap().graphs == Graphs::WholeStep;
        assert_eq!(whole(&on("0", None)), built_in);
        assert_eq!(whole(&on("3", None)), built_in);
        assert!(!whole(&on("0", Some(false))));
        for spec in ["cpu", "cpu:2", "0,1", "0,0"] {
            assert!(!whole(&on(spec, None)), "{spec}");
            assert!(Plan::check(&on(spec, Some(true))).is_err(), "{spec}");
        }
        // Staged SID with a GPU per stage graphs each stage instead, when asked.
        let staged = |spec: &str, micro: usize| {
            with(|c| {
                c.runtime.gpus = spec.parse().unwrap();
                c.runtime.cuda_graph = Some(true);
                c.model.stages = 2;
                c.runtime.micro_batches = Some(micro);
            })
        };
        if built_in {
            for spec in ["0,0", "0,1"] {
                assert_eq!(plan(&staged(spec, 1)).unwrap().graphs, Graphs::PerStage);
            }
        }
        assert!(plan(&staged("0,1", 2)).is_err());
        assert!(plan(&staged("cpu:2", 1)).is_err());
    }

    #[test]
    fn micro_batches_default_by_method_and_device_kind() {
        let staged = |spec: &str, f: &dyn Fn(&mut RunConfig)| {
            plan(&with(|c| {
                c.runtime.gpus = spec.parse().unwrap();
                c.model.stages = 2;
                f(c);
            }))
            .unwrap()
        };
        // CPU stages in threads: four micro-batches, said.
        let p = staged("cpu:2", &|_| {});
        assert_eq!(p.micro_batches, 4);
        assert!(p.notes.iter().any(|n| n.contains("4 micro-batches")));
        // Not where it changes what is trained (BatchNorm), on GPUs, or one device.
        assert_eq!(
            staged("cpu:2", &|c| c.model.extractor = ExtractorKind::Vgg11).micro_batches,
            1
        );
        assert_eq!(staged("0,1", &|_| {}).micro_batches, 1);
        assert_eq!(staged("cpu", &|_| {}).micro_batches, 1);
        // Set by the user: kept.
        assert_eq!(
            staged("cpu:2", &|c| c.runtime.micro_batches = Some(2)).micro_batches,
            2
        );
        // Backprop: the largest divisor of the batch up to 2K.
        let bp = staged("cpu:2", &|c| {
            c.optim.method = Method::Bp;
            c.optim.batch_size = 96;
        });
        assert_eq!(bp.micro_batches, 4);
        // The paper mode and one device: whole batches.
        let paper = plan(&with(|c| c.runtime.gpus = "cpu:2".parse().unwrap())).unwrap();
        assert!(matches!(paper.layout, Layout::Paper { .. }));
        assert_eq!(paper.micro_batches, 1);
        assert!(matches!(
            plan(&RunConfig::default()).unwrap().layout,
            Layout::Whole(Device::Cpu)
        ));
    }

    #[test]
    fn micro_batches_that_do_not_divide_the_batch_name_the_flag() {
        let c = with(|c| {
            c.runtime.micro_batches = Some(3);
            c.optim.batch_size = 64;
        });
        let e = Plan::check(&c).unwrap_err().to_string();
        assert!(
            e.contains("--micro-batches 3 does not divide --batch-size 64"),
            "{e}"
        );
        let c = with(|c| {
            c.runtime.micro_batches = Some(4);
            c.runtime.data_parallel = 3;
            c.optim.batch_size = 64;
        });
        let e = Plan::check(&c).unwrap_err().to_string();
        assert!(e.contains("3 equal replica shards"), "{e}");
    }

    #[test]
    fn bf16_needs_cuda_devices() {
        for spec in ["cpu", "cpu:2"] {
            let c = with(|c| {
                c.runtime.gpus = spec.parse().unwrap();
                c.model.precision = sid_core::Precision::Bf16;
            });
            let e = Plan::check(&c).unwrap_err().to_string();
            assert!(e.contains("--precision bf16 needs a CUDA device"), "{e}");
        }
    }

    #[test]
    fn a_plan_prints_and_saves_what_was_decided() {
        let p = plan(&with(|c| {
            c.runtime.gpus = "cpu:2".parse().unwrap();
            c.model.stages = 2;
            c.runtime.placement = Some("blocks=0-1,2-3;modules=0-4,5-9".into());
        }))
        .unwrap();
        let line = p.to_string();
        assert!(
            line.starts_with("plan: staged SID, 2 stage(s) on [cpu, cpu] (blocks=0-1,2-3;modules=0-4,5-9), 4 micro-batch(es)"),
            "{line}"
        );
        let saved: toml::Table = p.to_toml().parse().unwrap();
        assert_eq!(saved["layout"].as_str(), Some("stages"));
        assert_eq!(saved["micro_batches"].as_integer(), Some(4));
        assert_eq!(
            p.placement().as_deref(),
            Some("blocks=0-1,2-3;modules=0-4,5-9")
        );
        // Without timing, auto is the even cut: the same command gives the same network.
        let auto = plan(&with(|c| {
            c.runtime.gpus = "cpu:2".parse().unwrap();
            c.model.stages = 2;
        }))
        .unwrap();
        assert_eq!(
            auto.placement().as_deref(),
            Some("blocks=0-1,2-3;modules=0-4,5-9")
        );
    }
}
