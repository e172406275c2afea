//! CUDA launches of this family: add, scale/axpy, f32↔f16 casts and fill (kernels/elementwise.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, Span, no_alias, span};
use anyhow::Result;

impl Kernels {
    /// y = a + b.
    pub fn add<T: Elem>(&self, s: &Stream, y: DevSlice, a: DevSlice, b: DevSlice, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("add_{}", T::SUFFIX))?;
        let (y, a, b) = (y.checked::<T>(n, "add y")?, a.checked::<T>(n, "add a")?, b.checked::<T>(n, "add b")?);
        let n = n as i64;
        let n_ = n as usize;
        no_alias("add", &[span::<T>("y", y, n_)], &[span::<T>("a", a, n_), span::<T>("b", b, n_)])?;
        // SAFETY: all three buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&a).arg(&b).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y = alpha * x (`axpy = false`) or y += alpha * x (`axpy = true`).
    pub fn scale<T: Elem>(&self, s: &Stream, y: DevSlice, x: DevSlice, alpha: f32, n: usize, axpy: bool) -> Result<()> {
        let name = if axpy { "axpy" } else { "scale" };
        let f = self.entry("elementwise", &format!("{name}_{}", T::SUFFIX))?;
        let (y, x) = (y.checked::<T>(n, "scale y")?, x.checked::<T>(n, "scale x")?);
        let n = n as i64;
        no_alias(name, &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: both buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&alpha).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// fp32 -> fp16 (`to_half = true`) or fp16 -> fp32 copy of `n` elements.
    pub fn cast(&self, s: &Stream, y: DevSlice, x: DevSlice, n: usize, to_half: bool) -> Result<()> {
        let (name, y, x) = if to_half {
            ("cast_f32_to_f16", y.checked::<half::f16>(n, "cast y")?, x.checked::<f32>(n, "cast x")?)
        } else {
            ("cast_f16_to_f32", y.checked::<f32>(n, "cast y")?, x.checked::<half::f16>(n, "cast x")?)
        };
        let f = self.entry("elementwise", name)?;
        let n = n as i64;
        let (es_y, es_x) = if to_half { (2, 4) } else { (4, 2) };
        no_alias(name, &[Span::new("y", y, n as usize * es_y)], &[Span::new("x", x, n as usize * es_x)])?;
        // SAFETY: x and y hold n elements of their types (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y = value (rounded to T) over `n` elements, without reading y: the backward seed, or zeroing a gradient
    /// buffer that may hold NaN (which `scale` with alpha 0 would keep).
    pub fn fill<T: Elem>(&self, s: &Stream, y: DevSlice, value: f32, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("fill_{}", T::SUFFIX))?;
        let y = y.checked::<T>(n, "fill y")?;
        let n = n as i64;
        // SAFETY: y holds n elements of T (checked above); the kernel writes y[0..n) only.
        unsafe { Launch::new(&f).arg(&y).arg(&value).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::activation::Unary;

    #[test]
    fn restrict_wrappers_refuse_in_place_calls() {
        // On the emulated device the wrappers refuse before launching.
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let blk = gpu.upload(&[1.0f32; 64]).unwrap();
        let whole = DevSlice::of(&blk);
        let e = gpu.kernels.unary::<f32>(&gpu.stream, Unary::Silu, whole, whole, 64).unwrap_err().to_string();
        assert!(e.contains("unary: output y overlaps x") && e.contains("__restrict__"), "{e}");
        let shifted = DevSlice::range(&blk, 16, 128).unwrap();
        let e = gpu.kernels.add::<f32>(&gpu.stream, shifted, whole, whole, 32).unwrap_err().to_string();
        assert!(e.contains("add: output y overlaps a"), "{e}");
        let e = gpu.kernels.scale::<f32>(&gpu.stream, shifted, whole, 2.0, 32, true).unwrap_err().to_string();
        assert!(e.contains("axpy: output y overlaps x"), "{e}");
        // Separate buffers run.
        let other = gpu.upload(&[0.0f32; 64]).unwrap();
        gpu.kernels.unary::<f32>(&gpu.stream, Unary::Relu, DevSlice::of(&other), whole, 64).unwrap();
        assert_eq!(gpu.download::<f32>(&other, 64).unwrap(), vec![1.0f32; 64]);
    }
}
