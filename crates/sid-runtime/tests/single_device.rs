//! The single device — the network's stages one after another in the caller's thread, what
//! `sid-launch` trains on one device — keeps what the trainer relies on: checkpoints that
//! restore training and BatchNorm's statistics exactly, SID and BP on the same weights and
//! names, early exit that skips work without changing an answer, a step captured as one (its
//! losses left on the device), and a non-finite loss named by its module.

use sid_core::{ExtractorKind, Method, ModelConfig, NamedTensors, Network};
use sid_runtime::{StagedConfig, StagedPipeline};
use tch::{Device, Kind, Tensor};

mod common;
use common::{batches, model, rng_lock};

fn single(model: &ModelConfig, method: Method, seed: i64) -> StagedPipeline {
    let mut cfg = StagedConfig::single_device(model.clone(), Device::Cpu, method).unwrap();
    cfg.lr = 1e-2;
    tch::manual_seed(seed);
    StagedPipeline::new(cfg).unwrap()
}

fn weights(net: &mut StagedPipeline) -> Vec<(String, Tensor)> {
    let mut w: Vec<_> = net
        .state()
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("adam."))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[test]
fn a_restored_state_trains_and_evaluates_exactly_as_the_saved_one() {
    let _rng = rng_lock();
    let m = ModelConfig {
        extractor: ExtractorKind::Vgg11,
        ..model()
    };
    let data = batches(3);
    let mut a = single(&m, Method::Sid, 4);
    for (x, y) in &data[..2] {
        a.train_step(x, y).unwrap();
    }
    let saved = a.state().unwrap();
    let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"extractor.block1.bn.running_mean"));
    assert!(names.contains(&"adam.module_4.module_4.fc1.weight.exp_avg"));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("adam.") && n.contains("running")),
        "buffers get no Adam moments"
    );
    let saved = NamedTensors::from(saved);
    let mean = saved.get("extractor.block1.bn.running_mean").unwrap();
    assert!(mean.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let mut b = single(&m, Method::Sid, 99);
    b.load_state(&saved).unwrap();
    let (x, y) = &data[2];
    assert!(a.cascade(x).unwrap().logits[3].equal(&b.cascade(x).unwrap().logits[3]));
    assert_eq!(a.train_step(x, y).unwrap(), b.train_step(x, y).unwrap());
    assert_eq!(weights(&mut a).len(), weights(&mut b).len());
    for ((n, t), (_, u)) in weights(&mut a).iter().zip(&weights(&mut b)) {
        assert!(t.equal(u), "{n}");
    }
    // BP, from the same seed, has the same weights and buffers under the same names.
    let mut bp = single(&m, Method::Bp, 99);
    let mut sid = single(&m, Method::Sid, 99);
    let (wb, ws) = (weights(&mut bp), weights(&mut sid));
    assert_eq!(wb.len(), ws.len());
    for ((n, t), (k, u)) in wb.iter().zip(&ws) {
        assert_eq!(n, k);
        assert!(t.equal(u), "{n}");
    }
}

#[test]
fn early_exit_skipping_work_equals_exits_read_off_the_whole_cascade() {
    let _rng = rng_lock();
    let m = ModelConfig {
        extractor: ExtractorKind::Mlp,
        ..model()
    };
    let mut net = single(&m, Method::Sid, 2);
    let data = batches(1);
    let (x, y) = &data[0];
    for _ in 0..30 {
        net.train_step(x, y).unwrap();
    }
    for tau in [0.3, 0.5, 0.8, 1.1] {
        let fast = net.cascade_exit(x, tau).unwrap();
        let whole = sid_core::early_exit(&net.cascade(x).unwrap().logits, tau);
        assert_eq!(fast.exit_module, whole.exit_module, "tau {tau}");
        assert_eq!(fast.prediction, whole.prediction, "tau {tau}");
        assert!(fast
            .confidence
            .allclose(&whole.confidence, 1e-6, 1e-6, false));
    }
    let some = net.cascade_exit(x, 0.3).unwrap().exit_module;
    assert!(
        some.min().int64_value(&[]) < 4,
        "confident samples leave early"
    );
}

/// What a CUDA graph captures: the same step, its losses on the device, read afterwards.
#[test]
fn a_queued_step_is_the_step_with_its_losses_read_later() {
    let _rng = rng_lock();
    let data = batches(3);
    for method in [Method::Sid, Method::Bp] {
        let mut a = single(&model(), method, 6);
        let mut b = single(&model(), method, 6);
        for (x, y) in &data {
            let want = a.train_step(x, y).unwrap();
            let losses = b.train_step_queued(x, y).unwrap();
            assert_eq!(b.read_step(&losses).unwrap(), want, "{method}");
        }
        for ((n, t), (_, u)) in weights(&mut a).iter().zip(&weights(&mut b)) {
            assert!(t.equal(u), "{method}: {n}");
        }
    }
}

#[test]
fn a_non_finite_loss_is_named_by_its_module() {
    let _rng = rng_lock();
    let mut net = single(&model(), Method::Sid, 1);
    let data = batches(1);
    let (x, y) = &data[0];
    let err = net.train_step(&(x * f64::NAN), y).unwrap_err().to_string();
    assert!(err.contains("module 1"), "{err}");
    assert!(err.contains("NaN"), "{err}");
}

/// Trains a small SID network on cuda:0 as the trainer does there, through a CUDA graph or
/// not, for `steps` steps: every step's loss and the final parameters.
fn train_on_gpu(graph: bool, steps: usize) -> (Vec<f64>, Vec<(String, Tensor)>) {
    use sid_core::graph::GraphedStep;
    let gpu = Device::Cuda(0);
    let m = ModelConfig {
        extractor: ExtractorKind::Mlp,
        image_size: 12,
        feature_dim: 16,
        modules: 3,
        module_hidden: 32,
        ..model()
    };
    tch::manual_seed(0);
    let cfg = StagedConfig::single_device(m, gpu, Method::Sid).unwrap();
    let mut net = StagedPipeline::new(cfg).unwrap();
    let mut stepper = match graph {
        true => GraphedStep::new(gpu).unwrap(),
        false => GraphedStep::off(),
    };
    let mut news = Vec::new();
    let mut losses = Vec::new();
    for step in 0..steps {
        tch::manual_seed(1000 + step as i64);
        let x = Tensor::randn([24, 1, 12, 12], (Kind::Float, gpu));
        let y = Tensor::randint(5, [24], (Kind::Int64, gpu));
        let stats = stepper
            .network(&mut net, &x, &y, |n| news.push(n.to_string()))
            .unwrap();
        losses.push(stats.loss);
    }
    if graph {
        assert_eq!(news, ["CUDA graph captured: later steps replay it"]);
    }
    (losses, net.state().unwrap())
}

/// On a GPU: steps replayed from a CUDA graph give bit-identical losses and parameters to
/// eager steps. Ignored by default; `--include-ignored` without CUDA or CUDA graphs fails.
#[test]
#[ignore = "needs CUDA and CUDA graphs (run on a GPU machine with --include-ignored)"]
fn graph_replay_equals_eager_steps_bit_for_bit() {
    assert!(tch::Cuda::is_available(), "needs CUDA: not available here");
    assert!(
        sid_core::graph::CudaGraph::available(),
        "needs a build with CUDA graphs"
    );
    let _rng = rng_lock();
    let (eager, eager_state) = train_on_gpu(false, 12);
    let before = sid_core::graph::counts();
    let (graph, graph_state) = train_on_gpu(true, 12);
    // The graph was in effect: captured once, then every step after the three warm-up steps
    // (the captured one included) replayed. SID_NO_CUDA_GRAPH=1 makes this fail.
    let after = sid_core::graph::counts();
    assert_eq!(after.captured - before.captured, 1, "captures");
    assert_eq!(after.replays - before.replays, 12 - 3, "replays");
    assert_eq!(eager, graph, "per-step losses");
    for ((n, a), (_, b)) in eager_state.iter().zip(&graph_state) {
        assert!(a.equal(b), "{n} differs");
    }
}

/// `--backbone-lr 0` freezes the backbone's blocks, on one device (SID and BP) and in stages,
/// while the head, the necks and the modules go on learning.
#[test]
fn a_backbone_learning_rate_of_zero_freezes_the_blocks_only() {
    let _rng = rng_lock();
    let data = batches(2);
    let staged = |m: &ModelConfig| {
        let plan = sid_core::StagePlan::even(m, 2).unwrap();
        StagedConfig::new(m.clone(), vec![Device::Cpu], plan)
    };
    let configs = [
        StagedConfig::single_device(model(), Device::Cpu, Method::Sid).unwrap(),
        StagedConfig::single_device(model(), Device::Cpu, Method::Bp).unwrap(),
        staged(&model()),
    ];
    for mut cfg in configs {
        cfg.backbone_lr = Some(0.0);
        tch::manual_seed(3);
        let mut net = StagedPipeline::new(cfg).unwrap();
        let before = weights(&mut net);
        for (x, y) in &data {
            net.train_step(x, y).unwrap();
        }
        let after = weights(&mut net);
        let blocks: Vec<String> = sid_core::Backbone::block_names(&model())
            .iter()
            .map(|b| format!("extractor.{b}."))
            .collect();
        for ((n, t), (_, u)) in before.iter().zip(&after) {
            let block = blocks.iter().any(|b| n.starts_with(b.as_str()));
            assert_eq!(t.equal(u), block, "{n}: frozen only if a block's");
        }
    }
}
