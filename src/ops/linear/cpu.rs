//! Linear layer: `y[N,O] = x[N,I] · Wᵀ + b`, W stored `[O, I]` as PyTorch.

use crate::ops::gemm::gemm;
use crate::tensor::Float;

/// Reference forward.
pub fn forward<T: Float>(x: &[T], w: &[T], b: Option<&[T]>, n: usize, i: usize, o: usize, y: &mut [T]) {
    gemm(n, i, o, T::one(), x, false, w, true, T::zero(), y);
    if let Some(b) = b {
        for row in y.chunks_mut(o) {
            row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
    }
}
