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

use std::time::Instant;

use clap::Parser;
use sid_core::extractor::BlockLayout;
use sid_core::{BpNetwork, ExtractorKind, LossConfig, ModelConfig, Network, SidNetwork, StagePlan};
use sid_runtime::{BpSchedule, PipelineMethod, StageTime, StagedConfig, StagedPipeline};
use tch::Device;

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
    pipelined(model, plan, devices, micro, PipelineMethod::Sid)
}

fn pipelined(
    model: &ModelConfig,
    plan: &StagePlan,
    devices: Vec<Device>,
    micro: usize,
    method: PipelineMethod,
) -> anyhow::Result<StagedPipeline> {
    let mut cfg = StagedConfig::new(model.clone(), devices, plan.clone());
    cfg.micro_batches = micro;
    cfg.method = method;
    cfg.threads_per_stage = Some(1);
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

fn per_step(t: &[StageTime]) -> Vec<(f64, f64)> {
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
        let plan = match args.placement.as_str() {
            "auto" => {
                if on_cpu {
                    tch::set_num_threads(1);
                }
                let costs = sid_core::stage::profile_costs(
                    &model,
                    args.batch_size / args.micro_batches as i64,
                    device,
                    3,
                );
                StagePlan::balanced(&model, k, &costs)?
            }
            "even" => StagePlan::even(&model, k)?,
            spec => StagePlan::parse(spec, &model)?,
        };
        let k_devices: Vec<Device> = vec![device; k];
        println!("\nK = {k}: placement {}", plan.to_spec());
        // All-cores baselines first, each alone (see workers.rs: several OpenMP thread teams
        // in one process slow a multi-threaded one down).
        let mut all_cores = Vec::new();
        if on_cpu {
            tch::set_num_threads(cores);
            tch::manual_seed(0);
            let mut single = SidNetwork::new(&model, LossConfig::default(), 1e-3, device)?;
            all_cores.push(rounds(&mut [&mut single])?[0]);
            drop(single);
            let mut seq = staged(&model, &plan, vec![device], args.micro_batches)?;
            all_cores.push(rounds(&mut [&mut seq])?[0]);
            tch::set_num_threads(1);
        }
        tch::manual_seed(0);
        let mut paper = SidNetwork::new(&model, LossConfig::default(), 1e-3, device)?;
        let mut one = staged(&model, &plan, vec![device], args.micro_batches)?;
        let mut many = staged(&model, &plan, k_devices, args.micro_batches)?;
        let med = rounds(&mut [&mut paper, &mut one, &mut many])?;
        let (t_paper, t_one, t_many) = (med[0], med[1], med[2]);
        // Per-stage times: alone (one device, stages one after another) and in the pipeline.
        let alone = per_step(&one.take_stage_times());
        let together = per_step(&many.take_stage_times());
        let res = if on_cpu {
            "1 thread".to_string()
        } else {
            dev.clone()
        };
        let mut rows: Vec<(String, f64)> = Vec::new();
        if on_cpu {
            rows.push((
                format!("single-device trainer (paper SID), {cores} threads"),
                all_cores[0],
            ));
            rows.push((
                format!("staged K={k}, one device, {cores} threads"),
                all_cores[1],
            ));
        }
        rows.push((format!("paper SID, one device, {res}"), t_paper));
        rows.push((format!("staged K={k}, one device, {res}"), t_one));
        let many_name = if on_cpu {
            format!("staged K={k}, cpu:{k} (a thread each)")
        } else {
            format!("staged K={k}, {k} streams on {dev}")
        };
        rows.push((many_name.clone(), t_many));
        println!("{:<52} {:>10}", "configuration", "ms/step");
        for (name, m) in &rows {
            println!("{name:<52} {m:>10.2}");
        }
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
        )?;
        tch::manual_seed(0);
        let mut paper_1 = SidNetwork::new(&model, LossConfig::default(), 1e-3, device)?;
        let med = rounds(&mut [&mut paper_1, &mut paper_k])?;
        let idle = idle_shares(&per_step(&paper_k.take_stage_times()), med[1]);
        println!("paper SID on the same devices (modules spread, the extractor first; every step flushes):");
        println!(
            "{:<52} {:>10.2}",
            format!("paper SID, one device, {res}"),
            med[0]
        );
        println!(
            "{:<52} {:>10.2}   idle by stage (extractor first) {}",
            format!("paper SID, {k} devices"),
            med[1],
            idle
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
        let mut bp_one = BpNetwork::new(&model, 1e-3, device)?;
        let bp =
            |s: BpSchedule| pipelined(&model, &plan, vec![device; k], bp_m, PipelineMethod::Bp(s));
        let (mut gpipe, mut ofob) = (bp(BpSchedule::GPipe)?, bp(BpSchedule::OneFOneB)?);
        let med = rounds(&mut [&mut bp_one, &mut gpipe, &mut ofob])?;
        println!(
            "backprop on the same devices, {bp_m} micro-batches (every step flushes; expected bubble (K-1)/(M+K-1) = {:.0}%):",
            100.0 * (k as f64 - 1.0) / (bp_m as f64 + k as f64 - 1.0)
        );
        // Measured idle share by stage, and what the schedule itself implies for these
        // stages' own (possibly unequal) times: the textbook (K−1)/(M+K−1) holds for equal
        // stages only.
        let bubble = |p: &mut StagedPipeline, t: f64, schedule: BpSchedule| -> String {
            let times = per_step(&p.take_stage_times());
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
        println!("{:<52} {:>10.2}", format!("BP, one device, {res}"), med[0]);
        let b = bubble(&mut gpipe, med[1], BpSchedule::GPipe);
        println!(
            "{:<52} {:>10.2}{b}",
            format!("BP GPipe, {k} devices"),
            med[1]
        );
        let b = bubble(&mut ofob, med[2], BpSchedule::OneFOneB);
        println!(
            "{:<52} {:>10.2}{b}",
            format!("BP 1F1B, {k} devices"),
            med[2]
        );
        println!(
            "speed-up of BP pipelined over BP on one device: {:.2}x; staged SID on {k} devices over the faster BP pipeline: {:.2}x",
            med[0] / med[1].min(med[2]),
            med[1].min(med[2]) / t_many
        );
    }
    Ok(())
}
