//! The CPU reference backend: each method is a thin layer over the reference functions of its op family, computing
//! in the element type `T` on host arrays. A value is an `Arc<Array<T>>`, so reading a parameter shares its storage.

use super::{Backend, BnStats, MaskKind, MaskSource, Want, counter_keep};
use crate::autograd::{ParamId, ParamStore};
use crate::ops::activation::{self, Act};
use crate::ops::batchnorm::{self, BnCfg, BnMode};
use crate::ops::conv::{self, ConvGeom};
use crate::ops::loss::{self, LossKind};
use crate::ops::{dropout, elementwise, gemm::gemm, linear, pool, scale};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use std::sync::Arc;

/// The statistics a CPU batch norm normalized with.
pub struct CpuBnSaved {
    c: usize,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    train: bool,
}

/// A CPU mask: one value per `group` consecutive elements.
pub struct CpuMask<T> {
    pub values: Vec<T>,
    pub group: usize,
}

/// The CPU reference backend computing in `T` (f32 when training, f64 for gradient checks). It holds nothing: the
/// values are the tape's, the parameters the store's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu<T>(std::marker::PhantomData<T>);

fn arc<T>(a: Array<T>) -> Arc<Array<T>> {
    Arc::new(a)
}

impl<T: Float> Backend for Cpu<T> {
    type Host = T;
    type Tensor = Arc<Array<T>>;
    type BnSaved = CpuBnSaved;
    type Mask = CpuMask<T>;
    type LossSaved = Vec<f64>;

    fn shape(t: &Self::Tensor) -> &[usize] {
        &t.shape
    }

    fn param(&mut self, store: &ParamStore<T>, id: ParamId) -> Result<Self::Tensor> {
        Ok(store.get(id).value.clone())
    }

    fn full(&mut self, shape: &[usize], value: f64) -> Result<Self::Tensor> {
        Ok(arc(Array::full(shape, T::of_f64(value))))
    }

    fn accumulate(&mut self, acc: &mut Self::Tensor, g: Self::Tensor) -> Result<()> {
        Arc::make_mut(acc).data.iter_mut().zip(&g.data).for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn accumulate_param_grad(&mut self, store: &mut ParamStore<T>, id: ParamId, g: Self::Tensor) -> Result<()> {
        store.accumulate_grad(id, &g)
    }

    fn conv2d(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let mut y = Array::zeros(&g.out_shape());
        conv::forward(g, &x.data, &w.data, bias.map(|b| b.data.as_slice()), &mut y.data);
        Ok(arc(y))
    }

    fn conv2d_backward(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]> {
        let dx = want[0].any().then(|| {
            let mut dx = Array::zeros(&x.shape);
            conv::backward_data(g, &dy.data, &w.data, &mut dx.data);
            arc(dx)
        });
        let dw = want[1].any().then(|| {
            let mut dw = Array::zeros(&w.shape);
            conv::backward_weight(g, &x.data, &dy.data, &mut dw.data);
            arc(dw)
        });
        let db = want[2].any().then(|| {
            let mut db = Array::zeros(&[g.cout]);
            conv::backward_bias(g.cout, &dy.data, &mut db.data);
            arc(db)
        });
        Ok([dx, dw, db])
    }

    fn linear(&mut self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        let (n, i, o) = (x.shape[0], x.shape[1], w.shape[0]);
        let mut y = Array::zeros(&[n, o]);
        linear::forward(&x.data, &w.data, b.map(|b| b.data.as_slice()), n, i, o, &mut y.data);
        Ok(arc(y))
    }

    fn linear_backward(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]> {
        let (n, i, o) = (x.shape[0], x.shape[1], w.shape[0]);
        let dx = want[0].any().then(|| {
            let mut dx = Array::zeros(&x.shape);
            gemm(n, o, i, T::one(), &dy.data, false, &w.data, false, T::zero(), &mut dx.data);
            arc(dx)
        });
        let dw = want[1].any().then(|| {
            let mut dw = Array::zeros(&w.shape);
            gemm(o, n, i, T::one(), &dy.data, true, &x.data, false, T::zero(), &mut dw.data);
            arc(dw)
        });
        let db = want[2].any().then(|| {
            let mut db = Array::zeros(&[o]);
            conv::backward_bias(o, &dy.data, &mut db.data);
            arc(db)
        });
        Ok([dx, dw, db])
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
        let Some(&c) = x.shape.last() else { bail!("batch norm: input is a scalar") };
        let mut y = Array::zeros(&x.shape);
        let (mean, invstd) =
            batchnorm::forward(&x.data, c, &gamma.data, &beta.data, stats.state, mode, cfg, act, &mut y.data)?;
        let train = matches!(mode, BnMode::Train { .. });
        Ok((arc(y), CpuBnSaved { c, mean, invstd, train }))
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
        let mut dx = want[0].any().then(|| Array::zeros(&x.shape));
        let mut dg = want[1].any().then(|| Array::zeros(&gamma.shape));
        let mut db = want[2].any().then(|| Array::zeros(&beta.shape));
        batchnorm::backward(
            &x.data,
            saved.c,
            &gamma.data,
            &beta.data,
            &saved.mean,
            &saved.invstd,
            saved.train,
            act,
            &dy.data,
            dx.as_mut().map(|a| a.data.as_mut_slice()),
            dg.as_mut().map(|a| a.data.as_mut_slice()),
            db.as_mut().map(|a| a.data.as_mut_slice()),
        );
        Ok([dx.map(arc), dg.map(arc), db.map(arc)])
    }

    fn activation(&mut self, act: Act, x: &Self::Tensor) -> Result<Self::Tensor> {
        let mut y = Array::zeros(&x.shape);
        activation::forward(act, &x.data, &mut y.data);
        Ok(arc(y))
    }

    fn activation_backward(
        &mut self,
        act: Act,
        x: &Self::Tensor,
        _y: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let mut dx = Array::zeros(&x.shape);
        activation::backward(act, &x.data, &dy.data, &mut dx.data);
        Ok(arc(dx))
    }

    fn add(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        let mut y = Array::zeros(&a.shape);
        elementwise::add_forward(&a.data, &b.data, &mut y.data);
        Ok(arc(y))
    }

    fn channel_scale(&mut self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor> {
        let xs = &x.shape;
        let mut y = Array::zeros(xs);
        scale::forward(&x.data, &s.data, xs[1] * xs[2], xs[3], &mut y.data);
        Ok(arc(y))
    }

    fn channel_scale_backward(
        &mut self,
        x: &Self::Tensor,
        s: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 2],
    ) -> Result<[Option<Self::Tensor>; 2]> {
        let (hw, c) = (x.shape[1] * x.shape[2], x.shape[3]);
        let mut dx = want[0].any().then(|| Array::zeros(&x.shape));
        let mut ds = want[1].any().then(|| Array::zeros(&s.shape));
        scale::backward(
            &x.data,
            &s.data,
            &dy.data,
            hw,
            c,
            dx.as_mut().map(|a| a.data.as_mut_slice()),
            ds.as_mut().map(|a| a.data.as_mut_slice()),
        );
        Ok([dx.map(arc), ds.map(arc)])
    }

    fn global_avg_pool(&mut self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let s = &x.shape;
        let mut y = Array::zeros(&[s[0], s[3]]);
        pool::forward(&x.data, s[0], s[1] * s[2], s[3], &mut y.data);
        Ok(arc(y))
    }

    fn global_avg_pool_backward(&mut self, x_shape: &[usize], dy: &Self::Tensor) -> Result<Self::Tensor> {
        let mut dx = Array::zeros(x_shape);
        pool::backward(&dy.data, x_shape[1] * x_shape[2], x_shape[3], &mut dx.data);
        Ok(arc(dx))
    }

    fn draw_mask(&mut self, kind: MaskKind, x_shape: &[usize], p: f64, source: MaskSource<'_>) -> Result<Self::Mask> {
        let numel: usize = x_shape.iter().product();
        let (len, group) = match kind {
            MaskKind::Element => (numel, 1),
            MaskKind::Row => {
                let n = x_shape.first().copied().unwrap_or(0);
                (n, (numel / n.max(1)).max(1))
            }
        };
        let values = match source {
            MaskSource::Host(rng) => dropout::draw_mask(len, p, rng),
            MaskSource::Counter { key, .. } => {
                let scale = dropout::keep_scale::<T>(p);
                (0..len as u64).map(|i| if counter_keep(key, i, p) { scale } else { T::zero() }).collect()
            }
        };
        Ok(CpuMask { values, group })
    }

    fn apply_mask(&mut self, x: &Self::Tensor, mask: &Self::Mask) -> Result<Self::Tensor> {
        let mut y = Array::zeros(&x.shape);
        dropout::forward(&x.data, &mask.values, mask.group, &mut y.data);
        Ok(arc(y))
    }

    fn loss(
        &mut self,
        logits: &Self::Tensor,
        targets: &[usize],
        weights: Option<&[T]>,
        kind: &LossKind,
    ) -> Result<(Self::Tensor, Self::LossSaved)> {
        let (l, grad) = loss::forward_backward(&logits.data, logits.shape[1], targets, weights, kind)?;
        Ok((arc(Array::scalar(T::of_f64(l))), grad))
    }

    fn loss_backward(
        &mut self,
        saved: &Self::LossSaved,
        logits: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let s = dy.data[0].as_f64();
        let data = saved.iter().map(|&g| T::of_f64(g * s)).collect();
        Ok(arc(Array::new(&logits.shape, data)?))
    }
}
