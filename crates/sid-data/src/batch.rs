//! Epoch order, mini-batches and crop+flip augmentation.
//!
//! All randomness here is *stateless*: each RNG is built from (seed, epoch[, step]), so a run
//! resumed from a checkpoint at any step sees exactly the batches and augmentations the
//! uninterrupted run would have seen, with no RNG state to save.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

use crate::Split;

/// Domain tags keep the permutation and augmentation streams independent even for equal
/// (seed, epoch) inputs.
const PERM_TAG: u64 = 0x7065_726d; // "perm"
const AUG_TAG: u64 = 0x0061_7567; // "aug"

/// Builds a ChaCha8 RNG whose 256-bit seed is the tag and the three words side by side, so
/// distinct inputs always give distinct streams (no hash collisions to reason about).
fn stream_rng(tag: u64, a: u64, b: u64, c: u64) -> ChaCha8Rng {
    let mut seed = [0u8; 32];
    for (chunk, word) in seed.chunks_exact_mut(8).zip([tag, a, b, c]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(seed)
}

/// The order of training samples for one epoch: a permutation of `0..n` from ChaCha8Rng
/// seeded by a mix of (`seed`, `epoch`). Stateless, so a resumed run sees the same order.
pub fn epoch_permutation(n: i64, seed: u64, epoch: u64) -> Vec<i64> {
    let mut perm: Vec<i64> = (0..n.max(0)).collect();
    perm.shuffle(&mut stream_rng(PERM_TAG, seed, epoch, 0));
    perm
}

/// Number of batches per epoch (the last partial batch is kept).
///
/// # Panics
/// If `batch_size` is not positive.
pub fn num_batches(n: i64, batch_size: i64) -> i64 {
    assert!(
        batch_size > 0,
        "batch_size must be positive, got {batch_size}"
    );
    (n.max(0) + batch_size - 1) / batch_size
}

/// Batch `index` of an epoch: images and labels gathered (`index_select`) by the permutation,
/// or taken in order when `perm` is `None` (evaluation). Returns tensors on the split's device
/// that own their data, so the caller may modify them in place without touching the split.
///
/// # Panics
/// If `batch_size` is not positive, `index` is outside `0..num_batches(len, batch_size)`, or
/// `perm` does not have one entry per sample.
pub fn batch(split: &Split, perm: Option<&[i64]>, batch_size: i64, index: i64) -> (Tensor, Tensor) {
    let n = split.len();
    let count = num_batches(n, batch_size);
    assert!(
        (0..count).contains(&index),
        "batch index {index} outside 0..{count} ({n} samples, batch size {batch_size})"
    );
    let start = index * batch_size;
    let len = batch_size.min(n - start);
    let idx = perm.map(|perm| {
        assert_eq!(
            perm.len() as i64,
            n,
            "permutation has {} entries for {n} samples",
            perm.len()
        );
        Tensor::from_slice(&perm[start as usize..(start + len) as usize])
            .to_device(split.images.device())
    });
    let take = |t: &Tensor| match &idx {
        Some(idx) => t.index_select(0, idx),
        None => t.narrow(0, start, len).copy(),
    };
    (take(&split.images), take(&split.labels))
}

/// The random choices for one sample of an augmented batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropFlip {
    /// Top row of the crop window in the padded image, in `0..=2*pad`.
    pub dy: i64,
    /// Left column of the crop window in the padded image, in `0..=2*pad`.
    pub dx: i64,
    /// Whether the crop is mirrored left-right.
    pub flip: bool,
}

/// The per-sample crop offsets and flips [`augment_batch`] uses for a batch of `batch` images,
/// drawn from ChaCha8Rng seeded by (`seed`, `epoch`, `step`). Exposed so callers and tests
/// can see exactly what was applied.
///
/// # Panics
/// If `pad` is negative.
pub fn augment_params(batch: i64, pad: i64, seed: u64, epoch: u64, step: u64) -> Vec<CropFlip> {
    assert!(pad >= 0, "pad must be non-negative, got {pad}");
    let mut rng = stream_rng(AUG_TAG, seed, epoch, step);
    (0..batch.max(0))
        .map(|_| CropFlip {
            dy: rng.gen_range(0..=2 * pad),
            dx: rng.gen_range(0..=2 * pad),
            flip: rng.gen_bool(0.5),
        })
        .collect()
}

/// Random crop with zero padding `pad` (4 for CIFAR) plus horizontal flip with probability
/// 0.5, for a whole `[B, C, H, W]` batch at once, with randomness from
/// [`augment_params`]`(B, pad, seed, epoch, step)` (seedable and stateless).
///
/// The padding value is 0 in the *normalised* space, i.e. the channel mean, which keeps the
/// padded border neutral for the network. The result has the input's shape, kind and device,
/// so this works on GPU batches as well.
///
/// # Panics
/// If `images` is not 4-D or `pad` is negative.
pub fn augment_batch(images: &Tensor, pad: i64, seed: u64, epoch: u64, step: u64) -> Tensor {
    let (b, c, h, w) = images
        .size4()
        .unwrap_or_else(|_| panic!("augment_batch needs [B,C,H,W], got {:?}", images.size()));
    let params = augment_params(b, pad, seed, epoch, step);
    let device = images.device();
    let column = |v: Vec<i64>| Tensor::from_slice(&v).to_device(device).view([b, 1]);
    let dy = column(params.iter().map(|p| p.dy).collect());
    let dx = column(params.iter().map(|p| p.dx).collect());
    let flips: Vec<bool> = params.iter().map(|p| p.flip).collect();
    let flip = Tensor::from_slice(&flips).to_device(device).view([b, 1]);

    let padded = images.constant_pad_nd([pad, pad, pad, pad]);
    // Source row of output row i is dy + i.
    let rows = dy + Tensor::arange(h, (Kind::Int64, device)).view([1, h]);
    // Source column of output column j is dx + j, or dx + (w-1-j) when flipped: mirroring the
    // cropped window is the same as reading it right to left, so the flip costs nothing extra.
    let cols_fwd = Tensor::arange(w, (Kind::Int64, device)).view([1, w]);
    let cols = dx + cols_fwd.flip([1]).where_self(&flip, &cols_fwd);

    let row_idx = rows
        .view([b, 1, h, 1])
        .expand([b, c, h, w + 2 * pad], false);
    let col_idx = cols.view([b, 1, 1, w]).expand([b, c, h, w], false);
    padded.gather(2, &row_idx, false).gather(3, &col_idx, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: i64) -> Split {
        // Image i is filled with the value i, so gathered rows identify their source.
        let images = Tensor::arange(n, (Kind::Float, tch::Device::Cpu))
            .view([n, 1, 1, 1])
            .expand([n, 2, 3, 3], false)
            .contiguous();
        let labels = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)) * 10;
        Split { images, labels }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn permutation_is_a_reproducible_permutation() {
        let p = epoch_permutation(100, 5, 3);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<i64>>());
        assert_eq!(p, epoch_permutation(100, 5, 3));
        assert_ne!(p, epoch_permutation(100, 5, 4));
        assert_ne!(p, epoch_permutation(100, 6, 3));
        assert_ne!(p, (0..100).collect::<Vec<i64>>());
        assert!(epoch_permutation(0, 1, 1).is_empty());
    }

    #[test]
    fn num_batches_keeps_partial_batch() {
        assert_eq!(num_batches(10, 3), 4);
        assert_eq!(num_batches(9, 3), 3);
        assert_eq!(num_batches(0, 3), 0);
        assert_eq!(num_batches(1, 128), 1);
    }

    #[test]
    fn batches_follow_permutation_and_cover_split() {
        let s = split(10);
        let perm = epoch_permutation(10, 1, 0);
        let mut seen = Vec::new();
        for i in 0..num_batches(10, 4) {
            let (x, y) = batch(&s, Some(&perm), 4, i);
            let want: Vec<i64> = perm[(i * 4) as usize..((i * 4 + 4).min(10)) as usize].to_vec();
            assert_eq!(x.size(), vec![want.len() as i64, 2, 3, 3]);
            assert_eq!(
                Vec::<i64>::try_from(&y).unwrap(),
                want.iter().map(|v| v * 10).collect::<Vec<_>>()
            );
            // Every pixel of row k equals the source index.
            let px = values(&x);
            for (k, src) in want.iter().enumerate() {
                assert!(px[k * 18..(k + 1) * 18].iter().all(|&v| v == *src as f32));
            }
            seen.extend(want);
        }
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<i64>>());
    }

    #[test]
    fn ordered_batches_are_copies() {
        let s = split(5);
        let (mut x, y) = batch(&s, None, 2, 2);
        assert_eq!(x.size(), vec![1, 2, 3, 3]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![40]);
        let _ = x.fill_(-1.0);
        assert_eq!(s.images.double_value(&[4, 0, 0, 0]), 4.0);
    }

    #[test]
    #[should_panic(expected = "batch index 3 outside 0..3")]
    fn batch_index_past_end_panics() {
        let _ = batch(&split(5), None, 2, 3);
    }

    /// Naive per-sample reference: zero-pad, take the window at (dy, dx), mirror if asked.
    fn reference(x: &[f32], shape: [usize; 4], pad: usize, p: CropFlip) -> Vec<f32> {
        let [_, c, h, w] = shape;
        let mut out = vec![0.0; c * h * w];
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let jj = if p.flip { w - 1 - j } else { j };
                    let (sy, sx) = (p.dy as usize + i, p.dx as usize + jj);
                    let inside = sy >= pad && sy < pad + h && sx >= pad && sx < pad + w;
                    out[(ch * h + i) * w + j] = if inside {
                        x[(ch * h + sy - pad) * w + sx - pad]
                    } else {
                        0.0
                    };
                }
            }
        }
        out
    }

    fn random_images(shape: [i64; 4]) -> Tensor {
        tch::manual_seed(0);
        Tensor::rand(shape, (Kind::Float, tch::Device::Cpu)) + 0.5
    }

    #[test]
    fn pad_zero_gives_image_or_its_mirror() {
        let x = random_images([16, 3, 5, 7]);
        let y = augment_batch(&x, 0, 1, 2, 3);
        assert_eq!(y.size(), x.size());
        let mirrored = x.flip([3]);
        let (mut plain, mut flipped) = (0, 0);
        for b in 0..16 {
            if y.get(b).equal(&x.get(b)) {
                plain += 1;
            } else {
                assert!(y.get(b).equal(&mirrored.get(b)), "sample {b}");
                flipped += 1;
            }
        }
        assert!(plain > 0 && flipped > 0, "{plain} plain, {flipped} flipped");
    }

    #[test]
    fn padded_crop_matches_naive_reference() {
        let shape = [32usize, 3, 8, 6];
        let x = random_images(shape.map(|d| d as i64));
        let pad = 4;
        let y = augment_batch(&x, pad, 11, 1, 9);
        assert_eq!(y.size(), x.size());
        let params = augment_params(32, pad, 11, 1, 9);
        let (xv, yv) = (values(&x), values(&y));
        let per = shape[1] * shape[2] * shape[3];
        for (b, p) in params.iter().enumerate() {
            assert!((0..=2 * pad).contains(&p.dy) && (0..=2 * pad).contains(&p.dx));
            let want = reference(&xv[b * per..(b + 1) * per], shape, pad as usize, *p);
            assert_eq!(&yv[b * per..(b + 1) * per], &want[..], "sample {b} {p:?}");
        }
        // The draws really vary.
        assert!(params.iter().any(|p| p.dy != params[0].dy));
        assert!(params.iter().any(|p| p.dx != params[0].dx));
        assert!(params.iter().any(|p| p.flip) && params.iter().any(|p| !p.flip));
    }

    #[test]
    fn each_output_is_some_window_of_the_padded_input() {
        // Independent of augment_params: search all windows and flips for a match.
        let shape = [8usize, 2, 4, 4];
        let x = random_images(shape.map(|d| d as i64));
        let pad = 2;
        let y = augment_batch(&x, pad, 3, 0, 0);
        let (xv, yv) = (values(&x), values(&y));
        let per = 2 * 4 * 4;
        for b in 0..8 {
            let got = &yv[b * per..(b + 1) * per];
            let found = (0..=2 * pad).any(|dy| {
                (0..=2 * pad).any(|dx| {
                    [false, true].into_iter().any(|flip| {
                        let p = CropFlip { dy, dx, flip };
                        reference(&xv[b * per..(b + 1) * per], shape, pad as usize, p) == got
                    })
                })
            });
            assert!(found, "sample {b} is no window of the padded input");
        }
    }

    #[test]
    fn augmentation_is_seeded_and_stateless() {
        let x = random_images([16, 3, 8, 8]);
        let a = augment_batch(&x, 4, 5, 2, 7);
        assert!(a.equal(&augment_batch(&x, 4, 5, 2, 7)));
        assert!(!a.equal(&augment_batch(&x, 4, 5, 2, 8)));
        assert!(!a.equal(&augment_batch(&x, 4, 5, 3, 7)));
        assert!(!a.equal(&augment_batch(&x, 4, 6, 2, 7)));
        assert_eq!(a.kind(), Kind::Float);
    }

    #[test]
    fn empty_batch_is_fine() {
        let x = Tensor::zeros([0, 3, 8, 8], (Kind::Float, tch::Device::Cpu));
        assert_eq!(augment_batch(&x, 4, 0, 0, 0).size(), vec![0, 3, 8, 8]);
    }
}
