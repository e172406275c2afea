//! Global average pooling: `[N, H, W, C]` → `[N, C]`.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::Result;
use rayon::prelude::*;

/// Reference forward: the mean over H·W per (sample, channel), accumulated in f64.
pub fn forward<T: Float>(x: &[T], n: usize, hw: usize, c: usize, y: &mut [T]) {
    y.par_chunks_mut(c).enumerate().take(n).for_each(|(s, out)| {
        let mut acc = vec![0.0f64; c];
        for px in x[s * hw * c..(s + 1) * hw * c].chunks(c) {
            acc.iter_mut().zip(px).for_each(|(a, &v)| *a += v.as_f64());
        }
        out.iter_mut().zip(&acc).for_each(|(o, &a)| *o = T::of_f64(a / hw as f64));
    });
}

/// Reference backward: every pixel gets `dy / (H·W)`.
pub fn backward<T: Float>(dy: &[T], hw: usize, c: usize, dx: &mut [T]) {
    let inv = T::of_f64(1.0 / hw as f64);
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(s, dxs)| {
        let g = &dy[s * c..(s + 1) * c];
        for px in dxs.chunks_mut(c) {
            px.iter_mut().zip(g).for_each(|(d, &g)| *d = g * inv);
        }
    });
}

struct PoolBackward;

impl<T: Float> Backward<T> for PoolBackward {
    fn name(&self) -> &'static str {
        "global_avg_pool"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let s = &ctx.inputs[0].shape;
        let mut dx = Array::zeros(s);
        backward(&dy.data, s[1] * s[2], s[3], &mut dx.data);
        Ok(vec![Some(dx)])
    }
}

/// Records global average pooling of an NHWC tensor.
pub fn global_avg_pool<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let s = tape.shape(x).to_vec();
    super::expect_rank("global_avg_pool", "input", &s, 4)?;
    let mut y = Array::zeros(&[s[0], s[3]]);
    forward(&tape.value(x).data, s[0], s[1] * s[2], s[3], &mut y.data);
    Ok(tape.push_op(&[x], y, Box::new(PoolBackward)))
}
