//! Runs the real `sid-launch` binary on the CPU: bad input, short runs, resume, Ctrl-C.
//!
//! Training runs use the real Fashion-MNIST from `/usr/share/datasets/fashion-mnist`
//! (Debian's `dataset-fashion-mnist`, installed by `scripts/setup.sh` and `.ci/run`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::{free_port, write_cifar10};

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

fn sid(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("runs sid-launch")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small, fast run: MLP extractor, 3 modules, 1024 training samples.
fn quick(run_dir: &Path, extra: &[&str]) -> Vec<String> {
    with_run_dir(
        &[
            "--model",
            "mlp",
            "--modules",
            "3",
            "--limit-train",
            "1024",
            "--batch-size",
            "64",
            "--eval-batch-size",
            "2000",
            "--threads",
            "1",
        ],
        run_dir,
        extra,
    )
}

/// `base`, then `--run-dir run_dir`, then `extra` (later flags win).
fn with_run_dir(base: &[&str], run_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    v.push("--run-dir".into());
    v.push(run_dir.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_ok(args: &[String]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sid-launch {args:?} failed:\n{}",
        stderr(&out)
    );
    out
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The run failed with one error line naming `needle`, and nothing after it but clap's usage
/// hints for a bad flag.
fn one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success());
    let e = stderr(o);
    let errors: Vec<(usize, &str)> = e
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("error:"))
        .collect();
    let [(at, line)] = errors[..] else {
        panic!("not one error line in:\n{e}")
    };
    assert!(
        line.contains(needle),
        "{line:?} does not mention {needle:?}"
    );
    assert!(
        e.lines().skip(at + 1).all(|l| {
            let l = l.trim();
            l.is_empty()
                || ["tip:", "Usage:", "For more information"]
                    .iter()
                    .any(|h| l.starts_with(h))
        }),
        "lines after the error:\n{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_flags_are_rejected() {
    one_line_error(&sid(&["--method", "sgd"]), "sgd");
    one_line_error(&sid(&["--dataset", "imagenet"]), "imagenet");
    one_line_error(&sid(&["--frobnicate"]), "--frobnicate");
    one_line_error(&sid(&["--alpha", "2", "--run-dir", "/tmp/never"]), "alpha");
    one_line_error(&sid(&["--gpus", "zero"]), "neither cpu nor a GPU index");
}

#[test]
fn cuda_graph_without_a_single_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    for gpus in ["cpu", "cpu:2", "0,1"] {
        let out = sid(&[
            "--gpus",
            gpus,
            "--cuda-graph",
            "--run-dir",
            run.to_str().unwrap(),
        ]);
        one_line_error(&out, "--cuda-graph needs exactly one GPU");
        assert!(!run.exists(), "nothing is written for a bad setting");
    }
}

#[test]
fn bf16_on_the_cpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    for gpus in ["cpu", "cpu:2"] {
        let out = sid(&[
            "--precision",
            "bf16",
            "--gpus",
            gpus,
            "--run-dir",
            run.to_str().unwrap(),
        ]);
        one_line_error(&out, "--precision bf16 needs a CUDA device");
        assert!(!run.exists(), "nothing is written for a bad setting");
    }
    one_line_error(&sid(&["--precision", "fp16"]), "fp16");
}

#[test]
fn nonexistent_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = sid(&["--gpus", "7", "--run-dir", dir.path().to_str().unwrap()]);
    let e = stderr(&out);
    assert!(
        e.contains("CUDA is not available") || e.contains("GPU 7 does not exist"),
        "{e}"
    );
    assert!(!out.status.success());
    assert!(
        !dir.path().join("config.toml").exists(),
        "nothing is written for a bad device"
    );
}

#[test]
fn missing_or_corrupt_data_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = sid(&[
        "--data-dir",
        "/nonexistent/fmnist",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    one_line_error(&out, "/nonexistent/fmnist");
    // A truncated image file in the real IDX format.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    images.extend(vec![0u8; 100]);
    std::fs::write(data.join("train-images-idx3-ubyte"), images).unwrap();
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 10];
    labels.extend(0..10u8);
    std::fs::write(data.join("train-labels-idx1-ubyte"), labels).unwrap();
    let out = sid(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    one_line_error(&out, "train-images-idx3-ubyte");
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
}

#[test]
fn short_run_writes_config_metrics_checkpoint_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = run_ok(&quick(&run, &["--epochs", "2"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("final-epoch test accuracy"), "{stdout}");
    let m = metrics(&run);
    assert_eq!(m.len(), 2);
    for key in [
        "epoch",
        "train_loss",
        "test_acc",
        "module_test_acc",
        "module_test_label_kl",
        "module_test_teacher_kl",
        "epoch_seconds",
        "samples_per_second",
    ] {
        assert!(m[1].get(key).is_some(), "metrics lack {key}");
    }
    // The epoch line says whether the cascade descends (the paper's monotone proposition).
    assert!(stderr(&out).contains(" cascade "), "{}", stderr(&out));
    assert_eq!(m[1]["module_test_acc"].as_array().unwrap().len(), 3);
    // Even 1024 samples and 2 epochs beat chance (10%) by far.
    assert!(m[1]["test_acc"].as_f64().unwrap() > 0.5, "{:?}", m[1]);
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("modules = 3") && config.contains("method = \"sid\""),
        "{config}"
    );
    assert!(run.join("checkpoint.safetensors").exists());
    assert!(run.join("summary.json").exists());
    // A second start in the same directory refuses to overwrite it.
    let again = Command::new(BIN)
        .args(quick(&run, &["--epochs", "2"]))
        .output()
        .unwrap();
    one_line_error(&again, "already holds a run");
    assert_eq!(metrics(&run).len(), 2);
}

#[test]
fn backprop_baseline_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("bp");
    run_ok(&quick(&run, &["--method", "bp", "--epochs", "1"]));
    let m = metrics(&run);
    assert!(m[0]["test_acc"].as_f64().unwrap() > 0.5);
    assert!(m[0]["module_train_loss"].as_array().unwrap().is_empty());
}

#[test]
fn resume_gives_the_same_result_as_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    run_ok(&quick(
        &straight,
        &["--epochs", "2", "--label-noise", "0.2"],
    ));
    let split = dir.path().join("split");
    run_ok(&quick(&split, &["--epochs", "1", "--label-noise", "0.2"]));
    run_ok(&[
        "--resume".into(),
        split.display().to_string(),
        "--epochs".into(),
        "2".into(),
    ]);
    let (a, b) = (metrics(&straight), metrics(&split));
    assert_eq!(b.len(), 2);
    for key in [
        "train_loss",
        "test_acc",
        "module_test_acc",
        "module_train_loss",
    ] {
        assert_eq!(a[1][key], b[1][key], "{key} differs after resume");
    }
}

/// A run directory whose `config.toml` has the flat layout of earlier versions (every key at
/// the top, the backbone under `model`) resumes as one saved now does, and is saved again in
/// sections.
/// `--checkpoint-every N` writes the checkpoint inside epochs too, `--keep-checkpoints K` keeps
/// the older ones under their positions' names, and a run resumed from one of them mid-epoch
/// (as after a crash) ends exactly where the uninterrupted run ends.
#[test]
fn step_checkpoints_are_kept_and_a_run_resumes_from_one_mid_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 1024 samples / 64 = 16 steps an epoch: checkpoints after steps 6 and 12, and at its end.
    let flags = [
        "--epochs",
        "2",
        "--checkpoint-every",
        "6",
        "--keep-checkpoints",
        "4",
    ];
    run_ok(&quick(&run, &flags));
    let mut kept: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint"))
        .collect();
    kept.sort();
    // The newest, and the three before it, named by epochs done and step.
    assert_eq!(
        kept,
        [
            "checkpoint-E1-S0.safetensors",
            "checkpoint-E1-S12.safetensors",
            "checkpoint-E1-S6.safetensors",
            "checkpoint.safetensors"
        ]
    );
    // As if the run had died after step 6 of epoch 2.
    let crashed = dir.path().join("crashed");
    std::fs::create_dir(&crashed).unwrap();
    for f in ["config.toml", "input.json", "metrics.jsonl"] {
        std::fs::copy(run.join(f), crashed.join(f)).unwrap();
    }
    std::fs::copy(
        run.join("checkpoint-E1-S6.safetensors"),
        crashed.join("checkpoint.safetensors"),
    )
    .unwrap();
    let out = run_ok(&["--resume".into(), crashed.display().to_string()]);
    assert!(
        stderr(&out).contains("resuming at step 6/16"),
        "{}",
        stderr(&out)
    );
    let (a, b) = (metrics(&run), metrics(&crashed));
    assert_eq!(a.len(), 2);
    for key in ["train_loss", "test_acc", "module_test_acc"] {
        assert_eq!(
            a[1][key], b[1][key],
            "{key} differs after resuming mid-epoch"
        );
    }
}

#[test]
fn a_run_saved_with_the_flat_config_layout_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    run_ok(&quick(&straight, &["--epochs", "2"]));
    let old = dir.path().join("old");
    run_ok(&quick(&old, &["--epochs", "1"]));
    let sectioned = std::fs::read_to_string(old.join("config.toml")).unwrap();
    assert!(sectioned.contains("[model]"), "{sectioned}");
    let flat: String = sectioned
        .lines()
        .filter(|l| !l.starts_with('['))
        .map(|l| l.replacen("extractor = ", "model = ", 1) + "\n")
        .collect();
    std::fs::write(old.join("config.toml"), &flat).unwrap();
    run_ok(&[
        "--resume".into(),
        old.display().to_string(),
        "--epochs".into(),
        "2".into(),
    ]);
    let (a, b) = (metrics(&straight), metrics(&old));
    assert_eq!(b.len(), 2);
    for key in ["train_loss", "test_acc", "module_test_acc"] {
        assert_eq!(a[1][key], b[1][key], "{key} differs after resume");
    }
    let saved = std::fs::read_to_string(old.join("config.toml")).unwrap();
    assert!(
        saved.contains("[optim]") && saved.contains("extractor = \"mlp\""),
        "{saved}"
    );
}

#[test]
fn a_cut_short_last_metrics_line_is_dropped_on_resume_and_a_corrupt_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(&quick(&run, &["--epochs", "2"]));
    // What a crash in the middle of appending epoch 2's record leaves behind.
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.len() - text.lines().last().unwrap().len() / 2 - 1;
    std::fs::write(&path, &text[..cut]).unwrap();
    let out = run_ok(&[
        "--resume".into(),
        run.display().to_string(),
        "--epochs".into(),
        "3".into(),
    ]);
    let e = stderr(&out);
    assert!(
        e.contains("note: ")
            && e.contains("metrics.jsonl line 2: dropped an incomplete last record"),
        "{e}"
    );
    let epochs: Vec<u64> = metrics(&run)
        .iter()
        .map(|m| m["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 3]);

    // A damaged line that is not the last is not a crash's trace: it stops the resume.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("{", "{garbage", 1)).unwrap();
    let out = sid(&["--resume", run.to_str().unwrap(), "--epochs", "4"]);
    one_line_error(&out, "metrics.jsonl: line 1:");
}

/// The GPU acceptance script's checks can fail: its self-test feeds them made-up run folders,
/// and the forced mismatches must print FAIL and make the script exit 1.
#[test]
fn gpu_acceptance_script_fails_on_a_forced_mismatch() {
    let out_dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/gpu-acceptance.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--self-test")
        .env("OUT", out_dir.path())
        .output()
        .expect("runs bash");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    for line in [
        "PASS self-test: equal losses",
        "PASS self-test: close losses",
        "PASS self-test: allocator peaks",
        "PASS self-test: graph captured",
        "PASS self-test: losses differ",
        "FAIL self-test: forced capture mismatch: no line matching",
        "FAIL self-test: forced no-effect mismatch: final train_loss",
        "FAIL self-test: forced missing losses: ValueError:",
        "FAIL self-test: forced loss mismatch: final train_loss differs",
        "FAIL self-test: forced peak-source mismatch: epoch 1: cuda:0 peak",
        "FAIL self-test: forced exit-code mismatch: exit code 0, expected 1",
        "6 check(s) failed",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "no line {line:?} in:\n{text}"
        );
    }
    let saved = std::fs::read_to_string(out_dir.path().join("acceptance.txt")).unwrap();
    assert_eq!(saved, text, "the output is saved under $OUT");
}

#[test]
fn ctrl_c_checkpoints_mid_epoch_and_resume_matches() {
    let dir = tempfile::tempdir().unwrap();
    // Enough steps (batch 8) that the interrupt lands inside the first epoch.
    ctrl_c_and_resume(dir.path(), &|run: &Path| {
        let mut a = quick(run, &["--epochs", "1", "--limit-train", "8192"]);
        a.extend(["--batch-size".into(), "8".into()]);
        a
    });
}

/// The staged pipeline has steps in flight when Ctrl-C comes: they finish, then the
/// checkpoint; the resumed run equals an uninterrupted one.
#[test]
fn ctrl_c_in_a_staged_pipeline_checkpoints_and_resume_matches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar");
    write_cifar10(&data, 256);
    ctrl_c_and_resume(dir.path(), &|run: &Path| {
        let mut a = staged(
            run,
            &["--gpus", "cpu:2", "--epochs", "1", "--micro-batches", "2"],
        );
        a.extend([
            "--batch-size".into(),
            "8".into(),
            "--data-dir".into(),
            data.display().to_string(),
        ]);
        a
    });
}

fn ctrl_c_and_resume(dir: &Path, args: &dyn Fn(&Path) -> Vec<String>) {
    ctrl_c_and_resume_with(dir, args, &Vec::new)
}

/// [`ctrl_c_and_resume`], resuming with `resume_extra` flags.
fn ctrl_c_and_resume_with(
    dir: &Path,
    args: &dyn Fn(&Path) -> Vec<String>,
    resume_extra: &dyn Fn() -> Vec<String>,
) {
    let straight = dir.join("straight");
    run_ok(&args(&straight));

    let run = dir.join("interrupted");
    let mut child = Command::new(BIN)
        .args(args(&run))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait for the first progress line, then send SIGINT as Ctrl-C would.
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(" step ") {
            break;
        }
    }
    let pid = child.id().to_string();
    // Twice at once, as `timeout` delivers it (to the process and its group): still one
    // interrupt, with a checkpoint.
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let all = format!("{seen}{}", rest.join("\n"));
    assert_eq!(status.code(), Some(130), "{all}");
    assert!(all.contains("interrupted during epoch 1"), "{all}");
    assert!(!all.contains("second interrupt"), "{all}");
    assert!(run.join("checkpoint.safetensors").exists());
    assert!(!run.join("metrics.jsonl").exists(), "no epoch finished");

    let mut resume = vec!["--resume".to_string(), run.display().to_string()];
    resume.extend(resume_extra());
    let out = run_ok(&resume);
    assert!(
        stderr(&out).contains("resuming at step"),
        "{}",
        stderr(&out)
    );
    let (a, b) = (metrics(&straight), metrics(&run));
    for key in ["train_loss", "test_acc", "module_test_acc"] {
        assert_eq!(
            a[0][key], b[0][key],
            "{key} differs after a mid-epoch resume"
        );
    }
}

#[test]
fn bad_checkpoint_and_bad_config_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(&quick(&run, &["--epochs", "1"]));
    std::fs::write(run.join("checkpoint.safetensors"), b"not a checkpoint").unwrap();
    let out = sid(&["--resume", run.to_str().unwrap(), "--epochs", "2"]);
    one_line_error(&out, "checkpoint.safetensors");
    assert_eq!(metrics(&run).len(), 1, "metrics survive a failed resume");

    let out = sid(&["--resume", run.to_str().unwrap(), "--alpha", "0.9"]);
    one_line_error(&out, "alpha differ from the saved config.toml");

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "modulez = 4\n").unwrap();
    one_line_error(&sid(&["--config", cfg.to_str().unwrap()]), "modulez");
    one_line_error(
        &sid(&["--resume", "/nonexistent/run"]),
        "no such run directory",
    );
}

#[test]
fn config_file_values_are_used_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "modules = 2\nalpha = 0.3\nepochs = 1\n").unwrap();
    let run = dir.path().join("run");
    let mut args = quick(&run, &["--alpha", "0.7"]);
    args.retain(|a| a != "--modules" && a != "3");
    args.extend(["--config".into(), cfg.display().to_string()]);
    run_ok(&args);
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        saved.contains("modules = 2") && saved.contains("alpha = 0.7"),
        "{saved}"
    );
}

#[test]
fn four_cpu_workers_train_to_the_same_result_as_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let four = dir.path().join("four");
    run_ok(&quick(&one, &["--epochs", "1", "--modules", "4"]));
    let out = run_ok(&quick(
        &four,
        &["--epochs", "1", "--modules", "4", "--gpus", "cpu:4"],
    ));
    assert!(
        stderr(&out).contains("plan: the paper's SID with its modules on [cpu, cpu, cpu, cpu]")
            && stderr(&out).contains("stage 2 (cpu): modules 1-1"),
        "{}",
        stderr(&out)
    );
    let saved = std::fs::read_to_string(four.join("config.toml")).unwrap();
    assert!(
        saved.contains("placement = \"0:0-0,1:1-1,2:2-2,3:3-3\""),
        "{saved}"
    );
    let (a, b) = (metrics(&one), metrics(&four));
    // Across placements the modules' ∂L/∂z is summed in another order, so a few test samples
    // may flip (the runtime tests bound the parameters' difference): at most 0.5% of them.
    let accs = |m: &serde_json::Value| -> Vec<f64> {
        let modules = m["module_test_acc"].as_array().unwrap().iter();
        let mut v: Vec<f64> = modules.map(|x| x.as_f64().unwrap()).collect();
        v.push(m["test_acc"].as_f64().unwrap());
        v
    };
    let (acc_a, acc_b) = (accs(&a[0]), accs(&b[0]));
    assert_eq!(acc_a.len(), acc_b.len());
    for (x, y) in acc_a.iter().zip(&acc_b) {
        assert!((x - y).abs() <= 0.005, "{acc_a:?} vs {acc_b:?}");
    }
    let (la, lb) = (
        a[0]["train_loss"].as_f64().unwrap(),
        b[0]["train_loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() < 1e-5, "{la} vs {lb}");
    // A multi-worker checkpoint resumes on one device (and the other way round).
    run_ok(&[
        "--resume".into(),
        four.display().to_string(),
        "--epochs".into(),
        "2".into(),
        "--gpus".into(),
        "cpu".into(),
    ]);
    assert_eq!(metrics(&four).len(), 2);
}

#[test]
fn paper_mode_with_micro_batches_trains_like_one_device() {
    // The paper's SID on two CPU workers with two micro-batches per step runs as a stage
    // pipeline (the extractor, then the module blocks): the same training as one device.
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    run_ok(&quick(&one, &["--epochs", "1", "--modules", "4"]));
    let out = run_ok(&quick(
        &two,
        &[
            "--epochs",
            "1",
            "--modules",
            "4",
            "--gpus",
            "cpu:2",
            "--micro-batches",
            "2",
        ],
    ));
    assert!(
        stderr(&out).contains("stage 2 (cpu): modules 1-2")
            && stderr(&out).contains("2 micro-batch(es) per step"),
        "{}",
        stderr(&out)
    );
    let (a, b) = (metrics(&one), metrics(&two));
    let (la, lb) = (
        a[0]["train_loss"].as_f64().unwrap(),
        b[0]["train_loss"].as_f64().unwrap(),
    );
    assert!((la - lb).abs() <= 1e-4 * la.abs(), "{la} vs {lb}");
    // Its checkpoint has the single-device names: it resumes on one device.
    run_ok(&[
        "--resume".into(),
        two.display().to_string(),
        "--epochs".into(),
        "2".into(),
        "--gpus".into(),
        "cpu".into(),
    ]);
    assert_eq!(metrics(&two).len(), 2);
}

#[test]
fn a_failing_module_stage_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 1024 samples / 64 = 16 steps an epoch: the fault strikes in epoch 2.
    let mut args = quick(
        &run,
        &["--epochs", "3", "--modules", "4", "--gpus", "cpu:2"],
    );
    args.extend(["--inject-fault".into(), "1:20:nan".into()]);
    let out = Command::new(BIN).args(&args).output().unwrap();
    // Worker 1's modules are stage 3 (stage 1 is the extractor).
    one_line_error(&out, "stage 3 on cpu failed in module 3");
    assert!(
        stderr(&out).contains("non-finite loss NaN"),
        "{}",
        stderr(&out)
    );
    assert_eq!(metrics(&run).len(), 1, "epoch 1 stays recorded");
    // The epoch-1 checkpoint is intact: the run resumes from it.
    run_ok(&["--resume".into(), run.display().to_string()]);
    assert_eq!(metrics(&run).len(), 3);

    let hung = dir.path().join("hung");
    let mut args = quick(
        &hung,
        &[
            "--epochs",
            "1",
            "--modules",
            "4",
            "--gpus",
            "cpu:2",
            // The hang comes at a known step; 6 s also leaves the healthy steps before it
            // (milliseconds each) room on a loaded machine.
            "--step-timeout",
            "6",
        ],
    );
    args.extend(["--inject-fault".into(), "0:3:hang".into()]);
    let started = std::time::Instant::now();
    let out = Command::new(BIN).args(&args).output().unwrap();
    // Stage 2 (worker 0's modules) hangs; whichever wait runs out first names it: the
    // extractor's for its gradient, or the coordinator's for its report.
    one_line_error(&out, "waited 6 s");
    let line = stderr(&out);
    assert!(
        line.contains("for a gradient from stage 2") || line.contains("for stage 2 (cpu"),
        "{line}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn bad_placement_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = Command::new(BIN)
        .args(quick(
            &run,
            &[
                "--modules",
                "4",
                "--gpus",
                "cpu:2",
                "--placement",
                "0:0-1,1:3-3",
            ],
        ))
        .output()
        .unwrap();
    one_line_error(&out, "contiguous");
    let out = Command::new(BIN)
        .args(quick(&run, &["--modules", "2", "--gpus", "cpu:3"]))
        .output()
        .unwrap();
    one_line_error(&out, "3 devices but only 2 modules");
}

/// Intervals `[begin, end)` of the spans called `name`, per thread, from a Chrome trace.
fn span_intervals(
    trace: &serde_json::Value,
    name: &str,
) -> std::collections::BTreeMap<u64, Vec<(f64, f64)>> {
    let mut open: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    let mut out: std::collections::BTreeMap<u64, Vec<(f64, f64)>> = Default::default();
    for e in trace.as_array().unwrap() {
        if e["name"] != name {
            continue;
        }
        let tid = e["tid"].as_u64().unwrap();
        let ts = e["ts"].as_f64().unwrap();
        match e["ph"].as_str().unwrap() {
            "B" => open.entry(tid).or_default().push(ts),
            "E" => {
                let b = open.get_mut(&tid).unwrap().pop().unwrap();
                out.entry(tid).or_default().push((b, ts));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn trace_shows_two_module_stages_overlapping_in_phase_2_and_telemetry_degrades_without_nvml() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Inside the run directory, which does not exist yet: the launcher creates it.
    let trace = run.join("trace.json");
    let mut args = quick(
        &run,
        &[
            "--epochs",
            "1",
            "--modules",
            "4",
            "--module-hidden",
            "1024",
            "--batch-size",
            "128",
            "--gpus",
            "cpu:2",
            // Module stage 1's phase 2 (three modules) is long next to module stage 2's wait for
            // the chain (three cheap teacher forwards), so they overlap even on a loaded machine.
            "--placement",
            "0:0-2,1:3-3",
        ],
    );
    args.extend(["--trace".into(), trace.display().to_string()]);
    let out = run_ok(&args);
    let err = stderr(&out);
    let samples = std::fs::read_to_string(run.join("telemetry.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert!(first["rss_bytes"].as_u64().unwrap() > 0);
    // Where NVML loads, every sample has the GPUs; where it does not, the run says so once.
    let gpus_sampled = first["gpus"].as_array().is_some_and(|g| !g.is_empty());
    assert_eq!(
        err.matches("GPU telemetry off").count(),
        usize::from(!gpus_sampled),
        "said once, and only without NVML: {err}\n{first}"
    );
    let m = metrics(&run);
    assert_eq!(m[0]["peak_memory"][0]["device"], "cpu");
    assert!(m[0]["peak_memory"][0]["bytes"].as_u64().unwrap() > 1 << 20);

    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let phase2 = span_intervals(&trace, "phase2");
    assert_eq!(
        phase2.len(),
        2,
        "phase-2 spans on two module-stage threads: {:?}",
        phase2.keys()
    );
    let threads: Vec<&Vec<(f64, f64)>> = phase2.values().collect();
    let overlaps = threads[0]
        .iter()
        .filter(|a| threads[1].iter().any(|b| a.0 < b.1 && b.0 < a.1))
        .count();
    assert!(
        overlaps * 4 >= threads[0].len(),
        "module stages overlapped in only {overlaps} of {} steps",
        threads[0].len()
    );
    for name in [
        "extractor_forward",
        "extractor_backward",
        "phase1",
        "forward_module",
        "module_backward",
        "stage_micro",
    ] {
        assert!(
            !span_intervals(&trace, name).is_empty(),
            "no {name} span in the trace"
        );
    }
}

#[test]
fn cifar10_trains_with_augmentation_on_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar-10-batches-bin");
    write_cifar10(&data, 20);
    let run = dir.path().join("run");
    let out = Command::new(BIN)
        .args([
            "--dataset",
            "cifar10",
            "--data-dir",
            data.to_str().unwrap(),
            "--model",
            "cnn",
            "--modules",
            "2",
        ])
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--run-dir",
            run.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("data: 100 training, 20 test samples"),
        "{}",
        stderr(&out)
    );
    assert_eq!(metrics(&run).len(), 1);
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("augment = true"), "{saved}");
    // A truncated batch file is named in a one-line error.
    let f = data.join("data_batch_3.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let out = sid(&[
        "--dataset",
        "cifar10",
        "--data-dir",
        data.to_str().unwrap(),
        "--run-dir",
        dir.path().join("r2").to_str().unwrap(),
    ]);
    one_line_error(&out, "data_batch_3.bin");
}

#[test]
fn fused_teacher_schedule_trains_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    let fused = dir.path().join("fused");
    let reference3 = dir.path().join("reference3");
    let fused3 = dir.path().join("fused3");
    run_ok(&quick(&reference, &["--epochs", "1"]));
    run_ok(&quick(&fused, &["--epochs", "1", "--fused-teacher"]));
    run_ok(&quick(&reference3, &["--epochs", "1", "--gpus", "cpu:3"]));
    run_ok(&quick(
        &fused3,
        &["--epochs", "1", "--fused-teacher", "--gpus", "cpu:3"],
    ));
    // Same placement, same schedule of float operations: the same numbers exactly. (Across
    // placements the sum of the modules' ∂L/∂z is associated differently, so a few test
    // samples can flip; the runtime tests bound that difference.)
    for (a, b) in [(&reference, &fused), (&reference3, &fused3)] {
        let (a, b) = (metrics(a), metrics(b));
        assert_eq!(a[0]["test_acc"], b[0]["test_acc"]);
        assert_eq!(a[0]["train_loss"], b[0]["train_loss"]);
    }
    let saved = std::fs::read_to_string(fused.join("config.toml")).unwrap();
    assert!(saved.contains("fused_teacher = true"), "{saved}");
}

/// A small staged run: SimpleCNN cut into two stages, four modules, on a small CIFAR-10
/// written in its real format (320 training, 64 test images) beside the run directory.
fn staged(run_dir: &Path, extra: &[&str]) -> Vec<String> {
    let data = run_dir.with_extension("data");
    if !data.exists() {
        write_cifar10(&data, 64);
    }
    with_run_dir(
        &[
            "--dataset",
            "cifar10",
            "--data-dir",
            data.to_str().unwrap(),
            "--model",
            "cnn",
            "--modules",
            "4",
            "--stages",
            "2",
            "--placement",
            "blocks=0-1,2-3;modules=0-1,2-3",
            "--batch-size",
            "64",
            "--epochs",
            "2",
            "--telemetry-hz",
            "0",
        ],
        run_dir,
        extra,
    )
}

#[test]
fn staged_pipeline_on_two_cpu_devices_equals_stages_run_one_after_another() {
    let tmp = tempfile::tempdir().unwrap();
    let (seq, par) = (tmp.path().join("seq"), tmp.path().join("par"));
    let out = run_ok(&staged(&seq, &["--gpus", "cpu", "--threads", "1"]));
    assert!(
        stderr(&out).contains("plan: staged SID, 2 stage(s)"),
        "{}",
        stderr(&out)
    );
    let out = run_ok(&staged(&par, &["--gpus", "cpu:2", "--micro-batches", "4"]));
    let e = stderr(&out);
    assert!(e.contains("stage 2 (cpu, blocks 3-4, modules 3-4)"), "{e}");
    let (a, b) = (metrics(&seq), metrics(&par));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        let (u, v) = (
            x["train_loss"].as_f64().unwrap(),
            y["train_loss"].as_f64().unwrap(),
        );
        assert!((u - v).abs() < 1e-4 * u.abs(), "train loss {u} vs {v}");
        assert_eq!(x["module_test_acc"].as_array().unwrap().len(), 4);
    }
    // The saved cut is the one asked for, and a resume onto another device list keeps it.
    let saved = std::fs::read_to_string(par.join("config.toml")).unwrap();
    assert!(saved.contains("blocks=0-1,2-3;modules=0-1,2-3"), "{saved}");
    let out = run_ok(&[
        "--resume".into(),
        par.display().to_string(),
        "--epochs".into(),
        "3".into(),
        "--gpus".into(),
        "cpu".into(),
    ]);
    assert!(stderr(&out).contains("resuming after epoch 2"));
    assert_eq!(metrics(&par).len(), 3);
}

#[test]
fn staged_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run_ok(&staged(&a, &["--gpus", "cpu:2", "--micro-batches", "2"]));
    run_ok(&staged(
        &b,
        &["--gpus", "cpu:2", "--micro-batches", "2", "--epochs", "1"],
    ));
    run_ok(&[
        "--resume".into(),
        b.display().to_string(),
        "--epochs".into(),
        "2".into(),
    ]);
    let (ma, mb) = (metrics(&a), metrics(&b));
    for key in ["train_loss", "test_acc"] {
        assert_eq!(ma[1][key], mb[1][key], "{key} differs after resume");
    }
}

/// A stage that panics stops the run with the one line any stage failure gives: no Rust panic
/// message, no backtrace.
#[test]
fn a_panicking_stage_is_one_line_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut args = staged(&run, &["--gpus", "cpu:2", "--epochs", "1"]);
    args.extend(["--inject-fault".into(), "1:2:panic".into()]);
    let out = Command::new(BIN)
        .args(&args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("stage 2") && errors[0].contains("injected fault at step 2"),
        "{e}"
    );
    for noise in ["panicked at", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!e.contains(noise), "{noise:?} in:\n{e}");
    }
}

#[test]
fn bad_stage_settings_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("r");
    let d = d.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--model", "cnn", "--stages", "5"],
            "--stages 5 is more than the 4 block(s) of the cnn backbone",
        ),
        (
            &["--model", "mlp", "--stages", "2"],
            "--stages 2 is more than the 1 block(s) of the mlp backbone",
        ),
        (
            &["--micro-batches", "3", "--batch-size", "64"],
            "--micro-batches 3 does not divide --batch-size 64",
        ),
        (
            &["--stages", "2", "--gpus", "cpu:3"],
            "--stages 2 on 3 devices",
        ),
        (
            &[
                "--stages",
                "2",
                "--placement",
                "blocks=0-2,2-3;modules=0-4,5-9",
            ],
            "ranges must be consecutive",
        ),
        (
            &[
                "--stages",
                "2",
                "--method",
                "bp",
                "--pipeline-schedule",
                "zigzag",
            ],
            "unknown pipeline schedule",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--run-dir", d];
        all.extend_from_slice(args);
        one_line_error(&sid(&all), needle);
    }
}

#[test]
fn backprop_pipeline_trains_like_unpipelined_backprop() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, pipe) = (tmp.path().join("one"), tmp.path().join("pipe"));
    let bp1 = [
        "--method",
        "bp",
        "--stages",
        "1",
        "--placement",
        "0:0-3",
        "--epochs",
        "1",
    ];
    run_ok(&staged(&one, &bp1));
    let out = run_ok(&staged(
        &pipe,
        &[
            "--method",
            "bp",
            "--gpus",
            "cpu:2",
            "--pipeline-schedule",
            "gpipe",
            "--epochs",
            "1",
        ],
    ));
    let e = stderr(&out);
    assert!(
        e.contains("plan: backprop pipeline (gpipe), 2 stage(s)")
            && e.contains("4 micro-batch(es) per step"),
        "{e}"
    );
    let (a, b) = (metrics(&one), metrics(&pipe));
    let (u, v) = (
        a[0]["train_loss"].as_f64().unwrap(),
        b[0]["train_loss"].as_f64().unwrap(),
    );
    assert!((u - v).abs() < 1e-4 * u.abs(), "train loss {u} vs {v}");
    let saved = std::fs::read_to_string(pipe.join("config.toml")).unwrap();
    assert!(
        saved.contains("micro_batches = 4") && saved.contains("pipeline_schedule = \"gpipe\""),
        "{saved}"
    );
}

/// Writes an ImageFolder data set of 12x12 PNGs: `per_class` training and 2 test images for
/// each of 3 classes, each class one colour (a little varied per image).
fn write_image_folder(dir: &Path, per_class: usize) {
    let colours = [[220u8, 30, 30], [30, 200, 40], [40, 50, 210]];
    for (c, colour) in colours.iter().enumerate() {
        for (split, n) in [("train", per_class), ("test", 2)] {
            let folder = dir.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..n {
                let px = colour.map(|v| v.saturating_add(3 * i as u8));
                image::RgbImage::from_pixel(12, 12, image::Rgb(px))
                    .save(folder.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
}

#[test]
fn own_image_folder_trains_and_the_second_run_reuses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_image_folder(&data, 8);
    let runs = dir.path().join("runs");
    let args = |run: &str| -> Vec<String> {
        let run = runs.join(run);
        [
            "--dataset",
            "folder",
            "--data-dir",
            data.to_str().unwrap(),
            "--image-size",
            "8",
            "--model",
            "mlp",
            "--modules",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--run-dir",
            run.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let out = run_ok(&args("first"));
    let e = stderr(&out);
    assert!(e.contains("data: 24 training, 6 test samples"), "{e}");
    assert!(e.contains("3 classes, 3x8x8 images"), "{e}");
    assert!(e.contains("decoded 30 images"), "{e}");
    assert!(!e.contains("cache hit"), "{e}");
    assert_eq!(metrics(&runs.join("first")).len(), 1);
    let saved = std::fs::read_to_string(runs.join("first/config.toml")).unwrap();
    assert!(saved.contains("dataset = \"folder\""), "{saved}");
    assert!(saved.contains("image_size = 8"), "{saved}");
    // The default cache folder is beside the run directory.
    let cache = runs.join("image-cache");
    assert!(saved.contains(cache.to_str().unwrap()), "{saved}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    // predict names the class folders and reads input.json, not the data set; a run without
    // input.json (older) loads the data set for its statistics and gives the same answers.
    let files: Vec<String> = (0..3)
        .map(|c| format!("{}/test/class{c}/1.png", data.display()))
        .collect();
    let first = runs.join("first");
    let lines = predict(&first, &files, &["--exit-confidence", "full"]);
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert!(
            ["class0", "class1", "class2"].contains(&l[1].as_str()),
            "{l:?}"
        );
        assert_eq!(l[3], "2", "{l:?}");
    }
    std::fs::remove_file(first.join("input.json")).unwrap();
    assert_eq!(
        predict(&first, &files, &["--exit-confidence", "full"]),
        lines
    );

    let out = run_ok(&args("second"));
    let e = stderr(&out);
    assert!(e.contains("cache hit: 30 images read from"), "{e}");
    assert!(!e.contains("decoded 30"), "{e}");
    // Same data and seed through the cache: the same run.
    assert_eq!(
        metrics(&runs.join("first"))[0]["train_loss"],
        metrics(&runs.join("second"))[0]["train_loss"]
    );

    // A corrupt image is named in a one-line error (and the changed file makes the cache
    // stale, so it is decoded).
    let bad = data.join("train/class1/3.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let out = Command::new(BIN).args(args("third")).output().unwrap();
    one_line_error(&out, bad.to_str().unwrap());
}

#[test]
fn eval_prints_the_early_exit_table_of_a_multi_stage_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    run_ok(&staged(&run, &["--gpus", "cpu:2", "--epochs", "1"]));
    let acc = metrics(&run)[0]["test_acc"].as_f64().unwrap();
    for gpus in ["cpu:2", "cpu"] {
        let out = sid(&[
            "eval",
            run.to_str().unwrap(),
            "--exit-confidence",
            "0.1,0.99",
            "--gpus",
            gpus,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (exits, cascade) = text.split_once("\n\n").expect("two tables");
        let rows: Vec<Vec<&str>> = exits
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        // The cascade's health: every module's accuracy and local-loss terms, as the run's
        // last evaluation recorded them, and the verdict.
        let modules: Vec<Vec<&str>> = cascade
            .lines()
            .skip(1)
            .take(4)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let last = metrics(&run).pop().unwrap();
        for (i, row) in modules.iter().enumerate() {
            let kl: f64 = row[2].parse().unwrap();
            let want = last["module_test_label_kl"][i].as_f64().unwrap();
            assert!((kl - want).abs() < 1e-3, "module {}: {kl} vs {want}", i + 1);
        }
        assert!(
            cascade.lines().last().unwrap().starts_with("cascade"),
            "{text}"
        );
        assert_eq!(rows[0][0], "full");
        // The full cascade is the run's own final evaluation.
        let full: f64 = rows[0][1].trim_end_matches('%').parse().unwrap();
        assert!((full - acc * 100.0).abs() < 0.01, "{full} vs {acc}");
        assert_eq!(rows[0][2], "4.00");
        // The top probability over 10 classes is at least 0.1: every sample leaves at once.
        assert_eq!(rows[1][..3], ["0.1", rows[1][1], "1.00"], "{text}");
    }
    one_line_error(
        &sid(&["eval", tmp.path().join("none").to_str().unwrap()]),
        "none",
    );
    one_line_error(
        &sid(&["eval", run.to_str().unwrap(), "--exit-confidence", "1.5"]),
        "must be in (0, 1]",
    );
}

// ---------------------------------------------------------------------------------------------
// Several processes (ranks) over torch.distributed's c10d (Gloo on 127.0.0.1).

/// The small CIFAR-10 run of [`staged`] as paper SID (one stage): for data-parallel runs.
fn paper(run_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = staged(run_dir, &[]);
    let stages = v.iter().position(|a| a == "--stages").unwrap();
    v.drain(stages..stages + 4); // --stages 2 --placement …
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn assert_same_training(a: &Path, b: &Path) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        let (u, v) = (
            x["train_loss"].as_f64().unwrap(),
            y["train_loss"].as_f64().unwrap(),
        );
        assert!((u - v).abs() < 1e-4 * u.abs(), "train loss {u} vs {v}");
        let (p, q) = (
            x["test_acc"].as_f64().unwrap(),
            y["test_acc"].as_f64().unwrap(),
        );
        assert!(
            (p - q).abs() <= 1.0 / 64.0 + 1e-9,
            "test accuracy {p} vs {q}"
        );
    }
}

#[test]
fn two_ranks_train_the_stages_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(&staged(&one, &["--gpus", "cpu", "--threads", "1"]));
    let port = free_port();
    let out = run_ok(&staged(
        &two,
        &[
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            "--threads",
            "1",
            "--telemetry-hz",
            "20",
        ],
    ));
    let e = stderr(&out);
    assert!(e.contains("launched ranks 0-1 of 2"), "{e}");
    assert!(e.contains("stage 2 (rank 1, cpu"), "{e}");
    assert_same_training(&one, &two);
    // Rank 0 alone wrote the run; every rank its telemetry, each sample naming the rank.
    assert!(two.join("checkpoint.safetensors").exists());
    for (file, rank) in [("telemetry.jsonl", 0), ("telemetry-rank1.jsonl", 1)] {
        let text = std::fs::read_to_string(two.join(file)).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["rank"], rank, "{file}");
    }
}

#[test]
fn two_replicas_equal_one_replica_on_the_whole_batch_and_checkpoints_move_between_world_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    let replicas = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--data-parallel".to_string(),
            "2".into(),
            "--nproc-per-node".into(),
            "2".into(),
            "--master-port".into(),
            free_port(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let strs = |v: &[String]| {
        v.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\u{1}")
    };
    let args = |dir: &Path, extra: &[String]| {
        let e = strs(extra);
        let e: Vec<&str> = if e.is_empty() {
            vec![]
        } else {
            e.split('\u{1}').collect()
        };
        paper(dir, &[&["--threads", "1"], e.as_slice()].concat())
    };
    // Straight: one process, 2 epochs; and 2 replicas, 2 epochs.
    run_ok(&args(&d("one"), &[]));
    let out = run_ok(&args(&d("rep"), &replicas(&[])));
    assert!(
        stderr(&out).contains("stage 1 of replica 2 (rank 1"),
        "{}",
        stderr(&out)
    );
    assert_same_training(&d("one"), &d("rep"));
    // Saved by 2 ranks, resumed by 1; and saved by 1, resumed by 2.
    run_ok(&args(&d("a"), &replicas(&["--epochs", "1"])));
    run_ok(&[
        "--resume".into(),
        d("a").display().to_string(),
        "--epochs".into(),
        "2".into(),
        "--data-parallel".into(),
        "1".into(),
    ]);
    assert_same_training(&d("one"), &d("a"));
    run_ok(&args(&d("b"), &["--epochs".into(), "1".into()]));
    let mut resume = vec![
        "--resume".to_string(),
        d("b").display().to_string(),
        "--epochs".into(),
        "2".into(),
    ];
    resume.extend(replicas(&[]));
    let out = run_ok(&resume);
    assert!(stderr(&out).contains("resuming after epoch 1"));
    assert_same_training(&d("one"), &d("b"));
}

/// A rank started by hand, as torchrun would: the variables, and the same flags.
fn rank(r: usize, world: usize, port: &str, args: &[String]) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .env("RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", r.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(child: &mut std::process::Child, limit: std::time::Duration) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output_ref()
}

trait WaitOutput {
    fn wait_with_output_ref(&mut self) -> Output;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_ref(&mut self) -> Output {
        let status = self.wait().unwrap();
        let mut stderr = Vec::new();
        if let Some(mut e) = self.stderr.take() {
            std::io::Read::read_to_end(&mut e, &mut stderr).unwrap();
        }
        Output {
            status,
            stdout: Vec::new(),
            stderr,
        }
    }
}

#[test]
fn a_killed_rank_ends_the_run_with_a_clear_error_and_the_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let args = staged(&dir, &["--epochs", "200", "--threads", "1"]);
    let port = free_port();
    let mut r0 = rank(0, 2, &port, &args);
    let mut r1 = rank(1, 2, &port, &args);
    // Wait for the first checkpoint (end of epoch 1), then kill rank 1 outright.
    let start = std::time::Instant::now();
    let ckpt = || {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint"))
            })
            .unwrap_or(false)
    };
    while !ckpt() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint after 120 s");
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = std::time::Instant::now();
    let out = wait_for(&mut r0, std::time::Duration::from_secs(60));
    assert!(killed.elapsed().as_secs() < 60);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    let line = e
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(line.contains("rank 1"), "{line}");
    // The last checkpoint still loads.
    let out = sid(&["eval", dir.to_str().unwrap(), "--exit-confidence", "0.9"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn rendezvous_problems_are_one_line_errors_without_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    // A 3 s step timeout where a rank is missing (the timeout is what is tested); 60 s where
    // both ranks come (a slow start on a loaded machine must not end their rendezvous).
    let quick_ranks = |d: &Path, extra: &[&str]| {
        paper(
            d,
            &[&["--step-timeout", "3", "--epochs", "1"], extra].concat(),
        )
    };
    let healthy_ranks = |d: &Path, extra: &[&str]| {
        paper(
            d,
            &[&["--step-timeout", "60", "--epochs", "1"], extra].concat(),
        )
    };
    // Launcher: the world does not fit the stages.
    let out = Command::new(BIN)
        .args(staged(&dir("a"), &["--nproc-per-node", "3"]))
        .output()
        .unwrap();
    one_line_error(&out, "= 2 ranks, but --nproc-per-node 3");
    // Replicas without processes.
    let out = Command::new(BIN)
        .args(paper(&dir("b"), &["--data-parallel", "2"]))
        .output()
        .unwrap();
    one_line_error(&out, "--nproc-per-node 2");
    let started = std::time::Instant::now();
    // A rank that never comes (wrong WORLD_SIZE).
    let port = free_port();
    let mut r0 = rank(0, 2, &port, &quick_ranks(&dir("c"), &[]));
    one_line_error(
        &wait_for(&mut r0, std::time::Duration::from_secs(60)),
        "rank 1 did not join",
    );
    // A port already in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let mut r0 = rank(0, 1, &port, &quick_ranks(&dir("d"), &[]));
    one_line_error(
        &wait_for(&mut r0, std::time::Duration::from_secs(60)),
        "serving the store",
    );
    // A master nobody serves.
    let port = free_port();
    let mut r1 = rank(1, 2, &port, &quick_ranks(&dir("e"), &[]));
    one_line_error(
        &wait_for(&mut r1, std::time::Duration::from_secs(60)),
        "connecting to the store",
    );
    // Ranks with other settings.
    let port = free_port();
    let mut r0 = rank(
        0,
        2,
        &port,
        &healthy_ranks(&dir("f"), &["--data-parallel", "2"]),
    );
    let mut r1 = rank(
        1,
        2,
        &port,
        &healthy_ranks(&dir("f"), &["--data-parallel", "2", "--lr", "0.01"]),
    );
    one_line_error(
        &wait_for(&mut r0, std::time::Duration::from_secs(60)),
        "other settings",
    );
    let out = wait_for(&mut r1, std::time::Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(started.elapsed().as_secs() < 120);
}

#[test]
fn a_hung_rank_ends_the_run_within_the_step_timeout_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let args = staged(
        &dir,
        &[
            "--batch-size",
            "16",
            "--threads",
            "1",
            // The hang comes at step 3; 12 s also leaves the rendezvous and the healthy steps
            // before it (two processes on a loaded machine) room.
            "--step-timeout",
            "12",
            "--inject-fault",
            "1:3:hang",
        ],
    );
    let port = free_port();
    let mut r0 = rank(0, 2, &port, &args);
    let mut r1 = rank(1, 2, &port, &args);
    let out = wait_for(&mut r0, std::time::Duration::from_secs(60));
    one_line_error(&out, "stage 2 (rank 1");
    assert!(stderr(&out).contains("step 3"), "{}", stderr(&out));
    // The hung rank loses rank 0 and stops too.
    let out = wait_for(&mut r1, std::time::Duration::from_secs(60));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lost rank 0"), "{}", stderr(&out));
}

/// Ctrl-C on the launcher: rank 0 stops after the current step with a checkpoint, the
/// others follow, the launcher exits 130; two ranks resume it to what a straight run gives.
#[test]
fn ctrl_c_on_the_launcher_stops_every_rank_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar");
    write_cifar10(&data, 256);
    let ranks = || {
        vec![
            "--nproc-per-node".to_string(),
            "2".into(),
            "--master-port".into(),
            free_port(),
        ]
    };
    ctrl_c_and_resume_with(
        dir.path(),
        &|run: &Path| {
            let mut a = staged(run, &["--epochs", "1", "--threads", "1"]);
            a.extend([
                "--batch-size".into(),
                "8".into(),
                "--data-dir".into(),
                data.display().to_string(),
            ]);
            a.extend(ranks());
            a
        },
        &ranks,
    );
}

/// Writes the first `n` images of `split` as PNG files (undoing the normalisation: the bytes
/// the data set holds), grey or RGB as the data are.
fn write_pngs(
    data: &sid_data::Dataset,
    split: &sid_data::Split,
    n: i64,
    dir: &Path,
) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let c = data.spec.shape.channels;
    let mean = tch::Tensor::from_slice(&data.spec.mean).reshape([c, 1, 1]);
    let std = tch::Tensor::from_slice(&data.spec.std).reshape([c, 1, 1]);
    (0..n)
        .map(|i| {
            let x = split.images.get(i).to_kind(tch::Kind::Double);
            let bytes = ((x * &std + &mean) * 255.0)
                .round()
                .clamp(0.0, 255.0)
                .to_kind(tch::Kind::Uint8)
                .permute([1, 2, 0])
                .contiguous();
            let side = data.spec.shape.image_size as u32;
            let raw = Vec::<u8>::try_from(&bytes.flatten(0, -1)).unwrap();
            let path = dir.join(format!("{i}.png"));
            if c == 1 {
                image::GrayImage::from_raw(side, side, raw)
                    .unwrap()
                    .save(&path)
                    .unwrap();
            } else {
                image::RgbImage::from_raw(side, side, raw)
                    .unwrap()
                    .save(&path)
                    .unwrap();
            }
            path.to_str().unwrap().to_string()
        })
        .collect()
}

/// `sid-launch predict RUN files… extra…`: its stdout lines split at tabs.
fn predict(run: &Path, files: &[String], extra: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec!["predict".to_string(), run.display().to_string()];
    args.extend(files.iter().cloned());
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_ok(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    // A header line over the columns.
    assert_eq!(
        lines.next(),
        Some("file\tclass\tconfidence\texit module"),
        "{text}"
    );
    lines
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

/// Each printed line against the library's prediction for the same image's tensor.
fn assert_lines_match(
    lines: &[Vec<String>],
    files: &[String],
    want: &[sid_train::predict::Prediction],
) {
    assert_eq!(lines.len(), want.len());
    for ((line, file), w) in lines.iter().zip(files).zip(want) {
        assert_eq!(line.len(), 4, "{line:?}");
        assert_eq!(&line[0], file);
        assert_eq!(line[1], w.class.clone().unwrap(), "{line:?}");
        let conf: f64 = line[2].parse().unwrap();
        assert!((conf - w.confidence).abs() < 2e-4, "{line:?} vs {w:?}");
        assert_eq!(line[3], w.exit_module.to_string(), "{line:?}");
    }
}

#[test]
fn predict_classifies_image_files_as_the_model_does_their_tensors() {
    use sid_train::predict::{ExitAt, Predictor};
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    run_ok(&quick(&run, &["--epochs", "1", "--telemetry-hz", "0"]));
    let data = sid_data::load(
        sid_data::DatasetKind::FashionMnist,
        Path::new("/usr/share/datasets/fashion-mnist"),
        &sid_data::LoadOptions::default(),
    )
    .unwrap();
    let n = 40;
    let files = write_pngs(&data, &data.test, n, &tmp.path().join("png"));
    let mut lib = Predictor::open(&run, None).unwrap();
    // The file goes through the training data's decode and normalisation: the same tensor.
    let x = data.test.images.narrow(0, 0, n);
    let from_file = lib.spec.image(Path::new(&files[3])).unwrap();
    assert!(from_file.allclose(&x.narrow(0, 3, 1), 1e-5, 1e-5, false));
    for (flag, exit) in [("0.9", ExitAt::Confidence(0.9)), ("full", ExitAt::Last)] {
        let lines = predict(&run, &files, &["--exit-confidence", flag]);
        assert_lines_match(&lines, &files, &lib.predict(&x, exit).unwrap());
    }
    // The default is τ = 0.9; the names are Fashion-MNIST's.
    let lines = predict(&run, &files, &[]);
    assert_lines_match(
        &lines,
        &files,
        &lib.predict(&x, ExitAt::Confidence(0.9)).unwrap(),
    );
    let names = sid_data::DatasetKind::FashionMnist.class_names();
    let labels = Vec::<i64>::try_from(&data.test.labels.narrow(0, 0, n)).unwrap();
    let correct = lines
        .iter()
        .zip(&labels)
        .filter(|(l, &y)| l[1] == names[y as usize])
        .count();
    let acc = metrics(&run)[0]["test_acc"].as_f64().unwrap();
    assert!(
        correct as f64 / n as f64 > acc - 0.2,
        "{correct}/{n} vs {acc}"
    );
    // --json: one object per line.
    let out = run_ok(&[
        "predict".into(),
        run.display().to_string(),
        files[0].clone(),
        "--json".into(),
        "--exit-confidence".into(),
        "full".into(),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(v["path"], files[0].as_str());
    assert_eq!(v["exit_module"], 3);
    assert_eq!(v["modules"], 3);
    assert_eq!(v["class"], names[v["label"].as_u64().unwrap() as usize]);
}

#[test]
fn predict_works_for_staged_and_backprop_runs_and_names_bad_files() {
    use sid_train::predict::{ExitAt, Predictor};
    let tmp = tempfile::tempdir().unwrap();
    let (sid_run, bp_run) = (tmp.path().join("sid"), tmp.path().join("bp"));
    run_ok(&staged(&sid_run, &["--epochs", "1"]));
    run_ok(&staged(&bp_run, &["--epochs", "1", "--method", "bp"]));
    let data = sid_data::load(
        sid_data::DatasetKind::Cifar10,
        &sid_run.with_extension("data"),
        &sid_data::LoadOptions::default(),
    )
    .unwrap();
    let n = 16;
    let files = write_pngs(&data, &data.test, n, &tmp.path().join("png"));
    let x = data.test.images.narrow(0, 0, n);
    for (run, flag, exit) in [
        (&sid_run, "0.2", ExitAt::Confidence(0.2)),
        (&sid_run, "full", ExitAt::Last),
        (&bp_run, "0.2", ExitAt::Confidence(0.2)),
    ] {
        let mut lib = Predictor::open(run, None).unwrap();
        let want = lib.predict(&x, exit).unwrap();
        let lines = predict(run, &files, &["--exit-confidence", flag]);
        assert_lines_match(&lines, &files, &want);
        if run == &bp_run {
            // Backprop answers from its last module, whatever τ.
            assert!(lines.iter().all(|l| l[3] == "4"), "{lines:?}");
        }
    }
    // Over 10 classes every belief's top probability is at least 0.1: all leave at module 1.
    let lines = predict(&sid_run, &files, &["--exit-confidence", "0.1"]);
    assert!(lines.iter().all(|l| l[3] == "1"), "{lines:?}");

    // Bad input: one line naming the file, nothing printed for the good ones.
    let with = |bad: &str| -> Output {
        Command::new(BIN)
            .args(["predict", sid_run.to_str().unwrap(), &files[0], bad])
            .output()
            .unwrap()
    };
    let missing = tmp.path().join("missing.png");
    let out = with(missing.to_str().unwrap());
    one_line_error(&out, missing.to_str().unwrap());
    assert!(out.stdout.is_empty());
    // The cause is named once.
    assert_eq!(
        stderr(&out).matches("os error 2").count(),
        1,
        "{}",
        stderr(&out)
    );
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    one_line_error(&with(text.to_str().unwrap()), text.to_str().unwrap());
    one_line_error(
        &with(tmp.path().to_str().unwrap()),
        tmp.path().to_str().unwrap(),
    );
    // A run directory without a checkpoint, and none at all.
    std::fs::remove_file(bp_run.join("checkpoint.safetensors")).unwrap();
    one_line_error(
        &sid(&["predict", bp_run.to_str().unwrap(), &files[0]]),
        "checkpoint.safetensors",
    );
    let none = tmp.path().join("none");
    one_line_error(
        &sid(&["predict", none.to_str().unwrap(), &files[0]]),
        "none",
    );
    one_line_error(
        &sid(&[
            "predict",
            sid_run.to_str().unwrap(),
            &files[0],
            "--exit-confidence",
            "2",
        ]),
        "(0, 1]",
    );
    // No file at all is a usage error.
    assert!(!sid(&["predict", sid_run.to_str().unwrap()])
        .status
        .success());
}

/// A short run of `model` on 8×8 colour images (3 classes, 12 training and 6 test samples,
/// batch 8: a full and a partial step per epoch), with `extra` flags.
fn backbone_run(data: &Path, run: &Path, model: &str, extra: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "--dataset",
        "folder",
        "--data-dir",
        data.to_str().unwrap(),
        "--image-size",
        "8",
        "--model",
        model,
        "--modules",
        "2",
        "--feature-dim",
        "16",
        "--module-hidden",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--telemetry-hz",
        "0",
        "--cache-dir",
        data.with_extension("cache").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(with_run_dir(&[], run, extra));
    run_ok(&args)
}

/// `sid-launch eval`'s full-cascade accuracy of a run, in percent.
fn eval_full_accuracy(run: &Path) -> f64 {
    let out = sid(&["eval", run.to_str().unwrap(), "--exit-confidence", "0.5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let full = text
        .lines()
        .find(|l| l.starts_with("full"))
        .unwrap_or_else(|| panic!("no full row in:\n{text}"));
    let acc = full.split_whitespace().nth(1).unwrap();
    acc.trim_end_matches('%').parse().unwrap()
}

/// `model` trains a few steps and evaluates, with SID and with BP; the start prints its
/// parameter count (`extractor`); `sid-launch eval` of the saved run (BatchNorm's running
/// statistics included) gives the run's own final accuracy.
fn backbone_trains_and_evaluates(model: &str, extractor: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    write_image_folder(&data, 4);
    for method in ["sid", "bp"] {
        let run = tmp.path().join(method);
        let out = backbone_run(&data, &run, model, &["--method", method]);
        let e = stderr(&out);
        let line = format!("parameters: {extractor} in the {model} extractor");
        assert!(e.contains(&line), "{line:?} not in:\n{e}");
        let m = metrics(&run);
        assert_eq!(m.len(), 1);
        let acc = m[0]["test_acc"].as_f64().unwrap();
        assert!(m[0]["train_loss"].as_f64().unwrap().is_finite());
        assert!(
            (eval_full_accuracy(&run) - acc * 100.0).abs() < 0.01,
            "{model} {method}: eval differs from the run's {acc}"
        );
    }
}

// Extractor parameters for 3 input channels, 8 px (ViT patch 1) and d = 16, by the formulas
// of sid-core's `parameter_counts_match_hand_computed_figures`.

#[test]
fn vgg11_trains_and_evaluates_with_sid_and_bp() {
    backbone_trains_and_evaluates("vgg11", "9,234,192");
}

#[test]
fn resnet18_trains_and_evaluates_with_sid_and_bp() {
    backbone_trains_and_evaluates("resnet18", "11,177,040");
}

#[test]
fn vit_tiny_trains_and_evaluates_with_sid_and_bp() {
    backbone_trains_and_evaluates("vit-tiny", "5,355,280");
}

/// VGG-11 cut into two stages, staged SID and a BP pipeline, trains and evaluates; a staged
/// run resumed after its first epoch equals an uninterrupted one (BatchNorm's running
/// statistics travel in the checkpoint).
#[test]
fn vgg11_in_two_stages_trains_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    write_image_folder(&data, 4);
    let two = ["--stages", "2", "--placement", "even", "--gpus", "cpu"];
    let straight = tmp.path().join("straight");
    let out = backbone_run(
        &data,
        &straight,
        "vgg11",
        &[&two[..], &["--epochs", "2"]].concat(),
    );
    assert!(stderr(&out).contains("2 stage(s)"), "{}", stderr(&out));
    let split = tmp.path().join("split");
    backbone_run(&data, &split, "vgg11", &two);
    run_ok(&[
        "--resume".into(),
        split.display().to_string(),
        "--epochs".into(),
        "2".into(),
    ]);
    let (a, b) = (metrics(&straight), metrics(&split));
    for key in ["train_loss", "test_acc", "module_test_acc"] {
        assert_eq!(a[1][key], b[1][key], "{key} differs after resume");
    }
    let acc = a[1]["test_acc"].as_f64().unwrap();
    assert!((eval_full_accuracy(&straight) - acc * 100.0).abs() < 0.01);
    let bp = tmp.path().join("bp");
    let out = backbone_run(
        &data,
        &bp,
        "resnet18",
        &["--method", "bp", "--stages", "2", "--gpus", "cpu"],
    );
    assert!(
        stderr(&out).contains("backprop pipeline"),
        "{}",
        stderr(&out)
    );
    assert!(metrics(&bp)[0]["train_loss"].as_f64().unwrap().is_finite());
}

/// Two "nodes" (two launchers on this machine, one rank each, joined through
/// --master-addr/--master-port) train the stages as one process does.
#[test]
fn two_nodes_of_one_rank_each_train_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(&staged(&one, &["--gpus", "cpu", "--threads", "1"]));
    let (_, out1) = two_nodes(&|_| staged(&two, &[]));
    assert!(stderr(&out1).contains("launched ranks 1-1 of 2 on this node (node 1 of 2)"));
    assert_same_training(&one, &two);
}

/// Runs two launchers as nodes 0 and 1 of a two-node job (one rank each, one thread, on
/// 127.0.0.1), each with `args(node)` first; both must succeed. Returns their outputs.
fn two_nodes(args: &dyn Fn(&str) -> Vec<String>) -> (Output, Output) {
    let port = free_port();
    let node = |rank: &str| {
        let mut a = args(rank);
        a.extend(
            [
                "--threads",
                "1",
                "--nproc-per-node",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
            ]
            .map(String::from),
        );
        Command::new(BIN)
            .args(a)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut n0, mut n1) = (node("0"), node("1"));
    let out1 = wait_for(&mut n1, std::time::Duration::from_secs(120));
    let out0 = wait_for(&mut n0, std::time::Duration::from_secs(120));
    assert!(out0.status.success(), "{}", stderr(&out0));
    assert!(out1.status.success(), "{}", stderr(&out1));
    (out0, out1)
}

/// Two nodes resume a run whose directory only node 0 has (as on two machines without a
/// shared filesystem): node 1 takes the settings from rank 0, and the resumed run equals an
/// uninterrupted one.
#[test]
fn a_node_without_the_run_directory_resumes_by_following_rank_0() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(&staged(&one, &["--gpus", "cpu", "--threads", "1"]));
    // Epoch 1 on two nodes...
    two_nodes(&|_| {
        let mut a = staged(&two, &[]);
        let e = a.iter().position(|x| x == "--epochs").unwrap();
        a[e + 1] = "1".into();
        a
    });
    assert_eq!(metrics(&two).len(), 1);
    // ...then epoch 2: node 1 names a directory its machine does not have.
    let elsewhere = tmp.path().join("node1").join("two");
    two_nodes(&|rank| {
        let dir = if rank == "0" { &two } else { &elsewhere };
        vec![
            "--resume".into(),
            dir.display().to_string(),
            "--epochs".into(),
            "2".into(),
        ]
    });
    assert_same_training(&one, &two);
}

/// The BP pipeline across two ranks (activations down, gradients back over the links) trains
/// as the same pipeline in one process.
#[test]
fn a_backprop_pipeline_across_two_ranks_trains_like_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let bp = ["--method", "bp", "--threads", "1", "--epochs", "1"];
    run_ok(&staged(&one, &[&bp[..], &["--gpus", "cpu"]].concat()));
    let port = free_port();
    let out = run_ok(&staged(
        &two,
        &[&bp[..], &["--nproc-per-node", "2", "--master-port", &port]].concat(),
    ));
    assert!(
        stderr(&out).contains("stage 2 (rank 1, cpu"),
        "{}",
        stderr(&out)
    );
    assert_same_training(&one, &two);
}
