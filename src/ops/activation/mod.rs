//! SiLU, sigmoid and ReLU: elementwise, forward and backward.

mod cpu;
pub mod cuda;
pub use cpu::*;
pub use cuda::Unary;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Backend;
use anyhow::Result;

/// The activations derma's models use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    Sigmoid,
    Relu,
}

struct ActBackward(Act);

impl<B: Backend> Backward<B> for ActBackward {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        Ok(vec![Some(ctx.backend.activation_backward(self.0, ctx.inputs[0], ctx.output, dy)?)])
    }
}

/// Records `f(x)` on the tape.
pub fn activate<B: Backend>(tape: &mut Tape<B::Host, B>, act: Act, x: Var) -> Result<Var> {
    let (be, v) = tape.split(&[x]);
    let y = be.activation(act, v[0])?;
    Ok(tape.push_op(&[x], y, Box::new(ActBackward(act))))
}

pub fn silu<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var) -> Result<Var> {
    activate(tape, Act::Silu, x)
}

pub fn sigmoid<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var) -> Result<Var> {
    activate(tape, Act::Sigmoid, x)
}

pub fn relu<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var) -> Result<Var> {
    activate(tape, Act::Relu, x)
}
