//! Global average pooling: `[N, H, W, C]` → `[N, C]`.

use crate::tensor::Float;
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
