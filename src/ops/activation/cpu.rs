//! SiLU, sigmoid and ReLU: elementwise, forward and backward.

use super::Act;
use crate::tensor::Float;
use rayon::prelude::*;

/// σ(x). The exponential is [`Float::exp_act`]: exact in f64, a vectorizable polynomial in f32.
#[inline(always)]
pub fn sigmoid_scalar<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_act())
}

/// Elements per rayon task for the elementwise loops (large enough to amortize the task, small enough to balance).
const CHUNK: usize = 8192;

impl Act {
    pub fn name(self) -> &'static str {
        match self {
            Act::Silu => "silu",
            Act::Sigmoid => "sigmoid",
            Act::Relu => "relu",
        }
    }

    /// f(x).
    #[inline(always)]
    pub fn apply<T: Float>(self, x: T) -> T {
        match self {
            Act::Silu => x * sigmoid_scalar(x),
            Act::Sigmoid => sigmoid_scalar(x),
            // NaN propagates as in PyTorch; every other input maps as before.
            Act::Relu => {
                if x > T::zero() || x.is_nan() {
                    x
                } else {
                    T::zero()
                }
            }
        }
    }

    /// f'(x).
    #[inline(always)]
    pub fn derivative<T: Float>(self, x: T) -> T {
        match self {
            // d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)))
            Act::Silu => {
                let s = sigmoid_scalar(x);
                s * (T::one() + x * (T::one() - s))
            }
            Act::Sigmoid => {
                let s = sigmoid_scalar(x);
                s * (T::one() - s)
            }
            // PyTorch's convention: the derivative at 0 is 0. Its backward (`threshold_backward`) tests
            // `x <= 0`, so at NaN the gradient passes through unchanged.
            Act::Relu => {
                if x > T::zero() || x.is_nan() {
                    T::one()
                } else {
                    T::zero()
                }
            }
        }
    }

    /// `v ← f(v)` over a slice, with the match outside the loop so each loop vectorizes.
    pub fn apply_in_place<T: Float>(self, v: &mut [T]) {
        match self {
            Act::Silu => v.iter_mut().for_each(|v| *v = Act::Silu.apply(*v)),
            Act::Sigmoid => v.iter_mut().for_each(|v| *v = Act::Sigmoid.apply(*v)),
            Act::Relu => v.iter_mut().for_each(|v| *v = Act::Relu.apply(*v)),
        }
    }

    /// `d ← g · f'(z)` over slices, given `d` holding `z` (the match outside the loop, as in `apply_in_place`).
    pub fn grad_in_place<T: Float>(self, d: &mut [T], g: &[T]) {
        match self {
            Act::Silu => d.iter_mut().zip(g).for_each(|(d, &g)| *d = g * Act::Silu.derivative(*d)),
            Act::Sigmoid => d.iter_mut().zip(g).for_each(|(d, &g)| *d = g * Act::Sigmoid.derivative(*d)),
            Act::Relu => d.iter_mut().zip(g).for_each(|(d, &g)| *d = g * Act::Relu.derivative(*d)),
        }
    }
}

/// Reference forward: `y = f(x)`.
pub fn forward<T: Float>(act: Act, x: &[T], y: &mut [T]) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        y.copy_from_slice(x);
        act.apply_in_place(y);
    });
}

/// Reference backward: `dx = dy · f'(x)`.
pub fn backward<T: Float>(act: Act, x: &[T], dy: &[T], dx: &mut [T]) {
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (x, dy))| {
        dx.copy_from_slice(x);
        act.grad_in_place(dx, dy);
    });
}
