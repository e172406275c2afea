//! `derma check`, the `optim` family (unscale with the inf flag, and AdamW): the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::{Result, bail};
use half::f16;

use crate::tools::check::*;
use crate::train::adamw::AdamParams;
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::scaler::{GradScaler, GradScalerConfig};

pub(crate) fn optim(c: &mut Ctx) -> Result<()> {
    let g = c.g;
    let scaler = GradScaler::new(GradScalerConfig { init_scale: 1024.0, ..GradScalerConfig::default() })?;
    let inv = 1.0 / 1024.0;
    for n in [4099usize, 4096, c.wrapping_len()] {
        let shape = format!("n={n}");
        for dt in [Dtype::F32, Dtype::F16] {
            let (gr, bg) = match dt {
                Dtype::F32 => c.rand::<f32>(n, 100.0, 0.0)?,
                Dtype::F16 => c.rand::<f16>(n, 100.0, 0.0)?,
            };
            for with_inf in [false, true] {
                let mut host = gr.clone();
                if with_inf {
                    host[n - 2] = f64::INFINITY;
                }
                let bg_inf;
                let src = if with_inf {
                    bg_inf = match dt {
                        Dtype::F32 => c.put::<f32>(&host)?,
                        Dtype::F16 => c.put::<f16>(&host)?,
                    };
                    &bg_inf
                } else {
                    &bg
                };
                let (out, fi) = (c.poison::<f32>(n)?, c.fenced(&[0i32])?);
                match dt {
                    Dtype::F32 => g.kernels.unscale::<f32>(&g.stream, out.v()?, s(src), inv, fi.v()?, n)?,
                    Dtype::F16 => g.kernels.unscale::<f16>(&g.stream, out.v()?, s(src), inv, fi.v()?, n)?,
                }
                let mut reference: Vec<f32> = host.iter().map(|&v| v as f32).collect();
                let found = scaler.unscale_and_check(&mut [&mut reference[..]]);
                let got_fi = c.fetch::<i32>(&fi)?;
                let tag = if with_inf { " (one inf)" } else { "" };
                c.record_exact(&format!("unscale found_inf{tag}"), dt, &shape, &got_fi, &[found as i32 as f64]);
                if !with_inf {
                    let want: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
                    let got = c.fetch::<f32>(&out)?;
                    c.record("unscale out", dt, &shape, &got, &want, Accuracy::Elementwise);
                }
            }
        }
        // AdamW: three steps against the CPU optimizer, with the fp16 weight copy.
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let lr = 1e-3;
        let mut cpu = AdamW::new(cfg)?;
        let p0: Vec<f64> = (0..n).map(|_| c.rng.sym() as f32 as f64).collect();
        let (bp, bm, bv, p16) = (
            c.output::<f32>(&p0)?,
            c.output::<f32>(&vec![0.0; n])?,
            c.output::<f32>(&vec![0.0; n])?,
            c.poison::<f16>(n)?,
        );
        let zero = c.fenced(&[0i32])?;
        let mut param: Vec<f32> = p0.iter().map(|&v| v as f32).collect();
        for t in 1..=3u64 {
            let (gr, bgr) = c.rand::<f32>(n, 1.0, 0.0)?;
            let grad: Vec<f32> = gr.iter().map(|&v| v as f32).collect();
            cpu.step_one("p", &mut param, &grad, lr)?;
            let a = AdamParams::for_step(n, t, lr, &cfg);
            g.kernels.adamw(&g.stream, &a, bp.v()?, s(&bgr), bm.v()?, bv.v()?, Some(p16.v()?), Some(zero.v()?))?;
        }
        let Some(state) = cpu.state("p") else { bail!("the CPU AdamW kept no state for its parameter") };
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let want_p = f(&param);
        let got = c.fetch::<f32>(&bp)?;
        c.record("adamw param (3 steps)", Dtype::F32, &shape, &got, &want_p, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&bm)?;
        c.record("adamw exp_avg", Dtype::F32, &shape, &got, &f(&state.exp_avg), Accuracy::Elementwise);
        let got = c.fetch::<f32>(&bv)?;
        c.record("adamw exp_avg_sq", Dtype::F32, &shape, &got, &f(&state.exp_avg_sq), Accuracy::Elementwise);
        let got = c.fetch::<f16>(&p16)?;
        c.record("adamw fp16 weight copy", Dtype::F16, &shape, &got, &want_p, Accuracy::Elementwise);
        // found_inf set: the device skips the whole step. Compare with a snapshot of the state taken just before,
        // exactly (the CPU reference differs from the device by rounding, so it cannot show "untouched").
        let before = [c.fetch::<f32>(&bp)?, c.fetch::<f32>(&bm)?, c.fetch::<f32>(&bv)?, c.fetch::<f16>(&p16)?];
        let one = g.upload(&[1i32])?;
        let (_, bgr) = c.rand::<f32>(n, 1.0, 0.0)?;
        let a = AdamParams::for_step(n, 4, lr, &cfg);
        g.kernels.adamw(&g.stream, &a, bp.v()?, s(&bgr), bm.v()?, bv.v()?, Some(p16.v()?), Some(s(&one)))?;
        let after = [c.fetch::<f32>(&bp)?, c.fetch::<f32>(&bm)?, c.fetch::<f32>(&bv)?, c.fetch::<f16>(&p16)?];
        for (name, (b, a)) in ["param", "exp_avg", "exp_avg_sq", "fp16 copy"].iter().zip(before.iter().zip(&after)) {
            let dt = if *name == "fp16 copy" { Dtype::F16 } else { Dtype::F32 };
            c.record_exact(&format!("adamw skipped on found_inf: {name} untouched"), dt, &shape, a, &b.values);
        }
    }
    Ok(())
}
