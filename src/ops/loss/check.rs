//! `derma check`, the `loss` family: the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;

use crate::ops;
use crate::ops::loss::LossKind;
use crate::ops::loss::LossParams;
use crate::tools::check::*;

pub(crate) fn loss<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    for (b, k) in [(37usize, 8usize), (5, 13), (256, 8)] {
        let (logits, bl) = c.rand::<T>(b * k, 4.0, 0.0)?;
        let targets: Vec<usize> = (0..b).map(|_| (c.rng.next_u64() % k as u64) as usize).collect();
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        let bt = g.upload(&t32)?;
        let (alpha, ba) = c.rand::<f32>(k, 0.4, 1.0)?;
        for (kind, grad_scale) in [
            (LossKind::CrossEntropy, 1.0f32),
            (LossKind::Focal { gamma: 2.0 }, 1.0),
            (LossKind::Focal { gamma: 0.5 }, 1024.0),
        ] {
            let (focal, gamma) = match kind {
                LossKind::Focal { gamma } => (1, gamma as f32),
                LossKind::CrossEntropy => (0, 0.0),
            };
            let shape = format!(
                "B={b} K={k} {} scale={grad_scale}",
                if focal == 1 { format!("focal γ={gamma}") } else { "CE".into() }
            );
            let p = LossParams { b: b as i32, k: k as i32, focal, gamma, grad_scale, pad_: 0 };
            let (lo, dl, probs, bad) =
                (c.poison::<f32>(1)?, c.poison::<T>(b * k)?, c.poison::<f32>(b * k)?, c.poison::<f32>(1)?);
            g.kernels.softmax_loss::<T>(
                &g.stream,
                &p,
                lo.v()?,
                dl.v()?,
                Some(probs.v()?),
                bad.v()?,
                s(&bl),
                s(&bt),
                Some(s(&ba)),
            )?;
            let (want_loss, grad) = ops::loss::forward_backward(&logits, k, &targets, Some(&alpha), &kind)?;
            let want_dl: Vec<f64> = grad.iter().map(|v| v * grad_scale as f64).collect();
            let got = c.fetch::<f32>(&lo)?;
            c.record("softmax_loss loss", Dtype::F32.max_of(dt), &shape, &got, &[want_loss], Accuracy::Reduction);
            let got = c.fetch::<T>(&dl)?;
            c.record("softmax_loss dlogits", dt, &shape, &got, &want_dl, Accuracy::Reduction);
            let got = c.fetch::<f32>(&probs)?;
            let want = ops::loss::softmax_rows(&logits, k);
            c.record("softmax_loss probs", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Elementwise);
            let got = c.fetch::<i32>(&bad)?;
            c.record_exact("softmax_loss bad_target (none)", dt, &shape, &got, &[0.0]);
        }
        // Targets outside [0, K) in two rows: the first of them is reported, by its 1-based row, whichever
        // thread reaches its bad row last (with one block of 256 threads, rows below 256 have one thread each).
        let (first, second) = (b / 3, b - 1);
        let mut t2 = t32.clone();
        t2[first] = k as i32;
        t2[second] = -1;
        let bt2 = g.upload(&t2)?;
        let p = LossParams { b: b as i32, k: k as i32, focal: 0, gamma: 0.0, grad_scale: 1.0, pad_: 0 };
        // The buffer starts as NaN bits: the kernel must write it whatever it held.
        let (lo, dl, bad) = (c.poison::<f32>(1)?, c.poison::<T>(b * k)?, c.poison::<f32>(1)?);
        g.kernels.softmax_loss::<T>(&g.stream, &p, lo.v()?, dl.v()?, None, bad.v()?, s(&bl), s(&bt2), None)?;
        let got = c.fetch::<i32>(&bad)?;
        let shape = format!("B={b} K={k} target[{first}]={k} target[{second}]=-1");
        c.record_exact("softmax_loss bad_target (first bad row, 1-based)", dt, &shape, &got, &[(first + 1) as f64]);
    }
    Ok(())
}
