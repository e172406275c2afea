//! CUDA launches of this family: global average pooling and its backward (`se_pool*` in kernels/se.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, span};
use anyhow::Result;
use cudarc::driver::LaunchConfig;

impl Kernels {
    pub(crate) fn se_reduce_cfg(n: i32, c: i32) -> LaunchConfig {
        LaunchConfig { grid_dim: ((c as u32).div_ceil(32), n as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
    }

    /// Global average pool [N, HW, C] -> [N, C].
    pub fn se_pool<T: Elem>(&self, s: &Stream, out: DevSlice, x: DevSlice, n: i32, hw: i32, c: i32) -> Result<()> {
        let out = out.checked::<T>((n * c) as usize, "se pool out")?;
        let x = x.checked::<T>(n as usize * hw as usize * c as usize, "se pool x")?;
        let f = self.entry("se", &format!("se_pool_{}", T::SUFFIX))?;
        let (nc, total) = ((n * c) as usize, n as usize * hw as usize * c as usize);
        no_alias("se_pool", &[span::<T>("out", out, nc)], &[span::<T>("x", x, total)])?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&out).arg(&x).arg(&hw).arg(&c).run(s, Self::se_reduce_cfg(n, c))? };
        Ok(())
    }

    /// Pool backward: dx[n, hw, c] = dout[n, c] / HW.
    #[allow(clippy::too_many_arguments)]
    pub fn se_pool_backward<T: Elem>(
        &self,
        s: &Stream,
        dx: DevSlice,
        dout: DevSlice,
        n: i32,
        hw: i32,
        c: i32,
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let dx = dx.checked::<T>(total, "se pool dx")?;
        let dout = dout.checked::<T>((n * c) as usize, "se pool dout")?;
        let f = self.entry("se", &format!("se_pool_backward_{}", T::SUFFIX))?;
        no_alias("se_pool_backward", &[span::<T>("dx", dx, total)], &[span::<T>("dout", dout, (n * c) as usize)])?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&dx).arg(&dout).arg(&n).arg(&hw).arg(&c).run(s, self.flat_cfg(total))? };
        Ok(())
    }
}
