//! A small discrete-event model of the staged pipeline: micro-batches flow through K stages
//! over links of a given bandwidth; each stage sends its output on as soon as its forward is
//! done and then runs its backward. Fed with per-stage times measured on one device, it
//! predicts the step time on K devices; fed with the times of the `cpu:K` run it can be
//! checked against that run. The flushing schedules (BP's GPipe and 1F1B) are modelled from
//! the same operation lists the stages run ([`sid_runtime::BpSchedule::ops`]), so the
//! bubble they predict for unequal stages can be set beside the measured one.

use sid_runtime::ops::Op;

/// One stage's cost per micro-batch, and what it sends on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageCost {
    /// Forward, seconds.
    pub forward: f64,
    /// Backward and optimiser share, seconds.
    pub backward: f64,
    /// Bytes sent to the next stage (0 for the last).
    pub out_bytes: f64,
}

/// A link between neighbouring stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second (`f64::INFINITY` within one process).
    pub bandwidth: f64,
    /// Seconds per message.
    pub latency: f64,
}

impl Link {
    /// Named links: `nvlink` (≈ 300 GB/s per direction, H100 NVLink 4 aggregate halved),
    /// `pcie` (≈ 25 GB/s, PCIe 4 x16 in practice), `memory` (in-process: free), or a number
    /// of GB/s.
    pub fn parse(spec: &str) -> Option<Self> {
        let (bandwidth, latency) = match spec {
            "nvlink" => (300e9, 5e-6),
            "pcie" => (25e9, 10e-6),
            "memory" => (f64::INFINITY, 0.0),
            gbps => (gbps.parse::<f64>().ok().filter(|v| *v > 0.0)? * 1e9, 10e-6),
        };
        Some(Self { bandwidth, latency })
    }
}

/// Seconds per step in steady state for `stages` running `micro` micro-batches per step on a
/// device each: no flush between steps (staged SID), each link carrying one message at a time.
pub fn staged_step_time(stages: &[StageCost], micro: usize, link: Link) -> f64 {
    let k = stages.len();
    let steps = 64;
    let mut free = vec![0.0f64; k];
    let mut link_free = vec![0.0f64; k];
    let mut step_done = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut last = 0.0;
        for _ in 0..micro.max(1) {
            let mut arrival = 0.0f64;
            for (s, c) in stages.iter().enumerate() {
                let start = free[s].max(arrival);
                let fwd_done = start + c.forward;
                free[s] = fwd_done + c.backward;
                if s + 1 < k {
                    let send = fwd_done.max(link_free[s]);
                    let transfer = c.out_bytes / link.bandwidth + link.latency;
                    link_free[s] = send + transfer;
                    arrival = send + transfer;
                }
                last = free[s];
            }
        }
        step_done.push(last);
    }
    // Steady state: the second half of the run.
    let h = steps / 2;
    (step_done[steps - 1] - step_done[h - 1]) / (steps - h) as f64
}

/// The part of a backward that computes weight gradients, in the model of a split backward
/// (zero bubble): an assumption (half), as in the ZB-H1 paper's F = B = W analysis, not a
/// measurement.
pub const WEIGHT_SHARE: f64 = 0.5;

/// One step of a flushing schedule: stage `s` runs `ops(s)` in order, a forward of
/// micro-batch j waiting for stage s−1's forward of j, a backward (or its input half) for stage
/// s+1's backward (or input half) of j (gradients are as large as the activations they answer).
/// `stages[s]` holds stage s's cost per micro-batch; a split backward's halves are taken to
/// cost half of it each ([`WEIGHT_SHARE`]). Returns the step time and each stage's idle share
/// of it.
pub fn flushing_step(
    stages: &[StageCost],
    micro: usize,
    ops: impl Fn(usize) -> Vec<Op>,
    link: Link,
) -> (f64, Vec<f64>) {
    let k = stages.len();
    let lists: Vec<Vec<Op>> = (0..k).map(&ops).collect();
    let mut next = vec![0usize; k];
    let mut free = vec![0.0f64; k];
    let mut fwd_done = vec![vec![None::<f64>; micro]; k];
    let mut bwd_done = vec![vec![None::<f64>; micro]; k];
    let hop = |s: usize| stages[s].out_bytes / link.bandwidth + link.latency;
    loop {
        let mut progressed = false;
        for s in 0..k {
            while let Some(&op) = lists[s].get(next[s]) {
                let ready = match op {
                    Op::Forward(j) if s > 0 => fwd_done[s - 1][j].map(|t| t + hop(s - 1)),
                    Op::Forward(_) => Some(0.0),
                    Op::Backward(j) | Op::BackwardInput(j) if s + 1 < k => {
                        bwd_done[s + 1][j].map(|t| t + hop(s))
                    }
                    Op::Backward(j) | Op::BackwardInput(j) => fwd_done[s][j],
                    Op::BackwardWeight(j) => bwd_done[s][j],
                };
                let Some(ready) = ready else { break };
                let start = free[s].max(ready);
                match op {
                    Op::Forward(j) => {
                        free[s] = start + stages[s].forward;
                        fwd_done[s][j] = Some(free[s]);
                    }
                    Op::Backward(j) => {
                        free[s] = start + stages[s].backward;
                        bwd_done[s][j] = Some(free[s]);
                    }
                    Op::BackwardInput(j) => {
                        free[s] = start + stages[s].backward * (1.0 - WEIGHT_SHARE);
                        bwd_done[s][j] = Some(free[s]);
                    }
                    Op::BackwardWeight(_) => free[s] = start + stages[s].backward * WEIGHT_SHARE,
                }
                next[s] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    assert!(
        next.iter().zip(&lists).all(|(n, l)| *n == l.len()),
        "the schedule deadlocks"
    );
    let step = free.iter().copied().fold(0.0, f64::max);
    let idle = stages
        .iter()
        .map(|c| 1.0 - micro as f64 * (c.forward + c.backward) / step)
        .collect();
    (step, idle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(f: f64, b: f64, bytes: f64) -> StageCost {
        StageCost {
            forward: f,
            backward: b,
            out_bytes: bytes,
        }
    }

    #[test]
    fn balanced_stages_run_at_one_stage_time() {
        let free = Link::parse("memory").unwrap();
        let s = [cost(1.0, 2.0, 10.0), cost(1.0, 2.0, 0.0)];
        assert!((staged_step_time(&s, 1, free) - 3.0).abs() < 1e-9);
        // The slowest stage sets the pace.
        let s = [cost(1.0, 2.0, 10.0), cost(2.0, 3.0, 0.0)];
        assert!((staged_step_time(&s, 4, free) - 4.0 * 5.0).abs() < 1e-9);
        // One stage: the sum of its parts.
        assert!((staged_step_time(&[cost(1.0, 1.0, 0.0)], 1, free) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_slow_link_becomes_the_bottleneck() {
        let slow = Link {
            bandwidth: 1.0,
            latency: 0.0,
        };
        let s = [cost(1.0, 1.0, 5.0), cost(1.0, 1.0, 0.0)];
        assert!((staged_step_time(&s, 1, slow) - 5.0).abs() < 1e-9);
        assert!(Link::parse("12.5").unwrap().bandwidth == 12.5e9);
        assert!(Link::parse("fast").is_none());
    }

    #[test]
    fn equal_flushing_stages_idle_as_the_textbook_says() {
        use sid_runtime::BpSchedule;
        let free = Link::parse("memory").unwrap();
        let (k, m) = (4, 8);
        let s = vec![cost(1.0, 2.0, 0.0); k];
        for schedule in [BpSchedule::GPipe, BpSchedule::OneFOneB] {
            let (step, idle) = flushing_step(&s, m, |st| schedule.ops(k, st, m), free);
            // (M + K − 1) slots of forward + backward: idle (K−1)/(M+K−1) on every stage.
            assert!(
                (step - (m + k - 1) as f64 * 3.0).abs() < 1e-9,
                "{schedule}: {step}"
            );
            for i in idle {
                assert!((i - 3.0 / 11.0).abs() < 1e-9, "{schedule}: {i}");
            }
        }
        // Zero bubble with F = I = W: the paper's bubble (K−1)(F+B−W) = K−1 instead of
        // 1F1B's (K−1)(F+B) = 3(K−1).
        let s = vec![cost(1.0, 2.0, 0.0); k];
        let (step, _) = flushing_step(&s, m, |st| BpSchedule::ZeroBubble.ops(k, st, m), free);
        assert!((step - (3 * m + k - 1) as f64).abs() < 1e-9, "zb1: {step}");
        // Never slower than 1F1B, whatever the stages' costs.
        for (k, m) in [(2, 1), (2, 4), (3, 2), (6, 8)] {
            for (f, b) in [(1.0, 2.0), (2.0, 1.0), (1.0, 4.0)] {
                let s = vec![cost(f, b, 0.0); k];
                let (zb, _) = flushing_step(&s, m, |st| BpSchedule::ZeroBubble.ops(k, st, m), free);
                let (ofob, _) = flushing_step(&s, m, |st| BpSchedule::OneFOneB.ops(k, st, m), free);
                assert!(zb <= ofob + 1e-9, "K={k} M={m} F={f} B={b}: {zb} vs {ofob}");
            }
        }
        // A slow last stage: the others wait for it.
        let s = [cost(1.0, 2.0, 0.0), cost(2.0, 4.0, 0.0)];
        let (_, idle) = flushing_step(&s, 4, |st| BpSchedule::GPipe.ops(2, st, 4), free);
        assert!(idle[0] > idle[1]);
    }
}
