//! `sid-launch export RUN_DIR OUT.safetensors`: a saved run's trained network under the
//! reference implementations' names, for `python/sid_model.py`.

use anyhow::{Context, Result};

use crate::args::ExportArgs;

/// Writes the file and says what is in it.
pub fn run(a: &ExportArgs) -> Result<()> {
    let report = sid_train::interop::export(&a.run_dir, &a.out)
        .with_context(|| format!("export {}", a.run_dir.display()))?;
    let m = &report.meta;
    let names = match &m.reference {
        Some(r) => format!(
            "{} backbone tensors under {r} names",
            report.reference_names
        ),
        None => format!(
            "no reference layout for {}: its backbone under sid.*",
            m.backbone
        ),
    };
    println!(
        "wrote {}: {} tensors ({names}; necks and {} modules under sid.*), {} stage(s), {} px, {} classes",
        a.out.display(),
        report.tensors,
        m.modules,
        m.stages.len(),
        m.image_size,
        m.num_classes
    );
    Ok(())
}
