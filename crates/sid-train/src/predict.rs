//! Predictions of a saved run for image files: the class, its probability and the module of
//! the belief cascade the image left at.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sid_core::{Method, Network};
use sid_data::{DatasetKind, InputSpec};
use tch::{Device, Tensor};

use crate::checkpoint::INPUT_FILE;
use crate::{Result, RunConfig, TrainError};

/// Where an image leaves the cascade.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExitAt {
    /// At the first module whose belief's top probability reaches this threshold (the last
    /// module takes the rest), as `sid-launch eval` measures it.
    Confidence(f64),
    /// At the last module: the full cascade.
    Last,
}

/// One image's prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The predicted label.
    pub label: i64,
    /// Its class name, when the run's data set has names.
    pub class: Option<String>,
    /// The top probability of the belief the prediction was read from.
    pub confidence: f64,
    /// The module that belief came from, 1-based.
    pub exit_module: i64,
}

/// A saved run, ready to classify images: its config, its network with the checkpoint loaded,
/// and what its inputs must be made into.
pub struct Predictor {
    /// The run's saved config, as loaded (on `gpus`, when given).
    pub cfg: RunConfig,
    net: Box<dyn Network>,
    /// What input images are made into, and the class names.
    pub spec: InputSpec,
}

impl Predictor {
    /// Opens the run in `dir` (its `config.toml`, `input.json` and checkpoint) on `gpus` if
    /// given, else on the saved device list. A run from before `input.json` existed takes a
    /// built-in data set's published statistics, or loads its folder data set once to
    /// compute them as training did.
    pub fn open(dir: &Path, gpus: Option<&str>) -> Result<Self> {
        let cfg = crate::eval::saved_config_on(dir, gpus)?;
        let spec = input_spec(dir, &cfg)?;
        let net = crate::eval::load_network(dir, &cfg, spec.shape)?;
        Ok(Self { cfg, net, spec })
    }

    /// The device the network takes its inputs on.
    pub fn device(&self) -> Device {
        self.net.input_device()
    }

    /// Reads every file first (an unreadable or non-image file is an error naming it, before
    /// any prediction), then classifies them in batches of `batch_size`, in order.
    pub fn predict_files(
        &mut self,
        files: &[PathBuf],
        exit: ExitAt,
        batch_size: usize,
    ) -> Result<Vec<Prediction>> {
        let images: Result<Vec<_>, _> = files.iter().map(|f| self.spec.image(f)).collect();
        let mut out = Vec::with_capacity(files.len());
        for chunk in images?.chunks(batch_size.max(1)) {
            let x = Tensor::f_cat(chunk, 0).map_err(sid_core::CoreError::from)?;
            out.extend(self.predict(&x, exit)?);
        }
        Ok(out)
    }

    /// Classifies a batch of inputs `[B, C, H, W]` (as [`InputSpec::image`] makes them). A
    /// backprop network's earlier modules are not trained as classifiers: it always answers
    /// from the last.
    pub fn predict(&mut self, x: &Tensor, exit: ExitAt) -> Result<Vec<Prediction>> {
        let x = x.to_device(self.net.input_device());
        let e = match (self.cfg.optim.method, exit) {
            (Method::Sid, ExitAt::Confidence(tau)) => self.net.cascade_exit(&x, tau)?,
            // No belief's confidence exceeds ∞: every sample leaves at the last module.
            _ => sid_core::early_exit(&self.net.cascade(&x)?.logits, f64::INFINITY),
        };
        let labels = to_vec::<i64>(&e.prediction)?;
        let exits = to_vec::<i64>(&e.exit_module)?;
        let conf = to_vec::<f64>(&e.confidence)?;
        Ok((labels.into_iter().zip(exits).zip(conf))
            .map(|((label, exit_module), confidence)| Prediction {
                label,
                // A label is a class index (argmax), never negative.
                class: self.spec.classes.get(label as usize).cloned(),
                confidence,
                exit_module,
            })
            .collect())
    }
}

/// The values of `t` on the CPU, as `T`.
fn to_vec<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let t = t.to_device(Device::Cpu).to_kind(T::KIND);
    Ok(Vec::<T>::try_from(&t).map_err(sid_core::CoreError::from)?)
}

/// The run's `input.json`; for runs from before it, a built-in data set's fixed values or
/// those of the folder data set loaded again.
fn input_spec(dir: &Path, cfg: &RunConfig) -> Result<InputSpec> {
    let (path, kind) = (dir.join(INPUT_FILE), cfg.data.dataset);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: unreadable ({e})", path.display()))),
        Err(e) if e.kind() == ErrorKind::NotFound => match (kind.shape(), kind.mean_std()) {
            (Some(shape), Some((mean, std))) if kind != DatasetKind::Folder => Ok(InputSpec {
                shape,
                mean: mean.to_vec(),
                std: std.to_vec(),
                classes: kind.class_names().iter().map(|c| c.to_string()).collect(),
            }),
            _ => Ok(crate::trainer::load_data(cfg)?.spec),
        },
        Err(e) => Err(TrainError::io(path, e)),
    }
}
