//! How layers' weights start: PyTorch's defaults (what the authors' `sid.py` gets from
//! `nn.Linear` / `nn.Conv2d`) or tch's Kaiming-uniform defaults.

use serde::{Deserialize, Serialize};
use tch::nn;

/// Weight initialisation of every layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// PyTorch's default for `nn.Linear` and `nn.Conv2d`: weights and biases uniform in
    /// ±1/√fan_in (Kaiming-uniform with a = √5). The reference code's initialisation.
    #[default]
    Pytorch,
    /// tch's default: Kaiming-uniform with the ReLU gain, weights in ±√(6/fan_in); linear
    /// biases in ±1/√fan_in, convolution biases 0. Weights start ≈ 2.45× larger.
    Kaiming,
}

spelled_enum!(Init, "init", Pytorch = "pytorch", Kaiming = "kaiming");

fn pytorch_bound(fan_in: i64) -> nn::Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -b, up: b }
}

/// A linear layer `in → out` under `p`, initialised by `init`.
pub fn linear(p: nn::Path, inputs: i64, outputs: i64, init: Init) -> nn::Linear {
    let mut c = nn::LinearConfig::default();
    if init == Init::Pytorch {
        (c.ws_init, c.bs_init) = (pytorch_bound(inputs), Some(pytorch_bound(inputs)));
    }
    nn::linear(p, inputs, outputs, c)
}

/// Kernel side, stride and padding of a square convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Kernel side.
    pub kernel: i64,
    /// Stride.
    pub stride: i64,
    /// Zero padding on each side.
    pub padding: i64,
}

impl ConvShape {
    /// A `kernel`×`kernel` convolution with `stride` and `padding`.
    pub const fn new(kernel: i64, stride: i64, padding: i64) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// The output side for an input side `side` (PyTorch's floor formula).
    pub fn out_side(&self, side: i64) -> i64 {
        (side + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// A square convolution `in → out` under `p` (`p/weight`, and `p/bias` when `bias`),
/// initialised by `init` (PyTorch's `nn.Conv2d` bound is over fan-in = in·k·k).
pub fn conv(
    p: nn::Path,
    inputs: i64,
    outputs: i64,
    shape: ConvShape,
    bias: bool,
    init: Init,
) -> nn::Conv2D {
    let mut c = nn::ConvConfig {
        stride: shape.stride,
        padding: shape.padding,
        bias,
        ..Default::default()
    };
    if init == Init::Pytorch {
        let fan_in = inputs * shape.kernel * shape.kernel;
        (c.ws_init, c.bs_init) = (pytorch_bound(fan_in), pytorch_bound(fan_in));
    }
    nn::conv2d(p, inputs, outputs, shape.kernel, c)
}

/// PyTorch's `nn.BatchNorm2d(c)` under `p`: weight 1, bias 0, running mean 0 and variance 1
/// (buffers: saved, not trained), ε = 1e-5, momentum 0.1. The same for both `Init`s: tch's
/// own default draws the weight uniform in [0, 1), which no reference uses.
pub fn batch_norm2d(p: nn::Path, channels: i64) -> nn::BatchNorm {
    let c = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, channels, c)
}

/// ViT's LayerNorm under `p`: weight 1, bias 0, ε = 1e-6, as timm's and torchvision's
/// `VisionTransformer` build theirs (`partial(nn.LayerNorm, eps=1e-6)`), so reference weights
/// compute the reference's values.
pub fn vit_layer_norm(p: nn::Path, width: i64) -> nn::LayerNorm {
    let c = nn::LayerNormConfig {
        eps: 1e-6,
        ..Default::default()
    };
    nn::layer_norm(p, vec![width], c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Largest |value| must sit just under the formula's bound (uniform draws fill it).
    fn check(t: &tch::Tensor, bound: f64) {
        let m = t.abs().max().double_value(&[]);
        assert!(m <= bound && m > 0.97 * bound, "max {m} vs bound {bound}");
        // Centred: the mean of n uniform draws has deviation bound/√(3n); allow four of them.
        let mean = t.mean(Kind::Float).double_value(&[]);
        let n = t.numel() as f64;
        assert!(mean.abs() < 4.0 * bound / (3.0 * n).sqrt(), "mean {mean}");
    }

    #[test]
    fn weight_bounds_follow_the_formulas() {
        let _rng = crate::rng_lock();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let l = linear(vs.root() / "a", 300, 200, Init::Pytorch);
        check(&l.ws, 1.0 / 300f64.sqrt());
        check(l.bs.as_ref().unwrap(), 1.0 / 300f64.sqrt());
        let c = conv(
            vs.root() / "b",
            32,
            64,
            ConvShape::new(3, 1, 1),
            true,
            Init::Pytorch,
        );
        check(&c.ws, 1.0 / (32.0 * 9.0f64).sqrt());
        check(c.bs.as_ref().unwrap(), 1.0 / (32.0 * 9.0f64).sqrt());
        let k = linear(vs.root() / "c", 300, 200, Init::Kaiming);
        check(&k.ws, (6.0 / 300f64).sqrt());
        let kc = conv(
            vs.root() / "d",
            32,
            64,
            ConvShape::new(3, 1, 1),
            true,
            Init::Kaiming,
        );
        check(&kc.ws, (6.0 / (32.0 * 9.0f64)).sqrt());
        assert_eq!(kc.bs.as_ref().unwrap().abs().max().double_value(&[]), 0.0);
        assert_eq!("kaiming".parse::<Init>().unwrap(), Init::Kaiming);
        assert!("xavier".parse::<Init>().is_err());
    }
}
