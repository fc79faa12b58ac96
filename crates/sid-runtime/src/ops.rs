//! Schedules as data: the order of a stage's forwards and backwards over a step's
//! micro-batches — a backprop pipeline's GPipe or 1F1B ([`BpSchedule`]), and the paper mode's
//! extractor stage ([`extractor_ops`]). [`crate::schedule`] runs these lists.

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
}

/// One operation of a backprop stage's step, on a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward of micro-batch j.
    Forward(usize),
    /// Backward of micro-batch j.
    Backward(usize),
}

impl BpSchedule {
    /// Stage `stage` (0-based) of `stages`: its operations for `micro` micro-batches.
    pub fn ops(self, stages: usize, stage: usize, micro: usize) -> Vec<Op> {
        match self {
            Self::GPipe => (0..micro)
                .map(Op::Forward)
                .chain((0..micro).rev().map(Op::Backward))
                .collect(),
            Self::OneFOneB => {
                let warm = (stages - stage - 1).min(micro);
                let mut ops: Vec<Op> = (0..warm).map(Op::Forward).collect();
                for i in 0..micro - warm {
                    ops.push(Op::Forward(warm + i));
                    ops.push(Op::Backward(i));
                }
                ops.extend((micro - warm..micro).map(Op::Backward));
                ops
            }
        }
    }
}

impl std::str::FromStr for BpSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gpipe" => Ok(Self::GPipe),
            "1f1b" => Ok(Self::OneFOneB),
            other => Err(format!(
                "unknown pipeline schedule {other:?} (expected gpipe or 1f1b)"
            )),
        }
    }
}

impl std::fmt::Display for BpSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::GPipe => "gpipe",
            Self::OneFOneB => "1f1b",
        })
    }
}

/// The extractor stage's operations for `micro` micro-batches: forward 0, then forward j+1
/// before backward j, then the last backward — `F0 F1 B0 F2 B1 … B(M−1)`.
pub fn extractor_ops(micro: usize) -> Vec<Op> {
    let mut ops = Vec::with_capacity(2 * micro);
    for j in 0..micro {
        ops.push(Op::Forward(j));
        if j > 0 {
            ops.push(Op::Backward(j - 1));
        }
    }
    if micro > 0 {
        ops.push(Op::Backward(micro - 1));
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractor_forwards_the_next_micro_batch_before_each_backward() {
        use Op::{Backward as B, Forward as F};
        assert_eq!(extractor_ops(1), vec![F(0), B(0)]);
        assert_eq!(extractor_ops(3), vec![F(0), F(1), B(0), F(2), B(1), B(2)]);
    }
}
