//! The supported datasets and their fixed properties.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DataError;

/// One of the four image-classification datasets sid can train on.
///
/// Serialised (and displayed) by its kebab-case name, e.g. `"fashion-mnist"`, so configs and
/// run records stay readable and stable if variants are reordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetKind {
    /// Zalando's Fashion-MNIST: 28x28 grey clothing images, 10 classes, IDX format.
    #[serde(rename = "fashion-mnist", alias = "fashion_mnist", alias = "fmnist")]
    FashionMnist,
    /// LeCun's handwritten digits: 28x28 grey, 10 classes, IDX format.
    #[serde(rename = "mnist")]
    Mnist,
    /// CIFAR-10: 32x32 RGB, 10 classes, binary version.
    #[serde(rename = "cifar10", alias = "cifar-10")]
    Cifar10,
    /// CIFAR-100: 32x32 RGB, 100 fine classes, binary version.
    #[serde(rename = "cifar100", alias = "cifar-100")]
    Cifar100,
}

impl DatasetKind {
    /// Every dataset, in the order they are listed in help texts.
    pub const ALL: [DatasetKind; 4] = [
        DatasetKind::FashionMnist,
        DatasetKind::Mnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
    ];

    /// The canonical kebab-case name, as accepted on the command line and written to configs.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
        }
    }

    /// Number of classes (CIFAR-100 uses its 100 fine labels).
    pub fn num_classes(&self) -> i64 {
        match self {
            DatasetKind::Cifar100 => 100,
            _ => 10,
        }
    }

    /// Colour channels per image.
    pub fn channels(&self) -> i64 {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => 1,
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => 3,
        }
    }

    /// Side length of the square images.
    pub fn image_size(&self) -> i64 {
        match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => 28,
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => 32,
        }
    }

    /// Where the dataset is looked for when no directory is given. The MNIST-likes live in a
    /// system-wide location on the lab machines; CIFAR is unpacked into the project's `data/`.
    pub fn default_dir(&self) -> PathBuf {
        PathBuf::from(match self {
            DatasetKind::FashionMnist => "/usr/share/datasets/fashion-mnist",
            DatasetKind::Mnist => "/usr/share/datasets/mnist",
            DatasetKind::Cifar10 => "data/cifar-10-batches-bin",
            DatasetKind::Cifar100 => "data/cifar-100-binary",
        })
    }

    /// Per-channel mean and standard deviation of the training pixels (in 0..1), used to
    /// normalise inputs to roughly zero mean and unit variance. These are the usual published
    /// values, so results stay comparable with other work.
    pub fn mean_std(&self) -> (&'static [f64], &'static [f64]) {
        match self {
            DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
            DatasetKind::Mnist => (&[0.1307], &[0.3081]),
            DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
        }
    }

    /// Whether crop+flip augmentation is on unless asked otherwise: it is standard for CIFAR,
    /// while flipping digits would change their meaning.
    pub fn augments_by_default(&self) -> bool {
        matches!(self, DatasetKind::Cifar10 | DatasetKind::Cifar100)
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;

    /// Accepts the canonical names plus common spellings (`fashion_mnist`, `fmnist`,
    /// `cifar-10`, `cifar-100`), case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fashion-mnist" | "fashion_mnist" | "fmnist" => Ok(DatasetKind::FashionMnist),
            "mnist" => Ok(DatasetKind::Mnist),
            "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
            "cifar100" | "cifar-100" => Ok(DatasetKind::Cifar100),
            _ => Err(DataError::UnknownDataset(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_and_display() {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.name().parse::<DatasetKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(
            "fashion_mnist".parse::<DatasetKind>().unwrap(),
            DatasetKind::FashionMnist
        );
        assert_eq!(
            "fmnist".parse::<DatasetKind>().unwrap(),
            DatasetKind::FashionMnist
        );
        assert_eq!(
            "cifar-10".parse::<DatasetKind>().unwrap(),
            DatasetKind::Cifar10
        );
        assert_eq!(
            "CIFAR-100".parse::<DatasetKind>().unwrap(),
            DatasetKind::Cifar100
        );
    }

    #[test]
    fn parse_error_lists_valid_names() {
        let msg = "imagenet".parse::<DatasetKind>().unwrap_err().to_string();
        assert!(msg.contains("\"imagenet\""), "{msg}");
        for kind in DatasetKind::ALL {
            assert!(msg.contains(kind.name()), "{msg}");
        }
    }

    #[test]
    fn serde_uses_kebab_names() {
        for kind in DatasetKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<DatasetKind>(&json).unwrap(), kind);
        }
        assert_eq!(
            serde_json::from_str::<DatasetKind>("\"cifar-100\"").unwrap(),
            DatasetKind::Cifar100
        );
    }

    #[test]
    fn properties_match_the_datasets() {
        use DatasetKind::*;
        let rows: [(DatasetKind, i64, i64, i64, bool); 4] = [
            (FashionMnist, 10, 1, 28, false),
            (Mnist, 10, 1, 28, false),
            (Cifar10, 10, 3, 32, true),
            (Cifar100, 100, 3, 32, true),
        ];
        for (kind, classes, channels, size, aug) in rows {
            assert_eq!(kind.num_classes(), classes);
            assert_eq!(kind.channels(), channels);
            assert_eq!(kind.image_size(), size);
            assert_eq!(kind.augments_by_default(), aug);
            let (mean, std) = kind.mean_std();
            assert_eq!(mean.len() as i64, channels);
            assert_eq!(std.len() as i64, channels);
        }
        assert_eq!(Mnist.mean_std().0, &[0.1307]);
        assert_eq!(Cifar10.mean_std().1, &[0.2470, 0.2435, 0.2616]);
        assert_eq!(
            FashionMnist.default_dir(),
            PathBuf::from("/usr/share/datasets/fashion-mnist")
        );
        assert_eq!(
            Cifar100.default_dir(),
            PathBuf::from("data/cifar-100-binary")
        );
    }
}
