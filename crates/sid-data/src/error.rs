//! The one error type of this crate.
//!
//! Every message is a single line that names the file (or directory) and the problem, so a
//! binary can print it as is and the user knows which file to fix or re-download.

use std::path::PathBuf;

/// Everything that can go wrong while loading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset directory itself is absent (usually a wrong `--data-dir` or no download yet).
    #[error("data directory {} does not exist", .0.display())]
    MissingDir(PathBuf),

    /// A file the dataset needs is absent. `also_tried` is the alternative name (the `.gz`
    /// form of an IDX file) that was looked for as well.
    #[error("missing file {}{}", .path.display(),
        .also_tried.as_ref().map_or(String::new(), |p| format!(" (nor {})", p.display())))]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
        /// Another accepted name for the same file, also absent.
        also_tried: Option<PathBuf>,
    },

    /// Reading or decompressing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error (includes gzip corruption).
        source: std::io::Error,
    },

    /// An IDX file starts with the wrong magic number: usually images and labels swapped, or
    /// not an IDX file at all.
    #[error("{}: wrong magic number 0x{found:08x}, expected 0x{expected:08x} ({what})", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The magic number read.
        found: u32,
        /// The magic number required.
        expected: u32,
        /// What kind of file the magic stands for, e.g. "IDX images".
        what: &'static str,
    },

    /// A file holds fewer bytes than its header (or record size) requires.
    #[error("{}: truncated: {detail}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        detail: String,
    },

    /// A file holds no records at all.
    #[error("{}: empty file, holds no records", .0.display())]
    Empty(PathBuf),

    /// The images in a file have a different size than the dataset kind implies.
    #[error("{}: images are {rows}x{cols}, expected {expected}x{expected} for {dataset}", .path.display())]
    WrongImageSize {
        /// The file.
        path: PathBuf,
        /// Rows per image found in the header.
        rows: u32,
        /// Columns per image found in the header.
        cols: u32,
        /// The side length the dataset requires.
        expected: i64,
        /// The dataset name.
        dataset: &'static str,
    },

    /// The image file and the label file of one split disagree on the sample count.
    #[error("{}: {images} images but {labels} labels in {}", .images_path.display(), .labels_path.display())]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// Number of images it holds.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// Number of labels it holds.
        labels: usize,
    },

    /// A label does not name one of the dataset's classes.
    #[error("{}: {which} {label} at index {index} is outside 0..{num_classes}", .path.display())]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// "label", or "coarse label" for CIFAR-100's superclass byte.
        which: &'static str,
        /// The value read.
        label: u8,
        /// Index of the sample within the file.
        index: usize,
        /// Number of classes: valid labels are `0..num_classes`.
        num_classes: i64,
    },

    /// A dataset name that is none of [`crate::DatasetKind::ALL`]; the message lists the
    /// valid names so the user can fix the flag or config at once.
    #[error(
        "unknown dataset {0:?}, expected one of: fashion-mnist, mnist, cifar10, cifar100, folder"
    )]
    UnknownDataset(String),

    /// An image of a folder data set cannot be read or decoded (corrupt, truncated, or not
    /// really a PNG / JPEG).
    #[error("{}: cannot decode image: {reason}", .path.display())]
    BadImage {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },

    /// A class folder of a folder data set holds no PNG or JPEG file.
    #[error("class folder {} holds no PNG or JPEG images", .0.display())]
    EmptyClass(PathBuf),

    /// A test (or validation) image belongs to a class the training split does not have, so
    /// no label index exists for it.
    #[error("{}: class {class:?} does not exist in the training split", .path.display())]
    UnknownClass {
        /// The test class folder, or the annotation file naming the class.
        path: PathBuf,
        /// The class name.
        class: String,
    },

    /// A folder data set lacks a split: no `train/`, or neither `test/` nor `val/`.
    #[error("{}: {what}", .dir.display())]
    MissingSplit {
        /// The data directory.
        dir: PathBuf,
        /// Which split is missing and the layouts that were looked for.
        what: &'static str,
    },

    /// A line of a Tiny-ImageNet annotation or class list cannot be parsed.
    #[error("{}: line {line}: {detail}", .path.display())]
    BadAnnotation {
        /// The annotation file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        detail: String,
    },

    /// A folder data set has more classes than the one-byte labels can number.
    #[error("{}: {count} classes, at most 256 are supported", .dir.display())]
    TooManyClasses {
        /// The folder holding the class folders.
        dir: PathBuf,
        /// How many classes were found.
        count: usize,
    },

    /// A [`crate::LoadOptions`] value is out of range or leaves an empty split.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// A libtorch operation failed while building tensors.
    #[error("tensor error: {0}")]
    Torch(#[from] tch::TchError),
}

impl DataError {
    /// A file that is absent, with no other name tried.
    pub(crate) fn missing(path: impl Into<PathBuf>) -> Self {
        let (path, also_tried) = (path.into(), None);
        DataError::MissingFile { path, also_tried }
    }

    /// Wraps an I/O error together with the file it happened on (std's errors omit the path).
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        DataError::Io { path, source }
    }
}
