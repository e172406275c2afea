//! Residual add.

use crate::tensor::Float;

/// Reference forward: `y = a + b`.
pub fn add_forward<T: Float>(a: &[T], b: &[T], y: &mut [T]) {
    y.iter_mut().zip(a.iter().zip(b)).for_each(|(y, (&a, &b))| *y = a + b);
}
