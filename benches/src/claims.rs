//! `sid-bench claims DIR`: the figures of `docs/claims.md` from the runs `benches/claims.sh`
//! made. It reads every run directory `DIR/<claim>/<cell>-seed<N>/` (its `config.toml`,
//! `metrics.jsonl` and `telemetry.jsonl`), prints the tables (mean ± sample standard deviation
//! over seeds, and a verdict by the rule below), and writes them with their plots into `--out`:
//! `claims-tables.md`, `claims-runs.csv` (one row per run) and `claims-*.svg`.
//!
//! Verdict rule (two groups of seeds, A claimed better than B): **holds** when
//! mean(A) − sd(A) > mean(B) + sd(B), **does not hold here** when
//! mean(A) + sd(A) < mean(B) − sd(B), else **inconclusive** (the difference is inside the
//! seed spread).

use std::fmt::Write as _;

/// A plot's named series of (x, mean, sd) points.
type Series = (String, Vec<(f64, f64, f64)>);
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::report;

/// Arguments of `sid-bench claims`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The output folder of benches/claims.sh.
    #[arg(default_value = "runs/claims")]
    pub dir: PathBuf,
    /// Where the tables (claims-tables.md), the per-run figures (claims-runs.csv) and the plots
    /// (claims-*.svg) are written.
    #[arg(long, default_value = "docs/plots")]
    pub out: PathBuf,
}

/// One finished run of claims.sh.
#[derive(Debug, Clone, Default)]
pub struct ClaimRun {
    /// The claim's folder: `noise`, `depth`, `alpha`.
    pub claim: String,
    /// The cell, the directory name without `-seed<N>`.
    pub cell: String,
    pub seed: u64,
    /// `sid` or `bp`.
    pub method: String,
    pub extractor: String,
    pub modules: usize,
    pub label_noise: f64,
    pub alpha: f64,
    pub epochs: usize,
    pub limit_train: Option<usize>,
    /// Final epoch's test accuracy, percent.
    pub acc: f64,
    /// Test accuracy per epoch, percent.
    pub acc_by_epoch: Vec<f64>,
    /// Final epoch's accuracy of every module's belief, percent.
    pub module_acc: Vec<f64>,
    /// Final epoch's KL(p_y‖p_i) on the test set per module.
    pub module_label_kl: Vec<f64>,
    /// The process's peak resident memory as the run reports it (bytes).
    pub peak_rss: Option<u64>,
    /// Resident memory at the telemetry's first sample, once the data is loaded (bytes).
    pub start_rss: Option<u64>,
    /// The telemetry's largest resident memory (bytes).
    pub telemetry_peak_rss: Option<u64>,
    /// The telemetry's largest resident memory during the first epoch's training steps, before
    /// its evaluation: samples up to the first epoch's `epoch_seconds` (bytes).
    pub train_peak_rss: Option<u64>,
    /// Mean seconds per training epoch.
    pub epoch_seconds: f64,
}

impl ClaimRun {
    /// Resident memory the training added to the loaded process: the telemetry's peak minus
    /// its first sample, MiB.
    pub fn growth_mib(&self) -> Option<f64> {
        match (self.start_rss, self.telemetry_peak_rss) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1048576.0),
            _ => None,
        }
    }

    /// Resident memory the first epoch's training steps added to the loaded process, MiB.
    pub fn train_growth_mib(&self) -> Option<f64> {
        match (self.start_rss, self.train_peak_rss) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1048576.0),
            _ => None,
        }
    }

    /// Whether KL(p_y‖p_i) never rises along the cascade (the monotone-descent proposition).
    pub fn kl_monotone(&self) -> bool {
        self.module_label_kl.windows(2).all(|w| w[1] <= w[0])
    }

    /// The largest rise of KL(p_y‖p_i) from one module to the next (0 when monotone).
    pub fn worst_kl_rise(&self) -> f64 {
        self.module_label_kl
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0, f64::max)
    }

    /// The largest fall of accuracy from one module to the next, points (0 when monotone).
    pub fn worst_acc_drop(&self) -> f64 {
        self.module_acc
            .windows(2)
            .map(|w| w[0] - w[1])
            .fold(0.0, f64::max)
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Reads one run directory; `None` when it has not finished (no `summary.json`).
pub fn read_run(claim: &str, dir: &Path) -> Result<Option<ClaimRun>> {
    if !dir.join("summary.json").exists() {
        return Ok(None);
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("run directory name")?;
    let Some((cell, seed)) = name.rsplit_once("-seed") else {
        bail!("{}: not <cell>-seed<N>", dir.display());
    };
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .with_context(|| format!("reading {}", dir.join("config.toml").display()))?;
    let cfg = sid_train::RunConfig::from_toml(&text)
        .with_context(|| format!("parsing {}", dir.join("config.toml").display()))?;
    let name_of = |v: Value| v.as_str().map(str::to_string).unwrap_or_default();
    let metrics_path = dir.join("metrics.jsonl");
    let records: Vec<Value> = std::fs::read_to_string(&metrics_path)
        .with_context(|| format!("reading {}", metrics_path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("parsing {}", metrics_path.display()))?;
    let last = records.last().context("metrics.jsonl is empty")?;
    let pct = |v: Vec<f64>| v.into_iter().map(|x| 100.0 * x).collect::<Vec<_>>();
    let peak_rss = records
        .iter()
        .flat_map(|r| r["peak_memory"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["bytes"].as_u64())
        .max();
    let first_epoch = records
        .first()
        .and_then(|r| r["epoch_seconds"].as_f64())
        .unwrap_or(0.0);
    let (mut start_rss, mut telemetry_peak_rss, mut train_peak_rss) = (None, None, None);
    let max = |m: Option<u64>, b: u64| Some(m.map_or(b, |m| m.max(b)));
    if let Ok(t) = std::fs::read_to_string(dir.join("telemetry.jsonl")) {
        for line in t.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let Some(b) = v["rss_bytes"].as_u64() {
                start_rss.get_or_insert(b);
                telemetry_peak_rss = max(telemetry_peak_rss, b);
                if v["t"].as_f64().is_some_and(|t| t <= first_epoch) {
                    train_peak_rss = max(train_peak_rss, b);
                }
            }
        }
    }
    let secs: Vec<f64> = records
        .iter()
        .filter_map(|r| r["epoch_seconds"].as_f64())
        .collect();
    Ok(Some(ClaimRun {
        claim: claim.to_string(),
        cell: cell.to_string(),
        seed: seed
            .parse()
            .with_context(|| format!("{}: seed", dir.display()))?,
        method: name_of(serde_json::to_value(cfg.optim.method)?),
        extractor: name_of(serde_json::to_value(cfg.model.extractor)?),
        modules: cfg.model.modules,
        label_noise: cfg.data.label_noise,
        alpha: cfg.optim.alpha,
        epochs: cfg.optim.epochs,
        limit_train: cfg.data.limit_train,
        acc: 100.0 * last["test_acc"].as_f64().context("test_acc")?,
        acc_by_epoch: records
            .iter()
            .filter_map(|r| r["test_acc"].as_f64())
            .map(|a| 100.0 * a)
            .collect(),
        module_acc: pct(f64s(&last["module_test_acc"])),
        module_label_kl: f64s(&last["module_test_label_kl"]),
        peak_rss,
        start_rss,
        telemetry_peak_rss,
        train_peak_rss,
        epoch_seconds: if secs.is_empty() {
            0.0
        } else {
            secs.iter().sum::<f64>() / secs.len() as f64
        },
    }))
}

/// Every finished run under `dir` (`<claim>/<cell>-seed<N>`), sorted by claim, cell and seed.
pub fn read_runs(dir: &Path) -> Result<Vec<ClaimRun>> {
    let mut runs = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for claim in entries {
        let claim = claim?.path();
        if !claim.is_dir() {
            continue;
        }
        let name = claim.file_name().unwrap().to_string_lossy().to_string();
        for run in std::fs::read_dir(&claim)? {
            let run = run?.path();
            if run.is_dir() {
                if let Some(r) = read_run(&name, &run)? {
                    runs.push(r);
                }
            }
        }
    }
    runs.sort_by(|a, b| (&a.claim, &a.cell, a.seed).cmp(&(&b.claim, &b.cell, b.seed)));
    Ok(runs)
}

/// Mean and sample standard deviation (n − 1; 0 for one value).
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// The verdict on "A is better than B" (higher is better), by the rule in the module docs.
pub fn verdict(a: &[f64], b: &[f64]) -> &'static str {
    if a.len() < 2 || b.len() < 2 {
        return "too few seeds";
    }
    let ((ma, sa), (mb, sb)) = (mean_sd(a), mean_sd(b));
    if ma - sa > mb + sb {
        "holds"
    } else if ma + sa < mb - sb {
        "does not hold here"
    } else {
        "inconclusive"
    }
}

fn pm(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, s) = mean_sd(v);
    format!("{m:.digits$} ± {s:.digits$} (n={})", v.len())
}

/// The final accuracies of the runs that `keep` selects.
fn accs(runs: &[ClaimRun], keep: impl Fn(&ClaimRun) -> bool) -> Vec<f64> {
    runs.iter().filter(|r| keep(r)).map(|r| r.acc).collect()
}

/// Paired differences A − B by seed, for the seeds both have.
fn paired(a: &[&ClaimRun], b: &[&ClaimRun]) -> Vec<f64> {
    a.iter()
        .filter_map(|x| b.iter().find(|y| y.seed == x.seed).map(|y| x.acc - y.acc))
        .collect()
}

/// Paired differences as `+0.18, -0.04, +1.03 (mean +0.39)`; `–` when no seed pairs.
fn by_seed(d: &[f64]) -> String {
    if d.is_empty() {
        return "–".into();
    }
    format!(
        "{} (mean {:+.2})",
        d.iter()
            .map(|x| format!("{x:+.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        mean_sd(d).0
    )
}

fn seeds_of(runs: &[&ClaimRun]) -> String {
    let mut s: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    s.sort();
    s.dedup();
    s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// The markdown tables of every claim with runs.
pub fn tables(runs: &[ClaimRun]) -> String {
    let mut s = String::new();
    let of = |claim: &str| -> Vec<&ClaimRun> { runs.iter().filter(|r| r.claim == claim).collect() };
    let setting = |rs: &[&ClaimRun]| -> String {
        let Some(r) = rs.first() else {
            return String::new();
        };
        format!(
            "{} extractor, {} epochs, {}; seeds {}",
            r.extractor,
            r.epochs,
            r.limit_train
                .map_or("full training set".into(), |n| format!(
                    "first {n} training samples"
                )),
            seeds_of(rs)
        )
    };

    // SID vs BP under label noise (noise 0 is the no-noise claim), 5 and 20 epochs.
    for claim in ["noise", "noise-long"] {
        let noise = of(claim);
        if noise.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "### SID against BP, label noise (`{claim}`: L = 10; {})\n",
            setting(&noise)
        );
        let _ = writeln!(
            s,
            "| noise | SID % | BP % | SID − BP, by seed | SID ahead? | SID drop from clean | BP drop from clean |\n|---|---|---|---|---|---|---|"
        );
        let mut levels: Vec<f64> = noise.iter().map(|r| r.label_noise).collect();
        levels.sort_by(f64::total_cmp);
        levels.dedup();
        let clean = |m: &str| {
            mean_sd(&accs(runs, |r| {
                r.claim == claim && r.method == m && r.label_noise == 0.0
            }))
            .0
        };
        for n in levels {
            let pick = |m: &str| -> Vec<&ClaimRun> {
                noise
                    .iter()
                    .copied()
                    .filter(|r| r.method == m && r.label_noise == n)
                    .collect()
            };
            let (sid, bp) = (pick("sid"), pick("bp"));
            let a: Vec<f64> = sid.iter().map(|r| r.acc).collect();
            let b: Vec<f64> = bp.iter().map(|r| r.acc).collect();
            let d = paired(&sid, &bp);
            let _ = writeln!(
                s,
                "| {:.0}% | {} | {} | {} | {} | {:.2} | {:.2} |",
                100.0 * n,
                pm(&a, 2),
                pm(&b, 2),
                by_seed(&d),
                verdict(&a, &b),
                clean("sid") - mean_sd(&a).0,
                clean("bp") - mean_sd(&b).0,
            );
        }
        s.push('\n');
        // Test accuracy by epoch (mean over seeds): does either method fall back as it fits the noise?
        if noise.iter().any(|r| r.acc_by_epoch.len() > 5) {
            let _ = writeln!(s, "Test accuracy by epoch, mean over seeds, %:\n");
            let epochs = noise
                .iter()
                .map(|r| r.acc_by_epoch.len())
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                s,
                "| run | {} | best − final |\n|---|{}---|",
                (1..=epochs)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
                "---|".repeat(epochs)
            );
            for (m, n, curve) in epoch_curves(runs, claim) {
                let best = curve.iter().cloned().fold(f64::MIN, f64::max);
                let _ = writeln!(
                    s,
                    "| {} {:.0}% | {} | {:.2} |",
                    m.to_uppercase(),
                    100.0 * n,
                    curve
                        .iter()
                        .map(|a| format!("{a:.2}"))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    best - curve.last().copied().unwrap_or(f64::NAN)
                );
            }
            s.push('\n');
        }
    }

    // SID vs BP on SimpleCNN.
    let cnn = of("cnn");
    if !cnn.is_empty() {
        let _ = writeln!(
            s,
            "### SID against BP on SimpleCNN (L = 10, no noise; {})\n",
            setting(&cnn)
        );
        let _ = writeln!(
            s,
            "| method | final test accuracy by seed, % | mean ± sd | epoch seconds (mean) |\n|---|---|---|---|"
        );
        for m in ["sid", "bp"] {
            let rs: Vec<&ClaimRun> = cnn.iter().copied().filter(|r| r.method == m).collect();
            let a: Vec<f64> = rs.iter().map(|r| r.acc).collect();
            let secs: Vec<f64> = rs.iter().map(|r| r.epoch_seconds).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} |",
                m.to_uppercase(),
                rs.iter()
                    .map(|r| format!("{:.2} (seed {})", r.acc, r.seed))
                    .collect::<Vec<_>>()
                    .join(", "),
                pm(&a, 2),
                mean_sd(&secs).0
            );
        }
        let pick =
            |m: &str| -> Vec<&ClaimRun> { cnn.iter().copied().filter(|r| r.method == m).collect() };
        let (sid, bp) = (pick("sid"), pick("bp"));
        let d = paired(&sid, &bp);
        let a: Vec<f64> = sid.iter().map(|r| r.acc).collect();
        let b: Vec<f64> = bp.iter().map(|r| r.acc).collect();
        let _ = writeln!(
            s,
            "\nSID − BP by seed: {}; SID ahead? {}\n",
            by_seed(&d),
            verdict(&a, &b)
        );
    }

    // Depth.
    let depth = of("depth");
    if !depth.is_empty() {
        let _ = writeln!(s, "### Depth (no noise; {})\n", setting(&depth));
        let _ = writeln!(
            s,
            "| L | SID % | BP % | SID − BP, by seed | SID ahead? | SID runs with KL(p_y‖p_i) non-increasing | largest KL rise | SID runs with per-module accuracy non-decreasing | largest accuracy drop, points |\n|---|---|---|---|---|---|---|---|---|"
        );
        for l in depth_levels(&depth) {
            let a = accs(runs, |r| {
                r.claim == "depth" && r.method == "sid" && r.modules == l
            });
            let b = accs(runs, |r| {
                r.claim == "depth" && r.method == "bp" && r.modules == l
            });
            let sid: Vec<&&ClaimRun> = depth
                .iter()
                .filter(|r| r.method == "sid" && r.modules == l)
                .collect();
            let sid_runs: Vec<&ClaimRun> = sid.iter().map(|r| **r).collect();
            let bp_runs: Vec<&ClaimRun> = depth
                .iter()
                .copied()
                .filter(|r| r.method == "bp" && r.modules == l)
                .collect();
            let d = paired(&sid_runs, &bp_runs);
            let mono = sid.iter().filter(|r| r.kl_monotone()).count();
            let acc_mono = sid.iter().filter(|r| r.worst_acc_drop() == 0.0).count();
            let rise = sid.iter().map(|r| r.worst_kl_rise()).fold(0.0, f64::max);
            let drop = sid.iter().map(|r| r.worst_acc_drop()).fold(0.0, f64::max);
            let _ = writeln!(
                s,
                "| {l} | {} | {} | {} | {} | {mono}/{} | {rise:.4} | {acc_mono}/{} | {drop:.2} |",
                pm(&a, 2),
                pm(&b, 2),
                by_seed(&d),
                verdict(&a, &b),
                sid.len(),
                sid.len()
            );
        }
        s.push('\n');
        // Does accuracy improve with depth? Shallowest against deepest, per method.
        let ls = depth_levels(&depth);
        if let (Some(&lo), Some(&hi)) = (ls.first(), ls.last()) {
            for m in ["sid", "bp"] {
                let a = accs(runs, |r| {
                    r.claim == "depth" && r.method == m && r.modules == hi
                });
                let b = accs(runs, |r| {
                    r.claim == "depth" && r.method == m && r.modules == lo
                });
                let _ = writeln!(
                    s,
                    "- {}: L = {hi} against L = {lo}: {:+.2} points; L = {hi} better? {}",
                    m.to_uppercase(),
                    mean_sd(&a).0 - mean_sd(&b).0,
                    verdict(&a, &b)
                );
            }
            s.push('\n');
        }

        // Memory per device against L.
        let _ = writeln!(
            s,
            "### Memory of one device against L (the depth runs; MiB = 2^20 bytes)\n"
        );
        let _ = writeln!(
            s,
            "| L | SID peak RSS | BP peak RSS | SID growth, epoch 1's training steps | BP growth, epoch 1's training steps | SID growth, whole run | BP growth, whole run | SID less (training steps / whole run)? |\n|---|---|---|---|---|---|---|---|"
        );
        for l in depth_levels(&depth) {
            let col = |m: &str, f: &dyn Fn(&ClaimRun) -> Option<f64>| -> Vec<f64> {
                depth
                    .iter()
                    .filter(|r| r.method == m && r.modules == l)
                    .filter_map(|r| f(r))
                    .collect()
            };
            let peak = |r: &ClaimRun| r.peak_rss.map(|b| b as f64 / 1048576.0);
            let grow = |r: &ClaimRun| r.growth_mib();
            let train = |r: &ClaimRun| r.train_growth_mib();
            // Less is better: "SID less" is "BP more".
            let _ = writeln!(
                s,
                "| {l} | {} | {} | {} | {} | {} | {} | {} / {} |",
                pm(&col("sid", &peak), 1),
                pm(&col("bp", &peak), 1),
                pm(&col("sid", &train), 1),
                pm(&col("bp", &train), 1),
                pm(&col("sid", &grow), 1),
                pm(&col("bp", &grow), 1),
                verdict(&col("bp", &train), &col("sid", &train)),
                verdict(&col("bp", &grow), &col("sid", &grow)),
            );
        }
        s.push('\n');
    }

    // Alpha.
    let alpha = of("alpha");
    if !alpha.is_empty() {
        let _ = writeln!(
            s,
            "### α, the weight of the label term (SID, L = 10, no noise; {}; α = 0.5 is the noise claim's clean SID runs)\n",
            setting(&alpha)
        );
        let _ = writeln!(
            s,
            "| α | SID % | against α = 0.5, by seed | α = 0.5 better? |\n|---|---|---|---|"
        );
        let half_runs = alpha_runs(runs, 0.5);
        let half = alpha_accs(runs, 0.5);
        for a in alpha_levels(runs) {
            let v = alpha_accs(runs, a);
            let (better, diff) = if a == 0.5 {
                ("–".to_string(), "–".to_string())
            } else {
                let d = paired(&alpha_runs(runs, a), &half_runs);
                (verdict(&half, &v).to_string(), by_seed(&d))
            };
            let _ = writeln!(s, "| {a} | {} | {diff} | {better} |", pm(&v, 2));
        }
        s.push('\n');
    }
    s
}

fn depth_levels(depth: &[&ClaimRun]) -> Vec<usize> {
    let mut ls: Vec<usize> = depth.iter().map(|r| r.modules).collect();
    ls.sort();
    ls.dedup();
    ls
}

/// Per (method, noise) of a claim, the test accuracy by epoch averaged over seeds.
fn epoch_curves(runs: &[ClaimRun], claim: &str) -> Vec<(String, f64, Vec<f64>)> {
    let mut keys: Vec<(String, f64)> = runs
        .iter()
        .filter(|r| r.claim == claim)
        .map(|r| (r.method.clone(), r.label_noise))
        .collect();
    keys.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.total_cmp(&b.1)));
    keys.dedup();
    keys.into_iter()
        .map(|(m, n)| {
            let rs: Vec<&ClaimRun> = runs
                .iter()
                .filter(|r| r.claim == claim && r.method == m && r.label_noise == n)
                .collect();
            let epochs = rs.iter().map(|r| r.acc_by_epoch.len()).min().unwrap_or(0);
            let curve = (0..epochs)
                .map(|e| mean_sd(&rs.iter().map(|r| r.acc_by_epoch[e]).collect::<Vec<_>>()).0)
                .collect();
            (m, n, curve)
        })
        .collect()
}

/// The α values measured: the alpha claim's and the clean SID runs at L = 10 (α = 0.5).
fn alpha_levels(runs: &[ClaimRun]) -> Vec<f64> {
    let mut v: Vec<f64> = runs
        .iter()
        .filter(|r| r.claim == "alpha")
        .map(|r| r.alpha)
        .chain(
            runs.iter()
                .filter(|r| r.claim == "noise" && r.method == "sid" && r.label_noise == 0.0)
                .map(|r| r.alpha),
        )
        .collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

fn alpha_runs(runs: &[ClaimRun], a: f64) -> Vec<&ClaimRun> {
    runs.iter()
        .filter(|r| {
            r.method == "sid"
                && r.alpha == a
                && ((r.claim == "alpha")
                    || (r.claim == "noise" && r.label_noise == 0.0 && r.modules == 10))
        })
        .collect()
}

fn alpha_accs(runs: &[ClaimRun], a: f64) -> Vec<f64> {
    alpha_runs(runs, a).iter().map(|r| r.acc).collect()
}

/// Mean ± sd points per series, drawn as lines with vertical error bars, saved as SVG.
pub fn error_bar_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let pts: Vec<(f64, f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.1 - p.2), b.max(p.1 + p.2))
    });
    let pad = |a: f64, b: f64| {
        if (b - a).abs() < 1e-12 {
            (a - 1.0, b + 1.0)
        } else {
            (a - 0.08 * (b - a), b + 0.08 * (b - a))
        }
    };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    let cap = (x1 - x0) * 0.008;
    // Series side by side at the same x, so that their bars do not hide each other.
    let dodge = |i: usize| (i as f64 - (series.len() as f64 - 1.0) / 2.0) * (x1 - x0) * 0.006;
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(e)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
            )
            .map_err(e)?;
        // The bar: a vertical line from mean − sd to mean + sd, with caps.
        for p in points {
            let (x, lo, hi) = (p.0 + dodge(i), p.1 - p.2, p.1 + p.2);
            for seg in [
                vec![(x, lo), (x, hi)],
                vec![(x - cap, lo), (x + cap, lo)],
                vec![(x - cap, hi), (x + cap, hi)],
            ] {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        seg,
                        color.stroke_width(1),
                    )))
                    .map_err(e)?;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// (x, mean, sd) of the final accuracy per x for the runs `keep` selects.
fn stat_points(
    runs: &[ClaimRun],
    keep: impl Fn(&ClaimRun) -> bool,
    x: impl Fn(&ClaimRun) -> f64,
) -> Vec<(f64, f64, f64)> {
    let mut xs: Vec<f64> = runs.iter().filter(|r| keep(r)).map(&x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    xs.into_iter()
        .map(|v| {
            let a: Vec<f64> = runs
                .iter()
                .filter(|r| keep(r) && x(r) == v)
                .map(|r| r.acc)
                .collect();
            let (m, s) = mean_sd(&a);
            (v, m, s)
        })
        .collect()
}

/// Writes the plots: accuracy against noise, against L and against α (mean ± sd), per-module
/// accuracy and KL(p_y‖p_i) along the cascade for the first seed's SID run per L, and memory
/// against L.
pub fn plots(runs: &[ClaimRun], out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let method_name = |m: &str| if m == "sid" { "SID" } else { "BP" };
    for (claim, file) in [
        ("noise", "claims-noise.svg"),
        ("noise-long", "claims-noise-long.svg"),
    ] {
        let Some(epochs) = runs.iter().find(|r| r.claim == claim).map(|r| r.epochs) else {
            continue;
        };
        let series: Vec<Series> = ["sid", "bp"]
            .iter()
            .map(|m| {
                (
                    format!("{} (mean ± sd over seeds)", method_name(m)),
                    stat_points(
                        runs,
                        |r| r.claim == claim && r.method == *m,
                        |r| 100.0 * r.label_noise,
                    ),
                )
            })
            .collect();
        let p = out.join(file);
        error_bar_plot(
            &p,
            &format!("Test accuracy against label noise (L = 10, {epochs} epochs)"),
            "symmetric label noise, % of training labels",
            "final test accuracy, %",
            &series,
        )?;
        written.push(p);
        if epochs > 5 {
            let curves: Vec<(String, Vec<(f64, f64)>)> = epoch_curves(runs, claim)
                .into_iter()
                .map(|(m, n, c)| {
                    (
                        format!("{} {:.0}% noise", method_name(&m), 100.0 * n),
                        c.iter()
                            .enumerate()
                            .map(|(e, a)| ((e + 1) as f64, *a))
                            .collect(),
                    )
                })
                .collect();
            let p = out.join(format!("{}-epochs.svg", file.trim_end_matches(".svg")));
            report::line_plot(
                &p,
                "Test accuracy by epoch, mean over seeds (L = 10)",
                "epoch",
                "test accuracy, %",
                &curves,
            )?;
            written.push(p);
        }
    }
    if runs.iter().any(|r| r.claim == "depth") {
        let series: Vec<Series> = ["sid", "bp"]
            .iter()
            .map(|m| {
                (
                    format!("{} (mean ± sd over seeds)", method_name(m)),
                    stat_points(
                        runs,
                        |r| r.claim == "depth" && r.method == *m,
                        |r| r.modules as f64,
                    ),
                )
            })
            .collect();
        let p = out.join("claims-depth.svg");
        error_bar_plot(
            &p,
            "Test accuracy against depth L (no noise)",
            "modules L",
            "final test accuracy, %",
            &series,
        )?;
        written.push(p);

        // Per-module curves: the lowest seed's SID run per L.
        let first_seed = runs
            .iter()
            .filter(|r| r.claim == "depth" && r.method == "sid")
            .map(|r| r.seed)
            .min()
            .unwrap_or(0);
        let sid: Vec<&ClaimRun> = runs
            .iter()
            .filter(|r| r.claim == "depth" && r.method == "sid" && r.seed == first_seed)
            .collect();
        let mut sid = sid;
        sid.sort_by_key(|r| r.modules);
        let curve = |f: &dyn Fn(&ClaimRun) -> &Vec<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            sid.iter()
                .map(|r| {
                    (
                        format!("L = {}", r.modules),
                        f(r).iter()
                            .enumerate()
                            .map(|(i, v)| ((i + 1) as f64, *v))
                            .collect(),
                    )
                })
                .collect()
        };
        let p = out.join("claims-modules-acc.svg");
        report::line_plot(
            &p,
            &format!(
                "SID: test accuracy of each module's belief p_i (seed {first_seed}, final epoch)"
            ),
            "module i",
            "test accuracy of p_i, %",
            &curve(&|r| &r.module_acc),
        )?;
        written.push(p);
        let p = out.join("claims-modules-kl.svg");
        report::line_plot(
            &p,
            &format!("SID: KL(p_y || p_i) on the test set along the cascade (seed {first_seed})"),
            "module i",
            "KL(p_y || p_i), nats",
            &curve(&|r| &r.module_label_kl),
        )?;
        written.push(p);

        type Figure = fn(&ClaimRun) -> Option<f64>;
        let kinds: [(&str, Figure); 2] = [
            ("epoch 1's training steps", ClaimRun::train_growth_mib),
            ("whole run, evaluation included", ClaimRun::growth_mib),
        ];
        let mut mem: Vec<Series> = Vec::new();
        for (kind, f) in kinds {
            for m in ["sid", "bp"] {
                let mut ls: Vec<usize> = runs
                    .iter()
                    .filter(|r| r.claim == "depth" && r.method == m)
                    .map(|r| r.modules)
                    .collect();
                ls.sort();
                ls.dedup();
                let pts = ls
                    .into_iter()
                    .filter_map(|l| {
                        let v: Vec<f64> = runs
                            .iter()
                            .filter(|r| r.claim == "depth" && r.method == m && r.modules == l)
                            .filter_map(f)
                            .collect();
                        (!v.is_empty()).then(|| {
                            let (a, b) = mean_sd(&v);
                            (l as f64, a, b)
                        })
                    })
                    .collect();
                mem.push((format!("{}, {kind}", method_name(m)), pts));
            }
        }
        let p = out.join("claims-memory.svg");
        error_bar_plot(
            &p,
            "Resident memory added to the loaded process, one CPU device (mean ± sd)",
            "modules L",
            "peak RSS − RSS at start, MiB",
            &mem,
        )?;
        written.push(p);
    }
    let alphas = alpha_levels(runs);
    if runs.iter().any(|r| r.claim == "alpha") {
        let pts: Vec<(f64, f64, f64)> = alphas
            .iter()
            .map(|&a| {
                let (m, s) = mean_sd(&alpha_accs(runs, a));
                (a, m, s)
            })
            .collect();
        let p = out.join("claims-alpha.svg");
        error_bar_plot(
            &p,
            "SID: test accuracy against α (L = 10, no noise)",
            "α (weight of the label term; 1 = no consistency term)",
            "final test accuracy, %",
            &[("SID (mean ± sd over seeds)".to_string(), pts)],
        )?;
        written.push(p);
    }
    Ok(written)
}

/// One CSV row per run.
pub fn write_runs_csv(path: &Path, runs: &[ClaimRun]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    w.write_record([
        "claim",
        "cell",
        "seed",
        "method",
        "extractor",
        "modules",
        "label_noise",
        "alpha",
        "epochs",
        "test_acc",
        "module_test_acc",
        "module_test_label_kl",
        "peak_rss_mib",
        "rss_growth_mib",
        "epoch_seconds",
    ])?;
    let list = |v: &[f64], d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for r in runs {
        w.write_record([
            r.claim.clone(),
            r.cell.clone(),
            r.seed.to_string(),
            r.method.clone(),
            r.extractor.clone(),
            r.modules.to_string(),
            r.label_noise.to_string(),
            r.alpha.to_string(),
            r.epochs.to_string(),
            format!("{:.2}", r.acc),
            list(&r.module_acc, 2),
            list(&r.module_label_kl, 4),
            r.peak_rss
                .map(|b| format!("{:.1}", b as f64 / 1048576.0))
                .unwrap_or_default(),
            r.growth_mib()
                .map(|g| format!("{g:.1}"))
                .unwrap_or_default(),
            format!("{:.2}", r.epoch_seconds),
        ])?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// `sid-bench claims`.
pub fn run(args: Args) -> Result<()> {
    let runs = read_runs(&args.dir)?;
    if runs.is_empty() {
        bail!(
            "no finished run under {} (benches/claims.sh makes them)",
            args.dir.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let t = tables(&runs);
    print!("{t}");
    let md = args.out.join("claims-tables.md");
    std::fs::write(
        &md,
        format!(
            "<!-- written by `sid-bench claims {}`; do not edit -->\n\n{t}",
            args.dir.display()
        ),
    )
    .with_context(|| format!("writing {}", md.display()))?;
    let csv = args.out.join("claims-runs.csv");
    write_runs_csv(&csv, &runs)?;
    println!(
        "{} runs; wrote {} and {}",
        runs.len(),
        md.display(),
        csv.display()
    );
    for p in plots(&runs, &args.out)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_sd_and_verdicts() {
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(verdict(&[90.0, 90.2, 89.8], &[88.0, 88.1, 87.9]), "holds");
        assert_eq!(
            verdict(&[88.0, 88.1, 87.9], &[90.0, 90.2, 89.8]),
            "does not hold here"
        );
        assert_eq!(
            verdict(&[89.0, 90.0, 88.0], &[89.5, 88.5, 89.0]),
            "inconclusive"
        );
        assert_eq!(verdict(&[89.0], &[88.0]), "too few seeds");
    }

    #[test]
    fn monotone_figures() {
        let r = ClaimRun {
            module_acc: vec![80.0, 81.0, 80.5, 82.0],
            module_label_kl: vec![0.5, 0.4, 0.41, 0.3],
            ..Default::default()
        };
        assert!(!r.kl_monotone());
        assert!((r.worst_kl_rise() - 0.01).abs() < 1e-9);
        assert!((r.worst_acc_drop() - 0.5).abs() < 1e-9);
        let ok = ClaimRun {
            module_acc: vec![80.0, 81.0],
            module_label_kl: vec![0.5, 0.4],
            ..Default::default()
        };
        assert!(ok.kl_monotone() && ok.worst_acc_drop() == 0.0);
    }

    /// Writes a fake run directory the way sid-launch does and reads it back into tables and plots.
    #[test]
    fn reads_runs_and_writes_tables_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |claim: &str,
                  cell: &str,
                  seed: u64,
                  method: &str,
                  l: usize,
                  noise: f64,
                  acc: f64| {
            let epochs = if claim == "noise-long" { 6 } else { 1 };
            let d = dir.path().join(claim).join(format!("{cell}-seed{seed}"));
            std::fs::create_dir_all(&d).unwrap();
            let mut cfg = sid_train::RunConfig::default();
            cfg.optim.method = if method == "sid" {
                sid_core::Method::Sid
            } else {
                sid_core::Method::Bp
            };
            cfg.model.modules = l;
            cfg.data.label_noise = noise;
            let mods: Vec<f64> = (0..l).map(|i| acc - 0.01 * (l - 1 - i) as f64).collect();
            let kl: Vec<f64> = (0..l).map(|i| 0.5 - 0.01 * i as f64).collect();
            cfg.optim.epochs = epochs;
            std::fs::write(d.join("config.toml"), cfg.to_toml()).unwrap();
            let lines: String = (1..=epochs)
                .map(|e| {
                    let rec = serde_json::json!({"epoch": e,
                        "test_acc": acc + 0.01 * (epochs - e) as f64,
                        "module_test_acc": mods, "module_test_label_kl": kl, "epoch_seconds": 2.0,
                        "peak_memory": [{"device": "cpu", "bytes": 600u64 << 20, "source": "process-rss"}]});
                    format!("{rec}\n")
                })
                .collect();
            std::fs::write(d.join("metrics.jsonl"), lines).unwrap();
            std::fs::write(
                d.join("telemetry.jsonl"),
                format!(
                    "{}\n{}\n",
                    serde_json::json!({"t": 0.0, "rss_bytes": 580u64 << 20}),
                    serde_json::json!({"t": 0.1, "rss_bytes": 600u64 << 20})
                ),
            )
            .unwrap();
            std::fs::write(d.join("summary.json"), "{}").unwrap();
        };
        for seed in 0..3 {
            let j = seed as f64 * 0.001;
            mk("noise", "sid-noise0", seed, "sid", 10, 0.0, 0.88 + j);
            mk("noise", "bp-noise0", seed, "bp", 10, 0.0, 0.86 + j);
            mk("noise", "sid-noise40", seed, "sid", 10, 0.4, 0.80 + j);
            mk("noise", "bp-noise40", seed, "bp", 10, 0.4, 0.70 + j);
            mk("noise-long", "sid-noise40", seed, "sid", 10, 0.4, 0.80 + j);
            mk("noise-long", "bp-noise40", seed, "bp", 10, 0.4, 0.75 + j);
            mk("depth", "sid-L2", seed, "sid", 2, 0.0, 0.85 + j);
            mk("depth", "bp-L2", seed, "bp", 2, 0.0, 0.85 + j);
            mk("depth", "sid-L4", seed, "sid", 4, 0.0, 0.87 + j);
            mk("depth", "bp-L4", seed, "bp", 4, 0.0, 0.84 + j);
        }
        // An unfinished run is skipped.
        std::fs::create_dir_all(dir.path().join("depth/sid-L8-seed0")).unwrap();
        let runs = read_runs(dir.path()).unwrap();
        assert_eq!(runs.len(), 30);
        assert!(runs
            .iter()
            .all(|r| (r.growth_mib().unwrap() - 20.0).abs() < 1e-9));
        let t = tables(&runs);
        assert!(
            t.contains("| 40% | 80.10 ± 0.10 (n=3) | 70.10 ± 0.10 (n=3) |"),
            "{t}"
        );
        assert!(
            t.contains("| 4 | 87.10 ± 0.10 (n=3) | 84.10 ± 0.10 (n=3) | +3.00, +3.00, +3.00 (mean +3.00) | holds | 3/3 |"),
            "{t}"
        );
        assert!(
            t.contains("- SID: L = 4 against L = 2: +2.00 points; L = 4 better? holds"),
            "{t}"
        );
        // 20-epoch-style claim: the curve by epoch, and how far the final epoch is below the best.
        assert!(
            t.contains("| BP 40% | 80.10 | 79.10 | 78.10 | 77.10 | 76.10 | 75.10 | 5.00 |"),
            "{t}"
        );
        let out = dir.path().join("plots");
        std::fs::create_dir_all(&out).unwrap();
        let written = plots(&runs, &out).unwrap();
        assert_eq!(written.len(), 7);
        let svg = std::fs::read_to_string(out.join("claims-noise.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("label noise"));
        write_runs_csv(&out.join("r.csv"), &runs).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("r.csv"))
                .unwrap()
                .lines()
                .count(),
            31
        );
    }
}
