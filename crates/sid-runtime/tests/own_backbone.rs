//! A backbone of the caller's own (the example's `SmallNet`) in the stage pipeline: staged SID
//! and its BP twin both learn, and two stages on two threads give the parameters of the same
//! stages run one after another.

use std::sync::Arc;

use sid_core::{Backbone, NamedTensors, Network};
use sid_runtime::{BpSchedule, PipelineMethod, StagedPipeline};
use tch::{Device, Kind, Tensor};

mod common;
use common::rng_lock;

#[allow(dead_code)] // its `main` and data loading are the example's
#[path = "../examples/own_backbone.rs"]
mod example;
use example::{config, train, SmallNet};

/// 12 px grey images: two pools leave 3×3 maps.
fn backbone() -> Arc<dyn Backbone> {
    Arc::new(SmallNet {
        channels: 1,
        side: 12,
    })
}

fn pipeline(method: PipelineMethod, devices: usize) -> StagedPipeline {
    let model = sid_core::ModelConfig {
        image_size: 12,
        ..example::model()
    };
    let cfg = config(&model, backbone(), method, devices).unwrap();
    tch::manual_seed(3);
    StagedPipeline::new(cfg).unwrap()
}

/// The same 16 labelled images `steps` times, seeded.
fn data(steps: usize) -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(11);
    let x = Tensor::randn([16, 1, 12, 12], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [16], (Kind::Int64, Device::Cpu));
    (0..steps).map(|_| (x.copy(), y.copy())).collect()
}

#[test]
fn staged_sid_and_its_bp_twin_learn() {
    let _rng = rng_lock();
    let data = data(12);
    for method in [
        PipelineMethod::Sid,
        PipelineMethod::Bp(BpSchedule::OneFOneB),
    ] {
        let mut p = pipeline(method, 2);
        assert!(p.threaded());
        let losses = train(&mut p, &data).unwrap();
        assert_eq!(losses.len(), data.len());
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.8 * first, "{method:?}: {losses:?}");
    }
}

#[test]
fn two_threads_equal_the_stages_one_after_another() {
    let _rng = rng_lock();
    let data = data(4);
    let mut threads = pipeline(PipelineMethod::Sid, 2);
    let mut one = pipeline(PipelineMethod::Sid, 1);
    assert!(!one.threaded());
    // Each stage thread runs one intra-op thread; the stages one after another run in this
    // thread, which must then run one too. Otherwise reductions sum in another order, and
    // Adam turns those last-bit differences in near-zero gradients into steps of up to lr.
    tch::set_num_threads(1);
    let (a, b) = (
        train(&mut threads, &data).unwrap(),
        train(&mut one, &data).unwrap(),
    );
    for (u, v) in a.iter().zip(&b) {
        assert!((u - v).abs() <= 1e-5 * v.abs().max(1.0), "{a:?} vs {b:?}");
    }
    // The same operations; only the threads' intra-op parallelism may differ (float tolerance).
    let reference = NamedTensors::from(one.state().unwrap());
    let state = threads.state().unwrap();
    assert_eq!(state.len(), reference.len());
    for (name, t) in &state {
        let d = (t - reference.get(name).unwrap())
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-6, "{name} differs by {d}");
    }
    // The blocks' variables carry their names: the BP pipeline groups them by it.
    assert!(state
        .iter()
        .any(|(n, _)| n == "extractor.mid.bn.running_mean"));
    assert!(state.iter().any(|(n, _)| n == "extractor.fc.weight"));
}
