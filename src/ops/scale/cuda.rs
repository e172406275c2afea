//! CUDA launches of this family: squeeze-excite's channel scaling and its backward (`se_scale*` in kernels/se.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, opt_checked, span};
use anyhow::Result;

impl Kernels {
    /// Channel scaling y[n, hw, c] = x[n, hw, c] * scale[n, c].
    #[allow(clippy::too_many_arguments)]
    pub fn se_scale<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        scale: DevSlice,
        n: i32,
        hw: i32,
        c: i32,
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let y = y.checked::<T>(total, "se scale y")?;
        let x = x.checked::<T>(total, "se scale x")?;
        let sc = scale.checked::<T>((n * c) as usize, "se scale s")?;
        let f = self.entry("se", &format!("se_scale_{}", T::SUFFIX))?;
        no_alias(
            "se_scale",
            &[span::<T>("y", y, total)],
            &[span::<T>("x", x, total), span::<T>("scale", sc, (n * c) as usize)],
        )?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&sc).arg(&n).arg(&hw).arg(&c).run(s, self.flat_cfg(total / 4))? };
        Ok(())
    }

    /// Channel scaling backward: dx = dy * scale (skipped when `dx` is `None`) and dscale[n, c] = sum_hw dy * x.
    #[allow(clippy::too_many_arguments)]
    pub fn se_scale_backward<T: Elem>(
        &self,
        s: &Stream,
        dx: Option<DevSlice>,
        dscale: DevSlice,
        x: DevSlice,
        scale: DevSlice,
        dy: DevSlice,
        (n, hw, c): (i32, i32, i32),
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let dx = opt_checked::<T>(dx, total, "se scale dx")?;
        let ds = dscale.checked::<T>((n * c) as usize, "se scale dscale")?;
        let x = x.checked::<T>(total, "se scale x")?;
        let sc = scale.checked::<T>((n * c) as usize, "se scale s")?;
        let dy = dy.checked::<T>(total, "se scale dy")?;
        let f = self.entry("se", &format!("se_scale_backward_{}", T::SUFFIX))?;
        no_alias(
            "se_scale_backward",
            &[span::<T>("dx", dx, total), span::<T>("dscale", ds, (n * c) as usize)],
            &[span::<T>("x", x, total), span::<T>("scale", sc, (n * c) as usize), span::<T>("dy", dy, total)],
        )?;
        // SAFETY: shapes checked above; a null dx is skipped by the kernel.
        unsafe {
            Launch::new(&f)
                .arg(&dx)
                .arg(&ds)
                .arg(&x)
                .arg(&sc)
                .arg(&dy)
                .arg(&hw)
                .arg(&c)
                .run(s, Self::se_reduce_cfg(n, c))?
        };
        Ok(())
    }
}
