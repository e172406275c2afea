//! Dropout (element mask) and stochastic depth in row mode (one mask value per sample).
//!
//! Both keep a value with probability `1 − p` and scale kept values by `1/(1 − p)`, as PyTorch and torchvision's
//! `stochastic_depth(mode="row")` do. The backend draws the mask from a [`MaskSource`] (the host generator, or the
//! counter rule the device kernels use); the op multiplies by it, forward and backward.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::{Backend, CpuMask, MaskKind, MaskSource};
use crate::tensor::Float;
use anyhow::{Result, bail};
use rand_pcg::Pcg64;

struct MaskBackward<M> {
    name: &'static str,
    mask: M,
}

impl<B: Backend> Backward<B> for MaskBackward<B::Mask> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        Ok(vec![Some(ctx.backend.apply_mask(dy, &self.mask)?)])
    }
}

fn masked<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, mask: B::Mask, name: &'static str) -> Result<Var> {
    let (be, v) = tape.split(&[x]);
    let y = be.apply_mask(v[0], &mask)?;
    Ok(tape.push_op(&[x], y, Box::new(MaskBackward::<B::Mask> { name, mask })))
}

fn name_of(kind: MaskKind) -> &'static str {
    match kind {
        MaskKind::Element => "dropout",
        MaskKind::Row => "stochastic_depth",
    }
}

/// Dropout (`MaskKind::Element`) or stochastic depth (`MaskKind::Row`) with probability `p`, its mask drawn by the
/// backend from `source`; the identity when `p = 0` (nothing drawn).
pub fn drop<B: Backend>(
    tape: &mut Tape<B::Host, B>,
    kind: MaskKind,
    x: Var,
    p: f64,
    source: MaskSource<'_>,
) -> Result<Var> {
    if p <= 0.0 {
        return Ok(x);
    }
    if !(0.0..=1.0).contains(&p) {
        bail!("{}: probability {p} is outside [0, 1]", name_of(kind));
    }
    let shape = tape.shape(x).to_vec();
    if kind == MaskKind::Row && shape.is_empty() {
        bail!("stochastic depth: input is a scalar");
    }
    let mask = tape.backend_mut().draw_mask(kind, &shape, p, source)?;
    masked(tape, x, mask, name_of(kind))
}

/// Dropout with probability `p`, its mask from the host generator `rng`.
pub fn dropout<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, p: f64, rng: &mut Pcg64) -> Result<Var> {
    drop(tape, MaskKind::Element, x, p, MaskSource::Host(rng))
}

/// Stochastic depth (row mode) with probability `p`, its mask from the host generator `rng`.
pub fn stochastic_depth<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, p: f64, rng: &mut Pcg64) -> Result<Var> {
    drop(tape, MaskKind::Row, x, p, MaskSource::Host(rng))
}

/// Records dropout with a given element mask (CPU; see [`draw_mask`]).
pub fn dropout_with_mask<T: Float>(tape: &mut Tape<T>, x: Var, mask: Vec<T>) -> Result<Var> {
    if mask.len() != tape.value(x).numel() {
        bail!("dropout: mask has {} values for an input of shape {:?}", mask.len(), tape.shape(x));
    }
    masked(tape, x, CpuMask { values: mask, group: 1 }, "dropout")
}

/// Records stochastic depth (row mode) with one mask value per sample (dim 0) (CPU).
pub fn stochastic_depth_with_mask<T: Float>(tape: &mut Tape<T>, x: Var, mask: Vec<T>) -> Result<Var> {
    let shape = tape.shape(x).to_vec();
    if shape.is_empty() || mask.len() != shape[0] {
        bail!("stochastic depth: mask has {} values for an input of shape {shape:?}", mask.len());
    }
    let group = tape.value(x).numel() / shape[0].max(1);
    masked(tape, x, CpuMask { values: mask, group: group.max(1) }, "stochastic_depth")
}
