//! Arithmetic of the forward passes: float32, or bfloat16 autocast (`--precision bf16`).
//!
//! With bf16, each forward pass runs under libtorch's autocast at bfloat16 (convolutions and
//! matrix products in bf16, reductions and softmax in float32) and its output is cast back
//! to float32 at once. Everything else stays float32: the parameters (master weights), Adam's
//! state, the beliefs and features passed between modules and stages, the losses and the
//! gradients that cross a module boundary. Backward passes run outside autocast, in the types
//! the forward used, as PyTorch advises. libtorch's autocast is switched per thread, so each
//! worker or stage thread sets it around its own forward passes ([`forward_f32`]).

use std::os::raw::{c_char, c_int};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{CoreError, Result};

/// The arithmetic of the forward passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// Float32 throughout (the reference).
    #[default]
    Fp32,
    /// Forward passes under bfloat16 autocast; weights, optimizer state and losses float32.
    Bf16,
}

spelled_enum!(Precision, "precision", Fp32 = "fp32", Bf16 = "bf16");

sid_build::shim! {
    sid_autocast;
    fn sid_autocast_enter(cuda: c_int, prev: *mut c_int, err: *mut c_char, n: usize) -> c_int;
    fn sid_autocast_leave(cuda: c_int, prev: *const c_int, err: *mut c_char, n: usize) -> c_int;
}

impl Precision {
    /// Whether this build can run `self` (bf16 needs the autocast shim, compiled when
    /// libtorch's C++ headers were found).
    pub fn available(self) -> bool {
        self == Self::Fp32 || cfg!(sid_autocast)
    }

    /// Runs `f` under bfloat16 autocast for `device`'s kind of device. Fails only if this
    /// build has no autocast or libtorch refuses it; a network checks that once when it is
    /// built ([`Precision::check`]).
    fn bf16_region<R>(device: Device, f: impl FnOnce() -> R) -> Result<R> {
        if !cfg!(sid_autocast) {
            return Err(CoreError::InvalidConfig(
                "--precision bf16: this build has no autocast (libtorch's C++ headers were not found when it was compiled)".into(),
            ));
        }
        let cuda = c_int::from(matches!(device, Device::Cuda(_)));
        let call = |g: &dyn Fn(*mut c_char, usize) -> c_int| -> Result<()> {
            sid_build::call_shim::<1024>(g)
                .map_err(|m| CoreError::InvalidConfig(format!("bf16 autocast: {m}")))
        };
        let mut prev = [0 as c_int; 3];
        let slots = prev.as_mut_ptr();
        // SAFETY: `slots` has the three slots the shim writes; `e` is `n` bytes.
        call(&|e, n| unsafe { sid_autocast_enter(cuda, slots, e, n) })?;
        // The previous state comes back even if `f` panics (a stage thread's panic is caught
        // and reported; the thread's autocast state must not leak into what it runs next).
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        // SAFETY: as above; `prev` is what enter wrote.
        let left = call(&|e, n| unsafe { sid_autocast_leave(cuda, prev.as_ptr(), e, n) });
        let out = out.unwrap_or_else(|p| std::panic::resume_unwind(p));
        left?;
        Ok(out)
    }

    /// Checks that a network at this precision can run its forward passes on `device`.
    pub fn check(self, device: Device) -> Result<()> {
        match self {
            Self::Fp32 => Ok(()),
            Self::Bf16 => Self::bf16_region(device, || ()),
        }
    }
}

/// A forward pass `f` at `precision` on `device`, its output as float32 (a cast autograd
/// follows): the one wrapper every network puts around each of its forward passes, so
/// that what leaves a forward (logits, features, beliefs) is float32 whatever the precision.
///
/// # Panics
/// If autocast fails, which [`Precision::check`] (called when a network is built) rules out.
pub fn forward_f32(precision: Precision, device: Device, f: impl FnOnce() -> Tensor) -> Tensor {
    let mut out = forward_all_f32(precision, device, || vec![f()]);
    out.pop().expect("one output")
}

/// [`forward_f32`] for a forward pass with several outputs (every module's logits).
pub fn forward_all_f32(
    precision: Precision,
    device: Device,
    f: impl FnOnce() -> Vec<Tensor>,
) -> Vec<Tensor> {
    match precision {
        Precision::Fp32 => f(),
        Precision::Bf16 => Precision::bf16_region(device, f)
            .expect("autocast was checked when the network was built")
            .into_iter()
            .map(|t| t.to_kind(Kind::Float))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module};

    #[test]
    fn names_round_trip_and_fp32_changes_nothing() {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert!("fp16".parse::<Precision>().is_err());
        let _rng = crate::rng_lock();
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 4, 3, Default::default());
        let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let a = forward_f32(Precision::Fp32, Device::Cpu, || lin.forward(&x));
        assert!(a.equal(&lin.forward(&x)));
    }

    /// The shim's autocast on the CPU (the same calls as on a GPU, another device type):
    /// matrix products run in bf16 inside, the output is float32 and close to fp32's, the
    /// gradient reaches the float32 weights, and the state is restored afterwards.
    #[test]
    #[cfg_attr(
        not(sid_autocast),
        ignore = "needs the autocast shim (a build with it)"
    )]
    fn bf16_region_computes_in_bf16_and_restores_the_state() {
        assert!(
            Precision::Bf16.available(),
            "this build has no autocast shim"
        );
        let _rng = crate::rng_lock();
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), 64, 8, Default::default());
        let x = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
        let inner = Precision::bf16_region(Device::Cpu, || lin.forward(&x)).unwrap();
        assert_eq!(inner.kind(), Kind::BFloat16);
        let out = forward_f32(Precision::Bf16, Device::Cpu, || lin.forward(&x));
        assert_eq!(out.kind(), Kind::Float);
        let want = lin.forward(&x);
        assert!(out.allclose(&want, 5e-2, 5e-2, false));
        assert!(!out.equal(&want), "bf16 rounding shows");
        out.sum(Kind::Float).backward();
        let w = &vs.trainable_variables()[0];
        assert_eq!(w.grad().kind(), Kind::Float);
        // Outside the region: float32 again.
        assert_eq!(lin.forward(&x).kind(), Kind::Float);
    }

    /// Losses of `steps` training steps of SID, BP and two SID stages at `precision`.
    fn losses(precision: Precision, device: Device, steps: usize) -> Vec<f64> {
        use crate::reference::Reference;
        use crate::unit::Unit;
        use crate::{ExtractorKind, LossConfig, ModelConfig};
        let cfg = ModelConfig {
            extractor: ExtractorKind::Cnn,
            in_channels: 1,
            image_size: 8,
            num_classes: 4,
            feature_dim: 16,
            modules: 3,
            module_hidden: 32,
            precision,
            ..ModelConfig::default()
        };
        tch::manual_seed(11);
        let x = Tensor::randn([16, 1, 8, 8], (Kind::Float, device));
        let y = Tensor::randint(4, [16], (Kind::Int64, device));
        let mut out = Vec::new();
        tch::manual_seed(5);
        let mut sid = Reference::new(&cfg, 1e-2, device);
        tch::manual_seed(5);
        let mut bp = Reference::new(&cfg, 1e-2, device);
        tch::manual_seed(5);
        let plan = crate::StagePlan::even(&cfg, 2).unwrap();
        let mut stages =
            crate::stage::build_stages(&cfg, LossConfig::default(), 1e-2, &plan).unwrap();
        for st in &mut stages {
            st.to_device(device);
        }
        for _ in 0..steps {
            out.push(sid.sid_step(&x, &y, &LossConfig::default()).iter().sum());
            out.push(bp.bp_step(&x, &y));
            let (mut input, mut p) = (x.shallow_clone(), stages[0].uniform(16));
            for st in &mut stages {
                let target = st.label_target(&y);
                let o = st.forward_micro(&input, &p, &target);
                out.push(
                    st.backward_micro(1.0)
                        .unwrap()
                        .sum(Kind::Double)
                        .double_value(&[]),
                );
                st.apply();
                (input, p) = (o.z.unwrap_or_else(|| x.shallow_clone()), o.p);
            }
        }
        out
    }

    /// A few bf16 steps track fp32's losses within a loose tolerance (and differ from them:
    /// bf16 was on) for SID, BP and staged SID on `device`.
    fn bf16_tracks_fp32(device: Device) {
        let fp32 = losses(Precision::Fp32, device, 4);
        let bf16 = losses(Precision::Bf16, device, 4);
        // bf16 was in effect: it moves some loss by more than float32's rounding could
        // (relative 1e-7 per operation; 1e-5 leaves room for a few steps of it).
        let moved = fp32
            .iter()
            .zip(&bf16)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-5,
            "{device:?}: bf16 changed the losses by {moved:e} only"
        );
        for (a, b) in fp32.iter().zip(&bf16) {
            assert!(b.is_finite(), "{device:?}: {bf16:?}");
            assert!(
                (a - b).abs() <= 0.05 * a.abs() + 0.02,
                "{device:?}: fp32 {fp32:?} vs bf16 {bf16:?}"
            );
        }
    }

    /// On the CPU, which checks the wiring through the shim.
    #[test]
    #[cfg_attr(
        not(sid_autocast),
        ignore = "needs the autocast shim (a build with it)"
    )]
    fn bf16_steps_track_fp32_steps() {
        assert!(
            Precision::Bf16.available(),
            "this build has no autocast shim"
        );
        let _rng = crate::rng_lock();
        bf16_tracks_fp32(Device::Cpu);
    }

    /// On a GPU. Ignored by default; `--include-ignored` without CUDA fails.
    #[test]
    #[ignore = "needs CUDA (run on a GPU machine with --include-ignored)"]
    fn bf16_steps_track_fp32_steps_on_a_gpu() {
        assert!(tch::Cuda::is_available(), "needs CUDA: not available here");
        assert!(
            Precision::Bf16.available(),
            "this build has no autocast shim"
        );
        let _rng = crate::rng_lock();
        bf16_tracks_fp32(Device::Cuda(0));
    }
}
