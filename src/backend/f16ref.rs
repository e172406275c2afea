//! The f16 storage reference: the CPU reference ([`Cpu<T>`]) with every value rounded to f16 exactly where the CUDA
//! backend's f16 program stores f16, and computing in `T` (f64 accumulation in the reference functions) everywhere
//! else. It is the yardstick for the f16 device path: the device may differ from it only by the order of its f32
//! sums, so a wrong kernel, cast or storage point shows as a difference far above that.
//!
//! Why a wrapping [`Backend`] and not a second model or a flag in the op functions: the storage points are exactly
//! the backend's outputs (each op's result buffer), so rounding what the CPU methods return reproduces them with
//! no change to the reference functions, the tape or the model. What the f16 program stores as f16, method by
//! method (the CUDA backend's recording code, `src/ops/<family>/record.rs`):
//! - the uploaded input, every activation an op returns, and every activation gradient (dx of each op, the logits'
//!   gradient, sums of two gradients);
//! - the weight copies GEMMs, cuDNN and the depthwise kernels read (biases, BN's gamma and beta stay f32);
//! - the GEMM output before its bias epilogue (a biased layer rounds twice: `f16(f16(x·wᵀ) + b)`);
//! - squeeze-excite's scale gradient `ds`.
//!
//! Everything else is f32 on the device and `T` here: BN statistics, running statistics, the loss, the weight,
//! bias, gamma and beta gradients. Sigmoid's backward reads the (rounded) output, as the kernel does.

use super::{Backend, BnStats, Cpu, CpuBnSaved, CpuMask, MaskKind, MaskSource, Want};
use crate::autograd::{ParamId, ParamStore};
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode};
use crate::ops::conv::ConvGeom;
use crate::ops::loss::LossKind;
use crate::tensor::{Array, Float};
use anyhow::Result;
use half::f16;
use std::sync::Arc;

/// The CPU reference computing in `T` with the f16 program's storage rounding (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct F16Ref<T>(Cpu<T>);

/// `v` rounded to the nearest f16 (ties to even), back in `T`.
pub fn round_f16<T: Float>(v: T) -> T {
    T::of_f64(f16::from_f64(v.as_f64()).to_f64())
}

/// A copy of `a` rounded to f16 (what [`crate::backend::cuda::Cuda::input`] uploads for the f16 path: round a
/// reference step's input with it).
pub fn rounded<T: Float>(a: &Array<T>) -> Array<T> {
    Array { shape: a.shape.clone(), data: a.data.iter().map(|&v| round_f16(v)).collect() }
}

/// `t` rounded to f16 in place (a fresh result is not shared, so this does not copy).
fn r<T: Float>(mut t: Arc<Array<T>>) -> Arc<Array<T>> {
    Arc::make_mut(&mut t).data.iter_mut().for_each(|v| *v = round_f16(*v));
    t
}

fn ro<T: Float>(t: Option<Arc<Array<T>>>) -> Option<Arc<Array<T>>> {
    t.map(r)
}

/// The f16 copy of a weight (what GEMMs, cuDNN and the depthwise kernels read).
fn w16<T: Float>(w: &Arc<Array<T>>) -> Arc<Array<T>> {
    Arc::new(rounded(w))
}

/// `y += bias` over the last dimension, then rounded: the device's in-place f16 bias epilogue.
fn add_bias<T: Float>(y: Arc<Array<T>>, bias: Option<&Arc<Array<T>>>) -> Arc<Array<T>> {
    let Some(b) = bias else { return y };
    let mut y = y;
    let c = b.data.len().max(1);
    for (i, v) in Arc::make_mut(&mut y).data.iter_mut().enumerate() {
        *v = round_f16(T::of_f64(v.as_f64() + b.data[i % c].as_f64()));
    }
    y
}

impl<T: Float> Backend for F16Ref<T> {
    type Host = T;
    type Tensor = Arc<Array<T>>;
    type BnSaved = CpuBnSaved;
    type Mask = CpuMask<T>;
    type LossSaved = Vec<f64>;

    fn shape(t: &Self::Tensor) -> &[usize] {
        &t.shape
    }

    fn param(&mut self, store: &ParamStore<T>, id: ParamId) -> Result<Self::Tensor> {
        self.0.param(store, id)
    }

    fn full(&mut self, shape: &[usize], value: f64) -> Result<Self::Tensor> {
        self.0.full(shape, value)
    }

    fn accumulate(&mut self, acc: &mut Self::Tensor, g: Self::Tensor) -> Result<()> {
        self.0.accumulate(acc, g)?;
        *acc = r(acc.clone());
        Ok(())
    }

    fn accumulate_param_grad(&mut self, store: &mut ParamStore<T>, id: ParamId, g: Self::Tensor) -> Result<()> {
        self.0.accumulate_param_grad(store, id, g)
    }

    fn conv2d(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let y = r(self.0.conv2d(g, x, &w16(w), None)?);
        Ok(add_bias(y, bias))
    }

    fn conv2d_backward(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]> {
        let [dx, dw, db] = self.0.conv2d_backward(g, x, &w16(w), dy, want)?;
        Ok([ro(dx), dw, db])
    }

    fn linear(&mut self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let y = r(self.0.linear(x, &w16(w), None)?);
        Ok(add_bias(y, b))
    }

    fn linear_backward(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]> {
        let [dx, dw, db] = self.0.linear_backward(x, &w16(w), dy, want)?;
        Ok([ro(dx), dw, db])
    }

    fn batch_norm(
        &mut self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        stats: BnStats<'_, T>,
        mode: BnMode,
        cfg: BnCfg,
        act: Option<Act>,
    ) -> Result<(Self::Tensor, Self::BnSaved)> {
        let (y, saved) = self.0.batch_norm(x, gamma, beta, stats, mode, cfg, act)?;
        Ok((r(y), saved))
    }

    fn batch_norm_backward(
        &mut self,
        saved: &Self::BnSaved,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        dy: &Self::Tensor,
        act: Option<Act>,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]> {
        let [dx, dg, db] = self.0.batch_norm_backward(saved, x, gamma, beta, dy, act, want)?;
        Ok([ro(dx), dg, db])
    }

    fn activation(&mut self, act: Act, x: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(r(self.0.activation(act, x)?))
    }

    fn activation_backward(
        &mut self,
        act: Act,
        x: &Self::Tensor,
        y: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        if act == Act::Sigmoid {
            // The kernel's derivative reads the stored (rounded) output: dy·y·(1 − y).
            let data = y.data.iter().zip(&dy.data).map(|(&y, &d)| round_f16(d * y * (T::one() - y))).collect();
            return Ok(Arc::new(Array { shape: x.shape.clone(), data }));
        }
        Ok(r(self.0.activation_backward(act, x, y, dy)?))
    }

    fn add(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(r(self.0.add(a, b)?))
    }

    fn channel_scale(&mut self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(r(self.0.channel_scale(x, s)?))
    }

    fn channel_scale_backward(
        &mut self,
        x: &Self::Tensor,
        s: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 2],
    ) -> Result<[Option<Self::Tensor>; 2]> {
        let [dx, ds] = self.0.channel_scale_backward(x, s, dy, want)?;
        Ok([ro(dx), ro(ds)])
    }

    fn global_avg_pool(&mut self, x: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(r(self.0.global_avg_pool(x)?))
    }

    fn global_avg_pool_backward(&mut self, x_shape: &[usize], dy: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(r(self.0.global_avg_pool_backward(x_shape, dy)?))
    }

    fn draw_mask(&mut self, kind: MaskKind, x_shape: &[usize], p: f64, source: MaskSource<'_>) -> Result<Self::Mask> {
        self.0.draw_mask(kind, x_shape, p, source)
    }

    fn apply_mask(&mut self, x: &Self::Tensor, mask: &Self::Mask) -> Result<Self::Tensor> {
        Ok(r(self.0.apply_mask(x, mask)?))
    }

    fn loss(
        &mut self,
        logits: &Self::Tensor,
        targets: &[usize],
        weights: Option<&[T]>,
        kind: &LossKind,
    ) -> Result<(Self::Tensor, Self::LossSaved)> {
        self.0.loss(logits, targets, weights, kind)
    }

    fn loss_backward(
        &mut self,
        saved: &Self::LossSaved,
        logits: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        // The device writes the logits' gradient (times the seed) in the activation type.
        Ok(r(self.0.loss_backward(saved, logits, dy)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_f16_ties_to_even() {
        // f16 has 10 fraction bits: spacing 2^-10 in [1, 2).
        let u = 2f64.powi(-10);
        assert_eq!(round_f16(1.0 + 0.5 * u), 1.0, "a tie goes to the even neighbour");
        assert_eq!(round_f16(1.0 + 1.5 * u), 1.0 + 2.0 * u);
        assert_eq!(round_f16(1.0 + 0.51 * u), 1.0 + u);
        assert_eq!(round_f16(1e6f64), f64::INFINITY, "beyond 65504 is infinite, as on the device");
        assert_eq!(round_f16(3.0f32), 3.0);
    }

    #[test]
    fn a_biased_layer_rounds_before_and_after_its_bias() {
        let mut r = F16Ref::<f64>::default();
        let u = 2f64.powi(-10);
        // x·w = 1 + 0.4u rounds to 1, and 1 + 0.3u to 1 again; one rounding of 1 + 0.7u would give 1 + u.
        let x = Arc::new(Array { shape: vec![1, 1], data: vec![1.0 + 0.4 * u] });
        let w = Arc::new(Array { shape: vec![1, 1], data: vec![1.0] });
        let b = Arc::new(Array { shape: vec![1], data: vec![0.3 * u] });
        let y = r.linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.data[0], 1.0);
        assert_eq!(round_f16(1.0 + 0.7 * u), 1.0 + u);
    }
}
