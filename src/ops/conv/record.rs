//! Convolutions, NHWC × OHWI: 1×1 through cuBLASLt (`[N·H·W, Cin] · [Cout, Cin]ᵀ`), depthwise through the
//! depthwise kernels (weights permuted from the model's `[C, k·k]` to the kernels' `[k·k, C]` each step, the
//! weight gradient transposed back into its slot), everything else (the stem) through cuDNN.

use super::{Cuda, DType, GradOut, Tensor, by_dtype, dim, gemm};
use crate::backend::Want;
use crate::cuda::dnn::{ConvShape, Pass};
use crate::ops::conv::ConvGeom;
use crate::ops::depthwise::{DwParams, dw_weight_workspace_bytes};
use anyhow::{Result, ensure};

/// Whether the depthwise kernels take this convolution (odd square kernel, "same" padding).
fn is_dw_kernel(g: &ConvGeom) -> bool {
    g.is_depthwise() && g.kh == g.kw && g.kh % 2 == 1 && g.pad == (g.kh - 1) / 2
}

pub(super) fn forward(cu: &mut Cuda, g: &ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    cu.expect_act("conv2d input", x)?;
    let rows = g.n * g.oh * g.ow;
    if g.is_pointwise() {
        return gemm::forward(cu, "conv1x1", x, w, bias, rows);
    }
    let y = if is_dw_kernel(g) { dw_forward(cu, g, x, w)? } else { dense_forward(cu, g, x, w)? };
    if let Some(b) = bias {
        gemm::add_bias(cu, "conv", &y, b, rows, g.cout)?;
    }
    Ok(y)
}

pub(super) fn backward(
    cu: &mut Cuda,
    g: &ConvGeom,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want: [Want; 3],
) -> Result<[Option<Tensor>; 3]> {
    cu.expect_act("conv2d output gradient", dy)?;
    let rows = g.n * g.oh * g.ow;
    let dw = cu.grad_out(want[1], "conv dw", &w.shape)?;
    let dx = if g.is_pointwise() {
        gemm::backward_weight(cu, "conv1x1", x, dy, &dw)?;
        want[0].any().then(|| gemm::backward_data(cu, "conv1x1", w, dy, &x.shape, rows)).transpose()?
    } else if is_dw_kernel(g) {
        dw_backward(cu, g, x, w, dy, want[0].any(), &dw)?
    } else {
        dense_backward(cu, g, x, w, dy, want[0].any(), &dw)?
    };
    let db = cu.grad_out(want[2], "conv db", &[g.cout])?;
    gemm::backward_bias(cu, "conv", dy, &db, rows, g.cout)?;
    Ok([dx, dw.into_result(), db.into_result()])
}

fn dw_params(g: &ConvGeom) -> Result<DwParams> {
    Ok(DwParams {
        n: dim(g.n, "batch")?,
        h: dim(g.h, "height")?,
        w: dim(g.w, "width")?,
        c: dim(g.cin, "channels")?,
        ho: dim(g.oh, "output height")?,
        wo: dim(g.ow, "output width")?,
        k: dim(g.kh, "kernel size")?,
        stride: dim(g.stride, "stride")?,
        pad: dim(g.pad, "padding")?,
        rows_split: 0,
    })
}

/// The kernels' `[k·k, C]` weights of the activation type, from the `[C, k·k]` f32 master.
fn dw_weights(cu: &mut Cuda, g: &ConvGeom, w: &Tensor) -> Result<Tensor> {
    ensure!(w.dtype == DType::F32, "depthwise weight {:?} must be an f32 master", w.shape);
    let (c, kk) = (g.cin, g.kh * g.kw);
    let dt = cu.dtype();
    let wp = cu.alloc("depthwise w [kk, C]", &[kk, c], dt);
    let (src, dst) = (w.view, wp.view);
    cu.push(format!("depthwise weights [{c}, {kk}] -> [{kk}, {c}]"), vec![w.access()], vec![wp.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.permute_from_f32::<T>(&gpu.stream, dst.get(b)?, src.get(b)?, c, kk))
    });
    Ok(wp)
}

fn dw_forward(cu: &mut Cuda, g: &ConvGeom, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let p = dw_params(g)?;
    let wp = dw_weights(cu, g, w)?;
    let dt = cu.dtype();
    let y = cu.alloc("depthwise y", &g.out_shape(), dt);
    let (xv, wv, yv) = (x.view, wp.view, y.view);
    cu.push(
        format!("depthwise {}x{} s{} forward", g.kh, g.kw, g.stride),
        vec![x.access(), wp.access()],
        vec![y.access()],
        move |b| {
            let gpu = b.gpu();
            by_dtype!(dt, T => gpu.kernels.dw_forward::<T>(&gpu.stream, &p, yv.get(b)?, xv.get(b)?, wv.get(b)?))
        },
    );
    Ok(y)
}

fn dw_backward(
    cu: &mut Cuda,
    g: &ConvGeom,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    dw: &GradOut,
) -> Result<Option<Tensor>> {
    let p = dw_params(g)?;
    let dt = cu.dtype();
    let (c, kk) = (g.cin, g.kh * g.kw);
    if let Some(dwv) = dw.view() {
        let ws = cu.scratch("depthwise dw workspace", dw_weight_workspace_bytes(&p));
        let tmp = cu.alloc("depthwise dw [kk, C]", &[kk, c], DType::F32);
        let (xv, dyv, tv) = (x.view, dy.view, tmp.view);
        cu.push(format!("depthwise {}x{} s{} dw", g.kh, g.kw, g.stride), vec![x.access(), dy.access()], vec![tmp.access(), ws.all()], move |b| {
            let gpu = b.gpu();
            by_dtype!(dt, T => gpu.kernels.dw_backward_weight::<T>(&gpu.stream, &p, tv.get(b)?, xv.get(b)?, dyv.get(b)?, ws.get(b)?, false))
        });
        cu.push(format!("depthwise dw [{kk}, {c}] -> [{c}, {kk}]"), vec![tmp.access()], vec![dwv.all()], move |b| {
            let gpu = b.gpu();
            gpu.kernels.transpose_add(&gpu.stream, dwv.get(b)?, tv.get(b)?, kk, c, false)
        });
    }
    if !want_dx {
        return Ok(None);
    }
    let wp = dw_weights(cu, g, w)?;
    let dx = cu.alloc("depthwise dx", &x.shape, dt);
    let (dyv, wv, dxv) = (dy.view, wp.view, dx.view);
    cu.push(
        format!("depthwise {}x{} s{} dx", g.kh, g.kw, g.stride),
        vec![dy.access(), wp.access()],
        vec![dx.access()],
        move |b| {
            let gpu = b.gpu();
            by_dtype!(dt, T => gpu.kernels.dw_backward_data::<T>(&gpu.stream, &p, dxv.get(b)?, dyv.get(b)?, wv.get(b)?))
        },
    );
    Ok(Some(dx))
}

fn conv_shape(cu: &Cuda, g: &ConvGeom) -> Result<ConvShape> {
    ensure!(g.kh == g.kw, "cuDNN path: only square kernels ({}x{} given)", g.kh, g.kw);
    Ok(ConvShape {
        n: dim(g.n, "batch")?,
        c_in: dim(g.cin, "input channels")?,
        h: dim(g.h, "height")?,
        w: dim(g.w, "width")?,
        c_out: dim(g.cout, "output channels")?,
        k: dim(g.kh, "kernel size")?,
        stride: dim(g.stride, "stride")?,
        pad: dim(g.pad, "padding")?,
        groups: dim(g.groups, "groups")?,
        half: cu.dtype() == DType::F16,
    })
}

fn dense_forward(cu: &mut Cuda, g: &ConvGeom, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let s = conv_shape(cu, g)?;
    let dt = cu.dtype();
    let wv = cu.weight_view(w)?;
    let ws = cu.scratch("conv workspace", cu.dnn.workspace_bytes(&s, Pass::Forward)?);
    let y = cu.alloc("conv y", &g.out_shape(), dt);
    let (xv, yv, dnn) = (x.view, y.view, cu.dnn.clone());
    cu.push(
        format!("conv {}x{} s{} forward (cuDNN)", g.kh, g.kw, g.stride),
        vec![x.access(), wv.all()],
        vec![y.access(), ws.all()],
        move |b| by_dtype!(dt, T => dnn.forward::<T>(&s, xv.get(b)?, wv.get(b)?, yv.get(b)?, ws.get(b)?)),
    );
    Ok(y)
}

fn dense_backward(
    cu: &mut Cuda,
    g: &ConvGeom,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    dw: &GradOut,
) -> Result<Option<Tensor>> {
    let s = conv_shape(cu, g)?;
    let dt = cu.dtype();
    let dnn = cu.dnn.clone();
    if let Some(dwv) = dw.view() {
        let name = format!("conv {}x{} s{} dw (cuDNN)", g.kh, g.kw, g.stride);
        match dt {
            DType::F32 => {
                let ws = cu.scratch("conv dw workspace", dnn.workspace_bytes(&s, Pass::BackwardFilter)?);
                let (xv, dyv) = (x.view, dy.view);
                let d = dnn.clone();
                cu.push(name, vec![x.access(), dy.access()], vec![dwv.all(), ws.all()], move |b| {
                    d.backward_filter::<f32>(&s, xv.get(b)?, dyv.get(b)?, dwv.get(b)?, ws.get(b)?, false)
                });
            }
            DType::F16 => {
                // cuDNN writes the filter gradient in the filter's type, and an f16 one is a sum over every output
                // position rounded once and capped at 65504: under a loss scale of ~1e3 the stem's overflows. So
                // x and dy are widened and the f32 backward filter writes the f32 slot. Napkin math per image at
                // 224x224: x 0.3 MB f16 -> 0.6 MB f32, dy 0.8 MB f16 -> 1.6 MB f32: the casts move 3.3 MB and the
                // filter pass reads 1.1 MB more (bandwidth bound), about 2% of the ~200 MB a step moves per image;
                // both copies die at the filter pass.
                let s32 = ConvShape { half: false, ..s };
                let ws = cu.scratch("conv dw f32 workspace", dnn.workspace_bytes(&s32, Pass::BackwardFilter)?);
                let x32 = cu.alloc("conv dw x f32", &x.shape, DType::F32);
                let dy32 = cu.alloc("conv dw dy f32", &dy.shape, DType::F32);
                for (src, dst) in [(x, &x32), (dy, &dy32)] {
                    let (sv, dv, n) = (src.view, dst.view, src.numel());
                    cu.push(format!("widen conv dw input [{n}]"), vec![src.access()], vec![dst.access()], move |b| {
                        let gpu = b.gpu();
                        gpu.kernels.cast(&gpu.stream, dv.get(b)?, sv.get(b)?, n, false)
                    });
                }
                let (xv, dyv, d) = (x32.view, dy32.view, dnn.clone());
                cu.push(name, vec![x32.access(), dy32.access()], vec![dwv.all(), ws.all()], move |b| {
                    d.backward_filter::<f32>(&s32, xv.get(b)?, dyv.get(b)?, dwv.get(b)?, ws.get(b)?, false)
                });
            }
        }
    }
    if !want_dx {
        return Ok(None);
    }
    let wv = cu.weight_view(w)?;
    let ws = cu.scratch("conv dx workspace", dnn.workspace_bytes(&s, Pass::BackwardData)?);
    let dx = cu.alloc("conv dx", &x.shape, dt);
    let (dyv, dxv) = (dy.view, dx.view);
    cu.push(
        format!("conv {}x{} s{} dx (cuDNN)", g.kh, g.kw, g.stride),
        vec![dy.access(), wv.all()],
        vec![dx.access(), ws.all()],
        move |b| by_dtype!(dt, T => dnn.backward_data::<T>(&s, dyv.get(b)?, wv.get(b)?, dxv.get(b)?, ws.get(b)?)),
    );
    Ok(Some(dx))
}
