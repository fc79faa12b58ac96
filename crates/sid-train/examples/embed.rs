//! Embedding sid in another Rust program, without the CLI: load Fashion-MNIST, build the
//! paper's SID with its modules on two CPU devices (or GPUs: `embed 0,1`), train a few hundred
//! steps, and run inference with every module's belief.
//!
//! `cargo run --release -p sid-train --example embed [DEVICES]`

use sid_core::StagePlan;
use sid_core::{ExtractorKind, LossConfig, ModelConfig, Network};
use sid_data::{DatasetKind, LoadOptions};
use sid_runtime::{PipelineMethod, StagedConfig, StagedPipeline};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = std::env::args().nth(1).unwrap_or_else(|| "cpu:2".into());
    let devices = sid_train::devices::resolve_devices(&spec)?;

    let kind = DatasetKind::FashionMnist;
    let opts = LoadOptions {
        limit_train: Some(12_800),
        ..Default::default()
    };
    let data = sid_data::load(kind, &kind.default_dir(), &opts)?;

    let model = ModelConfig {
        extractor: ExtractorKind::Mlp,
        modules: 4,
        ..ModelConfig::default()
    };
    // One stage (the whole extractor), its modules spread over the devices.
    let plan = StagePlan::even(&model, 1)?;
    let mut cfg = StagedConfig::new(model, devices, plan);
    cfg.method = PipelineMethod::Paper;
    cfg.loss = LossConfig {
        alpha: 0.5,
        label_smoothing: 0.0,
    };
    cfg.lr = 1e-3;
    tch::manual_seed(0);
    let mut pipeline = StagedPipeline::new(cfg)?;
    for (device, modules) in pipeline.layout() {
        println!("{}: modules {modules:?}", sid_runtime::device_name(device));
    }

    let device = pipeline.input_device();
    let batch = 128;
    for epoch in 0..2u64 {
        let order = sid_data::epoch_permutation(data.train.len(), 0, epoch);
        for step in 0..sid_data::num_batches(data.train.len(), batch) {
            let (x, y) = sid_data::batch(&data.train, Some(&order), batch, step);
            let stats = pipeline.train_step(&x.to_device(device), &y.to_device(device))?;
            if step % 50 == 0 {
                println!(
                    "epoch {epoch} step {step}: local losses {:?}",
                    stats.module_losses
                );
            }
        }
    }

    let per_module = sid_train::cascade_health(&mut pipeline, &data.test, 1000)?.accuracy();
    let acc = per_module.last().copied().unwrap_or(0.0);
    println!(
        "test accuracy {:.2}%, per module {:?}",
        acc * 100.0,
        per_module
    );
    let (x, _) = sid_data::batch(&data.test, None, 4, 0);
    let cascade = pipeline.cascade(&x.to_device(device))?;
    println!(
        "predictions of 4 test images: {:?}",
        Vec::<i64>::try_from(cascade.prediction())?
    );
    Ok(())
}
