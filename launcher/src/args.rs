//! Raw command-line flags, and their resolution into a validated [`RunConfig`].
//!
//! Precedence: built-in defaults < `--config FILE` < flags. With `--resume DIR` the saved
//! `DIR/config.toml` takes the place of the defaults and the config file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sid_core::{ExtractorKind, Method};
use sid_data::DatasetKind;
use sid_train::{Run, RunConfig};

/// Train a network with Synergistic Information Distillation (SID), or its backprop baseline,
/// on one or more devices.
#[derive(Debug, Parser)]
#[command(name = "sid-launch", version, about, after_help = AFTER_HELP, args_override_self = true,
    args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Something other than training.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Devices: cpu, cpu:4 (4 CPU workers), 0, 0,1,2,3, or 0,0,0,0 (streams on one GPU)
    /// [default: cpu].
    #[arg(long)]
    pub gpus: Option<String>,
    /// Training method: sid or bp [default: sid].
    #[arg(long)]
    pub method: Option<Method>,
    /// Data set: fashion-mnist, mnist, cifar10, cifar100, or folder (your own PNG / JPEG
    /// images in DATA_DIR/train/<class>/ and test/ or val/, or Tiny-ImageNet's layout)
    /// [default: fashion-mnist].
    #[arg(long)]
    pub dataset: Option<DatasetKind>,
    /// Folder with the data set's files (default: the data set's usual location).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// --dataset folder: side length the images are resized to (default: 32).
    #[arg(long, value_name = "N")]
    pub image_size: Option<i64>,
    /// --dataset folder: where the decoded images are cached, so later runs skip decoding
    /// (default: image-cache/ beside the run directory).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Feature extractor: cnn (reference SimpleCNN), mlp, vgg11 (VGG-11 with BatchNorm),
    /// resnet18 or vit-tiny [default: cnn].
    #[arg(long)]
    pub model: Option<ExtractorKind>,
    /// Number of belief modules L [default: 10].
    #[arg(long)]
    pub modules: Option<usize>,
    /// Feature dimension d [default: 128].
    #[arg(long)]
    pub feature_dim: Option<i64>,
    /// Hidden width of each belief module [default: 256].
    #[arg(long)]
    pub module_hidden: Option<i64>,
    /// Weight initialisation: pytorch (the reference's nn.Linear/nn.Conv2d defaults) or
    /// kaiming (tch's default, weights ≈ 2.45× larger) [default: pytorch].
    #[arg(long)]
    pub init: Option<sid_core::Init>,
    /// Arithmetic of the forward passes: fp32, or bf16 (bfloat16 autocast; weights, Adam state
    /// and losses stay fp32; CUDA devices only) [default: fp32].
    #[arg(long)]
    pub precision: Option<sid_core::Precision>,
    /// Weight α of the label term of the local loss [default: 0.5].
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Label smoothing ε of the SID target [default: 0].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Training epochs [default: 5].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training batch size [default: 128].
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Adam learning rate [default: 0.001].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed for initialisation, data order, augmentation and label noise [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fraction of training labels flipped to another class (symmetric noise) [default: 0].
    #[arg(long)]
    pub label_noise: Option<f64>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Fraction of the training set held out for validation [default: 0].
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Random crop + flip on training batches (default: on for CIFAR only).
    #[arg(long, overrides_with = "no_augment")]
    pub augment: bool,
    /// Turn augmentation off.
    #[arg(long)]
    pub no_augment: bool,
    /// Batch size for evaluation [default: 1000].
    #[arg(long)]
    pub eval_batch_size: Option<i64>,
    /// TOML file with any of the settings above (flags win): sectioned as a run's config.toml
    /// ([model], [data], [optim], [runtime]), or flat as earlier versions wrote it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to write config.toml, metrics.jsonl, the checkpoint and summary.json
    /// (default: runs/<method>-<dataset>-<time>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its checkpoint.
    #[arg(long, conflicts_with_all = ["run_dir", "config"])]
    pub resume: Option<PathBuf>,
    /// libtorch intra-op threads (default: libtorch's choice; with several CPU workers, the
    /// cores split among them).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Staged SID: cut the backbone into K consecutive stages, each with a neck and a block of
    /// modules trained by their own local losses only; one stage per device in --gpus (or all
    /// on one device). 1 = the paper's SID [default: 1].
    #[arg(long)]
    pub stages: Option<usize>,
    /// Micro-batches per step: each stage accumulates their gradients and steps once; stages
    /// work on different micro-batches at the same time (default: 1 for SID; for --method bp
    /// with --stages K, the largest divisor of the batch up to 2K). The paper mode (--stages 1,
    /// several devices) with M > 1 runs its extractor as a stage that forwards micro-batch j+1
    /// while the modules work on j.
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// Data-parallel replicas R of the pipeline, one process per replica and stage (world =
    /// R × stages; launch with --nproc-per-node or torchrun): each takes a disjoint shard of
    /// every batch; each stage's gradients are summed over its replicas [default: 1].
    #[arg(long, value_name = "R")]
    pub data_parallel: Option<usize>,
    /// Start N processes (ranks) on this node, like torchrun: each takes one stage (or
    /// replica), the local rank's entry of --gpus or a share of the CPU cores. Rank 0 writes
    /// the run; the others serve their stages over torch.distributed (Gloo, or NCCL for the
    /// replicas' all-reduce on GPUs).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in a multi-node job (with --nproc-per-node) [default: 1].
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's place in a multi-node job, 0-based [default: 0].
    #[arg(long, value_name = "I", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where rank 0 serves the rendezvous store [default: 127.0.0.1].
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store on node 0 (Gloo's own connections take other ports)
    /// [default: 29500].
    #[arg(long, value_name = "PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Schedule of a backprop pipeline (--method bp --stages K): 1f1b, gpipe, or zb1 (zero
    /// bubble ZB-H1: each backward split into its input and weight halves, the weight halves
    /// postponed into 1F1B's bubble) [default: 1f1b].
    #[arg(long)]
    pub pipeline_schedule: Option<sid_train::BpSchedule>,
    /// Paper mode (several devices, one stage): module blocks per device, 0:0-1,1:2-4 (device
    /// position:first-last module, 0-based; default: as even as possible). Staged runs: auto
    /// (time each block, balance the slowest stage; the default), even, or
    /// blocks=0-1,2-3;modules=0-4,5-9 (0-based ranges, one per stage).
    #[arg(long)]
    pub placement: Option<String>,
    /// Seconds to wait for any worker before the run fails [default: 300].
    #[arg(long)]
    pub step_timeout: Option<f64>,
    /// Run every GPU worker on the default CUDA stream instead of its own.
    #[arg(long)]
    pub no_streams: bool,
    /// SID's fused schedule: each module's local-step forward, detached, is the next module's
    /// teacher — the same result as the reference schedule with one forward per module fewer.
    #[arg(long)]
    pub fused_teacher: bool,
    /// Capture a training step as a CUDA graph after a few warm-up steps and replay it: one
    /// launch instead of hundreds of small kernels per step, same computation. One GPU, or
    /// staged SID with a GPU per stage and one micro-batch (each stage its own graph; not yet
    /// run on a GPU) [default: on when --gpus names exactly one GPU].
    #[arg(long, overrides_with = "no_cuda_graph")]
    pub cuda_graph: bool,
    /// Run every step eagerly, without a CUDA graph.
    #[arg(long)]
    pub no_cuda_graph: bool,
    /// Write a Chrome trace (JSON, opens in Perfetto / chrome://tracing) of every step's parts:
    /// extractor, phase 1, each module's phase 2 on each worker, broadcasts, waits.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Append every training step's loss to RUN_DIR/steps.jsonl (`{"epoch", "step", "loss"}`
    /// per line, the loss at full precision): a finer curve than metrics.jsonl's epochs.
    #[arg(long)]
    pub log_steps: bool,
    /// Telemetry samples per second into RUN_DIR/telemetry.jsonl (0 = off).
    #[arg(long, default_value_t = 10.0)]
    pub telemetry_hz: f64,
    /// Inject a fault WORKER:STEP:panic|error|nan|hang (for testing failure handling; only
    /// builds with the fault-injection feature accept it).
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
}

/// What `sid-launch` can do besides training.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Evaluate a saved run on its test set with early exit: each sample stops at the first
    /// module whose belief's top probability reaches τ; prints accuracy, mean modules used and
    /// time per sample for each τ, next to the full cascade.
    Eval(EvalArgs),
    /// Classify image files (PNG / JPEG) with a saved run: prints, per file, the predicted
    /// class, its probability and the module of the cascade the image left at.
    Predict(PredictArgs),
}

/// Flags of `sid-launch predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// The run directory (its config.toml, input.json and checkpoint.safetensors).
    pub run_dir: PathBuf,
    /// Image files: converted to the run's channels, resized to its image size and
    /// normalised as its training data were.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Early exit: an image leaves at the first module whose belief's top probability
    /// reaches τ in (0, 1]; `full` runs the whole cascade. Backprop runs always answer from
    /// the last module.
    #[arg(long, value_name = "τ|full", default_value = DEFAULT_EXIT_CONFIDENCE,
        value_parser = parse_exit)]
    pub exit_confidence: sid_train::predict::ExitAt,
    /// One JSON object per line (path, label, class, confidence, exit_module, modules)
    /// instead of tab-separated columns.
    #[arg(long)]
    pub json: bool,
    /// Devices to run on (default: the run's saved --gpus).
    #[arg(long)]
    pub gpus: Option<String>,
    /// Images per forward pass (default: the run's evaluation batch size).
    #[arg(long)]
    pub eval_batch_size: Option<i64>,
}

/// `eval`'s thresholds.
const EVAL_EXIT_CONFIDENCES: &str = "0.5,0.8,0.9,0.95,0.99";

/// `predict`'s threshold: the middle of `eval`'s default list, whose table shows what each
/// costs and gains.
const DEFAULT_EXIT_CONFIDENCE: &str = "0.9";

/// `full`, or a threshold in (0, 1].
fn parse_exit(s: &str) -> Result<sid_train::predict::ExitAt, String> {
    if s.eq_ignore_ascii_case("full") {
        return Ok(sid_train::predict::ExitAt::Last);
    }
    match s.parse::<f64>() {
        Ok(t) if t > 0.0 && t <= 1.0 => Ok(sid_train::predict::ExitAt::Confidence(t)),
        _ => Err("expected a threshold in (0, 1] or `full`".into()),
    }
}

/// Flags of `sid-launch eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The run directory (its config.toml and checkpoint.safetensors).
    pub run_dir: PathBuf,
    /// Confidence thresholds τ in (0, 1], comma-separated.
    #[arg(long, value_delimiter = ',', default_value = EVAL_EXIT_CONFIDENCES)]
    pub exit_confidence: Vec<f64>,
    /// Devices to evaluate on (default: the run's saved --gpus).
    #[arg(long)]
    pub gpus: Option<String>,
    /// Evaluation batch size (default: the run's).
    #[arg(long)]
    pub eval_batch_size: Option<i64>,
}

const AFTER_HELP: &str =
    "Outputs in the run directory: config.toml (resolved settings), metrics.jsonl \
(one record per epoch), checkpoint.safetensors (after every epoch and on Ctrl-C), summary.json.";

/// What to do: a new run or a resumed one.
pub struct Plan {
    /// The resolved, validated config.
    pub config: RunConfig,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Whether to continue from the checkpoint in `run_dir`.
    pub resume: bool,
    /// A rank other than 0 resuming on a machine without the run directory: it takes every
    /// setting from rank 0 at the rendezvous (its own flags only place it: `--gpus`,
    /// `--threads`, `--step-timeout`).
    pub follows_rank0: bool,
}

impl Cli {
    /// Parses the command line; `--resume`'s help lists what a resume may change, from the
    /// one list the resume check reads.
    pub fn parse_with_resume_help() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let help = format!(
            "Continue the run in this directory from its checkpoint. Only {} may differ from its saved config.toml.",
            sid_train::config::resume_may_change_flags()
        );
        let matches = Self::command()
            .mut_arg("resume", |a| a.help(help))
            .get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// Applies the flags that were given on top of `cfg`; `--gpus` is parsed here, once.
    fn apply(&self, cfg: &mut RunConfig) -> Result<()> {
        macro_rules! set {
            ($($section:ident . $field:ident = $flag:ident),* $(,)?) => {
                $( if let Some(v) = self.$flag.clone() { cfg.$section.$field = v; } )*
            };
        }
        macro_rules! set_some {
            ($($section:ident . $field:ident),* $(,)?) => {
                $( if self.$field.is_some() { cfg.$section.$field = self.$field.clone(); } )*
            };
        }
        if let Some(spec) = &self.gpus {
            if self.placement.is_none() && cfg.model.stages <= 1 {
                // A saved paper-mode placement belongs to the saved device list (a staged
                // run's cut belongs to its model and stays).
                cfg.runtime.placement = None;
            }
            cfg.runtime.gpus = spec.parse()?;
        }
        set!(
            optim.method = method,
            data.dataset = dataset,
            model.extractor = model,
            model.modules = modules,
            model.feature_dim = feature_dim,
            model.module_hidden = module_hidden,
            model.init = init,
            model.precision = precision,
            optim.alpha = alpha,
            optim.label_smoothing = label_smoothing,
            optim.epochs = epochs,
            optim.batch_size = batch_size,
            optim.lr = lr,
            optim.seed = seed,
            data.label_noise = label_noise,
            data.val_split = val_split,
            runtime.eval_batch_size = eval_batch_size,
            runtime.step_timeout = step_timeout,
            model.stages = stages,
            runtime.data_parallel = data_parallel,
            runtime.pipeline_schedule = pipeline_schedule,
        );
        set_some!(
            runtime.micro_batches,
            runtime.placement,
            runtime.inject_fault,
            runtime.threads,
            data.data_dir,
            data.image_size,
            data.cache_dir,
            data.limit_train,
        );
        if self.no_streams {
            cfg.runtime.streams = false;
        }
        if self.fused_teacher {
            cfg.runtime.fused_teacher = true;
        }
        if self.cuda_graph {
            cfg.runtime.cuda_graph = Some(true);
        }
        if self.no_cuda_graph {
            cfg.runtime.cuda_graph = Some(false);
        }
        if self.augment {
            cfg.data.augment = Some(true);
        }
        if self.no_augment {
            cfg.data.augment = Some(false);
        }
        Ok(())
    }

    /// Resolves defaults, config file, saved config and flags into a plan. `not_rank0`: this
    /// process holds no rank 0 (a rank above 0, or a launcher for a node other than node 0);
    /// resuming, it may then lack the run directory, which only rank 0 writes and reads, and
    /// follows rank 0's settings.
    pub fn plan_as(&self, not_rank0: bool) -> Result<Plan> {
        if let Some(dir) = &self.resume {
            if not_rank0 && !dir.join("config.toml").is_file() {
                let mut config = RunConfig::default();
                self.apply(&mut config)?;
                return Ok(Plan {
                    config,
                    run_dir: dir.clone(),
                    resume: true,
                    follows_rank0: true,
                });
            }
            if !dir.is_dir() {
                bail!("--resume {}: no such run directory", dir.display());
            }
            let mut config = Run::saved_config(dir)?;
            self.apply(&mut config)?;
            config.validate()?;
            return Ok(Plan {
                config,
                run_dir: dir.clone(),
                resume: true,
                follows_rank0: false,
            });
        }
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--config {}: cannot read", path.display()))?;
                RunConfig::from_toml(&text)
                    .with_context(|| format!("--config {}", path.display()))?
            }
            None => RunConfig::default(),
        };
        self.apply(&mut config)?;
        config.validate()?;
        let run_dir = self.run_dir.clone().unwrap_or_else(|| {
            let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace([':', '-'], "");
            PathBuf::from("runs").join(format!(
                "{}-{}-{stamp}",
                config.optim.method, config.data.dataset
            ))
        });
        if config.data.dataset == DatasetKind::Folder {
            // Saved resolved: beside the run, so the next run in the same folder finds it.
            config
                .data
                .image_size
                .get_or_insert(sid_data::DEFAULT_IMAGE_SIZE);
            let parent = run_dir.parent().unwrap_or(std::path::Path::new(""));
            config
                .data
                .cache_dir
                .get_or_insert_with(|| parent.join("image-cache"));
        }
        Ok(Plan {
            config,
            run_dir,
            resume: false,
            follows_rank0: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn predict_exit_threshold_is_one_of_evals_and_full_is_the_cascade() {
        assert!(EVAL_EXIT_CONFIDENCES
            .split(',')
            .any(|t| t == DEFAULT_EXIT_CONFIDENCE));
        use sid_train::predict::ExitAt;
        assert_eq!(parse_exit("full"), Ok(ExitAt::Last));
        assert_eq!(parse_exit("0.75"), Ok(ExitAt::Confidence(0.75)));
        for bad in ["0", "1.5", "nan", "x"] {
            assert!(parse_exit(bad).is_err(), "{bad}");
        }
    }

    /// Every saved setting reads, in messages, as a flag that exists.
    #[test]
    fn every_config_key_names_a_real_flag() {
        let mut all = RunConfig::default();
        all.data.data_dir = Some("d".into());
        all.data.image_size = Some(8);
        all.data.cache_dir = Some("c".into());
        all.data.limit_train = Some(1);
        all.data.augment = Some(true);
        all.runtime.threads = Some(1);
        all.runtime.micro_batches = Some(1);
        all.runtime.placement = Some("p".into());
        all.runtime.cuda_graph = Some(true);
        let cmd = Cli::command();
        let keys = all.keys();
        assert!(keys.len() >= 32, "{keys:?}");
        for key in keys {
            let flag = sid_train::config::flag_of(&key);
            assert!(
                cmd.get_arguments()
                    .any(|a| a.get_long().map(|l| format!("--{l}")) == Some(flag.clone())),
                "{key}: {flag} is not a flag"
            );
        }
    }

    /// The defaults written in `--help` are RunConfig's.
    #[test]
    fn help_defaults_match_run_config() {
        let d = RunConfig::default();
        let cmd = Cli::command();
        let help = |flag: &str| {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap();
            arg.get_help().unwrap().to_string()
        };
        let expect = [
            ("gpus", d.runtime.gpus.to_string()),
            ("method", d.optim.method.to_string()),
            ("dataset", d.data.dataset.to_string()),
            ("model", d.model.extractor.to_string()),
            ("modules", d.model.modules.to_string()),
            ("feature-dim", d.model.feature_dim.to_string()),
            ("module-hidden", d.model.module_hidden.to_string()),
            ("init", d.model.init.to_string()),
            ("precision", d.model.precision.to_string()),
            ("alpha", d.optim.alpha.to_string()),
            ("label-smoothing", d.optim.label_smoothing.to_string()),
            ("epochs", d.optim.epochs.to_string()),
            ("batch-size", d.optim.batch_size.to_string()),
            ("lr", d.optim.lr.to_string()),
            ("seed", d.optim.seed.to_string()),
            ("label-noise", d.data.label_noise.to_string()),
            ("val-split", d.data.val_split.to_string()),
            ("eval-batch-size", d.runtime.eval_batch_size.to_string()),
            ("step-timeout", d.runtime.step_timeout.to_string()),
            ("stages", d.model.stages.to_string()),
            ("data-parallel", d.runtime.data_parallel.to_string()),
            ("pipeline-schedule", d.runtime.pipeline_schedule.to_string()),
        ];
        for (flag, value) in expect {
            assert!(
                help(flag).contains(&format!("[default: {value}]")),
                "--{flag}: {} vs {value}",
                help(flag)
            );
        }
    }
}
