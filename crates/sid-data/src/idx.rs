//! Reader for the IDX files of MNIST and Fashion-MNIST, plain or gzip-compressed.
//!
//! Format (all integers big-endian): images = magic 0x00000803, count, rows, cols, then
//! `count * rows * cols` pixel bytes; labels = magic 0x00000801, count, then `count` bytes.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;

use crate::raw::{Part, RawSplit};
use crate::{DataError, DatasetKind};

/// Magic number of an IDX file of unsigned-byte 3-D data (images).
pub(crate) const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte 1-D data (labels).
pub(crate) const LABELS_MAGIC: u32 = 0x0000_0801;
/// Side length of MNIST and Fashion-MNIST images.
const SIDE: i64 = 28;
/// Classes of MNIST and Fashion-MNIST.
const CLASSES: i64 = 10;

/// Reads one split (images and labels) of an IDX dataset from `dir` and checks it.
pub(crate) fn read_split(dir: &Path, part: Part, kind: DatasetKind) -> Result<RawSplit, DataError> {
    let prefix = if part == Part::Train { "train" } else { "t10k" };
    let images_path = resolve(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = resolve(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    // The two files decompress independently, so they are read on two cores.
    let (images, labels) = rayon::join(
        || read_images(&images_path, kind),
        || read_labels(&labels_path),
    );
    let ((count, pixels), labels) = (images?, labels?);
    if labels.len() != count {
        let (n, labels_path) = (labels.len(), labels_path.display());
        let detail = format!("{count} images but {n} labels in {labels_path}");
        return Err(DataError::content(images_path, detail));
    }
    Ok(RawSplit { pixels, labels })
}

/// Picks `dir/name` or `dir/name.gz`, whichever exists. The plain file wins when both do,
/// because it needs no decompression.
fn resolve(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let found = [&plain, &gz].into_iter().find(|p| p.is_file()).cloned();
    found.ok_or(DataError::MissingFile {
        path: plain,
        also_tried: Some(gz),
    })
}

/// Opens a file for streaming, decompressing it when it starts with the gzip magic `1f 8b`.
/// The content decides, not the name, because downloads often end up gunzipped but keep
/// `.gz` (or the reverse).
fn open(path: &Path) -> Result<Box<dyn Read>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        // Multi-member aware so files written by `pigz` or concatenated gzips also work.
        Ok(Box::new(MultiGzDecoder::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads up to `n` bytes; fewer are returned only at end of data, so the caller can tell
/// truncation apart from I/O failure and report how much was there.
fn read_up_to(reader: &mut dyn Read, n: usize, path: &Path) -> Result<Vec<u8>, DataError> {
    // Cap the up-front allocation: a corrupt header may claim terabytes.
    let mut buf = Vec::with_capacity(n.min(1 << 26));
    reader
        .take(n as u64)
        .read_to_end(&mut buf)
        .map_err(|e| DataError::io(path, e))?;
    Ok(buf)
}

/// Reads an IDX file whose header is `magic` and `dims` big-endian `u32` sizes, the first the
/// record count, and returns the sizes and the data, checked in this order: the magic number
/// (so a swapped file is reported as such even when it is also short), the header's length,
/// `check` on the sizes (which says what the header announces), the count, the data's length.
/// `what` names the file's kind ("IDX images"), `unit` its data ("pixel").
fn read_idx(
    path: &Path,
    (magic, what, unit): (u32, &'static str, &str),
    dims: usize,
    check: impl FnOnce(&[u32]) -> Result<String, DataError>,
) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let mut reader = open(path)?;
    let bytes = read_up_to(&mut *reader, 4 * (1 + dims), path)?;
    let header: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    let truncated = |detail: String| DataError::content(path, format!("truncated: {detail}"));
    if let Some(&found) = header.first().filter(|&&found| found != magic) {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found,
            expected: magic,
            what,
        });
    }
    if header.len() < 1 + dims {
        return Err(truncated(format!(
            "file holds {} bytes, less than the {}-byte {what} header",
            bytes.len(),
            4 * (1 + dims)
        )));
    }
    let sizes = header[1..].to_vec();
    let says = check(&sizes)?;
    if sizes[0] == 0 {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    let len = sizes.iter().map(|&d| d as usize).product();
    let data = read_up_to(&mut *reader, len, path)?;
    if data.len() < len {
        return Err(truncated(format!(
            "header says {says} but file holds {} bytes of {unit} data",
            data.len()
        )));
    }
    Ok((sizes, data))
}

/// Reads an images file; returns the image count and the pixel bytes.
fn read_images(path: &Path, kind: DatasetKind) -> Result<(usize, Vec<u8>), DataError> {
    let (sizes, pixels) = read_idx(path, (IMAGES_MAGIC, "IDX images", "pixel"), 3, |sizes| {
        let (count, rows, cols) = (sizes[0], sizes[1], sizes[2]);
        if i64::from(rows) != SIDE || i64::from(cols) != SIDE {
            let detail = format!("images are {rows}x{cols}, expected {SIDE}x{SIDE} for {kind}");
            return Err(DataError::content(path, detail));
        }
        Ok(format!("{count} images of {rows}x{cols}"))
    })?;
    Ok((sizes[0] as usize, pixels))
}

/// Reads a labels file and checks every label names a class.
fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let magic = (LABELS_MAGIC, "IDX labels", "label");
    let (_, labels) = read_idx(path, magic, 1, |sizes| Ok(format!("{} labels", sizes[0])))?;
    check_labels(path, &labels, CLASSES, "label")?;
    Ok(labels)
}

/// Checks every label is below `num_classes`.
pub(crate) fn check_labels(
    path: &Path,
    labels: &[u8],
    num_classes: i64,
    which: &'static str,
) -> Result<(), DataError> {
    match labels.iter().position(|&l| i64::from(l) >= num_classes) {
        None => Ok(()),
        Some(index) => {
            let label = labels[index];
            let detail = format!("{which} {label} at index {index} is outside 0..{num_classes}");
            Err(DataError::content(path, detail))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    const K: DatasetKind = DatasetKind::Mnist;

    fn write_ok(dir: &Path, prefix: &str, n: usize, gz: bool) -> (Vec<u8>, Vec<u8>) {
        let pixels = pattern(n * 784, 3);
        let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
        let suffix = if gz { ".gz" } else { "" };
        write_file(
            &dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
            &idx_images(n as u32, 28, 28, &pixels),
            gz,
        );
        write_file(
            &dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
            &idx_labels(n as u32, &labels),
            gz,
        );
        (pixels, labels)
    }

    #[test]
    fn reads_plain_and_gz_files() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (pixels, labels) = write_ok(dir.path(), "train", 5, gz);
            let raw = read_split(dir.path(), Part::Train, K).unwrap();
            assert_eq!(raw.pixels, pixels);
            assert_eq!(raw.labels, labels);
        }
    }

    #[test]
    fn detects_gzip_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let pixels = pattern(2 * 784, 9);
        // gzip content under the plain name, plain content under the .gz name.
        write_file(
            &dir.path().join("t10k-images-idx3-ubyte"),
            &idx_images(2, 28, 28, &pixels),
            true,
        );
        write_file(
            &dir.path().join("t10k-labels-idx1-ubyte.gz"),
            &idx_labels(2, &[4, 9]),
            false,
        );
        let raw = read_split(dir.path(), Part::Test, K).unwrap();
        assert_eq!(raw.pixels, pixels);
        assert_eq!(raw.labels, vec![4, 9]);
    }

    #[test]
    fn prefers_plain_file_when_both_exist() {
        let dir = tempfile::tempdir().unwrap();
        let (pixels, _) = write_ok(dir.path(), "train", 3, false);
        // A broken .gz twin must be ignored.
        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), b"junk").unwrap();
        let raw = read_split(dir.path(), Part::Train, K).unwrap();
        assert_eq!(raw.pixels, pixels);
    }

    #[test]
    fn missing_file_names_both_candidates() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        let want = format!(
            "missing file {} (nor {}.gz)",
            dir.path().join("train-labels-idx1-ubyte").display(),
            dir.path().join("train-labels-idx1-ubyte").display()
        );
        assert_eq!(err.to_string(), want);
    }

    #[test]
    fn wrong_magic_is_reported_with_both_numbers() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, true);
        // Labels file where the images file should be: the classic swap.
        let path = dir.path().join("train-images-idx3-ubyte.gz");
        write_file(&path, &idx_labels(3, &[1, 2, 3]), true);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: wrong magic number 0x00000801, expected 0x00000803 (IDX images)",
                path.display()
            )
        );

        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        let path = dir.path().join("train-labels-idx1-ubyte");
        let mut bytes = idx_labels(3, &[1, 2, 3]);
        bytes[3] = 0x03;
        write_file(&path, &bytes, false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    found: 0x803,
                    expected: 0x801,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("(IDX labels)"), "{err}");
    }

    #[test]
    fn truncated_pixel_data_is_reported() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_ok(dir.path(), "train", 3, gz);
            let name = if gz {
                "train-images-idx3-ubyte.gz"
            } else {
                "train-images-idx3-ubyte"
            };
            let path = dir.path().join(name);
            let mut bytes = idx_images(3, 28, 28, &pattern(3 * 784, 0));
            bytes.truncate(16 + 1234);
            write_file(&path, &bytes, gz);
            let err = read_split(dir.path(), Part::Train, K).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "{}: truncated: header says 3 images of 28x28 but file holds 1234 bytes of pixel data",
                    path.display()
                )
            );
        }
    }

    #[test]
    fn truncated_header_and_labels_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        let path = dir.path().join("train-images-idx3-ubyte");
        write_file(&path, &idx_images(3, 28, 28, &[])[..10], false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: truncated: file holds 10 bytes, less than the 16-byte IDX images header",
                path.display()
            )
        );

        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        let path = dir.path().join("train-labels-idx1-ubyte");
        write_file(&path, &idx_labels(3, &[1]), false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: truncated: header says 3 labels but file holds 1 bytes of label data",
                path.display()
            )
        );
    }

    #[test]
    fn corrupt_gzip_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        let path = dir.path().join("train-images-idx3-ubyte");
        let mut bytes = gzip(&idx_images(3, 28, 28, &pattern(3 * 784, 0)));
        let mid = bytes.len() / 2;
        bytes.truncate(mid);
        std::fs::write(&path, bytes).unwrap();
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: ", path.display())),
            "{err}"
        );
    }

    #[test]
    fn count_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 3, false);
        let labels_path = dir.path().join("train-labels-idx1-ubyte");
        write_file(&labels_path, &idx_labels(2, &[1, 2]), false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: 3 images but 2 labels in {}",
                dir.path().join("train-images-idx3-ubyte").display(),
                labels_path.display()
            )
        );
    }

    #[test]
    fn label_out_of_range_is_reported_with_index() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 6, false);
        let path = dir.path().join("train-labels-idx1-ubyte");
        write_file(&path, &idx_labels(6, &[0, 1, 2, 3, 4, 12]), false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: label 12 at index 5 is outside 0..10", path.display())
        );
    }

    #[test]
    fn wrong_image_size_and_empty_file_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write_ok(dir.path(), "train", 1, false);
        let path = dir.path().join("train-images-idx3-ubyte");
        write_file(&path, &idx_images(1, 32, 32, &pattern(1024, 0)), false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: images are 32x32, expected 28x28 for mnist",
                path.display()
            )
        );

        write_file(&path, &idx_images(0, 28, 28, &[]), false);
        let err = read_split(dir.path(), Part::Train, K).unwrap_err();
        assert!(matches!(err, DataError::Empty(_)), "{err}");
    }
}
