//! Every way of training a network across devices learns on real data: each mode trains
//! SimpleCNN (4 small modules) for 150 steps of 64 on the first 9,600 Fashion-MNIST images and
//! must pass an accuracy floor on the first 2,000 test images (`--limit-test`; the full 10,000
//! add evaluation time, not information about whether a mode learns). Chance is 10%.
//!
//! Measured on 2026-12-06 (2-core VM, at `b26eb33` with this file; `cargo test -p sid-launch
//! --test learning -- --nocapture` prints them): paper SID on `cpu:2` 51.6%, staged K = 2
//! 57.0%, staged K = 4 60.2%, BP 1F1B 58.7%, staged SID on two ranks 59.8%, two data-parallel
//! replicas 51.2% (on all 10,000 test images, earlier: 52.8, 57.7, 60.6, 60.0, 61.1, 51.8%).
//! On 2,000 images one standard error is about 1.1 points.
//! The floor, 45%, is under every mode's measured accuracy and far above chance: a mode that
//! stops learning (a gradient lost between stages, a schedule that drops micro-batches) fails.
//!
//! Each backbone learns too: VGG-11-BN, ResNet-18 and ViT-Tiny (full size; 28 px inputs, ViT
//! patch 4) train with SID on one device from the first Fashion-MNIST images and are
//! evaluated on the first 500 test images (`--limit-test`: evaluating all 10,000 is what made
//! these runs slow). Their sizes and floors are in [`BACKBONES`].

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

/// SimpleCNN with four small modules, 150 steps of 64 on Fashion-MNIST, one epoch.
const BASE: &str = "--model cnn --modules 4 --feature-dim 64 --module-hidden 64 \
    --limit-train 9600 --limit-test 2000 --batch-size 64 --epochs 1 --telemetry-hz 0 \
    --eval-batch-size 2000";

/// The accuracy every mode must reach.
const FLOOR: f64 = 0.45;

#[test]
fn every_multi_device_mode_learns_fashion_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let (p1, p2) = (common::free_port(), common::free_port());
    let modes = [
        ("paper SID on cpu:2", "--gpus cpu:2".to_string()),
        (
            "staged SID, K = 2 on cpu:2",
            "--gpus cpu:2 --stages 2".into(),
        ),
        (
            "staged SID, K = 4 on cpu:4",
            "--gpus cpu:4 --stages 4".into(),
        ),
        (
            "BP 1F1B, K = 2 on cpu:2",
            "--gpus cpu:2 --stages 2 --method bp".into(),
        ),
        (
            "staged SID, two ranks",
            format!("--stages 2 --nproc-per-node 2 --master-port {p1}"),
        ),
        (
            "SID, two data-parallel replicas",
            format!("--data-parallel 2 --nproc-per-node 2 --master-port {p2}"),
        ),
    ];
    let mut low = Vec::new();
    for (i, (name, flags)) in modes.iter().enumerate() {
        let args = BASE.split_whitespace().chain(flags.split(' '));
        let acc = final_test_acc(&tmp.path().join(format!("run{i}")), args, name);
        eprintln!("{name}: {:.2}%", acc * 100.0);
        if acc < FLOOR {
            low.push(format!("{name}: {:.2}%", acc * 100.0));
        }
    }
    assert!(
        low.is_empty(),
        "under the {:.0}% floor: {low:?}",
        FLOOR * 100.0
    );
}

/// Each backbone's run and floor: (model, training images, batch size, floor).
///
/// Measured on 2026-12-06 (2-core VM loaded by other builds, at `9f40f43`) with
/// `sid-launch --model M --modules 4 --feature-dim 64 --module-hidden 64 --limit-train N
/// --limit-test 500 --batch-size B --epochs 1 --telemetry-hz 0 --eval-batch-size 500`:
/// VGG-11 (1,024 images, batch 32) 43.8% in 21 s of CPU time, ResNet-18 (1,024, 32) 57.6% in
/// 91 s, ViT-Tiny (640, 16) 26.4% in 77 s. ViT-Tiny from scratch learns slowest (26.4% after
/// 40 steps). Each floor is well under its measurement and far over chance (10%). Tried broken:
/// VGG-11 with its backbone frozen (`--backbone-lr 0`, only the modules learn on random
/// features) reaches 29.0% (at `fbe778c`, same day), so its floor is 35%, not 30%; ResNet-18
/// frozen so reaches 10.0%, under its floor. ViT-Tiny frozen reaches 28.6%, above its own
/// trained 26.4%: forty steps from scratch do not yet improve on its random features, so its
/// floor shows that the cascade learns on ViT features, not that the ViT learns; showing that
/// takes a run longer than this suite's budget.
const BACKBONES: [(&str, usize, usize, f64); 3] = [
    ("vgg11", 1024, 32, 0.35),
    ("resnet18", 1024, 32, 0.40),
    ("vit-tiny", 640, 16, 0.18),
];

#[test]
fn each_backbone_learns_fashion_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let mut low = Vec::new();
    for (model, images, batch, floor) in BACKBONES {
        let run = tmp.path().join(model);
        let flags = format!(
            "--model {model} --modules 4 --feature-dim 64 --module-hidden 64 \
             --limit-train {images} --limit-test 500 --batch-size {batch} --epochs 1 \
             --telemetry-hz 0 --eval-batch-size 500"
        );
        let acc = final_test_acc(&run, flags.split_whitespace(), model);
        // The test limit is recorded with the run, like every setting.
        let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(config.contains("limit_test = 500"), "{config}");
        eprintln!("{model}: {:.1}% (floor {:.0}%)", acc * 100.0, floor * 100.0);
        if acc < floor {
            low.push(format!(
                "{model}: {:.1}% under {:.0}%",
                acc * 100.0,
                floor * 100.0
            ));
        }
    }
    assert!(low.is_empty(), "under the floor: {low:?}");
}

/// Trains with `args` into `run` through the real binary and returns the final test accuracy.
fn final_test_acc<'a>(run: &Path, args: impl Iterator<Item = &'a str>, what: &str) -> f64 {
    let out = Command::new(BIN)
        .args(args)
        .arg("--run-dir")
        .arg(run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    summary["final_test_acc"].as_f64().unwrap()
}
