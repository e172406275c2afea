//! `derma check`, the `depthwise` family (and the weight layout change): the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;

use crate::cuda::kernels::{DevSlice, rows_split};
use crate::ops;
use crate::ops::conv::{ConvCfg, ConvGeom};
use crate::ops::depthwise::{DwParams, dw_weight_workspace_bytes};
use crate::tools::check::*;

pub(crate) fn depthwise<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // (N, H, W, C, k, stride): odd shapes, an aligned one (C a multiple of 8), rows_split 6 (N·Ho·Wo = 3364), and
    // rows_split at its cap (N·Ho·Wo = 132098).
    for (n, h, w, ch, k, st) in [
        (3, 7, 7, 13, 3, 1),
        (3, 9, 9, 40, 5, 2),
        (3, 9, 7, 13, 3, 2),
        (2, 8, 8, 32, 5, 1),
        (4, 29, 29, 32, 3, 1),
        (2, 257, 257, 3, 3, 1),
    ] {
        let pad = (k - 1) / 2;
        let geom = ConvGeom::new(&[n, h, w, ch], &[ch, k, k, 1], ConvCfg { stride: st, pad, groups: ch })?;
        let (ho, wo) = (geom.oh, geom.ow);
        let p = DwParams {
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: ch as i32,
            ho: ho as i32,
            wo: wo as i32,
            k: k as i32,
            stride: st as i32,
            pad: pad as i32,
            rows_split: 0,
        };
        let split = rows_split((n * ho * wo) as i64);
        let shape = format!("N={n} H={h} W={w} C={ch} k={k} s={st} rows_split={split}");
        let (nx, ny, nw) = (n * h * w * ch, n * ho * wo * ch, k * k * ch);
        let (x, bx) = c.rand::<T>(nx, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(ny, 1.0, 0.0)?;
        // The GPU weights are [k, k, C]; the reference's are [C, k, k, 1].
        let (wk, bw) = c.rand::<T>(nw, 1.0, 0.0)?;
        let to_ref = |v: &[f64]| -> Vec<f64> { (0..nw).map(|i| v[(i % (k * k)) * ch + i / (k * k)]).collect() };
        let from_ref = |v: &[f64]| -> Vec<f64> { (0..nw).map(|i| v[(i % ch) * k * k + i / ch]).collect() };
        let wr = to_ref(&wk);
        let y = c.poison::<T>(ny)?;
        g.kernels.dw_forward::<T>(&g.stream, &p, y.v()?, s(&bx), s(&bw))?;
        let mut want = vec![0.0; ny];
        ops::conv::forward(&geom, &x, &wr, None, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("dw_forward y", dt, &shape, &got, &want, Accuracy::Elementwise);
        let dx = c.poison::<T>(nx)?;
        g.kernels.dw_backward_data::<T>(&g.stream, &p, dx.v()?, s(&bdy), s(&bw))?;
        let mut want = vec![0.0; nx];
        ops::conv::backward_data(&geom, &dy, &wr, &mut want);
        let got = c.fetch::<T>(&dx)?;
        c.record("dw_backward_data dx", dt, &shape, &got, &want, Accuracy::Elementwise);
        let dw = c.poison::<f32>(nw)?;
        let ws = c.scratch(dw_weight_workspace_bytes(&p))?;
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw.v()?, s(&bx), s(&bdy), ws.v()?, false)?;
        let mut want_r = vec![0.0; nw];
        ops::conv::backward_weight(&geom, &x, &dy, &mut want_r);
        let want = from_ref(&want_r);
        let got = c.fetch::<f32>(&dw)?;
        c.record("dw_backward_weight dw", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Reduction);
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw.v()?, s(&bx), s(&bdy), ws.v()?, true)?;
        let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
        let got = c.fetch::<f32>(&dw)?;
        c.record(
            "dw_backward_weight dw (accumulate)",
            Dtype::F32.max_of(dt),
            &shape,
            &got,
            &twice,
            Accuracy::Reduction,
        );
        c.record_fence("dw_backward_weight workspace", &shape, &ws)?;
        // The weight layouts end to end: the kernels' weights permuted from an f32 master [C, k*k], and their
        // gradient moved into a master-layout slot, against the CPU reference's [C, k, k, 1] gradient.
        let (master, bm) = c.rand::<f32>(nw, 1.0, 0.0)?;
        let wt = c.poison::<T>(nw)?;
        g.kernels.permute_from_f32::<T>(&g.stream, wt.v()?, s(&bm), ch, k * k)?;
        let want: Vec<f64> = from_ref(&master).iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let got = c.fetch::<T>(&wt)?;
        c.record_exact("permute master [C,kk] -> [kk,C]", dt, &shape, &got, &want);
        let slot = c.poison::<f32>(nw)?;
        let dw_dev = DevSlice::range(&dw.block, FENCE, nw * 4)?;
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw_dev, s(&bx), s(&bdy), ws.v()?, false)?;
        g.kernels.transpose_add(&g.stream, slot.v()?, dw_dev, k * k, ch, false)?;
        let got = c.fetch::<f32>(&slot)?;
        c.record(
            "dw weight grad into the master slot",
            Dtype::F32.max_of(dt),
            &shape,
            &got,
            &want_r,
            Accuracy::Reduction,
        );
    }
    // Layout transposes alone: B0's largest depthwise weight (C = 1152, k = 5) and a tall one, both with more
    // 32x32 tiles than the grid has blocks (the tile loop wraps), and a single column.
    for (rows, cols) in [(1152usize, 25usize), (1061, 13), (7, 1)] {
        let shape = format!("rows={rows} cols={cols}");
        let n = rows * cols;
        let (x, bx) = c.rand::<f32>(n, 1.0, 0.0)?;
        let transposed: Vec<f64> = (0..n).map(|i| x[(i % rows) * cols + i / rows]).collect();
        let y = c.poison::<T>(n)?;
        g.kernels.permute_from_f32::<T>(&g.stream, y.v()?, s(&bx), rows, cols)?;
        let want: Vec<f64> = transposed.iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let got = c.fetch::<T>(&y)?;
        c.record_exact("permute", dt, &shape, &got, &want);
        if dt == Dtype::F32 {
            let y = c.poison::<f32>(n)?;
            g.kernels.transpose_add(&g.stream, y.v()?, s(&bx), rows, cols, false)?;
            let got = c.fetch::<f32>(&y)?;
            c.record_exact("transpose_add (write)", Dtype::F32, &shape, &got, &transposed);
            let (y0, _) = c.rand::<f32>(n, 1.0, 0.0)?;
            let y = c.output::<f32>(&y0)?;
            g.kernels.transpose_add(&g.stream, y.v()?, s(&bx), rows, cols, true)?;
            let want: Vec<f64> = y0.iter().zip(&transposed).map(|(a, b)| a + b).collect();
            let got = c.fetch::<f32>(&y)?;
            c.record("transpose_add (accumulate)", Dtype::F32, &shape, &got, &want, Accuracy::Elementwise);
        }
    }
    Ok(())
}
