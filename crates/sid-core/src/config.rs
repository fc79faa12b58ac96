//! Model and loss settings shared by SID and its backprop baseline.

use serde::{Deserialize, Serialize};

use crate::error::invalid;
use crate::Result;

/// Which feature extractor `c(x)` to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtractorKind {
    /// The reference SimpleCNN: four 3x3 convolutions, two max-pools, global average pool, linear.
    Cnn,
    /// Flatten → linear 512 → ReLU → linear d: fast on a CPU.
    Mlp,
    /// VGG-11 with BatchNorm (eight conv3x3-BN-ReLU blocks), global average pool, linear.
    Vgg11,
    /// ResNet-18 (a stem and eight BasicBlocks), global average pool, linear.
    Resnet18,
    /// ViT-Tiny (patch embedding, twelve pre-norm encoder blocks of width 192, 3 heads),
    /// LayerNorm of the class token, linear.
    VitTiny,
}

spelled_enum!(
    ExtractorKind,
    "model",
    Cnn = "cnn",
    Mlp = "mlp",
    Vgg11 = "vgg11",
    Resnet18 = "resnet18",
    VitTiny = "vit-tiny"
);

/// The training method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Synergistic Information Distillation: local losses, no global backward pass.
    Sid,
    /// The identical network trained end to end with cross-entropy on the last module.
    Bp,
}

spelled_enum!(Method, "method", Sid = "sid", Bp = "bp");

/// Shape of the network: extractor, feature size, number and width of belief modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Feature extractor.
    pub extractor: ExtractorKind,
    /// Input channels (1 for MNIST-like data, 3 for CIFAR).
    pub in_channels: i64,
    /// Input height and width.
    pub image_size: i64,
    /// Number of classes N.
    pub num_classes: i64,
    /// Feature dimension d (128 in the reference).
    pub feature_dim: i64,
    /// Number of belief modules L (10 in the reference).
    pub modules: usize,
    /// Hidden width of each belief module (256 in the reference).
    pub module_hidden: i64,
    /// How every layer's weights start (PyTorch's defaults, as the reference).
    #[serde(default)]
    pub init: crate::init::Init,
    /// Arithmetic of the forward passes: float32, or bfloat16 autocast with float32 weights,
    /// optimizer state and losses ([`crate::precision`]).
    #[serde(default)]
    pub precision: crate::precision::Precision,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            extractor: ExtractorKind::Cnn,
            in_channels: 1,
            image_size: 28,
            num_classes: 10,
            feature_dim: 128,
            modules: 10,
            module_hidden: 256,
            init: crate::init::Init::Pytorch,
            precision: crate::precision::Precision::Fp32,
        }
    }
}

impl ModelConfig {
    /// Checks that every size is positive.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("in_channels", self.in_channels),
            ("image_size", self.image_size),
            ("num_classes", self.num_classes),
            ("feature_dim", self.feature_dim),
            ("modules", self.modules as i64),
            ("module_hidden", self.module_hidden),
        ];
        for (name, v) in checks {
            if v < 1 {
                return Err(invalid(format!("{name} must be at least 1, got {v}")));
            }
        }
        if self.num_classes < 2 {
            return Err(invalid("num_classes must be at least 2"));
        }
        Ok(())
    }
}

/// Settings of the local SID loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// Weight α of the label term; 1 − α weighs the consistency term. Reference: 0.5.
    pub alpha: f64,
    /// Label smoothing ε of the target p_y (0 = one-hot, the reference).
    pub label_smoothing: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            label_smoothing: 0.0,
        }
    }
}

impl LossConfig {
    /// Checks α ∈ [0, 1] and ε ∈ [0, 1).
    pub fn validate(&self) -> Result<()> {
        let (alpha, eps) = (self.alpha, self.label_smoothing);
        if !(0.0..=1.0).contains(&alpha) {
            return Err(invalid(format!("alpha must be in [0, 1], got {alpha}")));
        }
        if !(0.0..1.0).contains(&eps) {
            return Err(invalid(format!(
                "label smoothing must be in [0, 1), got {eps}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CoreError;

    #[test]
    fn names_parse_back_and_unknown_ones_list_every_name() {
        for k in [
            ExtractorKind::Cnn,
            ExtractorKind::Mlp,
            ExtractorKind::Vgg11,
            ExtractorKind::Resnet18,
            ExtractorKind::VitTiny,
        ] {
            assert_eq!(k.to_string().parse::<ExtractorKind>().unwrap(), k);
        }
        assert_eq!("bp".parse::<Method>().unwrap(), Method::Bp);
        assert_eq!(Method::Sid.to_string(), "sid");
        let err = |e: CoreError| e.to_string();
        assert_eq!(
            err("vgg".parse::<ExtractorKind>().unwrap_err()),
            "invalid model setting: unknown model \"vgg\" (expected cnn, mlp, vgg11, resnet18 or vit-tiny)"
        );
        assert_eq!(
            err("adam".parse::<Method>().unwrap_err()),
            "invalid model setting: unknown method \"adam\" (expected sid or bp)"
        );
        assert_eq!(
            err("fp16".parse::<crate::Precision>().unwrap_err()),
            "invalid model setting: unknown precision \"fp16\" (expected fp32 or bf16)"
        );
        assert_eq!(
            err("xavier".parse::<crate::Init>().unwrap_err()),
            "invalid model setting: unknown init \"xavier\" (expected pytorch or kaiming)"
        );
    }
}
