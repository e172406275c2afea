//! 2-D convolution in NHWC with OHWI weights: stride, zero padding and groups.
//!
//! Four reference paths, chosen by shape, all computing the same function:
//! - pointwise (1×1, stride 1, no padding, one group): a GEMM `[N·H·W, Cin] × [Cin, Cout]`;
//! - depthwise (groups = Cin = Cout): a direct loop whose innermost index is the channel (contiguous in NHWC);
//! - one group (the stem): im2col per sample, then a GEMM `[OH·OW, KH·KW·Cin] × [KH·KW·Cin, Cout]`;
//! - other grouped convolutions: a direct loop over the receptive field.
//!
//! Backward computes the input gradient and, only when the weight needs one, the weight and bias gradients.

use super::ConvGeom;
use crate::ops::gemm::gemm;
use crate::tensor::Float;
use rayon::prelude::*;

/// Reference forward. `wt` is OHWI, `bias` has `cout` entries.
pub fn forward<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], bias: Option<&[T]>, y: &mut [T]) {
    if g.is_pointwise() {
        gemm(g.n * g.h * g.w, g.cin, g.cout, T::one(), x, false, wt, true, T::zero(), y);
    } else if g.is_depthwise() {
        depthwise_forward(g, x, wt, y);
    } else if g.groups == 1 {
        im2col_forward(g, x, wt, y);
    } else {
        general_forward(g, x, wt, y);
    }
    if let Some(b) = bias {
        y.par_chunks_mut(g.cout).for_each(|row| row.iter_mut().zip(b).for_each(|(v, &b)| *v += b));
    }
}

fn depthwise_forward<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], y: &mut [T]) {
    let c = g.cin;
    let wk = taps_last(g, wt);
    y.par_chunks_mut(g.ow * c).enumerate().for_each(|(row, yrow)| {
        let (n, oy) = (row / g.oh, row % g.oh);
        yrow.iter_mut().for_each(|v| *v = T::zero());
        for ky in 0..g.kh {
            let Some(iy) = g.src(oy, ky, g.h) else { continue };
            for ox in 0..g.ow {
                let out = &mut yrow[ox * c..(ox + 1) * c];
                for kx in 0..g.kw {
                    let Some(ix) = g.src(ox, kx, g.w) else { continue };
                    let xin = &x[((n * g.h + iy) * g.w + ix) * c..][..c];
                    let wv = &wk[(ky * g.kw + kx) * c..][..c];
                    for ch in 0..c {
                        out[ch] += xin[ch] * wv[ch];
                    }
                }
            }
        }
    });
}

/// Depthwise weights `[C,KH,KW,1]` rearranged to `[KH,KW,C]` so the channel loop is contiguous.
fn taps_last<T: Float>(g: &ConvGeom, wt: &[T]) -> Vec<T> {
    let kk = g.kh * g.kw;
    let mut out = vec![T::zero(); kk * g.cin];
    for ch in 0..g.cin {
        for t in 0..kk {
            out[t * g.cin + ch] = wt[ch * kk + t];
        }
    }
    out
}

fn general_forward<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], y: &mut [T]) {
    let cg = g.cin / g.groups;
    let og = g.cout / g.groups;
    y.par_chunks_mut(g.ow * g.cout).enumerate().for_each(|(row, yrow)| {
        let (n, oy) = (row / g.oh, row % g.oh);
        for ox in 0..g.ow {
            for o in 0..g.cout {
                let grp = o / og;
                let mut acc = T::zero();
                for ky in 0..g.kh {
                    let Some(iy) = g.src(oy, ky, g.h) else { continue };
                    for kx in 0..g.kw {
                        let Some(ix) = g.src(ox, kx, g.w) else { continue };
                        let xin = &x[((n * g.h + iy) * g.w + ix) * g.cin + grp * cg..][..cg];
                        let wv = &wt[((o * g.kh + ky) * g.kw + kx) * cg..][..cg];
                        acc += xin.iter().zip(wv).map(|(&a, &b)| a * b).sum::<T>();
                    }
                }
                yrow[ox * g.cout + o] = acc;
            }
        }
    });
}

/// One sample's receptive fields as rows: `cols[(oy·OW + ox), (ky·KW + kx)·Cin + c]`, zeros in the padding.
/// With OHWI weights (`[Cout, KH·KW·Cin]`), a one-group convolution is then the GEMM `cols · Wᵀ`.
fn im2col<T: Float>(g: &ConvGeom, xs: &[T], cols: &mut [T]) {
    let k = g.kh * g.kw * g.cin;
    cols.par_chunks_mut(g.ow * k).enumerate().for_each(|(oy, crow)| {
        for ox in 0..g.ow {
            let dst = &mut crow[ox * k..(ox + 1) * k];
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let d = &mut dst[(ky * g.kw + kx) * g.cin..][..g.cin];
                    match (g.src(oy, ky, g.h), g.src(ox, kx, g.w)) {
                        (Some(iy), Some(ix)) => d.copy_from_slice(&xs[(iy * g.w + ix) * g.cin..][..g.cin]),
                        _ => d.iter_mut().for_each(|v| *v = T::zero()),
                    }
                }
            }
        }
    });
}

/// Adds receptive-field rows back into one sample's input gradient (the transpose of [`im2col`]).
fn col2im<T: Float>(g: &ConvGeom, cols: &[T], dxs: &mut [T]) {
    let k = g.kh * g.kw * g.cin;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let src = &cols[(oy * g.ow + ox) * k..][..k];
            for ky in 0..g.kh {
                let Some(iy) = g.src(oy, ky, g.h) else { continue };
                for kx in 0..g.kw {
                    let Some(ix) = g.src(ox, kx, g.w) else { continue };
                    let d = &mut dxs[(iy * g.w + ix) * g.cin..][..g.cin];
                    let s = &src[(ky * g.kw + kx) * g.cin..][..g.cin];
                    d.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
                }
            }
        }
    }
}

fn im2col_forward<T: Float>(g: &ConvGeom, x: &[T], wt: &[T], y: &mut [T]) {
    let (k, p) = (g.kh * g.kw * g.cin, g.oh * g.ow);
    let mut cols = vec![T::zero(); p * k];
    for n in 0..g.n {
        im2col(g, &x[n * g.h * g.w * g.cin..][..g.h * g.w * g.cin], &mut cols);
        gemm(p, k, g.cout, T::one(), &cols, false, wt, true, T::zero(), &mut y[n * p * g.cout..][..p * g.cout]);
    }
}

/// Reference backward data: `dx` from `dy`.
pub fn backward_data<T: Float>(g: &ConvGeom, dy: &[T], wt: &[T], dx: &mut [T]) {
    if g.is_pointwise() {
        gemm(g.n * g.h * g.w, g.cout, g.cin, T::one(), dy, false, wt, false, T::zero(), dx);
        return;
    }
    if g.groups == 1 && !g.is_depthwise() {
        let (k, p, hwc) = (g.kh * g.kw * g.cin, g.oh * g.ow, g.h * g.w * g.cin);
        let mut dcols = vec![T::zero(); p * k];
        for n in 0..g.n {
            gemm(p, g.cout, k, T::one(), &dy[n * p * g.cout..][..p * g.cout], false, wt, false, T::zero(), &mut dcols);
            let dxs = &mut dx[n * hwc..][..hwc];
            dxs.iter_mut().for_each(|v| *v = T::zero());
            col2im(g, &dcols, dxs);
        }
        return;
    }
    let cg = g.cin / g.groups;
    let og = g.cout / g.groups;
    let wk = if g.is_depthwise() { taps_last(g, wt) } else { Vec::new() };
    // One sample per task: the scatter into dx stays inside the sample.
    dx.par_chunks_mut(g.h * g.w * g.cin).enumerate().for_each(|(n, dxs)| {
        dxs.iter_mut().for_each(|v| *v = T::zero());
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let dyv = &dy[((n * g.oh + oy) * g.ow + ox) * g.cout..][..g.cout];
                for ky in 0..g.kh {
                    let Some(iy) = g.src(oy, ky, g.h) else { continue };
                    for kx in 0..g.kw {
                        let Some(ix) = g.src(ox, kx, g.w) else { continue };
                        let dxv = &mut dxs[(iy * g.w + ix) * g.cin..][..g.cin];
                        if g.is_depthwise() {
                            let wv = &wk[(ky * g.kw + kx) * g.cin..][..g.cin];
                            for ch in 0..g.cin {
                                dxv[ch] += dyv[ch] * wv[ch];
                            }
                        } else {
                            for (o, &d) in dyv.iter().enumerate() {
                                let grp = o / og;
                                let wv = &wt[((o * g.kh + ky) * g.kw + kx) * cg..][..cg];
                                let dst = &mut dxv[grp * cg..][..cg];
                                dst.iter_mut().zip(wv).for_each(|(a, &b)| *a += d * b);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Reference backward weight: `dw` (OHWI) from `dy` and `x`.
pub fn backward_weight<T: Float>(g: &ConvGeom, x: &[T], dy: &[T], dw: &mut [T]) {
    if g.is_pointwise() {
        gemm(g.cout, g.n * g.h * g.w, g.cin, T::one(), dy, true, x, false, T::zero(), dw);
        return;
    }
    if g.groups == 1 && !g.is_depthwise() {
        // dW[Cout, K] = Σₙ dYₙᵀ · colsₙ
        let (k, p, hwc) = (g.kh * g.kw * g.cin, g.oh * g.ow, g.h * g.w * g.cin);
        let mut cols = vec![T::zero(); p * k];
        for n in 0..g.n {
            im2col(g, &x[n * hwc..][..hwc], &mut cols);
            let beta = if n == 0 { T::zero() } else { T::one() };
            gemm(g.cout, p, k, T::one(), &dy[n * p * g.cout..][..p * g.cout], true, &cols, false, beta, dw);
        }
        return;
    }
    let cg = g.cin / g.groups;
    let og = g.cout / g.groups;
    let per_sample = |n: usize| -> Vec<T> {
        let mut acc = vec![T::zero(); dw.len()];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let dyv = &dy[((n * g.oh + oy) * g.ow + ox) * g.cout..][..g.cout];
                for ky in 0..g.kh {
                    let Some(iy) = g.src(oy, ky, g.h) else { continue };
                    for kx in 0..g.kw {
                        let Some(ix) = g.src(ox, kx, g.w) else { continue };
                        let xv = &x[((n * g.h + iy) * g.w + ix) * g.cin..][..g.cin];
                        if g.is_depthwise() {
                            // acc laid out [KH,KW,C] here; transposed back below.
                            let a = &mut acc[(ky * g.kw + kx) * g.cin..][..g.cin];
                            for ch in 0..g.cin {
                                a[ch] += dyv[ch] * xv[ch];
                            }
                        } else {
                            for (o, &d) in dyv.iter().enumerate() {
                                let grp = o / og;
                                let a = &mut acc[((o * g.kh + ky) * g.kw + kx) * cg..][..cg];
                                a.iter_mut().zip(&xv[grp * cg..][..cg]).for_each(|(a, &b)| *a += d * b);
                            }
                        }
                    }
                }
            }
        }
        acc
    };
    let total = (0..g.n).into_par_iter().map(per_sample).reduce(
        || vec![T::zero(); dw.len()],
        |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
            a
        },
    );
    if g.is_depthwise() {
        let kk = g.kh * g.kw;
        for ch in 0..g.cin {
            for t in 0..kk {
                dw[ch * kk + t] = total[t * g.cin + ch];
            }
        }
    } else {
        dw.copy_from_slice(&total);
    }
}

/// Reference backward bias: `db[o] = Σ dy[.., o]`.
pub fn backward_bias<T: Float>(cout: usize, dy: &[T], db: &mut [T]) {
    db.iter_mut().for_each(|v| *v = T::zero());
    for row in dy.chunks(cout) {
        db.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
    }
}
