//! Log-softmax, weighted cross-entropy and the seed's focal loss, on logits `[N, C]`.
//!
//! Cross-entropy with class weights `w`, reduction mean (PyTorch): `Σᵢ w[yᵢ]·(−log softmax(xᵢ)[yᵢ]) / Σᵢ w[yᵢ]`.
//! Focal loss as the seed computes it: `ceᵢ = −w[yᵢ]·log softmax(xᵢ)[yᵢ]` (reduction none, so the class weight is
//! inside), `ptᵢ = exp(−ceᵢ)`, `loss = mean((1 − ptᵢ)^γ · ceᵢ)` — note that `pt` includes the class weight.
//! Everything is computed in f64.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};

/// Row-wise log-softmax of `[N, C]`, in f64.
pub fn log_softmax_rows<T: Float>(x: &[T], c: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        // A NaN-propagating maximum (f64::max skips NaN): a row with a NaN is all NaN, as in PyTorch.
        let max =
            row.iter().map(|v| v.as_f64()).fold(f64::NEG_INFINITY, |m, v| if v > m || v.is_nan() { v } else { m });
        let lse = max + row.iter().map(|v| (v.as_f64() - max).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|v| v.as_f64() - lse));
    }
    out
}

/// Which loss, and its constants.
#[derive(Clone, Debug, PartialEq)]
pub enum LossKind {
    /// Weighted cross-entropy, mean over the weights.
    CrossEntropy,
    /// The seed's focal loss with focusing parameter γ.
    Focal { gamma: f64 },
}

/// Reference loss and its gradient with respect to the logits.
pub fn forward_backward<T: Float>(
    logits: &[T],
    c: usize,
    targets: &[usize],
    weights: Option<&[T]>,
    kind: &LossKind,
) -> Result<(f64, Vec<f64>)> {
    let n = targets.len();
    if logits.len() != n * c {
        bail!("loss: logits hold {} values, expected {n}×{c}", logits.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= c) {
        bail!("loss: target class {bad} is out of range for {c} classes");
    }
    if let Some(w) = weights
        && w.len() != c
    {
        bail!("loss: {} class weights for {c} classes", w.len());
    }
    let w = |k: usize| weights.map_or(1.0, |w| w[k].as_f64());
    let logp = log_softmax_rows(logits, c);
    let mut grad = vec![0.0; n * c];
    let loss = match kind {
        LossKind::CrossEntropy => {
            let wsum: f64 = targets.iter().map(|&t| w(t)).sum();
            if wsum == 0.0 {
                bail!("loss: the class weights of this batch's targets sum to zero");
            }
            let mut l = 0.0;
            for (i, &t) in targets.iter().enumerate() {
                let wi = w(t);
                l += -wi * logp[i * c + t];
                for j in 0..c {
                    let p = logp[i * c + j].exp();
                    grad[i * c + j] = wi / wsum * (p - if j == t { 1.0 } else { 0.0 });
                }
            }
            l / wsum
        }
        LossKind::Focal { gamma } => {
            let g = *gamma;
            let mut l = 0.0;
            for (i, &t) in targets.iter().enumerate() {
                let wi = w(t);
                let ce = -wi * logp[i * c + t];
                let pt = (-ce).exp();
                let omp = 1.0 - pt;
                l += omp.powf(g) * ce;
                // d/dce [(1−e^{−ce})^γ·ce] = γ(1−pt)^{γ−1}·pt·ce + (1−pt)^γ
                let first = if omp == 0.0 { 0.0 } else { g * omp.powf(g - 1.0) * pt * ce };
                let dce = (first + omp.powf(g)) / n as f64;
                for j in 0..c {
                    let p = logp[i * c + j].exp();
                    grad[i * c + j] = dce * wi * (p - if j == t { 1.0 } else { 0.0 });
                }
            }
            l / n as f64
        }
    };
    Ok((loss, grad))
}

struct LossBackward {
    grad: Vec<f64>,
}

impl<T: Float> Backward<T> for LossBackward {
    fn name(&self) -> &'static str {
        "loss"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let s = dy.data[0].as_f64();
        let data = self.grad.iter().map(|&g| T::of_f64(g * s)).collect();
        let mut out = vec![Some(Array::new(&ctx.inputs[0].shape, data)?)];
        out.extend((1..ctx.inputs.len()).map(|_| None));
        Ok(out)
    }
}

/// Records a loss of `logits` `[N, C]` against `targets`, a scalar. Class weights, when given, are constants.
pub fn loss<T: Float>(
    tape: &mut Tape<T>,
    logits: Var,
    targets: &[usize],
    weights: Option<&[T]>,
    kind: &LossKind,
) -> Result<Var> {
    let s = tape.shape(logits).to_vec();
    super::expect_rank("loss", "logits", &s, 2)?;
    if s[0] != targets.len() {
        bail!("loss: {} targets for {} rows of logits", targets.len(), s[0]);
    }
    let (l, grad) = forward_backward(&tape.value(logits).data, s[1], targets, weights, kind)?;
    Ok(tape.push_op(&[logits], Array::scalar(T::of_f64(l)), Box::new(LossBackward { grad })))
}

struct LogSoftmaxBackward {
    c: usize,
}

impl<T: Float> Backward<T> for LogSoftmaxBackward {
    fn name(&self) -> &'static str {
        "log_softmax"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        // dx = dy − softmax · Σ dy, with softmax = exp(output).
        let mut dx = Array::zeros(&dy.shape);
        for ((dxr, dyr), yr) in
            dx.data.chunks_mut(self.c).zip(dy.data.chunks(self.c)).zip(ctx.output.data.chunks(self.c))
        {
            let s: f64 = dyr.iter().map(|v| v.as_f64()).sum();
            for j in 0..self.c {
                dxr[j] = T::of_f64(dyr[j].as_f64() - yr[j].as_f64().exp() * s);
            }
        }
        Ok(vec![Some(dx)])
    }
}

/// Records row-wise log-softmax of `[N, C]`.
pub fn log_softmax<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let s = tape.shape(x).to_vec();
    super::expect_rank("log_softmax", "input", &s, 2)?;
    let y: Vec<T> = log_softmax_rows(&tape.value(x).data, s[1]).into_iter().map(T::of_f64).collect();
    Ok(tape.push_op(&[x], Array::new(&s, y)?, Box::new(LogSoftmaxBackward { c: s[1] })))
}

/// Softmax probabilities of `[N, C]` logits (for metrics and prediction).
pub fn softmax_rows<T: Float>(x: &[T], c: usize) -> Vec<f64> {
    log_softmax_rows(x, c).into_iter().map(f64::exp).collect()
}
