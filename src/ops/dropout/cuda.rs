//! CUDA launches of this family: dropout and stochastic depth with counter masks (kernels/dropout.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, opt_checked, span};
use anyhow::{Result, ensure};
use cudarc::driver::DeviceRepr;

/// Where a mask kernel's key comes from: a launch argument, or (inside a replayed training step, whose launch
/// arguments are fixed) one u64 in device memory, written by [`Kernels::mask_keys`] at the start of each step.
#[derive(Clone, Copy, Debug)]
pub enum MaskSeed<'a> {
    Host(u64),
    Device(DevSlice<'a>),
}

impl MaskSeed<'_> {
    /// The kernel's (seed, key pointer) arguments.
    fn args(self) -> Result<(u64, u64)> {
        Ok(match self {
            MaskSeed::Host(seed) => (seed, 0),
            MaskSeed::Device(key) => (0, key.checked::<u64>(1, "mask key")?),
        })
    }
}

/// Mirror of `StepValues` in kernels/dropout.cu: what a replayed training step reads from the device to know which
/// step it is. `step` comes first: the augmentation kernel reads it as its i64 batch counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepValues {
    /// Batch index within the epoch.
    pub step: i64,
    pub seed: u64,
    pub epoch: u64,
    pub pad_: i64,
}

// SAFETY: a plain #[repr(C)] struct of integers, laid out like its .cu mirror (pinned by a test below).
unsafe impl DeviceRepr for StepValues {}

impl Kernels {
    /// Dropout with the counter-based mask of `seed` (backward: the same call on dy with the same seed).
    pub fn dropout<T: Elem>(&self, s: &Stream, y: DevSlice, x: DevSlice, p: f32, seed: u64, n: usize) -> Result<()> {
        self.dropout_with::<T>(s, y, x, p, MaskSeed::Host(seed), n)
    }

    /// Dropout whose mask key is `seed` or, for a replayed step, read from the device (see [`MaskSeed`]).
    pub fn dropout_with<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        p: f32,
        seed: MaskSeed,
        n: usize,
    ) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "dropout probability {p} must be in [0, 1)");
        let (y, x) = (y.checked::<T>(n, "dropout y")?, x.checked::<T>(n, "dropout x")?);
        let (seed, key) = seed.args()?;
        let f = self.entry("dropout", &format!("dropout_{}", T::SUFFIX))?;
        let n = n as i64;
        no_alias("dropout", &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: both buffers hold n elements (checked above); a key pointer, when given, holds one u64.
        unsafe {
            Launch::new(&f).arg(&y).arg(&x).arg(&p).arg(&seed).arg(&key).arg(&n).run(s, self.flat_cfg(n as usize))?
        };
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
        shape: (usize, usize),
    ) -> Result<()> {
        self.stochastic_depth_with::<T>(s, y, x, residual, p, MaskSeed::Host(seed), shape)
    }

    /// Stochastic depth whose mask key is `seed` or read from the device (see [`MaskSeed`]).
    #[allow(clippy::too_many_arguments)]
    pub fn stochastic_depth_with<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        residual: Option<DevSlice>,
        p: f32,
        seed: MaskSeed,
        (n, per_sample): (usize, usize),
    ) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "stochastic depth probability {p} must be in [0, 1)");
        let (seed, key) = seed.args()?;
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
        // SAFETY: buffers hold n elements (checked above); a null residual is skipped; a key pointer, when given,
        // holds one u64.
        unsafe {
            Launch::new(&f)
                .arg(&y)
                .arg(&x)
                .arg(&r)
                .arg(&p)
                .arg(&seed)
                .arg(&key)
                .arg(&n)
                .arg(&per)
                .run(s, self.flat_cfg(n as usize))?
        };
        Ok(())
    }

    /// keys[l] = mask_key(seed, epoch, step, l) for every layer l < `layers`, from the device's [`StepValues`].
    pub fn mask_keys(&self, s: &Stream, keys: DevSlice, values: DevSlice, layers: usize) -> Result<()> {
        let k = keys.checked::<u64>(layers, "mask keys")?;
        let v = values.checked::<StepValues>(1, "step values")?;
        let f = self.entry("dropout", "mask_keys")?;
        let n = layers as i64;
        no_alias("mask_keys", &[span::<u64>("keys", k, layers)], &[span::<StepValues>("step values", v, 1)])?;
        // SAFETY: keys holds `layers` u64, values one StepValues (checked above).
        unsafe { Launch::new(&f).arg(&k).arg(&v).arg(&n).run(s, self.flat_cfg(layers.max(1)))? };
        Ok(())
    }

    /// Moves the device's step counter on by one (the last launch of a training step).
    pub fn step_advance(&self, s: &Stream, values: DevSlice) -> Result<()> {
        let v = values.checked::<StepValues>(1, "step values")?;
        let f = self.entry("dropout", "step_advance")?;
        // SAFETY: values holds one StepValues (checked above).
        unsafe { Launch::new(&f).arg(&v).run(s, self.flat_cfg(1))? };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_values_match_the_cu_layout() {
        assert_eq!(size_of::<StepValues>(), 32);
        assert_eq!(std::mem::offset_of!(StepValues, step), 0);
        assert_eq!(std::mem::offset_of!(StepValues, seed), 8);
        assert_eq!(std::mem::offset_of!(StepValues, epoch), 16);
    }
}
