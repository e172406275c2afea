//! Per-(sample, channel) scaling, the last step of squeeze-excite: `y[n,h,w,c] = x[n,h,w,c] · s[n,c]`.

use crate::tensor::Float;
use rayon::prelude::*;

/// Reference forward.
pub fn forward<T: Float>(x: &[T], s: &[T], hw: usize, c: usize, y: &mut [T]) {
    y.par_chunks_mut(hw * c).zip(x.par_chunks(hw * c)).enumerate().for_each(|(n, (ys, xs))| {
        let sc = &s[n * c..(n + 1) * c];
        for (yp, xp) in ys.chunks_mut(c).zip(xs.chunks(c)) {
            for ch in 0..c {
                yp[ch] = xp[ch] * sc[ch];
            }
        }
    });
}

/// Reference backward: `dx = dy · s`, `ds[n,c] = Σ_hw dy · x` (f64 accumulation).
pub fn backward<T: Float>(x: &[T], s: &[T], dy: &[T], hw: usize, c: usize, dx: Option<&mut [T]>, ds: Option<&mut [T]>) {
    if let Some(dx) = dx {
        forward(dy, s, hw, c, dx);
    }
    if let Some(ds) = ds {
        ds.par_chunks_mut(c).enumerate().for_each(|(n, dsn)| {
            let mut acc = vec![0.0f64; c];
            let base = n * hw * c;
            for (xp, gp) in x[base..base + hw * c].chunks(c).zip(dy[base..base + hw * c].chunks(c)) {
                for ch in 0..c {
                    acc[ch] += (xp[ch] * gp[ch]).as_f64();
                }
            }
            dsn.iter_mut().zip(&acc).for_each(|(d, &a)| *d = T::of_f64(a));
        });
    }
}
