//! The reference implementations' parameter names for the built-in backbones: torchvision's
//! `resnet18` and `vgg11_bn`, timm's ViT (`vit_tiny_patch16_224`'s layout at the run's image
//! and patch size). The one table of which sid variable is which reference parameter, used
//! both to load reference weights into a network ([`import`]) and to write a trained network
//! under reference names ([`pairs`]).
//!
//! Where the layouts differ, this module decides:
//! - the reference classifiers (`fc.*`, `classifier.*`, timm's `head.*`) and BatchNorm's
//!   `num_batches_tracked` are not loaded: sid's neck to `d` starts fresh, and its BatchNorm
//!   has a fixed momentum that never reads the count;
//! - a grey-scale run (one input channel) gets the first convolution's RGB weights summed over
//!   the colours, which is what the reference computes on the grey image copied to R, G and B
//!   (timm's `adapt_input_conv` does the same);
//! - ResNet-18 up to 64 px has a 3×3 stride-1 stem and no max-pool (torchvision's ImageNet
//!   stem is 7×7 stride 2 with a max-pool): a 7×7 `conv1.weight` is refused there, and a model
//!   saved with the CIFAR stem (`conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)`, `maxpool =
//!   Identity()`) loads;
//! - ViT's patch and position embeddings must be of the run's patch size and grid: they are
//!   not resampled.

use std::collections::{BTreeSet, HashMap, HashSet};

use tch::{Kind, Tensor};

use crate::config::{ExtractorKind, ModelConfig};
use crate::extractor::{specs, vit_patch, Spec, RESNET_SMALL_INPUT, VIT_WIDTH};
use crate::{CoreError, Result};

/// A reference implementation whose parameter names a built-in backbone can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// torchvision's `resnet18` (`torchvision.models.resnet18`).
    TorchvisionResnet18,
    /// torchvision's `vgg11_bn`: its `features` (the classifier is not loaded).
    TorchvisionVgg11Bn,
    /// timm's `VisionTransformer` of `vit_tiny_patch16_224` (width 192, depth 12, 3 heads),
    /// created with the run's `img_size` and `patch_size`.
    TimmVitTiny,
}

impl Reference {
    /// The reference layout of `model`'s backbone, if it has one (SimpleCNN and the MLP have
    /// none).
    pub fn of(model: &ModelConfig) -> Option<Self> {
        match model.extractor {
            ExtractorKind::Resnet18 => Some(Self::TorchvisionResnet18),
            ExtractorKind::Vgg11 => Some(Self::TorchvisionVgg11Bn),
            ExtractorKind::VitTiny => Some(Self::TimmVitTiny),
            ExtractorKind::Cnn | ExtractorKind::Mlp => None,
        }
    }

    /// Its name, and the prefix of its classifier's parameters.
    fn names(&self) -> (&'static str, &'static str) {
        match self {
            Self::TorchvisionResnet18 => ("torchvision resnet18", "fc."),
            Self::TorchvisionVgg11Bn => ("torchvision vgg11_bn", "classifier."),
            Self::TimmVitTiny => ("timm vit_tiny_patch16_224", "head."),
        }
    }

    /// How the reference is named in messages and export metadata.
    pub fn name(&self) -> &'static str {
        self.names().0
    }

    /// Whether `name`, present in a reference file, is deliberately not loaded: the
    /// classifier (sid's neck replaces it) and BatchNorm's batch counters.
    pub fn ignored(&self, name: &str) -> bool {
        name.ends_with(".num_batches_tracked") || name.starts_with(self.names().1)
    }

    /// The reference's name of variable `var` (as [`Spec::variables`] names it) of block `i`,
    /// called `block` in sid.
    fn name_of(self, i: usize, block: &str, var: &str) -> String {
        // The layer inside the block, and the variable's own name (`weight`, `running_mean`…).
        let (layer, v) = var.rsplit_once('.').unwrap_or(("", var));
        match self {
            Self::TorchvisionResnet18 => match block.split_once('_') {
                // `layer{l}_{b}` is torchvision's `layer{l}.{b-1}`.
                Some((l, b)) => {
                    let b: usize = b.parse().expect("ResNet blocks are named layer{l}_{b}");
                    let layer = match layer {
                        "down_conv" => "downsample.0",
                        "down_bn" => "downsample.1",
                        conv_or_bn => conv_or_bn,
                    };
                    format!("{l}.{}.{layer}.{v}", b - 1)
                }
                // The stem's `conv` and `bn` are torchvision's `conv1` and `bn1`.
                None => format!("{layer}1.{v}"),
            },
            // The BatchNorm is the index after its convolution's.
            Self::TorchvisionVgg11Bn => {
                let at = VGG11_FEATURES[i] + usize::from(layer == "bn");
                format!("features.{at}.{v}")
            }
            Self::TimmVitTiny => match block.strip_prefix("block") {
                // `block{j}` is timm's `blocks.{j-1}`.
                Some(j) => {
                    let j: usize = j.parse().expect("ViT blocks are block{j}");
                    let layer = match layer {
                        "qkv" | "proj" => format!("attn.{layer}"),
                        "fc1" | "fc2" => format!("mlp.{layer}"),
                        norm => norm.to_string(),
                    };
                    format!("blocks.{}.{layer}.{v}", j - 1)
                }
                // The class token and positions are the model's own; the projection is
                // `patch_embed.proj`.
                None if layer.is_empty() => var.to_string(),
                None => format!("patch_embed.{var}"),
            },
        }
    }
}

/// One backbone parameter under both names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Its name in the reference's `state_dict`.
    pub reference: String,
    /// Its name in sid's checkpoints (`extractor.…`).
    pub sid: String,
    /// Its shape in sid's network.
    pub shape: Vec<i64>,
}

/// torchvision's `vgg11_bn.features` index of each of the eight convolutions (its BatchNorm
/// is the next index): configuration "A" with every max-pool, whichever pools sid skips.
const VGG11_FEATURES: [usize; 8] = [0, 4, 8, 11, 15, 18, 22, 25];

/// Every backbone parameter of `model` with its reference name and shape, blocks first to
/// last, then the head's normalisation (ViT). The necks and modules have no reference name.
pub fn pairs(model: &ModelConfig) -> Result<Vec<Pair>> {
    let reference = Reference::of(model).ok_or_else(|| {
        CoreError::Reference(format!(
            "the {} backbone has no reference layout (resnet18, vgg11 and vit-tiny have)",
            model.extractor
        ))
    })?;
    let blocks = specs(model).into_iter().enumerate();
    let mut out: Vec<Pair> = blocks
        .flat_map(|(i, (block, spec, _))| {
            spec.variables().into_iter().map(move |(var, shape)| Pair {
                reference: reference.name_of(i, &block, &var),
                sid: format!("extractor.{block}.{var}"),
                shape,
            })
        })
        .collect();
    if reference == Reference::TimmVitTiny {
        // timm's final `norm` is sid's head LayerNorm (on the class token only; the same
        // values, since LayerNorm works token by token).
        out.extend(["weight", "bias"].map(|v| Pair {
            reference: format!("norm.{v}"),
            sid: format!("extractor.head.norm.{v}"),
            shape: vec![VIT_WIDTH],
        }));
    }
    Ok(out)
}

/// Whether each block of `model`'s backbone ends with a max-pool (VGG-11 skips one that
/// would leave less than 1×1; ResNet's ImageNet stem has one): what a re-implementation needs
/// besides the weights.
pub fn pooled_blocks(model: &ModelConfig) -> Vec<bool> {
    specs(model)
        .into_iter()
        .map(|(_, spec, _)| matches!(spec, Spec::Conv { pool: Some(_), .. }))
        .collect()
}

/// Reference weights mapped onto sid's names, ready to load into a network's backbone.
#[derive(Debug)]
pub struct Imported {
    /// The reference layout they were read as.
    pub reference: Reference,
    /// sid name → tensor (float32, CPU), every backbone parameter of the model.
    pub tensors: Vec<(String, Tensor)>,
    /// Reference names present but deliberately not loaded (classifier, batch counters).
    pub ignored: Vec<String>,
    /// What was adapted to fit (a grey-scale first convolution), one sentence each.
    pub notes: Vec<String>,
}

/// At most this many names in one message; the rest are counted.
const LISTED: usize = 6;

fn listed(names: &[String]) -> String {
    let mut s = names[..names.len().min(LISTED)].join(", ");
    if names.len() > LISTED {
        s.push_str(&format!(" and {} more", names.len() - LISTED));
    }
    s
}

fn shape(s: &[i64]) -> String {
    s.iter().map(i64::to_string).collect::<Vec<_>>().join("×")
}

/// Maps `file` (reference name → tensor, as read from a reference model's safetensors file)
/// onto `model`'s backbone. Every backbone parameter must be there with its shape, and every
/// other name must be one [`Reference::ignored`] leaves out: otherwise one error says which
/// names are missing, left over or of the wrong shape.
pub fn import(model: &ModelConfig, file: &HashMap<String, Tensor>) -> Result<Imported> {
    let reference = Reference::of(model).ok_or_else(|| {
        CoreError::Reference(format!(
            "--init-from needs a backbone with a reference layout (resnet18, vgg11 or vit-tiny), not {}",
            model.extractor
        ))
    })?;
    let pairs = pairs(model)?;
    let first_conv = &pairs[0].reference;
    let (mut missing, mut wrong, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    let mut hints = BTreeSet::new();
    let mut tensors = Vec::with_capacity(pairs.len());
    for p in &pairs {
        let Some(t) = file.get(&p.reference) else {
            missing.push(p.reference.clone());
            continue;
        };
        let mut t = t.to_kind(Kind::Float);
        if &p.reference == first_conv && t.dim() == 4 && t.size()[1] == 3 && p.shape[1] == 1 {
            // Grey-scale run: the reference sees the grey image in R, G and B alike.
            t = t.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
            notes.push(format!(
                "{first_conv}: RGB weights summed over the colours for the grey-scale input"
            ));
        }
        let got = t.size();
        if got != p.shape {
            let (name, want) = (&p.reference, shape(&p.shape));
            wrong.push(format!("{name} is {}, expected {want}", shape(&got)));
            hints.extend(layout_hint(model, reference, &p.reference, &got));
            continue;
        }
        tensors.push((p.sid.clone(), t));
    }
    let known: HashSet<&str> = pairs.iter().map(|p| p.reference.as_str()).collect();
    let unknown = file.keys().filter(|n| !known.contains(n.as_str())).cloned();
    let (mut ignored, mut extra): (Vec<_>, Vec<_>) = unknown.partition(|n| reference.ignored(n));
    ignored.sort();
    extra.sort();
    if missing.is_empty() && extra.is_empty() && wrong.is_empty() {
        return Ok(Imported {
            reference,
            tensors,
            ignored,
            notes,
        });
    }
    let parts: Vec<String> = [
        ("missing", &missing),
        ("left over", &extra),
        ("of the wrong shape", &wrong),
    ]
    .into_iter()
    .filter(|(_, names)| !names.is_empty())
    .map(|(what, names)| format!("{} {what}: {}", names.len(), listed(names)))
    .collect();
    let hints: Vec<String> = hints.into_iter().collect();
    let hint = (!hints.is_empty()).then(|| format!(" ({})", hints.join("; ")));
    let (side, channels, kind) = (model.image_size, model.in_channels, model.extractor);
    Err(CoreError::Reference(format!(
        "not the {} layout of a {side} px, {channels}-channel {kind}: {}{}",
        reference.name(),
        parts.join("; "),
        hint.unwrap_or_default()
    )))
}

/// Why a reference parameter may have another shape than sid's, where the layouts are known
/// to differ.
fn layout_hint(model: &ModelConfig, r: Reference, name: &str, got: &[i64]) -> Option<String> {
    let (side, small) = (model.image_size, RESNET_SMALL_INPUT);
    let patch = vit_patch(side);
    let positions = (side / patch).pow(2) + 1;
    match (r, name) {
        (Reference::TorchvisionResnet18, "conv1.weight") if got.len() == 4 && got[2] == 7 => Some(format!(
            "a 7×7 conv1 is torchvision's ImageNet stem, but ResNet-18 at {side} px (up to {small} px) has the 3×3 stride-1 stem without max-pool: train on images larger than {small} px, or save the model with conv1 = Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = Identity()"
        )),
        (Reference::TorchvisionResnet18, "conv1.weight") if got.len() == 4 && got[2] == 3 => Some(format!(
            "a 3×3 conv1 is the small-input stem, but ResNet-18 at {side} px (over {small} px) has torchvision's 7×7 stride-2 stem with max-pool"
        )),
        (Reference::TimmVitTiny, "pos_embed" | "patch_embed.proj.weight") => Some(format!(
            "ViT at {side} px has patch {patch} and {positions} positions with the class token: create the timm model with img_size={side}, patch_size={patch}"
        )),
        (_, _) if got.len() == 4 && got[1] != model.in_channels && name == pairs(model).ok()?[0].reference => Some(format!(
            "the first convolution takes {} channels, the data has {}",
            got[1], model.in_channels
        )),
        _ => None,
    }
}

/// Loads `tensors` (sid name → tensor) into `state`, a network's whole named state (as
/// [`crate::Network::state`] gives it), replacing the entries of the same name. Every name
/// must be in `state` with the same shape.
pub fn overwrite(state: &mut [(String, Tensor)], tensors: &[(String, Tensor)]) -> Result<()> {
    let at: HashMap<&str, usize> = (state.iter().enumerate())
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let (mut missing, mut replace) = (Vec::new(), Vec::new());
    for (name, t) in tensors {
        match at.get(name.as_str()) {
            Some(&i) if state[i].1.size() == t.size() => replace.push((i, t)),
            Some(&i) => missing.push(format!(
                "{name} is {} in the network, {} in the file",
                shape(&state[i].1.size()),
                shape(&t.size())
            )),
            None => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(CoreError::Reference(format!(
            "the network has no variable for {}",
            listed(&missing)
        )));
    }
    for (i, t) in replace {
        let kind = state[i].1.kind();
        state[i].1 = t.to_kind(kind);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extractor::Extractor;
    use tch::{nn, Device};

    fn model(extractor: ExtractorKind, in_channels: i64, image_size: i64) -> ModelConfig {
        ModelConfig {
            extractor,
            in_channels,
            image_size,
            ..ModelConfig::default()
        }
    }

    /// Every pair names a variable the built network has, with its shape, and every backbone
    /// variable of the network (not the neck to d) has a pair.
    #[test]
    fn pairs_cover_the_built_backbones() {
        let _rng = crate::rng_lock();
        for (kind, c, side) in [
            (ExtractorKind::Resnet18, 3, 32),
            (ExtractorKind::Resnet18, 1, 96),
            (ExtractorKind::Vgg11, 3, 28),
            (ExtractorKind::VitTiny, 3, 32),
        ] {
            let m = model(kind, c, side);
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = Extractor::new(&(vs.root() / "extractor"), &m).unwrap();
            let vars = vs.variables();
            let pairs = pairs(&m).unwrap();
            for p in &pairs {
                assert_eq!(vars[&p.sid].size(), p.shape, "{kind}: {}", p.sid);
            }
            let mut unpaired: Vec<&String> = vars
                .keys()
                .filter(|n| !pairs.iter().any(|p| &p.sid == *n))
                .collect();
            unpaired.sort();
            let neck = match kind {
                ExtractorKind::VitTiny => ["extractor.head.fc.bias", "extractor.head.fc.weight"],
                _ => ["extractor.fc.bias", "extractor.fc.weight"],
            };
            assert_eq!(unpaired, neck.iter().collect::<Vec<_>>(), "{kind}");
        }
        assert!(pairs(&model(ExtractorKind::Cnn, 1, 28)).is_err());
    }

    /// Missing, left-over and misshapen names are all listed in one error; the classifier is
    /// left out without complaint.
    #[test]
    fn bad_names_and_shapes_are_listed() {
        let m = model(ExtractorKind::Resnet18, 3, 32);
        let mut file: HashMap<String, Tensor> = pairs(&m)
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.reference,
                    Tensor::zeros(p.shape.as_slice(), (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        file.insert(
            "fc.weight".into(),
            Tensor::zeros([1000, 512], (Kind::Float, Device::Cpu)),
        );
        file.insert(
            "bn1.num_batches_tracked".into(),
            Tensor::zeros([], (Kind::Int64, Device::Cpu)),
        );
        let ok = import(&m, &file).unwrap();
        assert_eq!(ok.ignored, ["bn1.num_batches_tracked", "fc.weight"]);
        file.remove("layer2.0.downsample.0.weight");
        file.insert(
            "layer5.0.conv1.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
        file.insert(
            "conv1.weight".into(),
            Tensor::zeros([64, 3, 7, 7], (Kind::Float, Device::Cpu)),
        );
        let e = import(&m, &file).unwrap_err().to_string();
        for part in [
            "1 missing: layer2.0.downsample.0.weight",
            "1 left over: layer5.0.conv1.weight",
            "conv1.weight is 64×3×7×7, expected 64×3×3×3",
            "ImageNet stem",
        ] {
            assert!(e.contains(part), "{e}");
        }
        assert!(!e.contains('\n'));
    }

    #[test]
    fn vgg_pools_follow_the_layout() {
        let pools = |side| pooled_blocks(&model(ExtractorKind::Vgg11, 3, side));
        assert_eq!(
            pools(32),
            [true, true, false, true, false, true, false, true]
        );
        // 28 px: 14, 7, 3, 1, and the fifth pool would leave 0×0.
        assert_eq!(
            pools(28),
            [true, true, false, true, false, true, false, false]
        );
    }

    /// A grey-scale run sums the RGB weights of the first convolution.
    #[test]
    fn grey_input_sums_the_colours() {
        let m = model(ExtractorKind::VitTiny, 1, 28);
        let file: HashMap<String, Tensor> = pairs(&model(ExtractorKind::VitTiny, 3, 28))
            .unwrap()
            .into_iter()
            .map(|p| {
                (
                    p.reference,
                    Tensor::ones(p.shape.as_slice(), (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        let ok = import(&m, &file).unwrap();
        let (_, w) = &ok.tensors[0];
        assert_eq!(w.size(), [VIT_WIDTH, 1, 4, 4]);
        assert_eq!(w.double_value(&[0, 0, 0, 0]), 3.0);
        assert_eq!(ok.notes.len(), 1);
    }
}
