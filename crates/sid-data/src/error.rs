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

    /// What a file or folder holds does not fit the data set: fewer bytes than its header (or
    /// record size) requires (`truncated: …`), an image that cannot be decoded (`cannot decode
    /// image: …`, what the decoder said), images of another size, images and labels that
    /// disagree in count, a label outside the classes, a folder data set without a split (no
    /// `train/`, or neither `test/` nor `val/`) or without classes, a test class the training
    /// split lacks, more classes than one-byte labels can number, a line of a Tiny-ImageNet
    /// annotation that cannot be parsed.
    #[error("{}: {detail}", .path.display())]
    Content {
        /// The file or folder.
        path: PathBuf,
        /// What does not fit, with the values found and expected.
        detail: String,
    },

    /// A file holds no records at all.
    #[error("{}: empty file, holds no records", .0.display())]
    Empty(PathBuf),

    /// A dataset name that is none of [`crate::DatasetKind`]'s; the message lists the
    /// valid names so the user can fix the flag or config at once.
    #[error(
        "unknown dataset {0:?}, expected one of: fashion-mnist, mnist, cifar10, cifar100, folder"
    )]
    UnknownDataset(String),

    /// A class folder of a folder data set holds no PNG or JPEG file.
    #[error("class folder {} holds no PNG or JPEG images", .0.display())]
    EmptyClass(PathBuf),

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

    /// What `path` holds does not fit the data set, as `detail` says.
    pub(crate) fn content(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        let (path, detail) = (path.into(), detail.into());
        DataError::Content { path, detail }
    }

    /// Wraps an I/O error together with the file it happened on (std's errors omit the path).
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        DataError::Io { path, source }
    }
}
