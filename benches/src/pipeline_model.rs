//! A small discrete-event model of the staged pipeline: micro-batches flow through K stages
//! over links of a given bandwidth; each stage sends its output on as soon as its forward is
//! done and then runs its backward. Fed with per-stage times measured on one device, it
//! predicts the step time on K devices; fed with the times of the `cpu:K` run it can be
//! checked against that run.

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
}
