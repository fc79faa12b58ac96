//! `sid-bench pipeline` through the real binary, small: it runs every configuration, prints
//! each stage's memory, and `--out` writes the figures as CSV and SVG plots.

use std::process::Command;

#[test]
fn pipeline_bench_measures_stage_memory_and_writes_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sid-bench"))
        .args([
            "pipeline",
            "--stages",
            "2",
            "--batch-size",
            "32",
            "--modules",
            "4",
            "--placement",
            "even",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("peak memory by stage"), "{text}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("unknown size"));
    let csv = std::fs::read_to_string(dir.path().join("pipeline-memory.csv")).unwrap();
    // Working bytes of a configuration's stage.
    let working = |config: &str, stage: &str| -> u64 {
        csv.lines()
            .find(|l| l.contains(config) && l.split(',').nth_back(2) == Some(stage))
            .and_then(|l| l.rsplit(',').next())
            .unwrap_or_else(|| panic!("no row for {config} stage {stage}:\n{csv}"))
            .parse()
            .unwrap()
    };
    // Four micro-batches in flight on GPipe's first stage, at most two on 1F1B's.
    assert!(working("BP GPipe", "1") > working("BP 1F1B", "1"), "{csv}");
    // The paper's module stages hold far less than its extractor stage.
    assert!(working("paper SID, 2 devices", "2") < working("paper SID, 2 devices", "1"));
    let times = std::fs::read_to_string(dir.path().join("pipeline-times.csv")).unwrap();
    assert!(times.lines().count() >= 9, "{times}");
    for plot in ["pipeline-K2-ms.svg", "pipeline-K2-memory.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("BP 1F1B"), "{plot}");
    }
}
