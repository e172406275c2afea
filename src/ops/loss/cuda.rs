//! CUDA launches of this family: softmax + weighted cross-entropy / focal loss, forward and backward in one launch (kernels/loss.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, KernelArg, Kernels, Launch, THREADS, no_alias, opt_checked, span};
use anyhow::Result;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// Mirror of `LossParams` in kernels/loss.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LossParams {
    /// Batch.
    pub b: i32,
    /// Classes.
    pub k: i32,
    /// 0: weighted cross-entropy, 1: focal.
    pub focal: i32,
    /// Focal exponent.
    pub gamma: f32,
    /// Multiplies dlogits (e.g. the loss scale); 0 skips the gradient.
    pub grad_scale: f32,
    /// Padding to a multiple of 8 bytes.
    pub pad_: i32,
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out exactly like its .cu mirror (pinned by a
// layout test below).
unsafe impl DeviceRepr for LossParams {}
// SAFETY: as above: the kernel reads it as one parameter of that C layout.
unsafe impl KernelArg for LossParams {}

impl Kernels {
    /// Softmax + weighted CE or focal loss over logits [B, K] with i32 targets: writes the mean loss (1 f32),
    /// dlogits (unless `p.grad_scale == 0`), probabilities (when given), and `bad_target` (1 i32: 0, or the
    /// 1-based row of the first target outside [0, K); written once by the kernel, so it needs no initial value).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_loss<T: Elem>(
        &self,
        s: &Stream,
        p: &LossParams,
        loss: DevSlice,
        dlogits: DevSlice,
        probs: Option<DevSlice>,
        bad_target: DevSlice,
        logits: DevSlice,
        targets: DevSlice,
        alpha: Option<DevSlice>,
    ) -> Result<()> {
        self.softmax_loss_scaled::<T>(s, p, loss, dlogits, probs, bad_target, logits, targets, alpha, None)
    }

    /// [`Kernels::softmax_loss`] with the gradient scale also multiplied by one f32 read from the device
    /// (`grad_scale`: the loss scale of a replayed mixed-precision step).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_loss_scaled<T: Elem>(
        &self,
        s: &Stream,
        p: &LossParams,
        loss: DevSlice,
        dlogits: DevSlice,
        probs: Option<DevSlice>,
        bad_target: DevSlice,
        logits: DevSlice,
        targets: DevSlice,
        alpha: Option<DevSlice>,
        grad_scale: Option<DevSlice>,
    ) -> Result<()> {
        let scale = opt_checked::<f32>(grad_scale, 1, "gradient scale")?;
        let (b, k) = (p.b as usize, p.k as usize);
        let loss = loss.checked::<f32>(1, "loss out")?;
        let dl = dlogits.checked::<T>(b * k, "dlogits")?;
        let probs = opt_checked::<f32>(probs, b * k, "probs")?;
        let bad = bad_target.checked::<i32>(1, "bad_target")?;
        let logits = logits.checked::<T>(b * k, "logits")?;
        let targets = targets.checked::<i32>(b, "targets")?;
        let alpha = opt_checked::<f32>(alpha, k, "class weights")?;
        let f = self.entry("loss", &format!("softmax_loss_{}", T::SUFFIX))?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        no_alias(
            "softmax_loss",
            &[
                span::<f32>("loss", loss, 1),
                span::<T>("dlogits", dl, b * k),
                span::<f32>("probs", probs, b * k),
                span::<i32>("bad_target", bad, 1),
            ],
            &[
                span::<T>("logits", logits, b * k),
                span::<i32>("targets", targets, b),
                span::<f32>("class weights", alpha, k),
            ],
        )?;
        // SAFETY: shapes checked above; null probs / alpha are handled by the kernel.
        unsafe {
            Launch::new(&f)
                .arg(&loss)
                .arg(&dl)
                .arg(&probs)
                .arg(&bad)
                .arg(&logits)
                .arg(&targets)
                .arg(&alpha)
                .arg(&scale)
                .arg(p)
                .run(s, cfg)?
        };
        Ok(())
    }

    /// Adds one step to an epoch's device sums (`sums`: 4 f64): loss·B when the loss is finite (else one to the
    /// count of non-finite losses), the rows whose argmax is the target, B.
    pub fn train_metrics<T: Elem>(
        &self,
        s: &Stream,
        sums: DevSlice,
        loss: DevSlice,
        logits: DevSlice,
        targets: DevSlice,
        (b, k): (usize, usize),
    ) -> Result<()> {
        let sums = sums.checked::<f64>(4, "epoch sums")?;
        let loss = loss.checked::<f32>(1, "loss")?;
        let logits = logits.checked::<T>(b * k, "logits")?;
        let targets = targets.checked::<i32>(b, "targets")?;
        let f = self.entry("loss", &format!("train_metrics_{}", T::SUFFIX))?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (b, k) = (i32::try_from(b)?, i32::try_from(k)?);
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&sums).arg(&loss).arg(&logits).arg(&targets).arg(&b).arg(&k).run(s, cfg)? };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_params_match_the_cu_layout() {
        assert_eq!(size_of::<LossParams>(), 24);
    }
}
