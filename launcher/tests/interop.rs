//! PyTorch interop checked against the real references, not against sid itself: torchvision's
//! resnet18 and vgg11_bn and timm's ViT with random weights, made in the project's `.venv`
//! (`launcher/tests/python/interop_reference.py`), loaded into sid by their own names
//! (`--init-from`'s path), compared feature by feature; a trained run exported and read back
//! by `python/sid_model.py`; every layout started from a reference file; TensorBoard's own
//! reader on `--tensorboard`'s files.
//!
//! Where `.venv` lacks torchvision, timm, safetensors or tensorboard (`scripts/setup.sh
//! --no-build` installs them) these tests fail, saying so, unless `SID_SKIP_INTEROP=1` asks
//! to skip them: a skip is chosen, never silent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sid_core::torch_names;
use sid_core::{ExtractorKind, ModelConfig};
use tch::nn::ModuleT;
use tch::{Device, Tensor};

mod common;
use common::{free_port, write_cifar10};

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The project's Python with every package these tests use, or `None` when the test is to
/// be skipped (`SID_SKIP_INTEROP=1`); otherwise a missing package fails the test.
fn python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args([
            "-c",
            "import torch, torchvision, timm, safetensors, tensorboard",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let skip = std::env::var("SID_SKIP_INTEROP").is_ok_and(|v| v == "1");
    assert!(
        skip,
        ".venv/bin/python cannot import torch, torchvision, timm, safetensors and tensorboard (scripts/setup.sh --no-build installs them); SID_SKIP_INTEROP=1 skips this test"
    );
    eprintln!("skipped: SID_SKIP_INTEROP=1 and the Python packages are missing");
    None
}

/// Runs the test helper script with `args`; its failure fails the test with its output.
fn helper(py: &Path, args: &[&str]) {
    let script = root().join("launcher/tests/python/interop_reference.py");
    let out = Command::new(py)
        .arg("-W")
        .arg("ignore")
        .arg(&script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "interop_reference.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sid(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn sid_ok(args: &[String]) -> String {
    let out = sid(args);
    assert!(
        out.status.success(),
        "sid-launch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Largest absolute difference, and the reference's largest value.
fn diff(ours: &Tensor, theirs: &Tensor) -> (f64, f64) {
    assert_eq!(ours.size(), theirs.size());
    let d = (ours - theirs).abs().max().double_value(&[]);
    (d, theirs.abs().max().double_value(&[]))
}

fn assert_close(what: &str, ours: &Tensor, theirs: &Tensor) {
    let (d, scale) = diff(ours, theirs);
    assert!(
        scale > 1e-3,
        "{what}: the reference is all zeros, which proves nothing"
    );
    assert!(
        d <= 1e-4 * scale.max(1.0),
        "{what}: differs from the reference by {d} (largest value {scale})"
    );
}

/// One reference model of `kind` at `channels`×`side`² loaded into sid through `--init-from`'s
/// path, against the reference's features on the same input, in eval and train mode; then the
/// head (pool, ViT's final LayerNorm, sid's fresh linear) on the reference's features.
fn compare_features(kind: ExtractorKind, channels: i64, side: i64) {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let name = kind.to_string();
    helper(
        &py,
        &[
            "features",
            &name,
            &channels.to_string(),
            &side.to_string(),
            tmp.path().to_str().unwrap(),
        ],
    );
    let model = ModelConfig {
        extractor: kind,
        in_channels: channels,
        image_size: side,
        num_classes: 10,
        feature_dim: 16,
        ..ModelConfig::default()
    };
    let weights = tmp.path().join("weights.safetensors");
    let imported = sid_train::interop::read_reference(&weights, &model).unwrap();
    if channels == 1 {
        assert_eq!(imported.notes.len(), 1, "the grey-scale stem is said");
    }
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let ext = sid_core::Extractor::new(&(vs.root() / "extractor"), &model).unwrap();
    let mut state = sid_core::network::var_store_state(&vs);
    torch_names::overwrite(&mut state, &imported.tensors).unwrap();
    sid_core::network::load_var_store(&vs, &state.into()).unwrap();
    let io = sid_train::interop::read_weights(&tmp.path().join("io.safetensors")).unwrap();
    let x = &io["x"];
    let vars = vs.variables();
    for (mode, train) in [("eval", false), ("train", true)] {
        let what = format!("{name} {channels}x{side} {mode}");
        let h = tch::no_grad(|| ext.features_t(x, train));
        assert_close(&format!("{what} features"), &h, &io[mode]);
        // The head on the reference's features: spatial mean, or the class token after
        // timm's final norm, then sid's own linear to d.
        let (pooled, fc) = match kind {
            ExtractorKind::VitTiny => (io[&format!("{mode}_normed")].select(1, 0), "head.fc"),
            _ => (io[mode].mean_dim([2i64, 3].as_slice(), false, None), "fc"),
        };
        let want = pooled.linear(
            &vars[&format!("extractor.{fc}.weight")],
            Some(&vars[&format!("extractor.{fc}.bias")]),
        );
        let z = tch::no_grad(|| ext.forward_t(x, train));
        assert_close(&format!("{what} head"), &z, &want);
    }
    // Train and eval differ where there is BatchNorm: the comparison covered both.
    let bn = !matches!(kind, ExtractorKind::VitTiny);
    let (d, _) = diff(&io["eval"], &io["train"]);
    assert_eq!(
        d > 1e-3,
        bn,
        "{name}: train and eval mode differ only with BatchNorm"
    );
}

/// torchvision's resnet18 with the small-input stem (3×3 stride 1, no max-pool: sid's layout up
/// to 64 px) at 32 px.
#[test]
fn resnet18_computes_torchvisions_features_small_stem() {
    compare_features(ExtractorKind::Resnet18, 3, 32);
}

/// torchvision's resnet18 as it is (7×7 stride-2 stem, max-pool) above 64 px.
#[test]
fn resnet18_computes_torchvisions_features_imagenet_stem() {
    compare_features(ExtractorKind::Resnet18, 3, 72);
}

/// torchvision's vgg11_bn features at 32 px (every pool), and a grey-scale run, whose summed
/// first convolution must give the reference's features of the grey image in R, G and B.
#[test]
fn vgg11_computes_torchvisions_features_colour_and_grey() {
    compare_features(ExtractorKind::Vgg11, 3, 32);
    compare_features(ExtractorKind::Vgg11, 1, 32);
}

/// timm's vit_tiny_patch16_224 layout at 32 px with patch 4.
#[test]
fn vit_tiny_computes_timms_features() {
    compare_features(ExtractorKind::VitTiny, 3, 32);
}

/// A small CIFAR-10 (320 training, 64 test images) and the common flags of a short run on it.
fn cifar_run(dir: &Path, model: &str, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = strings(&[
        "--dataset",
        "cifar10",
        "--data-dir",
        dir.to_str().unwrap(),
        "--model",
        model,
        "--modules",
        "4",
        "--feature-dim",
        "32",
        "--module-hidden",
        "32",
        "--limit-train",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--eval-batch-size",
        "64",
        "--telemetry-hz",
        "0",
        "--no-augment",
        "--threads",
        "1",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    v.extend(strings(extra));
    v
}

/// The accuracy (%) and mean modules of `eval`'s row for `tau` (`full` for the cascade).
fn eval_row(table: &str, tau: &str) -> (f64, f64) {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(tau))
        .unwrap_or_else(|| panic!("no row {tau} in\n{table}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    (
        cols[1].trim_end_matches('%').parse().unwrap(),
        cols[2].parse().unwrap(),
    )
}

/// A staged VGG-11 run (two stages, so two necks; BatchNorm, so eval mode matters) started
/// from torchvision weights, exported, and read back by `python/sid_model.py`: the same logits
/// as sid's own cascade on the test set, and the same accuracy and modules used as
/// `sid-launch eval`, for the full cascade and with early exit.
#[test]
fn an_exported_run_predicts_in_pytorch_as_sid_eval_does() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar10(&data, 64);
    helper(
        &py,
        &["features", "vgg11", "3", "32", tmp.path().to_str().unwrap()],
    );
    let weights = tmp.path().join("weights.safetensors");
    let run = tmp.path().join("run");
    sid_ok(&cifar_run(
        &data,
        "vgg11",
        &run,
        &[
            "--stages",
            "2",
            "--gpus",
            "cpu:2",
            "--init-from",
            weights.to_str().unwrap(),
        ],
    ));
    let exported = tmp.path().join("model.safetensors");
    let said = sid_ok(&strings(&[
        "export",
        run.to_str().unwrap(),
        exported.to_str().unwrap(),
    ]));
    assert!(
        said.contains("torchvision vgg11_bn names") && said.contains("2 stage(s)"),
        "{said}"
    );
    // sid's own logits on the test set, next to the inputs, for the Python side.
    let mut saved = sid_train::eval::open(&run, None).unwrap();
    let (x, y) = sid_data::batch(&saved.data.test, None, 64, 0);
    let cascade = saved.net.cascade(&x).unwrap();
    let mut io: Vec<(String, Tensor)> = vec![("x".into(), x), ("y".into(), y)];
    for (i, l) in cascade.logits.iter().enumerate() {
        io.push((format!("logits_{i}"), l.shallow_clone()));
    }
    let io_path = tmp.path().join("io.safetensors");
    sid_train::interop::save_weights(&io_path, &io, HashMap::new()).unwrap();
    // A low threshold: these barely trained modules are never very confident, and some
    // samples must leave early for early exit to be compared.
    let tau = "0.12";
    let table = sid_ok(&strings(&[
        "eval",
        run.to_str().unwrap(),
        "--exit-confidence",
        tau,
    ]));
    let json = tmp.path().join("roundtrip.json");
    helper(
        &py,
        &[
            "roundtrip",
            exported.to_str().unwrap(),
            io_path.to_str().unwrap(),
            tau,
            json.to_str().unwrap(),
        ],
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = |k: &str| r[k].as_f64().unwrap();
    assert_eq!(r["modules"].as_u64(), Some(4));
    assert!(
        f("max_logit_diff") <= 1e-4 * f("logit_scale").max(1.0),
        "logits differ: {r}"
    );
    let (full, full_modules) = eval_row(&table, "full");
    let (early, early_modules) = eval_row(&table, tau);
    assert_eq!(full_modules, 4.0);
    assert!(
        (f("full_accuracy") * 100.0 - full).abs() < 0.006,
        "{r} against\n{table}"
    );
    assert!(
        (f("early_accuracy") * 100.0 - early).abs() < 0.006,
        "{r} against\n{table}"
    );
    assert!(
        (f("early_mean_modules") - early_modules).abs() < 0.006,
        "{r} against\n{table}"
    );
    assert!(
        early_modules < 4.0,
        "no sample left early at τ = {tau}: early exit went unchecked\n{table}"
    );
}

/// Every layout starts from the reference file: one device, two stages, the paper mode and
/// two ranks each train a ViT (no BatchNorm, so nothing but Adam moves a weight) with a
/// learning rate of 1e-30, which leaves every weight as loaded; the exported backbone must
/// then be the timm file's.
#[test]
fn every_layout_starts_from_the_reference_weights() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar10(&data, 64);
    helper(
        &py,
        &[
            "features",
            "vit-tiny",
            "3",
            "32",
            tmp.path().to_str().unwrap(),
        ],
    );
    let weights = tmp.path().join("weights.safetensors");
    let timm = sid_train::interop::read_weights(&weights).unwrap();
    let port = free_port();
    for (name, extra) in [
        ("single", vec![]),
        ("stages", vec!["--stages", "2", "--gpus", "cpu:2"]),
        ("paper", vec!["--gpus", "cpu:2"]),
        (
            "ranks",
            vec![
                "--stages",
                "2",
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
            ],
        ),
    ] {
        let run = tmp.path().join(name);
        let mut extra = extra;
        extra.extend(["--init-from", weights.to_str().unwrap(), "--lr", "1e-30"]);
        let out = sid(&cifar_run(&data, "vit-tiny", &run, &extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        assert!(
            err.contains("note: --init-from") && err.contains("timm vit_tiny_patch16_224"),
            "{name}: the load is said\n{err}"
        );
        let exported = tmp.path().join(format!("{name}.safetensors"));
        sid_ok(&strings(&[
            "export",
            run.to_str().unwrap(),
            exported.to_str().unwrap(),
        ]));
        let ours = sid_train::interop::read_weights(&exported).unwrap();
        let mut compared = 0;
        for (n, t) in &timm {
            if n.starts_with("head.") {
                continue; // the classifier, not loaded
            }
            let (d, _) = diff(&ours[n], t);
            assert!(d <= 1e-6, "{name}: {n} differs from the file by {d}");
            compared += 1;
        }
        assert_eq!(compared, 150, "{name}");
        // The neck and modules are sid's own, freshly drawn.
        assert!(ours.contains_key("sid.extractor.head.fc.weight"), "{name}");
        assert!(ours.contains_key("sid.module_4.fc2.bias"), "{name}");
    }
}

/// Bad weight files stop the run before it trains, each with one line and a non-zero exit:
/// a PyTorch pickle, a truncated file, another model's names, a ResNet with the ImageNet stem
/// where sid has the small-input one, and a backbone without reference layout.
#[test]
fn bad_weight_files_are_one_line_errors() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar10(&data, 64);
    let pickle = tmp.path().join("model.pth");
    helper(&py, &["pickle", pickle.to_str().unwrap()]);
    let vit = tmp.path().join("vit");
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&vit).unwrap();
    std::fs::create_dir_all(&big).unwrap();
    helper(
        &py,
        &["features", "vit-tiny", "3", "32", vit.to_str().unwrap()],
    );
    helper(
        &py,
        &["features", "resnet18", "3", "72", big.to_str().unwrap()],
    );
    let bytes = std::fs::read(vit.join("weights.safetensors")).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    for (model, file, says) in [
        ("resnet18", p(&pickle), "PyTorch pickle"),
        ("vit-tiny", p(&cut), "truncated"),
        (
            "resnet18",
            p(&vit.join("weights.safetensors")),
            "100 missing: conv1.weight",
        ),
        (
            "resnet18",
            p(&big.join("weights.safetensors")),
            "ImageNet stem",
        ),
        (
            "cnn",
            p(&vit.join("weights.safetensors")),
            "reference layout",
        ),
    ] {
        let run = tmp.path().join(format!("run-{}", says.replace(' ', "-")));
        let out = sid(&cifar_run(&data, model, &run, &["--init-from", &file]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{model} {file}: accepted\n{err}");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error:") && last.contains(says),
            "{model} {file}: {says:?} expected in one line, got\n{err}"
        );
        assert!(
            !run.join("metrics.jsonl").exists(),
            "{model}: trained anyway"
        );
    }
}

/// `--tensorboard DIR`: TensorBoard's own reader finds, for each epoch, the values of
/// `metrics.jsonl` (train loss, every module's test accuracy, samples/s, peak memory) and the
/// learning rate, and a train loss for every step.
#[test]
fn tensorboard_events_hold_the_metrics() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    write_cifar10(&data, 64);
    let run = tmp.path().join("run");
    let tb = tmp.path().join("tb");
    sid_ok(&cifar_run(
        &data,
        "mlp",
        &run,
        &[
            "--epochs",
            "2",
            "--lr",
            "0.002",
            "--tensorboard",
            tb.to_str().unwrap(),
        ],
    ));
    let json = tmp.path().join("events.json");
    helper(
        &py,
        &["events", tb.to_str().unwrap(), json.to_str().unwrap()],
    );
    let events: HashMap<String, Vec<(i64, f64)>> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 2);
    let steps = 64 / 16;
    let series = |tag: &str| -> Vec<(i64, f64)> {
        events
            .get(tag)
            .cloned()
            .unwrap_or_else(|| panic!("no {tag} among {:?}", events.keys()))
    };
    // Event values are float32.
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    let check = |tag: &str, key: &dyn Fn(&serde_json::Value) -> f64| {
        let s = series(tag);
        assert_eq!(s.len(), metrics.len(), "{tag}");
        for (m, (step, v)) in metrics.iter().zip(&s) {
            let epoch = m["epoch"].as_i64().unwrap();
            assert_eq!(
                *step,
                epoch * steps,
                "{tag}: an epoch's values sit at its last step"
            );
            assert!(
                same(*v, key(m)),
                "{tag} epoch {epoch}: {v} against {}",
                key(m)
            );
        }
    };
    check("train/loss", &|m| m["train_loss"].as_f64().unwrap());
    check("test/accuracy", &|m| m["test_acc"].as_f64().unwrap());
    for i in 0..4 {
        check(&format!("test/module_{}_accuracy", i + 1), &|m| {
            m["module_test_acc"][i].as_f64().unwrap()
        });
        check(&format!("train/module_{}_loss", i + 1), &|m| {
            m["module_train_loss"][i].as_f64().unwrap()
        });
    }
    check("speed/samples_per_second", &|m| {
        m["samples_per_second"].as_f64().unwrap()
    });
    check("memory/cpu_peak_mib", &|m| {
        m["peak_memory"][0]["bytes"].as_f64().unwrap() / (1 << 20) as f64
    });
    check("optim/learning_rate", &|_| 0.002);
    let step_loss = series("train/step_loss");
    assert_eq!(
        step_loss.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=2 * steps).collect::<Vec<_>>()
    );
    // An epoch's train loss is the mean of its steps'.
    let first: f64 = step_loss[..steps as usize].iter().map(|s| s.1).sum::<f64>() / steps as f64;
    assert!((first - metrics[0]["train_loss"].as_f64().unwrap()).abs() < 1e-4);
}
