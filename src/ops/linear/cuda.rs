//! CUDA launches of this family: the bias add and the bias gradient's column sum (kernels/linear.cu); the GEMMs are cuBLASLt's ([`crate::cuda::blas`]).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, span};
use anyhow::{Context, Result, ensure};
use cudarc::driver::LaunchConfig;

impl Kernels {
    /// y[r, c] += bias[c] over a row-major [rows, cols] matrix of T, with an f32 bias of `cols` (the master
    /// parameter), in place.
    pub fn bias_add<T: Elem>(&self, s: &Stream, y: DevSlice, bias: DevSlice, rows: usize, cols: usize) -> Result<()> {
        let total = rows.checked_mul(cols).context("bias add: size overflow")?;
        let y = y.checked::<T>(total, "bias add y")?;
        let b = bias.checked::<f32>(cols, "bias add bias")?;
        let f = self.entry("linear", &format!("bias_add_{}", T::SUFFIX))?;
        no_alias("bias_add", &[span::<T>("y", y, total)], &[span::<f32>("bias", b, cols)])?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: y holds rows*cols elements of T and bias cols floats (checked above), and they do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&b).arg(&r).arg(&c).run(s, self.flat_cfg(total)) }
    }

    /// out[c] = sum over rows of x[r, c] (`accumulate`: out[c] += it) for a row-major [rows, cols] x of T, in f32
    /// and in a fixed order (deterministic): the bias gradient of a linear layer, written or added into its f32
    /// gradient slot. Without `accumulate` out is not read.
    pub fn col_sum<T: Elem>(
        &self,
        s: &Stream,
        out: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(cols > 0, "column sum of a matrix with no columns");
        let total = rows.checked_mul(cols).context("column sum: size overflow")?;
        let out = out.checked::<f32>(cols, "column sum out")?;
        let x = x.checked::<T>(total, "column sum x")?;
        let f = self.entry("linear", &format!("col_sum_{}", T::SUFFIX))?;
        no_alias("col_sum", &[span::<f32>("out", out, cols)], &[span::<T>("x", x, total)])?;
        let blocks = u32::try_from(cols.div_ceil(32)).context("column sum: too many columns for one grid")?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let (r, c, acc) = (rows as i64, cols as i64, accumulate as i32);
        // SAFETY: out holds cols floats and x rows*cols elements of T (checked above); the grid covers the columns.
        unsafe { Launch::new(&f).arg(&out).arg(&x).arg(&r).arg(&c).arg(&acc).run(s, cfg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_and_layout_wrappers_refuse_short_or_overlapping_buffers() {
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let (k, st) = (&gpu.kernels, &gpu.stream);
        let big = gpu.upload(&[1.0f32; 256]).unwrap();
        let other = gpu.upload(&[0.0f32; 256]).unwrap();
        let (whole, out) = (DevSlice::of(&big), DevSlice::of(&other));
        let short = DevSlice::range(&big, 0, 4 * 11).unwrap();
        let e = k.bias_add::<f32>(st, short, out, 3, 4).unwrap_err().to_string();
        assert!(e.contains("bias add y") && e.contains("needs 12 x 4 bytes"), "{e}");
        let e = k.bias_add::<f32>(st, out, short, 1, 12).unwrap_err().to_string();
        assert!(e.contains("bias add bias"), "{e}");
        let e = k.bias_add::<f32>(st, whole, DevSlice::range(&big, 16, 16).unwrap(), 4, 4).unwrap_err().to_string();
        assert!(e.contains("bias_add: output y overlaps bias"), "{e}");
        let e = k.col_sum::<f32>(st, whole, whole, 4, 4, false).unwrap_err().to_string();
        assert!(e.contains("col_sum: output out overlaps x"), "{e}");
        let e = k.col_sum::<half::f16>(st, out, short, 2, 12, true).unwrap_err().to_string();
        assert!(e.contains("column sum x") && e.contains("needs 24 x 2 bytes"), "{e}");
        let e = k.permute_from_f32::<half::f16>(st, out, short, 3, 4).unwrap_err().to_string();
        assert!(e.contains("permute x"), "{e}");
        let e = k.transpose_add(st, whole, whole, 8, 8, true).unwrap_err().to_string();
        assert!(e.contains("transpose_add: output y overlaps x"), "{e}");
        let e = k.fill::<f32>(st, short, 0.0, 12).unwrap_err().to_string();
        assert!(e.contains("fill y"), "{e}");
        // Nothing was launched by the refused calls.
        assert_eq!(gpu.download::<f32>(&other, 256).unwrap(), vec![0.0f32; 256]);
        assert_eq!(gpu.download::<f32>(&big, 256).unwrap(), vec![1.0f32; 256]);
    }

    #[test]
    fn col_sum_adds_in_its_fixed_order_bit_for_bit() {
        // Eight row lanes each sum rows lane, lane + 8, ... in order; then lanes 0..8 are added in order. Values
        // spanning many magnitudes make any other order round differently.
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let (rows, cols) = (203usize, 37usize);
        let x: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 2654435761usize) % 1000) as f32 * 10f32.powi((i % 7) as i32 - 3)).collect();
        let bx = gpu.upload(&x).unwrap();
        let out = gpu.upload(&vec![0.5f32; cols]).unwrap();
        gpu.kernels.col_sum::<f32>(&gpu.stream, DevSlice::of(&out), DevSlice::of(&bx), rows, cols, true).unwrap();
        let got: Vec<f32> = gpu.download(&out, cols).unwrap();
        for (c, &g) in got.iter().enumerate() {
            let mut total = 0f32;
            for lane in 0..8 {
                let mut s = 0f32;
                for r in (lane..rows).step_by(8) {
                    s += x[r * cols + c];
                }
                total += s;
            }
            assert_eq!(g.to_bits(), (0.5 + total).to_bits(), "column {c}");
        }
    }
}
