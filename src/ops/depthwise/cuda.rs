//! CUDA launches of this family: depthwise convolution forward, backward data and backward weight, and the weight layout change between the model's [C, k·k] and the kernels' [k·k, C] (kernels/depthwise.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, KernelArg, Kernels, Launch, no_alias, rows_split, span};
use anyhow::{Context, Result, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Mirror of `DwParams` in kernels/depthwise.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DwParams {
    /// Batch.
    pub n: i32,
    /// Input height.
    pub h: i32,
    /// Input width.
    pub w: i32,
    /// Channels.
    pub c: i32,
    /// Output height.
    pub ho: i32,
    /// Output width.
    pub wo: i32,
    /// Kernel size.
    pub k: i32,
    /// Stride.
    pub stride: i32,
    /// Padding, (k - 1) / 2.
    pub pad: i32,
    /// gridDim.z of the weight-gradient kernel (rows of its workspace).
    pub rows_split: i32,
}

/// Bytes of the depthwise weight-gradient workspace.
pub fn dw_weight_workspace_bytes(p: &DwParams) -> usize {
    let rows = p.n as i64 * p.ho as i64 * p.wo as i64;
    rows_split(rows) as usize * (p.k * p.k) as usize * p.c as usize * 4
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out exactly like its .cu mirror (pinned by a
// layout test below).
unsafe impl DeviceRepr for DwParams {}
// SAFETY: as above: the kernel reads it as one parameter of that C layout.
unsafe impl KernelArg for DwParams {}

impl Kernels {
    /// Launch shape of the 32x32-tile transposes: blocks of (32, 8) taking tiles in a grid-stride loop.
    fn tile_cfg(&self, rows: usize, cols: usize) -> LaunchConfig {
        let tiles = rows.div_ceil(32) * cols.div_ceil(32);
        let blocks = tiles.clamp(1, (self.sms() * 8) as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
    }

    /// y [cols, rows] of T = the transpose of a row-major [rows, cols] f32 x, cast to T: the depthwise kernels'
    /// [k*k, C] weights from the model's [C, k*k] master (rows = C, cols = k*k).
    pub fn permute_from_f32<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let total = rows.checked_mul(cols).context("permute: size overflow")?;
        let y = y.checked::<T>(total, "permute y")?;
        let x = x.checked::<f32>(total, "permute x")?;
        let f = self.entry("depthwise", &format!("permute_f32_to_{}", T::SUFFIX))?;
        no_alias("permute", &[span::<T>("y", y, total)], &[span::<f32>("x", x, total)])?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: x and y hold rows*cols elements of their types (checked above) and do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&r).arg(&c).run(s, self.tile_cfg(rows, cols)) }
    }

    /// y[c, r] = x[r, c] (`accumulate`: y[c, r] += x[r, c]) for a row-major [rows, cols] f32 x and [cols, rows]
    /// f32 y: the depthwise kernels' [k*k, C] weight gradient (rows = k*k, cols = C) into the model's [C, k*k]
    /// gradient slot. Without `accumulate` y is not read.
    pub fn transpose_add(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let total = rows.checked_mul(cols).context("transpose add: size overflow")?;
        let y = y.checked::<f32>(total, "transpose add y")?;
        let x = x.checked::<f32>(total, "transpose add x")?;
        let f = self.entry("depthwise", "transpose_add_f32")?;
        no_alias("transpose_add", &[span::<f32>("y", y, total)], &[span::<f32>("x", x, total)])?;
        let (r, c, acc) = (rows as i64, cols as i64, accumulate as i32);
        // SAFETY: x and y hold rows*cols floats (checked above) and do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&r).arg(&c).arg(&acc).run(s, self.tile_cfg(rows, cols)) }
    }

    fn dw_check(p: &DwParams) -> Result<()> {
        ensure!(p.k > 0 && p.k % 2 == 1, "depthwise kernel size {} must be odd", p.k);
        ensure!(p.pad == (p.k - 1) / 2, "depthwise padding {} must be (k-1)/2 = {}", p.pad, (p.k - 1) / 2);
        ensure!(p.stride > 0, "depthwise stride must be positive");
        let ho = (p.h + 2 * p.pad - p.k) / p.stride + 1;
        let wo = (p.w + 2 * p.pad - p.k) / p.stride + 1;
        ensure!(p.ho == ho && p.wo == wo, "depthwise output {}x{} should be {ho}x{wo}", p.ho, p.wo);
        Ok(())
    }

    /// Depthwise conv forward: y [N,Ho,Wo,C] from x [N,H,W,C] and w [k,k,C].
    pub fn dw_forward<T: Elem>(&self, s: &Stream, p: &DwParams, y: DevSlice, x: DevSlice, w: DevSlice) -> Result<()> {
        Self::dw_check(p)?;
        let (n, c) = (p.n as usize, p.c as usize);
        let out_elems = n * p.ho as usize * p.wo as usize * c;
        let y = y.checked::<T>(out_elems, "depthwise y")?;
        let x = x.checked::<T>(n * p.h as usize * p.w as usize * c, "depthwise x")?;
        let w = w.checked::<T>((p.k * p.k) as usize * c, "depthwise w")?;
        let f = self.entry("depthwise", &format!("dw_forward_{}", T::SUFFIX))?;
        let in_elems = n * p.h as usize * p.w as usize * c;
        no_alias(
            "dw_forward",
            &[span::<T>("y", y, out_elems)],
            &[span::<T>("x", x, in_elems), span::<T>("w", w, (p.k * p.k) as usize * c)],
        )?;
        // SAFETY: shapes checked above; the kernel indexes only inside them.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&w).arg(p).run(s, self.flat_cfg(out_elems))? };
        Ok(())
    }

    /// Depthwise conv backward data: dx [N,H,W,C] from dy [N,Ho,Wo,C] and w [k,k,C].
    pub fn dw_backward_data<T: Elem>(
        &self,
        s: &Stream,
        p: &DwParams,
        dx: DevSlice,
        dy: DevSlice,
        w: DevSlice,
    ) -> Result<()> {
        Self::dw_check(p)?;
        let (n, c) = (p.n as usize, p.c as usize);
        let in_elems = n * p.h as usize * p.w as usize * c;
        let dx = dx.checked::<T>(in_elems, "depthwise dx")?;
        let dy = dy.checked::<T>(n * p.ho as usize * p.wo as usize * c, "depthwise dy")?;
        let w = w.checked::<T>((p.k * p.k) as usize * c, "depthwise w")?;
        let f = self.entry("depthwise", &format!("dw_backward_data_{}", T::SUFFIX))?;
        let out_elems = n * p.ho as usize * p.wo as usize * c;
        no_alias(
            "dw_backward_data",
            &[span::<T>("dx", dx, in_elems)],
            &[span::<T>("dy", dy, out_elems), span::<T>("w", w, (p.k * p.k) as usize * c)],
        )?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&dx).arg(&dy).arg(&w).arg(p).run(s, self.flat_cfg(in_elems))? };
        Ok(())
    }

    /// Depthwise conv backward weight: dw [k,k,C] f32 (written, or added to when `accumulate`).
    /// `workspace` holds [`dw_weight_workspace_bytes`].
    #[allow(clippy::too_many_arguments)]
    pub fn dw_backward_weight<T: Elem>(
        &self,
        s: &Stream,
        p: &DwParams,
        dw: DevSlice,
        x: DevSlice,
        dy: DevSlice,
        workspace: DevSlice,
        accumulate: bool,
    ) -> Result<()> {
        Self::dw_check(p)?;
        let mut p = *p;
        p.rows_split = rows_split(p.n as i64 * p.ho as i64 * p.wo as i64);
        let (n, c, kk) = (p.n as usize, p.c as usize, (p.k * p.k) as usize);
        let dw = dw.checked::<f32>(kk * c, "depthwise dw")?;
        let x = x.checked::<T>(n * p.h as usize * p.w as usize * c, "depthwise x")?;
        let dy = dy.checked::<T>(n * p.ho as usize * p.wo as usize * c, "depthwise dy")?;
        let ws = workspace.checked::<f32>(p.rows_split as usize * kk * c, "depthwise workspace")?;
        let f1 = self.entry("depthwise", &format!("dw_backward_weight_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("depthwise", "sum_rows_f32")?;
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(32), kk as u32, p.rows_split as u32),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols, acc) = (p.rows_split, (kk * c) as i64, accumulate as i32);
        no_alias(
            "dw_backward_weight",
            &[span::<f32>("dw", dw, kk * c), span::<f32>("workspace", ws, p.rows_split as usize * kk * c)],
            &[
                span::<T>("x", x, n * p.h as usize * p.w as usize * c),
                span::<T>("dy", dy, n * p.ho as usize * p.wo as usize * c),
            ],
        )?;
        // SAFETY: shapes and the workspace size checked above.
        unsafe {
            Launch::new(&f1).arg(&ws).arg(&x).arg(&dy).arg(&p).run(s, cfg)?;
            Launch::new(&f2)
                .arg(&dw)
                .arg(&ws)
                .arg(&rows)
                .arg(&cols)
                .arg(&acc)
                .run(s, Self::per_channel_cfg((kk * c) as i32))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dw_params_match_the_cu_layout() {
        assert_eq!(size_of::<DwParams>(), 40);
    }
}
