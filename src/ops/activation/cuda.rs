//! CUDA launches of this family: SiLU, sigmoid and ReLU forward and backward (kernels/elementwise.cu).
//!
//! Typed wrappers on [`Kernels`]: every length is checked against the shape before the launch, and outputs may not
//! alias inputs (the kernels take `__restrict__` pointers).

use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, Kernels, Launch, no_alias, span};
use anyhow::Result;

/// Activation for [`Kernels::unary`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// x * sigmoid(x)
    Silu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// max(x, 0)
    Relu,
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Sigmoid => "sigmoid",
            Self::Relu => "relu",
        }
    }
}

impl Kernels {
    /// y = op(x) over `n` elements.
    pub fn unary<T: Elem>(&self, s: &Stream, op: Unary, y: DevSlice, x: DevSlice, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("{}_fwd_{}", op.name(), T::SUFFIX))?;
        let (y, x) = (y.checked::<T>(n, "unary y")?, x.checked::<T>(n, "unary x")?);
        let n = n as i64;
        no_alias("unary", &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: y and x hold n elements of T (checked above); the kernel reads x[0..n) and writes y[0..n).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// dx = dy * op'(saved), where `saved` is x for SiLU and ReLU and the forward output y for sigmoid.
    pub fn unary_backward<T: Elem>(
        &self,
        s: &Stream,
        op: Unary,
        dx: DevSlice,
        saved: DevSlice,
        dy: DevSlice,
        n: usize,
    ) -> Result<()> {
        let f = self.entry("elementwise", &format!("{}_bwd_{}", op.name(), T::SUFFIX))?;
        let dx = dx.checked::<T>(n, "unary backward dx")?;
        let saved = saved.checked::<T>(n, "unary backward saved")?;
        let dy = dy.checked::<T>(n, "unary backward dy")?;
        let n = n as i64;
        let n_ = n as usize;
        no_alias(
            "unary backward",
            &[span::<T>("dx", dx, n_)],
            &[span::<T>("saved", saved, n_), span::<T>("dy", dy, n_)],
        )?;
        // SAFETY: all three buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&dx).arg(&saved).arg(&dy).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }
}
