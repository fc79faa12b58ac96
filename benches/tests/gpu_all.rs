//! `benches/gpu-all.sh`, the one command for a lent GPU, without a GPU: a failing check makes
//! it exit non-zero (its self-test), and it refuses to start, at once and in one line, where
//! there is no GPU or no libtorch or the files it needs are missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-all.sh")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `gpu-all.sh` with `env` and asserts it refused to start, within a few seconds, with
/// exit code 2 and one line containing `why`.
fn refuses(env: &[(&str, &str)], why: &str) {
    let out_dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script())
        .env("OUT", out_dir.path())
        .envs(env.iter().copied())
        .output()
        .expect("runs bash");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "slow refusal: {t}"
    );
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {t}");
    assert!(
        lines[0].starts_with("gpu-all: refusing to start: ") && lines[0].contains(why),
        "{t}"
    );
}

#[test]
fn a_failing_check_makes_gpu_all_exit_non_zero() {
    let out_dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script())
        .arg("--self-test")
        .env("OUT", out_dir.path())
        .output()
        .expect("runs bash");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    for line in [
        "PASS self-test-passing",
        "FAIL self-test-forced-failure: exit code 1",
        "    FAIL a sub-check: forced",
        "FAIL self-test-over-budget: ran past its budget of 6 s",
        "FAIL self-test-nvml-error-is-not-a-name: exit code 1",
        "gpu-all: 1 passed, 3 failed",
    ] {
        assert!(
            t.lines().any(|l| l.starts_with(line)),
            "no line {line:?} in:\n{t}"
        );
    }
    // The overrun (a 30 s sleep) was stopped at its budget, not waited for.
    assert!(start.elapsed() < Duration::from_secs(25), "{t}");
    // Each check's output is kept under $OUT.
    let log = std::fs::read_to_string(out_dir.path().join("self-test-forced-failure/log.txt"));
    assert!(log.unwrap().contains("forced"));
}

#[test]
fn without_a_gpu_gpu_all_refuses_to_start_in_one_line() {
    refuses(
        &[("NVIDIA_SMI", "/nonexistent/nvidia-smi")],
        "no GPU: /nonexistent/nvidia-smi not found",
    );
}

/// A stand-in `nvidia-smi` that lists one GPU, in a folder of its own.
fn fake_nvidia_smi(dir: &Path) -> String {
    let path = dir.join("nvidia-smi");
    std::fs::write(
        &path,
        "#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn without_libtorch_or_the_carried_files_gpu_all_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let smi = fake_nvidia_smi(dir.path());
    refuses(
        &[("NVIDIA_SMI", &smi), ("LIBTORCH", "/nonexistent/libtorch")],
        "libtorch not found",
    );
    // The project's libtorch (cargo passes LIBTORCH on), but no data where it looks.
    if std::env::var_os("LIBTORCH").is_some() {
        refuses(
            &[
                ("NVIDIA_SMI", &smi),
                ("SID_DATA", "/nonexistent/fashion-mnist"),
            ],
            "run benches/prepare-gpu-check.sh first",
        );
    }
}

/// `benches/gpu-tests.sh` (the whole suite with `--include-ignored`) on stand-ins for
/// nvidia-smi, libtorch and cargo: `cargo`'s result lines decide, and a result line that
/// still reports an ignored test fails it (a GPU test did not run).
#[test]
fn gpu_tests_fail_on_a_failure_or_a_test_left_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let smi = fake_nvidia_smi(dir.path());
    let lib = dir.path().join("libtorch/lib");
    std::fs::create_dir_all(&lib).unwrap();
    for f in ["libtorch_cpu.so", "libtorch_cuda.so"] {
        std::fs::write(lib.join(f), "").unwrap();
    }
    let cargo = dir.path().join("cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\ncase \"$*\" in *--no-run*) exit 0;; esac\nprintf '%s\\n' \"$FAKE_TESTS\"\nexit \"$FAKE_RC\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-tests.sh");
    let run = |tests: &str, rc: &str| {
        let out = Command::new("bash")
            .arg(&script)
            .env("OUT", dir.path().join("out"))
            .env("NVIDIA_SMI", &smi)
            .env("LIBTORCH", dir.path().join("libtorch"))
            .env("CARGO", &cargo)
            .env("FAKE_TESTS", tests)
            .env("FAKE_RC", rc)
            .output()
            .expect("runs bash");
        (out.status.code(), text(&out))
    };
    let ok = "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out";
    let (code, t) = run(ok, "0");
    assert_eq!(code, Some(0), "{t}");
    assert!(t.lines().any(|l| l.starts_with("PASS tests")), "{t}");
    let left = "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out";
    let (code, t) = run(left, "0");
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains("FAIL tests: a test was still ignored"), "{t}");
    let (code, t) = run("test a ... FAILED", "101");
    assert_eq!(code, Some(1), "{t}");
    assert!(t.contains("FAIL tests: exit code 101"), "{t}");
    // Without a GPU it refuses at once.
    let out = Command::new("bash")
        .arg(&script)
        .env("NVIDIA_SMI", "/nonexistent/nvidia-smi")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).starts_with("gpu-tests: refusing to start: no GPU"));
}
