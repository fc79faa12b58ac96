//! The multi-worker runtime against the single-device network: same parameters after N steps
//! (transparency), same inference, and clean failure when a worker fails.

use std::time::{Duration, Instant};

use sid_core::{ExtractorKind, LossConfig, ModelConfig, NamedTensors, Network, SidNetwork};
use sid_runtime::{Fault, FaultKind, Pipeline, PipelineConfig, Placement};
use tch::{Device, Kind, Tensor};

/// Tests seed libtorch's global RNG and build networks from it: one at a time, or another
/// test's draws could land between a seed and the weights it should fix.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn model(modules: usize) -> ModelConfig {
    ModelConfig {
        extractor: ExtractorKind::Mlp,
        in_channels: 1,
        image_size: 12,
        num_classes: 5,
        feature_dim: 16,
        modules,
        module_hidden: 32,
        init: sid_core::Init::default(),
        precision: sid_core::Precision::Fp32,
    }
}

fn batches(n: usize) -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(1234);
    (0..n)
        .map(|_| {
            let x = Tensor::randn([24, 1, 12, 12], (Kind::Float, Device::Cpu));
            let y = Tensor::randint(5, [24], (Kind::Int64, Device::Cpu));
            (x, y)
        })
        .collect()
}

fn config(modules: usize, workers: usize) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(model(modules), vec![Device::Cpu; workers]);
    cfg.loss = LossConfig {
        alpha: 0.5,
        label_smoothing: 0.0,
    };
    cfg.lr = 1e-3;
    cfg
}

fn max_abs_diff(a: &[(String, Tensor)], b: &NamedTensors) -> f64 {
    assert_eq!(a.len(), b.len(), "same set of tensors");
    a.iter()
        .map(|(n, t)| {
            (t.to_kind(Kind::Double).to_device(Device::Cpu)
                - b.get(n)
                    .unwrap()
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu))
            .abs()
            .max()
            .double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn four_workers_match_the_single_device_trainer_after_20_steps() {
    let _rng = rng_lock();
    let data = batches(20);
    tch::manual_seed(0);
    let mut single = SidNetwork::new(&model(4), LossConfig::default(), 1e-3, Device::Cpu).unwrap();
    tch::manual_seed(0);
    let mut pipeline = Pipeline::new(config(4, 4)).unwrap();
    assert_eq!(pipeline.placement().to_spec(), "0:0-0,1:1-1,2:2-2,3:3-3");
    let before = max_abs_diff(
        &pipeline.state().unwrap(),
        &NamedTensors::from(single.state().unwrap()),
    );
    assert_eq!(
        before, 0.0,
        "same seed, same initial weights and optimizer state"
    );
    for (x, y) in &data {
        let a = single.train_step(x, y).unwrap();
        let b = pipeline.train_step(x, y).unwrap();
        for (la, lb) in a.module_losses.iter().zip(&b.module_losses) {
            assert!((la - lb).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
    let diff = max_abs_diff(
        &pipeline.state().unwrap(),
        &NamedTensors::from(single.state().unwrap()),
    );
    assert!(diff < 1e-5, "parameters differ by {diff} after 20 steps");
    let (x, _) = &data[0];
    let ca = single.cascade(x).unwrap();
    let cb = pipeline.cascade(x).unwrap();
    assert_eq!(ca.logits.len(), cb.logits.len());
    for (a, b) in ca.logits.iter().zip(&cb.logits) {
        assert!(a.allclose(b, 1e-5, 1e-5, false));
    }
}

#[test]
fn fused_schedule_on_workers_matches_the_reference_single_device_trainer() {
    let _rng = rng_lock();
    let data = batches(10);
    tch::manual_seed(0);
    let mut single = SidNetwork::new(&model(5), LossConfig::default(), 1e-3, Device::Cpu).unwrap();
    tch::manual_seed(0);
    let mut cfg = config(5, 2);
    cfg.fused_teacher = true;
    let mut pipeline = Pipeline::new(cfg).unwrap();
    for (x, y) in &data {
        single.train_step(x, y).unwrap();
        pipeline.train_step(x, y).unwrap();
    }
    let diff = max_abs_diff(
        &pipeline.state().unwrap(),
        &NamedTensors::from(single.state().unwrap()),
    );
    assert!(
        diff < 1e-5,
        "parameters differ by {diff} after 10 fused steps"
    );
}

#[test]
fn uneven_and_explicit_placements_give_the_same_result() {
    let _rng = rng_lock();
    let data = batches(5);
    let mut finals = Vec::new();
    for (workers, placement) in [(1, None), (2, Some("0:0-3,1:4-4")), (3, None)] {
        tch::manual_seed(5);
        let mut cfg = config(5, workers);
        cfg.placement = placement.map(|p| Placement::parse(p, 5, workers).unwrap());
        let mut pipeline = Pipeline::new(cfg).unwrap();
        for (x, y) in &data {
            pipeline.train_step(x, y).unwrap();
        }
        finals.push(pipeline.state().unwrap());
    }
    let reference = NamedTensors::from(finals.remove(0));
    for f in finals {
        assert!(max_abs_diff(&f, &reference) < 1e-5);
    }
}

#[test]
fn state_round_trips_through_the_workers() {
    let _rng = rng_lock();
    let data = batches(3);
    tch::manual_seed(9);
    let mut a = Pipeline::new(config(4, 2)).unwrap();
    a.train_step(&data[0].0, &data[0].1).unwrap();
    let saved = NamedTensors::from(a.state().unwrap());
    tch::manual_seed(77);
    let mut b = Pipeline::new(config(4, 3)).unwrap();
    b.load_state(&saved).unwrap();
    assert_eq!(max_abs_diff(&b.state().unwrap(), &saved), 0.0);
    let la = a.train_step(&data[1].0, &data[1].1).unwrap();
    let lb = b.train_step(&data[1].0, &data[1].1).unwrap();
    for (x, y) in la.module_losses.iter().zip(&lb.module_losses) {
        assert!((x - y).abs() < 1e-6);
    }
}

fn failing_run(kind: FaultKind, timeout: Duration) -> (String, Duration) {
    let data = batches(4);
    let mut cfg = config(4, 2);
    cfg.fault = Some(Fault {
        worker: 1,
        step: 3,
        kind,
    });
    cfg.timeout = timeout;
    let mut pipeline = Pipeline::new(cfg).unwrap();
    let started = Instant::now();
    for (i, (x, y)) in data.iter().enumerate() {
        match pipeline.train_step(x, y) {
            Ok(_) => assert!(i < 2, "step {} should have failed", i + 1),
            Err(e) => {
                assert_eq!(i, 2, "the fault strikes at step 3");
                let elapsed = started.elapsed();
                drop(pipeline);
                return (e.to_string(), elapsed);
            }
        }
    }
    panic!("no failure");
}

#[test]
fn a_panicking_worker_stops_the_step_with_its_name_and_cause() {
    let _rng = rng_lock();
    let (msg, _) = failing_run(FaultKind::Panic, Duration::from_secs(30));
    assert!(
        msg.contains("worker 1 on cpu failed")
            && msg.contains("panicked: injected fault at step 3"),
        "{msg}"
    );
}

#[test]
fn a_worker_error_is_reported() {
    let _rng = rng_lock();
    let (msg, _) = failing_run(FaultKind::Error, Duration::from_secs(30));
    assert!(
        msg.contains("worker 1 on cpu failed") && msg.contains("injected error"),
        "{msg}"
    );
}

#[test]
fn a_nan_loss_is_reported_as_such_with_the_module() {
    let _rng = rng_lock();
    let (msg, _) = failing_run(FaultKind::Nan, Duration::from_secs(30));
    assert!(
        msg.contains("failed in module 3") && msg.contains("non-finite loss NaN in module 3"),
        "{msg}"
    );
}

#[test]
fn a_hung_worker_times_out_naming_who_waited_for_whom() {
    let _rng = rng_lock();
    let started = Instant::now();
    let (msg, elapsed) = failing_run(FaultKind::Hang, Duration::from_millis(1500));
    assert!(
        msg.contains("coordinator waited") && msg.contains("worker 1 (cpu, modules 3-4)"),
        "{msg}"
    );
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    // Dropping the pipeline does not wait for the hung thread beyond its grace period.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn more_devices_than_modules_is_a_clear_error() {
    let _rng = rng_lock();
    let e = Pipeline::new(config(2, 3)).err().unwrap().to_string();
    assert!(e.contains("3 devices but only 2 modules"), "{e}");
}

/// On a GPU: two workers sharing cuda:0 (each on its own stream) train like the single-device
/// network on cuda:0. Skipped, saying so, where CUDA is not available.
#[test]
fn two_workers_on_one_gpu_match_the_single_device_trainer() {
    if !tch::Cuda::is_available() {
        println!("skipped: CUDA is not available on this machine");
        return;
    }
    let _rng = rng_lock();
    let gpu = Device::Cuda(0);
    let data = batches(10);
    tch::manual_seed(0);
    let mut single = SidNetwork::new(&model(4), LossConfig::default(), 1e-3, gpu).unwrap();
    tch::manual_seed(0);
    let mut cfg = config(4, 2);
    cfg.devices = vec![gpu, gpu];
    let mut pipeline = Pipeline::new(cfg).unwrap();
    for (x, y) in &data {
        let (x, y) = (x.to_device(gpu), y.to_device(gpu));
        let a = single.train_step(&x, &y).unwrap();
        let b = pipeline.train_step(&x, &y).unwrap();
        for (la, lb) in a.module_losses.iter().zip(&b.module_losses) {
            assert!((la - lb).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }
    let diff = max_abs_diff(
        &pipeline.state().unwrap(),
        &NamedTensors::from(single.state().unwrap()),
    );
    assert!(diff < 1e-4, "parameters differ by {diff} after 10 steps");
}
