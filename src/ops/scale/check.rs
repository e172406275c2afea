//! `derma check`, the `se` family (pooling and channel scaling of squeeze-excite): the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;

use crate::ops;
use crate::tools::check::*;

pub(crate) fn se<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // The last shape's flat passes (N·HW·C = 100352, vectorised by 4 or 8) wrap the emulated device's grid.
    for (n, hw, ch) in [(3usize, 49usize, 13usize), (3, 81, 40), (4, 196, 32), (2, 1, 7), (2, 784, 64)] {
        let shape = format!("N={n} HW={hw} C={ch}");
        let (nt, nc) = (n * hw * ch, n * ch);
        let (x, bx) = c.rand::<T>(nt, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(nt, 1.0, 0.0)?;
        let (sc, bs) = c.rand::<T>(nc, 1.0, 0.0)?;
        let (dp, bdp) = c.rand::<T>(nc, 1.0, 0.0)?;
        let (ni, hwi, ci) = (n as i32, hw as i32, ch as i32);
        let pooled = c.poison::<T>(nc)?;
        g.kernels.se_pool::<T>(&g.stream, pooled.v()?, s(&bx), ni, hwi, ci)?;
        let mut want = vec![0.0; nc];
        ops::pool::forward(&x, n, hw, ch, &mut want);
        let got = c.fetch::<T>(&pooled)?;
        c.record("se_pool", dt, &shape, &got, &want, Accuracy::Reduction);
        let pdx = c.poison::<T>(nt)?;
        g.kernels.se_pool_backward::<T>(&g.stream, pdx.v()?, s(&bdp), ni, hwi, ci)?;
        let mut want = vec![0.0; nt];
        ops::pool::backward(&dp, hw, ch, &mut want);
        let got = c.fetch::<T>(&pdx)?;
        c.record("se_pool_backward dx", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(nt)?;
        g.kernels.se_scale::<T>(&g.stream, y.v()?, s(&bx), s(&bs), ni, hwi, ci)?;
        let mut want = vec![0.0; nt];
        ops::scale::forward(&x, &sc, hw, ch, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("se_scale y", dt, &shape, &got, &want, Accuracy::Elementwise);
        let (dx, ds) = (c.poison::<T>(nt)?, c.poison::<T>(nc)?);
        g.kernels.se_scale_backward::<T>(&g.stream, Some(dx.v()?), ds.v()?, s(&bx), s(&bs), s(&bdy), (ni, hwi, ci))?;
        let (mut wdx, mut wds) = (vec![0.0; nt], vec![0.0; nc]);
        ops::scale::backward(&x, &sc, &dy, hw, ch, Some(&mut wdx), Some(&mut wds));
        let got = c.fetch::<T>(&dx)?;
        c.record("se_scale_backward dx", dt, &shape, &got, &wdx, Accuracy::Elementwise);
        let got = c.fetch::<T>(&ds)?;
        c.record("se_scale_backward dscale", dt, &shape, &got, &wds, Accuracy::Reduction);
        let ds = c.poison::<T>(nc)?;
        g.kernels.se_scale_backward::<T>(&g.stream, None, ds.v()?, s(&bx), s(&bs), s(&bdy), (ni, hwi, ci))?;
        let got = c.fetch::<T>(&ds)?;
        c.record("se_scale_backward dscale (no dx)", dt, &shape, &got, &wds, Accuracy::Reduction);
    }
    Ok(())
}
