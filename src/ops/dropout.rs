//! Dropout (element mask) and stochastic depth in row mode (one mask value per sample).
//!
//! Both keep a value with probability `1 − p` and scale kept values by `1/(1 − p)`, as PyTorch and torchvision's
//! `stochastic_depth(mode="row")` do. Masks are drawn outside the op so tests and the GPU path can supply the same
//! mask; the op multiplies by it.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use rand::{Rng, RngExt};

/// Draws `len` mask values: `1/(1−p)` with probability `1−p`, else 0. `p = 1` gives all zeros.
pub fn draw_mask<T: Float, R: Rng + ?Sized>(len: usize, p: f64, rng: &mut R) -> Vec<T> {
    let keep = 1.0 - p;
    let scale = if keep > 0.0 { T::of_f64(1.0 / keep) } else { T::zero() };
    (0..len).map(|_| if rng.random::<f64>() < keep { scale } else { T::zero() }).collect()
}

/// Reference forward: `y[i] = x[i] · mask[i / group]` (group 1 for dropout, the per-sample size for rows).
pub fn forward<T: Float>(x: &[T], mask: &[T], group: usize, y: &mut [T]) {
    for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        *y = x * mask[i / group];
    }
}

struct MaskBackward<T> {
    name: &'static str,
    mask: Vec<T>,
    group: usize,
}

impl<T: Float> Backward<T> for MaskBackward<T> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(&self, _ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let mut dx = Array::zeros(&dy.shape);
        forward(&dy.data, &self.mask, self.group, &mut dx.data);
        Ok(vec![Some(dx)])
    }
}

fn masked<T: Float>(tape: &mut Tape<T>, x: Var, mask: Vec<T>, group: usize, name: &'static str) -> Var {
    let xv = tape.value(x);
    let mut y = Array::zeros(&xv.shape);
    forward(&xv.data, &mask, group, &mut y.data);
    tape.push_op(&[x], y, Box::new(MaskBackward { name, mask, group }))
}

/// Records dropout with a given element mask (see [`draw_mask`]).
pub fn dropout_with_mask<T: Float>(tape: &mut Tape<T>, x: Var, mask: Vec<T>) -> Result<Var> {
    if mask.len() != tape.value(x).numel() {
        bail!("dropout: mask has {} values for an input of shape {:?}", mask.len(), tape.shape(x));
    }
    Ok(masked(tape, x, mask, 1, "dropout"))
}

/// Records stochastic depth (row mode) with one mask value per sample (dim 0).
pub fn stochastic_depth_with_mask<T: Float>(tape: &mut Tape<T>, x: Var, mask: Vec<T>) -> Result<Var> {
    let shape = tape.shape(x).to_vec();
    if shape.is_empty() || mask.len() != shape[0] {
        bail!("stochastic depth: mask has {} values for an input of shape {shape:?}", mask.len());
    }
    let group = tape.value(x).numel() / shape[0].max(1);
    Ok(masked(tape, x, mask, group.max(1), "stochastic_depth"))
}

/// Dropout with probability `p`, drawing its mask; the identity when `p = 0`.
pub fn dropout<T: Float, R: Rng + ?Sized>(tape: &mut Tape<T>, x: Var, p: f64, rng: &mut R) -> Result<Var> {
    if p <= 0.0 {
        return Ok(x);
    }
    let mask = draw_mask(tape.value(x).numel(), p, rng);
    dropout_with_mask(tape, x, mask)
}

/// Stochastic depth (row mode) with probability `p`, drawing its mask; the identity when `p = 0`.
pub fn stochastic_depth<T: Float, R: Rng + ?Sized>(tape: &mut Tape<T>, x: Var, p: f64, rng: &mut R) -> Result<Var> {
    if p <= 0.0 {
        return Ok(x);
    }
    let n = tape.shape(x).first().copied().unwrap_or(0);
    let mask = draw_mask(n, p, rng);
    stochastic_depth_with_mask(tape, x, mask)
}
