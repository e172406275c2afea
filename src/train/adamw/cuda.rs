//! CUDA launches of this family: gradient unscaling with the inf/NaN flag and the AdamW step (kernels/optim.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, KernelArg, Kernels, Launch, no_alias, opt_checked, span};
use anyhow::Result;
use cudarc::driver::DeviceRepr;

/// Mirror of `AdamParams` in kernels/optim.cu: the step's scalars, computed in f64 and rounded to f32 once (see
/// [`AdamParams::for_step`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamParams {
    /// Elements.
    pub n: i64,
    /// 1 − lr·weight_decay.
    pub decay: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    /// −lr / (1 − β1^t).
    pub neg_step_size: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Padding to 40 bytes (a multiple of the i64's alignment), as in C.
    pub pad_: i32,
}

impl AdamParams {
    /// Parameters for step `t` (1-based) at learning rate `lr`, with the scalars computed exactly as the CPU
    /// optimizer ([`crate::train::adamw::AdamW::step_one`]) computes them: in f64, rounded to f32 once.
    pub fn for_step(n: usize, t: u64, lr: f64, cfg: &crate::train::adamw::AdamWConfig) -> Self {
        let t = t.max(1) as f64;
        Self {
            n: n as i64,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bc2_sqrt: (1.0 - cfg.beta2.powf(t)).sqrt() as f32,
            neg_step_size: (-(lr / (1.0 - cfg.beta1.powf(t)))) as f32,
            eps: cfg.eps as f32,
            pad_: 0,
        }
    }
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out exactly like its .cu mirror (pinned by a
// layout test below).
unsafe impl DeviceRepr for AdamParams {}
// SAFETY: as above: the kernel reads it as one parameter of that C layout.
unsafe impl KernelArg for AdamParams {}

impl Kernels {
    /// out = grads * inv_scale (f32), setting found_inf (1 i32, zeroed by the caller) on any inf/NaN.
    /// `out` may be the same buffer as `grads` for f32.
    pub fn unscale<T: Elem>(
        &self,
        s: &Stream,
        out: DevSlice,
        grads: DevSlice,
        inv_scale: f32,
        found_inf: DevSlice,
        n: usize,
    ) -> Result<()> {
        let out = out.checked::<f32>(n, "unscale out")?;
        let g = grads.checked::<T>(n, "unscale grads")?;
        let fi = found_inf.checked::<i32>(1, "found_inf")?;
        let f = self.entry("optim", &format!("unscale_{}", T::SUFFIX))?;
        let n = n as i64;
        // SAFETY: shapes checked above.
        unsafe {
            Launch::new(&f).arg(&out).arg(&g).arg(&inv_scale).arg(&fi).arg(&n).run(s, self.flat_cfg(n as usize))?
        };
        Ok(())
    }

    /// One AdamW step over flat fp32 buffers (p, g, m, v of `a.n` elements), copying the new weights to fp16
    /// when `p16` is given; skipped on the device when `found_inf` holds a nonzero value.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        s: &Stream,
        a: &AdamParams,
        p: DevSlice,
        g: DevSlice,
        m: DevSlice,
        v: DevSlice,
        p16: Option<DevSlice>,
        found_inf: Option<DevSlice>,
    ) -> Result<()> {
        let n = a.n as usize;
        let (p, g) = (p.checked::<f32>(n, "adamw params")?, g.checked::<f32>(n, "adamw grads")?);
        let (m, v) = (m.checked::<f32>(n, "adamw m")?, v.checked::<f32>(n, "adamw v")?);
        let p16 = opt_checked::<half::f16>(p16, n, "adamw fp16 copy")?;
        let fi = opt_checked::<i32>(found_inf, 1, "found_inf")?;
        let f = self.entry("optim", "adamw_f32")?;
        no_alias(
            "adamw",
            &[
                span::<f32>("params", p, n),
                span::<f32>("m", m, n),
                span::<f32>("v", v, n),
                span::<half::f16>("fp16 copy", p16, n),
            ],
            &[span::<f32>("grads", g, n), span::<i32>("found_inf", fi, 1)],
        )?;
        // SAFETY: all buffers hold n elements (checked above); null p16 / found_inf are skipped.
        unsafe {
            Launch::new(&f).arg(&p).arg(&g).arg(&m).arg(&v).arg(&p16).arg(&fi).arg(a).run(s, self.flat_cfg(n / 4))?
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_params_match_the_cu_layout() {
        assert_eq!(size_of::<AdamParams>(), 40);
        assert_eq!(std::mem::offset_of!(AdamParams, decay), 8);
        assert_eq!(std::mem::offset_of!(AdamParams, eps), 32);
        assert_eq!(std::mem::offset_of!(AdamParams, pad_), 36);
        assert_eq!(std::mem::align_of::<AdamParams>(), 8);
    }

    #[test]
    fn adam_scalars_are_computed_in_f64() {
        let cfg = crate::train::adamw::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let a = AdamParams::for_step(10, 1, 1e-3, &cfg);
        // 1 − β2 from the f64 0.999 is 0.001 to f32 precision; from 0.999f32 it would be 0.000999987.
        assert_eq!(a.one_minus_beta2, 0.001f32);
        assert_ne!(a.one_minus_beta2, 1.0 - 0.999f32);
        assert_eq!(a.one_minus_beta1, 0.1f32);
        assert_eq!(a.bc2_sqrt, (0.001f64).sqrt() as f32);
        assert_eq!(a.neg_step_size, -0.01f32);
        assert_eq!(a.decay, (1.0 - 1e-5f64) as f32);
        let a = AdamParams::for_step(10, 3, 2e-3, &cfg);
        assert_eq!(a.neg_step_size, (-(2e-3 / (1.0 - 0.9f64.powi(3)))) as f32);
        assert_eq!(a.bc2_sqrt, (1.0 - 0.999f64.powi(3)).sqrt() as f32);
        // Step 0 is treated as step 1 (no division by a zero bias correction).
        assert_eq!(AdamParams::for_step(10, 0, 1e-3, &cfg), AdamParams::for_step(10, 1, 1e-3, &cfg));
    }
}
