//! `sid-launch export RUN_DIR OUT.safetensors`: a saved run's trained network under the
//! reference implementations' names, for `python/sid_model.py`.

use anyhow::{Context, Result};

use crate::args::ExportArgs;

/// Writes the file and says what is in it.
pub fn run(a: &ExportArgs) -> Result<()> {
    let report = sid_train::interop::export(&a.run_dir, &a.out)
        .with_context(|| format!("export {}", a.run_dir.display()))?;
    let m = &report.meta;
    let (count, backbone) = (report.reference_names, &m.backbone);
    let names = match &m.reference {
        Some(r) => format!("{count} backbone tensors under {r} names"),
        None => format!("no reference layout for {backbone}: its backbone under sid.*"),
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
