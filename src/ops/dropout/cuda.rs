//! CUDA launches of this family: dropout and stochastic depth with counter masks (kernels/dropout.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, opt_checked, span};
use anyhow::{Result, ensure};

impl Kernels {
    /// Dropout with the counter-based mask of `seed` (backward: the same call on dy with the same seed).
    pub fn dropout<T: Elem>(&self, s: &Stream, y: DevSlice, x: DevSlice, p: f32, seed: u64, n: usize) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "dropout probability {p} must be in [0, 1)");
        let (y, x) = (y.checked::<T>(n, "dropout y")?, x.checked::<T>(n, "dropout x")?);
        let f = self.entry("dropout", &format!("dropout_{}", T::SUFFIX))?;
        let n = n as i64;
        no_alias("dropout", &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: both buffers hold n elements (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&p).arg(&seed).arg(&n).run(s, self.flat_cfg(n as usize))? };
        Ok(())
    }

    /// Stochastic depth ("row" mode): y = residual + keep_n / (1 - p) * x with one coin per sample of
    /// `per_sample` elements (backward: the same call on dy, no residual).
    #[allow(clippy::too_many_arguments)]
    pub fn stochastic_depth<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        residual: Option<DevSlice>,
        p: f32,
        seed: u64,
        (n, per_sample): (usize, usize),
    ) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "stochastic depth probability {p} must be in [0, 1)");
        ensure!(
            per_sample > 0 && n % per_sample == 0,
            "stochastic depth: {n} elements are not whole samples of {per_sample}"
        );
        let y = y.checked::<T>(n, "stochastic depth y")?;
        let x = x.checked::<T>(n, "stochastic depth x")?;
        let r = opt_checked::<T>(residual, n, "stochastic depth residual")?;
        let f = self.entry("dropout", &format!("stochastic_depth_{}", T::SUFFIX))?;
        let (n, per) = (n as i64, per_sample as i64);
        no_alias(
            "stochastic_depth",
            &[span::<T>("y", y, n as usize)],
            &[span::<T>("x", x, n as usize), span::<T>("residual", r, n as usize)],
        )?;
        // SAFETY: buffers hold n elements (checked above); a null residual is skipped.
        unsafe {
            Launch::new(&f)
                .arg(&y)
                .arg(&x)
                .arg(&r)
                .arg(&p)
                .arg(&seed)
                .arg(&n)
                .arg(&per)
                .run(s, self.flat_cfg(n as usize))?
        };
        Ok(())
    }
}
