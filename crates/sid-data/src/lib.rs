//! Datasets for sid.
//!
//! Loads MNIST and Fashion-MNIST (IDX files, plain or gzip), CIFAR-10/100 (binary
//! versions) and the user's own PNG / JPEG images in class folders (ImageFolder or
//! Tiny-ImageNet layout, decoded in parallel and cached) into normalised CPU tensors, with
//! an optional training limit, validation hold-out and symmetric label noise ([`load`]); and
//! provides stateless, seedable epoch orders, mini-batches and crop+flip augmentation
//! ([`epoch_permutation`], [`batch`], [`augment_batch`]) so resumed runs reproduce the
//! original ones exactly.
//!
//! This is a library: it neither prints nor parses arguments; every failure is a
//! [`DataError`] whose one-line message names the file and the problem.

#![warn(missing_docs)]

mod batch;
mod cifar;
mod dataset;
mod error;
mod folder;
mod idx;
mod kind;
mod raw;

pub use batch::{augment_batch, augment_params, batch, epoch_permutation, num_batches, CropFlip};
pub use dataset::{load, Dataset, InputSpec, LoadOptions, Split};
pub use error::DataError;
pub use folder::{CacheStatus, FolderInfo, Layout, DEFAULT_IMAGE_SIZE};
pub use kind::{DatasetKind, Shape};

#[cfg(test)]
mod testutil;
