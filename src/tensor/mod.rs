//! Tensors: shapes, element types and storage.
//!
//! Two kinds live here:
//! - [`Array<T>`]: a typed, contiguous, row-major CPU array. The CPU reference backend and the autograd compute on
//!   it, generic over `f32` and `f64` (see [`Float`]).
//! - [`Tensor`]: a dynamically typed tensor (f32, f16, bf16, f64, i64, u8) tagged with a [`Device`]. It is what
//!   crosses the boundaries: weight files, `derma forward` inputs and outputs, checkpoints.
//!
//! Image-shaped activations are NHWC inside the engine; NCHW appears only at the boundary
//! ([`nchw_to_nhwc`], [`nhwc_to_nchw`]).

use anyhow::{Result, bail};
use half::{bf16, f16};

mod float;
pub use float::Float;

/// Where a tensor's storage lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Element types derma reads, writes or computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of elements of a shape (1 for a scalar `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// A typed, contiguous, row-major CPU array: the unit the reference backend computes on.
#[derive(Clone, Debug, PartialEq)]
pub struct Array<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Float> Array<T> {
    /// Wraps `data` as an array of `shape`; errors when the sizes disagree.
    pub fn new(shape: &[usize], data: Vec<T>) -> Result<Self> {
        if numel(shape) != data.len() {
            bail!("shape {:?} needs {} elements, got {}", shape, numel(shape), data.len());
        }
        Ok(Self { shape: shape.to_vec(), data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), data: vec![T::zero(); numel(shape)] }
    }

    pub fn full(shape: &[usize], v: T) -> Self {
        Self { shape: shape.to_vec(), data: vec![v; numel(shape)] }
    }

    pub fn scalar(v: T) -> Self {
        Self { shape: vec![], data: vec![v] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.data.len() {
            bail!("cannot reshape {:?} to {:?}", self.shape, shape);
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Converts every element to another float type.
    pub fn cast<U: Float>(&self) -> Array<U> {
        Array { shape: self.shape.clone(), data: self.data.iter().map(|&v| U::of_f64(v.as_f64())).collect() }
    }
}

/// Dynamically typed storage of a [`Tensor`] on the host.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::F64(_) => DType::F64,
            Storage::I64(_) => DType::I64,
            Storage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::I64(v) => v.len(),
            Storage::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes of the elements (the layout of safetensors and torch.save storages).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Storage::F32(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::F16(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::BF16(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::F64(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::I64(v) => bytemuck::cast_slice(v).to_vec(),
            Storage::U8(v) => v.clone(),
        }
    }

    /// Decodes little-endian bytes; errors when the byte count is not a whole number of elements.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            bail!("{} bytes is not a whole number of {} elements", bytes.len(), dtype);
        }
        // `pod_collect_to_vec` copies, so unaligned input is fine.
        Ok(match dtype {
            DType::F32 => Storage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => Storage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => Storage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F64 => Storage::F64(bytemuck::pod_collect_to_vec(bytes)),
            DType::I64 => Storage::I64(bytemuck::pod_collect_to_vec(bytes)),
            DType::U8 => Storage::U8(bytes.to_vec()),
        })
    }
}

/// A dynamically typed tensor with a device tag: the boundary type for files and tools.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub storage: Storage,
    pub device: Device,
}

impl Tensor {
    /// A host tensor; errors when the element count disagrees with the shape.
    pub fn new(shape: &[usize], storage: Storage) -> Result<Self> {
        if numel(shape) != storage.len() {
            bail!("shape {:?} needs {} elements, storage holds {}", shape, numel(shape), storage.len());
        }
        Ok(Self { shape: shape.to_vec(), storage, device: Device::Cpu })
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::F32(data))
    }

    pub fn from_i64(shape: &[usize], data: Vec<i64>) -> Result<Self> {
        Self::new(shape, Storage::I64(data))
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn numel(&self) -> usize {
        self.storage.len()
    }

    /// The elements as f64 (lossless for every float type; i64 beyond 2^53 rounds).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.storage {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::F64(v) => v.clone(),
            Storage::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::U8(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The elements as f32 (rounding f64 and large integers).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::F32(v) => v.clone(),
            _ => self.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        }
    }

    /// A typed array of any float type (the usual way into the reference backend).
    pub fn to_array<T: Float>(&self) -> Array<T> {
        Array { shape: self.shape.clone(), data: self.to_f64_vec().into_iter().map(T::of_f64).collect() }
    }

    /// Integer elements; errors for float tensors holding non-integers.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        match &self.storage {
            Storage::I64(v) => Ok(v.clone()),
            Storage::U8(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            _ => {
                let v = self.to_f64_vec();
                if v.iter().any(|x| x.fract() != 0.0) {
                    bail!("expected integer values in a {} tensor", self.dtype());
                }
                Ok(v.into_iter().map(|x| x as i64).collect())
            }
        }
    }

    /// An f32 tensor from a typed array.
    pub fn from_array<T: Float>(a: &Array<T>) -> Self {
        Self {
            shape: a.shape.clone(),
            storage: Storage::F32(a.data.iter().map(|v| v.as_f64() as f32).collect()),
            device: Device::Cpu,
        }
    }

    /// Same elements converted to `dtype` (float types round to nearest).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let v = self.to_f64_vec();
        let storage = match dtype {
            DType::F32 => Storage::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F16 => Storage::F16(v.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => Storage::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F64 => Storage::F64(v),
            DType::I64 => Storage::I64(v.iter().map(|&x| x as i64).collect()),
            DType::U8 => Storage::U8(v.iter().map(|&x| x.clamp(0.0, 255.0) as u8).collect()),
        };
        Tensor { shape: self.shape.clone(), storage, device: self.device }
    }
}

/// Permutes a `[N, C, H, W]` buffer into `[N, H, W, C]`.
pub fn nchw_to_nhwc<T: Copy>(src: &[T], n: usize, c: usize, h: usize, w: usize) -> Vec<T> {
    assert_eq!(src.len(), n * c * h * w, "nchw_to_nhwc: buffer length does not match the dims");
    let mut out = Vec::with_capacity(src.len());
    for ni in 0..n {
        for y in 0..h {
            for x in 0..w {
                for ci in 0..c {
                    out.push(src[((ni * c + ci) * h + y) * w + x]);
                }
            }
        }
    }
    out
}

/// Permutes a `[N, H, W, C]` buffer into `[N, C, H, W]`.
pub fn nhwc_to_nchw<T: Copy>(src: &[T], n: usize, h: usize, w: usize, c: usize) -> Vec<T> {
    assert_eq!(src.len(), n * c * h * w, "nhwc_to_nchw: buffer length does not match the dims");
    let mut out = Vec::with_capacity(src.len());
    for ni in 0..n {
        for ci in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out.push(src[((ni * h + y) * w + x) * c + ci]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_roundtrip() {
        let (n, c, h, w) = (2, 3, 5, 7);
        let src: Vec<u32> = (0..(n * c * h * w) as u32).collect();
        let nhwc = nchw_to_nhwc(&src, n, c, h, w);
        // element (n=1, c=2, y=3, x=4) in both layouts
        assert_eq!(nhwc[((h + 3) * w + 4) * c + 2], src[((c + 2) * h + 3) * w + 4]);
        assert_eq!(nhwc_to_nchw(&nhwc, n, h, w, c), src);
    }

    #[test]
    fn storage_bytes_roundtrip() {
        let s = Storage::F16(vec![f16::from_f32(1.5), f16::from_f32(-2.0)]);
        let b = s.to_le_bytes();
        assert_eq!(Storage::from_le_bytes(DType::F16, &b).unwrap(), s);
        assert!(Storage::from_le_bytes(DType::F32, &b[..3]).is_err());
    }
}
