//! Elementwise ops: activations and their backward, the residual add, and the two gradient sums the tape needs
//! (two gradients reaching one value; a gradient reaching a parameter the op did not write into its slot).

use super::{Cuda, DType, Tensor, by_dtype};
use crate::autograd::ParamId;
use crate::ops::activation::Act;
use crate::ops::activation::Unary;
use anyhow::{Context, Result, ensure};

fn unary(act: Act) -> Unary {
    match act {
        Act::Silu => Unary::Silu,
        Act::Sigmoid => Unary::Sigmoid,
        Act::Relu => Unary::Relu,
    }
}

pub(super) fn activation(cu: &mut Cuda, act: Act, x: &Tensor) -> Result<Tensor> {
    cu.expect_act("activation input", x)?;
    let y = cu.alloc(&format!("{act:?} y"), &x.shape, x.dtype);
    let (xv, yv, dt, n, op) = (x.view, y.view, x.dtype, x.numel(), unary(act));
    cu.push(format!("{act:?} [{n}]"), vec![x.access()], vec![y.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.unary::<T>(&gpu.stream, op, yv.get(b)?, xv.get(b)?, n))
    });
    Ok(y)
}

pub(super) fn activation_backward(cu: &mut Cuda, act: Act, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    cu.expect_act("activation output gradient", dy)?;
    // The kernels' derivative reads x for SiLU and ReLU, the forward output for sigmoid.
    let saved = if act == Act::Sigmoid { y } else { x };
    let dx = cu.alloc(&format!("{act:?} dx"), &x.shape, x.dtype);
    let (sv, dyv, dxv, dt, n, op) = (saved.view, dy.view, dx.view, x.dtype, x.numel(), unary(act));
    cu.push(format!("{act:?} backward [{n}]"), vec![saved.access(), dy.access()], vec![dx.access()], move |b| {
        let gpu = b.gpu();
        by_dtype!(dt, T => gpu.kernels.unary_backward::<T>(&gpu.stream, op, dxv.get(b)?, sv.get(b)?, dyv.get(b)?, n))
    });
    Ok(dx)
}

pub(super) fn add(cu: &mut Cuda, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.dtype == b.dtype && a.shape == b.shape,
        "add: {:?} {:?} and {:?} {:?} differ",
        a.shape,
        a.dtype,
        b.shape,
        b.dtype
    );
    let y = cu.alloc("add y", &a.shape, a.dtype);
    let (av, bv, yv, dt, n) = (a.view, b.view, y.view, a.dtype, a.numel());
    cu.push(format!("add [{n}]"), vec![a.access(), b.access()], vec![y.access()], move |bd| {
        let gpu = bd.gpu();
        by_dtype!(dt, T => gpu.kernels.add::<T>(&gpu.stream, yv.get(bd)?, av.get(bd)?, bv.get(bd)?, n))
    });
    Ok(y)
}

/// `acc += g`, as a new buffer: a gradient handle may be shared (the residual's backward hands the same `dy` to
/// both inputs), so nothing is updated in place.
pub(super) fn accumulate(cu: &mut Cuda, acc: &mut Tensor, g: Tensor) -> Result<()> {
    ensure!(acc.constant.is_none() && g.constant.is_none(), "accumulating a constant gradient seed is not supported");
    *acc = add(cu, acc, &g)?;
    Ok(())
}

/// Adds a gradient the tape holds into a parameter's f32 slot (widening an f16 gradient first).
pub(super) fn accumulate_param_grad(cu: &mut Cuda, id: ParamId, g: Tensor) -> Result<()> {
    let slot = cu
        .slot_view(id)
        .with_context(|| format!("parameter {} gets a gradient but has no slot (it is frozen)", cu.params[id].name))?;
    ensure!(g.numel() * 4 == slot.bytes, "gradient {:?} does not fit parameter {}'s slot", g.shape, cu.params[id].name);
    let n = g.numel();
    let src = match g.dtype {
        DType::F32 => g,
        DType::F16 => {
            let wide = cu.alloc("grad f16 -> f32", &g.shape, DType::F32);
            let (gv, wv) = (g.view, wide.view);
            cu.push(format!("widen gradient [{n}]"), vec![g.access()], vec![wide.access()], move |b| {
                let gpu = b.gpu();
                gpu.kernels.cast(&gpu.stream, wv.get(b)?, gv.get(b)?, n, false)
            });
            wide
        }
    };
    let sv = src.view;
    let name = format!("add gradient into slot of {}", cu.params[id].name);
    cu.push(name, vec![src.access(), slot.all()], vec![slot.all()], move |b| {
        let gpu = b.gpu();
        gpu.kernels.scale::<f32>(&gpu.stream, slot.get(b)?, sv.get(b)?, 1.0, n, true)
    });
    Ok(())
}
