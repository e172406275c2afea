//! safetensors files: read and write a [`StateDict`] with string metadata, and an atomic file writer.
//!
//! Tensors are written through the `safetensors` crate, which orders them by dtype alignment and then by name (so
//! every tensor stays aligned for readers that map the file). Reading returns them in file (offset) order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::tensor::{Dtype, SafeTensors, View};

use super::state_dict::StateDict;
use crate::tensor::{DType, Storage, Tensor};

/// True when `bytes` look like a safetensors file: an 8-byte little-endian header length, then a JSON object that
/// fits in the file.
pub fn is_safetensors(bytes: &[u8]) -> bool {
    let Some(head) = bytes.get(..8) else { return false };
    let mut a = [0u8; 8];
    a.copy_from_slice(head);
    let n = u64::from_le_bytes(a);
    n >= 2 && n <= (bytes.len() as u64).saturating_sub(8) && bytes.get(8) == Some(&b'{')
}

/// When `bytes` start like a safetensors file (a header length, then `{`) but the header length runs past the end
/// of the file, says so with both numbers; `None` otherwise.
pub fn safetensors_header_overrun(bytes: &[u8]) -> Option<String> {
    let head: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let n = u64::from_le_bytes(head);
    let room = bytes.len() as u64 - 8;
    if n <= room || bytes.get(8) != Some(&b'{') {
        return None;
    }
    Some(format!(
        "this safetensors file's header length is {n} bytes, larger than the {room} bytes that follow it (the file \
         is {} bytes): the file is truncated or corrupt; copy or download it again",
        bytes.len()
    ))
}

/// When the header of a safetensors file parses but its tensors end past the end of the file, says how much is
/// missing.
fn data_overrun(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let end = header
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let have = (bytes.len() - 8 - n) as u64;
    (end > have).then(|| {
        format!(
            "the tensors end at byte {end} of the data section but only {have} bytes follow the header (the file is \
             {} bytes, {} missing): the file is truncated; copy or download it again",
            bytes.len(),
            end - have
        )
    })
}

/// Loads a safetensors file: the tensors in file order and the header metadata (empty when there is none).
pub fn load_safetensors(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    load_safetensors_bytes(&bytes).with_context(|| format!("cannot load safetensors file {}", path.display()))
}

/// [`load_safetensors`] on bytes already in memory.
pub fn load_safetensors_bytes(bytes: &[u8]) -> Result<(StateDict, HashMap<String, String>)> {
    if let Some(why) = safetensors_header_overrun(bytes).or_else(|| data_overrun(bytes)) {
        bail!(why);
    }
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("invalid safetensors header: {e}"))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("invalid safetensors file: {e}"))?;
    let mut sd = StateDict::new();
    for name in header.offset_keys() {
        let view = st.tensor(&name).map_err(|e| anyhow!("tensor {name}: {e}"))?;
        let storage = decode(view.dtype(), view.data()).with_context(|| format!("tensor {name}"))?;
        let t = Tensor::new(view.shape(), storage).with_context(|| format!("tensor {name}"))?;
        sd.insert(name, t);
    }
    Ok((sd, header.metadata().clone().unwrap_or_default()))
}

/// Narrow integer and bool types widen to i64/u8 (exactly), since [`Storage`] has no such element types.
fn decode(dtype: Dtype, b: &[u8]) -> Result<Storage> {
    fn widen<const N: usize>(b: &[u8], f: fn([u8; N]) -> i64) -> Storage {
        Storage::I64(
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect(),
        )
    }
    Ok(match dtype {
        Dtype::F32 => Storage::from_le_bytes(DType::F32, b)?,
        Dtype::F16 => Storage::from_le_bytes(DType::F16, b)?,
        Dtype::BF16 => Storage::from_le_bytes(DType::BF16, b)?,
        Dtype::F64 => Storage::from_le_bytes(DType::F64, b)?,
        Dtype::I64 => Storage::from_le_bytes(DType::I64, b)?,
        Dtype::U8 => Storage::U8(b.to_vec()),
        Dtype::BOOL => Storage::U8(b.iter().map(|&x| (x != 0) as u8).collect()),
        Dtype::I32 => widen::<4>(b, |a| i32::from_le_bytes(a) as i64),
        Dtype::U32 => widen::<4>(b, |a| u32::from_le_bytes(a) as i64),
        Dtype::I16 => widen::<2>(b, |a| i16::from_le_bytes(a) as i64),
        Dtype::U16 => widen::<2>(b, |a| u16::from_le_bytes(a) as i64),
        Dtype::I8 => widen::<1>(b, |a| a[0] as i8 as i64),
        other => bail!("element type {other:?} is not supported (use f32, f16, bf16, f64, i64 or u8)"),
    })
}

/// Adapts a [`Tensor`] to the writer.
struct TensorView<'a>(&'a Tensor);

impl View for TensorView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F64 => Dtype::F64,
            DType::I64 => Dtype::I64,
            DType::U8 => Dtype::U8,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            // The in-memory elements already are the file's little-endian bytes.
            Cow::Borrowed(match &self.0.storage {
                Storage::F32(v) => bytemuck::cast_slice(v),
                Storage::F16(v) => bytemuck::cast_slice(v),
                Storage::BF16(v) => bytemuck::cast_slice(v),
                Storage::F64(v) => bytemuck::cast_slice(v),
                Storage::I64(v) => bytemuck::cast_slice(v),
                Storage::U8(v) => v,
            })
        } else {
            Cow::Owned(self.0.storage.to_le_bytes())
        }
    }

    fn data_len(&self) -> usize {
        self.0.numel() * self.0.dtype().size()
    }
}

/// The safetensors encoding of `sd` with optional string metadata.
pub fn safetensors_bytes(sd: &StateDict, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    for (name, t) in sd.iter() {
        if t.numel() != crate::tensor::numel(&t.shape) {
            bail!("tensor {name}: shape {:?} does not match its {} elements", t.shape, t.numel());
        }
    }
    safetensors::tensor::serialize(sd.iter().map(|(n, t)| (n, TensorView(t))), metadata)
        .map_err(|e| anyhow!("cannot encode safetensors: {e}"))
}

/// Writes `sd` as a safetensors file that `safetensors.torch.load_file` reads back with the same names, shapes and
/// dtypes (a scalar such as `num_batches_tracked` keeps shape `[]`). The write is atomic: see [`write_atomic`].
pub fn save_safetensors(path: &Path, sd: &StateDict, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let bytes = safetensors_bytes(sd, metadata).with_context(|| format!("cannot write {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one: a temporary file in
/// the same folder is written, flushed to disk and renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot flush {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        // Make the rename itself durable; not every platform can sync a directory, so failure here is ignored.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
