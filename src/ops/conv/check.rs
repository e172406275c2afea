//! `derma check`, the `conv` family (cuDNN): the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::{Result, bail};

use crate::cuda::probe;
use crate::ops;
use crate::ops::conv::{ConvCfg, ConvGeom};
use crate::tools::check::*;

pub(crate) fn conv<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    if !g.is_emulated() && !probe().cudnn {
        bail!("cuDNN (libcudnn.so) was not found: install cuDNN 9 or add it to LD_LIBRARY_PATH");
    }
    let dnn = crate::cuda::dnn::Dnn::new(g)?;
    // (N, H=W, Cin, Cout, k, stride, groups): a stem-like 3×3 s2, a 1×1 projection, an aligned 3×3.
    for (n, hw, cin, cout, k, st) in
        [(3usize, 9usize, 3usize, 13usize, 3usize, 2usize), (3, 7, 40, 13, 1, 1), (2, 8, 16, 32, 3, 1)]
    {
        let pad = (k - 1) / 2;
        let geom = ConvGeom::new(&[n, hw, hw, cin], &[cout, k, k, cin], ConvCfg { stride: st, pad, groups: 1 })?;
        let sh = crate::cuda::dnn::ConvShape {
            n: n as i32,
            c_in: cin as i32,
            h: hw as i32,
            w: hw as i32,
            c_out: cout as i32,
            k: k as i32,
            stride: st as i32,
            pad: pad as i32,
            groups: 1,
            half: dt == Dtype::F16,
        };
        let shape = format!("N={n} H=W={hw} Cin={cin} Cout={cout} k={k} s={st}");
        let (nx, nw, ny) = (n * hw * hw * cin, cout * k * k * cin, n * geom.oh * geom.ow * cout);
        let (x, bx) = c.rand::<T>(nx, 1.0, 0.0)?;
        let (w, bw) = c.rand::<T>(nw, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(ny, 1.0, 0.0)?;
        let mut ws_bytes = 1;
        for pass in [
            crate::cuda::dnn::Pass::Forward,
            crate::cuda::dnn::Pass::BackwardData,
            crate::cuda::dnn::Pass::BackwardFilter,
        ] {
            ws_bytes = ws_bytes.max(dnn.workspace_bytes(&sh, pass)?);
        }
        let ws = c.scratch(ws_bytes)?;
        let (y, dx, dw) = (c.poison::<T>(ny)?, c.poison::<T>(nx)?, c.poison::<T>(nw)?);
        dnn.forward::<T>(&sh, s(&bx), s(&bw), y.v()?, ws.v()?)?;
        dnn.backward_data::<T>(&sh, s(&bdy), s(&bw), dx.v()?, ws.v()?)?;
        dnn.backward_filter::<T>(&sh, s(&bx), s(&bdy), dw.v()?, ws.v()?, false)?;
        let (mut wy, mut wdx, mut wdw) = (vec![0.0; ny], vec![0.0; nx], vec![0.0; nw]);
        ops::conv::forward(&geom, &x, &w, None, &mut wy);
        ops::conv::backward_data(&geom, &dy, &w, &mut wdx);
        ops::conv::backward_weight(&geom, &x, &dy, &mut wdw);
        let got = c.fetch::<T>(&y)?;
        c.record("cudnn conv forward y", dt, &shape, &got, &wy, Accuracy::TensorOp);
        let got = c.fetch::<T>(&dx)?;
        c.record("cudnn conv backward_data dx", dt, &shape, &got, &wdx, Accuracy::TensorOp);
        let got = c.fetch::<T>(&dw)?;
        c.record("cudnn conv backward_filter dw", dt, &shape, &got, &wdw, Accuracy::TensorOp);
        c.record_fence("cudnn conv workspace", &shape, &ws)?;
    }
    Ok(())
}
