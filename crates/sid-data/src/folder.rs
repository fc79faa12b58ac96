//! The user's own images: PNG and JPEG files in class folders.
//!
//! Two layouts are recognised, automatically:
//!
//! * **ImageFolder**: `DIR/train/<class>/*` and `DIR/test/<class>/*` (or `DIR/val/<class>/*`
//!   when there is no `test/`). Classes are the training folder names, sorted; a test folder
//!   may hold fewer classes but none that training lacks.
//! * **Tiny-ImageNet**: chosen when `DIR/wnids.txt` or `DIR/val/val_annotations.txt` exists.
//!   Training images are `train/<wnid>/images/*`, classes are the lines of `wnids.txt` (or the
//!   sorted training folders), and the test split is `val/images/*` labelled by
//!   `val/val_annotations.txt` (tab-separated: file, wnid, box…). Its unlabelled `test/` is
//!   not used.
//!
//! Only files named `*.png`, `*.jpg` or `*.jpeg` (any case, not hidden) count as images. Every
//! image is decoded in parallel (rayon), resized to fill `size x size` (shorter side to `size`
//! with a triangle filter, then centre-cropped; images already that size are kept as they are)
//! and converted to RGB, or kept grey (one channel) when **every** image of both splits is
//! stored as greyscale, so a grey data set costs a third of the memory and a colour one never
//! loses its colour. Alpha is dropped.
//!
//! The training images are stored in a fixed shuffled order (not the run seed), so that
//! `limit_train` and the validation hold-out, which take the first and last samples, draw from
//! every class. The decoded bytes are cached in one file whose key covers every file's path,
//! label, size and modification time and the image size: the next load with the same files
//! reads the cache and decodes nothing; any change to the files rebuilds it.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use image::imageops::FilterType;
use image::ImageReader;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::raw::RawSplit;
use crate::{DataError, Shape};

/// Side length folder images are resized to when none is asked for: CIFAR's, so the reference
/// SimpleCNN costs what it costs on CIFAR. Tiny-ImageNet's full resolution is 64.
pub const DEFAULT_IMAGE_SIZE: i64 = 32;

/// Largest accepted side length: 1024² RGB bytes per image is already 3 MiB.
pub(crate) const MAX_IMAGE_SIZE: i64 = 1024;

/// First bytes of a cache file; the digit is the format version.
const CACHE_MAGIC: &[u8; 8] = b"SIDIMG01";

/// Seed of the fixed training order ("ORDER" in ASCII): independent of the run seed so the
/// cache serves every run.
const ORDER_SEED: u64 = 0x4f_5244_4552;

/// Which on-disk layout a folder data set has; the value is its code in the cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `train/<class>/*`, `test/<class>/*` or `val/<class>/*`.
    ImageFolder = 0,
    /// `train/<wnid>/images/*`, `val/images/*` + `val/val_annotations.txt`, `wnids.txt`.
    TinyImageNet = 1,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::ImageFolder => "ImageFolder",
            Layout::TinyImageNet => "Tiny-ImageNet",
        })
    }
}

/// Where the decoded images came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Read from this cache file; no image was decoded.
    Hit(PathBuf),
    /// Decoded, then written to this cache file for the next load.
    Written(PathBuf),
    /// Decoded; no cache directory was given.
    Off,
}

/// How a folder data set was loaded, for the user to see.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderInfo {
    /// The layout detected.
    pub layout: Layout,
    /// Images in the training folder(s), before any limit or hold-out.
    pub train_images: usize,
    /// Images in the test (or validation) folder(s).
    pub test_images: usize,
    /// Whether the cache was read, written or not used.
    pub cache: CacheStatus,
    /// Seconds spent listing, decoding (or reading the cache) and writing the cache.
    pub seconds: f64,
}

impl fmt::Display for FolderInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, s) = (self.train_images + self.test_images, self.seconds);
        write!(f, "{} layout, ", self.layout)?;
        match &self.cache {
            CacheStatus::Hit(p) => {
                let p = p.display();
                write!(
                    f,
                    "cache hit: {n} images read from {p} in {s:.2} s, none decoded"
                )
            }
            CacheStatus::Written(p) => {
                let p = p.display();
                write!(f, "decoded {n} images in {s:.2} s, cache written to {p}")
            }
            CacheStatus::Off => write!(f, "decoded {n} images in {s:.2} s (no cache)"),
        }
    }
}

/// The files of a folder data set and their labels, in storage order.
#[derive(Debug)]
struct Listing {
    layout: Layout,
    classes: Vec<String>,
    train: Vec<(PathBuf, u8)>,
    test: Vec<(PathBuf, u8)>,
}

/// A folder data set's shape and its two splits as raw bytes, before limits and
/// normalisation.
pub(crate) type Images = (Shape, RawSplit, RawSplit);

/// Loads the folder data set in `dir` at `size x size`, from the cache in `cache_dir` when it
/// is current, otherwise by decoding (and then writing the cache there); returns the images,
/// the class names and how they were loaded.
pub(crate) fn read(
    dir: &Path,
    size: i64,
    cache_dir: Option<&Path>,
) -> Result<(Images, Vec<String>, FolderInfo), DataError> {
    let started = Instant::now();
    let listing = list(dir)?;
    let key = cache_key(dir, &listing, size)?;
    // Both splits as one, training images first, as they are decoded and cached.
    let ((shape, mut train), cache) = match cache_dir.map(|d| d.join(cache_file_name(dir, size))) {
        None => (decode_all(&listing, size)?, CacheStatus::Off),
        Some(path) => match read_cache(&path, key, &listing, size) {
            Some(images) => (images, CacheStatus::Hit(path)),
            None => {
                let (shape, all) = decode_all(&listing, size)?;
                let mut head = cache_header(key, shape, &listing);
                // The labels are small: they go out with the header.
                head.extend(&all.labels);
                write_atomically(&path, &[&head[..], &all.pixels])?;
                ((shape, all), CacheStatus::Written(path))
            }
        },
    };
    let test = train.split_off_last(listing.test.len(), shape.sample_len());
    let info = FolderInfo {
        layout: listing.layout,
        train_images: listing.train.len(),
        test_images: listing.test.len(),
        cache,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(((shape, train, test), listing.classes, info))
}

/// Finds the layout, the classes and every image with its label (`load` has checked that
/// `dir` exists).
fn list(dir: &Path) -> Result<Listing, DataError> {
    let train_dir = dir.join("train");
    if !train_dir.is_dir() {
        return Err(DataError::content(
            dir,
            "no train/ folder (expected train/<class>/<images> with test/ or val/ beside it, or Tiny-ImageNet's train/<wnid>/images/)",
        ));
    }
    let wnids = dir.join("wnids.txt");
    let tiny = wnids.is_file() || dir.join("val/val_annotations.txt").is_file();
    let classes = if tiny && wnids.is_file() {
        read_text(&wnids)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    } else {
        subdirs(&train_dir)?
    };
    // Classes are refused when there are none (the message says where they were looked for)
    // or more than labels stored as one byte, as for the built-in data sets, can number.
    let refused = match classes.len() {
        1..=256 => None,
        0 if tiny => Some("holds no class folders (and wnids.txt names none)".into()),
        0 => Some("holds no class folders".into()),
        n => Some(format!("{n} classes, at most 256 are supported")),
    };
    if let Some(detail) = refused {
        return Err(DataError::content(train_dir, detail));
    }
    let mut train = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut folder = train_dir.join(class);
        if tiny {
            folder.push("images");
        }
        train.extend(images_in(&folder, label)?);
    }
    // Fixed, class-mixing order: see the module documentation.
    train.shuffle(&mut ChaCha8Rng::seed_from_u64(ORDER_SEED));
    let (layout, test) = match tiny {
        true => (Layout::TinyImageNet, tiny_imagenet_test(dir, &classes)?),
        false => (Layout::ImageFolder, image_folder_test(dir, &classes)?),
    };
    Ok(Listing {
        layout,
        classes,
        train,
        test,
    })
}

/// ImageFolder's test split: `test/<class>/*`, or `val/<class>/*` when there is no `test/`.
fn image_folder_test(dir: &Path, classes: &[String]) -> Result<Vec<(PathBuf, u8)>, DataError> {
    let test_dir = ["test", "val"]
        .iter()
        .map(|s| dir.join(s))
        .find(|d| d.is_dir())
        .ok_or_else(|| DataError::content(
            dir,
            "no test/ or val/ folder beside train/ (expected test/<class>/<images> or val/<class>/<images>)",
        ))?;
    let test_classes = subdirs(&test_dir)?;
    if test_classes.is_empty() {
        return Err(DataError::content(test_dir, "holds no class folders"));
    }
    let mut test = Vec::new();
    for class in test_classes {
        let path = test_dir.join(&class);
        let Some(label) = classes.iter().position(|c| *c == class) else {
            return Err(unknown_class(path, &class));
        };
        test.extend(images_in(&path, label)?);
    }
    Ok(test)
}

/// Tiny-ImageNet's test split: `val/images/*`, labelled by `val/val_annotations.txt`.
fn tiny_imagenet_test(dir: &Path, classes: &[String]) -> Result<Vec<(PathBuf, u8)>, DataError> {
    let ann = dir.join("val").join("val_annotations.txt");
    if !ann.is_file() {
        return Err(DataError::content(
            dir,
            "Tiny-ImageNet layout (wnids.txt) but no val/val_annotations.txt to label the validation images with",
        ));
    }
    let images = dir.join("val").join("images");
    let mut test = Vec::new();
    for (i, line) in read_text(&ann)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split('\t');
        let (Some(file), Some(wnid)) = (fields.next(), fields.next()) else {
            let detail = format!("line {}: expected FILE<tab>WNID<tab>box…", i + 1);
            return Err(DataError::content(ann, detail));
        };
        let Some(label) = classes.iter().position(|c| c == wnid.trim()) else {
            return Err(unknown_class(ann, wnid.trim()));
        };
        let path = images.join(file.trim());
        if !path.is_file() {
            return Err(DataError::missing(path));
        }
        test.push((path, label as u8));
    }
    if test.is_empty() {
        return Err(DataError::Empty(ann));
    }
    Ok(test)
}

/// A test image's class (its folder, or its annotation in the file `path`) that the training
/// split lacks, so no label exists for it.
fn unknown_class(path: PathBuf, class: &str) -> DataError {
    let detail = format!("class {class:?} does not exist in the training split");
    DataError::content(path, detail)
}

fn read_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

/// The non-hidden entries of `dir` as (name, path), sorted; none when `dir` is not a folder
/// (a missing class folder is a class without images, as an empty one is).
fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Names of the non-hidden folders in `dir`, sorted.
fn subdirs(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut dirs = entries(dir)?;
    dirs.retain(|(_, path)| path.is_dir());
    Ok(dirs.into_iter().map(|(name, _)| name).collect())
}

/// The PNG and JPEG files in `folder`, sorted by name, each with `label`; an error when there
/// are none (a missing folder is a class without images, as an empty one is).
fn images_in(folder: &Path, label: usize) -> Result<Vec<(PathBuf, u8)>, DataError> {
    let mut images = entries(folder)?;
    images.retain(|(name, path)| {
        let name = name.to_ascii_lowercase();
        [".png", ".jpg", ".jpeg"].iter().any(|e| name.ends_with(e)) && path.is_file()
    });
    if images.is_empty() {
        return Err(DataError::EmptyClass(folder.to_path_buf()));
    }
    Ok(images
        .into_iter()
        .map(|(_, path)| (path, label as u8))
        .collect())
}

/// Interleaved RGB bytes as channel-major planes: three, or one grey plane. Grey is the luma
/// of the three channels, which for a greyscale file (three equal channels, as every image of
/// a grey folder data set is) is its own value, bit for bit.
pub(crate) fn planes(rgb: &[u8], channels: i64) -> Vec<u8> {
    if channels == 1 {
        // The `image` crate's Rec. 709 integer luma; the weights sum to 10000.
        let luma = |p: &[u8]| {
            let y = 2126 * u32::from(p[0]) + 7152 * u32::from(p[1]) + 722 * u32::from(p[2]);
            (y / 10000) as u8
        };
        rgb.chunks_exact(3).map(luma).collect()
    } else {
        (0..3)
            .flat_map(|c| rgb.chunks_exact(3).map(move |p| p[c]))
            .collect()
    }
}

/// One image file decoded and resized: `size * size * 3` RGB bytes (row-major, interleaved)
/// and whether the file was greyscale.
pub(crate) fn decode(path: &Path, size: u32) -> Result<(Vec<u8>, bool), DataError> {
    // The content decides the format (a JPEG named .png still loads); the name is the
    // fallback.
    let img = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| DataError::io(path, e))?
        .decode()
        // Some decoder messages span lines; the error must stay one line.
        .map_err(|e| {
            let reason = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            DataError::content(path, format!("cannot decode image: {reason}"))
        })?;
    let grey = !img.color().has_color();
    let img = if img.width() == size && img.height() == size {
        img
    } else {
        img.resize_to_fill(size, size, FilterType::Triangle)
    };
    Ok((img.to_rgb8().into_raw(), grey))
}

/// Decodes every image in parallel and lays them out channel-major, 1 or 3 channels: the
/// training images, then the test images.
fn decode_all(listing: &Listing, size: i64) -> Result<(Shape, RawSplit), DataError> {
    let files = || listing.train.par_iter().chain(&listing.test);
    let decoded = files()
        .map(|(path, _)| decode(path, size as u32))
        .collect::<Result<Vec<_>, _>>()?;
    let grey = decoded.iter().all(|(_, grey)| *grey);
    let shape = folder_shape(if grey { 1 } else { 3 }, size, listing);
    let mut pixels = Vec::with_capacity(decoded.len() * shape.sample_len());
    for (rgb, _) in decoded {
        pixels.extend(planes(&rgb, shape.channels));
    }
    let labels = files().map(|(_, label)| *label).collect();
    Ok((shape, RawSplit { pixels, labels }))
}

fn folder_shape(channels: i64, size: i64, listing: &Listing) -> Shape {
    Shape {
        channels,
        image_size: size,
        num_classes: listing.classes.len() as i64,
    }
}

/// FNV-1a, 64 bit: a stable hash (std's `DefaultHasher` may change between Rust releases,
/// which would needlessly invalidate caches).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Appends a length-prefixed field, so that ("ab", "c") and ("a", "bc") hash apart.
fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_le_bytes());
    out.extend_from_slice(field);
}

/// The key a cache must carry to be used: the format, layout, image size, classes, and every
/// file's path (relative to `dir`), label, size and modification time.
fn cache_key(dir: &Path, listing: &Listing, size: i64) -> Result<u64, DataError> {
    let mut key = CACHE_MAGIC.to_vec();
    key.push(listing.layout as u8);
    key.extend_from_slice(&size.to_le_bytes());
    for class in &listing.classes {
        push_field(&mut key, class.as_bytes());
    }
    // One stat per file; on a network file system these add up, so they run in parallel.
    let stamps = listing
        .train
        .par_iter()
        .chain(&listing.test)
        .map(|(path, label)| {
            let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let mut stamp = Vec::new();
            let rel = path.strip_prefix(dir).unwrap_or(path);
            push_field(&mut stamp, rel.to_string_lossy().as_bytes());
            stamp.push(*label);
            stamp.extend_from_slice(&meta.len().to_le_bytes());
            stamp.extend_from_slice(&mtime.to_le_bytes());
            Ok(fnv(&stamp))
        })
        .collect::<Result<Vec<u64>, DataError>>()?;
    key.extend(stamps.iter().flat_map(|s| s.to_le_bytes()));
    Ok(fnv(&key))
}

/// One cache file per data folder and image size, so several data sets share a cache folder.
fn cache_file_name(dir: &Path, size: i64) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let hash = fnv(dir.to_string_lossy().as_bytes());
    format!("{name}-{hash:016x}-{size}px.sidcache")
}

/// A cache file's header: magic, key u64, channels u32, size u32, n_train u64, n_test u64,
/// the class names (each a u32 length and UTF-8 bytes), all little-endian. The body follows:
/// train labels, test labels, train pixels, test pixels.
fn cache_header(key: u64, shape: Shape, listing: &Listing) -> Vec<u8> {
    let mut header = CACHE_MAGIC.to_vec();
    header.extend_from_slice(&key.to_le_bytes());
    header.extend_from_slice(&(shape.channels as u32).to_le_bytes());
    header.extend_from_slice(&(shape.image_size as u32).to_le_bytes());
    header.extend_from_slice(&(listing.train.len() as u64).to_le_bytes());
    header.extend_from_slice(&(listing.test.len() as u64).to_le_bytes());
    for class in &listing.classes {
        header.extend_from_slice(&(class.len() as u32).to_le_bytes());
        header.extend_from_slice(class.as_bytes());
    }
    header
}

/// Writes `parts` one after another to `path` through a temp file in the same folder, fsync
/// and rename: a reader sees the old file or the whole new one, never a partial file; the pid
/// keeps two concurrent runs apart.
fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<(), DataError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for part in parts {
            f.write_all(part)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io(path, e)
    })
}

/// Reads the cache at `path` if it exists and its header is the one these files at this size
/// would be written with ([`cache_header`], with 1 or 3 channels); anything else (absent,
/// stale, truncated, trailing bytes) is a miss, and the images are decoded again. Returns
/// both splits as one, as [`decode_all`] does.
fn read_cache(path: &Path, key: u64, listing: &Listing, size: i64) -> Option<(Shape, RawSplit)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let file_len = file.metadata().ok()?.len();
    // Straight into the final buffers: a Tiny-ImageNet cache is over a GB, so no copy (but
    // of the test images, split off the end by `read`).
    let mut read = |n: usize| -> Option<Vec<u8>> {
        let mut v = vec![0u8; n];
        file.read_exact(&mut v).ok()?;
        Some(v)
    };
    let header_len = cache_header(key, folder_shape(1, size, listing), listing).len();
    let header = read(header_len)?;
    let shape = [1, 3]
        .map(|channels| folder_shape(channels, size, listing))
        .into_iter()
        .find(|&shape| cache_header(key, shape, listing) == header)?;
    let n = listing.train.len() + listing.test.len();
    if file_len != (header_len + n * (1 + shape.sample_len())) as u64 {
        return None;
    }
    // The file's order: both label runs, then both pixel runs.
    let labels = read(n)?;
    let pixels = read(n * shape.sample_len())?;
    Some((shape, RawSplit { pixels, labels }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load, DatasetKind, LoadOptions};

    /// Bytes of a cache file's fixed header: magic, key, channels, size, two counts.
    const HEADER_LEN: usize = 8 + 8 + 4 + 4 + 8 + 8;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    /// Writes a `w x h` image of one colour; the format follows the extension.
    fn solid(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, Rgb(rgb)).save(path).unwrap();
    }

    fn grey(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, Luma([v])).save(path).unwrap();
    }

    /// ImageFolder: `cat` red PNGs, `dog` green JPEGs (not square), `emu` blue PNGs; the test
    /// split has cat and emu only.
    fn image_folder(dir: &Path, test: &str) {
        for i in 0..4 {
            solid(&dir.join(format!("train/cat/{i}.png")), 12, 12, [250, 0, 0]);
            solid(&dir.join(format!("train/dog/{i}.JPG")), 10, 14, [0, 200, 0]);
            solid(&dir.join(format!("train/emu/{i}.png")), 12, 12, [0, 0, 150]);
        }
        solid(&dir.join(format!("{test}/cat/t.png")), 12, 12, [250, 0, 0]);
        solid(&dir.join(format!("{test}/emu/t.png")), 8, 8, [0, 0, 150]);
        solid(&dir.join(format!("{test}/emu/u.png")), 8, 8, [0, 0, 150]);
        // Not images: ignored.
        std::fs::write(dir.join("train/cat/notes.txt"), "x").unwrap();
        std::fs::write(dir.join("train/cat/.hidden.png"), "x").unwrap();
    }

    fn opts(size: i64, cache: Option<&Path>) -> LoadOptions {
        LoadOptions {
            image_size: Some(size),
            cache_dir: cache.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    /// Whether the images came from the cache without decoding.
    fn cache_hit(info: &FolderInfo) -> bool {
        matches!(info.cache, CacheStatus::Hit(_))
    }

    fn labels(t: &tch::Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t).unwrap()
    }

    /// The raw bytes of image `i` of a split, undoing the normalisation.
    fn raw_pixel(ds: &crate::Dataset, split: &crate::Split, i: i64, c: i64) -> f64 {
        let v = split.images.double_value(&[i, c, 3, 4]);
        (v * ds.spec.std[c as usize] + ds.spec.mean[c as usize]) * 255.0
    }

    #[test]
    fn image_folder_png_and_jpeg_are_resized_rgb_with_class_names() {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "test");
        let ds = load(DatasetKind::Folder, tmp.path(), &opts(8, None)).unwrap();
        assert_eq!(ds.spec.classes, vec!["cat", "dog", "emu"]);
        let shape = Shape {
            channels: 3,
            image_size: 8,
            num_classes: 3,
        };
        assert_eq!(ds.spec.shape, shape);
        assert_eq!(ds.train.images.size(), vec![12, 3, 8, 8]);
        assert_eq!(ds.test.images.size(), vec![3, 3, 8, 8]);
        assert_eq!(labels(&ds.test.labels), vec![0, 2, 2]);
        let info = ds.folder.as_ref().unwrap();
        assert_eq!(info.layout, Layout::ImageFolder);
        assert_eq!((info.train_images, info.test_images), (12, 3));
        assert_eq!(info.cache, CacheStatus::Off);
        // Every class has 4 training images, and each image keeps its colour.
        let train = labels(&ds.train.labels);
        for class in 0..3 {
            assert_eq!(train.iter().filter(|&&l| l == class).count(), 4);
        }
        let colours = [[250.0, 0.0, 0.0], [0.0, 200.0, 0.0], [0.0, 0.0, 150.0]];
        for (i, &l) in train.iter().enumerate() {
            for c in 0..3 {
                let got = raw_pixel(&ds, &ds.train, i as i64, c);
                let want = colours[l as usize][c as usize];
                // JPEG is lossy; PNG is exact.
                assert!((got - want).abs() < 4.0, "image {i} class {l} c{c}: {got}");
            }
        }
        // The stored order mixes the classes (the first 4 are not all one class).
        assert!(train[..4].iter().any(|&l| l != train[0]), "{train:?}");
        // One file through the saved run's spec is the same input as in the loaded split.
        let spec = &ds.spec;
        let one = spec.image(&tmp.path().join("test/emu/u.png")).unwrap();
        assert_eq!(one.size(), vec![1, 3, 8, 8]);
        assert!(one.equal(&ds.test.images.narrow(0, 2, 1)));
        // The same file into a grey model: one plane, the luma.
        let grey = crate::InputSpec {
            shape: Shape {
                channels: 1,
                ..shape
            },
            mean: vec![0.0],
            std: vec![1.0],
            classes: Vec::new(),
        };
        let g = grey.image(&tmp.path().join("test/emu/u.png")).unwrap();
        assert_eq!(g.size(), vec![1, 1, 8, 8]);
        let want = f64::from(722 * 150 / 10000) / 255.0;
        assert!((g.double_value(&[0, 0, 3, 4]) - want).abs() < 1e-6);
        // A file that is not an image is named.
        let text = tmp.path().join("train/cat/notes.txt");
        let e = spec.image(&text).unwrap_err().to_string();
        assert!(
            e.contains("notes.txt") && e.contains("cannot decode"),
            "{e}"
        );
        let e = spec.image(&tmp.path().join("nope.png")).unwrap_err();
        assert!(e.to_string().contains("nope.png"), "{e}");
    }

    #[test]
    fn val_folder_is_the_test_split_when_there_is_no_test_folder() {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "val");
        let ds = load(DatasetKind::Folder, tmp.path(), &opts(6, None)).unwrap();
        assert_eq!(ds.test.len(), 3);
        assert_eq!(ds.spec.shape.image_size, 6);
    }

    #[test]
    fn all_grey_images_give_one_channel_and_one_colour_image_gives_three() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for i in 0..3u8 {
            grey(&d.join(format!("train/a/{i}.png")), 5, 5, 10 + i);
            grey(&d.join(format!("train/b/{i}.jpeg")), 5, 5, 200);
        }
        grey(&d.join("test/b/0.png"), 5, 5, 200);
        let ds = load(DatasetKind::Folder, d, &opts(5, None)).unwrap();
        assert_eq!(ds.spec.shape.channels, 1);
        assert_eq!(ds.train.images.size(), vec![6, 1, 5, 5]);
        assert_eq!(ds.spec.mean.len(), 1);
        solid(&d.join("test/b/1.png"), 5, 5, [1, 2, 3]);
        let ds = load(DatasetKind::Folder, d, &opts(5, None)).unwrap();
        assert_eq!(ds.spec.shape.channels, 3);
    }

    #[test]
    fn folder_statistics_normalise_the_training_split() {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "test");
        let o = LoadOptions {
            val_split: 0.25,
            ..opts(8, None)
        };
        let ds = load(DatasetKind::Folder, tmp.path(), &o).unwrap();
        assert_eq!((ds.train.len(), ds.val.as_ref().unwrap().len()), (9, 3));
        for c in 0..3 {
            let ch = ds.train.images.select(1, c);
            let mean = ch.mean(tch::Kind::Float).double_value(&[]);
            let std = ch.std(false).double_value(&[]);
            assert!(mean.abs() < 1e-4, "channel {c} mean {mean}");
            assert!((std - 1.0).abs() < 1e-3, "channel {c} std {std}");
        }
    }

    /// Tiny-ImageNet: two wnids, 3 training JPEGs each, 4 validation JPEGs in one folder.
    fn tiny(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("wnids.txt"), "n02\nn01\n").unwrap();
        for (w, colour) in [("n01", [255, 255, 0]), ("n02", [0, 255, 255])] {
            for i in 0..3 {
                solid(
                    &dir.join(format!("train/{w}/images/{w}_{i}.JPEG")),
                    16,
                    16,
                    colour,
                );
            }
            std::fs::write(dir.join(format!("train/{w}/{w}_boxes.txt")), "").unwrap();
        }
        let mut ann = String::new();
        for (i, w) in ["n01", "n02", "n02", "n01"].iter().enumerate() {
            let colour = if *w == "n01" {
                [255, 255, 0]
            } else {
                [0, 255, 255]
            };
            solid(
                &dir.join(format!("val/images/val_{i}.JPEG")),
                16,
                16,
                colour,
            );
            ann.push_str(&format!("val_{i}.JPEG\t{w}\t0\t0\t15\t15\n"));
        }
        std::fs::write(dir.join("val/val_annotations.txt"), ann).unwrap();
    }

    #[test]
    fn tiny_imagenet_layout_is_detected_and_labelled_from_the_annotations() {
        let tmp = tempfile::tempdir().unwrap();
        tiny(tmp.path());
        let ds = load(DatasetKind::Folder, tmp.path(), &opts(8, None)).unwrap();
        assert_eq!(ds.folder.as_ref().unwrap().layout, Layout::TinyImageNet);
        // Labels follow wnids.txt's order.
        assert_eq!(ds.spec.classes, vec!["n02", "n01"]);
        assert_eq!(labels(&ds.test.labels), vec![1, 0, 0, 1]);
        assert_eq!(ds.train.len(), 6);
        assert_eq!(ds.spec.shape.channels, 3);
        // val_0 is n01: yellow, so its blue channel is (about) 0.
        assert!(raw_pixel(&ds, &ds.test, 0, 2) < 4.0);
        assert!(raw_pixel(&ds, &ds.test, 1, 2) > 250.0);
    }

    #[test]
    fn second_load_hits_the_cache_and_a_changed_file_invalidates_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("pets");
        let cache = tmp.path().join("cache");
        image_folder(&data, "test");
        let first = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        let info = first.folder.clone().unwrap();
        let CacheStatus::Written(path) = &info.cache else {
            panic!("{info:?}")
        };
        assert!(path.starts_with(&cache) && path.is_file());
        // The cache holds the class names beside the bytes: 15 labels + 15 * 3 * 64 pixels.
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 3 * (4 + 3) + 15 + 15 * 3 * 64);
        assert!(bytes.windows(3).any(|w| w == b"emu"));
        assert!(info.to_string().contains("decoded 15 images"), "{info}");
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);

        let second = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        let info2 = second.folder.clone().unwrap();
        assert!(cache_hit(&info2), "{info2:?}");
        assert!(info2.to_string().contains("cache hit"), "{info2}");
        assert_eq!(second.spec.classes, first.spec.classes);
        assert_eq!(second.spec.shape, first.spec.shape);
        assert!(second.train.images.equal(&first.train.images));
        assert!(second.test.labels.equal(&first.test.labels));

        // Another image size is another cache file.
        let other = load(DatasetKind::Folder, &data, &opts(4, Some(&cache))).unwrap();
        assert!(!cache_hit(&other.folder.unwrap()));
        let again = load(DatasetKind::Folder, &data, &opts(4, Some(&cache))).unwrap();
        assert!(cache_hit(&again.folder.unwrap()));

        // A rewritten image (other size on disk) makes the cache stale: decoded again.
        solid(&data.join("train/cat/0.png"), 20, 20, [0, 0, 0]);
        let third = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        assert!(
            matches!(
                third.folder.as_ref().unwrap().cache,
                CacheStatus::Written(_)
            ),
            "{:?}",
            third.folder
        );
        assert!(!third.train.images.equal(&first.train.images));
        // A new file invalidates it too.
        solid(&data.join("train/dog/9.png"), 12, 12, [0, 9, 0]);
        let fourth = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        assert!(!cache_hit(&fourth.folder.unwrap()));
        assert_eq!(fourth.train.len(), 13);

        // A damaged cache is a miss, not an error, and is rewritten.
        let path = cache.join(cache_file_name(&data, 8));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let fifth = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        assert!(!cache_hit(&fifth.folder.unwrap()));
        let again = load(DatasetKind::Folder, &data, &opts(8, Some(&cache))).unwrap();
        assert!(cache_hit(&again.folder.unwrap()));
    }

    fn load_err(dir: &Path) -> DataError {
        load(DatasetKind::Folder, dir, &opts(8, None)).unwrap_err()
    }

    #[test]
    fn a_corrupt_image_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "test");
        let bad = tmp.path().join("train/dog/2.JPG");
        std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
        let err = load_err(tmp.path());
        assert!(matches!(err, DataError::Content { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{}: cannot decode image: ", bad.display())),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn layout_errors_name_the_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        image_folder(d, "test");
        // A test class training lacks.
        solid(&d.join("test/yak/0.png"), 4, 4, [1, 1, 1]);
        assert_eq!(
            load_err(d).to_string(),
            format!(
                "{}: class \"yak\" does not exist in the training split",
                d.join("test/yak").display()
            )
        );
        std::fs::remove_dir_all(d.join("test/yak")).unwrap();
        // An empty class folder.
        std::fs::create_dir_all(d.join("train/fox")).unwrap();
        assert_eq!(
            load_err(d).to_string(),
            format!(
                "class folder {} holds no PNG or JPEG images",
                d.join("train/fox").display()
            )
        );
        std::fs::remove_dir_all(d.join("train/fox")).unwrap();
        // No test/ nor val/.
        std::fs::remove_dir_all(d.join("test")).unwrap();
        let err = load_err(d);
        assert_eq!(
            err.to_string(),
            format!("{}: no test/ or val/ folder beside train/ (expected test/<class>/<images> or val/<class>/<images>)", d.display())
        );
        // No train/.
        std::fs::remove_dir_all(d.join("train")).unwrap();
        let msg = load_err(d).to_string();
        assert!(
            msg.starts_with(&format!("{}: no train/ folder", d.display())),
            "{msg}"
        );
    }

    #[test]
    fn tiny_imagenet_annotation_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        tiny(d);
        let ann = d.join("val/val_annotations.txt");
        std::fs::write(&ann, "val_0.JPEG\tn99\t0\t0\t1\t1\n").unwrap();
        assert_eq!(
            load_err(d).to_string(),
            format!(
                "{}: class \"n99\" does not exist in the training split",
                ann.display()
            )
        );
        std::fs::write(&ann, "val_0.JPEG\n").unwrap();
        assert_eq!(
            load_err(d).to_string(),
            format!("{}: line 1: expected FILE<tab>WNID<tab>box…", ann.display())
        );
        std::fs::write(&ann, "gone.JPEG\tn01\n").unwrap();
        assert!(load_err(d).to_string().contains("gone.JPEG"));
        std::fs::remove_dir_all(d.join("train/n01/images")).unwrap();
        assert_eq!(
            load_err(d).to_string(),
            format!(
                "class folder {} holds no PNG or JPEG images",
                d.join("train/n01/images").display()
            )
        );
    }

    #[test]
    fn image_size_is_checked() {
        let tmp = tempfile::tempdir().unwrap();
        image_folder(tmp.path(), "test");
        let err = load(DatasetKind::Folder, tmp.path(), &opts(2, None)).unwrap_err();
        assert!(matches!(err, DataError::InvalidOption(_)), "{err}");
        // The built-in data sets have fixed sizes.
        let err = load(DatasetKind::Mnist, tmp.path(), &opts(8, None)).unwrap_err();
        assert!(err.to_string().contains("folder data sets only"), "{err}");
    }
}
