//! The paper's SID as a stage pipeline (the extractor alone on stage 1, module blocks after
//! it, gradients at z sent back to stage 1) is transparent: with W module stages and M
//! micro-batches it gives the single-device `SidNetwork`'s losses and parameters, and the two
//! read each other's checkpoints.

use std::time::Duration;

use sid_core::{LossConfig, NamedTensors, Network, SidNetwork};
use sid_runtime::{Fault, FaultKind, PipelineMethod, StagedConfig, StagedPipeline};
use tch::{Device, Tensor};

mod common;
use common::{batches, model, rng_lock};

fn config(workers: usize, micro_batches: usize) -> StagedConfig {
    let m = model();
    let plan = sid_core::StagePlan::even(&m, 1).unwrap();
    let mut cfg = StagedConfig::new(m, vec![Device::Cpu; workers], plan);
    cfg.method = PipelineMethod::Paper;
    cfg.micro_batches = micro_batches;
    cfg.threads_per_stage = Some(1);
    cfg.timeout = Duration::from_secs(60);
    cfg
}

fn build(workers: usize, micro_batches: usize) -> StagedPipeline {
    let cfg = config(workers, micro_batches);
    tch::manual_seed(5);
    StagedPipeline::new(cfg).unwrap()
}

fn single() -> SidNetwork {
    tch::manual_seed(5);
    SidNetwork::new(&model(), LossConfig::default(), 1e-3, Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[(String, Tensor)], b: &NamedTensors) -> f64 {
    assert_eq!(a.len(), b.len(), "same set of tensors");
    a.iter()
        .map(|(n, t)| (t - b.get(n).unwrap()).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn names(state: &[(String, Tensor)]) -> Vec<String> {
    let mut n: Vec<String> = state.iter().map(|(n, _)| n.clone()).collect();
    n.sort();
    n
}

#[test]
fn module_stages_and_micro_batches_give_the_single_device_sid() {
    let _rng = rng_lock();
    let data = batches(4);
    for workers in [1, 2] {
        for micro in [1, 2] {
            let mut reference = single();
            let mut pipeline = build(workers, micro);
            let what = format!("{workers} module stage(s), {micro} micro-batch(es)");
            assert_eq!(pipeline.layout().len(), workers, "{what}");
            assert_eq!(
                max_abs_diff(
                    &pipeline.state().unwrap(),
                    &NamedTensors::from(reference.state().unwrap())
                ),
                0.0,
                "{what}: same seed, same initial weights"
            );
            let mut got = Vec::new();
            for (x, y) in &data {
                got.extend(pipeline.submit_step(x, y).unwrap());
            }
            got.extend(pipeline.flush().unwrap());
            assert_eq!(got.len(), data.len(), "{what}");
            for ((x, y), b) in data.iter().zip(&got) {
                let a = reference.train_step(x, y).unwrap();
                assert_eq!(b.module_losses.len(), 4, "{what}");
                for (la, lb) in a.module_losses.iter().zip(&b.module_losses) {
                    assert!(
                        (la - lb).abs() < 1e-5 * la.abs().max(1.0),
                        "{what}: {a:?} vs {b:?}"
                    );
                }
            }
            let diff = max_abs_diff(
                &pipeline.state().unwrap(),
                &NamedTensors::from(reference.state().unwrap()),
            );
            assert!(diff < 2e-5, "{what}: parameters differ by {diff}");
            let (x, _) = &data[0];
            let (ca, cb) = (reference.cascade(x).unwrap(), pipeline.cascade(x).unwrap());
            assert_eq!(ca.logits.len(), cb.logits.len());
            for (a, b) in ca.logits.iter().zip(&cb.logits) {
                assert!(a.allclose(b, 1e-4, 1e-4, false), "{what}");
            }
        }
    }
}

#[test]
fn checkpoints_are_those_of_the_single_device_sid() {
    let _rng = rng_lock();
    let data = batches(3);
    // Train the single-device network, resume the pipeline from its checkpoint.
    let mut reference = single();
    for (x, y) in &data[..2] {
        reference.train_step(x, y).unwrap();
    }
    let saved = reference.state().unwrap();
    let mut pipeline = build(2, 2);
    assert_eq!(names(&pipeline.state().unwrap()), names(&saved));
    tch::manual_seed(99);
    pipeline.load_state(&NamedTensors::from(saved)).unwrap();
    let (x, y) = &data[2];
    let a = reference.train_step(x, y).unwrap();
    let b = pipeline.train_step(x, y).unwrap();
    for (la, lb) in a.module_losses.iter().zip(&b.module_losses) {
        assert!((la - lb).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    // And the other way: the pipeline's checkpoint resumes a single-device network.
    let mut resumed = single();
    let theirs = pipeline.state().unwrap();
    resumed.load_state(&NamedTensors::from(theirs)).unwrap();
    let diff = max_abs_diff(
        &resumed.state().unwrap(),
        &NamedTensors::from(pipeline.state().unwrap()),
    );
    assert_eq!(diff, 0.0);
    let diff = max_abs_diff(
        &resumed.state().unwrap(),
        &NamedTensors::from(reference.state().unwrap()),
    );
    assert!(diff < 1e-4, "parameters differ by {diff}");
}

#[test]
fn a_failing_module_stage_stops_the_run_naming_it() {
    let _rng = rng_lock();
    let mut cfg = config(2, 2);
    cfg.fault = Some(Fault {
        worker: 2,
        step: 2,
        kind: FaultKind::Error,
    });
    tch::manual_seed(5);
    let mut pipeline = StagedPipeline::new(cfg).unwrap();
    let data = batches(3);
    pipeline.train_step(&data[0].0, &data[0].1).unwrap();
    let err = pipeline.train_step(&data[1].0, &data[1].1).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("injected error"), "{text}");
    assert!(text.contains("stage 3"), "{text}");
}
