//! Faults survived: `--max-restarts` restarts a run whose rank was killed, from its newest
//! checkpoint, to the parameters an uninterrupted run trains (bit for bit on the CPU); a
//! damaged newest checkpoint falls back to the one kept before it; a failure that repeats, or a
//! disk that cannot take the checkpoint, stops the run instead; a failed rank's siblings are
//! stopped within seconds. Everything runs the real binary on small generated CIFAR-10 data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, write_cifar10};

const BIN: &str = env!("CARGO_BIN_EXE_sid-launch");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Staged SID, 2 stages on two CPU devices, 320 training samples in batches of 16: 20 steps
/// an epoch, a checkpoint every 5.
fn staged(data: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    if !data.exists() {
        write_cifar10(data, 64);
    }
    let mut v: Vec<String> = [
        "--dataset",
        "cifar10",
        "--model",
        "cnn",
        "--modules",
        "4",
        "--stages",
        "2",
        "--placement",
        "blocks=0-1,2-3;modules=0-1,2-3",
        "--gpus",
        "cpu:2",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--telemetry-hz",
        "0",
        "--checkpoint-every",
        "5",
        "--step-timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend([
        "--data-dir".into(),
        data.display().to_string(),
        "--run-dir".into(),
        run.display().to_string(),
    ]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn sid(args: &[String], limit: Duration) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(child, limit)
}

/// Waits for `child` at most `limit` (then kills it and fails), collecting its stderr.
fn wait(mut child: std::process::Child, limit: Duration) -> Output {
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let e = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
            panic!("still running after {limit:?}:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: Vec::new(),
        stderr: reader.join().unwrap(),
    }
}

fn ok(args: &[String]) -> Output {
    let out = sid(args, Duration::from_secs(240));
    assert!(out.status.success(), "{args:?} failed:\n{}", stderr(&out));
    out
}

/// The tensors of a safetensors file, by name: their dtype, shape and bytes (the header's
/// metadata, which holds times, left out).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let desc = format!("{} {}", v["dtype"], v["shape"]);
            (k.clone(), (desc, data[a..b].to_vec()))
        })
        .collect()
}

/// The two runs end with the same parameters and optimizer state, bit for bit, and the same
/// recorded losses and accuracies.
fn assert_same_bits(a: &Path, b: &Path) {
    let (ta, tb) = (
        tensors(&a.join("checkpoint.safetensors")),
        tensors(&b.join("checkpoint.safetensors")),
    );
    assert!(ta.len() > 10, "{} tensors", ta.len());
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, x) in &ta {
        assert!(x == &tb[name], "{name} differs");
    }
    let metrics = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["train_loss", "module_train_loss", "module_test_acc"] {
            assert_eq!(x[key], y[key], "{key}");
        }
    }
}

/// The uninterrupted two-rank run the two-rank tests compare with: one for the whole test
/// binary, kept under cargo's `target/tmp` (the tests' own folders go when each test ends).
fn straight_two_ranks() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("restart-straight-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        let run = dir.join("straight");
        let port = free_port();
        ok(&staged(
            &dir.join("cifar"),
            &run,
            &["--nproc-per-node", "2", "--master-port", &port],
        ));
        run
    })
}

/// A seed for the random steps, printed, from SID_CHAOS_SEED or the clock.
fn chaos_seed() -> u64 {
    let seed = std::env::var("SID_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("chaos seed {seed} (SID_CHAOS_SEED={seed} repeats it)");
    seed
}

/// splitmix64: the next value of a small random stream.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Two ranks over Gloo; a rank is SIGKILLed at a random step, then (after the restart) a
/// rank at another random step; the launcher restarts both times and the run ends with what an
/// uninterrupted run trains.
#[test]
fn two_ranks_killed_at_two_random_steps_restart_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let ranks = |run: &Path, extra: &[&str]| {
        let port = free_port();
        let mut v = staged(
            &data,
            run,
            &["--nproc-per-node", "2", "--master-port", &port],
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let straight = straight_two_ranks();
    let mut rng = chaos_seed();
    // Steps count from each start. The first kill leaves at least the steps after it to the
    // second try, which resumes at or before it.
    let first = 3 + next(&mut rng) % 15; // 3..=17 of 20
    let second = 1 + next(&mut rng) % (20 - first); // within what the second try trains
    let (r1, r2) = (next(&mut rng) % 2, next(&mut rng) % 2);
    let faults = format!("{r1}:{first}:kill@0,{r2}:{second}:kill@1");
    eprintln!("faults {faults}");
    let chaos = tmp.path().join("chaos");
    let out = ok(&ranks(
        &chaos,
        &["--max-restarts", "3", "--inject-fault", &faults],
    ));
    let e = stderr(&out);
    let restarts: Vec<&str> = e.lines().filter(|l| l.starts_with("restart ")).collect();
    assert_eq!(restarts.len(), 2, "{e}");
    for (line, r) in restarts.iter().zip([r1, r2]) {
        assert!(
            line.contains(&format!("rank {r} was killed by SIGKILL")),
            "{line}"
        );
    }
    assert!(restarts[0].starts_with("restart 1 of 3"), "{e}");
    assert!(e.contains("all 2 ranks on this node finished"), "{e}");
    assert_same_bits(straight, &chaos);
}

/// The pid of `parent`'s only child process.
fn child_of(parent: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// A single-process run (the whole network on one device) killed from outside in the middle
/// of its first epoch: the launcher restarts it, it resumes mid-epoch from its step checkpoint
/// and ends where the uninterrupted run ends.
#[test]
fn a_single_process_run_killed_mid_epoch_restarts_and_equals_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let whole = |run: &Path, extra: &[&str]| {
        let mut v = staged(
            &data,
            run,
            &[
                "--stages",
                "1",
                "--gpus",
                "cpu",
                "--epochs",
                "2",
                "--checkpoint-every",
                "3",
            ],
        );
        let at = v.iter().position(|a| a == "--placement").unwrap();
        v.drain(at..at + 2);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let straight = tmp.path().join("straight");
    ok(&whole(&straight, &[]));
    let run = tmp.path().join("killed");
    let child = Command::new(BIN)
        .args(whole(&run, &["--max-restarts", "1"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = child.id();
    // Kill the run (the launcher's child) once its first step checkpoint is written.
    let start = Instant::now();
    while !run.join("checkpoint.safetensors").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child_of(launcher).expect("the launcher runs the training as its child");
    // SAFETY: kill only sends a signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let out = wait(child, Duration::from_secs(240));
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    let restart = e
        .lines()
        .find(|l| l.starts_with("restart 1 of 1"))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        restart.contains("the run was killed by SIGKILL") && restart.contains("step "),
        "{restart}"
    );
    assert!(e.contains("epoch 1/2: resuming at step"), "{e}");
    assert_same_bits(&straight, &run);
}

/// With `--keep-checkpoints 2`, a newest checkpoint cut short makes the restart (here by
/// torchrun's variable, as its agent restarts a rank) fall back to the one before it, saying
/// so; the run still ends with the uninterrupted result.
#[test]
fn a_cut_short_newest_checkpoint_makes_the_restart_fall_back_to_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let straight = tmp.path().join("straight");
    ok(&staged(&data, &straight, &[]));
    let run = tmp.path().join("run");
    // Killed at step 13: checkpoints after steps 5 and 10.
    let args = staged(
        &data,
        &run,
        &["--keep-checkpoints", "2", "--inject-fault", "1:13:kill"],
    );
    let out = sid(&args, Duration::from_secs(120));
    assert!(!out.status.success());
    let newest = run.join("checkpoint.safetensors");
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let restarted = |args: &[String]| {
        let child = Command::new(BIN)
            .args(args)
            .env("TORCHELASTIC_RESTART_COUNT", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait(child, Duration::from_secs(120))
    };
    let args = staged(&data, &run, &["--keep-checkpoints", "2"]);
    let out = restarted(&args);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    let warning = e
        .lines()
        .find(|l| l.contains("warning: resuming from"))
        .unwrap_or_else(|| panic!("no warning in:\n{e}"));
    assert!(
        warning.contains("checkpoint-E0-S5.safetensors")
            && warning.contains(&newest.display().to_string()),
        "{warning}"
    );
    assert!(e.contains("resuming at step 5/20"), "{e}");
    assert_same_bits(&straight, &run);
}

/// A fault that comes back at the same step after a restart (a NaN in stage 2 at step 3) stops
/// the run with its error after one restart, not after every one allowed.
#[test]
fn a_fault_that_repeats_at_the_same_step_stops_instead_of_looping() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let run = tmp.path().join("run");
    let out = sid(
        &staged(
            &data,
            &run,
            &["--max-restarts", "3", "--inject-fault", "1:3:nan"],
        ),
        Duration::from_secs(120),
    );
    let e = stderr(&out);
    // 3: a restart of the whole launch would not get past it.
    assert_eq!(out.status.code(), Some(3), "{e}");
    let restarts = e.lines().filter(|l| l.starts_with("restart ")).count();
    assert_eq!(restarts, 1, "{e}");
    assert!(e.contains("restart 1 starts the run over"), "{e}");
    let last = e.lines().rfind(|l| l.starts_with("error:")).unwrap();
    assert!(
        last.contains("the same failure came back at the same point")
            && last.contains("non-finite loss"),
        "{last}"
    );
}

/// Sets RLIMIT_FSIZE (bytes) in the child before it runs: writing past it fails with EFBIG,
/// as on a full disk, for root too.
fn file_size_limit(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A checkpoint that does not fit on the disk: one error line naming the file, the previous
/// checkpoint intact (it still loads, byte for byte the same), no temporary left; with
/// restarts left, the run stops rather than restarting.
#[test]
fn a_full_disk_while_saving_is_one_error_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let run = tmp.path().join("run");
    ok(&staged(&data, &run, &["--checkpoint-every", "20"]));
    let ckpt = run.join("checkpoint.safetensors");
    let before = std::fs::read(&ckpt).unwrap();
    // Room for every small file of the run, not for a checkpoint.
    let limit = before.len() as u64 / 2;
    assert!(limit > 64 * 1024, "checkpoint of {} bytes", before.len());
    for supervised in [false, true] {
        let mut args = vec![
            "--resume".to_string(),
            run.display().to_string(),
            "--epochs".into(),
            "2".into(),
            "--checkpoint-every".into(),
            "5".into(),
        ];
        if supervised {
            args.extend(["--max-restarts".into(), "2".into()]);
        }
        let mut cmd = Command::new(BIN);
        cmd.args(&args).stdout(Stdio::null()).stderr(Stdio::piped());
        file_size_limit(&mut cmd, limit);
        let out = wait(cmd.spawn().unwrap(), Duration::from_secs(120));
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        let errors: Vec<&str> = e.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(!errors.is_empty(), "no error line:\n{e}");
        assert!(
            errors[0].contains("checkpoint.tmp") && errors[0].contains("File too large"),
            "{e}"
        );
        if supervised {
            assert_eq!(errors.len(), 2, "{e}");
            assert!(errors[1].contains("not restarted"), "{}", errors[1]);
            assert!(!e.lines().any(|l| l.starts_with("restart ")), "{e}");
        } else {
            assert_eq!(errors.len(), 1, "{e}");
        }
        assert_eq!(std::fs::read(&ckpt).unwrap(), before);
        assert!(!run.join("checkpoint.tmp").exists());
    }
    // It still resumes.
    let out = ok(&[
        "--resume".to_string(),
        run.display().to_string(),
        "--epochs".into(),
        "2".into(),
    ]);
    assert!(stderr(&out).contains("resuming after epoch 1"));
}

/// Rank 0 cannot serve the rendezvous (its port is taken): rank 1, which would wait for it,
/// is stopped within seconds, and a restart that meets the same error stops there.
#[test]
fn when_a_rank_fails_its_siblings_are_stopped_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    for restarts in ["0", "2"] {
        let run: PathBuf = tmp.path().join(format!("run{restarts}"));
        let args = staged(
            &data,
            &run,
            &[
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
                "--max-restarts",
                restarts,
            ],
        );
        let start = Instant::now();
        let out = sid(&args, Duration::from_secs(120));
        let took = start.elapsed();
        let e = stderr(&out);
        // A rendezvous that failed may work on another try (1); the same failure twice will
        // not (3).
        let code = if restarts == "0" { 1 } else { 3 };
        assert_eq!(out.status.code(), Some(code), "{e}");
        assert!(e.contains("stopping rank 1: another rank failed"), "{e}");
        let tries = if restarts == "0" { 1 } else { 2 };
        // Each try: two processes start (a few seconds on a loaded machine), rank 0 fails at
        // once, rank 1 is stopped 3 s later. Unstopped, rank 1 would wait out its 60 s step
        // timeout: 40 s a try lies between the two, far from both.
        assert!(
            took < Duration::from_secs(40 * tries),
            "{took:?} for {tries} tries:\n{e}"
        );
        let last = e.lines().rfind(|l| l.starts_with("error:")).unwrap();
        assert!(last.contains("rank 0 exited with code"), "{last}");
        if restarts == "2" {
            assert!(last.contains("the same failure came back"), "{last}");
        }
    }
}

/// torchrun itself restarts (its `--max-restarts`): the ranks it starts again see
/// `TORCHELASTIC_RESTART_COUNT` and resume from the newest checkpoint on their own, through the
/// agent's store, which still holds the first try's keys. Where `.venv/bin/torchrun` is
/// missing this fails, saying so, unless `SID_SKIP_TORCHRUN=1` asks to skip it.
#[test]
fn under_torchrun_restarted_ranks_resume_on_their_own() {
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/torchrun");
    if !torchrun.exists() {
        let skip = std::env::var("SID_SKIP_TORCHRUN").is_ok_and(|v| v == "1");
        assert!(
            skip,
            ".venv/bin/torchrun is missing (scripts/setup.sh --no-build makes it); SID_SKIP_TORCHRUN=1 skips this test"
        );
        eprintln!("skipped: no .venv/bin/torchrun (SID_SKIP_TORCHRUN=1)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let straight = straight_two_ranks();
    let run = tmp.path().join("torchrun");
    let mut cmd = Command::new(&torchrun);
    cmd.args([
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--master-port",
        &free_port(),
        "--no-python",
        BIN,
    ])
    .args(staged(&data, &run, &["--inject-fault", "1:12:kill@0"]))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let out = wait(cmd.spawn().unwrap(), Duration::from_secs(240));
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    // The second try resumed from the checkpoint after step 10.
    assert!(e.contains("epoch 1/1: resuming at step 10/20"), "{e}");
    assert_same_bits(straight, &run);
}

/// A rank that hangs: rank 0 gives up after `--step-timeout`, the launcher stops the hung rank
/// and restarts both, which resume and end with the uninterrupted result.
#[test]
fn a_hung_rank_is_restarted_after_the_step_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    let ranks = |run: &Path, extra: &[&str]| {
        let port = free_port();
        // 12 s: the healthy steps and the rendezvous of two processes on a loaded machine
        // stay well within it.
        let mut v = staged(
            &data,
            run,
            &[
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
                "--step-timeout",
                "12",
            ],
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let straight = straight_two_ranks();
    let run = tmp.path().join("hung");
    let out = ok(&ranks(
        &run,
        &["--max-restarts", "1", "--inject-fault", "1:7:hang@0"],
    ));
    let e = stderr(&out);
    let restart = e
        .lines()
        .find(|l| l.starts_with("restart 1 of 1"))
        .unwrap_or_else(|| panic!("{e}"));
    assert!(
        restart.contains("waited 12 s") && restart.contains("step 5 of it"),
        "{restart}"
    );
    assert_same_bits(straight, &run);
}
