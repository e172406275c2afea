//! The packed decode cache: every usable image decoded once, squared and resized, stored as u8 HWC RGB.
//!
//! Files in the cache folder:
//! - `images.u8`: a 4096-byte header (magic `DERMAU8\0`, format version u32, image side u32, slot count u64,
//!   data offset u64, all little-endian; the rest zero) followed by one `size·size·3`-byte slot per candidate row
//!   in label-file order. Slots of rows that failed to decode, or were not decoded yet, are never handed out.
//! - `manifest.json`: format version, settings (side, filter) and one entry per candidate row: its fingerprint
//!   and its outcome (decoded, excluded with the reason, or still pending after an interruption).
//!
//! # Keys
//!
//! An entry is reused when its image id and [`Fingerprint`] match: the file's canonical path relative to the
//! canonical dataset folder (so `--data base`, `./base` and `/abs/base` are one dataset, and a moved or
//! read-only bind-mounted copy is too), its length, modification time and a hash of its first and last 4 KiB.
//!
//! # Reuse without writing
//!
//! A run whose settings and fingerprints all match opens the cache read-only and writes nothing: a valid cache in
//! a read-only folder is usable. Otherwise the cache is updated in place (same rows in the same order: only
//! changed or pending rows are decoded) or rebuilt into `images.u8.tmp` (copying the pixels of unchanged rows)
//! and renamed over the old file.
//!
//! # Disk space and failures
//!
//! Before writing, the file's size is compared with the free space of its filesystem and refused with both
//! numbers. The file is preallocated (`posix_fallocate`) and written with `pwrite`, never through a writable
//! memory map, so a full disk is an error and never a SIGBUS; the data is synced before the manifest names it.
//! A failed build removes its partial files. An interruption ([`crate::interrupt::requested`], polled per image)
//! stops decoding within one image per thread and keeps what was decoded: the manifest marks the rest pending
//! and the next run decodes only those ([`DecodeInterrupted`]).

use super::decode::{decode_rgb, square_resize};
use super::human_bytes;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Version of the cache layout; bump on any change to the header, the manifest or the pixel pipeline.
pub const CACHE_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"DERMAU8\0";
const DATA_OFFSET: usize = 4096;
/// Bytes hashed at each end of a source file for its fingerprint.
const SAMPLE_BYTES: u64 = 4096;
/// Name of the resize filter recorded in the manifest (part of the settings).
const FILTER: &str = "center-square+triangle";
/// Pixel data file inside the cache folder.
pub const DATA_FILE: &str = "images.u8";
/// Manifest file inside the cache folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What identifies a source file's content without decoding it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Image id of the row.
    pub image: String,
    /// Canonical path relative to the canonical dataset folder; absolute when the file resolves outside it, the
    /// path as given when it cannot be resolved (a missing file).
    pub key: String,
    /// File length in bytes; `None` when the file does not exist.
    pub len: Option<u64>,
    /// Modification time in nanoseconds since the Unix epoch (0 when unavailable).
    pub mtime_ns: u64,
    /// FNV-1a of the length and the first and last 4 KiB (0 when the file cannot be read).
    pub sample: u64,
}

/// FNV-1a, 64 bit: stable across builds and platforms (the manifest stores it).
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn sample_hash(path: &Path, len: u64) -> Option<u64> {
    let mut f = fs::File::open(path).ok()?;
    let mut h = fnv1a(0xCBF2_9CE4_8422_2325, &len.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE_BYTES as usize];
    let head = len.min(SAMPLE_BYTES) as usize;
    f.read_exact(&mut buf[..head]).ok()?;
    h = fnv1a(h, &buf[..head]);
    if len > SAMPLE_BYTES {
        let from = (len - SAMPLE_BYTES).max(SAMPLE_BYTES);
        f.seek(SeekFrom::Start(from)).ok()?;
        let tail = (len - from) as usize;
        f.read_exact(&mut buf[..tail]).ok()?;
        h = fnv1a(h, &buf[..tail]);
    }
    Some(h)
}

impl Fingerprint {
    /// Reads a file's fingerprint; `root` is the canonical dataset folder. Reads at most 8 KiB of the file.
    pub fn of(image: &str, path: &Path, root: &Path) -> Self {
        let meta = fs::metadata(path).ok().filter(|m| m.is_file());
        let mtime_ns = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let key = match fs::canonicalize(path) {
            Ok(c) => c.strip_prefix(root).map_or_else(|_| c.display().to_string(), |r| r.display().to_string()),
            Err(_) => path.display().to_string(),
        };
        let len = meta.map(|m| m.len());
        let sample = len.and_then(|l| sample_hash(path, l)).unwrap_or(0);
        Fingerprint { image: image.to_string(), key, len, mtime_ns, sample }
    }
}

/// What became of one candidate row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// Its slot holds the decoded pixels.
    Decoded,
    /// It cannot be used, for this reason.
    Excluded(String),
    /// Not decoded yet (the build was interrupted).
    Pending,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    fingerprint: Fingerprint,
    outcome: Outcome,
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

/// Settings of [`build`].
#[derive(Clone, Debug)]
pub struct BuildOptions<'a> {
    /// Canonical dataset folder (fingerprint keys are relative to it).
    pub root: &'a Path,
    /// Side of the cached squares.
    pub size: u32,
    /// No progress bar.
    pub quiet: bool,
    /// Request an interruption after this many decodes, as a signal would (for tests of resumption).
    pub stop_after_decodes: Option<usize>,
}

/// Outcome of [`build`].
pub struct Built {
    /// The memory-mapped pixel data.
    pub cache: ImageCache,
    /// Per candidate: its slot, or why it was excluded.
    pub results: Vec<std::result::Result<usize, String>>,
    /// Images decoded in this run (0 when the cache was reused whole).
    pub decoded: usize,
    /// Images whose pixels (or exclusion) were taken from a previous cache.
    pub reused: usize,
}

/// Decoding stopped at the user's request; what was decoded is kept and the next run resumes.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted while decoding: {decoded} images decoded in this run are kept in {cache}, {pending} still to \
     decode; run the same command again to resume"
)]
pub struct DecodeInterrupted {
    /// Images decoded (and kept) in this run.
    pub decoded: usize,
    /// Images left for the next run.
    pub pending: usize,
    /// Cache folder.
    pub cache: String,
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

    /// Opens (read-only) and checks a data file written by [`build`].
    fn open(path: &Path, size: usize, slots: usize) -> Result<Self> {
        let file = fs::File::open(path).with_context(|| format!("opening cache file {}", path.display()))?;
        // SAFETY: the cache file is private to derma; build writes a file in place only after its manifest has
        // been withdrawn or marks the slots being written pending, and never while a reader of those slots
        // exists in this process; a concurrent external writer is outside the supported use.
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

fn header(size: u32, slots: usize) -> [u8; DATA_OFFSET] {
    let mut h = [0u8; DATA_OFFSET];
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

/// A decode rate rounded to what a reader needs: 3 significant digits at most, no trailing noise.
pub fn format_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        "- images/s".to_string()
    } else if per_sec >= 100.0 {
        format!("{per_sec:.0} images/s")
    } else if per_sec >= 10.0 {
        format!("{per_sec:.1} images/s")
    } else {
        format!("{per_sec:.2} images/s")
    }
}

fn progress(n: usize, quiet: bool, msg: &'static str) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || n == 0 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({rate}, eta {eta})") {
        let rate = |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&format_rate(s.per_sec()));
        };
        pb.set_style(style.with_key("rate", rate).progress_chars("=> "));
    }
    pb.set_message(msg);
    pb
}

/// Decodes one candidate into the cache's square form; the error is the exclusion reason.
fn decode_one(c: &Candidate, fp: &Fingerprint, size: u32) -> std::result::Result<Vec<u8>, String> {
    match fp.len {
        None => return Err("missing file".to_string()),
        Some(0) => return Err("empty file".to_string()),
        Some(_) => {}
    }
    let bytes = fs::read(&c.path).map_err(|e| format!("unreadable file: {e}"))?;
    let img = decode_rgb(&bytes)?;
    Ok(square_resize(&img, size))
}

/// Removes a file when dropped unless disarmed: partial files never outlive a failed build.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn is_read_only(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied)
}

/// An error writing in the cache folder, with what to do about it.
fn write_error(e: std::io::Error, what: &str, path: &Path) -> anyhow::Error {
    let advice = if is_read_only(&e) {
        "the cache folder is not writable (a read-only dataset folder?): pass --cache DIR to keep the cache in a \
         writable folder"
    } else if e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) {
        "the disk is full: free space, use a smaller image size, or pass --cache DIR on a larger disk"
    } else {
        "--cache DIR can put the cache elsewhere"
    };
    anyhow::anyhow!("{what} {}: {e}; {advice}", path.display())
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).with_context(|| format!("reading the free space of {}", dir.display()))?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Reserves `len` bytes for `file`, so later writes cannot run out of space. Filesystems without
/// preallocation are left to report a full disk on write (still an error, never a signal).
fn preallocate(file: &fs::File, len: u64, path: &Path) -> Result<()> {
    use nix::errno::Errno;
    let len = i64::try_from(len).context("cache file size overflows")?;
    match nix::fcntl::posix_fallocate(file, 0, len) {
        Ok(()) | Err(Errno::EOPNOTSUPP | Errno::EINVAL) => Ok(()),
        Err(e) => Err(write_error(std::io::Error::from(e), "reserving space for", path)),
    }
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let mut guard = RemoveOnDrop(Some(tmp.clone()));
    let bytes = serde_json::to_vec(manifest).context("serializing the cache manifest")?;
    let file = fs::File::create(&tmp).map_err(|e| write_error(e, "creating", &tmp))?;
    file.write_all_at(&bytes, 0).map_err(|e| write_error(e, "writing", &tmp))?;
    file.sync_all().map_err(|e| write_error(e, "writing", &tmp))?;
    fs::rename(&tmp, &path).map_err(|e| write_error(e, "renaming the manifest to", &path))?;
    guard.disarm();
    Ok(())
}

/// What to do for one candidate.
enum Plan {
    /// In place and unchanged.
    Keep,
    /// Copy the pixels of this slot of the previous cache.
    Copy(usize),
    /// Excluded before, unchanged: the same reason.
    Reason(String),
    /// Decode the file.
    Decode,
}

/// Builds (or reuses) the cache for `candidates` in `dir`, decoding in parallel on rayon's pool.
pub fn build(dir: &Path, candidates: &[Candidate], opts: &BuildOptions) -> Result<Built> {
    let size = opts.size;
    if size == 0 {
        bail!("the cache image side must be at least 1");
    }
    fs::create_dir_all(dir).map_err(|e| write_error(e, "creating cache folder", dir))?;
    let data_path = dir.join(DATA_FILE);
    let n = candidates.len();
    let slot_bytes = size as usize * size as usize * 3;
    let total = (n as u64)
        .checked_mul(slot_bytes as u64)
        .and_then(|b| b.checked_add(DATA_OFFSET as u64))
        .context("cache size overflows 64 bits")?;
    let fps: Vec<Fingerprint> = candidates.par_iter().map(|c| Fingerprint::of(&c.image, &c.path, opts.root)).collect();
    let old = read_manifest(dir).filter(|m| m.version == CACHE_VERSION && m.size == size && m.filter == FILTER);
    let old_cache = old.as_ref().and_then(|m| ImageCache::open(&data_path, size as usize, m.entries.len()).ok());
    let old = old.filter(|_| old_cache.is_some());

    let in_place = old.as_ref().is_some_and(|m| {
        m.entries.len() == n && m.entries.iter().zip(candidates).all(|(e, c)| e.fingerprint.image == c.image)
    });
    let previous: HashMap<&str, (usize, &Entry)> = old
        .as_ref()
        .map(|m| m.entries.iter().enumerate().map(|(j, e)| (e.fingerprint.image.as_str(), (j, e))).collect())
        .unwrap_or_default();
    let plans: Vec<Plan> = candidates
        .iter()
        .zip(&fps)
        .enumerate()
        .map(|(i, (c, fp))| {
            let prev = if in_place {
                old.as_ref().map(|m| (i, &m.entries[i]))
            } else {
                previous.get(c.image.as_str()).copied()
            };
            match prev {
                Some((j, e)) if e.fingerprint == *fp => match &e.outcome {
                    Outcome::Decoded if in_place => Plan::Keep,
                    Outcome::Decoded => Plan::Copy(j),
                    Outcome::Excluded(r) => Plan::Reason(r.clone()),
                    Outcome::Pending => Plan::Decode,
                },
                _ => Plan::Decode,
            }
        })
        .collect();
    let to_decode = plans.iter().filter(|p| matches!(p, Plan::Decode)).count();
    let reused = n - to_decode;
    let from_plan = |plans: &[Plan]| -> Vec<Outcome> {
        plans
            .iter()
            .map(|p| match p {
                Plan::Keep | Plan::Copy(_) => Outcome::Decoded,
                Plan::Reason(r) => Outcome::Excluded(r.clone()),
                Plan::Decode => Outcome::Pending,
            })
            .collect()
    };
    let results_of = |outcomes: &[Outcome]| -> Vec<std::result::Result<usize, String>> {
        outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| match o {
                Outcome::Decoded => Ok(i),
                Outcome::Excluded(r) => Err(r.clone()),
                Outcome::Pending => Err("not decoded".to_string()),
            })
            .collect()
    };
    if in_place && to_decode == 0 {
        // Everything matches: read-only use, nothing written.
        let outcomes = from_plan(&plans);
        let cache = old_cache.context("cache file vanished")?;
        return Ok(Built { results: results_of(&outcomes), cache, decoded: 0, reused });
    }

    // From here on the cache is written: check the space, then preallocate.
    let manifest_of = |outcomes: Vec<Outcome>| Manifest {
        version: CACHE_VERSION,
        size,
        filter: FILTER.to_string(),
        entries: fps
            .iter()
            .cloned()
            .zip(outcomes)
            .map(|(fingerprint, outcome)| Entry { fingerprint, outcome })
            .collect(),
    };
    let tmp_path = dir.join(format!("{DATA_FILE}.tmp"));
    let mut guard = RemoveOnDrop(None);
    let file = if in_place {
        // Withdraw the slots about to be written before touching them.
        write_manifest(dir, &manifest_of(from_plan(&plans)))?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| write_error(e, "opening for writing", &data_path))?;
        preallocate(&file, total, &data_path)?;
        file
    } else {
        let free = free_space(dir)?;
        if total > free {
            bail!(
                "the cache needs {} ({total} bytes: {n} images of {size}x{size}x3 bytes) but {} has {} ({free} bytes) \
                 free: lower the image size (--size, or --image-size for train), free space, or pass --cache DIR on \
                 a larger disk",
                human_bytes(total),
                dir.display(),
                human_bytes(free)
            );
        }
        guard = RemoveOnDrop(Some(tmp_path.clone()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|e| write_error(e, "creating", &tmp_path))?;
        preallocate(&file, total, &tmp_path)?;
        file.set_len(total).map_err(|e| write_error(e, "sizing", &tmp_path))?;
        file.write_all_at(&header(size, n), 0).map_err(|e| write_error(e, "writing", &tmp_path))?;
        file
    };
    let target = if in_place { data_path.clone() } else { tmp_path.clone() };
    let offset = |i: usize| (DATA_OFFSET + i * slot_bytes) as u64;

    // Copies first (fast), so an interruption during decoding never loses reusable pixels.
    if let Some(oc) = &old_cache {
        plans
            .par_iter()
            .enumerate()
            .try_for_each(|(i, p)| match p {
                Plan::Copy(j) => file.write_all_at(oc.slot(*j), offset(i)),
                _ => Ok(()),
            })
            .map_err(|e| write_error(e, "writing", &target))?;
    }

    let pb = progress(to_decode, opts.quiet, "decoding");
    let decoded = AtomicUsize::new(0);
    let outcomes: Vec<std::io::Result<Outcome>> = candidates
        .par_iter()
        .zip(fps.par_iter())
        .zip(plans.par_iter())
        .enumerate()
        .map(|(i, ((c, fp), plan))| match plan {
            Plan::Keep | Plan::Copy(_) => Ok(Outcome::Decoded),
            Plan::Reason(r) => Ok(Outcome::Excluded(r.clone())),
            Plan::Decode => {
                if crate::interrupt::requested() {
                    return Ok(Outcome::Pending);
                }
                let outcome = match decode_one(c, fp, size) {
                    Ok(px) => {
                        file.write_all_at(&px, offset(i))?;
                        Outcome::Decoded
                    }
                    Err(reason) => Outcome::Excluded(reason),
                };
                let done = decoded.fetch_add(1, Ordering::Relaxed) + 1;
                if opts.stop_after_decodes.is_some_and(|k| done >= k) {
                    crate::interrupt::request();
                }
                pb.inc(1);
                Ok(outcome)
            }
        })
        .collect();
    pb.finish_and_clear();
    let mut first_error = None;
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| {
                first_error.get_or_insert(e);
                Outcome::Pending
            })
        })
        .collect();
    let decoded = decoded.into_inner();
    let pending = outcomes.iter().filter(|o| **o == Outcome::Pending).count();
    let synced = file.sync_data().map_err(|e| write_error(e, "writing", &target));
    drop(file);
    if let Some(e) = first_error {
        if in_place {
            // Keep what did reach the disk; the failed slots stay pending.
            if synced.is_ok() {
                let _ = write_manifest(dir, &manifest_of(outcomes));
            }
        }
        return Err(write_error(e, "writing", &target));
    }
    synced?;
    if !in_place {
        // The old manifest describes the old file: withdraw it before the new file takes its name.
        match fs::remove_file(dir.join(MANIFEST_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(write_error(e, "removing", &dir.join(MANIFEST_FILE)));
            }
            _ => {}
        }
        drop(old_cache);
        fs::rename(&tmp_path, &data_path).map_err(|e| write_error(e, "renaming the cache file to", &data_path))?;
        guard.disarm();
    }
    let results = results_of(&outcomes);
    write_manifest(dir, &manifest_of(outcomes))?;
    if pending > 0 {
        return Err(DecodeInterrupted { decoded, pending, cache: dir.display().to_string() }.into());
    }
    let cache = ImageCache::open(&data_path, size as usize, n)?;
    Ok(Built { cache, results, decoded, reused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_rounded_to_three_digits() {
        assert_eq!(format_rate(119.456_3), "119 images/s");
        assert_eq!(format_rate(42.345_6), "42.3 images/s");
        assert_eq!(format_rate(2.718_4), "2.72 images/s");
        assert_eq!(format_rate(0.0), "- images/s");
    }

    /// A full disk is an error from the preallocation and from `pwrite`, where a write through a memory map of
    /// a sparse file would have been a SIGBUS; the messages say what to do.
    #[test]
    fn a_full_disk_is_an_error_never_a_signal() {
        let tmp = tempfile::tempdir().unwrap();
        let at = tmp.path().join("disk");
        fs::create_dir_all(&at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            println!("SKIPPED: cannot mount a 1 MiB tmpfs (needs root)");
            return;
        }
        let result = std::panic::catch_unwind(|| {
            let path = at.join("big");
            let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
            let err = preallocate(&file, 4 << 20, &path).unwrap_err().to_string();
            assert!(err.contains("the disk is full") && err.contains("--cache DIR"), "{err}");
            assert!(free_space(&at).unwrap() <= 1 << 20);
            // Sparse file, then pwrite past the space: ENOSPC as an error.
            file.set_len(4 << 20).unwrap();
            let chunk = vec![1u8; 256 << 10];
            let e = (0..16u64).find_map(|k| file.write_all_at(&chunk, k * (256 << 10)).err()).unwrap();
            let msg = write_error(e, "writing", &path).to_string();
            assert!(msg.contains("the disk is full"), "{msg}");
        });
        let _ = std::process::Command::new("umount").arg("-l").arg(&at).status();
        result.unwrap();
    }

    #[test]
    fn fingerprint_sees_content_changes_that_keep_the_length() {
        let tmp = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        let p = root.join("a.jpg");
        let mut bytes = vec![7u8; 20_000];
        fs::write(&p, &bytes).unwrap();
        let a = Fingerprint::of("a", &p, &root);
        assert_eq!(a.key, "a.jpg");
        assert_eq!(a.len, Some(20_000));
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        // Same length and modification time, different last byte: the sample hash differs.
        bytes[19_999] = 8;
        fs::write(&p, &bytes).unwrap();
        fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        let b = Fingerprint::of("a", &p, &root);
        assert_eq!((a.len, a.mtime_ns), (b.len, b.mtime_ns));
        assert_ne!(a.sample, b.sample);
        // The same file through a path with `.` components has the same key.
        let c = Fingerprint::of("a", &root.join(".").join("a.jpg"), &root);
        assert_eq!(b, c);
    }
}
