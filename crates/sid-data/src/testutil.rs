//! Helpers for the unit tests: writers for small files in the real on-disk formats.

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;

/// Deterministic, varied bytes (so mixed-up samples or channels show up as mismatches).
pub fn pattern(len: usize, salt: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 37 + salt * 101 + i / 7) % 256) as u8)
        .collect()
}

/// Gzip-compresses `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Writes `bytes` to `path`, gzip-compressed when `gz`.
pub fn write_file(path: &Path, bytes: &[u8], gz: bool) {
    let data = if gz { gzip(bytes) } else { bytes.to_vec() };
    std::fs::write(path, data).unwrap();
}

/// An IDX images file: header then the given pixel bytes (not checked against the header,
/// so corrupt files can be made).
pub fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in [crate::idx::IMAGES_MAGIC, count, rows, cols] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// An IDX labels file: header then the given label bytes.
pub fn idx_labels(count: u32, labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in [crate::idx::LABELS_MAGIC, count] {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

/// Writes a complete IDX dataset (train and test, gzip-compressed) with 28x28 images and
/// returns `(train_pixels, train_labels, test_pixels, test_labels)`.
pub fn write_idx_dataset(
    dir: &Path,
    n_train: usize,
    n_test: usize,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let train_px = pattern(n_train * 784, 1);
    let train_lb: Vec<u8> = (0..n_train).map(|i| (i % 10) as u8).collect();
    let test_px = pattern(n_test * 784, 2);
    let test_lb: Vec<u8> = (0..n_test).map(|i| ((i * 3) % 10) as u8).collect();
    for (prefix, px, lb) in [
        ("train", &train_px, &train_lb),
        ("t10k", &test_px, &test_lb),
    ] {
        let n = lb.len() as u32;
        write_file(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &idx_images(n, 28, 28, px),
            true,
        );
        write_file(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &idx_labels(n, lb),
            true,
        );
    }
    (train_px, train_lb, test_px, test_lb)
}

/// CIFAR records: for each sample, the label byte(s) then its 3072 pixel bytes. With
/// `coarse` set, a coarse-label byte precedes the fine label (the CIFAR-100 layout).
pub fn cifar_records(labels: &[u8], pixels: &[u8], coarse: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &label) in labels.iter().enumerate() {
        if let Some(c) = coarse {
            out.push(c[i]);
        }
        out.push(label);
        out.extend_from_slice(&pixels[i * 3072..(i + 1) * 3072]);
    }
    out
}
