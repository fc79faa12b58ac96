//! Schedules as data: the operations a stage runs over a step's micro-batches, in order. Every
//! method is one of these lists, and one interpreter ([`crate::schedule`]) runs them all on any
//! transport:
//! - staged SID and the paper mode's module stages ([`Schedule::LocalLoss`]): forward and the
//!   stage's own backward of each micro-batch in turn — nothing comes back from later stages;
//! - the paper mode's extractor ([`Schedule::Extractor`]): forward j+1 before backward j;
//! - a backprop pipeline ([`Schedule::Bp`]): GPipe, 1F1B or zero-bubble ZB-H1
//!   ([`BpSchedule`]).
//!
//! Every step ends with the stage's optimiser step, after its last operation.

/// How a backprop pipeline orders a stage's forwards and backwards within a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BpSchedule {
    /// GPipe: every forward, then every backward (last first). Holds M micro-batches.
    #[serde(rename = "gpipe")]
    GPipe,
    /// 1F1B: K−s−1 forwards to fill, then one forward and one backward in turn, then the
    /// remaining backwards. Holds at most K−s micro-batches.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Zero bubble ZB-H1 (Qi et al., arXiv 2401.10241): 1F1B with each backward split into
    /// the input gradient (what the previous stage waits for, so gradients travel back at its
    /// pace) and the weight gradient, which stage s postpones by s micro-batches into the idle
    /// time it would otherwise wait. Holds at most about K micro-batches on every stage, as
    /// 1F1B does on its first.
    #[serde(rename = "zb1")]
    ZeroBubble,
}

/// One operation of a stage's step, on a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward of micro-batch j (its input from the previous stage, its output sent on).
    Forward(usize),
    /// The whole backward of micro-batch j (its output's gradient from later stages, where
    /// the stage needs one; its input's gradient sent back, where an earlier stage needs it).
    Backward(usize),
    /// The input-gradient half of micro-batch j's backward (sent back at once).
    BackwardInput(usize),
    /// The weight-gradient half of micro-batch j's backward (accumulated for the step).
    BackwardWeight(usize),
}

/// Which list of operations a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Forward, then the stage's own backward, micro-batch after micro-batch.
    LocalLoss,
    /// The paper mode's extractor stage: [`extractor_ops`].
    Extractor,
    /// A backprop pipeline stage.
    Bp(BpSchedule),
}

impl Schedule {
    /// Stage `stage` (0-based) of `stages`: its operations for `micro` micro-batches.
    pub fn ops(self, stages: usize, stage: usize, micro: usize) -> Vec<Op> {
        match self {
            Self::LocalLoss => (0..micro)
                .flat_map(|j| [Op::Forward(j), Op::Backward(j)])
                .collect(),
            Self::Extractor => extractor_ops(micro),
            Self::Bp(s) => s.ops(stages, stage, micro),
        }
    }
}

impl BpSchedule {
    /// Stage `stage` (0-based) of `stages`: its operations for `micro` micro-batches.
    pub fn ops(self, stages: usize, stage: usize, micro: usize) -> Vec<Op> {
        let warm = (stages - stage - 1).min(micro);
        match self {
            Self::GPipe => (0..micro)
                .map(Op::Forward)
                .chain((0..micro).rev().map(Op::Backward))
                .collect(),
            Self::OneFOneB | Self::ZeroBubble => {
                // ZB-H1 is 1F1B's order with B split into I and W; stage s runs a W once more
                // than s are pending (the discrete-event model in sid-bench finds this delay
                // gives the paper's (K−1)(F+B−W) bubble, and never a longer step than 1F1B).
                let split = self == Self::ZeroBubble;
                let mut ops: Vec<Op> = (0..warm).map(Op::Forward).collect();
                let mut pending = std::collections::VecDeque::new();
                let mut backward = |ops: &mut Vec<Op>, i: usize| {
                    if !split {
                        return ops.push(Op::Backward(i));
                    }
                    ops.push(Op::BackwardInput(i));
                    pending.push_back(i);
                    if pending.len() > stage {
                        ops.extend(pending.pop_front().map(Op::BackwardWeight));
                    }
                };
                for i in 0..micro - warm {
                    ops.push(Op::Forward(warm + i));
                    backward(&mut ops, i);
                }
                for i in micro - warm..micro {
                    backward(&mut ops, i);
                }
                ops.extend(pending.into_iter().map(Op::BackwardWeight));
                ops
            }
        }
    }
}

impl std::str::FromStr for BpSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::GPipe, Self::OneFOneB, Self::ZeroBubble]
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| format!("unknown pipeline schedule {s:?} (expected gpipe, 1f1b or zb1)"))
    }
}

impl std::fmt::Display for BpSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::GPipe => "gpipe",
            Self::OneFOneB => "1f1b",
            Self::ZeroBubble => "zb1",
        })
    }
}

/// The extractor stage's operations for `micro` micro-batches: forward 0, then forward j+1
/// before backward j, then the last backward — `F0 F1 B0 F2 B1 … B(M−1)`.
pub fn extractor_ops(micro: usize) -> Vec<Op> {
    (0..micro)
        .flat_map(|j| [Some(Op::Forward(j)), j.checked_sub(1).map(Op::Backward)])
        .chain([micro.checked_sub(1).map(Op::Backward)])
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Op::{Backward as B, BackwardInput as I, BackwardWeight as W, Forward as F};

    #[test]
    fn extractor_forwards_the_next_micro_batch_before_each_backward() {
        assert_eq!(extractor_ops(1), vec![F(0), B(0)]);
        assert_eq!(extractor_ops(3), vec![F(0), F(1), B(0), F(2), B(1), B(2)]);
    }

    #[test]
    fn local_loss_stages_finish_each_micro_batch_in_turn() {
        assert_eq!(
            Schedule::LocalLoss.ops(3, 1, 2),
            vec![F(0), B(0), F(1), B(1)]
        );
    }

    #[test]
    fn zero_bubble_is_1f1b_with_weight_passes_postponed() {
        // The first stage does each W at once; stage s keeps s back.
        assert_eq!(
            BpSchedule::ZeroBubble.ops(2, 0, 3),
            vec![F(0), F(1), I(0), W(0), F(2), I(1), W(1), I(2), W(2)]
        );
        assert_eq!(
            BpSchedule::ZeroBubble.ops(2, 1, 3),
            vec![F(0), I(0), F(1), I(1), W(0), F(2), I(2), W(1), W(2)]
        );
        // Every schedule runs each micro-batch's forward before its backward, and the whole
        // backward exactly once.
        for s in [
            BpSchedule::GPipe,
            BpSchedule::OneFOneB,
            BpSchedule::ZeroBubble,
        ] {
            for (k, m) in [(2, 4), (4, 8), (4, 2), (3, 1)] {
                for stage in 0..k {
                    let ops = s.ops(k, stage, m);
                    for j in 0..m {
                        let at = |op: Op| ops.iter().position(|&o| o == op);
                        let f = at(F(j)).expect("a forward");
                        match (at(B(j)), at(I(j)), at(W(j))) {
                            (Some(b), None, None) => assert!(f < b, "{s} {ops:?}"),
                            (None, Some(i), Some(w)) => assert!(f < i && i < w, "{s} {ops:?}"),
                            other => panic!("{s} micro-batch {j}: {other:?} in {ops:?}"),
                        }
                    }
                    assert_eq!(
                        ops.len(),
                        if s == BpSchedule::ZeroBubble {
                            3 * m
                        } else {
                            2 * m
                        }
                    );
                }
            }
        }
    }
}
