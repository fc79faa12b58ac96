//! The supported datasets and their fixed properties.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// Side length, channels and class count of a data set's samples: what the model's input and
/// output layers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape {
    /// Colour channels per image (1 grey, 3 RGB).
    pub channels: i64,
    /// Side length of the square images.
    pub image_size: i64,
    /// Number of classes; labels are `0..num_classes`.
    pub num_classes: i64,
}

impl Shape {
    /// Bytes (and floats) per image: `channels * image_size^2`.
    pub fn sample_len(&self) -> usize {
        (self.channels * self.image_size * self.image_size) as usize
    }
}

/// One of the image-classification datasets sid can train on: four built-in ones with fixed
/// shapes, and [`DatasetKind::Folder`], the user's own images, whose shape is known only once
/// loaded.
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
    /// The user's own PNG / JPEG images in class folders (ImageFolder or Tiny-ImageNet
    /// layout, see `folder.rs`); classes, channels and size come from the files.
    #[serde(rename = "folder")]
    Folder,
}

impl DatasetKind {
    /// The canonical kebab-case name, as accepted on the command line and written to configs.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Folder => "folder",
        }
    }

    /// The fixed shape of a built-in data set (CIFAR-100 uses its 100 fine labels); `None`
    /// for [`DatasetKind::Folder`], whose shape is [`crate::Dataset::spec`] once loaded.
    pub fn shape(&self) -> Option<Shape> {
        let (channels, image_size, num_classes) = match self {
            DatasetKind::FashionMnist | DatasetKind::Mnist => (1, 28, 10),
            DatasetKind::Cifar10 => (3, 32, 10),
            DatasetKind::Cifar100 => (3, 32, 100),
            DatasetKind::Folder => return None,
        };
        Some(Shape {
            channels,
            image_size,
            num_classes,
        })
    }

    /// Where the dataset is looked for when no directory is given. The MNIST-likes live in a
    /// system-wide location on the lab machines; CIFAR is unpacked into the project's `data/`.
    pub fn default_dir(&self) -> PathBuf {
        PathBuf::from(match self {
            DatasetKind::FashionMnist => "/usr/share/datasets/fashion-mnist",
            DatasetKind::Mnist => "/usr/share/datasets/mnist",
            DatasetKind::Cifar10 => "data/cifar-10-batches-bin",
            DatasetKind::Cifar100 => "data/cifar-100-binary",
            DatasetKind::Folder => "data/images",
        })
    }

    /// Per-channel mean and standard deviation of the training pixels (in 0..1), used to
    /// normalise inputs to roughly zero mean and unit variance. These are the usual published
    /// values, so results stay comparable with other work. `None` for
    /// [`DatasetKind::Folder`]: its statistics are computed from its training images.
    pub fn mean_std(&self) -> Option<(&'static [f64], &'static [f64])> {
        Some(match self {
            DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
            DatasetKind::Mnist => (&[0.1307], &[0.3081]),
            DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
            DatasetKind::Folder => return None,
        })
    }

    /// The published class names by label; empty for [`DatasetKind::Folder`], whose names
    /// are its class folders ([`crate::Dataset::spec`]).
    pub fn class_names(&self) -> &'static [&'static str] {
        match self {
            DatasetKind::FashionMnist => &FASHION_MNIST_CLASSES,
            DatasetKind::Mnist => &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            DatasetKind::Cifar10 => &CIFAR10_CLASSES,
            DatasetKind::Cifar100 => &CIFAR100_CLASSES,
            DatasetKind::Folder => &[],
        }
    }

    /// Whether crop+flip augmentation is on unless asked otherwise: it is standard for CIFAR,
    /// while flipping digits would change their meaning. Off for folder data sets, since
    /// whether a flip keeps an image's class depends on the images (`--augment` turns it on).
    pub fn augments_by_default(&self) -> bool {
        matches!(self, DatasetKind::Cifar10 | DatasetKind::Cifar100)
    }
}

/// Zalando's names, by label.
const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The names given as words, in order, as a `[&str; N]` (each word is one name; these name
/// lists have no spaces), so a long table of short names stays readable.
macro_rules! names {
    ($($name:ident)*) => {
        [$(stringify!($name)),*]
    };
}

/// `batches.meta.txt` of the binary version, by label.
const CIFAR10_CLASSES: [&str; 10] = names![
    airplane automobile bird cat deer dog frog horse ship truck
];

/// `fine_label_names.txt` of the binary version, by label.
const CIFAR100_CLASSES: [&str; 100] = names![
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
    cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
    lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
    oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
    possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
    spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
    train trout tulip turtle wardrobe whale willow_tree wolf woman worm
];

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
        // The serde names and aliases are the one list of accepted spellings.
        let name = s.trim().to_ascii_lowercase();
        Self::deserialize(name.as_str().into_deserializer())
            .map_err(|_: serde::de::value::Error| DataError::UnknownDataset(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every dataset, in the order they are listed in help texts.
    const ALL: [DatasetKind; 5] = [
        DatasetKind::FashionMnist,
        DatasetKind::Mnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::Folder,
    ];

    #[test]
    fn names_round_trip_through_from_str_and_display() {
        for kind in ALL {
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
        for kind in ALL {
            assert!(msg.contains(kind.name()), "{msg}");
        }
    }

    #[test]
    fn serde_uses_kebab_names() {
        for kind in ALL {
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
            let shape = kind.shape().unwrap();
            assert_eq!(shape.num_classes, classes);
            assert_eq!(shape.channels, channels);
            assert_eq!(shape.image_size, size);
            assert_eq!(shape.sample_len() as i64, channels * size * size);
            assert_eq!(kind.augments_by_default(), aug);
            assert_eq!(kind.class_names().len() as i64, classes);
            let (mean, std) = kind.mean_std().unwrap();
            assert_eq!(mean.len() as i64, channels);
            assert_eq!(std.len() as i64, channels);
        }
        // A folder's shape and statistics come from its files.
        assert_eq!(Folder.shape(), None);
        assert_eq!(Folder.mean_std(), None);
        assert!(!Folder.augments_by_default());
        // The word tables keep the published names and order.
        assert_eq!(Cifar10.class_names()[0], "airplane");
        assert_eq!(Cifar10.class_names()[9], "truck");
        assert_eq!(Cifar100.class_names()[1], "aquarium_fish");
        assert_eq!(Cifar100.class_names()[41], "lawn_mower");
        assert_eq!(Cifar100.class_names()[99], "worm");
        assert_eq!(Mnist.mean_std().unwrap().0, &[0.1307]);
        assert_eq!(Cifar10.mean_std().unwrap().1, &[0.2470, 0.2435, 0.2616]);
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
