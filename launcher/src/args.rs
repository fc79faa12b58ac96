//! Raw command-line flags, and their resolution into a validated [`RunConfig`].
//!
//! Precedence: built-in defaults < `--config FILE` < flags. With `--resume DIR` the saved
//! `DIR/config.toml` takes the place of the defaults and the config file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
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
    /// The run's settings: every one a flag and a key of config.toml, declared once in
    /// sid-train's config.
    #[command(flatten)]
    pub settings: RunConfig,
    /// Turn augmentation off.
    #[arg(long, overrides_with = "augment")]
    pub no_augment: bool,
    /// Run every step eagerly, without a CUDA graph.
    #[arg(long, overrides_with = "cuda_graph", help_heading = sid_train::config::RESUMABLE)]
    pub no_cuda_graph: bool,
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
    /// Start N processes (ranks) on this node, like torchrun: each takes one stage (or
    /// replica), the local rank's entry of --gpus or a share of the CPU cores. Rank 0 writes
    /// the run; the others serve their stages over torch.distributed (Gloo, or NCCL for the
    /// replicas' all-reduce on GPUs).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Restart the run up to R times when it fails (a rank dies, hangs past --step-timeout
    /// or fails with an error), as torchrun's --max-restarts does: every rank of this node is
    /// stopped and started again, resuming from the newest checkpoint that loads. A failure
    /// that repeats at the same point, or a disk or setting error, stops the run instead.
    /// Without --nproc-per-node the run itself is started and watched as one such rank.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub max_restarts: u32,
    /// Nodes in a multi-node job (with --nproc-per-node).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's place in a multi-node job, 0-based.
    #[arg(long, value_name = "I", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where rank 0 serves the rendezvous store.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store on node 0 (Gloo's own connections take other ports).
    #[arg(long, value_name = "PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Write a Chrome trace (JSON, opens in Perfetto / chrome://tracing) of every step's parts:
    /// each stage's micro-batches, the extractor, phase 1, each module's phase 2, waits.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Append every training step's loss to RUN_DIR/steps.jsonl (`{"epoch", "step", "loss"}`
    /// per line, the loss at full precision): a finer curve than metrics.jsonl's epochs.
    #[arg(long)]
    pub log_steps: bool,
    /// Telemetry samples per second into RUN_DIR/telemetry.jsonl (0 = off).
    #[arg(long, default_value_t = 10.0)]
    pub telemetry_hz: f64,
    /// Setting flags typed on the command line (their ids): they win over a config file or a
    /// saved run.
    #[arg(skip)]
    pub given: Vec<String>,
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
    /// Write a saved run's trained network to a safetensors file: the backbone under the
    /// reference implementation's names (torchvision resnet18 / vgg11_bn, timm ViT), the
    /// necks and belief modules under sid.*; python/sid_model.py loads it.
    Export(ExportArgs),
}

/// Flags of `sid-launch export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The run directory (its config.toml, input.json and checkpoint.safetensors).
    pub run_dir: PathBuf,
    /// The file to write.
    #[arg(value_name = "OUT.safetensors")]
    pub out: PathBuf,
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

const AFTER_HELP: &str = "Outputs in the run directory: config.toml (the resolved settings), \
plan.toml (the resolved plan: layout, cut, micro-batches), input.json (what predict needs), \
metrics.jsonl (one record per epoch), checkpoint.safetensors (after every epoch and on Ctrl-C), \
summary.json, telemetry.jsonl (unless --telemetry-hz 0), steps.jsonl (with --log-steps).";

pub use sid_train::distributed::restart_env;

/// The injected fault of restart `restart` (tests): `spec` is one fault, which strikes in every
/// restart, or a comma-separated list of `FAULT@RESTART`.
fn fault_for_restart(spec: Option<String>, restart: u32) -> Result<Option<String>> {
    let Some(spec) = spec else { return Ok(None) };
    if !spec.contains('@') {
        return Ok(Some(spec));
    }
    let mut chosen = None;
    for part in spec.split(',') {
        let Some((fault, at)) = part.split_once('@') else {
            bail!("--inject-fault {spec}: {part:?} has no @RESTART");
        };
        let at: u32 = at
            .parse()
            .map_err(|_| anyhow::anyhow!("--inject-fault {spec}: {at:?} is not a restart"))?;
        if at == restart {
            chosen.get_or_insert_with(|| fault.to_string());
        }
    }
    Ok(chosen)
}

/// What this invocation does: a new run or a resumed one, with its settings.
pub struct Invocation {
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
    /// A restart (torchrun's or `--max-restarts`') of a run that had no checkpoint yet, by its
    /// count: it starts over in the same run directory.
    pub starts_over: Option<u32>,
}

impl Cli {
    /// The command line's definition, `--resume`'s help listing what a resume may change (from
    /// the settings' declarations).
    pub fn command_with_resume_help() -> clap::Command {
        use clap::CommandFactory;
        let help = format!(
            "Continue the run in this directory from its checkpoint. Only {} may differ from its saved config.toml.",
            sid_train::config::resume_may_change_flags()
        );
        Self::command().mut_arg("resume", |a| a.help(help))
    }

    /// Parses the command line; `--resume`'s help lists what a resume may change, from the
    /// one list the resume check reads.
    pub fn parse_with_resume_help() -> Self {
        use clap::{parser::ValueSource, FromArgMatches};
        let matches = Self::command_with_resume_help().get_matches();
        let mut cli = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.given = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.to_string())
            .collect();
        cli
    }

    /// Applies the flags that were given on top of `cfg`, in restart `restart`.
    fn apply(&self, cfg: &mut RunConfig, restart: u32) -> Result<()> {
        let given = |id: &str| self.given.iter().any(|g| g == id);
        if given("gpus") && !given("placement") && cfg.model.stages <= 1 {
            // A saved paper-mode placement belongs to the saved device list (a staged run's
            // cut belongs to its model and stays).
            cfg.runtime.placement = None;
        }
        cfg.take_given(&self.settings, &self.given)?;
        cfg.runtime.inject_fault = fault_for_restart(cfg.runtime.inject_fault.take(), restart)?;
        if self.no_augment {
            cfg.data.augment = Some(false);
        }
        if self.no_cuda_graph {
            cfg.runtime.cuda_graph = Some(false);
        }
        Ok(())
    }

    /// Resolves defaults, config file, saved config and flags into what to do. `not_rank0`: this
    /// process holds no rank 0 (a rank above 0, or a launcher for a node other than node 0);
    /// resuming, it may then lack the run directory, which only rank 0 writes and reads, and
    /// follows rank 0's settings.
    pub fn invocation(&self, not_rank0: bool) -> Result<Invocation> {
        // The restart this process belongs to, 0 on the first start.
        let restart = restart_env()?.unwrap_or(0);
        let has_config = |dir: &Path| dir.join("config.toml").is_file();
        let mut starts_over = false;
        // `--resume DIR`, or a restart, which continues from the run's own newest checkpoint.
        let resume = match (&self.resume, &self.run_dir) {
            (Some(dir), _) => Some(dir),
            _ if restart == 0 => None,
            (None, None) => bail!(
                "restart {restart} (TORCHELASTIC_RESTART_COUNT) of a run without --run-dir: a restarted rank must find the run's checkpoint; give --run-dir"
            ),
            (None, Some(dir)) => {
                let checkpoint = sid_train::checkpoint::candidates(dir);
                let resumes = has_config(dir) && checkpoint.iter().any(|c| c.is_file());
                // A run restarted before its first checkpoint starts over in the same directory.
                starts_over = !resumes && (!not_rank0 || has_config(dir));
                (!starts_over).then_some(dir)
            }
        };
        // Without the run directory, every setting but this rank's placing comes from rank 0.
        let follows_rank0 = resume.is_some_and(|dir| not_rank0 && !has_config(dir));
        let mut config = match (resume, &self.config) {
            _ if follows_rank0 => RunConfig::default(),
            (Some(dir), _) if !dir.is_dir() => {
                bail!("--resume {}: no such run directory", dir.display())
            }
            (Some(dir), _) => Run::saved_config(dir)?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--config {}: cannot read", path.display()))?;
                RunConfig::from_toml(&text)
                    .with_context(|| format!("--config {}", path.display()))?
            }
            (None, None) => RunConfig::default(),
        };
        self.apply(&mut config, restart)?;
        if !follows_rank0 {
            sid_train::Plan::check(&config)?;
        }
        let run_dir = match resume {
            Some(dir) => dir.clone(),
            None => self.run_dir.clone().unwrap_or_else(|| {
                let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .replace([':', '-'], "");
                let (method, dataset) = (&config.optim.method, &config.data.dataset);
                PathBuf::from("runs").join(format!("{method}-{dataset}-{stamp}"))
            }),
        };
        if resume.is_none() && config.data.dataset == DatasetKind::Folder {
            // Saved resolved: beside the run, so the next run in the same folder finds it.
            let data = &mut config.data;
            data.image_size.get_or_insert(sid_data::DEFAULT_IMAGE_SIZE);
            let parent = run_dir.parent().unwrap_or(Path::new(""));
            data.cache_dir
                .get_or_insert_with(|| parent.join("image-cache"));
        }
        Ok(Invocation {
            config,
            run_dir,
            resume: resume.is_some(),
            follows_rank0,
            starts_over: starts_over.then_some(restart),
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

    #[test]
    fn an_injected_fault_strikes_in_the_restart_it_names() {
        let f = |s: &str, r| fault_for_restart(Some(s.into()), r).unwrap();
        assert_eq!(f("1:3:kill", 2).as_deref(), Some("1:3:kill"));
        assert_eq!(f("1:3:kill@0,0:5:kill@1", 0).as_deref(), Some("1:3:kill"));
        assert_eq!(f("1:3:kill@0,0:5:kill@1", 1).as_deref(), Some("0:5:kill"));
        assert_eq!(f("1:3:kill@0,0:5:kill@1", 2), None);
        assert!(fault_for_restart(Some("1:3:kill@x".into()), 0).is_err());
        assert!(fault_for_restart(Some("1:3:kill@0,2:2:nan".into()), 0).is_err());
    }

    /// Every saved setting reads, in messages, as a flag that exists.
    #[test]
    fn every_config_key_names_a_real_flag() {
        let mut all = RunConfig::default();
        all.data.data_dir = Some("d".into());
        all.data.image_size = Some(8);
        all.data.cache_dir = Some("c".into());
        all.data.limit_train = Some(1);
        all.data.limit_test = Some(1);
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
}
