//! `sid-launch predict RUN_DIR FILES…`: a saved run's class for each image file.

use anyhow::{Context, Result};
use sid_train::devices::device_name;
use sid_train::predict::{ExitAt, Predictor};

use crate::args::PredictArgs;

/// The tab-separated columns' header line.
const HEADER: &str = "file\tclass\tconfidence\texit module";

/// Prints a header line, then one line per file: path, class (its name when the data set has
/// names, else the label), confidence, exit module; or, with `--json`, one JSON object per
/// line and no header. Nothing is printed unless every file could be read.
pub fn run(a: &PredictArgs) -> Result<()> {
    let dir = &a.run_dir;
    let mut p = Predictor::open(dir, a.gpus.as_deref())
        .with_context(|| format!("predict {}", dir.display()))?;
    let cfg = &p.cfg;
    let batch = a.eval_batch_size.unwrap_or(cfg.runtime.eval_batch_size);
    anyhow::ensure!(batch >= 1, "--eval-batch-size must be at least 1");
    let exit = match (cfg.optim.method, a.exit_confidence) {
        (sid_core::Method::Sid, ExitAt::Confidence(t)) => format!("early exit at τ = {t}"),
        (sid_core::Method::Sid, ExitAt::Last) => "full cascade".to_string(),
        (sid_core::Method::Bp, _) => "backprop: last module".to_string(),
    };
    let modules = cfg.model.modules;
    eprintln!(
        "predicting {} file(s) with {} ({} with L={modules} on {}; {exit})",
        a.files.len(),
        dir.display(),
        cfg.optim.method,
        device_name(p.device())
    );
    let predictions = p.predict_files(&a.files, a.exit_confidence, batch as usize)?;
    if !a.json {
        println!("{HEADER}");
    }
    for (file, pr) in a.files.iter().zip(predictions) {
        if a.json {
            let line = serde_json::json!({
                "path": file.display().to_string(),
                "label": pr.label,
                "class": pr.class,
                "confidence": pr.confidence,
                "exit_module": pr.exit_module,
                "modules": modules,
            });
            println!("{line}");
        } else {
            // Tabs: class names may hold spaces ("Ankle boot").
            let class = pr.class.unwrap_or_else(|| pr.label.to_string());
            let (path, confidence, module) = (file.display(), pr.confidence, pr.exit_module);
            println!("{path}\t{class}\t{confidence:.4}\t{module}");
        }
    }
    Ok(())
}
