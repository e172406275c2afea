//! Batch normalization over the last dimension (BatchNorm2d on NHWC, BatchNorm1d on `[N, C]`), optionally fused
//! with an activation into one tape node (`batch_norm_silu`).
//!
//! Semantics as PyTorch (REFERENCE.md): training normalizes with the batch mean and the biased variance, and
//! moves the running statistics by `momentum` towards the batch mean and the unbiased variance; eval normalizes
//! with the running statistics. Sums are accumulated in f64 and the variance is computed in a second pass
//! around the mean, so the reference stays accurate for the 400k-row channels of a batch-32 stem.

use super::{BnCfg, BnMode, BnState};
use crate::ops::activation::Act;
use crate::tensor::Float;
use anyhow::{Result, bail};
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 512;

/// Per-channel sums over all rows of `x` viewed as `[M, C]`, in f64: of `x` when `mean` is `None`, else of
/// `(x − mean)²`. Whole-row slice loops (no per-element closure or index) so both passes vectorize.
fn channel_sums<T: Float>(x: &[T], c: usize, mean: Option<&[f64]>) -> Vec<f64> {
    x.par_chunks(ROWS_PER_TASK * c)
        .map(|block| {
            let mut acc = vec![0.0f64; c];
            for row in block.chunks(c) {
                match mean {
                    None => acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v.as_f64()),
                    Some(mean) => acc.iter_mut().zip(row).zip(mean).for_each(|((a, &v), &mu)| {
                        let d = v.as_f64() - mu;
                        *a += d * d
                    }),
                }
            }
            acc
        })
        .reduce(
            || vec![0.0; c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// Batch mean and biased variance per channel of `x` viewed as `[M, C]`.
pub fn batch_stats<T: Float>(x: &[T], c: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (x.len() / c) as f64;
    let mean: Vec<f64> = channel_sums(x, c, None).into_iter().map(|s| s / m).collect();
    let var = channel_sums(x, c, Some(&mean)).into_iter().map(|s| s / m).collect();
    (mean, var)
}

/// Reference forward. Returns the mean and inverse standard deviation used (what backward needs).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Float>(
    x: &[T],
    c: usize,
    gamma: &[T],
    beta: &[T],
    state: &mut BnState<T>,
    mode: BnMode,
    cfg: BnCfg,
    act: Option<Act>,
    y: &mut [T],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let m = x.len() / c;
    let (mean, invstd) = match mode {
        BnMode::Train { update_running } => {
            if m <= 1 {
                bail!("batch norm: expected more than 1 value per channel when training, got {m} (batch of one?)");
            }
            let (mean, var) = batch_stats(x, c);
            if update_running {
                let mo = cfg.momentum;
                let unbias = m as f64 / (m as f64 - 1.0);
                for ch in 0..c {
                    let rm = state.running_mean[ch].as_f64();
                    let rv = state.running_var[ch].as_f64();
                    state.running_mean[ch] = T::of_f64((1.0 - mo) * rm + mo * mean[ch]);
                    state.running_var[ch] = T::of_f64((1.0 - mo) * rv + mo * var[ch] * unbias);
                }
                state.num_batches_tracked += 1;
            }
            let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + cfg.eps).sqrt()).collect();
            (mean, invstd)
        }
        BnMode::Eval => {
            let mean: Vec<f64> = state.running_mean.iter().map(|v| v.as_f64()).collect();
            let invstd = state.running_var.iter().map(|v| 1.0 / (v.as_f64() + cfg.eps).sqrt()).collect();
            (mean, invstd)
        }
    };
    // y = act(γ·(x − mean)·invstd + β) as scale·x + shift per channel.
    let scale: Vec<T> = (0..c).map(|ch| T::of_f64(gamma[ch].as_f64() * invstd[ch])).collect();
    let shift: Vec<T> =
        (0..c).map(|ch| T::of_f64(beta[ch].as_f64() - mean[ch] * gamma[ch].as_f64() * invstd[ch])).collect();
    y.par_chunks_mut(ROWS_PER_TASK * c).zip(x.par_chunks(ROWS_PER_TASK * c)).for_each(|(yb, xb)| {
        for (yr, xr) in yb.chunks_mut(c).zip(xb.chunks(c)) {
            yr.iter_mut().zip(xr).zip(scale.iter().zip(&shift)).for_each(|((y, &x), (&s, &t))| *y = x * s + t);
            if let Some(a) = act {
                a.apply_in_place(yr);
            }
        }
    });
    Ok((mean, invstd))
}

/// Reference backward. `mean`/`invstd` are what forward returned; `train` says whether they were batch
/// statistics (then the gradient flows through them too). Returns (dx, dgamma, dbeta) into the given buffers.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    x: &[T],
    c: usize,
    gamma: &[T],
    beta: &[T],
    mean: &[f64],
    invstd: &[f64],
    train: bool,
    act: Option<Act>,
    dy: &[T],
    dx: Option<&mut [T]>,
    dgamma: Option<&mut [T]>,
    dbeta: Option<&mut [T]>,
) {
    let dx_wanted = dx.is_some();
    let m = (x.len() / c) as f64;
    // Per-element work in T (f32 when training), per-channel sums in f64. Pass 1 computes dz, the gradient before
    // the fused activation (z recomputed from x), into a scratch buffer (dx itself when wanted) and sums dz and
    // dz·x̂; pass 2 turns dz into dx.
    let mean_t: Vec<T> = mean.iter().map(|&v| T::of_f64(v)).collect();
    let invstd_t: Vec<T> = invstd.iter().map(|&v| T::of_f64(v)).collect();
    let mut scratch;
    let dz_buf: &mut [T] = match dx {
        Some(d) => d,
        None => {
            scratch = vec![T::zero(); x.len()];
            &mut scratch
        }
    };
    let block = ROWS_PER_TASK * c;
    let sums = dz_buf
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .map(|(dzb, (xb, dyb))| {
            let mut s = vec![0.0f64; 2 * c];
            for ((dzr, xr), dyr) in dzb.chunks_mut(c).zip(xb.chunks(c)).zip(dyb.chunks(c)) {
                // dz = dy·f'(z) with z = γ·x̂ + β recomputed in place (slice loops, so each vectorizes).
                match act {
                    Some(a) => {
                        for ch in 0..c {
                            dzr[ch] = (xr[ch] - mean_t[ch]) * invstd_t[ch] * gamma[ch] + beta[ch];
                        }
                        a.grad_in_place(dzr, dyr);
                    }
                    None => dzr.copy_from_slice(dyr),
                }
                let (s_dz, s_dzx) = s.split_at_mut(c);
                for ch in 0..c {
                    let d = dzr[ch];
                    let xh = (xr[ch] - mean_t[ch]) * invstd_t[ch];
                    s_dz[ch] += d.as_f64();
                    s_dzx[ch] += (d * xh).as_f64();
                }
            }
            s
        })
        .reduce(
            || vec![0.0; 2 * c],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    let (sum_dz, sum_dz_xhat) = sums.split_at(c);
    if let Some(db) = dbeta {
        db.iter_mut().zip(sum_dz).for_each(|(d, &s)| *d = T::of_f64(s));
    }
    if let Some(dg) = dgamma {
        dg.iter_mut().zip(sum_dz_xhat).for_each(|(d, &s)| *d = T::of_f64(s));
    }
    if dx_wanted {
        // dx = γ·invstd·(dz − mean(dz) − x̂·mean(dz·x̂)) in training; γ·invstd·dz with running statistics.
        let k: Vec<T> = (0..c).map(|ch| T::of_f64(gamma[ch].as_f64() * invstd[ch])).collect();
        let mdz: Vec<T> = sum_dz.iter().map(|&v| T::of_f64(if train { v / m } else { 0.0 })).collect();
        let mdzx: Vec<T> = sum_dz_xhat.iter().map(|&v| T::of_f64(if train { v / m } else { 0.0 })).collect();
        dz_buf.par_chunks_mut(block).zip(x.par_chunks(block)).for_each(|(dzb, xb)| {
            for (row, xr) in dzb.chunks_mut(c).zip(xb.chunks(c)) {
                if train {
                    for ch in 0..c {
                        let xh = (xr[ch] - mean_t[ch]) * invstd_t[ch];
                        row[ch] = k[ch] * (row[ch] - mdz[ch] - xh * mdzx[ch]);
                    }
                } else {
                    // With running statistics dx does not depend on x (as in PyTorch), so a NaN or infinite x
                    // must not leak in through `x̂ · 0`; finite x̂ keep the exact former arithmetic.
                    for ch in 0..c {
                        let xh = (xr[ch] - mean_t[ch]) * invstd_t[ch];
                        let xh = if xh.is_finite() { xh } else { T::zero() };
                        row[ch] = k[ch] * (row[ch] - mdz[ch] - xh * mdzx[ch]);
                    }
                }
            }
        });
    }
}
