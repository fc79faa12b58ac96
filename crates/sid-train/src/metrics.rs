//! Per-epoch metrics, one JSON record per line in `metrics.jsonl`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// What one epoch measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps (sum of local losses for SID).
    pub train_loss: f64,
    /// Mean local loss of each module over the epoch (SID only).
    pub module_train_loss: Vec<f64>,
    /// Test accuracy of the final module, in [0, 1].
    pub test_acc: f64,
    /// Test accuracy of every module's belief p_1..p_L.
    pub module_test_acc: Vec<f64>,
    /// Every module's mean `KL(p_y‖p_i)` on the test set (the label term of its local loss).
    #[serde(default)]
    pub module_test_label_kl: Vec<f64>,
    /// Every module's mean `KL(p_{i−1}‖p_i)` on the test set (the teacher term).
    #[serde(default)]
    pub module_test_teacher_kl: Vec<f64>,
    /// Validation accuracy of the final module, when a validation split is held out.
    pub val_acc: Option<f64>,
    /// Wall-clock seconds of the epoch's training steps (evaluation excluded).
    pub epoch_seconds: f64,
    /// Seconds spent evaluating.
    pub eval_seconds: f64,
    /// Training throughput.
    pub samples_per_second: f64,
    /// Median milliseconds per training step.
    pub median_step_ms: f64,
    /// Peak memory of each device during the epoch's training steps (CUDA: the caching
    /// allocator's tensor bytes; CPU: the process's peak resident set).
    #[serde(default)]
    pub peak_memory: Vec<sid_telemetry::DevicePeak>,
}

/// A record as its line of a metrics file.
fn line(m: &EpochMetrics) -> String {
    serde_json::to_string(m).expect("metrics serialise") + "\n"
}

/// Appends one record to a metrics file.
pub fn append(path: &Path, m: &EpochMetrics) -> Result<()> {
    let opened = OpenOptions::new().create(true).append(true).open(path);
    let written = opened.and_then(|mut f| f.write_all(line(m).as_bytes()));
    written.map_err(|e| TrainError::io(path, e))
}

/// The records of a metrics file and what had to be dropped to read them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsFile {
    /// Every complete record, in file order.
    pub records: Vec<EpochMetrics>,
    /// Set when the last line was cut short (a crash while it was being appended) and was
    /// dropped: says which file and line, for the caller to show.
    pub dropped_last_line: Option<String>,
}

/// Reads every record of a metrics file (a missing file is empty). An unparseable last line
/// is what a crash during [`append`] leaves behind: it is dropped and named in
/// [`MetricsFile::dropped_last_line`]. An unparseable line before the last is corruption,
/// not a crash, and is an error naming the file and line.
pub fn read_all(path: &Path) -> Result<MetricsFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MetricsFile::default()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    // 1-based line numbers of the lines with text.
    let mut lines = (1usize..)
        .zip(text.lines())
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let mut out = MetricsFile::default();
    while let Some((i, line)) = lines.next() {
        match serde_json::from_str(line) {
            Ok(m) => out.records.push(m),
            Err(e) if lines.peek().is_none() => {
                out.dropped_last_line = Some(format!(
                    "{} line {i}: dropped an incomplete last record ({e}); the run was probably stopped while writing it",
                    path.display()
                ));
            }
            Err(e) => {
                let e = std::io::Error::other(format!("line {i}: {e}"));
                return Err(TrainError::io(path, e));
            }
        }
    }
    Ok(out)
}

/// Keeps only the records of epochs `1..=epochs` (a resumed run drops what its checkpoint
/// does not cover), rewriting the file atomically. A cut-short last line is dropped too; the
/// returned [`MetricsFile`] says so.
pub fn truncate_to(path: &Path, epochs: usize) -> Result<MetricsFile> {
    let mut file = read_all(path)?;
    file.records.retain(|m| m.epoch <= epochs);
    let text: String = file.records.iter().map(line).collect();
    crate::checkpoint::write_atomic(path, text.as_bytes())?;
    Ok(file)
}

/// Median of a list (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // For an odd length both indices are the middle one: (x + x) / 2 is exactly x.
    let n = s.len();
    (s[(n - 1) / 2] + s[n / 2]) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(epoch: usize) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss: 1.0,
            module_train_loss: vec![0.5, 0.5],
            test_acc: 0.9,
            module_test_acc: vec![0.8, 0.9],
            module_test_label_kl: vec![0.6, 0.4],
            module_test_teacher_kl: vec![0.3, 0.1],
            val_acc: None,
            epoch_seconds: 1.0,
            eval_seconds: 0.1,
            samples_per_second: 100.0,
            median_step_ms: 3.0,
            peak_memory: vec![sid_telemetry::DevicePeak {
                device: "cpu".into(),
                bytes: 1 << 20,
                source: "process-rss".into(),
            }],
        }
    }

    #[test]
    fn append_read_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        for e in 1..=3 {
            append(&p, &rec(e)).unwrap();
        }
        assert_eq!(read_all(&p).unwrap().records.len(), 3);
        let kept = truncate_to(&p, 2).unwrap();
        assert_eq!(kept.records, vec![rec(1), rec(2)]);
        assert_eq!(kept.dropped_last_line, None);
        assert_eq!(read_all(&p).unwrap(), kept);
    }

    #[test]
    fn a_cut_short_last_line_is_dropped_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        for e in 1..=3 {
            append(&p, &rec(e)).unwrap();
        }
        // What a crash in the middle of the third append leaves.
        let text = std::fs::read_to_string(&p).unwrap();
        let cut = text.len() - text.lines().last().unwrap().len() / 2 - 1;
        std::fs::write(&p, &text[..cut]).unwrap();
        let read = read_all(&p).unwrap();
        assert_eq!(read.records, vec![rec(1), rec(2)]);
        let notice = read.dropped_last_line.expect("a notice");
        assert!(notice.contains("metrics.jsonl line 3"), "{notice}");
        // A resume rewrites the file without the cut line; reading it again is clean.
        let kept = truncate_to(&p, 5).unwrap();
        assert_eq!(kept.records, vec![rec(1), rec(2)]);
        assert!(kept.dropped_last_line.is_some());
        assert_eq!(read_all(&p).unwrap().dropped_last_line, None);
        append(&p, &rec(3)).unwrap();
        assert_eq!(read_all(&p).unwrap().records.len(), 3);
    }

    #[test]
    fn a_corrupt_line_before_the_last_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        for e in 1..=3 {
            append(&p, &rec(e)).unwrap();
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"epoch\": 2, garbage";
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let e = read_all(&p).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
        assert!(truncate_to(&p, 3).is_err());
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
