//! The harness: SID vs BP side by side on real data, sweeps, the memory check and the
//! speed-up check, written to a results folder (`results.csv`, `report.md`, SVG plots).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use sid_core::{ExtractorKind, Method, ModelConfig, Network};
use sid_runtime::Placement;
use sid_train::{Run, RunConfig};
use tch::Device;

use crate::report::{line_plot, series, side_by_side, write_csv, Row};
use crate::{median, synthetic_batch};

/// Options shared by the harness commands.
#[derive(Debug, Clone, Parser)]
pub struct Common {
    /// Results folder (results.csv, report.md, plots/, runs/).
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
    /// Devices for training runs: cpu, 0, … (SID uses all of them; BP the first).
    #[arg(long, default_value = "cpu")]
    pub gpus: String,
    /// Feature extractor.
    #[arg(long, default_value = "mlp")]
    pub model: ExtractorKind,
    /// Belief modules L (sweeps over L ignore it).
    #[arg(long, default_value_t = 4)]
    pub modules: usize,
    /// Module hidden width (the width sweep ignores it).
    #[arg(long, default_value_t = 256)]
    pub module_hidden: i64,
    /// Training samples per run (the first N of Fashion-MNIST).
    #[arg(long, default_value_t = 6400)]
    pub limit_train: usize,
    /// Epochs per run.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Folder of Fashion-MNIST (default: Debian's).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seed of every run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train single-GPU runs eagerly (sid-launch --no-cuda-graph) instead of replaying a CUDA
    /// graph of the step; runs on several devices (the workers sweep) never use graphs.
    #[arg(long)]
    pub no_cuda_graph: bool,
}

impl Common {
    fn run_config(&self, method: Method) -> Result<RunConfig> {
        let mut c = RunConfig::default();
        c.optim.method = method;
        c.runtime.gpus = self.gpus.parse()?;
        c.model.extractor = self.model;
        c.model.modules = self.modules;
        c.model.module_hidden = self.module_hidden;
        c.data.limit_train = Some(self.limit_train);
        c.optim.epochs = self.epochs;
        c.optim.batch_size = self.batch_size;
        c.data.data_dir = self.data_dir.clone();
        c.optim.seed = self.seed;
        c.runtime.cuda_graph = self.no_cuda_graph.then_some(false);
        Ok(c)
    }
}

/// Trains one configuration in `out/runs/<name>` and turns its metrics into a row.
fn train(
    common: &Common,
    cfg: RunConfig,
    name: &str,
    sweep: &str,
    param: &str,
    value: f64,
) -> Result<Row> {
    let dir = common.out.join("runs").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let method = cfg.optim.method;
    let gpus = cfg.runtime.gpus.clone();
    let mut run = Run::create_on(cfg, &dir, None)?;
    let stop = AtomicBool::new(false);
    run.train(&stop, &mut |_| {})?;
    let read = sid_train::metrics::read_all(&dir.join(sid_train::trainer::METRICS_FILE))?;
    if let Some(notice) = &read.dropped_last_line {
        eprintln!("  {name}: warning: {notice}");
    }
    let m = read.records;
    let last = m.last().context("no epoch recorded")?;
    eprintln!(
        "  {name}: {:.2} ms/step, test acc {:.2}%",
        last.median_step_ms,
        last.test_acc * 100.0
    );
    Ok(Row {
        sweep: sweep.into(),
        method: method.to_string(),
        param: param.into(),
        value,
        ms_per_step: Some(last.median_step_ms),
        samples_per_s: Some(last.samples_per_second),
        peak_bytes: last.peak_memory.iter().map(|p| p.bytes).max(),
        test_acc: Some(last.test_acc),
        acc_by_epoch: m.iter().map(|e| e.test_acc).collect(),
        note: format!(
            "devices {gpus}; peak = {}",
            last.peak_memory
                .first()
                .map(|p| p.source.as_str())
                .unwrap_or("-")
        ),
    })
}

/// SID and BP on the same model, data and devices.
pub fn compare(common: &Common) -> Result<Vec<Row>> {
    eprintln!("compare: SID vs BP");
    let mut rows = Vec::new();
    for method in [Method::Sid, Method::Bp] {
        rows.push(train(
            common,
            common.run_config(method)?,
            &format!("compare-{method}"),
            "compare",
            "L",
            common.modules as f64,
        )?);
    }
    Ok(rows)
}

/// SID and BP trained at each value of one setting: `set` applies a value to a config.
fn sweep_both(
    common: &Common,
    sweep: &str,
    param: &str,
    values: &[f64],
    set: impl Fn(&mut RunConfig, f64),
) -> Result<Vec<Row>> {
    eprintln!("sweep: {param} in {values:?}");
    let mut rows = Vec::new();
    for &v in values {
        for method in [Method::Sid, Method::Bp] {
            let mut cfg = common.run_config(method)?;
            set(&mut cfg, v);
            rows.push(train(
                common,
                cfg,
                &format!("{sweep}-{method}-{param}{v}"),
                sweep,
                param,
                v,
            )?);
        }
    }
    Ok(rows)
}

/// Depth sweep: SID and BP at each L.
pub fn sweep_depth(common: &Common, depths: &[usize]) -> Result<Vec<Row>> {
    let values: Vec<f64> = depths.iter().map(|&l| l as f64).collect();
    sweep_both(common, "depth", "L", &values, |c, v| {
        c.model.modules = v as usize
    })
}

/// Width sweep: SID and BP at each module hidden width.
pub fn sweep_width(common: &Common, widths: &[i64]) -> Result<Vec<Row>> {
    let values: Vec<f64> = widths.iter().map(|&w| w as f64).collect();
    sweep_both(common, "width", "hidden", &values, |c, v| {
        c.model.module_hidden = v as i64
    })
}

/// Label-noise sweep (accuracy): SID and BP at each noise level.
pub fn sweep_noise(common: &Common, levels: &[f64]) -> Result<Vec<Row>> {
    sweep_both(common, "noise", "noise", levels, |c, v| {
        c.data.label_noise = v
    })
}

/// Workers sweep: SID with K workers (on the CPU, `cpu:K`; on a GPU, K workers on it).
pub fn sweep_workers(common: &Common, ks: &[usize]) -> Result<Vec<Row>> {
    eprintln!("sweep: workers K in {ks:?}");
    let base = sid_train::devices::parse_devices(&common.gpus)?[0];
    let mut rows = Vec::new();
    for &k in ks {
        let gpus = match base {
            Device::Cuda(i) => vec![i.to_string(); k].join(","),
            _ => format!("cpu:{k}"),
        };
        let modules = common.modules.max(k);
        let mut cfg = common.run_config(Method::Sid)?;
        cfg.runtime.gpus = gpus.parse()?;
        cfg.model.modules = modules;
        cfg.runtime.threads = (base == Device::Cpu).then_some(1);
        rows.push(train(
            common,
            cfg,
            &format!("workers-K{k}"),
            "workers",
            "K",
            k as f64,
        )?);
    }
    Ok(rows)
}

/// Per-step working memory: the peak during a step minus what was held before it (CUDA: the
/// allocator's tensor bytes; CPU: live C-heap bytes, sampled from a background thread).
fn step_memory(
    net: &mut dyn Network,
    device: Device,
    x: &tch::Tensor,
    y: &tch::Tensor,
) -> Result<u64> {
    use sid_telemetry::memory::{cuda_memory, heap_in_use_bytes, reset_cuda_peak, HeapPeak};
    let mut deltas = Vec::new();
    for i in 0..5 {
        let delta = match device {
            Device::Cuda(d) => {
                reset_cuda_peak(d)?;
                let before = cuda_memory(d)?.allocated.max(0) as u64;
                net.train_step(x, y)?;
                let peak = cuda_memory(d)?.peak_allocated.max(0) as u64;
                peak.saturating_sub(before)
            }
            _ => {
                let before = heap_in_use_bytes();
                let probe = HeapPeak::start();
                net.train_step(x, y)?;
                probe.finish().saturating_sub(before)
            }
        };
        if i >= 2 {
            deltas.push(delta as f64);
        }
    }
    Ok(median(&deltas) as u64)
}

/// The memory check: per-step working memory of BP and SID (one device) as L grows.
pub fn memory_check(
    common: &Common,
    depths: &[usize],
    hidden: i64,
    batch: i64,
) -> Result<Vec<Row>> {
    let device = sid_train::devices::resolve_devices(&common.gpus)?[0];
    eprintln!("memory check: per-step working memory vs L (hidden {hidden}, batch {batch})");
    let (x, y) = synthetic_batch(batch, 1, 28, 10, device);
    let mut rows = Vec::new();
    for &l in depths {
        let cfg = ModelConfig {
            extractor: common.model,
            modules: l,
            module_hidden: hidden,
            ..ModelConfig::default()
        };
        for method in [Method::Sid, Method::Bp] {
            tch::manual_seed(0);
            let mut net = crate::single_device(&cfg, method, false, device)?;
            let bytes = step_memory(&mut net, device, &x, &y)?;
            eprintln!("  {method} L={l}: {:.1} MiB", bytes as f64 / 1048576.0);
            rows.push(Row {
                sweep: "memory".into(),
                method: method.to_string(),
                param: "L".into(),
                value: l as f64,
                peak_bytes: Some(bytes),
                note: format!(
                    "per-step working memory on {}",
                    sid_train::devices::device_name(device)
                ),
                ..Default::default()
            });
        }
    }
    Ok(rows)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The speed-up check: time each part on one worker, predict the K-worker step from the
/// pipeline schedule (extractor + phase-1 chain + each worker's phase 2 + transfers), and
/// compare with the measured K-worker step.
pub fn speedup_check(
    common: &Common,
    ks: &[usize],
    hidden: i64,
    modules: usize,
    batch: i64,
) -> Result<Vec<Row>> {
    let base = sid_train::devices::resolve_devices(&common.gpus)?[0];
    let cfg = ModelConfig {
        extractor: common.model,
        modules,
        module_hidden: hidden,
        ..ModelConfig::default()
    };
    let (x, y) = synthetic_batch(batch, 1, 28, 10, base);
    let threads = (base == Device::Cpu).then_some(1);
    let build =
        |devices: Vec<Device>| crate::workers::pipeline(&cfg, devices, threads, None, true, false);
    // Each step's total, and each stage's busy and forward time per step (stage 1 is the
    // extractor, then the module stages).
    type Timings = (Vec<f64>, Vec<(f64, f64)>);
    let timings = |p: &mut sid_runtime::StagedPipeline| -> Result<Timings> {
        for _ in 0..3 {
            p.train_step(&x, &y)?;
        }
        let _ = p.take_stage_stats();
        let totals = (0..15)
            .map(|_| -> Result<f64> {
                let t = Instant::now();
                p.train_step(&x, &y)?;
                Ok(ms(t.elapsed()))
            })
            .collect::<Result<Vec<_>>>()?;
        let stages = p
            .take_stage_stats()
            .iter()
            .map(|s| {
                let n = s.steps.max(1) as f64;
                (ms(s.busy) / n, ms(s.forward) / n)
            })
            .collect();
        Ok((totals, stages))
    };
    eprintln!("speed-up check: L={modules}, hidden {hidden}, batch {batch}");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut one = build(vec![base])?;
    let (totals1, stages1) = timings(&mut one)?;
    let measured1 = median(&totals1);
    let ext = stages1[0].0;
    let (module_busy, module_forward) = stages1[1];
    let f1 = module_forward / modules as f64;
    let f2 = (module_busy - module_forward) / modules as f64;
    let overhead = measured1 - ext - module_busy;
    let mut rows = Vec::new();
    eprintln!("  one worker: extractor {ext:.2} ms, per module phase 1 {f1:.2} ms, phase 2 {f2:.2} ms, other {overhead:.2} ms");
    for &k in ks {
        let devices = match base {
            Device::Cuda(i) => vec![Device::Cuda(i); k],
            _ => vec![Device::Cpu; k],
        };
        let blocks = Placement::even(modules, k)?;
        // Worker j starts its phase 1 when worker j-1's chain is done; then runs phase 2.
        let mut start = 0.0f64;
        let mut finish = 0.0f64;
        for b in blocks.blocks() {
            let n = b.len() as f64;
            finish = finish.max(start + n * (f1 + f2));
            start += n * f1;
        }
        let predicted = ext + overhead * k as f64 + finish;
        let measured = if k == 1 {
            measured1
        } else {
            let mut p = build(devices)?;
            median(&timings(&mut p)?.0)
        };
        let paper = modules as f64 * f1
            + blocks.blocks().iter().map(|b| b.len()).max().unwrap_or(1) as f64 * f2;
        let note_cores = match base {
            Device::Cpu if k > cores => {
                format!("; {k} workers share {cores} cores, the prediction assumes one core each")
            }
            _ => String::new(),
        };
        eprintln!("  K={k}: predicted {predicted:.2} ms, measured {measured:.2} ms (paper's model without extractor: {paper:.2} ms)");
        rows.push(Row {
            sweep: "speedup".into(),
            method: "sid".into(),
            param: "K".into(),
            value: k as f64,
            ms_per_step: Some(measured),
            note: format!(
                "predicted {predicted:.2} ms; paper's model (no extractor) {paper:.2} ms; speed-up measured {:.2}x, predicted {:.2}x{note_cores}",
                measured1 / measured,
                (ext + overhead + modules as f64 * (f1 + f2)) / predicted
            ),
            ..Default::default()
        });
    }
    Ok(rows)
}

/// Writes `results.csv`, `report.md` and the plots for everything measured.
pub fn write_results(out: &Path, rows: &[Row], header: &str) -> Result<()> {
    std::fs::create_dir_all(out.join("plots"))
        .with_context(|| format!("creating {}", out.display()))?;
    write_csv(&out.join("results.csv"), rows)?;
    let mut md = format!("# sid benchmark report\n\n{header}\n");
    for (sweep, title) in [
        ("compare", "SID vs BP"),
        ("depth", "Depth sweep"),
        ("width", "Module width sweep"),
        ("noise", "Label noise sweep (accuracy)"),
    ] {
        if rows.iter().any(|r| r.sweep == sweep) {
            let _ = write!(md, "\n## {title}\n\n{}", side_by_side(rows, sweep));
        }
    }
    if rows.iter().any(|r| r.sweep == "workers") {
        md.push_str("\n## Workers sweep (SID)\n\n| K | ms/step | speed-up | samples/s | test acc |\n|---|---|---|---|---|\n");
        let base = rows
            .iter()
            .find(|r| r.sweep == "workers" && r.value == 1.0)
            .and_then(|r| r.ms_per_step);
        for r in rows.iter().filter(|r| r.sweep == "workers") {
            let sp = match (base, r.ms_per_step) {
                (Some(b), Some(m)) => format!("{:.2}x", b / m),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {:.2} | {sp} | {:.0} | {:.2}% |",
                r.value,
                r.ms_per_step.unwrap_or(0.0),
                r.samples_per_s.unwrap_or(0.0),
                100.0 * r.test_acc.unwrap_or(0.0)
            );
        }
    }
    if rows.iter().any(|r| r.sweep == "memory") {
        md.push_str("\n## Memory check: per-step working memory vs depth\n\n| L | SID MiB | BP MiB |\n|---|---|---|\n");
        for (x, s) in series(rows, "memory", "sid", |r| r.peak_bytes.map(|b| b as f64)) {
            let b = series(rows, "memory", "bp", |r| r.peak_bytes.map(|b| b as f64))
                .into_iter()
                .find(|p| p.0 == x)
                .map(|p| p.1)
                .unwrap_or(0.0);
            let _ = writeln!(md, "| {x} | {:.1} | {:.1} |", s / 1048576.0, b / 1048576.0);
        }
    }
    if rows.iter().any(|r| r.sweep == "speedup") {
        md.push_str("\n## Speed-up check: predicted vs measured step time\n\n| K | measured ms | note |\n|---|---|---|\n");
        for r in rows.iter().filter(|r| r.sweep == "speedup") {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {} |",
                r.value,
                r.ms_per_step.unwrap_or(0.0),
                r.note
            );
        }
    }
    std::fs::write(out.join("report.md"), md).context("writing report.md")?;
    let plots = out.join("plots");
    let acc_series: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .filter(|r| r.sweep == "compare")
        .map(|r| {
            (
                r.method.clone(),
                r.acc_by_epoch
                    .iter()
                    .enumerate()
                    .map(|(i, a)| ((i + 1) as f64, 100.0 * a))
                    .collect(),
            )
        })
        .collect();
    line_plot(
        &plots.join("accuracy-vs-epoch.svg"),
        "test accuracy vs epoch",
        "epoch",
        "test accuracy (%)",
        &acc_series,
    )?;
    let by = |sweep: &str, f: fn(&Row) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        ["sid", "bp"]
            .iter()
            .map(|m| (m.to_string(), series(rows, sweep, m, f)))
            .filter(|s| !s.1.is_empty())
            .collect()
    };
    line_plot(
        &plots.join("ms-per-step-vs-L.svg"),
        "ms per step vs depth L",
        "L",
        "ms/step",
        &by("depth", |r| r.ms_per_step),
    )?;
    line_plot(
        &plots.join("peak-memory-vs-L.svg"),
        "per-step working memory vs depth L",
        "L",
        "MiB",
        &by("memory", |r| r.peak_bytes.map(|b| b as f64 / 1048576.0)),
    )?;
    let base = rows
        .iter()
        .find(|r| r.sweep == "workers" && r.value == 1.0)
        .and_then(|r| r.ms_per_step);
    if let Some(b) = base {
        let s = vec![(
            "sid".to_string(),
            series(rows, "workers", "sid", |r| r.ms_per_step.map(|m| b / m)),
        )];
        line_plot(
            &plots.join("speedup-vs-K.svg"),
            "speed-up vs workers K",
            "K",
            "speed-up (x)",
            &s,
        )?;
    }
    Ok(())
}

/// What a harness command measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Experiment {
    /// SID vs BP on the same model, data and devices.
    Compare,
    /// SID and BP at each depth (`--depths`, default 1,2,4,8).
    Depth,
    /// SID with K workers (`--workers`, default 1,2,4).
    Workers,
    /// SID and BP at each module width (`--widths`, default 64,256,1024).
    Width,
    /// SID and BP at each label-noise level (`--noise-levels`, default 0,0.2,0.4; accuracy).
    Noise,
    /// Per-step working memory of SID and BP at each depth.
    Memory,
    /// Predicted vs measured step time for each worker count (L = 8).
    Speedup,
}

/// `sid-bench run`: one or more experiments into one results folder.
#[derive(Debug, Clone, Parser)]
pub struct RunArgs {
    /// Experiments to run (default: all of them).
    #[arg(value_enum, num_args = 0..)]
    pub experiments: Vec<Experiment>,
    #[command(flatten)]
    pub common: Common,
    /// Module width for the memory and speed-up checks (wide, so modules dominate).
    #[arg(long, default_value_t = 2048)]
    pub check_hidden: i64,
    /// Batch size for the memory and speed-up checks.
    #[arg(long, default_value_t = 256)]
    pub check_batch: i64,
    /// Depths L of the depth sweep and the memory check.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub depths: Vec<usize>,
    /// Worker counts K of the workers sweep and the speed-up check.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Module widths of the width sweep.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub widths: Vec<i64>,
    /// Label-noise levels of the noise sweep.
    #[arg(long, value_delimiter = ',', default_value = "0,0.2,0.4")]
    pub noise_levels: Vec<f64>,
}

/// Runs the experiments and writes the results folder.
pub fn run(args: RunArgs) -> Result<()> {
    let all = [
        Experiment::Compare,
        Experiment::Depth,
        Experiment::Workers,
        Experiment::Width,
        Experiment::Noise,
        Experiment::Memory,
        Experiment::Speedup,
    ];
    let todo: Vec<Experiment> = if args.experiments.is_empty() {
        all.to_vec()
    } else {
        args.experiments.clone()
    };
    let c = &args.common;
    let mut rows = Vec::new();
    for e in &todo {
        rows.extend(match e {
            Experiment::Compare => compare(c)?,
            Experiment::Depth => sweep_depth(c, &args.depths)?,
            Experiment::Workers => sweep_workers(c, &args.workers)?,
            Experiment::Width => sweep_width(c, &args.widths)?,
            Experiment::Noise => sweep_noise(c, &args.noise_levels)?,
            Experiment::Memory => {
                memory_check(c, &args.depths, args.check_hidden, args.check_batch)?
            }
            Experiment::Speedup => {
                speedup_check(c, &args.workers, args.check_hidden, 8, args.check_batch)?
            }
        });
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let header = format!(
        "Machine: {cores} CPU cores{}. Devices: `{}`. Model: {} extractor, L = {}, module hidden {}, batch {}; \
         Fashion-MNIST, first {} training samples, {} epochs, seed {}. Times are medians of the last epoch's steps; \
         accuracy is the final epoch's test accuracy. Peak memory: CUDA allocator bytes on a GPU, process RSS on the CPU \
         (the whole process, data set included); the memory check measures per-step working memory \
         instead (the peak during a step minus what was held before it: CUDA allocator bytes, or live C-heap bytes on the CPU).{}\n\nExperiments: {:?}.",
        gpu_description(),
        c.gpus,
        c.model,
        c.modules,
        c.module_hidden,
        c.batch_size,
        c.limit_train,
        c.epochs,
        c.seed,
        if graphed(&c.run_config(sid_core::Method::Sid)?)? {
            " Single-GPU training steps are replayed from a CUDA graph (`--no-cuda-graph` runs them eagerly)."
        } else {
            ""
        },
        todo
    );
    write_results(&c.out, &rows, &header)?;
    println!(
        "results: {}/results.csv, {}/report.md, {}/plots/",
        c.out.display(),
        c.out.display(),
        c.out.display()
    );
    print!("{}", std::fs::read_to_string(c.out.join("report.md"))?);
    Ok(())
}

/// ", N CUDA device(s): NAME, ..." when CUDA is in use, so every report names its GPU.
fn gpu_description() -> String {
    if !tch::Cuda::is_available() {
        return String::new();
    }
    let names = sid_telemetry::nvml::gpu_names()
        .map(|n| n.join(", "))
        .unwrap_or_else(|e| format!("names unknown ({e})"));
    format!(", {} CUDA device(s): {names}", tch::Cuda::device_count())
}

/// Whether the single-device trainer of `cfg` replays its steps from a CUDA graph.
fn graphed(cfg: &sid_train::RunConfig) -> anyhow::Result<bool> {
    let plan = sid_train::Plan::resolve(cfg, cfg.runtime.gpus.devices(), false, false)?;
    Ok(plan.graphs == sid_train::Graphs::WholeStep)
}
