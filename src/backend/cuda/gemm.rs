//! GEMM steps shared by the 1×1 convolutions and the linear layers (both are `[rows, in] × [out, in]ᵀ` on NHWC
//! activations), and their bias epilogue and bias gradient.

use super::{Cuda, DType, GradOut, Tensor, by_dtype};
use crate::cuda::blas::Gemm;
use crate::cuda::program::Access;
use anyhow::{Result, ensure};

/// `y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ bias[out])`, y of the activation type.
pub(super) fn forward(
    cu: &mut Cuda,
    name: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    rows: usize,
) -> Result<Tensor> {
    let (cin, cout) = (w.shape[w.shape.len() - 1], w.shape[0]);
    ensure!(x.numel() == rows * cin, "{name}: input {:?} is not [{rows}, {cin}]", x.shape);
    let dt = cu.dtype();
    let wv = cu.weight_view(w)?;
    let out_shape = match x.shape.len() {
        4 => vec![x.shape[0], x.shape[1], x.shape[2], cout],
        _ => vec![rows, cout],
    };
    let y = cu.alloc(&format!("{name} y"), &out_shape, dt);
    let g = Gemm { m: rows, n: cout, k: cin, trans_a: false, trans_b: true };
    let (xv, yv, blas) = (x.view, y.view, cu.blas.clone());
    cu.push(
        format!("{name} gemm [{rows}x{cin}]x[{cin}x{cout}]"),
        vec![x.access(), Access { buf: wv.buf, bytes: wv.bytes }],
        vec![y.access()],
        move |b| by_dtype!(dt, T => blas.gemm::<T>(&g, 1.0, xv.get(b)?, wv.get(b)?, 0.0, yv.get(b)?)),
    );
    if let Some(bias) = bias {
        add_bias(cu, name, &y, bias, rows, cout)?;
    }
    Ok(y)
}

/// `y[r, c] += bias[c]` in place (the bias is an f32 master).
pub(super) fn add_bias(cu: &mut Cuda, name: &str, y: &Tensor, bias: &Tensor, rows: usize, cols: usize) -> Result<()> {
    ensure!(bias.dtype == DType::F32 && bias.numel() == cols, "{name}: bias {:?} must be f32 [{cols}]", bias.shape);
    let (yv, bv, dt) = (y.view, bias.view, y.dtype);
    cu.push(format!("{name} bias add"), vec![y.access(), bias.access()], vec![y.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.bias_add::<T>(&gpu.stream, yv.get(b)?, bv.get(b)?, rows, cols))
    });
    Ok(())
}

/// `dx[rows, in] = dy[rows, out] · w[out, in]`.
pub(super) fn backward_data(
    cu: &mut Cuda,
    name: &str,
    w: &Tensor,
    dy: &Tensor,
    x_shape: &[usize],
    rows: usize,
) -> Result<Tensor> {
    let (cin, cout) = (w.shape[w.shape.len() - 1], w.shape[0]);
    let dt = cu.dtype();
    let wv = cu.weight_view(w)?;
    let dx = cu.alloc(&format!("{name} dx"), x_shape, dt);
    let g = Gemm { m: rows, n: cin, k: cout, trans_a: false, trans_b: false };
    let (dyv, dxv, blas) = (dy.view, dx.view, cu.blas.clone());
    cu.push(
        format!("{name} dx gemm [{rows}x{cout}]x[{cout}x{cin}]"),
        vec![dy.access(), Access { buf: wv.buf, bytes: wv.bytes }],
        vec![dx.access()],
        move |b| by_dtype!(dt, T => blas.gemm::<T>(&g, 1.0, dyv.get(b)?, wv.get(b)?, 0.0, dxv.get(b)?)),
    );
    Ok(dx)
}

/// `dw[out, in] = dy[rows, out]ᵀ · x[rows, in]` in f32, into the parameter's slot (or a new f32 tensor).
pub(super) fn backward_weight(cu: &mut Cuda, name: &str, x: &Tensor, dy: &Tensor, out: &GradOut) -> Result<()> {
    let Some(dwv) = out.view() else { return Ok(()) };
    let (cout, cin) = (dy.shape[dy.shape.len() - 1], x.shape[x.shape.len() - 1]);
    let rows = x.numel() / cin;
    let g = Gemm { m: cout, n: cin, k: rows, trans_a: true, trans_b: false };
    let (xv, dyv, dt, blas) = (x.view, dy.view, cu.dtype(), cu.blas.clone());
    cu.push(
        format!("{name} dw gemm [{cout}x{rows}]x[{rows}x{cin}]"),
        vec![dy.access(), x.access()],
        vec![dwv.all()],
        move |b| match dt {
            DType::F32 => blas.gemm::<f32>(&g, 1.0, dyv.get(b)?, xv.get(b)?, 0.0, dwv.get(b)?),
            DType::F16 => blas.gemm_into::<half::f16, f32>(&g, 1.0, dyv.get(b)?, xv.get(b)?, 0.0, dwv.get(b)?),
        },
    );
    Ok(())
}

/// `db[c] = Σ_r dy[r, c]` in f32, into the slot (or a new f32 tensor).
pub(super) fn backward_bias(
    cu: &mut Cuda,
    name: &str,
    dy: &Tensor,
    out: &GradOut,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let Some(dbv) = out.view() else { return Ok(()) };
    let (dyv, dt) = (dy.view, dy.dtype);
    cu.push(format!("{name} db column sum"), vec![dy.access()], vec![dbv.all()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.col_sum::<T>(&gpu.stream, dbv.get(b)?, dyv.get(b)?, rows, cols, false))
    });
    Ok(())
}
