//! The resolved settings of a run, saved as `config.toml` in the run directory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sid_core::{ExtractorKind, LossConfig, Method, ModelConfig};
use sid_data::{DatasetKind, Shape};

use crate::devices::DeviceList;
use crate::{Result, TrainError};

/// The `--help` heading of the settings a resumed run may change: the one declaration of
/// which they are (the resume check, its message and the help all read it). Everything else
/// shapes the model, the data or the arithmetic, and must stay as saved. A staged run's
/// placement is its cut, part of its model: it may change only in the paper mode.
pub const RESUMABLE: &str = "Settings a resume may change";

/// Everything that defines a run, declared once: each field is a `sid-launch` flag (its doc
/// comment the flag's help, its default the flag's default) and a key of `config.toml`, whose
/// sections are tables (`[model]`, `[data]`, `[optim]`, `[runtime]`). Defaults are the
/// reference code's settings on Fashion-MNIST. Files of the older flat layout (every key at the
/// top) still load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The network: backbone, belief modules, stages, arithmetic.
    #[command(flatten)]
    pub model: ModelSection,
    /// The data set and what is done to it before training.
    #[command(flatten)]
    pub data: DataSection,
    /// The objective and the optimiser: method, loss, epochs, batches, learning rate, seed.
    #[command(flatten)]
    pub optim: OptimSection,
    /// How the run executes: devices, pipeline, schedules and timeouts.
    #[command(flatten)]
    pub runtime: RuntimeSection,
}

/// `[model]`: the network's shape. None of it may change on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Feature extractor: cnn (reference SimpleCNN), mlp, vgg11 (VGG-11 with BatchNorm),
    /// resnet18 or vit-tiny.
    #[arg(long = "model", default_value_t = ModelConfig::default().extractor)]
    pub extractor: ExtractorKind,
    /// Number of belief modules L.
    #[arg(long, default_value_t = ModelConfig::default().modules)]
    pub modules: usize,
    /// Feature dimension d.
    #[arg(long, default_value_t = ModelConfig::default().feature_dim)]
    pub feature_dim: i64,
    /// Hidden width of each belief module.
    #[arg(long, default_value_t = ModelConfig::default().module_hidden)]
    pub module_hidden: i64,
    /// Weight initialisation: pytorch (the reference's nn.Linear/nn.Conv2d defaults) or
    /// kaiming (tch's default, weights ≈ 2.45× larger).
    #[arg(long, default_value_t = ModelConfig::default().init)]
    pub init: sid_core::Init,
    /// Arithmetic of the forward passes: fp32, or bf16 (bfloat16 autocast; weights, Adam state
    /// and losses stay fp32; CUDA devices only).
    #[arg(long, default_value_t = ModelConfig::default().precision)]
    pub precision: sid_core::Precision,
    /// Staged SID: cut the backbone into K consecutive stages, each with a neck and a block of
    /// modules trained by their own local losses only; one stage per device in --gpus (or all
    /// on one device). 1 = the paper's SID.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Start the backbone from a reference model's weights: a safetensors file of
    /// torchvision's resnet18 or vgg11_bn, or timm's vit_tiny_patch16_224 at the run's image
    /// and patch size, under their own names (docs/interop.md). The neck and the belief
    /// modules start fresh.
    #[arg(long, value_name = "FILE.safetensors")]
    pub init_from: Option<PathBuf>,
}

/// `[data]`: which data, where it is, and how the training set is cut and changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Data set: fashion-mnist, mnist, cifar10, cifar100, or folder (your own PNG / JPEG
    /// images in DATA_DIR/train/CLASS/ and test/ or val/, or Tiny-ImageNet's layout).
    #[arg(long, default_value_t = DatasetKind::FashionMnist)]
    pub dataset: DatasetKind,
    /// Folder with the data set's files (default: the data set's usual location).
    #[arg(long, help_heading = RESUMABLE)]
    pub data_dir: Option<PathBuf>,
    /// --dataset folder: side length the images are resized to (default: 32).
    #[arg(long, value_name = "N")]
    pub image_size: Option<i64>,
    /// --dataset folder: where the decoded images are cached, so later runs skip decoding
    /// (default: image-cache/ beside the run directory).
    #[arg(long, value_name = "DIR", help_heading = RESUMABLE)]
    pub cache_dir: Option<PathBuf>,
    /// The shape of the loaded data, which the model is built for; set by the trainer after
    /// loading (a `folder` data set's shape is known only then), never saved.
    #[serde(skip)]
    #[arg(skip)]
    pub loaded_shape: Option<Shape>,
    /// Fraction of training labels flipped to another class (symmetric noise).
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f64,
    /// Use only the first N training samples.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Evaluate on only the first N test samples (a quick run's evaluation); training is
    /// unchanged.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// Fraction of the training set held out for validation.
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
    /// Random crop + flip on training batches (default: on for CIFAR only; --no-augment
    /// turns it off).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub augment: Option<bool>,
}

/// `[optim]`: what is minimised and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// Training method: sid or bp.
    #[arg(long, default_value_t = Method::Sid)]
    pub method: Method,
    /// Weight α of the label term of the local loss.
    #[arg(long, default_value_t = LossConfig::default().alpha)]
    pub alpha: f64,
    /// Label smoothing ε of the SID target.
    #[arg(long, default_value_t = LossConfig::default().label_smoothing)]
    pub label_smoothing: f64,
    /// Training epochs.
    #[arg(long, default_value_t = 5, help_heading = RESUMABLE)]
    pub epochs: usize,
    /// Training batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// The backbone's own learning rate (its blocks; not the necks, head or modules), to
    /// fine-tune a pretrained backbone (--init-from) slower than the rest; 0 freezes it
    /// [default: --lr].
    #[arg(long, value_name = "LR")]
    pub backbone_lr: Option<f64>,
    /// Seed for initialisation, data order, augmentation and label noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `[runtime]`: where and how the steps run. These settings give the same training up to
/// float rounding, which is why most of them may change on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// Devices: cpu, cpu:4 (4 CPU devices), 0, 0,1,2,3, or 0,0,0,0 (streams on one GPU).
    #[arg(long, default_value_t = DeviceList::default(), help_heading = RESUMABLE)]
    pub gpus: DeviceList,
    /// libtorch intra-op threads (default: libtorch's choice; with several CPU stages, the
    /// cores split among them). Saved, so that a resumed run reduces in the same order.
    #[arg(long, help_heading = RESUMABLE)]
    pub threads: Option<i32>,
    /// Data-parallel replicas R of the pipeline, one process per replica and stage (world =
    /// R × stages; launch with --nproc-per-node or torchrun): each takes a disjoint shard of
    /// every batch; each stage's gradients are summed over its replicas.
    #[arg(long, value_name = "R", default_value_t = 1, help_heading = RESUMABLE)]
    pub data_parallel: usize,
    /// Micro-batches per step: each stage accumulates their gradients and steps once; stages
    /// work on different micro-batches at the same time (default: 4 for staged SID on CPU
    /// stages without BatchNorm, else 1; for --method bp with --stages K, the largest divisor
    /// of the batch up to 2K). The paper mode (--stages 1, several devices) with M > 1 runs
    /// its extractor as a stage that forwards micro-batch j+1 while the modules work on j.
    #[arg(long, help_heading = RESUMABLE)]
    pub micro_batches: Option<usize>,
    /// Schedule of a backprop pipeline (--method bp --stages K): 1f1b, gpipe, or zb1 (zero
    /// bubble ZB-H1: each backward split into its input and weight halves, the weight halves
    /// postponed into 1F1B's bubble).
    #[arg(long, default_value_t = sid_runtime::BpSchedule::OneFOneB)]
    pub pipeline_schedule: sid_runtime::BpSchedule,
    /// Paper mode (several devices, one stage): module blocks per device, 0:0-1,1:2-4 (device
    /// position:first-last module, 0-based; default: as even as possible). Staged runs: auto
    /// (the even cut unless timing each block finds one 20% faster; the default), even, or
    /// blocks=0-1,2-3;modules=0-4,5-9 (0-based ranges, one per stage). A staged run's cut is
    /// part of its model.
    #[arg(long, help_heading = RESUMABLE)]
    pub placement: Option<String>,
    /// Seconds to wait for any stage before the run fails.
    #[arg(long, default_value_t = 300.0, help_heading = RESUMABLE)]
    pub step_timeout: f64,
    /// Run every GPU stage on the default CUDA stream instead of its own.
    #[arg(long = "no-streams", action = clap::ArgAction::SetFalse, help_heading = RESUMABLE)]
    pub streams: bool,
    /// SID's fused schedule: each module's local-step forward, detached, is the next module's
    /// teacher — the same result as the reference schedule with one forward per module fewer.
    #[arg(long, help_heading = RESUMABLE)]
    pub fused_teacher: bool,
    /// Capture a training step as a CUDA graph after a few warm-up steps and replay it: one
    /// launch instead of hundreds of small kernels per step, same computation. One GPU, or
    /// staged SID with a GPU per stage and one micro-batch (each stage its own graph; not yet
    /// run on a GPU) (default: on when --gpus names exactly one GPU; --no-cuda-graph turns it
    /// off).
    #[arg(long, num_args = 0, default_missing_value = "true", help_heading = RESUMABLE)]
    pub cuda_graph: Option<bool>,
    /// Batch size for evaluation.
    #[arg(long, default_value_t = 1000, help_heading = RESUMABLE)]
    pub eval_batch_size: i64,
    /// Write TensorBoard event files to DIR during the run: each step's train loss, and per
    /// epoch every module's test accuracy, samples/s, peak memory and the learning rate.
    #[arg(long, value_name = "DIR", help_heading = RESUMABLE)]
    pub tensorboard: Option<PathBuf>,
    /// Also write the checkpoint every N training steps (with the position inside the epoch,
    /// so a resume from it equals the uninterrupted run), not only at the end of each epoch.
    #[arg(long, value_name = "N", help_heading = RESUMABLE)]
    pub checkpoint_every: Option<usize>,
    /// Keep the last K checkpoints: `checkpoint.safetensors` is the newest, the older ones
    /// `checkpoint-E<epoch>-S<step>.safetensors`.
    #[arg(long, value_name = "K", default_value_t = 1, help_heading = RESUMABLE)]
    pub keep_checkpoints: usize,
    /// Inject a fault WORKER:STEP:panic|error|nan|hang|kill (for testing failure handling;
    /// only builds with the fault-injection feature accept it); sid-launch also takes a
    /// comma-separated list of faults each ending in @RESTART, the restart it strikes in (0:
    /// the first start). Never saved.
    #[serde(skip)]
    #[arg(long, hide = true)]
    pub inject_fault: Option<String>,
}

/// A section's defaults: its flags parsed from an empty command line.
fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("sid").no_binary_name(true));
    T::from_arg_matches(&cmd.get_matches_from(std::iter::empty::<String>()))
        .expect("every setting has a default")
}

macro_rules! default_from_flags {
    ($($t:ty),*) => {
        $(impl Default for $t {
            fn default() -> Self {
                defaults()
            }
        })*
    };
}
default_from_flags!(ModelSection, DataSection, OptimSection, RuntimeSection);

/// Each setting's flag, with its section of `config.toml`.
fn flags() -> Vec<(&'static str, clap::Arg)> {
    use clap::Args as _;
    let cmd = || clap::Command::new("sid");
    let sections = [
        ("model", ModelSection::augment_args(cmd())),
        ("data", DataSection::augment_args(cmd())),
        ("optim", OptimSection::augment_args(cmd())),
        ("runtime", RuntimeSection::augment_args(cmd())),
    ];
    let args = |(section, cmd): (_, clap::Command)| -> Vec<_> {
        cmd.get_arguments().map(|a| (section, a.clone())).collect()
    };
    sections.into_iter().flat_map(args).collect()
}

/// The section of the setting whose flag has id `id` (the field's name).
fn section_of(id: &str) -> Option<&'static str> {
    let (section, _) = flags().into_iter().find(|(_, a)| a.get_id() == id)?;
    Some(section)
}

/// The settings (`section.key`) a resumed run may change: those under [`RESUMABLE`].
pub fn resume_may_change() -> Vec<String> {
    flags()
        .into_iter()
        .filter(|(_, a)| a.get_help_heading() == Some(RESUMABLE))
        .map(|(section, a)| format!("{section}.{}", a.get_id()))
        .collect()
}

/// The flags of [`resume_may_change`], as a sentence's list.
pub fn resume_may_change_flags() -> String {
    let flags: Vec<String> = resume_may_change()
        .iter()
        .map(|k| match k.as_str() {
            "runtime.placement" => "--placement (paper mode only)".to_string(),
            "runtime.cuda_graph" => "--cuda-graph/--no-cuda-graph".to_string(),
            _ => flag_of(k),
        })
        .collect();
    let (last, rest) = flags.split_last().expect("a non-empty list");
    format!("{} and {last}", rest.join(", "))
}

/// The flag that sets a `config.toml` key (`section.key`), from its declaration.
pub fn flag_of(key: &str) -> String {
    let (section, id) = key.split_once('.').unwrap_or(("", key));
    flags()
        .into_iter()
        .find(|(s, a)| *s == section && a.get_id() == id)
        .and_then(|(_, a)| a.get_long().map(|l| format!("--{l}")))
        .unwrap_or_else(|| format!("--{}", id.replace('_', "-")))
}

/// A TOML error as a setting error.
fn toml_error(e: toml::de::Error) -> TrainError {
    TrainError::Config(e.message().to_string())
}

/// The table of `section` in a document of sections, made if missing.
fn section_mut<'a>(doc: &'a mut toml::Table, section: &str) -> &'a mut toml::Table {
    doc.entry(section)
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .expect("a section is a table")
}

/// A document of the flat layout `config.toml` had before the sections (every setting a
/// top-level key, the backbone as `model`), sorted into its sections.
fn from_flat(doc: toml::Table) -> Result<RunConfig> {
    let mut sectioned = toml::Table::new();
    for (key, value) in doc {
        let id = if key == "model" { "extractor" } else { &key };
        let section =
            section_of(id).ok_or_else(|| TrainError::Config(format!("unknown field `{key}`")))?;
        section_mut(&mut sectioned, section).insert(id.to_string(), value);
    }
    toml::Value::Table(sectioned).try_into().map_err(toml_error)
}

impl RunConfig {
    /// Takes the settings whose flag ids are `given` (flags typed on the command line) from
    /// `flags` (all flags parsed, defaults where absent), over what `self` holds: defaults <
    /// a config file or a saved run < flags.
    pub fn take_given(&mut self, flags: &RunConfig, given: &[String]) -> Result<()> {
        let (mut base, theirs) = (self.table(), flags.table());
        for (section, id) in given.iter().filter_map(|id| Some((section_of(id)?, id))) {
            let value = theirs.get(section).and_then(|t| t.get(id)).cloned();
            let table = section_mut(&mut base, section);
            match value {
                Some(v) => table.insert(id.to_string(), v),
                None => table.remove(id),
            };
        }
        let mut merged: RunConfig = toml::Value::Table(base).try_into().map_err(toml_error)?;
        // Never saved, so not in the tables.
        merged.data.loaded_shape = self.data.loaded_shape;
        let fault_given = given.iter().any(|g| g == "inject_fault");
        let fault_from = if fault_given { flags } else { &*self };
        merged.runtime.inject_fault = fault_from.runtime.inject_fault.clone();
        *self = merged;
        Ok(())
    }

    /// Parses a TOML document, sectioned or in the older flat layout (a document with no
    /// table is flat); unknown keys are errors so that typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<Self> {
        let doc: toml::Table = toml::from_str(text).map_err(toml_error)?;
        if doc.values().any(toml::Value::is_table) {
            toml::from_str(text).map_err(toml_error)
        } else {
            from_flat(doc)
        }
    }

    /// The TOML form written to `config.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// The network shape this config asks for, for the data shape the model is built for: the
    /// loaded data's, else the built-in data set's; for a `folder` data set not loaded yet, a
    /// provisional one (3 channels, the image size, 2 classes) against which the other
    /// settings can already be checked.
    pub fn model_config(&self) -> ModelConfig {
        let provisional = Shape {
            channels: 3,
            image_size: self.data.image_size.unwrap_or(sid_data::DEFAULT_IMAGE_SIZE),
            num_classes: 2,
        };
        let known = self.data.loaded_shape.or_else(|| self.data.dataset.shape());
        let shape = known.unwrap_or(provisional);
        ModelConfig {
            extractor: self.model.extractor,
            in_channels: shape.channels,
            image_size: shape.image_size,
            num_classes: shape.num_classes,
            feature_dim: self.model.feature_dim,
            modules: self.model.modules,
            module_hidden: self.model.module_hidden,
            init: self.model.init,
            precision: self.model.precision,
        }
    }

    /// The local-loss settings.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            alpha: self.optim.alpha,
            label_smoothing: self.optim.label_smoothing,
        }
    }

    /// Whether training batches are augmented.
    pub fn resolved_augment(&self) -> bool {
        self.data
            .augment
            .unwrap_or_else(|| self.data.dataset.augments_by_default())
    }

    /// The settings (`section.key`) that differ from `saved` and may not change on a resume.
    pub fn resume_conflicts(&self, saved: &RunConfig) -> Vec<String> {
        let staged = saved.model.stages > 1;
        let may = resume_may_change();
        self.changed_from(saved)
            .into_iter()
            .filter(|k| !may.contains(k) || (staged && k == "runtime.placement"))
            .collect()
    }

    /// The settings as `config.toml` holds them: a table per section.
    fn table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("a RunConfig serialises to a table")
    }

    /// Every saved setting under its `section.key` (unset optional ones are not saved).
    fn settings(&self) -> toml::Table {
        let mut flat = toml::Table::new();
        for (section, keys) in self.table() {
            if let toml::Value::Table(keys) = keys {
                flat.extend(keys.into_iter().map(|(k, v)| (format!("{section}.{k}"), v)));
            }
        }
        flat
    }

    /// The `section.key` of every setting saved in `config.toml` (unset optional ones are not
    /// saved).
    pub fn keys(&self) -> Vec<String> {
        self.settings().keys().cloned().collect()
    }

    /// Names (`section.key`) of the settings whose values differ between `self` and `other`.
    pub fn changed_from(&self, other: &RunConfig) -> Vec<String> {
        let (a, b) = (self.settings(), other.settings());
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let changed = keys.into_iter().filter(|k| a.get(*k) != b.get(*k));
        changed.cloned().collect()
    }

    /// Checks every value; the message names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.optim.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.optim.batch_size < 1 || self.runtime.eval_batch_size < 1 {
            return bad("batch sizes must be at least 1".into());
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.optim.lr));
        }
        let backbone_lr = self.optim.backbone_lr.unwrap_or(0.0);
        if !(backbone_lr >= 0.0 && backbone_lr.is_finite()) {
            return bad(format!(
                "backbone-lr must be 0 (frozen) or positive, got {backbone_lr}"
            ));
        }
        let (noise, val) = (self.data.label_noise, self.data.val_split);
        if !(0.0..=1.0).contains(&noise) {
            return bad(format!("label noise must be in [0, 1], got {noise}"));
        }
        if !(0.0..1.0).contains(&val) {
            return bad(format!("val split must be in [0, 1), got {val}"));
        }
        if matches!(self.runtime.threads, Some(n) if n < 1) {
            return bad("threads must be at least 1".into());
        }
        if self.data.limit_train == Some(0) {
            return bad("limit-train must be at least 1".into());
        }
        if self.data.limit_test == Some(0) {
            return bad("limit-test must be at least 1".into());
        }
        match (self.data.image_size, self.data.dataset) {
            (Some(_), kind) if kind != DatasetKind::Folder => {
                return bad(format!(
                    "image size applies to --dataset folder only ({kind} images have a fixed size)"
                ));
            }
            // Below 4 the SimpleCNN's two 2x2 poolings leave nothing.
            (Some(s), _) if !(4..=1024).contains(&s) => {
                return bad(format!("image size must be in 4..=1024, got {s}"));
            }
            _ => {}
        }
        if self.runtime.checkpoint_every == Some(0) || self.runtime.keep_checkpoints == 0 {
            return bad("--checkpoint-every and --keep-checkpoints must be at least 1".into());
        }
        let timeout = self.runtime.step_timeout;
        if !(timeout > 0.0 && timeout.is_finite()) {
            return bad(format!("step timeout must be positive, got {timeout}"));
        }
        self.model_config().validate()?;
        self.loss_config().validate()?;
        if let Some(f) = &self.runtime.inject_fault {
            #[cfg(feature = "fault-injection")]
            sid_runtime::Fault::parse(f)?;
            #[cfg(not(feature = "fault-injection"))]
            return bad(format!(
                "--inject-fault {f}: this build has no fault injection (a test feature; rebuild with --features fault-injection)"
            ));
        }
        Ok(())
    }
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

    fn gpus(spec: &str) -> DeviceList {
        spec.parse().unwrap()
    }

    #[test]
    fn resume_may_change_only_the_listed_settings() {
        let saved = RunConfig::default();
        assert!(with(|c| c.optim.epochs = 9)
            .resume_conflicts(&saved)
            .is_empty());
        assert!(with(|c| c.runtime.gpus = gpus("cpu:2"))
            .resume_conflicts(&saved)
            .is_empty());
        assert!(with(|c| c.runtime.placement = Some("0:0-9".into()))
            .resume_conflicts(&saved)
            .is_empty());
        assert_eq!(
            with(|c| c.model.modules = 3).resume_conflicts(&saved),
            ["model.modules"]
        );
        assert_eq!(
            with(|c| c.model.init = sid_core::Init::Kaiming).resume_conflicts(&saved),
            ["model.init"]
        );
        // A staged run's cut is part of its model.
        let staged = with(|c| {
            c.model.stages = 2;
            c.runtime.placement = Some("blocks=0-1,2-3;modules=0-4,5-9".into());
        });
        let mut moved = staged.clone();
        moved.runtime.placement = Some("blocks=0,1-3;modules=0-4,5-9".into());
        assert_eq!(moved.resume_conflicts(&staged), ["runtime.placement"]);
        assert!(resume_may_change_flags().ends_with("and --keep-checkpoints"));
    }

    /// Every key of the list is a real `section.key` of `config.toml`, and each conflict
    /// reads as the flag that sets it.
    #[test]
    fn resume_keys_are_config_keys_and_read_as_flags() {
        let all = with(|c| {
            c.data.data_dir = Some("d".into());
            c.data.cache_dir = Some("c".into());
            c.runtime.threads = Some(1);
            c.runtime.micro_batches = Some(1);
            c.runtime.placement = Some("p".into());
            c.runtime.cuda_graph = Some(false);
            c.runtime.checkpoint_every = Some(5);
            c.runtime.tensorboard = Some("tb".into());
        });
        let keys = all.keys();
        for key in resume_may_change() {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        assert_eq!(flag_of("optim.alpha"), "--alpha");
        assert_eq!(flag_of("model.extractor"), "--model");
        assert_eq!(flag_of("data.label_noise"), "--label-noise");
    }

    #[test]
    fn defaults_are_the_reference_settings() {
        let c = RunConfig::default();
        assert_eq!(
            (
                c.model.modules,
                c.model.feature_dim,
                c.model.module_hidden,
                c.optim.batch_size
            ),
            (10, 128, 256, 128)
        );
        assert_eq!(
            (c.optim.alpha, c.optim.lr, c.optim.method),
            (0.5, 1e-3, Method::Sid)
        );
        assert_eq!(c.data.dataset, DatasetKind::FashionMnist);
        c.validate().unwrap();
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c = with(|c| {
            c.model.modules = 5;
            c.data.label_noise = 0.2;
            c.data.limit_train = Some(100);
        });
        let text = c.to_toml();
        for table in ["[model]", "[data]", "[optim]", "[runtime]"] {
            assert!(text.contains(table), "{text}");
        }
        assert_eq!(RunConfig::from_toml(&text).unwrap(), c);
        let partial =
            RunConfig::from_toml("[optim]\nmethod = \"bp\"\n[model]\nmodules = 3\n").unwrap();
        assert_eq!(
            (
                partial.optim.method,
                partial.model.modules,
                partial.optim.epochs
            ),
            (Method::Bp, 3, 5)
        );
        let err = RunConfig::from_toml("[model]\nmodulez = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("modulez"), "{err}");
        let err = RunConfig::from_toml("[runtime]\ngpus = \"gpu0\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither cpu nor a GPU index"), "{err}");
    }

    /// `config.toml` as the flat layout wrote it before the sections (a run of that version,
    /// every optional setting given), so that its run directories still resume.
    const FLAT_CONFIG: &str = r#"method = "sid"
dataset = "fashion-mnist"
data_dir = "data/cifar"
cache_dir = "runs/image-cache"
gpus = "cpu:2"
model = "cnn"
modules = 4
feature_dim = 128
module_hidden = 256
init = "pytorch"
precision = "fp32"
alpha = 0.5
label_smoothing = 0.0
epochs = 5
batch_size = 128
lr = 0.001
seed = 0
label_noise = 0.0
limit_train = 500
val_split = 0.0
augment = true
eval_batch_size = 1000
threads = 2
stages = 1
data_parallel = 1
micro_batches = 1
pipeline_schedule = "1f1b"
placement = "0:0-1,1:2-3"
step_timeout = 300.0
streams = true
fused_teacher = false
cuda_graph = false
"#;

    #[test]
    fn flat_config_files_of_earlier_versions_still_load() {
        let old = RunConfig::from_toml(FLAT_CONFIG).unwrap();
        let expected = with(|c| {
            c.data.data_dir = Some("data/cifar".into());
            c.data.cache_dir = Some("runs/image-cache".into());
            c.runtime.gpus = gpus("cpu:2");
            c.model.modules = 4;
            c.data.limit_train = Some(500);
            c.data.augment = Some(true);
            c.runtime.threads = Some(2);
            c.runtime.micro_batches = Some(1);
            c.runtime.placement = Some("0:0-1,1:2-3".into());
            c.runtime.cuda_graph = Some(false);
        });
        assert_eq!(old, expected);
        old.validate().unwrap();
        // Saved again, it is sectioned, and reads back the same.
        assert_eq!(RunConfig::from_toml(&old.to_toml()).unwrap(), old);
        // Every other setting of the flat layout lands in its section.
        let other = RunConfig::from_toml(
            "method = \"bp\"\nmodel = \"mlp\"\nstages = 2\nalpha = 0.3\nlabel_smoothing = 0.1\n\
             epochs = 7\nbatch_size = 64\nlr = 0.01\nseed = 4\nlabel_noise = 0.2\nval_split = 0.1\n\
             eval_batch_size = 50\ndataset = \"mnist\"\ndata_parallel = 2\n\
             pipeline_schedule = \"gpipe\"\nstep_timeout = 9.0\nstreams = false\n\
             fused_teacher = true\ninit = \"kaiming\"\nfeature_dim = 64\nmodule_hidden = 32\n\
             image_size = 16\nprecision = \"bf16\"\n",
        )
        .unwrap();
        let (m, d, o, r) = (&other.model, &other.data, &other.optim, &other.runtime);
        assert_eq!(
            (
                m.extractor,
                m.stages,
                m.init,
                m.feature_dim,
                m.module_hidden
            ),
            (ExtractorKind::Mlp, 2, sid_core::Init::Kaiming, 64, 32)
        );
        assert_eq!(m.precision, sid_core::Precision::Bf16);
        assert_eq!(
            (
                o.method,
                o.alpha,
                o.label_smoothing,
                o.epochs,
                o.batch_size,
                o.lr,
                o.seed
            ),
            (Method::Bp, 0.3, 0.1, 7, 64, 0.01, 4)
        );
        assert_eq!(
            (d.dataset, d.label_noise, d.val_split, d.image_size),
            (DatasetKind::Mnist, 0.2, 0.1, Some(16))
        );
        assert_eq!(
            (
                r.eval_batch_size,
                r.data_parallel,
                r.step_timeout,
                r.streams,
                r.fused_teacher
            ),
            (50, 2, 9.0, false, true)
        );
        assert_eq!(r.pipeline_schedule, sid_runtime::BpSchedule::GPipe);
        // A flat file's typo is still named.
        let err = RunConfig::from_toml("modulez = 3").unwrap_err().to_string();
        assert!(err.contains("modulez"), "{err}");
    }

    #[test]
    fn changed_settings_are_named() {
        let a = RunConfig::default();
        let b = with(|c| {
            c.optim.alpha = 0.3;
            c.data.limit_train = Some(10);
        });
        assert_eq!(
            a.changed_from(&b),
            vec!["data.limit_train".to_string(), "optim.alpha".to_string()]
        );
        assert!(a.changed_from(&a).is_empty());
    }

    /// Run by `cargo test -p sid-train` (feature off: refused) and by the workspace tests
    /// (the launcher's tests turn the feature on: accepted, and a bad spec still refused).
    #[test]
    fn inject_fault_needs_the_fault_injection_feature() {
        let fault = |spec: &str| with(|c| c.runtime.inject_fault = Some(spec.into()));
        let r = fault("0:3:nan").validate();
        if cfg!(feature = "fault-injection") {
            r.unwrap();
            assert!(fault("0:3:boom").validate().is_err());
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("this build has no fault injection"), "{e}");
        }
    }

    #[test]
    fn folder_image_size_and_shape() {
        let folder = with(|c| {
            c.data.dataset = DatasetKind::Folder;
            c.data.image_size = Some(16);
            c.data.cache_dir = Some("cache".into());
        });
        folder.validate().unwrap();
        // Before loading, a provisional shape; after, the data's.
        assert_eq!(folder.model_config().image_size, 16);
        let mut loaded = folder.clone();
        loaded.data.loaded_shape = Some(Shape {
            channels: 1,
            image_size: 16,
            num_classes: 7,
        });
        let m = loaded.model_config();
        assert_eq!((m.in_channels, m.image_size, m.num_classes), (1, 16, 7));
        // Saved in config.toml, except the loaded shape.
        let text = loaded.to_toml();
        assert!(
            text.contains("image_size = 16") && text.contains("cache_dir"),
            "{text}"
        );
        assert_eq!(RunConfig::from_toml(&text).unwrap(), folder);
        let m = RunConfig::default().model_config();
        assert_eq!((m.in_channels, m.image_size, m.num_classes), (1, 28, 10));
        let mut small = folder.clone();
        small.data.image_size = Some(3);
        for bad in [with(|c| c.data.image_size = Some(16)), small] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("image size"), "{e}");
        }
    }

    #[test]
    fn bf16_is_saved_and_may_not_change_on_resume() {
        let bf16 = |spec: &str| {
            with(|c| {
                c.runtime.gpus = gpus(spec);
                c.model.precision = sid_core::Precision::Bf16;
            })
        };
        let c = bf16("0");
        assert_eq!(c.model_config().precision, sid_core::Precision::Bf16);
        assert!(c.to_toml().contains("precision = \"bf16\""));
        assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
        assert!(RunConfig::default()
            .to_toml()
            .contains("precision = \"fp32\""));
        // The arithmetic of a run stays as saved.
        assert_eq!(
            c.resume_conflicts(&RunConfig::default()),
            ["model.precision"]
        );
    }

    #[test]
    fn validation_names_the_setting() {
        let c = with(|c| c.optim.alpha = 1.5);
        assert!(c.validate().unwrap_err().to_string().contains("alpha"));
        let c = with(|c| c.data.val_split = 1.0);
        assert!(c.validate().unwrap_err().to_string().contains("val split"));
        let c = with(|c| c.optim.backbone_lr = Some(-1e-4));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backbone-lr"));
        with(|c| c.optim.backbone_lr = Some(0.0))
            .validate()
            .unwrap();
    }
}
