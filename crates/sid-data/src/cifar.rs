//! Reader for the binary versions of CIFAR-10 and CIFAR-100.
//!
//! A file is a plain sequence of fixed-size records: the label byte(s) followed by 3072 pixel
//! bytes (1024 red, 1024 green, 1024 blue, each a row-major 32x32 plane). That pixel layout
//! is already channel-major `[3, 32, 32]`, so records are copied without reordering.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::idx::check_labels;
use crate::raw::{Part, RawSplit};
use crate::{DataError, DatasetKind};

/// Pixel bytes per CIFAR image.
const PIXELS: usize = 3 * 32 * 32;
/// Number of CIFAR-100 superclasses (the coarse label), checked as a corruption guard.
const COARSE_CLASSES: i64 = 20;

/// Reads a split: its batch files (CIFAR-10's five training batches, otherwise one file),
/// joined in order.
pub(crate) fn read_split(dir: &Path, part: Part, kind: DatasetKind) -> Result<RawSplit, DataError> {
    let names: Vec<String> = match (part, kind) {
        (Part::Train, DatasetKind::Cifar100) => vec!["train.bin".into()],
        (Part::Train, _) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        (Part::Test, DatasetKind::Cifar100) => vec!["test.bin".into()],
        (Part::Test, _) => vec!["test_batch.bin".into()],
    };
    let paths: Vec<PathBuf> = names.iter().map(|name| dir.join(name)).collect();
    // Check every batch is there before reading ~150 MB, so a missing last batch fails fast.
    if let Some(path) = paths.iter().find(|path| !path.is_file()) {
        return Err(DataError::missing(path));
    }
    // The batches are independent: read and check them in parallel, then join in order.
    let parts: Vec<RawSplit> = paths
        .par_iter()
        .map(|p| read_file(p, kind))
        .collect::<Result<_, _>>()?;
    Ok(parts
        .into_iter()
        .fold(RawSplit::default(), RawSplit::joined))
}

/// Reads and checks one batch file.
fn read_file(path: &Path, kind: DatasetKind) -> Result<RawSplit, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    // CIFAR-100 records carry the coarse label before the fine one; we train on the fine.
    let fine = usize::from(kind == DatasetKind::Cifar100);
    let record = fine + 1 + PIXELS;
    if bytes.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    if bytes.len() % record != 0 {
        let (n, whole, left) = (bytes.len(), bytes.len() / record, bytes.len() % record);
        let detail = format!(
            "truncated: {n} bytes is not a whole number of {record}-byte records ({whole} records and {left} bytes left over)"
        );
        return Err(DataError::content(path, detail));
    }
    let records = bytes.chunks_exact(record);
    let labels_at = |at: usize| records.clone().map(|r| r[at]).collect::<Vec<u8>>();
    if fine == 1 {
        check_labels(path, &labels_at(0), COARSE_CLASSES, "coarse label")?;
    }
    let labels = labels_at(fine);
    let classes = kind.shape().map_or(0, |s| s.num_classes);
    check_labels(path, &labels, classes, "label")?;
    let pixels = records.map(|r| &r[fine + 1..]).collect::<Vec<_>>().concat();
    Ok(RawSplit { pixels, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    /// Writes a full CIFAR-10 directory: five training batches of `per_batch` images and a
    /// test batch of `n_test`; returns the joined training pixels and labels.
    fn write_cifar10(dir: &Path, per_batch: usize, n_test: usize) -> (Vec<u8>, Vec<u8>) {
        let mut all_px = Vec::new();
        let mut all_lb = Vec::new();
        for b in 1..=5 {
            let px = pattern(per_batch * PIXELS, b);
            let lb: Vec<u8> = (0..per_batch).map(|i| ((i + b) % 10) as u8).collect();
            std::fs::write(
                dir.join(format!("data_batch_{b}.bin")),
                cifar_records(&lb, &px, None),
            )
            .unwrap();
            all_px.extend_from_slice(&px);
            all_lb.extend_from_slice(&lb);
        }
        let px = pattern(n_test * PIXELS, 9);
        let lb: Vec<u8> = (0..n_test).map(|i| (i % 10) as u8).collect();
        std::fs::write(dir.join("test_batch.bin"), cifar_records(&lb, &px, None)).unwrap();
        (all_px, all_lb)
    }

    #[test]
    fn cifar10_joins_batches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (px, lb) = write_cifar10(dir.path(), 2, 3);
        let train = read_split(dir.path(), Part::Train, DatasetKind::Cifar10).unwrap();
        assert_eq!(train.len(), 10);
        assert_eq!(train.labels, lb);
        assert_eq!(train.pixels, px);
        let test = read_split(dir.path(), Part::Test, DatasetKind::Cifar10).unwrap();
        assert_eq!(test.labels, vec![0, 1, 2]);
        assert_eq!(test.pixels, pattern(3 * PIXELS, 9));
    }

    #[test]
    fn cifar100_uses_fine_label() {
        let dir = tempfile::tempdir().unwrap();
        let px = pattern(3 * PIXELS, 4);
        let fine = [99, 0, 57];
        let coarse = [19, 4, 7];
        std::fs::write(
            dir.path().join("train.bin"),
            cifar_records(&fine, &px, Some(&coarse)),
        )
        .unwrap();
        let raw = read_split(dir.path(), Part::Train, DatasetKind::Cifar100).unwrap();
        assert_eq!(raw.labels, fine.to_vec());
        assert_eq!(raw.pixels, px);
    }

    #[test]
    fn missing_batch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path(), 1, 1);
        let path = dir.path().join("data_batch_4.bin");
        std::fs::remove_file(&path).unwrap();
        let err = read_split(dir.path(), Part::Train, DatasetKind::Cifar10).unwrap_err();
        assert_eq!(err.to_string(), format!("missing file {}", path.display()));
    }

    #[test]
    fn partial_record_is_truncation() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path(), 1, 2);
        let path = dir.path().join("test_batch.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(3073 + 100);
        std::fs::write(&path, bytes).unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar10).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: truncated: 3173 bytes is not a whole number of 3073-byte records (1 records and 100 bytes left over)",
                path.display()
            )
        );
    }

    #[test]
    fn empty_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.bin");
        std::fs::write(&path, b"").unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar100).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: empty file, holds no records", path.display())
        );
    }

    #[test]
    fn labels_out_of_range_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test_batch.bin");
        let px = pattern(3 * PIXELS, 0);
        std::fs::write(&path, cifar_records(&[1, 2, 10], &px, None)).unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar10).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: label 10 at index 2 is outside 0..10", path.display())
        );

        let path = dir.path().join("test.bin");
        std::fs::write(&path, cifar_records(&[1, 100, 3], &px, Some(&[0, 1, 2]))).unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar100).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: label 100 at index 1 is outside 0..100", path.display())
        );

        std::fs::write(&path, cifar_records(&[1, 2, 3], &px, Some(&[0, 1, 20]))).unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar100).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: coarse label 20 at index 2 is outside 0..20",
                path.display()
            )
        );
    }

    #[test]
    fn cifar10_file_read_as_cifar100_is_caught() {
        // 3073-byte records are not a multiple of 3074 unless the file is huge, so mixing
        // up the two datasets is reported instead of yielding shifted garbage.
        let dir = tempfile::tempdir().unwrap();
        let px = pattern(2 * PIXELS, 0);
        std::fs::write(
            dir.path().join("test.bin"),
            cifar_records(&[1, 2], &px, None),
        )
        .unwrap();
        let err = read_split(dir.path(), Part::Test, DatasetKind::Cifar100).unwrap_err();
        let want = format!("{}: truncated: ", dir.path().join("test.bin").display());
        assert!(err.to_string().starts_with(&want), "{err}");
    }
}
