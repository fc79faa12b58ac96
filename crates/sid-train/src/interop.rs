//! PyTorch interop: a run that starts from a reference backbone's weights (`--init-from`,
//! torchvision / timm names, see [`sid_core::torch_names`]), and a trained run written under
//! the same names plus its necks and belief cascade (`sid-launch export`), which
//! `python/sid_model.py` loads.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sid_core::torch_names::{self, Reference};
use sid_core::{ExtractorKind, Method, ModelConfig, Network};
use tch::Tensor;

use crate::checkpoint::{self, CHECKPOINT_FILE};
use crate::{Result, Run, RunConfig, TrainError};

/// The metadata key of an exported file (a JSON [`ExportMeta`]).
pub const EXPORT_META_KEY: &str = "sid";

/// The format an exported file declares, which `python/sid_model.py` checks.
pub const EXPORT_FORMAT: &str = "sid-export/1";

/// The prefix of every exported tensor that has no reference name: the necks, the belief
/// modules and, for backbones without a reference layout, the backbone.
pub const SID_PREFIX: &str = "sid.";

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Weights(path.into(), reason.into())
}

/// Reads a safetensors file of weights (name → tensor on the CPU). A PyTorch pickle
/// (`torch.save`), a truncated file or an unsupported dtype is refused in one line.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad(path, "file does not exist"),
        _ => TrainError::io(path, e),
    })?;
    // torch.save writes a zip archive (since PyTorch 1.6) or, before, a raw pickle.
    if bytes.starts_with(b"PK\x03\x04") || bytes.first() == Some(&0x80) {
        return Err(bad(
            path,
            "a PyTorch pickle (torch.save), not safetensors: save the state_dict with safetensors.torch.save_file(model.state_dict(), PATH)",
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        bad(
            path,
            format!("not a complete safetensors file ({e}): truncated, or another format"),
        )
    })?;
    checkpoint::tensors_of(&st, &checkpoint::KINDS, |reason| bad(path, reason))
}

/// Reads `path` as reference weights for `model`'s backbone and checks their names and
/// shapes, before anything is built.
pub fn read_reference(path: &Path, model: &ModelConfig) -> Result<torch_names::Imported> {
    let file = read_weights(path)?;
    torch_names::import(model, &file).map_err(|e| bad(path, e.to_string()))
}

/// One stage of an exported cascade: its last block (exclusive end), its modules and the
/// neck (an exported name prefix) they read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStage {
    /// Blocks `0..blocks_end` have run when this stage's neck reads their output.
    pub blocks_end: usize,
    /// Its modules, 0-based `[start, end)`.
    pub modules: [usize; 2],
    /// The neck's exported prefix (`sid.neck_1`, or the backbone's head `sid.extractor.fc` /
    /// `sid.extractor.head` for the last stage).
    pub neck: String,
}

/// What `python/sid_model.py` needs to rebuild the network of an exported file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// The backbone (`resnet18`, `vgg11`, `vit-tiny`, `cnn`, `mlp`).
    pub backbone: String,
    /// The reference layout the backbone's names follow, if any.
    pub reference: Option<String>,
    /// How it was trained (`sid` or `bp`).
    pub method: String,
    /// Input channels.
    pub in_channels: i64,
    /// Input side.
    pub image_size: i64,
    /// Classes N.
    pub num_classes: i64,
    /// Features d.
    pub feature_dim: i64,
    /// Belief modules L.
    pub modules: usize,
    /// Hidden width of a module.
    pub module_hidden: i64,
    /// Number of backbone blocks.
    pub blocks: usize,
    /// ViT's patch side (0 for other backbones).
    pub vit_patch: i64,
    /// ResNet-18's stem: `small` (3×3 stride 1, no max-pool) or `imagenet` (7×7 stride 2,
    /// max-pool); empty for other backbones.
    pub resnet_stem: String,
    /// VGG-11: whether each of the eight blocks ends with a max-pool (sid skips one that
    /// would leave less than 1×1).
    pub vgg_pools: Vec<bool>,
    /// The cascade's stages, first to last (one, unless staged SID).
    pub stages: Vec<ExportStage>,
    /// Per-channel mean subtracted from pixels in 0..1.
    pub mean: Vec<f64>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f64>,
    /// Class names by label.
    pub classes: Vec<String>,
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// Tensors written.
    pub tensors: usize,
    /// Of those, under reference names.
    pub reference_names: usize,
    /// The metadata.
    pub meta: ExportMeta,
}

/// Writes the trained network of the run in `run_dir` to `out` (safetensors, atomically):
/// the backbone under its reference names (see [`sid_core::torch_names`]), everything else —
/// necks, belief modules, the backbone of a model without reference layout — under
/// `sid.<checkpoint name>`, and an [`ExportMeta`] as metadata. Adam's state is left out.
pub fn export(run_dir: &Path, out: &Path) -> Result<ExportReport> {
    let mut cfg: RunConfig = Run::saved_config(run_dir)?;
    let spec_path = run_dir.join(crate::checkpoint::INPUT_FILE);
    let text = std::fs::read_to_string(&spec_path).map_err(|e| TrainError::io(&spec_path, e))?;
    let spec: sid_data::InputSpec = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", spec_path.display())))?;
    cfg.data.loaded_shape = Some(spec.shape);
    let model = cfg.model_config();
    let (named, _) = checkpoint::load(&run_dir.join(CHECKPOINT_FILE))?;
    let stages = export_stages(&cfg, &model)?;
    let mut names: Vec<&String> = named.0.keys().filter(|n| !n.starts_with("adam.")).collect();
    names.sort();
    let pairs: HashMap<String, String> = torch_names::pairs(&model)
        .map(|p| p.into_iter().map(|p| (p.sid, p.reference)).collect())
        .unwrap_or_default();
    let reference_names = names.iter().filter(|n| pairs.contains_key(**n)).count();
    let out_tensors: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|name| {
            let out = pairs.get(name).cloned();
            let out = out.unwrap_or_else(|| format!("{SID_PREFIX}{name}"));
            (out, named.0[name].shallow_clone())
        })
        .collect();
    let small_resnet = model.image_size <= sid_core::extractor::RESNET_SMALL_INPUT;
    // What one backbone's layout needs besides the sizes: ViT's patch, ResNet's stem, VGG's
    // pools.
    let (vit_patch, resnet_stem, vgg_pools) = match model.extractor {
        ExtractorKind::VitTiny => (sid_core::extractor::vit_patch(model.image_size), "", vec![]),
        ExtractorKind::Resnet18 if small_resnet => (0, "small", vec![]),
        ExtractorKind::Resnet18 => (0, "imagenet", vec![]),
        ExtractorKind::Vgg11 => (0, "", torch_names::pooled_blocks(&model)),
        _ => (0, "", vec![]),
    };
    let meta = ExportMeta {
        format: EXPORT_FORMAT.into(),
        backbone: model.extractor.to_string(),
        reference: Reference::of(&model).map(|r| r.name().to_string()),
        method: cfg.optim.method.to_string(),
        in_channels: model.in_channels,
        image_size: model.image_size,
        num_classes: model.num_classes,
        feature_dim: model.feature_dim,
        modules: model.modules,
        module_hidden: model.module_hidden,
        blocks: sid_core::Net::from(&model).blocks(),
        vit_patch,
        resnet_stem: resnet_stem.into(),
        vgg_pools,
        stages,
        mean: spec.mean,
        std: spec.std,
        classes: spec.classes,
    };
    let meta_json = serde_json::to_string(&meta).expect("export metadata serialises");
    let file_meta = HashMap::from([(EXPORT_META_KEY.to_string(), meta_json)]);
    save_weights(out, &out_tensors, file_meta)?;
    Ok(ExportReport {
        tensors: out_tensors.len(),
        reference_names,
        meta,
    })
}

/// Writes `tensors` (float32 or int64, any device) and `meta` to `path` as safetensors,
/// atomically.
pub fn save_weights(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<()> {
    checkpoint::write_safetensors(path, tensors, meta, |reason| bad(path, reason))
}

/// The cascade's stages: staged SID's cut (a neck per stage), else one stage whose modules
/// all read the backbone's head.
fn export_stages(cfg: &RunConfig, model: &ModelConfig) -> Result<Vec<ExportStage>> {
    let head = match model.extractor {
        ExtractorKind::VitTiny => "sid.extractor.head",
        ExtractorKind::Mlp => "sid.extractor.fc2",
        _ => "sid.extractor.fc",
    };
    let cut = if cfg.optim.method == Method::Sid && cfg.model.stages > 1 {
        let spec = cfg.runtime.placement.as_deref().ok_or_else(|| {
            TrainError::Config("a staged run's config.toml has no placement (its cut)".into())
        })?;
        sid_core::StagePlan::parse(spec, model)?
    } else {
        sid_core::StagePlan::even(model, 1)?
    };
    let last = cut.len() - 1;
    let stages = cut.stages().iter().enumerate().map(|(s, st)| ExportStage {
        blocks_end: st.blocks.end,
        modules: [st.modules.start, st.modules.end],
        neck: match s == last {
            true => head.into(),
            false => format!("{SID_PREFIX}neck_{}", s + 1),
        },
    });
    Ok(stages.collect())
}

/// `--init-from`: loads the reference weights `cfg` names into the freshly built `net`, and
/// says what it did in one line (`None` without `--init-from`). A resumed run never calls
/// it: its checkpoint has the weights.
pub fn init_from(cfg: &RunConfig, net: &mut dyn Network) -> Result<Option<String>> {
    let Some(path) = &cfg.model.init_from else {
        return Ok(None);
    };
    let imported = read_reference(path, &cfg.model_config())?;
    // The network's whole state is read, the backbone's entries replaced, and the state loaded
    // back, through the path a resume takes, so every layout (one device, stages, the paper
    // mode, stages in other ranks) gets the weights wherever its stages live.
    let mut state = net.state()?;
    torch_names::overwrite(&mut state, &imported.tensors).map_err(|e| bad(path, e.to_string()))?;
    net.load_state(&state.into())?;
    let mut line = format!(
        "--init-from {}: {} backbone tensors of the {} layout loaded; neck and modules start fresh",
        path.display(),
        imported.tensors.len(),
        imported.reference.name()
    );
    if !imported.ignored.is_empty() {
        let ignored = imported.ignored.len();
        line += &format!("; not loaded: {ignored} (classifier, batch counters)");
    }
    for n in &imported.notes {
        line += &format!("; {n}");
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn pickles_and_truncated_files_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("model.pth");
        std::fs::write(&zip, b"PK\x03\x04rest of a zip").unwrap();
        let e = read_weights(&zip).unwrap_err().to_string();
        assert!(e.contains("PyTorch pickle"), "{e}");
        let t = Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu));
        let good = dir.path().join("w.safetensors");
        save_weights(&good, &[("w".into(), t)], HashMap::new()).unwrap();
        assert_eq!(read_weights(&good).unwrap()["w"].size(), [4, 4]);
        let bytes = std::fs::read(&good).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 8]).unwrap();
        let e = read_weights(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated") && !e.contains('\n'), "{e}");
        assert!(read_weights(&dir.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }
}
