//! CUDA launches of this family: batch statistics, normalization (+ activation) and backward (kernels/batchnorm.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, KernelArg, Kernels, Launch, no_alias, opt_checked, rows_split, span};
use anyhow::{Result, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Mirror of `BnParams` in kernels/batchnorm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BnParams {
    /// Rows N*H*W.
    pub m: i64,
    /// Channels.
    pub c: i32,
    /// 0: none, 1: SiLU after the affine.
    pub act: i32,
    /// Added to the variance.
    pub eps: f32,
    /// Running-statistics momentum (torch convention).
    pub momentum: f32,
    /// Backward: 1 uses batch statistics, 0 treats mean/invstd as constants.
    pub training: i32,
    /// Rows of the reduction workspace (gridDim.y of the reduction kernels).
    pub rows_split: i32,
}

/// Bytes of the batch-norm reduction workspace for [M, C] (float2 per row split and channel).
pub fn bn_workspace_bytes(m: i64, c: i32) -> usize {
    rows_split(m) as usize * c as usize * 8
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out exactly like its .cu mirror (pinned by a
// layout test below).
unsafe impl DeviceRepr for BnParams {}
// SAFETY: as above: the kernel reads it as one parameter of that C layout.
unsafe impl KernelArg for BnParams {}

impl Kernels {
    fn bn_reduce_cfg(p: &BnParams) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((p.c as u32).div_ceil(32), p.rows_split as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Batch-norm statistics of x [M, C] (training): mean and invstd [C] f32, running stats updated in place
    /// (either may be `None`). `workspace` holds [`bn_workspace_bytes`].
    #[allow(clippy::too_many_arguments)]
    pub fn bn_stats<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        x: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        running_mean: Option<DevSlice>,
        running_var: Option<DevSlice>,
        workspace: DevSlice,
    ) -> Result<()> {
        let mut p = *p;
        p.rows_split = rows_split(p.m);
        let (m, c) = (p.m as usize, p.c as usize);
        ensure!(p.m > 0 && p.c > 0, "batch norm on an empty tensor [{}, {}]", p.m, p.c);
        let x = x.checked::<T>(m * c, "bn x")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let rm = opt_checked::<f32>(running_mean, c, "bn running_mean")?;
        let rv = opt_checked::<f32>(running_var, c, "bn running_var")?;
        let ws = workspace.checked::<[f32; 2]>(p.rows_split as usize * c, "bn workspace")?;
        let f1 = self.entry("batchnorm", &format!("bn_stats_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("batchnorm", &format!("bn_stats_finalize_{}", T::SUFFIX))?;
        no_alias(
            "bn_stats",
            &[
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("running_mean", rm, c),
                span::<f32>("running_var", rv, c),
                span::<[f32; 2]>("workspace", ws, p.rows_split as usize * c),
            ],
            &[span::<T>("x", x, m * c)],
        )?;
        // SAFETY: x holds M*C elements, the workspace rows_split*C float2, mean/invstd/running C floats (checked
        // above); a null running pointer is skipped by the kernel.
        unsafe {
            Launch::new(&f1).arg(&x).arg(&ws).arg(&p).run(s, Self::bn_reduce_cfg(&p))?;
            Launch::new(&f2)
                .arg(&x)
                .arg(&ws)
                .arg(&mean)
                .arg(&invstd)
                .arg(&rm)
                .arg(&rv)
                .arg(&p)
                .run(s, Self::per_channel_cfg(p.c))?;
        }
        Ok(())
    }

    /// Eval-mode statistics: mean = running_mean, invstd = 1 / sqrt(running_var + eps).
    pub fn bn_eval_stats(
        &self,
        s: &Stream,
        p: &BnParams,
        running_mean: DevSlice,
        running_var: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
    ) -> Result<()> {
        let c = p.c as usize;
        let rm = running_mean.checked::<f32>(c, "bn running_mean")?;
        let rv = running_var.checked::<f32>(c, "bn running_var")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let f = self.entry("batchnorm", "bn_eval_stats")?;
        // SAFETY: four buffers of C floats (checked above).
        unsafe {
            Launch::new(&f).arg(&rm).arg(&rv).arg(&mean).arg(&invstd).arg(p).run(s, Self::per_channel_cfg(p.c))?;
        }
        Ok(())
    }

    /// y = act(gamma * (x - mean) * invstd + beta) over [M, C]; act from `p.act`.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_forward<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        y: DevSlice,
        x: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        gamma: DevSlice,
        beta: DevSlice,
    ) -> Result<()> {
        let (m, c) = (p.m as usize, p.c as usize);
        let y = y.checked::<T>(m * c, "bn y")?;
        let x = x.checked::<T>(m * c, "bn x")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let gamma = gamma.checked::<f32>(c, "bn gamma")?;
        let beta = beta.checked::<f32>(c, "bn beta")?;
        let f = self.entry("batchnorm", &format!("bn_forward_{}", T::SUFFIX))?;
        no_alias(
            "bn_forward",
            &[span::<T>("y", y, m * c)],
            &[
                span::<T>("x", x, m * c),
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("gamma", gamma, c),
                span::<f32>("beta", beta, c),
            ],
        )?;
        // SAFETY: x, y hold M*C elements; the per-channel buffers C floats (checked above).
        unsafe {
            Launch::new(&f)
                .arg(&y)
                .arg(&x)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(p)
                .run(s, self.flat_cfg(m * c / 4))?;
        }
        Ok(())
    }

    /// Batch-norm backward (with the SiLU of `p.act` fused): writes dgamma, dbeta (when given) and dx.
    /// `workspace` holds [`bn_workspace_bytes`]; `sums` holds 2*C floats.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_backward<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        dx: DevSlice,
        x: DevSlice,
        dy: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        gamma: DevSlice,
        beta: DevSlice,
        dgamma: Option<DevSlice>,
        dbeta: Option<DevSlice>,
        workspace: DevSlice,
        sums: DevSlice,
    ) -> Result<()> {
        let mut p = *p;
        p.rows_split = rows_split(p.m);
        let (m, c) = (p.m as usize, p.c as usize);
        let dx = dx.checked::<T>(m * c, "bn dx")?;
        let x = x.checked::<T>(m * c, "bn x")?;
        let dy = dy.checked::<T>(m * c, "bn dy")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let gamma = gamma.checked::<f32>(c, "bn gamma")?;
        let beta = beta.checked::<f32>(c, "bn beta")?;
        let dgamma = opt_checked::<f32>(dgamma, c, "bn dgamma")?;
        let dbeta = opt_checked::<f32>(dbeta, c, "bn dbeta")?;
        let ws = workspace.checked::<[f32; 2]>(p.rows_split as usize * c, "bn workspace")?;
        let sums = sums.checked::<f32>(2 * c, "bn sums")?;
        let f1 = self.entry("batchnorm", &format!("bn_backward_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("batchnorm", "bn_backward_finalize")?;
        let f3 = self.entry("batchnorm", &format!("bn_backward_dx_{}", T::SUFFIX))?;
        no_alias(
            "bn_backward",
            &[
                span::<T>("dx", dx, m * c),
                span::<f32>("dgamma", dgamma, c),
                span::<f32>("dbeta", dbeta, c),
                span::<[f32; 2]>("workspace", ws, p.rows_split as usize * c),
                span::<f32>("sums", sums, 2 * c),
            ],
            &[
                span::<T>("x", x, m * c),
                span::<T>("dy", dy, m * c),
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("gamma", gamma, c),
                span::<f32>("beta", beta, c),
            ],
        )?;
        // SAFETY: every buffer was checked against M, C and rows_split above; null dgamma/dbeta are skipped.
        unsafe {
            Launch::new(&f1)
                .arg(&x)
                .arg(&dy)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(&ws)
                .arg(&p)
                .run(s, Self::bn_reduce_cfg(&p))?;
            Launch::new(&f2).arg(&ws).arg(&dgamma).arg(&dbeta).arg(&sums).arg(&p).run(s, Self::per_channel_cfg(p.c))?;
            Launch::new(&f3)
                .arg(&dx)
                .arg(&x)
                .arg(&dy)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(&sums)
                .arg(&p)
                .run(s, self.flat_cfg(m * c))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bn_params_match_the_cu_layout_and_the_workspace_is_sized_by_row_splits() {
        // int64 first, then 4-byte fields, padded to 8.
        assert_eq!(size_of::<BnParams>(), 32);
        assert_eq!(std::mem::offset_of!(BnParams, eps), 16);
        assert_eq!(bn_workspace_bytes(512 * 10, 3), 10 * 3 * 8);
    }
}
