//! The resolved settings of a run, saved as `config.toml` in the run directory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sid_core::{ExtractorKind, LossConfig, Method, ModelConfig};
use sid_data::{DatasetKind, Shape};

use crate::{Result, TrainError};

/// Everything that defines a run. Defaults are the reference code's settings on Fashion-MNIST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// `sid` or `bp`.
    pub method: Method,
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
    /// Devices: `cpu`, `cpu:4`, `0`, `0,1,2,3`, `0,0` …
    pub gpus: String,
    /// Feature extractor: `cnn` (reference SimpleCNN), `mlp`, `vgg11`, `resnet18` or
    /// `vit-tiny`.
    pub model: ExtractorKind,
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
    /// Fraction of training labels flipped to another class.
    pub label_noise: f64,
    /// Use only the first N training samples.
    pub limit_train: Option<usize>,
    /// Fraction of the training set held out for validation.
    pub val_split: f64,
    /// Random crop + flip; `None` = the data set's default (on for CIFAR).
    pub augment: Option<bool>,
    /// Batch size for evaluation.
    pub eval_batch_size: i64,
    /// libtorch intra-op threads (`None` = libtorch's choice). Saved so that a resumed run
    /// computes with the same reduction order.
    pub threads: Option<i32>,
    /// Stages of staged SID: the backbone cut into this many slices, each trained by its own
    /// modules' local losses (1 = the paper's SID).
    pub stages: usize,
    /// Data-parallel replicas of the pipeline in a multi-process run (world = stages ×
    /// replicas): each takes a disjoint shard of every batch, and each stage's gradients are
    /// summed over its replicas before its optimiser step.
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// Micro-batches per step: each stage accumulates their gradients and steps once.
    /// `None` = 1 for SID (staged SID pays its pipeline fill once an epoch); for a backprop
    /// pipeline the largest divisor of the batch up to 2×stages, to keep every stage busy.
    pub micro_batches: Option<usize>,
    /// Order of a backprop pipeline's forwards and backwards: `1f1b` (holds at most K
    /// micro-batches per stage) or `gpipe` (all forwards, then all backwards).
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
    /// A fault to inject, `WORKER:STEP:panic|error|nan|hang` (tests; never saved). Only builds
    /// with the `fault-injection` feature accept one; others refuse it in `validate`.
    #[serde(skip)]
    pub inject_fault: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        let model = ModelConfig::default();
        let loss = LossConfig::default();
        Self {
            method: Method::Sid,
            dataset: DatasetKind::FashionMnist,
            data_dir: None,
            image_size: None,
            cache_dir: None,
            loaded_shape: None,
            gpus: "cpu".into(),
            model: model.extractor,
            modules: model.modules,
            feature_dim: model.feature_dim,
            module_hidden: model.module_hidden,
            init: model.init,
            precision: model.precision,
            alpha: loss.alpha,
            label_smoothing: loss.label_smoothing,
            epochs: 5,
            batch_size: 128,
            lr: 1e-3,
            seed: 0,
            label_noise: 0.0,
            limit_train: None,
            val_split: 0.0,
            augment: None,
            eval_batch_size: 1000,
            threads: None,
            stages: 1,
            data_parallel: 1,
            micro_batches: None,
            pipeline_schedule: sid_runtime::BpSchedule::OneFOneB,
            placement: None,
            step_timeout: 300.0,
            streams: true,
            fused_teacher: false,
            cuda_graph: None,
            inject_fault: None,
        }
    }
}

fn one() -> usize {
    1
}

/// The settings a resumed run may change, as (key in `config.toml`, the flag that sets it): one
/// list that the resume check, its message and the launcher's help all read. Everything else
/// shapes the model, the data or the arithmetic, and must stay as saved. `placement` may change
/// only in the paper mode: a staged run's cut decides where its necks are.
pub const RESUME_MAY_CHANGE: &[(&str, &str)] = &[
    ("epochs", "--epochs"),
    ("gpus", "--gpus"),
    ("placement", "--placement (paper mode only)"),
    ("micro_batches", "--micro-batches"),
    ("data_parallel", "--data-parallel"),
    ("data_dir", "--data-dir"),
    ("cache_dir", "--cache-dir"),
    ("threads", "--threads"),
    ("step_timeout", "--step-timeout"),
    ("streams", "--no-streams"),
    ("fused_teacher", "--fused-teacher"),
    ("cuda_graph", "--cuda-graph/--no-cuda-graph"),
    ("eval_batch_size", "--eval-batch-size"),
];

/// The flags of [`RESUME_MAY_CHANGE`], as a sentence's list.
pub fn resume_may_change_flags() -> String {
    let flags: Vec<&str> = RESUME_MAY_CHANGE.iter().map(|(_, f)| *f).collect();
    let (last, rest) = flags.split_last().expect("a non-empty list");
    format!("{} and {last}", rest.join(", "))
}

impl RunConfig {
    /// Parses a TOML document; unknown keys are errors so that typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| TrainError::Config(e.message().to_string()))
    }

    /// The TOML form written to `config.toml`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a RunConfig always serialises")
    }

    /// The data shape the model is built for: the loaded data's, else the built-in data set's;
    /// for a `folder` data set not loaded yet, a provisional one (3 channels, the image size,
    /// 2 classes) against which the other settings can already be checked.
    pub fn data_shape(&self) -> Shape {
        self.loaded_shape
            .or_else(|| self.dataset.shape())
            .unwrap_or(Shape {
                channels: 3,
                image_size: self.image_size.unwrap_or(sid_data::DEFAULT_IMAGE_SIZE),
                num_classes: 2,
            })
    }

    /// The network shape this config asks for.
    pub fn model_config(&self) -> ModelConfig {
        let shape = self.data_shape();
        ModelConfig {
            extractor: self.model,
            in_channels: shape.channels,
            image_size: shape.image_size,
            num_classes: shape.num_classes,
            feature_dim: self.feature_dim,
            modules: self.modules,
            module_hidden: self.module_hidden,
            init: self.init,
            precision: self.precision,
        }
    }

    /// The local-loss settings.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            alpha: self.alpha,
            label_smoothing: self.label_smoothing,
        }
    }

    /// The data folder: the one given, or the data set's default.
    pub fn resolved_data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dataset.default_dir())
    }

    /// Whether training batches are augmented.
    pub fn resolved_augment(&self) -> bool {
        self.augment
            .unwrap_or_else(|| self.dataset.augments_by_default())
    }

    /// Micro-batches per step, as set or by default (see [`RunConfig::micro_batches`]).
    pub fn resolved_micro_batches(&self) -> usize {
        match self.micro_batches {
            Some(m) => m,
            None if self.method == Method::Bp && self.stages > 1 => {
                let most = (2 * self.stages as i64).min(self.batch_size.max(1));
                (1..=most)
                    .rev()
                    .find(|m| self.batch_size % m == 0)
                    .unwrap_or(1) as usize
            }
            None => 1,
        }
    }

    /// Whether the run goes through the stage pipeline (several stages, or micro-batches).
    pub fn staged(&self) -> bool {
        self.stages > 1 || self.resolved_micro_batches() > 1
    }

    /// Whether training steps go through a CUDA graph: as set, or (unset) when the run uses
    /// exactly one GPU, is not staged, and this build has CUDA graphs.
    pub fn resolved_cuda_graph(&self) -> bool {
        self.cuda_graph.unwrap_or_else(|| {
            sid_core::graph::CudaGraph::available()
                && !self.staged()
                && matches!(
                    crate::devices::parse_devices(&self.gpus).as_deref(),
                    Ok([tch::Device::Cuda(_)])
                )
        })
    }

    /// The settings that differ from `saved` and may not change on a resume.
    pub fn resume_conflicts(&self, saved: &RunConfig) -> Vec<String> {
        let staged = saved.stages > 1;
        self.changed_from(saved)
            .into_iter()
            .filter(|k| {
                !RESUME_MAY_CHANGE
                    .iter()
                    .any(|(key, _)| key == k && !(staged && *key == "placement"))
            })
            .collect()
    }

    /// Names of the settings whose values differ between `self` and `other`.
    pub fn changed_from(&self, other: &RunConfig) -> Vec<String> {
        let table = |c: &RunConfig| match toml::Value::try_from(c) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::map::Map::new(),
        };
        let (a, b) = (table(self), table(other));
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
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size < 1 || self.eval_batch_size < 1 {
            return bad("batch sizes must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.label_noise) {
            return bad(format!(
                "label noise must be in [0, 1], got {}",
                self.label_noise
            ));
        }
        if !(0.0..1.0).contains(&self.val_split) {
            return bad(format!(
                "val split must be in [0, 1), got {}",
                self.val_split
            ));
        }
        if matches!(self.threads, Some(n) if n < 1) {
            return bad("threads must be at least 1".into());
        }
        if self.limit_train == Some(0) {
            return bad("limit-train must be at least 1".into());
        }
        match (self.image_size, self.dataset) {
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
        if !(self.step_timeout > 0.0 && self.step_timeout.is_finite()) {
            return bad(format!(
                "step timeout must be positive, got {}",
                self.step_timeout
            ));
        }
        self.model_config().validate()?;
        self.loss_config().validate()?;
        let devices = crate::devices::parse_devices(&self.gpus)?;
        let workers = devices.len();
        if self.precision == sid_core::Precision::Bf16 {
            if let Some(d) = devices.iter().find(|d| !matches!(d, tch::Device::Cuda(_))) {
                return bad(format!(
                    "--precision bf16 needs a CUDA device; --gpus {} puts a worker on {} (train there with --precision fp32)",
                    self.gpus,
                    crate::devices::device_name(*d)
                ));
            }
            if !self.precision.available() {
                return bad("--precision bf16: this build has no autocast (libtorch's C++ headers were not found when it was compiled; run scripts/setup.sh and rebuild)".into());
            }
        }
        let asked = self.cuda_graph == Some(true);
        if asked && !matches!(devices[..], [tch::Device::Cuda(_)]) {
            return bad(format!(
                "--cuda-graph needs exactly one GPU (--gpus N), got --gpus {}",
                self.gpus
            ));
        }
        if asked && !sid_core::graph::CudaGraph::available() {
            return bad("--cuda-graph: this build has no CUDA graphs (CUDA headers were not found when it was compiled; run scripts/setup.sh and rebuild)".into());
        }
        let micro = self.resolved_micro_batches();
        if self.stages == 0 || micro == 0 || self.data_parallel == 0 {
            return bad("--stages, --micro-batches and --data-parallel must be at least 1".into());
        }
        // (One replica: the micro-batch check below says it better.)
        if self.data_parallel > 1
            && (self.batch_size % self.data_parallel as i64 != 0
                || (self.batch_size / self.data_parallel as i64) % micro as i64 != 0)
        {
            return bad(format!(
                "--batch-size {} does not split into {} equal replica shards of {micro} equal micro-batches",
                self.batch_size, self.data_parallel
            ));
        }
        if micro as i64 > self.batch_size || self.batch_size % micro as i64 != 0 {
            return bad(format!(
                "--micro-batches {micro} does not divide --batch-size {} into equal micro-batches",
                self.batch_size
            ));
        }
        // The paper's SID on several devices takes micro-batches too, with its own placement.
        let paper = self.method == Method::Sid
            && self.stages == 1
            && self.data_parallel == 1
            && workers > 1;
        if self.staged() && !paper {
            if asked {
                return bad(
                    "--cuda-graph does not work with --stages or --micro-batches yet; leave it off"
                        .into(),
                );
            }
            let model = self.model_config();
            let core = |e: sid_core::CoreError| TrainError::Config(e.to_string());
            sid_core::StagePlan::even(&model, self.stages).map_err(core)?;
            match self.placement.as_deref() {
                None | Some("auto") | Some("even") => {}
                Some(spec) => {
                    let plan = sid_core::StagePlan::parse(spec, &model).map_err(core)?;
                    if plan.len() != self.stages {
                        return bad(format!(
                            "--placement {spec} has {} stages but --stages is {}",
                            plan.len(),
                            self.stages
                        ));
                    }
                }
            }
            if workers != 1 && workers != self.stages {
                return bad(format!(
                    "--stages {} on {workers} devices (--gpus {}): give one device (the stages then run one after another) or one per stage",
                    self.stages, self.gpus
                ));
            }
        } else if let Some(spec) = &self.placement {
            sid_runtime::Placement::parse(spec, self.modules, workers)?;
        }
        if let Some(f) = &self.inject_fault {
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

    #[test]
    fn resume_may_change_only_the_listed_settings() {
        let saved = RunConfig::default();
        let with = |f: &dyn Fn(&mut RunConfig)| {
            let mut c = saved.clone();
            f(&mut c);
            c
        };
        assert!(with(&|c| c.epochs = 9).resume_conflicts(&saved).is_empty());
        assert!(with(&|c| c.gpus = "cpu:2".into())
            .resume_conflicts(&saved)
            .is_empty());
        assert!(with(&|c| c.placement = Some("0:0-9".into()))
            .resume_conflicts(&saved)
            .is_empty());
        assert_eq!(
            with(&|c| c.modules = 3).resume_conflicts(&saved),
            ["modules"]
        );
        assert_eq!(
            with(&|c| c.init = sid_core::Init::Kaiming).resume_conflicts(&saved),
            ["init"]
        );
        // A staged run's cut is part of its model.
        let staged = with(&|c| {
            c.stages = 2;
            c.placement = Some("blocks=0-1,2-3;modules=0-4,5-9".into());
        });
        let moved = RunConfig {
            placement: Some("blocks=0,1-3;modules=0-4,5-9".into()),
            ..staged.clone()
        };
        assert_eq!(moved.resume_conflicts(&staged), ["placement"]);
        assert!(resume_may_change_flags().ends_with("and --eval-batch-size"));
    }

    #[test]
    fn cuda_graph_is_on_by_default_for_exactly_one_gpu() {
        let with = |gpus: &str, graph: Option<bool>| RunConfig {
            gpus: gpus.into(),
            cuda_graph: graph,
            ..RunConfig::default()
        };
        let built_in = sid_core::graph::CudaGraph::available();
        assert_eq!(with("0", None).resolved_cuda_graph(), built_in);
        assert_eq!(with("3", None).resolved_cuda_graph(), built_in);
        assert!(!with("0", Some(false)).resolved_cuda_graph());
        for gpus in ["cpu", "cpu:2", "0,1", "0,0"] {
            assert!(!with(gpus, None).resolved_cuda_graph(), "{gpus}");
            assert!(with(gpus, None).validate().is_ok(), "{gpus}");
            assert!(with(gpus, Some(true)).validate().is_err(), "{gpus}");
        }
    }

    #[test]
    fn defaults_are_the_reference_settings() {
        let c = RunConfig::default();
        assert_eq!(
            (c.modules, c.feature_dim, c.module_hidden, c.batch_size),
            (10, 128, 256, 128)
        );
        assert_eq!((c.alpha, c.lr, c.method), (0.5, 1e-3, Method::Sid));
        assert_eq!(c.dataset, DatasetKind::FashionMnist);
        c.validate().unwrap();
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c = RunConfig {
            modules: 5,
            label_noise: 0.2,
            limit_train: Some(100),
            ..Default::default()
        };
        assert_eq!(RunConfig::from_toml(&c.to_toml()).unwrap(), c);
        let partial = RunConfig::from_toml("method = \"bp\"\nmodules = 3\n").unwrap();
        assert_eq!(
            (partial.method, partial.modules, partial.epochs),
            (Method::Bp, 3, 5)
        );
        let err = RunConfig::from_toml("modulez = 3").unwrap_err().to_string();
        assert!(err.contains("modulez"), "{err}");
    }

    #[test]
    fn changed_settings_are_named() {
        let a = RunConfig::default();
        let b = RunConfig {
            alpha: 0.3,
            limit_train: Some(10),
            ..RunConfig::default()
        };
        assert_eq!(
            a.changed_from(&b),
            vec!["alpha".to_string(), "limit_train".to_string()]
        );
        assert!(a.changed_from(&a).is_empty());
    }

    /// Run by `cargo test -p sid-train` (feature off: refused) and by the workspace tests
    /// (the launcher's tests turn the feature on: accepted, and a bad spec still refused).
    #[test]
    fn inject_fault_needs_the_fault_injection_feature() {
        let with = |spec: &str| RunConfig {
            inject_fault: Some(spec.into()),
            ..Default::default()
        };
        let r = with("0:3:nan").validate();
        if cfg!(feature = "fault-injection") {
            r.unwrap();
            assert!(with("0:3:boom").validate().is_err());
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("this build has no fault injection"), "{e}");
        }
    }

    #[test]
    fn folder_image_size_and_shape() {
        let folder = RunConfig {
            dataset: DatasetKind::Folder,
            image_size: Some(16),
            cache_dir: Some("cache".into()),
            ..Default::default()
        };
        folder.validate().unwrap();
        // Before loading, a provisional shape; after, the data's.
        assert_eq!(folder.model_config().image_size, 16);
        let loaded = RunConfig {
            loaded_shape: Some(Shape {
                channels: 1,
                image_size: 16,
                num_classes: 7,
            }),
            ..folder.clone()
        };
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
        for bad in [
            RunConfig {
                image_size: Some(16),
                ..Default::default()
            },
            RunConfig {
                image_size: Some(3),
                ..folder.clone()
            },
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("image size"), "{e}");
        }
    }

    #[test]
    fn bf16_needs_cuda_devices_and_is_saved() {
        let bf16 = |gpus: &str| RunConfig {
            gpus: gpus.into(),
            precision: sid_core::Precision::Bf16,
            ..Default::default()
        };
        for gpus in ["cpu", "cpu:2"] {
            let e = bf16(gpus).validate().unwrap_err().to_string();
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
        assert_eq!(c.resume_conflicts(&RunConfig::default()), ["precision"]);
    }

    #[test]
    fn validation_names_the_setting() {
        let c = RunConfig {
            alpha: 1.5,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("alpha"));
        let c = RunConfig {
            val_split: 1.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("val split"));
    }
}
