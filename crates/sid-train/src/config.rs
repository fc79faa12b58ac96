//! The resolved settings of a run, saved as `config.toml` in the run directory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sid_core::{ExtractorKind, LossConfig, Method, ModelConfig};
use sid_data::{DatasetKind, Shape};

use crate::devices::DeviceList;
use crate::{Result, TrainError};

/// Everything that defines a run, in sections that `config.toml` writes as tables (`[model]`,
/// `[data]`, `[optim]`, `[runtime]`). Defaults are the reference code's settings on
/// Fashion-MNIST. Files of the older flat layout (every key at the top) still load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The network: backbone, belief modules, stages, arithmetic.
    pub model: ModelSection,
    /// The data set and what is done to it before training.
    pub data: DataSection,
    /// The objective and the optimiser: method, loss, epochs, batches, learning rate, seed.
    pub optim: OptimSection,
    /// How the run executes: devices, pipeline, schedules and timeouts. Most of these may
    /// change on resume (see [`RESUME_MAY_CHANGE`]).
    pub runtime: RuntimeSection,
}

/// `[model]`: the network's shape. None of it may change on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Feature extractor (`--model`): `cnn` (reference SimpleCNN), `mlp`, `vgg11`,
    /// `resnet18` or `vit-tiny`.
    pub extractor: ExtractorKind,
    /// Number of belief modules L.
    pub modules: usize,
    /// Feature dimension d.
    pub feature_dim: i64,
    /// Hidden width of each belief module.
    pub module_hidden: i64,
    /// Weight initialisation: `pytorch` (the reference's: ±1/√fan_in) or `kaiming` (tch's
    /// default, ±√(6/fan_in)).
    pub init: sid_core::Init,
    /// Arithmetic of the forward passes: `fp32`, or `bf16` (autocast; weights, Adam state and
    /// losses stay float32). bf16 runs on CUDA devices only.
    pub precision: sid_core::Precision,
    /// Stages of staged SID: the backbone cut into this many slices, each trained by its own
    /// modules' local losses (1 = the paper's SID). Each stage has its own neck, so this is
    /// part of the model.
    pub stages: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        let model = ModelConfig::default();
        Self {
            extractor: model.extractor,
            modules: model.modules,
            feature_dim: model.feature_dim,
            module_hidden: model.module_hidden,
            init: model.init,
            precision: model.precision,
            stages: 1,
        }
    }
}

/// `[data]`: which data, where it is, and how the training set is cut and changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Which data set.
    pub dataset: DatasetKind,
    /// Where its files are; `None` uses the data set's default folder.
    pub data_dir: Option<PathBuf>,
    /// Side length the images of a `folder` data set are resized to (`None`: 32); the
    /// built-in data sets have fixed sizes.
    pub image_size: Option<i64>,
    /// Where a `folder` data set's decoded images are cached; `None` decodes on every load.
    pub cache_dir: Option<PathBuf>,
    /// The shape of the loaded data, which the model is built for; set by the trainer after
    /// loading (a `folder` data set's shape is known only then), never saved.
    #[serde(skip)]
    pub loaded_shape: Option<Shape>,
    /// Fraction of training labels flipped to another class.
    pub label_noise: f64,
    /// Use only the first N training samples.
    pub limit_train: Option<usize>,
    /// Fraction of the training set held out for validation.
    pub val_split: f64,
    /// Random crop + flip; `None` = the data set's default (on for CIFAR).
    pub augment: Option<bool>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::FashionMnist,
            data_dir: None,
            image_size: None,
            cache_dir: None,
            loaded_shape: None,
            label_noise: 0.0,
            limit_train: None,
            val_split: 0.0,
            augment: None,
        }
    }
}

/// `[optim]`: what is minimised and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// `sid` or `bp`.
    pub method: Method,
    /// α of the local loss.
    pub alpha: f64,
    /// Label smoothing ε of the SID target (0 = one-hot, as the reference).
    pub label_smoothing: f64,
    /// Training epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch_size: i64,
    /// Adam learning rate.
    pub lr: f64,
    /// Seed of initialisation, data order, augmentation and label noise.
    pub seed: u64,
}

impl Default for OptimSection {
    fn default() -> Self {
        let loss = LossConfig::default();
        Self {
            method: Method::Sid,
            alpha: loss.alpha,
            label_smoothing: loss.label_smoothing,
            epochs: 5,
            batch_size: 128,
            lr: 1e-3,
            seed: 0,
        }
    }
}

/// `[runtime]`: where and how the steps run. These settings give the same training up to
/// float rounding, which is why most of them may change on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// Devices (`--gpus`): `cpu`, `cpu:4`, `0`, `0,1,2,3`, `0,0` …, parsed once.
    pub gpus: DeviceList,
    /// libtorch intra-op threads (`None` = libtorch's choice). Saved so that a resumed run
    /// computes with the same reduction order.
    pub threads: Option<i32>,
    /// Data-parallel replicas of the pipeline in a multi-process run (world = stages ×
    /// replicas): each takes a disjoint shard of every batch, and each stage's gradients are
    /// summed over its replicas before its optimiser step.
    pub data_parallel: usize,
    /// Micro-batches per step: each stage accumulates their gradients and steps once.
    /// `None` = 1 for SID (staged SID pays its pipeline fill once an epoch); for a backprop
    /// pipeline the largest divisor of the batch up to 2×stages, to keep every stage busy.
    pub micro_batches: Option<usize>,
    /// Order of a backprop pipeline's forwards and backwards: `1f1b` (holds at most K
    /// micro-batches per stage), `gpipe` (all forwards, then all backwards) or `zb1` (1F1B
    /// with each backward split, the weight halves postponed into the bubble).
    pub pipeline_schedule: sid_runtime::BpSchedule,
    /// Paper mode (one stage, several devices): module blocks per device, `0:0-1,1:2-4`
    /// (0-based, inclusive); `None` = even blocks. Staged runs: `auto` (time each block and
    /// balance), `even`, or `blocks=0-1,2-3;modules=0-4,5-9`; `None` = auto. The resolved
    /// placement is saved here; a staged run's cut is part of its model and cannot change on
    /// resume.
    pub placement: Option<String>,
    /// Longest wait, in seconds, for any worker before the run fails.
    pub step_timeout: f64,
    /// Give each GPU worker its own CUDA stream.
    pub streams: bool,
    /// Fused schedule: each module's local-step forward, detached, serves as the next
    /// module's teacher (same parameters as the reference schedule, one forward per module
    /// fewer). Off by default: the reference runs a separate graph-free phase 1.
    pub fused_teacher: bool,
    /// Capture a training step as a CUDA graph and replay it (one GPU only): the step's many
    /// small kernels then cost one launch, same computation. `None` = on whenever the run uses
    /// exactly one GPU (and the build has CUDA graphs); `Some(false)` turns it off.
    pub cuda_graph: Option<bool>,
    /// Batch size for evaluation.
    pub eval_batch_size: i64,
    /// A fault to inject, `WORKER:STEP:panic|error|nan|hang` (tests; never saved). Only builds
    /// with the `fault-injection` feature accept one; others refuse it in `validate`.
    #[serde(skip)]
    pub inject_fault: Option<String>,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            gpus: DeviceList::cpu(),
            threads: None,
            data_parallel: 1,
            micro_batches: None,
            pipeline_schedule: sid_runtime::BpSchedule::OneFOneB,
            placement: None,
            step_timeout: 300.0,
            streams: true,
            fused_teacher: false,
            cuda_graph: None,
            eval_batch_size: 1000,
            inject_fault: None,
        }
    }
}

/// The flat layout that `config.toml` had before the sections: every setting a top-level key.
/// Only read, so that runs saved then still resume; absent keys keep [`RunConfig`]'s defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FlatConfig {
    method: Option<Method>,
    dataset: Option<DatasetKind>,
    data_dir: Option<PathBuf>,
    image_size: Option<i64>,
    cache_dir: Option<PathBuf>,
    gpus: Option<DeviceList>,
    model: Option<ExtractorKind>,
    modules: Option<usize>,
    feature_dim: Option<i64>,
    module_hidden: Option<i64>,
    init: Option<sid_core::Init>,
    precision: Option<sid_core::Precision>,
    alpha: Option<f64>,
    label_smoothing: Option<f64>,
    epochs: Option<usize>,
    batch_size: Option<i64>,
    lr: Option<f64>,
    seed: Option<u64>,
    label_noise: Option<f64>,
    limit_train: Option<usize>,
    val_split: Option<f64>,
    augment: Option<bool>,
    eval_batch_size: Option<i64>,
    threads: Option<i32>,
    stages: Option<usize>,
    data_parallel: Option<usize>,
    micro_batches: Option<usize>,
    pipeline_schedule: Option<sid_runtime::BpSchedule>,
    placement: Option<String>,
    step_timeout: Option<f64>,
    streams: Option<bool>,
    fused_teacher: Option<bool>,
    cuda_graph: Option<bool>,
}

impl From<FlatConfig> for RunConfig {
    fn from(f: FlatConfig) -> Self {
        let mut c = RunConfig::default();
        macro_rules! take {
            ($($section:ident . $field:ident = $flat:ident),* $(,)?) => {
                $( if let Some(v) = f.$flat { c.$section.$field = v; } )*
            };
        }
        take!(
            optim.method = method,
            data.dataset = dataset,
            runtime.gpus = gpus,
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
            model.stages = stages,
            runtime.data_parallel = data_parallel,
            runtime.pipeline_schedule = pipeline_schedule,
            runtime.step_timeout = step_timeout,
            runtime.streams = streams,
            runtime.fused_teacher = fused_teacher,
        );
        // Optional settings: absent is their default.
        c.data.data_dir = f.data_dir;
        c.data.image_size = f.image_size;
        c.data.cache_dir = f.cache_dir;
        c.data.limit_train = f.limit_train;
        c.data.augment = f.augment;
        c.runtime.threads = f.threads;
        c.runtime.micro_batches = f.micro_batches;
        c.runtime.placement = f.placement;
        c.runtime.cuda_graph = f.cuda_graph;
        c
    }
}

/// The settings a resumed run may change, as (key in `config.toml`, `section.key`; the flag
/// that sets it): one list that the resume check, its message and the launcher's help all
/// read. Everything else shapes the model, the data or the arithmetic, and must stay as saved.
/// `placement` may change only in the paper mode: a staged run's cut decides where its necks
/// are.
pub const RESUME_MAY_CHANGE: &[(&str, &str)] = &[
    ("optim.epochs", "--epochs"),
    ("runtime.gpus", "--gpus"),
    ("runtime.placement", "--placement (paper mode only)"),
    ("runtime.micro_batches", "--micro-batches"),
    ("runtime.data_parallel", "--data-parallel"),
    ("data.data_dir", "--data-dir"),
    ("data.cache_dir", "--cache-dir"),
    ("runtime.threads", "--threads"),
    ("runtime.step_timeout", "--step-timeout"),
    ("runtime.streams", "--no-streams"),
    ("runtime.fused_teacher", "--fused-teacher"),
    ("runtime.cuda_graph", "--cuda-graph/--no-cuda-graph"),
    ("runtime.eval_batch_size", "--eval-batch-size"),
];

/// The flags of [`RESUME_MAY_CHANGE`], as a sentence's list.
pub fn resume_may_change_flags() -> String {
    let flags: Vec<&str> = RESUME_MAY_CHANGE.iter().map(|(_, f)| *f).collect();
    let (last, rest) = flags.split_last().expect("a non-empty list");
    format!("{} and {last}", rest.join(", "))
}

/// The flag that sets a `config.toml` key (`section.key`): `--key` with dashes, except the
/// backbone (key `model.extractor`, flag `--model`) and the streams (on unless `--no-streams`).
pub fn flag_of(key: &str) -> String {
    match key {
        "model.extractor" => "--model".into(),
        "runtime.streams" => "--no-streams".into(),
        _ => {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            format!("--{}", leaf.replace('_', "-"))
        }
    }
}

impl RunConfig {
    /// Parses a TOML document, sectioned or in the older flat layout (a document with no
    /// table is flat); unknown keys are errors so that typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<Self> {
        let err = |e: toml::de::Error| TrainError::Config(e.message().to_string());
        let doc: toml::Table = toml::from_str(text).map_err(err)?;
        if doc.values().any(toml::Value::is_table) {
            toml::from_str(text).map_err(err)
        } else {
            toml::from_str::<FlatConfig>(text)
                .map(RunConfig::from)
                .map_err(err)
        }
    }

    /// The TOML form written to `config.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// The data shape the model is built for: the loaded data's, else the built-in data set's;
    /// for a `folder` data set not loaded yet, a provisional one (3 channels, the image size,
    /// 2 classes) against which the other settings can already be checked.
    pub fn data_shape(&self) -> Shape {
        self.data
            .loaded_shape
            .or_else(|| self.data.dataset.shape())
            .unwrap_or(Shape {
                channels: 3,
                image_size: self.data.image_size.unwrap_or(sid_data::DEFAULT_IMAGE_SIZE),
                num_classes: 2,
            })
    }

    /// The network shape this config asks for.
    pub fn model_config(&self) -> ModelConfig {
        let shape = self.data_shape();
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

    /// The data folder: the one given, or the data set's default.
    pub fn resolved_data_dir(&self) -> PathBuf {
        self.data
            .data_dir
            .clone()
            .unwrap_or_else(|| self.data.dataset.default_dir())
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
        self.changed_from(saved)
            .into_iter()
            .filter(|k| {
                !RESUME_MAY_CHANGE
                    .iter()
                    .any(|(key, _)| key == k && !(staged && *key == "runtime.placement"))
            })
            .collect()
    }

    /// Every saved setting under its `section.key` (unset optional ones are not saved).
    fn settings(&self) -> toml::Table {
        let mut flat = toml::Table::new();
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(self) {
            for (section, v) in t {
                match v {
                    toml::Value::Table(keys) => {
                        for (k, v) in keys {
                            flat.insert(format!("{section}.{k}"), v);
                        }
                    }
                    v => {
                        flat.insert(section, v);
                    }
                }
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
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
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
        if !(0.0..=1.0).contains(&self.data.label_noise) {
            return bad(format!(
                "label noise must be in [0, 1], got {}",
                self.data.label_noise
            ));
        }
        if !(0.0..1.0).contains(&self.data.val_split) {
            return bad(format!(
                "val split must be in [0, 1), got {}",
                self.data.val_split
            ));
        }
        if matches!(self.runtime.threads, Some(n) if n < 1) {
            return bad("threads must be at least 1".into());
        }
        if self.data.limit_train == Some(0) {
            return bad("limit-train must be at least 1".into());
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
        if !(self.runtime.step_timeout > 0.0 && self.runtime.step_timeout.is_finite()) {
            return bad(format!(
                "step timeout must be positive, got {}",
                self.runtime.step_timeout
            ));
        }
        self.model_config().validate()?;
        self.loss_config().validate()?;
        crate::plan::Plan::check(self)?;
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
        assert!(resume_may_change_flags().ends_with("and --eval-batch-size"));
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
        });
        let keys = all.keys();
        for (key, _) in RESUME_MAY_CHANGE {
            assert!(keys.contains(&key.to_string()), "{key} not in {keys:?}");
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
    fn bf16_needs_cuda_devices_and_is_saved() {
        let bf16 = |spec: &str| {
            with(|c| {
                c.runtime.gpus = gpus(spec);
                c.model.precision = sid_core::Precision::Bf16;
            })
        };
        for spec in ["cpu", "cpu:2"] {
            let e = bf16(spec).validate().unwrap_err().to_string();
            assert!(e.contains("--precision bf16 needs a CUDA device"), "{e}");
        }
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
    fn micro_batches_that_do_not_divide_the_batch_name_the_flag() {
        let c = with(|c| {
            c.runtime.micro_batches = Some(3);
            c.optim.batch_size = 64;
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--micro-batches 3 does not divide --batch-size 64"),
            "{e}"
        );
        let c = with(|c| {
            c.runtime.micro_batches = Some(4);
            c.runtime.data_parallel = 3;
            c.optim.batch_size = 64;
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("3 equal replica shards"), "{e}");
    }

    #[test]
    fn validation_names_the_setting() {
        let c = with(|c| c.optim.alpha = 1.5);
        assert!(c.validate().unwrap_err().to_string().contains("alpha"));
        let c = with(|c| c.data.val_split = 1.0);
        assert!(c.validate().unwrap_err().to_string().contains("val split"));
    }
}
