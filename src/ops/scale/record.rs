//! The CUDA backend's recording of squeeze-excite's channel scaling `y[n, h, w, c] = x[n, h, w, c] · s[n, c]` and its
//! backward, through the `se_scale*` kernels (see `cuda.rs`).

use super::pool::nhwc;
use super::{Cuda, Tensor, by_dtype};
use crate::backend::Want;
use anyhow::Result;

pub(super) fn channel_scale(cu: &mut Cuda, x: &Tensor, s: &Tensor) -> Result<Tensor> {
    cu.expect_act("channel scale input", x)?;
    cu.expect_act("channel scale factors", s)?;
    let (n, hw, c) = nhwc("channel scale", &x.shape)?;
    let y = cu.alloc("se scale y", &x.shape, x.dtype);
    let (xv, sv, yv, dt) = (x.view, s.view, y.view, x.dtype);
    cu.push(format!("se scale [{n}, {hw}, {c}]"), vec![x.access(), s.access()], vec![y.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.se_scale::<T>(&gpu.stream, yv.get(b)?, xv.get(b)?, sv.get(b)?, n, hw, c))
    });
    Ok(y)
}

pub(super) fn channel_scale_backward(
    cu: &mut Cuda,
    x: &Tensor,
    s: &Tensor,
    dy: &Tensor,
    want: [Want; 2],
) -> Result<[Option<Tensor>; 2]> {
    cu.expect_act("channel scale output gradient", dy)?;
    let (n, hw, c) = nhwc("channel scale backward", &x.shape)?;
    let dt = x.dtype;
    let dx = want[0].any().then(|| cu.alloc("se scale dx", &x.shape, dt));
    // The kernel always computes ds; when nobody wants it, it goes to a buffer nothing reads.
    let ds = cu.alloc("se scale ds", &s.shape, dt);
    let mut writes = vec![ds.access()];
    writes.extend(dx.as_ref().map(|t| t.access()));
    let (xv, sv, dyv, dsv, dxv) = (x.view, s.view, dy.view, ds.view, dx.as_ref().map(|t| t.view));
    cu.push(format!("se scale backward [{n}, {hw}, {c}]"), vec![x.access(), s.access(), dy.access()], writes, move |b| {
        let gpu = b.gpu();
        let dx = dxv.map(|v| v.get(b)).transpose()?;
        by_dtype!(dt, T => gpu.kernels.se_scale_backward::<T>(&gpu.stream, dx, dsv.get(b)?, xv.get(b)?, sv.get(b)?, dyv.get(b)?, (n, hw, c)))
    });
    Ok([dx, want[1].any().then_some(ds)])
}
