//! `derma check`, the `elementwise` family (activations, add, scale/axpy, casts, fill): the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::Result;
use half::f16;

use crate::cuda::kernels::DevSlice;
use crate::ops;
use crate::ops::activation::Act;
use crate::ops::activation::Unary;
use crate::tools::check::*;

pub(crate) fn act_of(op: Unary) -> Act {
    match op {
        Unary::Silu => Act::Silu,
        Unary::Sigmoid => Act::Sigmoid,
        Unary::Relu => Act::Relu,
    }
}

pub(crate) fn elementwise<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // 3·7·7·13 (odd), 4096 (aligned, vectorised path), 7 (shorter than one vector), and a length past three grid
    // passes (the grid-stride loops wrap).
    for n in [3 * 7 * 7 * 13, 4096, 7, c.wrapping_len()] {
        let shape = format!("n={n}");
        let (x, bx) = c.rand::<T>(n, 6.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(n, 1.0, 0.0)?;
        for op in [Unary::Silu, Unary::Sigmoid, Unary::Relu] {
            let act = act_of(op);
            let y = c.poison::<T>(n)?;
            g.kernels.unary::<T>(&g.stream, op, y.v()?, s(&bx), n)?;
            let mut want = vec![0.0; n];
            ops::activation::forward(act, &x, &mut want);
            let got = c.fetch::<T>(&y)?;
            c.record(&format!("{}_fwd", act.name()), dt, &shape, &got, &want, Accuracy::Elementwise);
            // Sigmoid's backward takes the forward output: give it the reference output rounded to T, and take
            // the reference from that same rounded y (near y = 1, 1 − y loses most of its digits to the rounding).
            let y_rounded: Vec<f64> = want.iter().map(|&v| T::from_f64(v).to_f64()).collect();
            let saved = if op == Unary::Sigmoid { c.put::<T>(&y_rounded)? } else { c.put::<T>(&x)? };
            let dx = c.poison::<T>(n)?;
            g.kernels.unary_backward::<T>(&g.stream, op, dx.v()?, s(&saved), s(&bdy), n)?;
            let mut want = vec![0.0; n];
            if op == Unary::Sigmoid {
                for ((w, y), d) in want.iter_mut().zip(&y_rounded).zip(&dy) {
                    *w = d * y * (1.0 - y);
                }
            } else {
                ops::activation::backward(act, &x, &dy, &mut want);
            }
            let got = c.fetch::<T>(&dx)?;
            c.record(&format!("{}_bwd", act.name()), dt, &shape, &got, &want, Accuracy::Elementwise);
        }
        let y = c.poison::<T>(n)?;
        g.kernels.add::<T>(&g.stream, y.v()?, s(&bx), s(&bdy), n)?;
        let mut want = vec![0.0; n];
        ops::elementwise::add_forward(&x, &dy, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("add", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(n)?;
        g.kernels.scale::<T>(&g.stream, y.v()?, s(&bx), -0.5, n, false)?;
        let want: Vec<f64> = x.iter().map(|v| -0.5 * v).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("scale", dt, &shape, &got, &want, Accuracy::Elementwise);
        // axpy onto the rounded scale output: y = -0.5 x + 2 dy.
        let base = got.values;
        g.kernels.scale::<T>(&g.stream, y.v()?, s(&bdy), 2.0, n, true)?;
        let want: Vec<f64> = base.iter().zip(&dy).map(|(b, d)| b + 2.0 * d).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("axpy", dt, &shape, &got, &want, Accuracy::Elementwise);
        // fill over NaN (never read): zero, an exact value, and one that rounds (once, from the f32 argument).
        for value in [0.0f32, 1.5, -0.1] {
            let y = c.poison::<T>(n)?;
            g.kernels.fill::<T>(&g.stream, y.v()?, value, n)?;
            let want = vec![T::from_f64(value as f64).to_f64(); n];
            let got = c.fetch::<T>(&y)?;
            c.record_exact(&format!("fill {value}"), dt, &shape, &got, &want);
        }
    }
    // A view offset by one element is not 16-byte aligned: the kernels must take their scalar path.
    let n = 1001;
    let (x, bx) = c.rand::<T>(n + 1, 3.0, 0.0)?;
    let y = c.poison::<T>(n + 1)?;
    let es = size_of::<T>();
    g.kernels.unary::<T>(
        &g.stream,
        Unary::Silu,
        DevSlice::range(&y.block, FENCE + es, n * es)?,
        DevSlice::range(&bx, es, n * es)?,
        n,
    )?;
    let got = c.fetch::<T>(&y)?;
    let mut want = vec![0.0; n];
    ops::activation::forward(Act::Silu, &x[1..], &mut want);
    let view = Fetched { values: got.values[1..].to_vec(), outside: got.outside };
    c.record("silu_fwd (view at +1 element)", dt, &format!("n={n}"), &view, &want, Accuracy::Elementwise);
    // The element before the view must stay untouched (NaN).
    let untouched = Fetched { values: vec![if got.values[0].is_nan() { 0.0 } else { f64::INFINITY }], outside: 0 };
    c.record_exact("silu_fwd (no write before the view)", dt, "1", &untouched, &[0.0]);
    // Only the second input misaligned: every pointer of a vector load must be checked, not just the first two.
    // x86 loads a misaligned 16-byte vector silently, so a guard that forgets one pointer shows under UBSan's
    // alignment check (the ASan/UBSan flavour) or on a GPU.
    let (a, ba) = c.rand::<T>(n, 3.0, 0.0)?;
    let y = c.poison::<T>(n)?;
    g.kernels.add::<T>(&g.stream, y.v()?, s(&ba), DevSlice::range(&bx, es, n * es)?, n)?;
    let got = c.fetch::<T>(&y)?;
    let mut want = vec![0.0; n];
    ops::elementwise::add_forward(&a, &x[1..], &mut want);
    c.record("add (second input at +1 element)", dt, &format!("n={n}"), &got, &want, Accuracy::Elementwise);
    // fill through a view at +1 element: the scalar path, and nothing written before the view.
    let y = c.poison::<T>(n + 1)?;
    g.kernels.fill::<T>(&g.stream, DevSlice::range(&y.block, FENCE + es, n * es)?, 2.0, n)?;
    let got = c.fetch::<T>(&y)?;
    let view = Fetched { values: got.values[1..].to_vec(), outside: got.outside };
    c.record_exact("fill 2 (view at +1 element)", dt, &format!("n={n}"), &view, &vec![2.0; n]);
    let untouched = Fetched { values: vec![if got.values[0].is_nan() { 0.0 } else { f64::INFINITY }], outside: 0 };
    c.record_exact("fill (no write before the view)", dt, "1", &untouched, &[0.0]);
    Ok(())
}

pub(crate) fn casts(c: &mut Ctx) -> Result<()> {
    let g = c.g;
    for n in [1003usize, 4096, c.wrapping_len()] {
        let shape = format!("n={n}");
        let (x, bx) = c.rand::<f32>(n, 100.0, 0.0)?;
        let y = c.poison::<f16>(n)?;
        g.kernels.cast(&g.stream, y.v()?, s(&bx), n, true)?;
        let want: Vec<f64> = x.iter().map(|&v| f16::from_f64(v).to_f64()).collect();
        let got = c.fetch::<f16>(&y)?;
        // Round-to-nearest-even both sides: exact.
        c.record_exact("cast f32->f16", Dtype::F16, &shape, &got, &want);
        let (h, bh) = c.rand::<f16>(n, 100.0, 0.0)?;
        let y = c.poison::<f32>(n)?;
        g.kernels.cast(&g.stream, y.v()?, s(&bh), n, false)?;
        let got = c.fetch::<f32>(&y)?;
        c.record_exact("cast f16->f32", Dtype::F32, &shape, &got, &h);
    }
    Ok(())
}
