//! Every way of training a network across devices learns on real data: each mode trains
//! SimpleCNN (4 small modules) for 150 steps of 64 on the first 9,600 Fashion-MNIST images and
//! must pass an accuracy floor on the 10,000 test images. Chance is 10%.
//!
//! Measured on 2026-12-06 (2-core VM, commit after `9fad85b`; `cargo test -p sid-launch --test
//! learning -- --nocapture` prints them): paper SID on `cpu:2` 52.8%, staged K = 2 57.7%, staged
//! K = 4 60.6%, BP 1F1B 60.0%, staged SID on two ranks 61.1%, two data-parallel replicas 51.8%.
//! The floor, 45%, is under every mode's measured accuracy and far above chance: a mode that
//! stops learning (a gradient lost between stages, a schedule that drops micro-batches) fails.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

/// SimpleCNN with four small modules, 150 steps of 64 on Fashion-MNIST, one epoch.
const BASE: &str = "--model cnn --modules 4 --feature-dim 64 --module-hidden 64 \
    --limit-train 9600 --batch-size 64 --epochs 1 --telemetry-hz 0 --eval-batch-size 2000";

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
        let run = tmp.path().join(format!("run{i}"));
        let out = Command::new(BIN)
            .args(BASE.split_whitespace())
            .args(flags.split(' '))
            .arg("--run-dir")
            .arg(&run)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        let acc = summary["final_test_acc"].as_f64().unwrap();
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
