//! The data layer: reading ISIC 2019 (or a plain labelled folder), verification, the decode cache, the
//! train/validation split, class weights, augmentation, the batch loader and synthetic data.
//!
//! # Input layouts (`--data DIR`)
//!
//! - **ISIC 2019**: `DIR/ISIC_2019_Training_GroundTruth.csv` (header `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`,
//!   one-hot `1.0`/`0.0`), optional `DIR/ISIC_2019_Training_Metadata.csv` (`image,age_approx,
//!   anatom_site_general,lesion_id,sex`; empty fields are missing), images `DIR/ISIC_2019_Training_Input/
//!   <image>.jpg`. Class names come from the header; `UNK` is dropped while its column is all zero.
//! - **Plain** (any other dataset): `DIR/labels.csv` with columns `image,label` and optionally `lesion_id`;
//!   `label` is a class name, classes are the distinct names in sorted order; images are
//!   `DIR/images/<image>` (`<image>.jpg` when the id has no extension).
//!
//! # Verification
//!
//! Every row is checked once, up front. A row is excluded, with its reason, when its file is missing, empty,
//! undecodable or a truncated JPEG, when a one-hot value is anything but 0 or 1 (`2`, `-1` and `0.6` are not
//! labels), when its label is not exactly one positive class, or when its image id repeats an earlier row's (the
//! first is kept). Excluded rows are listed in the summary and in `excluded.csv` (`image,line,reason`) in the
//! cache folder; nothing is replaced by stand-in data. Decoding follows the content, not the extension.
//!
//! Every class column is reported with its usable images (or as empty); a warning names any class too small for
//! the split to give it both training and validation images, an `UNK` column that becomes a class, and a
//! missing metadata file (the split then cannot be grouped by lesion).
//!
//! # The cache folder (`--cache`, default `DIR/.derma-cache-<size>`)
//!
//! - `images.u8` + `manifest.json`: the decoded images, see [`cache`] (keys, disk-space checks, read-only use,
//!   resumption after an interruption).
//! - `split.csv`: `image,label,lesion_id,split` for every usable image (`split` is `train` or `val`).
//! - `excluded.csv`: the excluded rows.
//!
//! Entry points: [`prepare`] → [`PreparedData`]; [`augment`] for the training transform; [`loader`] for
//! batches; [`synth`] for a synthetic dataset in the ISIC layout.

pub mod augment;
pub mod cache;
pub mod decode;
pub mod device;
pub mod loader;
pub mod memory;
pub mod source;
pub mod split;
pub mod synth;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::ser::SerializeMap;
use std::path::{Path, PathBuf};

pub use cache::{DecodeInterrupted, ImageCache};
pub use source::Layout;

/// The ISIC 2019 challenge's class order (submission columns), `UNK` last.
pub const ISIC_CLASSES: [&str; 9] = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"];

/// Image counts per class of the ISIC 2019 training set, in [`ISIC_CLASSES`] order (`UNK` has none).
pub const ISIC_TRAIN_COUNTS: [usize; 9] = [4522, 12875, 3323, 867, 2624, 239, 253, 628, 0];

/// SplitMix64's finalizer: the hash that turns (seed, epoch, position) into generator seeds.
#[inline]
pub fn split_mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Settings of [`prepare`] (the `derma prepare` flags).
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Dataset folder (ISIC 2019 or plain layout).
    pub data: PathBuf,
    /// Cache folder; `None` = `<data>/.derma-cache-<size>`.
    pub cache: Option<PathBuf>,
    /// Side of the cached square images.
    pub size: u32,
    /// Fraction of each class's images put in validation.
    pub val_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
    /// No progress bar.
    pub quiet: bool,
    /// Print the warnings on stderr as well as in the summary (default; a quiet run still warns).
    pub warn: bool,
    /// Stop decoding after this many images, as an interruption would (tests of resumption).
    pub stop_after_decodes: Option<usize>,
}

impl PrepareOptions {
    /// Defaults: 224 px, 20 % validation, seed 42.
    pub fn new(data: impl Into<PathBuf>) -> Self {
        PrepareOptions {
            data: data.into(),
            cache: None,
            size: 224,
            val_fraction: 0.2,
            seed: 42,
            quiet: false,
            warn: true,
            stop_after_decodes: None,
        }
    }

    /// The cache folder these options use.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.clone().unwrap_or_else(|| self.data.join(format!(".derma-cache-{}", self.size)))
    }
}

/// Smallest image side accepted for the cache and the model input.
pub const MIN_IMAGE_SIDE: usize = 16;
/// Largest image side accepted: 2048² RGB is 12 MiB per cached image, 50 MiB per f32 input.
pub const MAX_IMAGE_SIDE: usize = 2048;

/// Checks an image side given by `flag` against [`MIN_IMAGE_SIDE`]..=[`MAX_IMAGE_SIDE`].
pub fn check_image_side(side: usize, flag: &str) -> Result<()> {
    if !(MIN_IMAGE_SIDE..=MAX_IMAGE_SIDE).contains(&side) {
        bail!(
            "{flag} {side} is out of range: image sides from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels are \
             supported (the seed trains at 224; ISIC 2019 images are about 1024x768)"
        );
    }
    Ok(())
}

/// Bytes for people: `72.0 GiB`, `1.5 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The smallest class size whose rounded validation share is at least one image and leaves one for training.
fn min_images_for_both_splits(val_fraction: f64) -> Option<usize> {
    (2..=1_000_000).find(|&n| {
        let v = (val_fraction * n as f64).round() as usize;
        v >= 1 && v < n
    })
}

/// A row left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Excluded {
    /// Image id.
    pub image: String,
    /// 1-based line in the label file.
    pub line: usize,
    /// Why it was left out.
    pub reason: String,
}

/// Name → value pairs serialized as a JSON object in the given order.
#[derive(Clone, Debug, PartialEq)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// What [`prepare`] found and did; `derma prepare --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct PrepareSummary {
    /// Dataset folder.
    pub data: String,
    /// `isic2019` or `plain`.
    pub layout: String,
    /// Cache folder.
    pub cache: String,
    /// Side of the cached images.
    pub size: u32,
    /// Rows in the label file.
    pub rows: usize,
    /// Rows kept.
    pub usable: usize,
    /// Rows left out, by line.
    pub excluded: Vec<Excluded>,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Usable images per class.
    pub class_counts: Ordered<usize>,
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub val: usize,
    /// Training images per class.
    pub train_class_counts: Ordered<usize>,
    /// Validation images per class.
    pub val_class_counts: Ordered<usize>,
    /// Balanced class weights from the training split.
    pub class_weights: Ordered<f32>,
    /// Images decoded in this run (0 when the cache was reused).
    pub decoded: usize,
    /// Images taken from an existing cache.
    pub reused: usize,
    /// Every class column of the label file (ISIC) or every class (plain) with its usable images; 0 = empty.
    pub class_columns: Ordered<usize>,
    /// Columns of the label file that are not classes (ISIC's `UNK` while it is empty).
    pub unused_columns: Vec<String>,
    /// Seconds spent decoding in this run.
    pub decode_seconds: f64,
    /// Warnings (a class too small for the split, a missing metadata file, ...).
    pub warnings: Vec<String>,
}

/// A prepared dataset: labels, split, class weights and the memory-mapped images.
///
/// Images are numbered `0..len()` over the usable rows in label-file order.
#[derive(Debug)]
pub struct PreparedData {
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// Image id per image.
    pub images: Vec<String>,
    /// Class per image.
    pub labels: Vec<usize>,
    /// Lesion id per image, where the metadata has one.
    pub lesion_ids: Vec<Option<String>>,
    /// Training images (ascending).
    pub train: Vec<usize>,
    /// Validation images (ascending).
    pub val: Vec<usize>,
    /// Balanced class weights `n/(C·n_c)` over the training split (0 for a class without images).
    pub class_weights: Vec<f32>,
    /// The cached pixels.
    pub cache: ImageCache,
    /// Cache slot per image.
    slots: Vec<usize>,
    /// What was found and done.
    pub summary: PrepareSummary,
}

impl PreparedData {
    /// Number of usable images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no image is usable.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Side of the cached images.
    pub fn size(&self) -> usize {
        self.cache.size()
    }

    /// HWC RGB bytes of image `i` (`size·size·3`).
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        self.cache.slot(self.slots[i])
    }
}

impl loader::ImageSource for PreparedData {
    fn size(&self) -> usize {
        self.cache.size()
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image(&self, i: usize) -> &[u8] {
        PreparedData::image(self, i)
    }
    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }
}

/// Writes a CSV report unless the file already holds exactly these bytes (a valid cache in a read-only folder
/// stays usable). The file is replaced atomically. `Ok(false)`: the folder is read-only and the file differs.
fn write_csv(path: &Path, header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> Result<bool> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header).with_context(|| format!("formatting {}", path.display()))?;
    for r in rows {
        w.write_record(&r).with_context(|| format!("formatting {}", path.display()))?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("formatting {}: {e}", path.display()))?;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(true);
    }
    let tmp = path.with_extension("csv.tmp");
    let written = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
    match written {
        Ok(()) => Ok(true),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) {
                Ok(false)
            } else {
                Err(anyhow::anyhow!("writing {}: {e}", path.display()))
            }
        }
    }
}

/// Reads, verifies, caches and splits a dataset folder (see the module docs).
pub fn prepare(opts: &PrepareOptions) -> Result<PreparedData> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", opts.val_fraction);
    }
    check_image_side(opts.size as usize, "--size")?;
    let root = std::fs::canonicalize(&opts.data)
        .with_context(|| format!("dataset folder {} (--data) cannot be opened", opts.data.display()))?;
    let table = source::read_table(&opts.data)?;
    let n_classes = table.class_names.len();
    if n_classes == 0 {
        bail!("{}: no classes found in the label file", opts.data.display());
    }
    let mut excluded = Vec::new();
    let mut cand_rows = Vec::new();
    for (r, row) in table.rows.iter().enumerate() {
        match &row.label {
            Ok(_) => cand_rows.push(r),
            Err(reason) => excluded.push(Excluded { image: row.image.clone(), line: row.line, reason: reason.clone() }),
        }
    }
    let candidates: Vec<cache::Candidate> = cand_rows
        .iter()
        .map(|&r| cache::Candidate { image: table.rows[r].image.clone(), path: table.rows[r].path.clone() })
        .collect();
    let cache_dir = opts.cache_dir();
    let started = std::time::Instant::now();
    let built = cache::build(
        &cache_dir,
        &candidates,
        &cache::BuildOptions {
            root: &root,
            size: opts.size,
            quiet: opts.quiet,
            stop_after_decodes: opts.stop_after_decodes,
        },
    )?;
    let decode_seconds = started.elapsed().as_secs_f64();

    let (mut images, mut labels, mut lesion_ids, mut slots) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&r, res) in cand_rows.iter().zip(&built.results) {
        let row = &table.rows[r];
        match (res, &row.label) {
            (Ok(slot), Ok(label)) => {
                images.push(row.image.clone());
                labels.push(*label);
                lesion_ids.push(row.lesion_id.clone());
                slots.push(*slot);
            }
            (Err(reason), _) | (_, Err(reason)) => {
                excluded.push(Excluded { image: row.image.clone(), line: row.line, reason: reason.clone() })
            }
        }
    }
    excluded.sort_by_key(|e| e.line);

    let (train, val) = split::stratified_group_split(&labels, &lesion_ids, n_classes, opts.val_fraction, opts.seed);
    let (class_weights, train_counts) = split::balanced_class_weights(&labels, &train, n_classes);
    let (_, val_counts) = split::balanced_class_weights(&labels, &val, n_classes);
    let (_, counts) = split::balanced_class_weights(&labels, &(0..labels.len()).collect::<Vec<_>>(), n_classes);
    let mut warnings = table.warnings.clone();
    let min_n = min_images_for_both_splits(opts.val_fraction);
    for (c, name) in table.class_names.iter().enumerate() {
        let n = counts[c];
        if n == 0 {
            warnings.push(format!("class {name} has no usable images: it cannot be learned and its loss weight is 0"));
        } else if train_counts[c] == 0 {
            warnings.push(format!(
                "class {name} has {n} image(s), none in the training split: it cannot be learned and its loss \
                 weight is 0"
            ));
        } else if val_counts[c] == 0 && opts.val_fraction > 0.0 {
            let need = min_n.map_or_else(String::new, |m| format!(" (at least {m} images of a class are needed)"));
            warnings.push(format!(
                "class {name} has only {n} image(s), too few for the split to put one in validation at \
                 --val-fraction {}{need}: its validation recall cannot be measured",
                opts.val_fraction
            ));
        }
    }

    let split_of = {
        let mut s = vec!["train"; labels.len()];
        for &v in &val {
            s[v] = "val";
        }
        s
    };
    let split_written = write_csv(
        &cache_dir.join("split.csv"),
        &["image", "label", "lesion_id", "split"],
        (0..labels.len()).map(|i| {
            vec![
                images[i].clone(),
                table.class_names[labels[i]].clone(),
                lesion_ids[i].clone().unwrap_or_default(),
                split_of[i].to_string(),
            ]
        }),
    )?;
    let excluded_written = write_csv(
        &cache_dir.join("excluded.csv"),
        &["image", "line", "reason"],
        excluded.iter().map(|e| vec![e.image.clone(), e.line.to_string(), e.reason.clone()]),
    )?;
    if !(split_written && excluded_written) {
        warnings.push(format!(
            "the cache folder {} is read-only: split.csv and excluded.csv there describe an earlier run (the \
             pixels are valid and used); pass --cache DIR to keep this run's lists",
            cache_dir.display()
        ));
    }
    if opts.warn {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }
    let unused_columns: Vec<String> =
        table.columns.iter().filter(|c| !table.class_names.contains(c)).cloned().collect();
    let class_columns = Ordered(
        table
            .columns
            .iter()
            .map(|c| (c.clone(), table.class_names.iter().position(|n| n == c).map_or(0, |k| counts[k])))
            .collect(),
    );

    let named = |v: &[usize]| Ordered(table.class_names.iter().cloned().zip(v.iter().copied()).collect());
    let summary = PrepareSummary {
        data: opts.data.display().to_string(),
        layout: match table.layout {
            Layout::Isic2019 => "isic2019".to_string(),
            Layout::Plain => "plain".to_string(),
        },
        cache: cache_dir.display().to_string(),
        size: opts.size,
        rows: table.rows.len(),
        usable: labels.len(),
        excluded,
        class_names: table.class_names.clone(),
        class_counts: named(&counts),
        train: train.len(),
        val: val.len(),
        train_class_counts: named(&train_counts),
        val_class_counts: named(&val_counts),
        class_weights: Ordered(table.class_names.iter().cloned().zip(class_weights.iter().copied()).collect()),
        decoded: built.decoded,
        reused: built.reused,
        class_columns,
        unused_columns,
        decode_seconds,
        warnings,
    };
    Ok(PreparedData {
        class_names: table.class_names,
        images,
        labels,
        lesion_ids,
        train,
        val,
        class_weights,
        cache: built.cache,
        slots,
        summary,
    })
}

impl PrepareSummary {
    /// A human-readable report for the terminal.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} ({}): {} rows, {} usable, {} excluded\n",
            self.data,
            self.layout,
            self.rows,
            self.usable,
            self.excluded.len()
        );
        for e in &self.excluded {
            s += &format!("  excluded {} (line {}): {}\n", e.image, e.line, e.reason);
        }
        s += "class      images  train    val  weight\n";
        for (i, (name, n)) in self.class_counts.0.iter().enumerate() {
            s += &format!(
                "{name:<10} {n:>6} {:>6} {:>6} {:>7.4}\n",
                self.train_class_counts.0[i].1, self.val_class_counts.0[i].1, self.class_weights.0[i].1
            );
        }
        let columns: Vec<String> = self
            .class_columns
            .0
            .iter()
            .map(|(c, n)| match (*n, self.unused_columns.contains(c)) {
                (_, true) => format!("{c} empty (not a class)"),
                (0, false) => format!("{c} empty"),
                (n, false) => format!("{c} {n}"),
            })
            .collect();
        s += &format!("class columns: {}\n", columns.join(", "));
        let rate = if self.decoded > 0 && self.decode_seconds > 0.0 {
            format!(
                " in {:.1} s, {}",
                self.decode_seconds,
                cache::format_rate(self.decoded as f64 / self.decode_seconds)
            )
        } else {
            String::new()
        };
        s += &format!(
            "split: {} train, {} val; cache {} ({}x{}; decoded {}{rate}, reused {})\n",
            self.train, self.val, self.cache, self.size, self.size, self.decoded, self.reused
        );
        for w in &self.warnings {
            s += &format!("warning: {w}\n");
        }
        s
    }
}
