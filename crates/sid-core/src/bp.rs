//! The backprop baseline: the identical network trained end to end.

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Tensor};

use crate::adam::Adam;
use crate::belief::{belief, uniform_belief, BeliefModule};
use crate::config::{Method, ModelConfig};
use crate::extractor::Extractor;
use crate::loss::cross_entropy;
use crate::network::{
    load_var_store, to_cpu, var_store_state, Cascade, NamedTensors, Network, StepStats,
};
use crate::precision::forward_f32;
use crate::sid::cascade_from_features;
use crate::unit::module_prefix;
use crate::{CoreError, Result};

/// Extractor and L belief modules chained through softmax beliefs, one VarStore, one Adam,
/// cross-entropy on the last module's logits.
#[derive(Debug)]
pub struct BpNetwork {
    num_classes: i64,
    precision: crate::Precision,
    pub(crate) vs: VarStore,
    pub(crate) extractor: Extractor,
    pub(crate) modules: Vec<BeliefModule>,
    pub(crate) opt: Adam,
}

impl BpNetwork {
    /// Builds the network on `device` with the same variable names and creation order as
    /// [`crate::SidNetwork`].
    pub fn new(cfg: &ModelConfig, lr: f64, device: Device) -> Result<Self> {
        cfg.validate()?;
        cfg.precision.check(device)?;
        // Drawn on the CPU, then moved: the same seed gives SID's initial weights on any device.
        let mut vs = VarStore::new(Device::Cpu);
        let extractor = Extractor::new(&(vs.root() / "extractor"), cfg)?;
        let modules = (0..cfg.modules)
            .map(|i| {
                let p = vs.root() / module_prefix(i);
                BeliefModule::new(&p, cfg)
            })
            .collect();
        vs.set_device(device);
        let opt = Adam::for_var_store(&vs, lr);
        Ok(Self {
            num_classes: cfg.num_classes,
            precision: cfg.precision,
            vs,
            extractor,
            modules,
            opt,
        })
    }
}

impl BpNetwork {
    /// Copies weights (not optimizer state) from named tensors, e.g. a SID network's state.
    pub fn load_weights(&mut self, named: &NamedTensors) -> Result<()> {
        load_var_store(&self.vs, named)
    }
}

impl Network for BpNetwork {
    fn method(&self) -> Method {
        Method::Bp
    }

    fn input_device(&self) -> Device {
        self.vs.device()
    }

    fn train_step(&mut self, x: &Tensor, y: &Tensor) -> Result<StepStats> {
        let loss = self.train_step_queued(x, y)?;
        self.read_step(&loss)
    }

    fn train_step_queued(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("bp_step").entered();
        self.opt.zero_grad();
        // The whole forward is one pass at the network's precision; the loss is float32.
        let logits = forward_f32(self.precision, self.vs.device(), || {
            let z = self.extractor.forward_t(x, true);
            let mut p = uniform_belief(z.size()[0], self.num_classes, z.device());
            let mut logits = None;
            for m in &self.modules {
                let l = m.forward(&p, &z);
                p = belief(&l);
                logits = Some(l);
            }
            logits.expect("at least one module")
        });
        let loss = cross_entropy(&logits, y);
        loss.f_backward()?;
        self.opt.step();
        Ok(loss.detach())
    }

    fn read_step(&self, loss: &Tensor) -> Result<StepStats> {
        // Read after the update, as SID does, so neither waits for the device mid-step; a
        // non-finite loss stops training all the same.
        let _s = tracing::trace_span!("read_losses").entered();
        let value = loss.f_double_value(&[])?;
        if !value.is_finite() {
            return Err(CoreError::NonFiniteLoss {
                what: "backprop".into(),
                module: None,
                value,
            });
        }
        Ok(StepStats {
            loss: value,
            module_losses: Vec::new(),
        })
    }

    fn cascade(&mut self, x: &Tensor) -> Result<Cascade> {
        let z = tch::no_grad(|| {
            forward_f32(self.precision, self.vs.device(), || {
                self.extractor.forward_t(x, false)
            })
        });
        Ok(cascade_from_features(
            self.modules.iter(),
            &z,
            self.num_classes,
            self.precision,
        ))
    }

    fn state(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut v = var_store_state(&self.vs);
        v.extend(to_cpu(self.opt.state("adam.all")));
        Ok(v)
    }

    fn load_state(&mut self, named: &NamedTensors) -> Result<()> {
        load_var_store(&self.vs, named)?;
        self.opt.load_state("adam.all", named)
    }
}
