//! Which modules each worker owns: contiguous blocks, in cascade order.

use std::ops::Range;

use crate::{Result, RuntimeError};

/// Module blocks per worker: worker `k` owns modules `blocks[k]` (0-based, half-open).
/// Blocks are contiguous and in order, so the teacher chain visits workers 0, 1, 2, …
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    blocks: Vec<Range<usize>>,
}

impl Placement {
    /// `modules` split over `workers` as evenly as possible; earlier workers get the extra ones.
    pub fn even(modules: usize, workers: usize) -> Result<Self> {
        if workers == 0 || modules == 0 {
            return Err(RuntimeError::Placement(
                "need at least one worker and one module".into(),
            ));
        }
        if workers > modules {
            return Err(RuntimeError::Placement(format!(
                "{workers} devices but only {modules} modules: every device needs at least one module (raise --modules)"
            )));
        }
        // Worker k's block starts after k blocks of `base` and the first k of the extra ones.
        let (base, extra) = (modules / workers, modules % workers);
        let start = |k: usize| k * base + k.min(extra);
        let blocks = (0..workers).map(|k| start(k)..start(k + 1)).collect();
        Ok(Self { blocks })
    }

    /// Parses `0:0-1,1:2-4` (worker:first-last, 0-based, inclusive; `1:5` for one module).
    /// Every worker must get one contiguous block, in worker order, covering all modules.
    pub fn parse(spec: &str, modules: usize, workers: usize) -> Result<Self> {
        let bad = |why: String| {
            Err(RuntimeError::Placement(format!(
                "--placement {spec:?}: {why}"
            )))
        };
        let mut blocks = Vec::new();
        for (k, part) in spec.split(',').enumerate() {
            let Some((w, range)) = part.trim().split_once(':') else {
                return bad(format!("{part:?} is not worker:first-last"));
            };
            if w.trim().parse::<usize>().ok() != Some(k) {
                return bad(format!(
                    "entries must name workers 0, 1, 2… in order; entry {k} names {w:?}"
                ));
            }
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) else {
                return bad(format!("{range:?} is not a module range like 2-4"));
            };
            if b < a {
                return bad(format!("range {a}-{b} is empty"));
            }
            blocks.push(a..b + 1);
        }
        if blocks.len() != workers {
            return bad(format!("{} entries for {workers} devices", blocks.len()));
        }
        let mut next = 0;
        for r in &blocks {
            if r.start != next {
                return bad(format!("blocks must be contiguous from module 0; expected one starting at {next}, got {}", r.start));
            }
            next = r.end;
        }
        if next != modules {
            return bad(format!(
                "blocks cover modules 0-{} but the model has {modules} (0-{})",
                next - 1,
                modules - 1
            ));
        }
        Ok(Self { blocks })
    }

    /// Blocks, one per worker.
    pub fn blocks(&self) -> &[Range<usize>] {
        &self.blocks
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.blocks.len()
    }

    /// The same placement in `--placement` syntax.
    pub fn to_spec(&self) -> String {
        self.blocks
            .iter()
            .enumerate()
            .map(|(k, r)| format!("{k}:{}-{}", r.start, r.end - 1))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_blocks() {
        let p = Placement::even(10, 4).unwrap();
        assert_eq!(p.blocks(), &[0..3, 3..6, 6..8, 8..10]);
        assert_eq!(p.to_spec(), "0:0-2,1:3-5,2:6-7,3:8-9");
        assert_eq!(
            Placement::even(4, 4).unwrap().blocks(),
            &[0..1, 1..2, 2..3, 3..4]
        );
        assert!(Placement::even(2, 3)
            .unwrap_err()
            .to_string()
            .contains("only 2 modules"));
    }

    #[test]
    fn parse_round_trip_and_errors() {
        let p = Placement::parse("0:0-1,1:2-4", 5, 2).unwrap();
        assert_eq!(p.blocks(), &[0..2, 2..5]);
        assert_eq!(Placement::parse(&p.to_spec(), 5, 2).unwrap(), p);
        assert_eq!(
            Placement::parse("0:0,1:1", 2, 2).unwrap().blocks(),
            &[0..1, 1..2]
        );
        for (spec, why) in [
            ("0:0-1", "1 entries for 2 devices"),
            ("0:0-1,1:3-4", "contiguous"),
            ("0:0-1,1:2-3", "cover modules 0-3 but the model has 5"),
            ("1:0-1,0:2-4", "in order"),
            ("0:0-x,1:2-4", "not a module range"),
            ("0-1,1:2-4", "not worker:first-last"),
        ] {
            let e = Placement::parse(spec, 5, 2).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}
