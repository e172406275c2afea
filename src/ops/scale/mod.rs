//! Per-(sample, channel) scaling, the last step of squeeze-excite: `y[n,h,w,c] = x[n,h,w,c] · s[n,c]`.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Backend;
use anyhow::{Result, bail};

struct ScaleBackward;

impl<B: Backend> Backward<B> for ScaleBackward {
    fn name(&self) -> &'static str {
        "channel_scale"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let want = [ctx.want[0], ctx.want[1]];
        Ok(ctx.backend.channel_scale_backward(ctx.inputs[0], ctx.inputs[1], dy, want)?.into())
    }
}

/// Records `x[N,H,W,C] · s[N,C]`.
pub fn channel_scale<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, s: Var) -> Result<Var> {
    let xs = tape.shape(x).to_vec();
    super::expect_rank("channel_scale", "input", &xs, 4)?;
    if tape.shape(s) != [xs[0], xs[3]] {
        bail!("channel_scale: scale shape {:?}, expected [{}, {}]", tape.shape(s), xs[0], xs[3]);
    }
    let (be, v) = tape.split(&[x, s]);
    let y = be.channel_scale(v[0], v[1])?;
    Ok(tape.push_op(&[x, s], y, Box::new(ScaleBackward)))
}
