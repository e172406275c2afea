//! The CUDA backend's recording of global average pooling (`[N, H, W, C]` → `[N, C]`) and its backward, through
//! the `se_pool*` kernels (see `cuda.rs`).

use super::{Cuda, Tensor, by_dtype, dim};
use anyhow::{Result, ensure};

pub(super) fn nhwc(what: &str, shape: &[usize]) -> Result<(i32, i32, i32)> {
    ensure!(shape.len() == 4, "{what}: expected NHWC, got {shape:?}");
    Ok((dim(shape[0], "batch")?, dim(shape[1] * shape[2], "pixels")?, dim(shape[3], "channels")?))
}

pub(super) fn pool(cu: &mut Cuda, x: &Tensor) -> Result<Tensor> {
    cu.expect_act("pool input", x)?;
    let (n, hw, c) = nhwc("global average pool", &x.shape)?;
    let y = cu.alloc("pool y", &[x.shape[0], x.shape[3]], x.dtype);
    let (xv, yv, dt) = (x.view, y.view, x.dtype);
    cu.push(format!("global avg pool [{n}, {hw}, {c}]"), vec![x.access()], vec![y.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.se_pool::<T>(&gpu.stream, yv.get(b)?, xv.get(b)?, n, hw, c))
    });
    Ok(y)
}

pub(super) fn pool_backward(cu: &mut Cuda, x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
    cu.expect_act("pool output gradient", dy)?;
    let (n, hw, c) = nhwc("global average pool backward", x_shape)?;
    let dx = cu.alloc("pool dx", x_shape, dy.dtype);
    let (dyv, dxv, dt) = (dy.view, dx.view, dy.dtype);
    cu.push(format!("global avg pool backward [{n}, {hw}, {c}]"), vec![dy.access()], vec![dx.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.se_pool_backward::<T>(&gpu.stream, dxv.get(b)?, dyv.get(b)?, n, hw, c))
    });
    Ok(dx)
}
