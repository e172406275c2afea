//! Reference dropout: drawing a mask from the host generator, and multiplying by a mask.

use crate::tensor::Float;
use rand::{Rng, RngExt};

/// The value of a kept element's mask: `1/(1−p)`, or 0 when `p = 1` (nothing is kept).
pub fn keep_scale<T: Float>(p: f64) -> T {
    let keep = 1.0 - p;
    if keep > 0.0 { T::of_f64(1.0 / keep) } else { T::zero() }
}

/// Draws `len` mask values: `1/(1−p)` with probability `1−p`, else 0. `p = 1` gives all zeros.
pub fn draw_mask<T: Float, R: Rng + ?Sized>(len: usize, p: f64, rng: &mut R) -> Vec<T> {
    let keep = 1.0 - p;
    let scale = keep_scale::<T>(p);
    (0..len).map(|_| if rng.random::<f64>() < keep { scale } else { T::zero() }).collect()
}

/// Reference forward: `y[i] = x[i] · mask[i / group]` (group 1 for dropout, the per-sample size for rows).
pub fn forward<T: Float>(x: &[T], mask: &[T], group: usize, y: &mut [T]) {
    for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        *y = x * mask[i / group];
    }
}
