//! Checkpoints: one safetensors file with weights, optimizer state and the run position.
//!
//! The file is written to a temporary name, synced, then renamed over the old one, so a crash
//! or Ctrl-C while saving never leaves a half-written checkpoint. Random streams (data order,
//! augmentation) are derived from `(seed, epoch, step)` rather than carried as state, so the
//! position below is the whole RNG state.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sid_core::{Method, NamedTensors};
use tch::{Device, Kind, Tensor};

use crate::{Result, TrainError};

/// File name of the checkpoint inside a run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const CONFIG_FILE: &str = "config.toml";
/// Per-epoch records.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The end-of-run summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// What an input image must be made into for the saved model, and the class names
/// ([`sid_data::InputSpec`]): what `sid-launch predict` reads instead of the data set.
pub const INPUT_FILE: &str = "input.json";

/// The resolved plan, beside the config (see [`crate::plan`]).
pub const PLAN_FILE: &str = "plan.toml";
const META_KEY: &str = "sid";
const FORMAT: &str = "sid-checkpoint/1";

/// Where the run stood when the checkpoint was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Format tag, checked on load.
    pub format: String,
    /// Method of the saved network.
    pub method: Method,
    /// Seed the random streams derive from.
    pub seed: u64,
    /// Epochs fully completed (their metrics are recorded).
    pub epochs_done: usize,
    /// Steps of the next epoch already done (non-zero after an interrupted epoch).
    pub step_in_epoch: usize,
    /// Training steps done in all.
    pub global_step: u64,
    /// Running sums of the interrupted epoch, so its mean loss comes out the same.
    pub partial: PartialEpoch,
}

/// Running totals of an epoch in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Sum of step losses.
    pub loss_sum: f64,
    /// Per-module sums of local losses.
    pub module_loss_sums: Vec<f64>,
    /// Milliseconds of each step so far.
    pub step_ms: Vec<f64>,
    /// Seconds of training so far.
    pub seconds: f64,
}

impl Position {
    /// The position at the start of a run.
    pub fn start(method: Method, seed: u64) -> Self {
        Self {
            format: FORMAT.into(),
            method,
            seed,
            epochs_done: 0,
            step_in_epoch: 0,
            global_step: 0,
            partial: PartialEpoch::default(),
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, fsync, rename). On
/// failure (a full disk, a file too large, an unwritable folder) `path` keeps what it held and
/// the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |e| TrainError::io(&tmp, e);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Keeps the checkpoint in `dir` that the next save replaces under its position's name
/// (`checkpoint-E<epoch>-S<step>.safetensors`, a hard link: no copy) and removes all but the
/// `older` newest of those.
pub fn keep_previous(dir: &Path, older: usize) -> Result<()> {
    let current = dir.join(CHECKPOINT_FILE);
    // A newest checkpoint that does not load (cut short) is not kept: the save replaces it.
    if let Ok((_, position)) = load(&current) {
        let (epoch, step) = (position.epochs_done, position.step_in_epoch);
        let kept = dir.join(format!("checkpoint-E{epoch}-S{step}.safetensors"));
        let _ = std::fs::remove_file(&kept);
        std::fs::hard_link(&current, &kept).map_err(|e| TrainError::io(&kept, e))?;
    }
    // The kept ones come newest first, after the current checkpoint.
    for p in candidates(dir).iter().skip(1 + older) {
        std::fs::remove_file(p).map_err(|e| TrainError::io(p, e))?;
    }
    Ok(())
}

/// A checkpoint loaded by [`load_newest`].
pub struct Newest {
    /// Its tensors, on the CPU.
    pub tensors: NamedTensors,
    /// Its position.
    pub position: Position,
    /// The file it came from.
    pub path: PathBuf,
    /// One line for each newer file that did not load, naming it and why.
    pub skipped: Vec<String>,
}

/// The position a kept checkpoint's name gives (`checkpoint-E<epoch>-S<step>.safetensors`).
fn named_position(name: &str) -> Option<(usize, usize)> {
    let rest = name
        .strip_prefix("checkpoint-E")?
        .strip_suffix(".safetensors")?;
    let (e, s) = rest.split_once("-S")?;
    Some((e.parse().ok()?, s.parse().ok()?))
}

/// The checkpoints in `dir`, newest first: `checkpoint.safetensors`, then those kept by
/// `--keep-checkpoints`, by the position their names give.
pub fn candidates(dir: &Path) -> Vec<PathBuf> {
    // An unreadable folder or entry holds no kept checkpoint.
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    let mut kept: Vec<((usize, usize), PathBuf)> = entries
        .filter_map(|e| Some((named_position(e.file_name().to_str()?)?, e.path())))
        .collect();
    kept.sort();
    std::iter::once(dir.join(CHECKPOINT_FILE))
        .chain(kept.into_iter().rev().map(|(_, p)| p))
        .collect()
}

/// Loads the newest checkpoint of `dir` that loads: `checkpoint.safetensors`, or when that one
/// is unreadable (cut short, damaged) the newest of the older ones `--keep-checkpoints` kept,
/// saying which files were passed over and why. With none readable, the newest's error.
pub fn load_newest(dir: &Path) -> Result<Newest> {
    // A missing newest file is only worth a word when an older one is used.
    let mut errors = Vec::new();
    for path in candidates(dir) {
        match load(&path) {
            Ok((tensors, position)) => {
                let skipped = errors.iter().map(TrainError::to_string).collect();
                return Ok(Newest {
                    tensors,
                    position,
                    path,
                    skipped,
                });
            }
            Err(e) => errors.push(e),
        }
    }
    // The newest checkpoint is always a candidate.
    Err(errors.swap_remove(0))
}

/// Writes `tensors` (float32 or int64, any device; other kinds are written as float32) and
/// `meta` to `path` as a safetensors file, atomically; `bad` words the serialiser's error as
/// the caller's.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
    bad: impl Fn(String) -> TrainError,
) -> Result<()> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, kind) = match t.kind() {
            Kind::Int64 => (Dtype::I64, Kind::Int64),
            _ => (Dtype::F32, Kind::Float),
        };
        let t = t.to_device(Device::Cpu).to_kind(kind).contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(sid_core::CoreError::from)?;
        let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        buffers.push((name.clone(), dtype, shape, data));
    }
    let views = buffers.iter().map(|(n, dt, shape, data)| {
        let view = TensorView::new(*dt, shape.clone(), data).expect("a view of its own data");
        (n.clone(), view)
    });
    let bytes = safetensors::serialize(views, &Some(meta)).map_err(|e| bad(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// The safetensors dtypes sid reads, with their tensor kinds: first the two a checkpoint holds
/// (see [`load`]), then those a reference weights file may add.
pub(crate) const KINDS: [(Dtype, Kind); 5] = [
    (Dtype::F32, Kind::Float),
    (Dtype::I64, Kind::Int64),
    (Dtype::F64, Kind::Double),
    (Dtype::F16, Kind::Half),
    (Dtype::BF16, Kind::BFloat16),
];

/// The tensors of a safetensors file, on the CPU, in the `kinds` admitted (of [`KINDS`]); `bad`
/// words the errors, each naming its tensor.
pub(crate) fn tensors_of(
    st: &SafeTensors<'_>,
    kinds: &[(Dtype, Kind)],
    bad: impl Fn(String) -> TrainError,
) -> Result<HashMap<String, Tensor>> {
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = view.dtype();
            let (_, kind) = *kinds
                .iter()
                .find(|(d, _)| *d == dtype)
                .ok_or_else(|| bad(format!("{name}: unsupported dtype {dtype:?}")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// Saves named tensors and the position to `path` atomically.
pub fn save(path: &Path, tensors: &[(String, Tensor)], position: &Position) -> Result<()> {
    let _span = tracing::debug_span!("checkpoint_save").entered();
    let position = serde_json::to_string(position).expect("serialise");
    let meta = HashMap::from([(META_KEY.to_string(), position)]);
    let bad = |reason| TrainError::checkpoint(path, reason);
    write_safetensors(path, tensors, meta, bad)
}

/// Loads a checkpoint: its tensors (on the CPU) and its position.
pub fn load(path: &Path) -> Result<(NamedTensors, Position)> {
    let bad = |reason: String| TrainError::checkpoint(path, reason);
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("file does not exist".into()),
        _ => TrainError::io(path, e),
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta = header.metadata().as_ref().and_then(|m| m.get(META_KEY));
    let meta = meta.ok_or_else(|| bad("no sid metadata (not written by sid-launch)".into()))?;
    let position: Position =
        serde_json::from_str(meta).map_err(|e| bad(format!("unreadable metadata: {e}")))?;
    let format = &position.format;
    if format != FORMAT {
        return Err(bad(format!("format {format:?}, expected {FORMAT:?}")));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    // A checkpoint is written in float32 and int64 only.
    let named = tensors_of(&st, &KINDS[..2], bad)?;
    Ok((NamedTensors(named), position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CHECKPOINT_FILE);
        let t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let mut pos = Position::start(Method::Sid, 9);
        pos.step_in_epoch = 4;
        pos.partial.module_loss_sums = vec![1.0, 2.0];
        save(
            &p,
            &[
                ("w".into(), t.shallow_clone()),
                ("n".into(), Tensor::from(7i64)),
            ],
            &pos,
        )
        .unwrap();
        let (named, got) = load(&p).unwrap();
        assert_eq!(got, pos);
        assert!(named.get("w").unwrap().equal(&t));
        assert_eq!(named.get("n").unwrap().int64_value(&[]), 7);
        pos.epochs_done = 1;
        save(&p, &[("w".into(), t)], &pos).unwrap();
        assert_eq!(load(&p).unwrap().1.epochs_done, 1);
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn a_cut_short_newest_checkpoint_falls_back_to_the_one_kept_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CHECKPOINT_FILE);
        let t = |v: f32| vec![("w".to_string(), Tensor::from_slice(&[v]))];
        let mut pos = Position::start(Method::Sid, 1);
        for step in [5, 10, 15] {
            pos.step_in_epoch = step;
            keep_previous(dir.path(), 2).unwrap();
            save(&p, &t(step as f32), &pos).unwrap();
        }
        assert_eq!(load_newest(dir.path()).unwrap().position.step_in_epoch, 15);
        // Cut short, as a full disk would leave a file written in place.
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let got = load_newest(dir.path()).unwrap();
        assert_eq!(got.position.step_in_epoch, 10);
        assert!(got.path.ends_with("checkpoint-E0-S10.safetensors"));
        assert_eq!(got.tensors.get("w").unwrap().double_value(&[0]), 10.0);
        assert_eq!(got.skipped.len(), 1);
        assert!(
            got.skipped[0].contains(CHECKPOINT_FILE),
            "{:?}",
            got.skipped
        );
        // The next save replaces the damaged file without keeping it.
        pos.step_in_epoch = 11;
        keep_previous(dir.path(), 2).unwrap();
        save(&p, &t(11.0), &pos).unwrap();
        assert_eq!(load_newest(dir.path()).unwrap().position.step_in_epoch, 11);
        // Nothing readable: the newest file's error.
        for c in candidates(dir.path()) {
            std::fs::write(&c, b"x").unwrap();
        }
        let e = load_newest(dir.path()).err().unwrap().to_string();
        assert!(e.contains(CHECKPOINT_FILE), "{e}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.txt");
        write_atomic(&p, b"old").unwrap();
        // The temporary file's name is taken by a folder: creating it fails, for root too.
        std::fs::create_dir(p.with_extension("tmp")).unwrap();
        assert!(write_atomic(&p, b"new").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn bad_files_are_named_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CHECKPOINT_FILE);
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("does not exist") && e.contains(CHECKPOINT_FILE),
            "{e}"
        );
        std::fs::write(&p, b"garbage that is not a checkpoint").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        // A valid safetensors file without our metadata.
        let bytes = safetensors::serialize(Vec::<(String, TensorView<'_>)>::new(), &None).unwrap();
        std::fs::write(&p, bytes).unwrap();
        assert!(load(&p)
            .unwrap_err()
            .to_string()
            .contains("no sid metadata"));
    }
}
