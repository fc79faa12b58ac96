//! What the runtime's integration tests share: the RNG lock, a small model, its batches.

#![allow(dead_code)] // each test file uses its own part

use sid_core::{ExtractorKind, ModelConfig};
use tch::{Device, Kind, Tensor};

/// Tests that draw weights or data hold this: the RNG is process-wide.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A SimpleCNN at 8 px with 4 modules.
pub fn model() -> ModelConfig {
    ModelConfig {
        extractor: ExtractorKind::Cnn,
        in_channels: 1,
        image_size: 8,
        num_classes: 5,
        feature_dim: 12,
        modules: 4,
        module_hidden: 16,
        init: sid_core::Init::default(),
        precision: sid_core::Precision::Fp32,
    }
}

/// `n` batches of 16 random 8 px images and labels, seeded.
pub fn batches(n: usize) -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(77);
    (0..n)
        .map(|_| {
            (
                Tensor::randn([16, 1, 8, 8], (Kind::Float, Device::Cpu)),
                Tensor::randint(5, [16], (Kind::Int64, Device::Cpu)),
            )
        })
        .collect()
}
