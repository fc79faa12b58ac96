//! Loading a whole dataset: files, training and test limits, validation split, label noise
//! and normalisation, in that order.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::folder::{self, FolderInfo, DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE};
use crate::idx;
use crate::raw::{Part, RawSplit};
use crate::{cifar, DataError, DatasetKind, Shape};

/// Mixed into the seed of the label-noise RNG ("NOISE" in ASCII) so the noise draw is
/// independent of every other stream derived from the same run seed.
const NOISE_SEED_TAG: u64 = 0x4e_4f49_5345;

/// A [`DataError::InvalidOption`] with a `format!` message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        DataError::InvalidOption(format!($($arg)*))
    };
}

/// One split held in memory on the CPU.
#[derive(Debug)]
pub struct Split {
    /// `[N, C, H, W]` float32 images, normalised per channel with [`InputSpec::mean`] and
    /// [`InputSpec::std`] of the data set's [`Dataset::spec`].
    pub images: Tensor,
    /// `[N]` int64 class indices.
    pub labels: Tensor,
}

impl Split {
    /// The split with its tensors on `device` (the same split when already there).
    pub fn to_device(&self, device: tch::Device) -> Split {
        Split {
            images: self.images.to_device(device),
            labels: self.labels.to_device(device),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// Whether the split holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How [`load`] shapes the training data (and how much of the test split it keeps); the
/// default keeps everything, holds nothing out, adds no noise and uses no cache.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadOptions {
    /// Keep only the first N training samples (file order), for quick runs. More than the
    /// dataset holds keeps them all.
    pub limit_train: Option<usize>,
    /// Keep only the first N test samples (file order), so a quick run's evaluation is quick
    /// too; training is untouched. More than the test split holds keeps them all.
    pub limit_test: Option<usize>,
    /// Fraction of the (limited) training samples held out for validation, taken from the end;
    /// 0 means no validation split. Must be in `[0, 1)`.
    pub val_split: f64,
    /// Fraction of the remaining training labels replaced by a different random class
    /// (symmetric label noise). Must be in `[0, 1]`.
    pub label_noise: f64,
    /// Seed of the label-noise draw.
    pub seed: u64,
    /// Side length a folder data set's images are resized to; `None` is
    /// [`DEFAULT_IMAGE_SIZE`]. The built-in data sets have fixed sizes and reject any other.
    pub image_size: Option<i64>,
    /// Folder for a folder data set's decoded-image cache (created when absent); `None`
    /// decodes every image on every load.
    pub cache_dir: Option<PathBuf>,
}

impl LoadOptions {
    /// Checks every field is in range, so a typo fails before minutes of loading.
    pub fn validate(&self) -> Result<(), DataError> {
        // `contains` is false for NaN, so NaN is rejected as well.
        if !(0.0..1.0).contains(&self.val_split) {
            return Err(invalid!("val_split {} is outside [0, 1)", self.val_split));
        }
        if !(0.0..=1.0).contains(&self.label_noise) {
            return Err(invalid!(
                "label_noise {} is outside [0, 1]",
                self.label_noise
            ));
        }
        if self.limit_train == Some(0) {
            return Err(invalid!("limit_train must be at least 1"));
        }
        if self.limit_test == Some(0) {
            return Err(invalid!("limit_test must be at least 1"));
        }
        if let Some(s) = self.image_size {
            // Below 4 the SimpleCNN's two 2x2 poolings leave nothing.
            if !(4..=MAX_IMAGE_SIZE).contains(&s) {
                return Err(invalid!("image_size {s} is outside 4..={MAX_IMAGE_SIZE}"));
            }
        }
        Ok(())
    }
}

/// A loaded dataset, ready for training.
#[derive(Debug)]
pub struct Dataset {
    /// Which dataset this is.
    pub kind: DatasetKind,
    /// Training samples (after limit, validation hold-out and label noise).
    pub train: Split,
    /// Held-out validation samples with clean labels, when `val_split > 0`.
    pub val: Option<Split>,
    /// The official test split, never altered; only its first `limit_test` samples when set.
    pub test: Split,
    /// How many training labels were flipped by label noise.
    pub noisy_labels: usize,
    /// What the model is built for and its inputs are made into: the shape, the per-channel
    /// statistics the pixels were normalised with (a built-in data set's published ones, a
    /// folder data set's training split's own) and the class names (a folder data set's
    /// folder names or `wnids.txt`'s, a built-in data set's published names).
    pub spec: InputSpec,
    /// How a folder data set was loaded (layout, cache hit or not, time); `None` otherwise.
    pub folder: Option<FolderInfo>,
}

impl Dataset {
    /// The data set with every split on `device`: on a GPU, batches are then gathered there
    /// and no step waits for a host-to-device copy.
    pub fn to_device(self, device: tch::Device) -> Dataset {
        Dataset {
            train: self.train.to_device(device),
            val: self.val.map(|v| v.to_device(device)),
            test: self.test.to_device(device),
            ..self
        }
    }
}

/// Loads train and test from `dir`.
///
/// Order: read files (or a folder data set's cache) -> `limit_train` (first N training
/// samples) and `limit_test` (first N test samples) -> validation split (the LAST `round(val_split * n)` of the limited training
/// samples are held out, labels clean) -> symmetric label noise on the remaining training
/// samples only -> normalise (a folder data set with the mean and std of those remaining
/// training samples).
pub fn load(kind: DatasetKind, dir: &Path, opts: &LoadOptions) -> Result<Dataset, DataError> {
    opts.validate()?;
    if !dir.is_dir() {
        return Err(DataError::MissingDir(dir.to_path_buf()));
    }
    let ((shape, mut train, mut test), classes, folder) = match kind.shape() {
        Some(shape) => {
            if let Some(asked) = opts.image_size.filter(|&s| s != shape.image_size) {
                return Err(invalid!(
                    "image_size {asked}: {kind} images are {0}x{0}; resizing applies to folder data sets only",
                    shape.image_size
                ));
            }
            let read = |part| match kind {
                DatasetKind::FashionMnist | DatasetKind::Mnist => idx::read_split(dir, part, kind),
                _ => cifar::read_split(dir, part, kind),
            };
            // Train and test are separate files: read (and decompress) them on two cores.
            let (train, test) = rayon::join(|| read(Part::Train), || read(Part::Test));
            let classes = kind.class_names().iter().map(|c| c.to_string()).collect();
            ((shape, train?, test?), classes, None)
        }
        None => {
            let size = opts.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
            let (images, classes, info) = folder::read(dir, size, opts.cache_dir.as_deref())?;
            (images, classes, Some(info))
        }
    };
    let sample_len = shape.sample_len();

    train.truncate(opts.limit_train.unwrap_or(usize::MAX), sample_len);
    test.truncate(opts.limit_test.unwrap_or(usize::MAX), sample_len);

    let (n, split) = (train.len(), opts.val_split);
    let k = (split * n as f64).round() as usize;
    if split > 0.0 && (k == 0 || k >= n) {
        let what = match k {
            0 => "holds out no sample",
            _ => "leaves no training sample",
        };
        return Err(invalid!("val_split {split} of {n} training samples {what}"));
    }
    let val = (k > 0).then(|| train.split_off_last(k, sample_len));

    let noisy_labels = add_symmetric_noise(
        &mut train.labels,
        shape.num_classes,
        opts.label_noise,
        opts.seed,
    );

    let (mean, std) = match kind.mean_std() {
        Some((mean, std)) => (mean.to_vec(), std.to_vec()),
        None => channel_mean_std(&train.pixels, shape),
    };
    let spec = InputSpec {
        shape,
        mean,
        std,
        classes,
    };
    // The normalised float tensors of one split.
    let norm = |raw: RawSplit| -> Result<Split, DataError> {
        let labels = Tensor::f_from_slice(&raw.labels)?.f_to_kind(Kind::Int64)?;
        let images = normalise(&raw.pixels, shape, &spec.mean, &spec.std)?;
        Ok(Split { images, labels })
    };
    Ok(Dataset {
        kind,
        train: norm(train)?,
        val: val.map(&norm).transpose()?,
        test: norm(test)?,
        noisy_labels,
        spec,
        folder,
    })
}

/// Per-channel mean and standard deviation of `pixels` (channel-major images) scaled to
/// 0..1. A constant channel gets std 1, so normalising it cannot divide by zero.
fn channel_mean_std(pixels: &[u8], shape: Shape) -> (Vec<f64>, Vec<f64>) {
    let c = shape.channels as usize;
    let plane = (shape.image_size * shape.image_size) as usize;
    // Exact integer sums: 255² per pixel times billions of pixels still fits a u64.
    let mut sum = vec![0u64; c];
    let mut sq = vec![0u64; c];
    // Plane i of the channel-major images is of channel i % c.
    for (i, values) in pixels.chunks_exact(plane).enumerate() {
        for &v in values {
            sum[i % c] += u64::from(v);
            sq[i % c] += u64::from(v) * u64::from(v);
        }
    }
    let count = (pixels.len() / c).max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|&s| s as f64 / count / 255.0).collect();
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(&q, m)| (q as f64 / count / (255.0 * 255.0) - m * m).max(0.0).sqrt())
        .map(|sd| if sd > 1e-6 { sd } else { 1.0 })
        .collect();
    (mean, std)
}

/// Replaces exactly `round(fraction * n)` labels, at distinct indices, each by a uniformly
/// chosen *different* class; returns how many were replaced. Deterministic in `seed`.
fn add_symmetric_noise(labels: &mut [u8], num_classes: i64, fraction: f64, seed: u64) -> usize {
    let k = (fraction * labels.len() as f64).round() as usize;
    if k == 0 || num_classes < 2 {
        return 0;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ NOISE_SEED_TAG);
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.shuffle(&mut rng);
    for &i in &order[..k] {
        // Draw among the other num_classes - 1 classes by skipping over the true one.
        let r = rng.gen_range(0..num_classes - 1) as u8;
        labels[i] = if r >= labels[i] { r + 1 } else { r };
    }
    k
}

/// Channel-major images of `shape` as bytes (at least one) → `[N, C, H, W]` float32, scaled
/// to 0..1 and normalised per channel: the one normalisation of training, evaluation and
/// prediction.
fn normalise(pixels: &[u8], shape: Shape, mean: &[f64], std: &[f64]) -> Result<Tensor, DataError> {
    let (c, s) = (shape.channels, shape.image_size);
    let mut images = Tensor::f_from_slice(pixels)?
        .f_reshape([-1, c, s, s])?
        .f_to_kind(Kind::Float)?;
    // A per-channel statistic as `[1, C, 1, 1]`, broadcast over the images.
    let stat = |v: &[f64]| {
        Tensor::f_from_slice(v)?
            .f_to_kind(Kind::Float)?
            .f_reshape([1, c, 1, 1])
    };
    // In place: the CIFAR training tensor is 600 MB, so avoid temporaries. The returned
    // handles alias `images` and are not needed.
    let _ = images.f_div_scalar_(255.0)?;
    let _ = images.f_sub_(&stat(mean)?)?;
    let _ = images.f_div_(&stat(std)?)?;
    Ok(images)
}

/// What a model trained on a data set expects of one input image (its shape and the
/// normalisation its training used) and what its outputs name (the classes). Saved with a
/// run, so that an image file can be fed to the saved model without loading the data set
/// ([`InputSpec::image`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputSpec {
    /// Channels, side length and number of classes.
    pub shape: Shape,
    /// Per-channel mean subtracted (pixels scaled to 0..1).
    pub mean: Vec<f64>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f64>,
    /// Class names by label.
    pub classes: Vec<String>,
}

impl InputSpec {
    /// The PNG or JPEG file at `path` as a `[1, C, H, W]` float32 input: decoded, resized to
    /// fill the image size (centre crop), converted to the data set's channels (luma for grey)
    /// and normalised, by the same code that prepares a folder data set's images.
    pub fn image(&self, path: &Path) -> Result<Tensor, DataError> {
        let c = self.shape.channels as usize;
        if !matches!(c, 1 | 3) || self.mean.len() != c || self.std.len() != c {
            return Err(invalid!(
                "{c} channels with {} means and {} standard deviations: images have 1 or 3 channels, one statistic each",
                self.mean.len(),
                self.std.len()
            ));
        }
        let (rgb, _) = folder::decode(path, self.shape.image_size as u32)?;
        let pixels = folder::planes(&rgb, self.shape.channels);
        normalise(&pixels, self.shape, &self.mean, &self.std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn labels_of(split: &Split) -> Vec<i64> {
        Vec::<i64>::try_from(&split.labels).unwrap()
    }

    fn pixels_of(split: &Split) -> Vec<f32> {
        Vec::<f32>::try_from(&split.images.flatten(0, -1)).unwrap()
    }

    /// The normalised value the loader must produce for a raw byte in channel `c`.
    fn expected(kind: DatasetKind, raw: &[u8], sample_len: usize) -> Vec<f32> {
        let (mean, std) = kind.mean_std().unwrap();
        let plane = sample_len / mean.len();
        raw.iter()
            .enumerate()
            .map(|(i, &p)| {
                let c = (i % sample_len) / plane;
                ((f64::from(p) / 255.0 - mean[c]) / std[c]) as f32
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-5, "pixel {i}: got {g}, want {w}");
        }
    }

    #[test]
    fn loads_mnist_like_normalised_with_shapes_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let (train_px, train_lb, test_px, test_lb) = write_idx_dataset(dir.path(), 7, 4);
        for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
            let ds = load(kind, dir.path(), &LoadOptions::default()).unwrap();
            assert_eq!(ds.kind, kind);
            assert_eq!(ds.train.images.size(), vec![7, 1, 28, 28]);
            assert_eq!(ds.train.images.kind(), Kind::Float);
            assert_eq!(ds.train.labels.kind(), Kind::Int64);
            assert_eq!(ds.test.images.size(), vec![4, 1, 28, 28]);
            assert_eq!(ds.train.len(), 7);
            assert!(!ds.train.is_empty());
            assert!(ds.val.is_none());
            assert_eq!(ds.noisy_labels, 0);
            let lb: Vec<i64> = train_lb.iter().map(|&l| l as i64).collect();
            assert_eq!(labels_of(&ds.train), lb);
            let lb: Vec<i64> = test_lb.iter().map(|&l| l as i64).collect();
            assert_eq!(labels_of(&ds.test), lb);
            assert_close(&pixels_of(&ds.train), &expected(kind, &train_px, 784));
            assert_close(&pixels_of(&ds.test), &expected(kind, &test_px, 784));
        }
    }

    #[test]
    fn loads_cifar_channel_major_and_normalised() {
        let dir = tempfile::tempdir().unwrap();
        let px = pattern(2 * 3072, 5);
        let test_px = pattern(3072, 6);
        // Batch 3 holds two images, the others one each (labelled by batch number), to check
        // the batches are joined in order.
        for b in 1..=5usize {
            let bytes = if b == 3 {
                cifar_records(&[3, 8], &px, None)
            } else {
                cifar_records(&[b as u8], &pattern(3072, 10 + b), None)
            };
            std::fs::write(dir.path().join(format!("data_batch_{b}.bin")), bytes).unwrap();
        }
        std::fs::write(
            dir.path().join("test_batch.bin"),
            cifar_records(&[7], &test_px, None),
        )
        .unwrap();
        let kind = DatasetKind::Cifar10;
        let ds = load(kind, dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(ds.train.images.size(), vec![6, 3, 32, 32]);
        assert_eq!(labels_of(&ds.train), vec![1, 2, 3, 8, 4, 5]);
        assert_eq!(labels_of(&ds.test), vec![7]);
        // Samples 2 and 3 come from batch 3; check one pixel per channel by coordinates.
        let (mean, std) = kind.mean_std().unwrap();
        for (c, y, x) in [(0usize, 0usize, 0usize), (1, 5, 17), (2, 31, 31)] {
            let raw = px[3072 + c * 1024 + y * 32 + x];
            let want = ((f64::from(raw) / 255.0 - mean[c]) / std[c]) as f32;
            let got = ds
                .train
                .images
                .double_value(&[3, c as i64, y as i64, x as i64]) as f32;
            assert!((got - want).abs() < 1e-5, "c{c} y{y} x{x}: {got} vs {want}");
        }
        assert_close(&pixels_of(&ds.test), &expected(kind, &test_px, 3072));
    }

    #[test]
    fn loads_cifar100_fine_labels() {
        let dir = tempfile::tempdir().unwrap();
        let px = pattern(2 * 3072, 1);
        std::fs::write(
            dir.path().join("train.bin"),
            cifar_records(&[42, 99], &px, Some(&[3, 19])),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("test.bin"),
            cifar_records(&[0], &px[..3072], Some(&[0])),
        )
        .unwrap();
        let kind = DatasetKind::Cifar100;
        let ds = load(kind, dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(labels_of(&ds.train), vec![42, 99]);
        assert_close(&pixels_of(&ds.train), &expected(kind, &px, 3072));
    }

    #[test]
    fn limit_then_val_split_takes_the_last_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (train_px, train_lb, _, _) = write_idx_dataset(dir.path(), 20, 2);
        let kind = DatasetKind::Mnist;
        let opts = LoadOptions {
            limit_train: Some(10),
            val_split: 0.25, // round(2.5) = 3 of the 10
            ..Default::default()
        };
        let ds = load(kind, dir.path(), &opts).unwrap();
        let val = ds.val.as_ref().unwrap();
        assert_eq!(ds.train.len(), 7);
        assert_eq!(val.len(), 3);
        let lb: Vec<i64> = train_lb.iter().map(|&l| l as i64).collect();
        assert_eq!(labels_of(&ds.train), lb[..7]);
        assert_eq!(labels_of(val), lb[7..10]);
        assert_close(
            &pixels_of(&ds.train),
            &expected(kind, &train_px[..7 * 784], 784),
        );
        assert_close(
            &pixels_of(val),
            &expected(kind, &train_px[7 * 784..10 * 784], 784),
        );
        assert_eq!(ds.test.len(), 2);
    }

    #[test]
    fn limit_test_keeps_the_first_test_samples_and_leaves_training_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (train_px, train_lb, test_px, test_lb) = write_idx_dataset(dir.path(), 12, 9);
        let kind = DatasetKind::Mnist;
        let opts = LoadOptions {
            limit_train: Some(10),
            val_split: 0.2,
            ..Default::default()
        };
        let full = load(kind, dir.path(), &opts).unwrap();
        let ds = load(
            kind,
            dir.path(),
            &LoadOptions {
                limit_test: Some(4),
                ..opts
            },
        )
        .unwrap();
        let lb: Vec<i64> = test_lb.iter().map(|&l| l as i64).collect();
        assert_eq!(labels_of(&ds.test), lb[..4]);
        assert_close(
            &pixels_of(&ds.test),
            &expected(kind, &test_px[..4 * 784], 784),
        );
        assert_eq!(full.test.len(), 9);
        // Training and validation are what they are without the test limit.
        let lb: Vec<i64> = train_lb.iter().map(|&l| l as i64).collect();
        assert_eq!(labels_of(&ds.train), lb[..8]);
        assert_eq!(labels_of(ds.val.as_ref().unwrap()), lb[8..10]);
        assert!(ds.train.images.equal(&full.train.images));
        assert_close(
            &pixels_of(&ds.train),
            &expected(kind, &train_px[..8 * 784], 784),
        );
        // More than the test split holds keeps it all.
        let all = LoadOptions {
            limit_test: Some(1000),
            ..Default::default()
        };
        assert_eq!(load(kind, dir.path(), &all).unwrap().test.len(), 9);
    }

    #[test]
    fn limit_larger_than_dataset_keeps_all() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_dataset(dir.path(), 5, 2);
        let opts = LoadOptions {
            limit_train: Some(1000),
            ..Default::default()
        };
        let ds = load(DatasetKind::Mnist, dir.path(), &opts).unwrap();
        assert_eq!(ds.train.len(), 5);
    }

    #[test]
    fn label_noise_flips_exact_count_reproducibly_and_only_train() {
        let dir = tempfile::tempdir().unwrap();
        let (_, train_lb, _, test_lb) = write_idx_dataset(dir.path(), 50, 10);
        let opts = LoadOptions {
            val_split: 0.2, // last 10 held out, 40 left
            label_noise: 0.3,
            seed: 7,
            ..Default::default()
        };
        let ds = load(DatasetKind::Mnist, dir.path(), &opts).unwrap();
        assert_eq!(ds.noisy_labels, 12);
        let clean: Vec<i64> = train_lb.iter().map(|&l| l as i64).collect();
        let noisy = labels_of(&ds.train);
        let changed = noisy.iter().zip(&clean).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 12, "every chosen label moves to another class");
        assert!(noisy.iter().all(|&l| (0..10).contains(&l)));
        assert_eq!(labels_of(ds.val.as_ref().unwrap()), clean[40..]);
        let test: Vec<i64> = test_lb.iter().map(|&l| l as i64).collect();
        assert_eq!(labels_of(&ds.test), test);

        let again = load(DatasetKind::Mnist, dir.path(), &opts).unwrap();
        assert_eq!(labels_of(&again.train), noisy);
        let other = load(
            DatasetKind::Mnist,
            dir.path(),
            &LoadOptions { seed: 8, ..opts },
        )
        .unwrap();
        assert_ne!(labels_of(&other.train), noisy);
    }

    #[test]
    fn full_label_noise_changes_every_label_to_a_valid_other_class() {
        let mut labels: Vec<u8> = (0..200).map(|i| (i % 100) as u8).collect();
        let clean = labels.clone();
        assert_eq!(add_symmetric_noise(&mut labels, 100, 1.0, 3), 200);
        for (n, c) in labels.iter().zip(&clean) {
            assert_ne!(n, c);
            assert!(*n < 100);
        }
        // With 2 classes the only other class is forced.
        let mut labels = vec![0u8, 1, 0, 1];
        add_symmetric_noise(&mut labels, 2, 1.0, 0);
        assert_eq!(labels, vec![1, 0, 1, 0]);
    }

    #[test]
    fn invalid_options_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_dataset(dir.path(), 4, 1);
        let bad = [
            LoadOptions {
                val_split: 1.0,
                ..Default::default()
            },
            LoadOptions {
                val_split: -0.1,
                ..Default::default()
            },
            LoadOptions {
                val_split: f64::NAN,
                ..Default::default()
            },
            LoadOptions {
                label_noise: 1.5,
                ..Default::default()
            },
            LoadOptions {
                limit_train: Some(0),
                ..Default::default()
            },
            LoadOptions {
                limit_test: Some(0),
                ..Default::default()
            },
            // round(0.9 * 4) = 4 held out leaves nothing to train on.
            LoadOptions {
                val_split: 0.9,
                ..Default::default()
            },
            // round(0.1 * 4) = 0 held out.
            LoadOptions {
                val_split: 0.1,
                ..Default::default()
            },
        ];
        for opts in bad {
            let err = load(DatasetKind::Mnist, dir.path(), &opts).unwrap_err();
            assert!(
                matches!(err, DataError::InvalidOption(_)),
                "{opts:?}: {err}"
            );
        }
        let err = load(
            DatasetKind::Mnist,
            dir.path(),
            &LoadOptions {
                val_split: 0.9,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid option: val_split 0.9 of 4 training samples leaves no training sample"
        );
    }

    #[test]
    fn missing_directory_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = load(DatasetKind::Cifar10, &missing, &LoadOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("data directory {} does not exist", missing.display())
        );
    }

    #[test]
    fn errors_from_files_propagate_through_load() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_dataset(dir.path(), 3, 2);
        std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte.gz")).unwrap();
        let err = load(DatasetKind::Mnist, dir.path(), &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, DataError::MissingFile { .. }), "{err}");
    }

    /// Loads the real Fashion-MNIST (scripts/setup.sh and .ci/run install Debian's
    /// dataset-fashion-mnist): the published mean/std must bring the training pixels to about
    /// zero mean, unit std.
    #[test]
    fn real_fashion_mnist_is_normalised() {
        let kind = DatasetKind::FashionMnist;
        let ds = load(kind, &kind.default_dir(), &LoadOptions::default()).unwrap();
        assert_eq!(ds.train.images.size(), vec![60000, 1, 28, 28]);
        assert_eq!(ds.test.images.size(), vec![10000, 1, 28, 28]);
        let mean = ds.train.images.mean(Kind::Float).double_value(&[]);
        let std = ds.train.images.std(true).double_value(&[]);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((std - 1.0).abs() < 0.01, "std {std}");
        let counts = ds.train.labels.bincount::<Tensor>(None, 10);
        assert_eq!(Vec::<i64>::try_from(&counts).unwrap(), vec![6000; 10]);
    }
}
