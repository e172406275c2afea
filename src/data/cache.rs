//! The packed decode cache: every usable image decoded once, squared and resized, stored as u8 HWC RGB.
//!
//! Files in the cache folder:
//! - `images.u8`: a 4096-byte header (magic `DERMAU8\0`, format version u32, image side u32, slot count u64,
//!   data offset u64, all little-endian; the rest zero) followed by one `size·size·3`-byte slot per candidate row
//!   in label-file order. Slots of rows that failed to decode stay zero and are never handed out.
//! - `manifest.json`: format version, settings (side, filter) and one entry per candidate row: its fingerprint
//!   (image id, path, byte length, modification time in ns) and either its slot or why it failed. It is written
//!   last, so a cache interrupted mid-build has no manifest and is rebuilt.
//!
//! A run whose settings and fingerprints all match reuses the cache without decoding anything. Otherwise the
//! cache is rebuilt, copying the pixels of rows whose fingerprint is unchanged (when the settings match) and
//! decoding only the rest.

use super::decode::{decode_rgb, square_resize};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Version of the cache layout; bump on any change to the header, the manifest or the pixel pipeline.
pub const CACHE_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"DERMAU8\0";
const DATA_OFFSET: usize = 4096;
/// Name of the resize filter recorded in the manifest (part of the settings).
const FILTER: &str = "center-square+triangle";
/// Pixel data file inside the cache folder.
pub const DATA_FILE: &str = "images.u8";
/// Manifest file inside the cache folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What identifies a source file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Image id of the row.
    pub image: String,
    /// Source path as given.
    pub path: String,
    /// File length in bytes; `None` when the file does not exist.
    pub len: Option<u64>,
    /// Modification time in nanoseconds since the Unix epoch (0 when unavailable).
    pub mtime_ns: u64,
}

impl Fingerprint {
    /// Reads a file's fingerprint (no content is read).
    pub fn of(image: &str, path: &Path) -> Self {
        let meta = fs::metadata(path).ok().filter(|m| m.is_file());
        let mtime_ns = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Fingerprint { image: image.to_string(), path: path.display().to_string(), len: meta.map(|m| m.len()), mtime_ns }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    fingerprint: Fingerprint,
    /// `Ok(slot)` or the reason the file cannot be used.
    result: std::result::Result<u64, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    size: u32,
    filter: String,
    entries: Vec<Entry>,
}

/// One row to cache: its id and image file.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Image id.
    pub image: String,
    /// Image file.
    pub path: PathBuf,
}

/// Outcome of [`build`].
pub struct Built {
    /// The memory-mapped pixel data.
    pub cache: ImageCache,
    /// Per candidate: its slot, or why it was excluded.
    pub results: Vec<std::result::Result<usize, String>>,
    /// Images decoded in this run (0 when the cache was reused whole).
    pub decoded: usize,
    /// Images whose pixels were taken from a previous cache.
    pub reused: usize,
}

/// Read-only access to the cached images (memory-mapped `images.u8`).
pub struct ImageCache {
    mmap: Mmap,
    size: usize,
    slots: usize,
    path: PathBuf,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageCache({}, {} slots of {}x{}x3)", self.path.display(), self.slots, self.size, self.size)
    }
}

impl ImageCache {
    /// Side of every cached image in pixels.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes per image (`size·size·3`).
    pub fn image_bytes(&self) -> usize {
        self.size * self.size * 3
    }

    /// Number of slots in the file (candidate rows, including failed ones).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Path of the data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The HWC RGB bytes in `slot`.
    ///
    /// # Panics
    /// When `slot >= self.slots()`; slots come from [`build`]'s results.
    pub fn slot(&self, slot: usize) -> &[u8] {
        assert!(slot < self.slots, "cache slot {slot} out of range ({} slots)", self.slots);
        let n = self.image_bytes();
        &self.mmap[DATA_OFFSET + slot * n..DATA_OFFSET + (slot + 1) * n]
    }

    /// Opens and checks a data file written by [`build`].
    fn open(path: &Path, size: usize, slots: usize) -> Result<Self> {
        let file = fs::File::open(path).with_context(|| format!("opening cache file {}", path.display()))?;
        // SAFETY: the cache file is private to derma and only replaced by rename, never written in place after
        // the manifest exists; a concurrent external writer is outside the supported use.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
        let expect = DATA_OFFSET + slots * size * size * 3;
        let h = &mmap[..DATA_OFFSET.min(mmap.len())];
        let ok = mmap.len() == expect
            && &h[..8] == MAGIC
            && h[8..12] == CACHE_VERSION.to_le_bytes()
            && u64::from(u32::from_le_bytes([h[12], h[13], h[14], h[15]])) == size as u64
            && h[16..24] == (slots as u64).to_le_bytes()
            && h[24..32] == (DATA_OFFSET as u64).to_le_bytes();
        if !ok {
            bail!(
                "cache file {} has an unexpected header or length; delete the cache folder to rebuild",
                path.display()
            );
        }
        Ok(ImageCache { mmap, size, slots, path: path.to_path_buf() })
    }
}

fn header(size: u32, slots: usize) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&CACHE_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&size.to_le_bytes());
    h[16..24].copy_from_slice(&(slots as u64).to_le_bytes());
    h[24..32].copy_from_slice(&(DATA_OFFSET as u64).to_le_bytes());
    h
}

fn read_manifest(dir: &Path) -> Option<Manifest> {
    let text = fs::read_to_string(dir.join(MANIFEST_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

fn progress(n: usize, quiet: bool, msg: &'static str) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})") {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

/// Decodes one candidate into `out` (a slot); the error is the exclusion reason.
fn decode_into(c: &Candidate, fp: &Fingerprint, size: u32, out: &mut [u8]) -> std::result::Result<(), String> {
    match fp.len {
        None => return Err("missing file".to_string()),
        Some(0) => return Err("empty file".to_string()),
        Some(_) => {}
    }
    let bytes = fs::read(&c.path).map_err(|e| format!("unreadable file: {e}"))?;
    let img = decode_rgb(&bytes)?;
    out.copy_from_slice(&square_resize(&img, size));
    Ok(())
}

/// Builds (or reuses) the cache for `candidates` in `dir`, decoding in parallel on rayon's pool.
pub fn build(dir: &Path, size: u32, candidates: &[Candidate], quiet: bool) -> Result<Built> {
    if size == 0 {
        bail!("--size must be at least 1");
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("creating cache folder {} (--cache can put it elsewhere)", dir.display()))?;
    let data_path = dir.join(DATA_FILE);
    let fps: Vec<Fingerprint> = candidates.par_iter().map(|c| Fingerprint::of(&c.image, &c.path)).collect();
    let old = read_manifest(dir).filter(|m| m.version == CACHE_VERSION && m.size == size && m.filter == FILTER);
    let mut old_cache = old.as_ref().and_then(|m| ImageCache::open(&data_path, size as usize, m.entries.len()).ok());

    let whole = match (&old, &old_cache) {
        (Some(m), Some(_)) => {
            m.entries.len() == fps.len()
                && m.entries
                    .iter()
                    .zip(&fps)
                    .enumerate()
                    .all(|(i, (e, f))| e.fingerprint == *f && e.result.as_ref().map_or(true, |&s| s == i as u64))
        }
        _ => false,
    };
    if whole && let (Some(m), Some(cache)) = (&old, old_cache.take()) {
        let results = m.entries.iter().map(|e| e.result.as_ref().map(|&s| s as usize).map_err(Clone::clone)).collect();
        return Ok(Built { results, cache, decoded: 0, reused: fps.len() });
    }

    // Entries of the previous cache by image id, reusable where the fingerprint is unchanged.
    let previous: HashMap<&str, &Entry> = match (&old, &old_cache) {
        (Some(m), Some(_)) => m.entries.iter().map(|e| (e.fingerprint.image.as_str(), e)).collect(),
        _ => HashMap::new(),
    };
    let _ = fs::remove_file(dir.join(MANIFEST_FILE));
    let tmp_path = dir.join(format!("{DATA_FILE}.tmp"));
    let slot_bytes = size as usize * size as usize * 3;
    let total = DATA_OFFSET + candidates.len() * slot_bytes;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp_path)
        .with_context(|| format!("creating {}", tmp_path.display()))?;
    file.set_len(total as u64).with_context(|| {
        format!("sizing {} to {total} bytes (is the disk full? --cache can point elsewhere)", tmp_path.display())
    })?;
    // SAFETY: the file was just created by this process and is not visible under its final name yet; nothing
    // else maps or writes it while this mapping lives.
    let mut map =
        unsafe { MmapMut::map_mut(&file) }.with_context(|| format!("memory-mapping {}", tmp_path.display()))?;
    let (head, data) = map.split_at_mut(DATA_OFFSET);
    head[..32].copy_from_slice(&header(size, candidates.len()));

    let pb = progress(candidates.len(), quiet, "decoding");
    let decoded = AtomicUsize::new(0);
    let reused = AtomicUsize::new(0);
    let results: Vec<std::result::Result<usize, String>> = data
        .par_chunks_mut(slot_bytes.max(1))
        .zip(candidates.par_iter().zip(fps.par_iter()))
        .enumerate()
        .map(|(slot, (out, (c, fp)))| {
            let prev = previous.get(c.image.as_str()).filter(|e| e.fingerprint == *fp);
            let r = match (prev, old_cache.as_ref()) {
                (Some(e), Some(oc)) => {
                    reused.fetch_add(1, Ordering::Relaxed);
                    match &e.result {
                        Ok(s) => {
                            out.copy_from_slice(oc.slot(*s as usize));
                            Ok(slot)
                        }
                        Err(reason) => Err(reason.clone()),
                    }
                }
                _ => {
                    decoded.fetch_add(1, Ordering::Relaxed);
                    decode_into(c, fp, size, out).map(|()| slot)
                }
            };
            pb.inc(1);
            r
        })
        .collect();
    pb.finish_and_clear();
    map.flush().with_context(|| format!("writing {}", tmp_path.display()))?;
    drop(map);
    drop(old_cache);
    fs::rename(&tmp_path, &data_path)
        .with_context(|| format!("renaming {} to {}", tmp_path.display(), data_path.display()))?;

    let manifest = Manifest {
        version: CACHE_VERSION,
        size,
        filter: FILTER.to_string(),
        entries: fps
            .into_iter()
            .zip(&results)
            .map(|(fingerprint, r)| Entry { fingerprint, result: r.as_ref().map(|&s| s as u64).map_err(Clone::clone) })
            .collect(),
    };
    let mtmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    fs::write(&mtmp, serde_json::to_vec(&manifest)?).with_context(|| format!("writing {}", mtmp.display()))?;
    fs::rename(&mtmp, dir.join(MANIFEST_FILE)).with_context(|| format!("renaming {}", mtmp.display()))?;
    let cache = ImageCache::open(&data_path, size as usize, candidates.len())?;
    Ok(Built { cache, results, decoded: decoded.into_inner(), reused: reused.into_inner() })
}
