//! `derma check`, the `batchnorm` family: the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;

use crate::cuda::kernels::rows_split;
use crate::ops;
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode, BnState};
use crate::ops::batchnorm::{BnParams, bn_workspace_bytes};
use crate::tools::check::*;

pub(crate) fn batchnorm<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    let (eps, momentum) = (1e-3, 0.1);
    let cfg = BnCfg { eps, momentum };
    // (N, H=W, channels, fused SiLU): odd shapes; rows_split 4 with C a multiple of 8 (vector path); rows_split 6
    // with a vectorised flat pass that wraps the grid; and rows_split at its cap (256) with C = 3 (a block of 32
    // channel lanes, 29 of them idle).
    for (n, hw, ch, silu) in [
        (3, 7, 13, true),
        (3, 9, 40, true),
        (3, 9, 40, false),
        (8, 16, 32, true),
        (4, 29, 32, true),
        (2, 257, 3, false),
    ] {
        let m = n * hw * hw;
        let split = rows_split(m as i64);
        let shape = format!("N={n} H=W={hw} C={ch}{} rows_split={split}", if silu { " +SiLU" } else { "" });
        let act = silu.then_some(Act::Silu);
        // An offset mean: a one-pass E[x²]−E[x]² would lose digits here.
        let (x, bx) = c.rand::<T>(m * ch, 2.0, 3.0)?;
        let (dy, bdy) = c.rand::<T>(m * ch, 1.0, 0.0)?;
        let (gamma, bgam) = c.rand::<f32>(ch, 0.5, 1.0)?;
        let (beta, bbet) = c.rand::<f32>(ch, 0.5, 0.0)?;
        let p = BnParams {
            m: m as i64,
            c: ch as i32,
            act: silu as i32,
            eps: eps as f32,
            momentum: momentum as f32,
            training: 1,
            rows_split: 0,
        };
        // Training: batch statistics, running stats updated, gradient through the statistics.
        let mut state = BnState::<f64>::new(ch);
        let mut want_y = vec![0.0; m * ch];
        let (rmean, rinv) = ops::batchnorm::forward(
            &x,
            ch,
            &gamma,
            &beta,
            &mut state,
            BnMode::Train { update_running: true },
            cfg,
            act,
            &mut want_y,
        )?;
        let (mean, invstd) = (c.poison::<f32>(ch)?, c.poison::<f32>(ch)?);
        let rm = c.output::<f32>(&vec![0.0; ch])?;
        let rv = c.output::<f32>(&vec![1.0; ch])?;
        let ws = c.scratch(bn_workspace_bytes(m as i64, ch as i32))?;
        g.kernels.bn_stats::<T>(
            &g.stream,
            &p,
            s(&bx),
            mean.v()?,
            invstd.v()?,
            Some(rm.v()?),
            Some(rv.v()?),
            ws.v()?,
        )?;
        let y = c.poison::<T>(m * ch)?;
        g.kernels.bn_forward::<T>(&g.stream, &p, y.v()?, s(&bx), mean.v()?, invstd.v()?, s(&bgam), s(&bbet))?;
        let (dx, dgam, dbet, sums) =
            (c.poison::<T>(m * ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(2 * ch)?);
        g.kernels.bn_backward::<T>(
            &g.stream,
            &p,
            dx.v()?,
            s(&bx),
            s(&bdy),
            mean.v()?,
            invstd.v()?,
            s(&bgam),
            s(&bbet),
            Some(dgam.v()?),
            Some(dbet.v()?),
            ws.v()?,
            sums.v()?,
        )?;
        let (mut wdx, mut wdg, mut wdb) = (vec![0.0; m * ch], vec![0.0; ch], vec![0.0; ch]);
        ops::batchnorm::backward(
            &x,
            ch,
            &gamma,
            &beta,
            &rmean,
            &rinv,
            true,
            act,
            &dy,
            Some(&mut wdx),
            Some(&mut wdg),
            Some(&mut wdb),
        );
        // Statistics are f32 whatever the storage: judge them at f32 reduction tolerance.
        let got = c.fetch::<f32>(&mean)?;
        c.record("bn_stats mean", Dtype::F32, &shape, &got, &rmean, Accuracy::Reduction);
        let got = c.fetch::<f32>(&invstd)?;
        c.record("bn_stats invstd", Dtype::F32, &shape, &got, &rinv, Accuracy::Reduction);
        let got = c.fetch::<f32>(&rm)?;
        c.record("bn_stats running_mean", Dtype::F32, &shape, &got, &state.running_mean, Accuracy::Reduction);
        let got = c.fetch::<f32>(&rv)?;
        c.record("bn_stats running_var", Dtype::F32, &shape, &got, &state.running_var, Accuracy::Reduction);
        let got = c.fetch::<T>(&y)?;
        c.record("bn_forward (train) y", dt, &shape, &got, &want_y, Accuracy::Elementwise);
        let got = c.fetch::<T>(&dx)?;
        c.record("bn_backward (train) dx", dt, &shape, &got, &wdx, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dgam)?;
        c.record("bn_backward (train) dgamma", Dtype::F32.max_of(dt), &shape, &got, &wdg, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dbet)?;
        c.record("bn_backward (train) dbeta", Dtype::F32.max_of(dt), &shape, &got, &wdb, Accuracy::Reduction);
        c.record_fence("bn workspace (train)", &shape, &ws)?;
        c.record_fence("bn sums (train)", &shape, &sums)?;

        // Eval: running statistics, the gradient treats them as constants.
        let (rmv, brm) = c.rand::<f32>(ch, 0.5, 3.0)?;
        let (rvv, brv) = c.rand::<f32>(ch, 0.5, 1.5)?;
        let mut state = BnState { running_mean: rmv.clone(), running_var: rvv.clone(), num_batches_tracked: 0 };
        let mut want_y = vec![0.0; m * ch];
        let (emean, einv) =
            ops::batchnorm::forward(&x, ch, &gamma, &beta, &mut state, BnMode::Eval, cfg, act, &mut want_y)?;
        let pe = BnParams { training: 0, ..p };
        let (mean, invstd) = (c.poison::<f32>(ch)?, c.poison::<f32>(ch)?);
        g.kernels.bn_eval_stats(&g.stream, &pe, s(&brm), s(&brv), mean.v()?, invstd.v()?)?;
        let y = c.poison::<T>(m * ch)?;
        g.kernels.bn_forward::<T>(&g.stream, &pe, y.v()?, s(&bx), mean.v()?, invstd.v()?, s(&bgam), s(&bbet))?;
        let (dx, dgam, dbet, sums) =
            (c.poison::<T>(m * ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(2 * ch)?);
        g.kernels.bn_backward::<T>(
            &g.stream,
            &pe,
            dx.v()?,
            s(&bx),
            s(&bdy),
            mean.v()?,
            invstd.v()?,
            s(&bgam),
            s(&bbet),
            Some(dgam.v()?),
            Some(dbet.v()?),
            ws.v()?,
            sums.v()?,
        )?;
        let (mut wdx, mut wdg, mut wdb) = (vec![0.0; m * ch], vec![0.0; ch], vec![0.0; ch]);
        ops::batchnorm::backward(
            &x,
            ch,
            &gamma,
            &beta,
            &emean,
            &einv,
            false,
            act,
            &dy,
            Some(&mut wdx),
            Some(&mut wdg),
            Some(&mut wdb),
        );
        let got = c.fetch::<f32>(&mean)?;
        c.record("bn_eval_stats mean", Dtype::F32, &shape, &got, &emean, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&invstd)?;
        c.record("bn_eval_stats invstd", Dtype::F32, &shape, &got, &einv, Accuracy::Elementwise);
        let got = c.fetch::<T>(&y)?;
        c.record("bn_forward (eval) y", dt, &shape, &got, &want_y, Accuracy::Elementwise);
        let got = c.fetch::<T>(&dx)?;
        c.record("bn_backward (eval) dx", dt, &shape, &got, &wdx, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&dgam)?;
        c.record("bn_backward (eval) dgamma", Dtype::F32.max_of(dt), &shape, &got, &wdg, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dbet)?;
        c.record("bn_backward (eval) dbeta", Dtype::F32.max_of(dt), &shape, &got, &wdb, Accuracy::Reduction);
        c.record_fence("bn workspace (eval)", &shape, &ws)?;
        c.record_fence("bn sums (eval)", &shape, &sums)?;
    }
    Ok(())
}
