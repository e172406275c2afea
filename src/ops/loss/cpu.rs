//! Log-softmax, weighted cross-entropy and the seed's focal loss, on logits `[N, C]`.
//!
//! Cross-entropy with class weights `w`, reduction mean (PyTorch): `Σᵢ w[yᵢ]·(−log softmax(xᵢ)[yᵢ]) / Σᵢ w[yᵢ]`.
//! Focal loss as the seed computes it: `ceᵢ = −w[yᵢ]·log softmax(xᵢ)[yᵢ]` (reduction none, so the class weight is
//! inside), `ptᵢ = exp(−ceᵢ)`, `loss = mean((1 − ptᵢ)^γ · ceᵢ)` — note that `pt` includes the class weight.
//! Everything is computed in f64.

use super::LossKind;
use crate::tensor::Float;
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

/// Softmax probabilities of `[N, C]` logits (for metrics and prediction).
pub fn softmax_rows<T: Float>(x: &[T], c: usize) -> Vec<f64> {
    log_softmax_rows(x, c).into_iter().map(f64::exp).collect()
}
