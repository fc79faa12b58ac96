//! `sid-launch` under torchrun itself (PyTorch's launcher from the project's `.venv`, made by
//! `scripts/setup.sh`): two ranks on this machine, two data-parallel replicas, train as one
//! process does. Where `.venv/bin/torchrun` is missing it fails, saying so, unless
//! `SID_SKIP_TORCHRUN=1` asks to skip it: a skip is chosen, never silent.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

fn torchrun() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/torchrun");
    path.exists().then_some(path)
}

/// A short run: MLP, 3 modules, the first 1024 samples, one epoch, one thread per rank.
fn args(run_dir: &Path) -> Vec<String> {
    [
        "--model",
        "mlp",
        "--modules",
        "3",
        "--limit-train",
        "1024",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--telemetry-hz",
        "0",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([run_dir.display().to_string()])
    .collect()
}

/// The final epoch's train loss and test accuracy.
fn last_epoch(run_dir: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    (
        m["train_loss"].as_f64().unwrap(),
        m["test_acc"].as_f64().unwrap(),
    )
}

#[test]
fn two_replicas_under_torchrun_train_like_one_process() {
    let Some(torchrun) = torchrun() else {
        let skip = std::env::var("SID_SKIP_TORCHRUN").is_ok_and(|v| v == "1");
        assert!(
            skip,
            ".venv/bin/torchrun is missing (scripts/setup.sh --no-build makes it); SID_SKIP_TORCHRUN=1 skips this test"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let out = Command::new(BIN).args(args(&one)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-port", &free_port()])
        .arg("--no-python")
        .arg(BIN)
        .args(args(&two))
        .args(["--data-parallel", "2"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "torchrun failed:\n{text}");
    // torchrun's variables placed the second replica in rank 1, and rank 1 served it.
    assert!(text.contains("stage 1 of replica 2 (rank 1, cpu"), "{text}");
    assert!(text.contains("rank 1 of 2 on cpu: serving"), "{text}");
    assert!(two.join("checkpoint.safetensors").exists(), "{text}");
    // Two replicas on half batches each compute what one process does on whole batches.
    let ((l1, a1), (l2, a2)) = (last_epoch(&one), last_epoch(&two));
    assert!(
        (l1 - l2).abs() <= 1e-5 * l1.abs(),
        "train loss {l1} vs {l2}"
    );
    assert!((a1 - a2).abs() <= 0.005, "test accuracy {a1} vs {a2}");
}
