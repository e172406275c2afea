//! Weight initialisation as torchvision's EfficientNet and PyTorch's `nn.Linear` do it.

use crate::tensor::{Array, Float};
use rand::{Rng, RngExt};
use rand_distr::{Distribution, StandardNormal};

/// Kaiming-normal with mode fan_out for a conv weight of PyTorch shape `[out, in/groups, kh, kw]`:
/// std = √(2 / (out·kh·kw)). Returned in the internal layout given by `shape` (the values are i.i.d., so only
/// the fan matters).
pub fn kaiming_normal_fan_out<T: Float, R: Rng + ?Sized>(shape: &[usize], fan_out: usize, rng: &mut R) -> Array<T> {
    let std = (2.0 / fan_out as f64).sqrt();
    let n = crate::tensor::numel(shape);
    let data = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            T::of_f64(z * std)
        })
        .collect();
    Array { shape: shape.to_vec(), data }
}

/// Uniform on `[−bound, bound]`.
pub fn uniform<T: Float, R: Rng + ?Sized>(shape: &[usize], bound: f64, rng: &mut R) -> Array<T> {
    let n = crate::tensor::numel(shape);
    Array { shape: shape.to_vec(), data: (0..n).map(|_| T::of_f64(rng.random_range(-bound..=bound))).collect() }
}
