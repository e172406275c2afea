//! 2-D convolution in NHWC with OHWI weights: stride, zero padding and groups; the reference is in `cpu.rs`.

pub mod check;
mod cpu;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::{Backend, Want};
use anyhow::{Result, bail};

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

struct ConvBackward {
    geom: ConvGeom,
}

impl<B: Backend> Backward<B> for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let has_bias = ctx.inputs.len() == 3;
        let want = [ctx.want[0], ctx.want[1], if has_bias { ctx.want[2] } else { Want::No }];
        let [dx, dw, db] = ctx.backend.conv2d_backward(&self.geom, ctx.inputs[0], ctx.inputs[1], dy, want)?;
        let mut out = vec![dx, dw];
        if has_bias {
            out.push(db);
        }
        Ok(out)
    }
}

/// Records a convolution of `x` `[N,H,W,Cin]` with `w` `[Cout,KH,KW,Cin/groups]` and an optional bias `[Cout]`.
pub fn conv2d<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, w: Var, bias: Option<Var>, cfg: ConvCfg) -> Result<Var> {
    let geom = ConvGeom::new(tape.shape(x), tape.shape(w), cfg)?;
    if let Some(b) = bias
        && tape.shape(b) != [geom.cout]
    {
        bail!("conv2d: bias shape {:?}, expected [{}]", tape.shape(b), geom.cout);
    }
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    let (be, v) = tape.split(&inputs);
    let y = be.conv2d(&geom, v[0], v[1], v.get(2).copied())?;
    Ok(tape.push_op(&inputs, y, Box::new(ConvBackward { geom })))
}
