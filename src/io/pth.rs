//! `torch.save` files (`.pth`, `.pt`): a zip holding `<archive>/data.pkl` and the raw little-endian storages
//! `<archive>/data/<key>`. The archive folder is named after the file it was first saved as, so it is found by
//! looking for the entry that ends in `data.pkl`.

use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use zip::ZipArchive;

use super::pickle::{Value, unpickle};

/// First bytes of a zip archive (local file header).
pub const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// A state dict's pickle is a few hundred bytes per tensor; anything near this is not a weight file.
const MAX_PICKLE_BYTES: usize = 1 << 30;

/// Reads a torch.save file into a [`Value`] tree (tensors materialised on the CPU). Refuses any pickle global
/// outside the allow-list of [`super::pickle`]; never runs code from the file.
pub fn load_pth(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    load_pth_bytes(&bytes).with_context(|| format!("cannot load torch.save file {}", path.display()))
}

/// [`load_pth`] on bytes already in memory.
pub fn load_pth_bytes(bytes: &[u8]) -> Result<Value> {
    if !bytes.starts_with(ZIP_MAGIC) {
        if is_legacy_torch_save(bytes) {
            bail!(
                "this is the legacy (PyTorch < 1.6) torch.save format, which is not supported; re-save it with a \
                 recent PyTorch (`torch.save(torch.load(f), f)`) or convert it to safetensors"
            );
        }
        bail!("not a zip archive (torch.save writes zips since PyTorch 1.6)");
    }
    let mut zip = ZipArchive::new(Cursor::new(bytes)).context("the zip archive is corrupt or truncated")?;

    let names: Vec<String> =
        zip.file_names_raw().map(|n| String::from_utf8_lossy(n).into_owned()).filter(|n| is_pickle(n)).collect();
    let pkl = match names.as_slice() {
        [one] => one.clone(),
        [] => bail!("the zip has no `data.pkl` entry: not a torch.save archive"),
        many => {
            // torch.save writes exactly one; prefer the shallowest if some tool nested another archive.
            many.iter().min_by_key(|n| n.len()).cloned().ok_or_else(|| anyhow!("no data.pkl"))?
        }
    };
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();

    if let Ok(order) = read_entry(&mut zip, &format!("{prefix}byteorder"), 16) {
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            bail!("storages are stored {:?}-endian; only little-endian archives are supported", order.trim());
        }
    }

    let pickle = read_entry(&mut zip, &pkl, MAX_PICKLE_BYTES).with_context(|| format!("reading {pkl}"))?;
    let read_storage = |key: &str, nbytes: usize| -> Result<Vec<u8>> {
        if key.contains('/') || key.contains("..") {
            bail!("storage key {key:?} is not a plain name");
        }
        read_entry(&mut zip, &format!("{prefix}data/{key}"), nbytes)
    };
    unpickle(&pickle, read_storage).with_context(|| format!("decoding {pkl}"))
}

fn is_pickle(name: &str) -> bool {
    name == "data.pkl" || name.ends_with("/data.pkl")
}

/// Reads one zip entry, refusing entries larger than `limit` bytes (before allocating for them).
fn read_entry(zip: &mut ZipArchive<Cursor<&[u8]>>, name: &str, limit: usize) -> Result<Vec<u8>> {
    let entry = zip.by_name(name).with_context(|| format!("the archive has no entry {name}"))?;
    let size = entry.size();
    if size > limit as u64 {
        bail!("entry {name} holds {size} bytes, expected at most {limit}");
    }
    // The header's size is only a hint: cap the up-front allocation so a lying header cannot exhaust memory.
    let mut out = Vec::with_capacity((size as usize).min(1 << 26));
    // `take` also bounds entries whose header under-states their size.
    entry
        .take(limit.saturating_add(1) as u64)
        .read_to_end(&mut out)
        .with_context(|| format!("entry {name} is corrupt or truncated"))?;
    if out.len() > limit {
        bail!("entry {name} holds more than {limit} bytes");
    }
    Ok(out)
}

/// The pre-1.6 format starts with a pickled magic number (0x1950a86a20f9469cfc6c as a protocol-2 LONG1).
fn is_legacy_torch_save(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")
}
