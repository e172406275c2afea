//! `derma check`, the `optim` family: the mixed-precision step that runs on the device (amp_unscale,
//! adamw_prepare, adamw_apply, scaler_update) over several parameters, an overflow and a learning-rate change,
//! against the CPU reference (see [`crate::tools::check`] for how inputs are drawn and errors judged).

use anyhow::{Result, bail};
use cudarc::driver::DeviceRepr;
use half::f16;

use crate::tools::check::*;
use crate::train::adamw::cuda::{ADAM_CHUNK, AdamCoeffs, AdamHyper, ScalerState, adam_tables};
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::scaler::{GradScaler, GradScalerConfig};

pub(crate) fn optim(c: &mut Ctx) -> Result<()> {
    // Aligned buffers (the kernels' vector paths), then buffers 4 bytes off (their scalar paths).
    for shift in [0, 1] {
        amp_step(c, shift)?;
    }
    Ok(())
}

/// A fenced device copy of `lead` copies of `fill` followed by `v`; kernels get the view past the lead, so a lead
/// of 1 f32 (4 bytes) moves the range off 16-byte alignment and onto the kernels' scalar paths.
struct Flat {
    f: Fenced,
    lead_bytes: usize,
    bytes: usize,
}

impl Flat {
    fn new<T: DeviceRepr + Copy>(c: &Ctx, lead: usize, fill: T, v: &[T]) -> Result<Self> {
        let mut host = vec![fill; lead];
        host.extend_from_slice(v);
        Ok(Self { f: c.fenced(&host)?, lead_bytes: lead * size_of::<T>(), bytes: size_of_val(v) })
    }

    fn v(&self) -> Result<crate::cuda::kernels::DevSlice<'_>> {
        self.f.v()?.sub(self.lead_bytes, self.bytes)
    }

    /// Every value, the lead included, and the canary damage.
    fn raw<T: DeviceRepr + Default + Clone>(&self, c: &Ctx) -> Result<(Vec<T>, usize)> {
        let mut out = vec![T::default(); self.f.len / size_of::<T>()];
        c.g.read(&self.f.block, FENCE, &mut out)?;
        Ok((out, c.outside(&self.f)?))
    }

    fn fetch<T: DeviceRepr + Default + Clone + Into<f64>>(&self, c: &Ctx) -> Result<Fetched> {
        let (v, outside) = self.raw::<T>(c)?;
        Ok(Fetched { values: v.into_iter().map(Into::into).collect(), outside })
    }
}

fn widen<T: Copy + Into<f64>>(lead: usize, fill: T, v: &[T]) -> Vec<f64> {
    std::iter::repeat_n(fill, lead).chain(v.iter().copied()).map(Into::into).collect()
}

/// The mixed-precision step on the device against the CPU AdamW and GradScaler, four steps over one flat range of
/// three parameters of odd sizes (the largest wraps every grid-stride loop) in two learning-rate groups: a clean
/// step, an overflow (one inf gradient: skipped), a learning-rate change on the device, a clean step that grows
/// the scale (interval 2). Padding inside a parameter's last chunk holds zeros and must stay +0; a whole chunk
/// between two parameters and the tail after the last hold other values and must be left alone. `shift` 1 runs
/// the same on a range one f32 off 16-byte alignment (the kernels' scalar paths).
fn amp_step(c: &mut Ctx, shift: usize) -> Result<()> {
    let g = c.g;
    let big = c.wrapping_len();
    let mut regions = Vec::new();
    let mut off = 0usize;
    for (i, (len, group)) in [(77usize, 0usize), (4099, 1), (big, 0)].into_iter().enumerate() {
        regions.push((off, len, group));
        off = (off + len).next_multiple_of(ADAM_CHUNK) + if i == 0 { ADAM_CHUNK } else { 0 };
    }
    let n = off + 5;
    let (entries, chunks) = adam_tables(&regions, n)?;
    let owner: Vec<i32> = (0..n).map(|i| chunks[i / ADAM_CHUNK]).collect();
    // In-region elements, the zero padding of a parameter's last chunk, and elements no parameter owns.
    let inside = |i: usize| owner[i] >= 0 && i < regions[owner[i] as usize].0 + regions[owner[i] as usize].1;
    const STRAY: f32 = 3.0;
    let stray_or_zero = |i: usize| if owner[i] < 0 { STRAY } else { 0.0 };
    let shape = format!("n={n} params=77,4099,{big}{}", if shift == 1 { " misaligned" } else { "" });

    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let hyper = AdamHyper::from(&cfg);
    let scfg = GradScalerConfig { init_scale: 1000.0, growth_interval: 2, ..GradScalerConfig::default() };
    let mut cpu = AdamW::new(cfg)?;
    let mut scaler = GradScaler::new(scfg)?;

    let mut params: Vec<f32> = (0..n).map(|i| if inside(i) { c.rng.sym() as f32 } else { stray_or_zero(i) }).collect();
    let moments: Vec<f32> = (0..n).map(stray_or_zero).collect();
    const HALF_FILL: f16 = f16::from_f32_const(-7.0);
    let (bp, bm, bv) = (
        Flat::new(c, shift, 0f32, &params)?,
        Flat::new(c, shift, 0f32, &moments)?,
        Flat::new(c, shift, 0f32, &moments)?,
    );
    let bh = Flat::new(c, 2 * shift, HALF_FILL, &vec![HALF_FILL; n])?;
    let bg = Flat::new(c, shift, 0f32, &vec![0f32; n])?;
    let state = c.fenced(&[ScalerState::new(&scfg)])?;
    let steps = c.fenced(&vec![0i64; entries.len()])?;
    let coeffs = c.fenced(&vec![AdamCoeffs::default(); entries.len()])?;
    let (be, bc) = (g.upload(&entries)?, g.upload(&chunks)?);
    let mut lrs = [1e-3f64, 2.5e-4];
    let blr = g.upload(&lrs)?;
    let mut want_m = moments.clone();
    let mut want_v = moments;
    let mut want_h: Vec<f16> = vec![HALF_FILL; n];
    let mut skipped = 0i32;
    let mut want_coeffs = vec![AdamCoeffs::default(); entries.len()];

    for step in 1..=4usize {
        if step == 3 {
            lrs = [5e-4, 1e-4];
            g.write(&blr, 0, &lrs)?;
        }
        let mut grads: Vec<f32> =
            (0..n).map(|i| if inside(i) { (c.rng.sym() * 1000.0) as f32 } else { stray_or_zero(i) }).collect();
        if step == 2 {
            grads[regions[2].0 + big / 2] = f32::INFINITY;
        }
        g.write(&bg.f.block, FENCE + bg.lead_bytes, &grads)?;
        let before = (bp.raw::<f32>(c)?.0, bm.raw::<f32>(c)?.0, bv.raw::<f32>(c)?.0, bh.raw::<f16>(c)?.0);
        let before_tables = (raw::<i64>(c, &steps)?.0, raw::<AdamCoeffs>(c, &coeffs)?.0);

        // The CPU step.
        let found = scaler.unscale_and_check(&mut [&mut grads[..]]);
        if !found {
            for (k, &(o, len, grp)) in regions.iter().enumerate() {
                cpu.step_one(&format!("p{k}"), &mut params[o..o + len], &grads[o..o + len], lrs[grp])?;
                let st = cpu.state(&format!("p{k}")).map(|s| (s.step, s.exp_avg.clone(), s.exp_avg_sq.clone()));
                let Some((t, m, v)) = st else { bail!("the CPU AdamW kept no state for parameter {k}") };
                want_m[o..o + len].copy_from_slice(&m);
                want_v[o..o + len].copy_from_slice(&v);
                want_coeffs[k] = AdamCoeffs::for_step(t, lrs[grp], &hyper);
            }
            for ((h, &o), &p) in want_h.iter_mut().zip(&owner).zip(&params) {
                if o >= 0 {
                    *h = f16::from_f32(p);
                }
            }
        }
        scaler.update(found);
        skipped += found as i32;

        // The device step.
        g.kernels.amp_unscale(&g.stream, bg.v()?, state.v()?, n)?;
        let flag = c.fetch::<i32>(&state)?;
        g.kernels.adamw_prepare(
            &g.stream,
            coeffs.v()?,
            steps.v()?,
            s(&be),
            s(&blr),
            Some(state.v()?),
            &hyper,
            lrs.len(),
            entries.len(),
        )?;
        let (p, gr, m, v, h) = (bp.v()?, bg.v()?, bm.v()?, bv.v()?, Some(bh.v()?));
        let (st, sv) = (Some(state.v()?), coeffs.v()?);
        g.kernels.adamw_apply(&g.stream, p, gr, m, v, h, sv, s(&bc), st, entries.len(), n)?;
        let after_apply = c.fetch::<i32>(&state)?;
        g.kernels.scaler_update(&g.stream, state.v()?, &scfg)?;

        let tag = format!("amp step {step}{}", if found { " (overflow)" } else { "" });
        let unscaled = bg.fetch::<f32>(c)?;
        c.record_exact(
            &format!("{tag}: amp_unscale grads"),
            Dtype::F32,
            &shape,
            &unscaled,
            &widen(shift, 0f32, &grads),
        );
        let fi = Fetched { values: vec![flag.values[2]], outside: flag.outside };
        c.record_exact(&format!("{tag}: amp_unscale found_inf"), Dtype::F32, &shape, &fi, &[found as i32 as f64]);
        let fi = Fetched { values: vec![after_apply.values[2]], outside: after_apply.outside };
        c.record_exact(
            &format!("{tag}: found_inf kept through the step"),
            Dtype::F32,
            &shape,
            &fi,
            &[found as i32 as f64],
        );
        let (sc, outside) = raw::<ScalerState>(c, &state)?;
        let got = Fetched {
            values: vec![sc[0].scale as f64, sc[0].growth_tracker as f64, sc[0].found_inf as f64, sc[0].skipped as f64],
            outside,
        };
        let want = [scaler.scale() as f64, scaler.growth_tracker() as f64, 0.0, skipped as f64];
        c.record_exact(&format!("{tag}: scaler_update scale, tracker, flag, skipped"), Dtype::F32, &shape, &got, &want);
        let (st, outside) = raw::<i64>(c, &steps)?;
        let want: Vec<f64> =
            (0..regions.len()).map(|k| cpu.state(&format!("p{k}")).map_or(0.0, |s| s.step as f64)).collect();
        let got = Fetched { values: st.iter().map(|&t| t as f64).collect(), outside };
        c.record_exact(&format!("{tag}: adamw_prepare step counts"), Dtype::F32, &shape, &got, &want);
        let (cf, outside) = raw::<AdamCoeffs>(c, &coeffs)?;
        let flat = |v: &[AdamCoeffs]| -> Vec<f64> {
            v.iter()
                .flat_map(|a| {
                    [a.decay, a.one_minus_beta1, a.beta2, a.one_minus_beta2, a.bc2_sqrt, a.neg_step_size, a.eps]
                })
                .map(f64::from)
                .collect()
        };
        let got = Fetched { values: flat(&cf), outside };
        c.record_exact(&format!("{tag}: adamw_prepare coefficients"), Dtype::F32, &shape, &got, &flat(&want_coeffs));
        let widen32 = |v: &[f32]| widen(shift, 0f32, v);
        c.record_exact(
            &format!("{tag}: adamw_apply param"),
            Dtype::F32,
            &shape,
            &bp.fetch::<f32>(c)?,
            &widen32(&params),
        );
        c.record_exact(
            &format!("{tag}: adamw_apply exp_avg"),
            Dtype::F32,
            &shape,
            &bm.fetch::<f32>(c)?,
            &widen32(&want_m),
        );
        let got = bv.fetch::<f32>(c)?;
        c.record_exact(&format!("{tag}: adamw_apply exp_avg_sq"), Dtype::F32, &shape, &got, &widen32(&want_v));
        let got = bh.fetch::<f16>(c)?;
        c.record_exact(
            &format!("{tag}: adamw_apply f16 copy"),
            Dtype::F16,
            &shape,
            &got,
            &widen(2 * shift, HALF_FILL, &want_h),
        );
        if found {
            // A skipped step: every bit of the optimizer state as it was before (the CPU comparison above cannot
            // tell -0 from +0 or see a NaN payload).
            let now = (bp.raw::<f32>(c)?.0, bm.raw::<f32>(c)?.0, bv.raw::<f32>(c)?.0, bh.raw::<f16>(c)?.0);
            let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits() as f64).collect::<Vec<f64>>();
            let bits16 = |v: &[f16]| v.iter().map(|x| x.to_bits() as f64).collect::<Vec<f64>>();
            let same = |a: Vec<f64>| Fetched { values: a, outside: 0 };
            for (name, a, b) in [
                ("param", bits32(&now.0), bits32(&before.0)),
                ("exp_avg", bits32(&now.1), bits32(&before.1)),
                ("exp_avg_sq", bits32(&now.2), bits32(&before.2)),
                ("f16 copy", bits16(&now.3), bits16(&before.3)),
            ] {
                c.record_exact(&format!("{tag}: skipped, {name} bits untouched"), Dtype::F32, &shape, &same(a), &b);
            }
            let st_now: Vec<f64> = raw::<i64>(c, &steps)?.0.iter().map(|&t| t as f64).collect();
            let st_before: Vec<f64> = before_tables.0.iter().map(|&t| t as f64).collect();
            c.record_exact(
                &format!("{tag}: skipped, step counts untouched"),
                Dtype::F32,
                &shape,
                &same(st_now),
                &st_before,
            );
            let cf_bits = |v: &[AdamCoeffs]| -> Vec<f64> {
                bytemuck::cast_slice::<AdamCoeffs, u32>(v).iter().map(|&b| b as f64).collect()
            };
            let got = same(cf_bits(&raw::<AdamCoeffs>(c, &coeffs)?.0));
            c.record_exact(
                &format!("{tag}: skipped, coefficients untouched"),
                Dtype::F32,
                &shape,
                &got,
                &cf_bits(&before_tables.1),
            );
        }
    }
    Ok(())
}

/// The values of a fenced buffer of plain records, and its canary damage.
fn raw<T: DeviceRepr + Default + Clone>(c: &Ctx, f: &Fenced) -> Result<(Vec<T>, usize)> {
    let mut out = vec![T::default(); f.len / size_of::<T>()];
    c.g.read(&f.block, FENCE, &mut out)?;
    Ok((out, c.outside(f)?))
}
