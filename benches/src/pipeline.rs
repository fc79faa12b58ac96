//! `sid-bench pipeline`: staged SID on K devices against the same stages on one device and
//! against the single-device trainer using every core, side by side in one run.
//!
//! On a CPU each stage thread stands for a device with one libtorch thread, so "one device,
//! one thread" is the same resources per device. The all-cores baselines are what a user
//! would otherwise run. Times are medians over interleaved rounds, each round timed with the
//! pipeline full (its fill and drain are left out, as in a long run, where they are paid once
//! an epoch). Bubble: the share of the step a stage is idle, from the stages' own busy times.
//! The model ([`crate::pipeline_model`]) is fed with the per-stage times of the one-device
//! run and checked against the K-device run; then it predicts K devices joined by `--link`.
//!
//! Memory: each stage's weights and optimiser state, and the most it held of what it allocated
//! itself ([`sid_runtime::StageMemory`], measured per stage even where stages share one
//! process or GPU), from a separate untimed pass; beside it the same figure for the whole
//! network on one device. `--out DIR` writes the figures as CSV and SVG plots.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use sid_core::extractor::BlockLayout;
use sid_core::{ExtractorKind, Method, ModelConfig, Network, StagePlan};
use sid_runtime::{
    BpSchedule, PipelineMethod, StageMemory, StageStats, StagedConfig, StagedPipeline,
};
use sid_telemetry::allocations::tensor_bytes;
use sid_telemetry::AllocOwner;
use tch::{Device, Tensor};

use crate::pipeline_model::{flushing_step, staged_step_time, Link, StageCost};
use crate::{median, synthetic_batch};

/// Options of this benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Device: cpu (the K-device runs use cpu:K, a thread each) or a GPU index N (the K-device
    /// runs put K stages on that GPU, each on its own stream).
    #[arg(long, default_value = "cpu")]
    pub gpus: String,
    /// Stage counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub stages: Vec<usize>,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// Feature extractor.
    #[arg(long, default_value = "cnn")]
    pub model: ExtractorKind,
    /// Belief modules L.
    #[arg(long, default_value_t = 10)]
    pub modules: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: i64,
    /// Stage cut: auto (time each block, balance), even, or blocks=…;modules=….
    #[arg(long, default_value = "auto")]
    pub placement: String,
    /// Link between devices for the prediction: nvlink, pcie, memory or GB/s.
    #[arg(long, default_value = "nvlink")]
    pub link: String,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Timed steps per configuration per round.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Also write `pipeline-times.csv`, `pipeline-memory.csv` and SVG plots of both here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What the run measured, for `--out`.
#[derive(Default)]
struct Figures {
    /// (K, configuration, ms/step).
    times: Vec<(usize, String, f64)>,
    /// (K, configuration, each stage's memory).
    memory: Vec<(usize, String, Vec<StageMemory>)>,
}

impl Figures {
    /// Prints a row of the timing table and keeps it.
    fn row(&mut self, k: usize, name: String, ms: f64, extra: &str) {
        println!("{name:<52} {ms:>10.2}{extra}");
        self.times.push((k, name, ms));
    }

    fn write(&self, dir: &Path, title: &str) -> anyhow::Result<()> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let csv_path = dir.join("pipeline-times.csv");
        let mut w = csv::Writer::from_path(&csv_path)
            .with_context(|| format!("writing {}", csv_path.display()))?;
        w.write_record(["K", "configuration", "ms_per_step"])?;
        for (k, name, ms) in &self.times {
            w.write_record([k.to_string(), name.clone(), format!("{ms:.3}")])?;
        }
        w.flush()?;
        let csv_path = dir.join("pipeline-memory.csv");
        let mut w = csv::Writer::from_path(&csv_path)
            .with_context(|| format!("writing {}", csv_path.display()))?;
        w.write_record([
            "K",
            "configuration",
            "stage",
            "state_bytes",
            "working_bytes",
        ])?;
        for (k, name, stages) in &self.memory {
            for (s, m) in stages.iter().enumerate() {
                w.write_record([
                    k.to_string(),
                    name.clone(),
                    (s + 1).to_string(),
                    m.state.to_string(),
                    m.working.to_string(),
                ])?;
            }
        }
        w.flush()?;
        let ks: Vec<usize> = {
            let mut v: Vec<usize> = self.times.iter().map(|t| t.0).collect();
            v.dedup();
            v
        };
        for k in ks {
            let bars: Vec<(String, Vec<f64>)> = self
                .times
                .iter()
                .filter(|t| t.0 == k)
                .map(|(_, name, ms)| (name.clone(), vec![*ms]))
                .collect();
            crate::report::bar_plot(
                &dir.join(format!("pipeline-K{k}-ms.svg")),
                &format!("{title}: ms/step, K = {k} (medians)"),
                "ms per step",
                &["ms/step"],
                &bars,
            )?;
            let bars: Vec<(String, Vec<f64>)> = self
                .memory
                .iter()
                .filter(|m| m.0 == k)
                .flat_map(|(_, name, stages)| {
                    let many = stages.len() > 1;
                    stages.iter().enumerate().map(move |(s, m)| {
                        let label = match many {
                            true => format!("{name}: stage {}", s + 1),
                            false => name.clone(),
                        };
                        (label, vec![mb(m.state), mb(m.working)])
                    })
                })
                .collect();
            crate::report::bar_plot(
                &dir.join(format!("pipeline-K{k}-memory.svg")),
                &format!("{title}: peak memory by stage, K = {k}"),
                "MB",
                &["weights + Adam state", "working set (measured)"],
                &bars,
            )?;
        }
        Ok(())
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Each stage's memory over a few steps with the pipeline full (a fresh period: the most each
/// stage held of its own allocations, beside its weights and optimiser state).
fn stage_memory(
    p: &mut StagedPipeline,
    x: &Tensor,
    y: &Tensor,
) -> anyhow::Result<Vec<StageMemory>> {
    let _ = p.take_stage_stats();
    timed_round(p, x, y, 2)?;
    Ok(p.take_stage_stats()
        .iter()
        .map(|s| s.memory.unwrap_or_default())
        .collect())
}

/// The same figure for a whole network on one device: built fresh, so that its gradients too
/// are allocated while measured.
fn network_memory(net: &mut dyn Network, x: &Tensor, y: &Tensor) -> anyhow::Result<StageMemory> {
    let state = tensor_bytes(net.state()?.iter().map(|(_, t)| t));
    let owner = AllocOwner::new()?;
    {
        let _charged = owner.enter()?;
        for _ in 0..3 {
            net.train_step(x, y)?;
        }
    }
    Ok(StageMemory {
        state,
        working: owner.counts().peak,
    })
}

/// `0.2+40.1 | 5.2+10.0` (MB: state + working, by stage).
fn show_memory(stages: &[StageMemory]) -> String {
    stages
        .iter()
        .map(|m| format!("{:.1}+{:.1}", mb(m.state), mb(m.working)))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Times `steps` steps with the pipeline full: submits until the first step finishes (the
/// fill, untimed), then times until `steps` more have finished, then drains (untimed).
pub(crate) fn timed_round(
    net: &mut dyn Network,
    x: &tch::Tensor,
    y: &tch::Tensor,
    steps: usize,
) -> anyhow::Result<f64> {
    while net.submit_step(x, y)?.is_empty() {}
    let started = Instant::now();
    let mut done = 0;
    while done < steps {
        done += net.submit_step(x, y)?.len();
    }
    let per_step = started.elapsed().as_secs_f64() * 1e3 / done as f64;
    net.flush()?;
    Ok(per_step)
}

fn staged(
    model: &ModelConfig,
    plan: &StagePlan,
    devices: Vec<Device>,
    micro: usize,
) -> anyhow::Result<StagedPipeline> {
    pipelined(model, plan, devices, micro, PipelineMethod::Sid, false)
}

fn pipelined(
    model: &ModelConfig,
    plan: &StagePlan,
    devices: Vec<Device>,
    micro: usize,
    method: PipelineMethod,
    track_memory: bool,
) -> anyhow::Result<StagedPipeline> {
    let mut cfg = StagedConfig::new(model.clone(), devices, plan.clone());
    cfg.micro_batches = micro;
    cfg.method = method;
    cfg.threads_per_stage = Some(1);
    cfg.track_memory = track_memory;
    tch::manual_seed(0);
    Ok(StagedPipeline::new(cfg)?)
}

/// Each stage's idle share of a step of `step_ms`, from its busy seconds per step: `3% | 40%`.
fn idle_shares(times: &[(f64, f64)], step_ms: f64) -> String {
    let shares: Vec<String> = times
        .iter()
        .map(|(busy, _)| format!("{:.0}%", 100.0 * (1.0 - busy * 1e3 / step_ms).max(0.0)))
        .collect();
    shares.join(" | ")
}

fn per_step(t: &[StageStats]) -> Vec<(f64, f64)> {
    t.iter()
        .map(|s| {
            let n = s.steps.max(1) as f64;
            (s.busy.as_secs_f64() / n, s.forward.as_secs_f64() / n)
        })
        .collect()
}

/// Runs the benchmark and prints its table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let link = Link::parse(&args.link).ok_or_else(|| {
        anyhow::anyhow!(
            "--link {:?}: use nvlink, pcie, memory or a number of GB/s",
            args.link
        )
    })?;
    let base = sid_train::devices::resolve_devices(&args.gpus)?;
    anyhow::ensure!(
        base.len() == 1,
        "--gpus names one device (cpu or N); the K-device runs are made from it"
    );
    let device = base[0];
    let on_cpu = device == Device::Cpu;
    let cores = crate::cores();
    let model = ModelConfig {
        extractor: args.model,
        modules: args.modules,
        ..ModelConfig::default()
    };
    let (x, y) = synthetic_batch(args.batch_size, 1, 28, 10, device);
    let dev = sid_train::devices::device_name(device);
    let rounds = |nets: &mut [&mut dyn Network]| -> anyhow::Result<Vec<f64>> {
        let mut t = vec![Vec::new(); nets.len()];
        for n in nets.iter_mut() {
            timed_round(*n, &x, &y, 1)?; // warm-up
        }
        for _ in 0..args.rounds {
            for (i, n) in nets.iter_mut().enumerate() {
                t[i].push(timed_round(*n, &x, &y, args.steps)?);
            }
        }
        Ok(t.iter().map(|v| median(v)).collect())
    };
    let mut fig = Figures::default();
    println!(
        "staged SID pipeline ({}): {} backbone, L={}, batch {}, {} micro-batch(es); medians of {} rounds x {} steps",
        if on_cpu { format!("cpu, {cores} cores") } else { dev.clone() },
        args.model,
        args.modules,
        args.batch_size,
        args.micro_batches,
        args.rounds,
        args.steps
    );
    for &k in &args.stages {
        let plan = crate::user_cut(
            (args.model, args.modules, k),
            args.batch_size,
            args.micro_batches,
            &args.placement,
            device,
        )?;
        let k_devices: Vec<Device> = vec![device; k];
        println!("\nK = {k}: placement {}", plan.to_spec());
        // All-cores baselines first, each alone (see workers.rs: several OpenMP thread teams
        // in one process slow a multi-threaded one down).
        let mut all_cores = Vec::new();
        if on_cpu {
            tch::set_num_threads(cores);
            tch::manual_seed(0);
            let mut single = crate::single_device(&model, Method::Sid, false, device)?;
            all_cores.push(rounds(&mut [&mut single])?[0]);
            drop(single);
            let mut seq = staged(&model, &plan, vec![device], args.micro_batches)?;
            all_cores.push(rounds(&mut [&mut seq])?[0]);
            tch::set_num_threads(1);
        }
        tch::manual_seed(0);
        let mut paper = crate::single_device(&model, Method::Sid, false, device)?;
        let mut one = staged(&model, &plan, vec![device], args.micro_batches)?;
        let mut many = staged(&model, &plan, k_devices, args.micro_batches)?;
        let med = rounds(&mut [&mut paper, &mut one, &mut many])?;
        let (t_paper, t_one, t_many) = (med[0], med[1], med[2]);
        // Per-stage times: alone (one device, stages one after another) and in the pipeline.
        let alone = per_step(&one.take_stage_stats());
        let together = per_step(&many.take_stage_stats());
        let res = if on_cpu {
            "1 thread".to_string()
        } else {
            dev.clone()
        };
        let many_name = if on_cpu {
            format!("staged K={k}, cpu:{k} (a thread each)")
        } else {
            format!("staged K={k}, {k} streams on {dev}")
        };
        println!("{:<52} {:>10}", "configuration", "ms/step");
        if on_cpu {
            fig.row(
                k,
                format!("single-device trainer (paper SID), {cores} threads"),
                all_cores[0],
                "",
            );
            fig.row(
                k,
                format!("staged K={k}, one device, {cores} threads"),
                all_cores[1],
                "",
            );
        }
        fig.row(k, format!("paper SID, one device, {res}"), t_paper, "");
        fig.row(k, format!("staged K={k}, one device, {res}"), t_one, "");
        fig.row(k, many_name.clone(), t_many, "");
        println!(
            "speed-up of {many_name} over the same stages on one device ({res}): {:.2}x",
            t_one / t_many
        );
        if on_cpu {
            println!(
                "speed-up over the single-device trainer on all {cores} cores: {:.2}x",
                all_cores[0] / t_many
            );
        }
        // Bubble: the share of each pipelined step a stage was not computing.
        println!(
            "bubble by stage (idle share of a step, from the stages' busy times): {}",
            idle_shares(&together, t_many)
        );
        let show = |v: &[(f64, f64)]| -> String {
            v.iter()
                .map(|(b, _)| format!("{:.1}", b * 1e3))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        println!(
            "stage ms/step alone: {}; in the pipeline: {}",
            show(&alone),
            show(&together)
        );
        // No pipeline beats its slowest stage: at this cut the speed-up over the stages in
        // turn is at most their sum over the slowest (blocks are the unit of the cut).
        let sum: f64 = alone.iter().map(|(b, _)| b).sum();
        let slowest = alone.iter().map(|(b, _)| *b).fold(0.0, f64::max);
        println!(
            "ceiling at this cut (sum of the stages alone / the slowest): {:.2}x; reached {:.0}% of it",
            sum / slowest,
            100.0 * (t_one / t_many) / (sum / slowest)
        );
        // The model: fed with times measured alone, checked against the pipeline run.
        let m = args.micro_batches.max(1) as f64;
        let mb = (args.batch_size as f64 / m).max(1.0);
        let costs = |times: &[(f64, f64)]| -> Vec<StageCost> {
            times
                .iter()
                .zip(plan.stages())
                .enumerate()
                .map(|(s, ((busy, fwd), spec))| StageCost {
                    forward: fwd / m,
                    backward: (busy - fwd).max(0.0) / m,
                    out_bytes: if s + 1 < k {
                        mb * 4.0
                            * (BlockLayout::output_elems(&model, spec.blocks.end - 1)
                                + model.num_classes) as f64
                            + mb * 8.0
                    } else {
                        0.0
                    },
                })
                .collect()
        };
        let memory = Link::parse("memory").expect("named link");
        let predicted_here = staged_step_time(&costs(&alone), args.micro_batches, memory) * 1e3;
        println!(
            "model check: predicted {predicted_here:.2} ms/step for {many_name} from the stages' times alone, measured {t_many:.2} ({:+.0}%)",
            100.0 * (t_many / predicted_here - 1.0)
        );
        let predicted = staged_step_time(&costs(&alone), args.micro_batches, link) * 1e3;
        println!(
            "prediction for {k} devices like {dev} joined by {} (not measured): {predicted:.2} ms/step, {:.2}x over one",
            args.link,
            t_one / predicted
        );
        drop(many);
        drop(one);
        drop(paper);

        // The paper's SID on the same devices: its modules spread out, the extractor (nearly
        // all of a step) alone on stage 1 of the first device; every step flushes.
        let one_stage = StagePlan::even(&model, 1)?;
        let mut paper_k = pipelined(
            &model,
            &one_stage,
            vec![device; k],
            args.micro_batches,
            PipelineMethod::Paper,
            false,
        )?;
        tch::manual_seed(0);
        let mut paper_1 = crate::single_device(&model, Method::Sid, false, device)?;
        let med = rounds(&mut [&mut paper_1, &mut paper_k])?;
        let idle = idle_shares(&per_step(&paper_k.take_stage_stats()), med[1]);
        println!("paper SID on the same devices (modules spread, the extractor first; every step flushes):");
        println!(
            "{:<52} {:>10.2}",
            format!("paper SID, one device, {res}"),
            med[0]
        );
        fig.row(
            k,
            format!("paper SID, {k} devices"),
            med[1],
            &format!("   idle by stage (extractor first) {idle}"),
        );
        println!(
            "speed-up of paper SID on {k} devices over one device: {:.2}x; staged SID on {k} devices over it: {:.2}x",
            med[0] / med[1],
            med[1] / t_many
        );
        drop(paper_k);
        drop(paper_1);

        // The honest alternative on the same devices: backprop, pipelined (flushes every step).
        let bp_m = {
            let most = (2 * k as i64).min(args.batch_size);
            (1..=most)
                .rev()
                .find(|m| args.batch_size % m == 0)
                .unwrap_or(1) as usize
        };
        tch::manual_seed(0);
        let mut bp_one = crate::single_device(&model, Method::Bp, false, device)?;
        let bp = |s: BpSchedule, track: bool| {
            pipelined(
                &model,
                &plan,
                vec![device; k],
                bp_m,
                PipelineMethod::Bp(s),
                track,
            )
        };
        let (mut gpipe, mut ofob, mut zb) = (
            bp(BpSchedule::GPipe, false)?,
            bp(BpSchedule::OneFOneB, false)?,
            bp(BpSchedule::ZeroBubble, false)?,
        );
        let med = rounds(&mut [&mut bp_one, &mut gpipe, &mut ofob, &mut zb])?;
        println!(
            "backprop on the same devices, {bp_m} micro-batches (every step flushes; expected bubble (K-1)/(M+K-1) = {:.0}%):",
            100.0 * (k as f64 - 1.0) / (bp_m as f64 + k as f64 - 1.0)
        );
        // Measured idle share by stage, and what the schedule itself implies for these
        // stages' own (possibly unequal) times: the textbook (K−1)/(M+K−1) holds for equal
        // stages only.
        let bubble = |p: &mut StagedPipeline, t: f64, schedule: BpSchedule| -> String {
            let times = per_step(&p.take_stage_stats());
            let costs: Vec<StageCost> = times
                .iter()
                .map(|(busy, fwd)| StageCost {
                    forward: fwd / bp_m as f64,
                    backward: (busy - fwd).max(0.0) / bp_m as f64,
                    out_bytes: 0.0,
                })
                .collect();
            let memory = Link::parse("memory").expect("named link");
            let (_, idle) = flushing_step(&costs, bp_m, |s| schedule.ops(k, s, bp_m), memory);
            let modelled: Vec<String> = idle
                .into_iter()
                .map(|v| format!("{:.0}%", 100.0 * v.max(0.0)))
                .collect();
            format!(
                "   bubble by stage {} (schedule with these stage times: {})",
                idle_shares(&times, t),
                modelled.join(" | ")
            )
        };
        fig.row(k, format!("BP, one device, {res}"), med[0], "");
        let b = bubble(&mut gpipe, med[1], BpSchedule::GPipe);
        fig.row(k, format!("BP GPipe, {k} devices"), med[1], &b);
        let b = bubble(&mut ofob, med[2], BpSchedule::OneFOneB);
        fig.row(k, format!("BP 1F1B, {k} devices"), med[2], &b);
        let b = bubble(&mut zb, med[3], BpSchedule::ZeroBubble);
        fig.row(k, format!("BP ZB-H1, {k} devices"), med[3], &b);
        let best_bp = med[1].min(med[2]).min(med[3]);
        println!(
            "speed-up of BP pipelined over BP on one device: {:.2}x; staged SID on {k} devices over the fastest BP pipeline: {:.2}x",
            med[0] / best_bp,
            best_bp / t_many
        );
        drop((bp_one, gpipe, ofob, zb));

        // Memory, untimed (charging allocations to stages takes a lock on each): every stage
        // of each pipeline, and the whole network on one device, each built fresh.
        tch::manual_seed(0);
        let sid_one = network_memory(
            &mut crate::single_device(&model, Method::Sid, false, device)?,
            &x,
            &y,
        )?;
        let bp_one = network_memory(
            &mut crate::single_device(&model, Method::Bp, false, device)?,
            &x,
            &y,
        )?;
        let sid_k =
            |method: PipelineMethod, plan: &StagePlan| -> anyhow::Result<Vec<StageMemory>> {
                let mut p = pipelined(
                    &model,
                    plan,
                    vec![device; k],
                    args.micro_batches,
                    method,
                    true,
                )?;
                stage_memory(&mut p, &x, &y)
            };
        let measured = [
            (
                many_name.clone(),
                sid_k(PipelineMethod::Sid, &plan)?,
                sid_one,
            ),
            (
                format!("paper SID, {k} devices"),
                sid_k(PipelineMethod::Paper, &one_stage)?,
                sid_one,
            ),
            (
                format!("BP GPipe, {k} devices"),
                stage_memory(&mut bp(BpSchedule::GPipe, true)?, &x, &y)?,
                bp_one,
            ),
            (
                format!("BP 1F1B, {k} devices"),
                stage_memory(&mut bp(BpSchedule::OneFOneB, true)?, &x, &y)?,
                bp_one,
            ),
            (
                format!("BP ZB-H1, {k} devices"),
                stage_memory(&mut bp(BpSchedule::ZeroBubble, true)?, &x, &y)?,
                bp_one,
            ),
        ];
        println!(
            "peak memory by stage, MB (weights and Adam state + the most the stage held of its own allocations; the stage's device needs their sum; one device: the single-device network, whole batches):"
        );
        println!(
            "{:<52} {}",
            format!("paper SID, one device, {res}"),
            show_memory(&[sid_one])
        );
        println!(
            "{:<52} {}",
            format!("BP, one device, {res}"),
            show_memory(&[bp_one])
        );
        fig.memory
            .push((k, format!("paper SID, one device, {res}"), vec![sid_one]));
        fig.memory
            .push((k, format!("BP, one device, {res}"), vec![bp_one]));
        for (name, stages, one) in measured {
            let largest = stages.iter().map(StageMemory::peak).max().unwrap_or(0);
            println!(
                "{name:<52} {}   largest stage {:.2}x the method on one device",
                show_memory(&stages),
                largest as f64 / one.peak().max(1) as f64
            );
            fig.memory.push((k, name, stages));
        }
    }
    if let Some(dir) = &args.out {
        fig.write(
            dir,
            &format!(
                "{} backbone, L={}, batch {}, {} micro-batch(es)",
                args.model, args.modules, args.batch_size, args.micro_batches
            ),
        )?;
        println!(
            "\nwrote pipeline-times.csv, pipeline-memory.csv and plots to {}",
            dir.display()
        );
    }
    Ok(())
}
