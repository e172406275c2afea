//! `derma check`, the `gemm` (cuBLASLt) and `linear` (bias add, column sum) families: the device launches against the CPU reference (see [`crate::tools::check`]
//! for how inputs are drawn and errors judged).

use anyhow::{Result, bail};
use half::f16;

use crate::cuda::kernels::DevSlice;
use crate::cuda::probe;
use crate::ops;
use crate::tools::check::*;

pub(crate) fn gemm(c: &mut Ctx) -> Result<()> {
    if !c.g.is_emulated() && !probe().cublaslt {
        bail!("cuBLASLt (libcublasLt.so) was not found: add it to LD_LIBRARY_PATH");
    }
    let blas = crate::cuda::blas::Blas::new(c.g)?;
    for (m, k, n, ta, tb) in [
        (37, 24, 40, false, false),
        (64, 32, 16, true, false),
        (13, 40, 9, false, true),
        (64, 64, 64, true, true),
        (7, 3, 5, true, false),
    ] {
        let spec = crate::cuda::blas::Gemm { m, n, k, trans_a: ta, trans_b: tb };
        let shape = format!("[{m}x{k}]x[{k}x{n}] ta={ta} tb={tb}");
        // (alpha, beta): a plain product, and an update of what C holds (beta = 1: gradient accumulation).
        for (alpha, beta) in [(1.0f32, 0.0f32), (-0.75, 1.0)] {
            let ab = format!("alpha={alpha} beta={beta}");
            // Inputs of $a, output of $c; C starts as NaN when beta = 0 (it must not be read), else random.
            macro_rules! run {
                ($a:ty, $c:ty, $op:expr, $dt:expr, $acc:expr) => {{
                    let (a, ba) = c.rand::<$a>(m * k, 1.0, 0.0)?;
                    let (b, bb) = c.rand::<$a>(k * n, 1.0, 0.0)?;
                    let mut want = if beta == 0.0 { vec![0.0; m * n] } else { c.rand::<$c>(m * n, 1.0, 0.0)?.0 };
                    let bc = if beta == 0.0 { c.poison::<$c>(m * n)? } else { c.output::<$c>(&want)? };
                    blas.gemm_into::<$a, $c>(&spec, alpha, s(&ba), s(&bb), beta, bc.v()?)?;
                    ops::gemm::gemm(m, k, n, alpha as f64, &a, ta, &b, tb, beta as f64, &mut want);
                    let got = c.fetch::<$c>(&bc)?;
                    c.record(&format!("{} {ab}", $op), $dt, &shape, &got, &want, $acc);
                }};
            }
            // Strict f32 compute (no TF32): an f32 sum over k, judged as one.
            run!(f32, f32, "gemm f32", Dtype::F32, Accuracy::Reduction);
            run!(f16, f16, "gemm f16", Dtype::F16, Accuracy::TensorOp);
            // f16 inputs are exact in f32 and so are their products: only the f32 accumulation rounds.
            run!(f16, f32, "gemm f16->f32", Dtype::F32, Accuracy::Reduction);
        }
    }
    Ok(())
}

pub(crate) fn linear<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // (rows, cols): the classifier at batch 3 (9 classes), odd shapes, an aligned one (vector path), a column
    // count one past a 32-column tile, flat lengths past three grid passes (vectorised and scalar), and many rows
    // per column lane.
    for (rows, cols) in [(3usize, 9usize), (37, 13), (64, 40), (5, 33), (97, 1032), (101, 999), (1031, 7)] {
        let shape = format!("rows={rows} cols={cols}");
        let n = rows * cols;
        let (y0, _) = c.rand::<T>(n, 1.0, 0.0)?;
        let (bias, bb) = c.rand::<f32>(cols, 1.0, 0.0)?;
        let y = c.output::<T>(&y0)?;
        g.kernels.bias_add::<T>(&g.stream, y.v()?, s(&bb), rows, cols)?;
        let want: Vec<f64> = (0..n).map(|i| y0[i] + bias[i % cols]).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("bias_add", dt, &shape, &got, &want, Accuracy::Elementwise);

        let (x, bx) = c.rand::<T>(n, 1.0, 0.0)?;
        let mut sums = vec![0.0; cols];
        for (i, v) in x.iter().enumerate() {
            sums[i % cols] += v;
        }
        let out = c.poison::<f32>(cols)?;
        g.kernels.col_sum::<T>(&g.stream, out.v()?, s(&bx), rows, cols, false)?;
        let got = c.fetch::<f32>(&out)?;
        c.record("col_sum", Dtype::F32.max_of(dt), &shape, &got, &sums, Accuracy::Reduction);
        // Accumulate into a gradient slot that already holds values.
        let (slot0, _) = c.rand::<f32>(cols, 1.0, 0.0)?;
        let slot = c.output::<f32>(&slot0)?;
        g.kernels.col_sum::<T>(&g.stream, slot.v()?, s(&bx), rows, cols, true)?;
        let want: Vec<f64> = slot0.iter().zip(&sums).map(|(a, b)| a + b).collect();
        let got = c.fetch::<f32>(&slot)?;
        c.record("col_sum (accumulate)", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Reduction);
    }
    // bias_add through a view at +1 element (cols a multiple of the vector): the scalar path.
    let (rows, cols) = (16usize, 40usize);
    let n = rows * cols;
    let es = size_of::<T>();
    let (y0, _) = c.rand::<T>(n + 1, 1.0, 0.0)?;
    let (bias, bb) = c.rand::<f32>(cols, 1.0, 0.0)?;
    let y = c.output::<T>(&y0)?;
    g.kernels.bias_add::<T>(&g.stream, DevSlice::range(&y.block, FENCE + es, n * es)?, s(&bb), rows, cols)?;
    let mut want = y0.clone();
    for i in 0..n {
        want[i + 1] += bias[i % cols];
    }
    let got = c.fetch::<T>(&y)?;
    c.record(
        "bias_add (view at +1 element)",
        dt,
        &format!("rows={rows} cols={cols}"),
        &got,
        &want,
        Accuracy::Elementwise,
    );
    Ok(())
}
