//! Batch norm over the last dimension (+ fused SiLU): training statistics with the running-statistics update on
//! the device (momentum, unbiased variance, as the CPU reference), eval statistics from the running ones, the
//! normalize pass, and the backward with dgamma/dbeta written in f32 straight into their slots.

use super::{Cuda, DType, Tensor, by_dtype, dim};
use crate::backend::Want;
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode};
use crate::ops::batchnorm::{BnParams, bn_workspace_bytes};
use anyhow::{Result, bail, ensure};

/// What batch-norm backward needs, on the device: the mean and inverse standard deviation it normalized with.
pub struct CudaBnSaved {
    mean: Tensor,
    invstd: Tensor,
    params: BnParams,
}

fn act_code(act: Option<Act>) -> Result<i32> {
    match act {
        None => Ok(0),
        Some(Act::Silu) => Ok(1),
        Some(a) => bail!("batch norm on the CUDA backend fuses only SiLU, not {a:?}: apply it as a separate op"),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    cu: &mut Cuda,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    index: usize,
    mode: BnMode,
    cfg: BnCfg,
    act: Option<Act>,
) -> Result<(Tensor, CudaBnSaved)> {
    cu.expect_act("batch norm input", x)?;
    let c = *x.shape.last().unwrap_or(&0);
    ensure!(c > 0, "batch norm: input {:?} has no channels", x.shape);
    ensure!(gamma.dtype == DType::F32 && beta.dtype == DType::F32, "batch norm: gamma and beta must be f32 parameters");
    let m = x.numel() / c;
    let train = matches!(mode, BnMode::Train { .. });
    let p = BnParams {
        m: m as i64,
        c: dim(c, "channels")?,
        act: act_code(act)?,
        eps: cfg.eps as f32,
        momentum: cfg.momentum as f32,
        training: train as i32,
        rows_split: 0,
    };
    let (rm, rv) = cu.bn_views(index, c)?;
    let mean = cu.alloc("bn mean", &[c], DType::F32);
    let invstd = cu.alloc("bn invstd", &[c], DType::F32);
    let (mv, iv, dt) = (mean.view, invstd.view, x.dtype);
    match mode {
        BnMode::Train { update_running } => {
            ensure!(m > 1, "batch norm: expected more than 1 value per channel when training, got {m} (batch of one?)");
            let ws = cu.scratch("bn stats workspace", bn_workspace_bytes(m as i64, p.c));
            let xv = x.view;
            let (mut reads, mut writes) = (vec![x.access()], vec![mean.access(), invstd.access(), ws.all()]);
            if update_running {
                reads.extend([rm.all(), rv.all()]);
                writes.extend([rm.all(), rv.all()]);
            }
            cu.push(format!("bn {index} stats [{m}, {c}]"), reads, writes, move |b| {
                let gpu = b.gpu();
                let (rm, rv) = if update_running { (Some(rm.get(b)?), Some(rv.get(b)?)) } else { (None, None) };
                by_dtype!(dt, T => gpu.kernels.bn_stats::<T>(&gpu.stream, &p, xv.get(b)?, mv.get(b)?, iv.get(b)?, rm, rv, ws.get(b)?))
            });
        }
        BnMode::Eval => {
            cu.push(
                format!("bn {index} eval stats [{c}]"),
                vec![rm.all(), rv.all()],
                vec![mean.access(), invstd.access()],
                move |b| {
                    let gpu = b.gpu();
                    gpu.kernels.bn_eval_stats(&gpu.stream, &p, rm.get(b)?, rv.get(b)?, mv.get(b)?, iv.get(b)?)
                },
            );
        }
    }
    let y = cu.alloc("bn y", &x.shape, dt);
    let (xv, yv, gv, bv) = (x.view, y.view, gamma.view, beta.view);
    cu.push(
        format!("bn {index} normalize{} [{m}, {c}]", if act.is_some() { " + silu" } else { "" }),
        vec![x.access(), mean.access(), invstd.access(), gamma.access(), beta.access()],
        vec![y.access()],
        move |b| {
            let gpu = b.gpu();
            by_dtype!(dt, T => gpu.kernels.bn_forward::<T>(&gpu.stream, &p, yv.get(b)?, xv.get(b)?, mv.get(b)?, iv.get(b)?, gv.get(b)?, bv.get(b)?))
        },
    );
    Ok((y, CudaBnSaved { mean, invstd, params: p }))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cu: &mut Cuda,
    saved: &CudaBnSaved,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    dy: &Tensor,
    act: Option<Act>,
    want: [Want; 3],
) -> Result<[Option<Tensor>; 3]> {
    cu.expect_act("batch norm output gradient", dy)?;
    let p = saved.params;
    ensure!(act_code(act)? == p.act, "batch norm backward: activation differs from the forward's");
    let (m, c) = (p.m as usize, p.c as usize);
    let dt = x.dtype;
    // The kernel always writes dx; when nobody wants it, it goes to a buffer nothing reads.
    let dx = cu.alloc("bn dx", &x.shape, dt);
    let dg = cu.grad_out(want[1], "bn dgamma", &[c])?;
    let db = cu.grad_out(want[2], "bn dbeta", &[c])?;
    let ws = cu.scratch("bn backward workspace", bn_workspace_bytes(p.m, p.c));
    let sums = cu.scratch("bn backward sums", 2 * c * 4);
    let (dgv, dbv) = (dg.view(), db.view());
    let mut writes = vec![dx.access(), ws.all(), sums.all()];
    writes.extend(dgv.map(|v| v.all()));
    writes.extend(dbv.map(|v| v.all()));
    let reads =
        vec![x.access(), dy.access(), saved.mean.access(), saved.invstd.access(), gamma.access(), beta.access()];
    let (dxv, xv, dyv, mv, iv, gv, bv) =
        (dx.view, x.view, dy.view, saved.mean.view, saved.invstd.view, gamma.view, beta.view);
    cu.push(format!("bn backward [{m}, {c}]"), reads, writes, move |b| {
        let gpu = b.gpu();
        let dg = dgv.map(|v| v.get(b)).transpose()?;
        let db = dbv.map(|v| v.get(b)).transpose()?;
        by_dtype!(dt, T => gpu.kernels.bn_backward::<T>(
            &gpu.stream,
            &p,
            dxv.get(b)?,
            xv.get(b)?,
            dyv.get(b)?,
            mv.get(b)?,
            iv.get(b)?,
            gv.get(b)?,
            bv.get(b)?,
            dg,
            db,
            ws.get(b)?,
            sums.get(b)?,
        ))
    });
    Ok([want[0].any().then_some(dx), dg.into_result(), db.into_result()])
}
