//! `derma check`, the `dropout` family: the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;

use crate::cuda::uniform01;
use crate::ops;
use crate::tools::check::*;

pub(crate) fn dropout<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    let seed = c.rng.next_u64();
    for (n, p) in [(3 * 9 * 9 * 40usize, 0.3f32), (4096, 0.2), (c.wrapping_len(), 0.1)] {
        let shape = format!("n={n} p={p}");
        let keep = 1.0 / (1.0 - p as f64);
        let (x, bx) = c.rand::<T>(n, 1.0, 0.0)?;
        let y = c.poison::<T>(n)?;
        g.kernels.dropout::<T>(&g.stream, y.v()?, s(&bx), p, seed, n)?;
        let mask: Vec<f64> = (0..n).map(|i| if uniform01(seed, i as u64) >= p { keep } else { 0.0 }).collect();
        let mut want = vec![0.0; n];
        ops::dropout::forward(&x, &mask, 1, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("dropout", dt, &shape, &got, &want, Accuracy::Elementwise);
    }
    // Stochastic depth: one coin per sample of H·W·C elements; forward adds the residual, backward does not.
    for (n, per, p) in [(3usize, 7 * 7 * 13usize, 0.5f32), (8, 8 * 8 * 32, 0.2), (5, c.wrapping_len() / 5, 0.4)] {
        let shape = format!("N={n} per_sample={per} p={p}");
        let total = n * per;
        let keep = 1.0 / (1.0 - p as f64);
        let (x, bx) = c.rand::<T>(total, 1.0, 0.0)?;
        let (res, bres) = c.rand::<T>(total, 1.0, 0.0)?;
        let mask: Vec<f64> = (0..n).map(|i| if uniform01(seed, i as u64) >= p { keep } else { 0.0 }).collect();
        let mut scaled = vec![0.0; total];
        ops::dropout::forward(&x, &mask, per, &mut scaled);
        let y = c.poison::<T>(total)?;
        g.kernels.stochastic_depth::<T>(&g.stream, y.v()?, s(&bx), Some(s(&bres)), p, seed, (total, per))?;
        let mut want = vec![0.0; total];
        ops::elementwise::add_forward(&res, &scaled, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("stochastic_depth (+residual)", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(total)?;
        g.kernels.stochastic_depth::<T>(&g.stream, y.v()?, s(&bx), None, p, seed, (total, per))?;
        let got = c.fetch::<T>(&y)?;
        c.record("stochastic_depth backward", dt, &shape, &got, &scaled, Accuracy::Elementwise);
    }
    Ok(())
}
