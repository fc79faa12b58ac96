//! Recorded training trajectories: every way `sid-launch` can train a network, 20 steps on the
//! CPU with one thread per stage and seed 0, must keep giving the per-step losses recorded in
//! `tests/fixtures/trajectories.json`, bit for bit. They were recorded before the runtime was
//! restructured, so they hold any later change of the runtime to the numbers it had.
//!
//! Each run's checkpoint layout (every tensor's name, dtype and shape) and `config.toml` were
//! recorded with them: a checkpoint written then loads now, and a saved config still resumes.
//!
//! Re-record (only when a change of the numbers is intended, and say why in the commit):
//! `SID_RECORD_TRAJECTORIES=1 cargo test -p sid-launch --test trajectories`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{free_port, write_cifar10};

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// SimpleCNN with four small modules on the 320 training images of a small CIFAR-10
/// (`write_cifar10(dir, 64)`): 20 steps of 16.
const BASE: &[&str] = &[
    "--dataset",
    "cifar10",
    "--model",
    "cnn",
    "--modules",
    "4",
    "--feature-dim",
    "32",
    "--module-hidden",
    "32",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--seed",
    "0",
    "--threads",
    "1",
    "--telemetry-hz",
    "0",
    "--log-steps",
];

/// The fixed two-stage cut (an `auto` cut is timed, so it could differ between runs).
const CUT: &str = "blocks=0-1,2-3;modules=0-1,2-3";

/// Each mode's flags on top of [`BASE`] (one string, split at spaces).
fn modes(port: &str) -> Vec<(&'static str, Vec<String>)> {
    let staged = format!("--gpus cpu:2 --stages 2 --placement {CUT}");
    let bp = format!("{staged} --method bp --micro-batches 4 --pipeline-schedule");
    [
        ("sid", "--gpus cpu".to_string()),
        ("sid-fused", "--gpus cpu --fused-teacher".into()),
        ("bp", "--gpus cpu --method bp".into()),
        ("paper-cpu2", "--gpus cpu:2".into()),
        ("staged-k2-m1", format!("{staged} --micro-batches 1")),
        ("staged-k2-m4", format!("{staged} --micro-batches 4")),
        ("bp-gpipe", format!("{bp} gpipe")),
        ("bp-1f1b", format!("{bp} 1f1b")),
        (
            "staged-2-ranks-gloo",
            format!("--stages 2 --placement {CUT} --nproc-per-node 2 --master-port {port}"),
        ),
    ]
    .into_iter()
    .map(|(name, flags)| (name, flags.split(' ').map(String::from).collect()))
    .collect()
}

/// What one mode's run left: its per-step losses, its checkpoint's layout, its config.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Recorded {
    losses: Vec<f64>,
    /// `name: dtype [shape]` of every tensor in `checkpoint.safetensors`.
    checkpoint: Vec<String>,
    config: String,
}

/// The tensors of a safetensors file, from its header: `name: dtype [shape]`, sorted.
fn layout(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut v: Vec<String> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| format!("{k}: {} {}", t["dtype"], t["shape"]))
        .collect();
    v.sort();
    v
}

/// Runs one mode and returns what it left.
fn record(data: &Path, run: &Path, extra: &[String]) -> Recorded {
    let losses = losses(data, run, extra);
    Recorded {
        losses,
        checkpoint: layout(&run.join("checkpoint.safetensors")),
        config: std::fs::read_to_string(run.join("config.toml")).unwrap(),
    }
}

/// Runs one mode and returns its per-step losses from `steps.jsonl`.
fn losses(data: &Path, run: &Path, extra: &[String]) -> Vec<f64> {
    let out = Command::new(BIN)
        .args(BASE)
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .arg("--run-dir")
        .arg(run)
        .output()
        .expect("runs sid-launch");
    assert!(
        out.status.success(),
        "sid-launch {extra:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(run.join("steps.jsonl"))
        .expect("--log-steps writes steps.jsonl")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn every_mode_reproduces_its_recorded_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar10");
    write_cifar10(&data, 64);
    let port = free_port();
    let got: BTreeMap<String, Recorded> = modes(&port)
        .into_iter()
        .map(|(name, extra)| {
            (
                name.to_string(),
                record(&data, &tmp.path().join(name), &extra),
            )
        })
        .collect();
    for (name, r) in &got {
        assert_eq!(r.losses.len(), 20, "{name}: {:?}", r.losses);
    }
    let path = fixture("trajectories.json");
    if std::env::var_os("SID_RECORD_TRAJECTORIES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        eprintln!("recorded {}", path.display());
        return;
    }
    let want: BTreeMap<String, Recorded> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    let mut bad = Vec::new();
    for (name, w) in &want {
        let g = &got[name];
        let (wl, gl) = (&w.losses, &g.losses);
        if let Some(step) = (0..wl.len()).find(|&i| wl[i].to_bits() != gl[i].to_bits()) {
            bad.push(format!(
                "{name}: step {} loss {} was recorded as {}",
                step + 1,
                gl[step],
                wl[step]
            ));
        }
        if w.checkpoint != g.checkpoint {
            bad.push(format!(
                "{name}: the checkpoint's tensors changed: {:?} were recorded, {:?} are written",
                w.checkpoint
                    .iter()
                    .filter(|t| !g.checkpoint.contains(t))
                    .collect::<Vec<_>>(),
                g.checkpoint
                    .iter()
                    .filter(|t| !w.checkpoint.contains(t))
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(bad.is_empty(), "runs changed:\n{}", bad.join("\n"));
    // A run saved with the recorded config resumes (and trains on from where it was).
    for name in ["staged-k2-m4", "bp-1f1b", "paper-cpu2"] {
        let run = tmp.path().join(name);
        // The recorded run read its data from a directory that is gone: point it here.
        let config: Vec<String> = want[name]
            .config
            .lines()
            .map(|l| match l.starts_with("data_dir = ") {
                true => format!("data_dir = {:?}", data.display().to_string()),
                false => l.to_string(),
            })
            .collect();
        std::fs::write(run.join("config.toml"), config.join("\n") + "\n").unwrap();
        let out = Command::new(BIN)
            .args([
                "--resume",
                run.to_str().unwrap(),
                "--epochs",
                "2",
                "--log-steps",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: resuming with the recorded config failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read_to_string(run.join("steps.jsonl"))
                .unwrap()
                .lines()
                .count(),
            40,
            "{name}"
        );
    }
}
