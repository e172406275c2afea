//! Linear layer: `y[N,O] = x[N,I] · Wᵀ + b`, W stored `[O, I]` as PyTorch.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::{Backend, Want};
use anyhow::{Result, bail};

struct LinearBackward;

impl<B: Backend> Backward<B> for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let has_bias = ctx.inputs.len() == 3;
        let want = [ctx.want[0], ctx.want[1], if has_bias { ctx.want[2] } else { Want::No }];
        let [dx, dw, db] = ctx.backend.linear_backward(ctx.inputs[0], ctx.inputs[1], dy, want)?;
        let mut out = vec![dx, dw];
        if has_bias {
            out.push(db);
        }
        Ok(out)
    }
}

/// Records `x[N,I] · w[O,I]ᵀ + b[O]`.
pub fn linear<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    let (xs, ws) = (tape.shape(x).to_vec(), tape.shape(w).to_vec());
    super::expect_rank("linear", "input", &xs, 2)?;
    super::expect_rank("linear", "weight", &ws, 2)?;
    let (i, o) = (xs[1], ws[0]);
    if ws[1] != i {
        bail!("linear: input {xs:?} does not fit weight {ws:?} ([out, in])");
    }
    if let Some(b) = b
        && tape.shape(b) != [o]
    {
        bail!("linear: bias shape {:?}, expected [{o}]", tape.shape(b));
    }
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let (be, v) = tape.split(&inputs);
    let y = be.linear(v[0], v[1], v.get(2).copied())?;
    Ok(tape.push_op(&inputs, y, Box::new(LinearBackward)))
}
