//! 2-D convolution in NHWC with OHWI weights: stride, zero padding and groups.
//!
//! Four reference paths, chosen by shape, all computing the same function:
//! - pointwise (1×1, stride 1, no padding, one group): a GEMM `[N·H·W, Cin] × [Cin, Cout]`;
//! - depthwise (groups = Cin = Cout): a direct loop whose innermost index is the channel (contiguous in NHWC);
//! - one group (the stem): im2col per sample, then a GEMM `[OH·OW, KH·KW·Cin] × [KH·KW·Cin, Cout]`;
//! - other grouped convolutions: a direct loop over the receptive field.
//!
//! Backward computes the input gradient and, only when the weight needs one, the weight and bias gradients.

use super::gemm::gemm;
use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use rayon::prelude::*;

/// Hyper-parameters of a convolution (square stride and padding, as EfficientNet uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvCfg {
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
}

/// All sizes of one convolution call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// Validates an input shape `[N,H,W,Cin]` and a weight shape `[Cout,KH,KW,Cin/groups]`.
    pub fn new(x: &[usize], wt: &[usize], cfg: ConvCfg) -> Result<Self> {
        super::expect_rank("conv2d", "input", x, 4)?;
        super::expect_rank("conv2d", "weight", wt, 4)?;
        let (n, h, w, cin) = (x[0], x[1], x[2], x[3]);
        let (cout, kh, kw, cg) = (wt[0], wt[1], wt[2], wt[3]);
        let g = cfg.groups;
        if g == 0 || cin % g != 0 || cout % g != 0 || cg != cin / g {
            bail!("conv2d: input {x:?} and weight {wt:?} do not fit groups={g} (weight is [out, kh, kw, in/groups])");
        }
        if cfg.stride == 0 {
            bail!("conv2d: stride must be positive");
        }
        if h + 2 * cfg.pad < kh || w + 2 * cfg.pad < kw {
            bail!("conv2d: input {h}×{w} with padding {} is smaller than the {kh}×{kw} kernel", cfg.pad);
        }
        let oh = (h + 2 * cfg.pad - kh) / cfg.stride + 1;
        let ow = (w + 2 * cfg.pad - kw) / cfg.stride + 1;
        Ok(Self { n, h, w, cin, cout, kh, kw, stride: cfg.stride, pad: cfg.pad, groups: g, oh, ow })
    }

    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0 && self.groups == 1
    }

    pub fn is_depthwise(&self) -> bool {
        self.groups == self.cin && self.cin == self.cout && self.groups > 1
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.cout]
    }

    /// Input row/column for an output position and a kernel tap, `None` in the zero padding.
    #[inline]
    fn src(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + k) as isize - self.pad as isize;
        (i >= 0 && (i as usize) < size).then_some(i as usize)
    }

    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.n * self.oh * self.ow * self.cout * self.kh * self.kw * (self.cin / self.groups)
    }
}

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

struct ConvBackward {
    geom: ConvGeom,
}

impl<T: Float> Backward<T> for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let g = &self.geom;
        let (x, wt) = (ctx.inputs[0], ctx.inputs[1]);
        let dx = ctx.needs[0].then(|| {
            let mut dx = Array::zeros(&x.shape);
            backward_data(g, &dy.data, &wt.data, &mut dx.data);
            dx
        });
        let dw = ctx.needs[1].then(|| {
            let mut dw = Array::zeros(&wt.shape);
            backward_weight(g, &x.data, &dy.data, &mut dw.data);
            dw
        });
        let mut out = vec![dx, dw];
        if ctx.inputs.len() == 3 {
            out.push(ctx.needs[2].then(|| {
                let mut db = Array::zeros(&[g.cout]);
                backward_bias(g.cout, &dy.data, &mut db.data);
                db
            }));
        }
        Ok(out)
    }
}

/// Records a convolution of `x` `[N,H,W,Cin]` with `w` `[Cout,KH,KW,Cin/groups]` and an optional bias `[Cout]`.
pub fn conv2d<T: Float>(tape: &mut Tape<T>, x: Var, w: Var, bias: Option<Var>, cfg: ConvCfg) -> Result<Var> {
    let geom = ConvGeom::new(tape.shape(x), tape.shape(w), cfg)?;
    if let Some(b) = bias
        && tape.shape(b) != [geom.cout]
    {
        bail!("conv2d: bias shape {:?}, expected [{}]", tape.shape(b), geom.cout);
    }
    let mut y = Array::zeros(&geom.out_shape());
    forward(&geom, &tape.value(x).data, &tape.value(w).data, bias.map(|b| tape.value(b).data.as_slice()), &mut y.data);
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    Ok(tape.push_op(&inputs, y, Box::new(ConvBackward { geom })))
}
