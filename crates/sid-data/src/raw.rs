//! The in-memory form of a split before it becomes tensors.
//!
//! Limits, validation splits and label noise are applied to these plain byte vectors, so the
//! float tensors are built once, at the final size, instead of being sliced and copied.

/// Which of a built-in data set's two splits to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Train,
    Test,
}

/// Images as raw bytes and labels as class indices, both in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RawSplit {
    /// `len() * sample_len` bytes; each image is channel-major `[C, H, W]`.
    pub pixels: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u8>,
}

impl RawSplit {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Keeps only the first `n` samples (no-op when there are fewer).
    pub fn truncate(&mut self, n: usize, sample_len: usize) {
        self.labels.truncate(n);
        self.pixels.truncate(n.saturating_mul(sample_len));
    }

    /// Removes and returns the last `k` samples.
    pub fn split_off_last(&mut self, k: usize, sample_len: usize) -> RawSplit {
        let keep = self.len() - k;
        RawSplit {
            labels: self.labels.split_off(keep),
            pixels: self.pixels.split_off(keep * sample_len),
        }
    }

    /// This split with another appended (used to join the CIFAR-10 training batches).
    pub fn joined(mut self, other: RawSplit) -> RawSplit {
        self.pixels.extend_from_slice(&other.pixels);
        self.labels.extend_from_slice(&other.labels);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_and_split_keep_pixels_and_labels_aligned() {
        let mut raw = RawSplit {
            pixels: (0..12).collect(),
            labels: vec![0, 1, 2, 3, 4, 5],
        };
        raw.truncate(5, 2);
        assert_eq!(raw.labels, vec![0, 1, 2, 3, 4]);
        assert_eq!(raw.pixels, (0..10).collect::<Vec<u8>>());
        let tail = raw.split_off_last(2, 2);
        assert_eq!(raw.labels, vec![0, 1, 2]);
        assert_eq!(raw.pixels, (0..6).collect::<Vec<u8>>());
        assert_eq!(tail.labels, vec![3, 4]);
        assert_eq!(tail.pixels, (6..10).collect::<Vec<u8>>());
        raw.truncate(100, 2);
        assert_eq!(raw.len(), 3);
    }
}
