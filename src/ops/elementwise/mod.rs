//! Residual add.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Backend;
use anyhow::{Result, bail};

struct AddBackward;

impl<B: Backend> Backward<B> for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        Ok(ctx.needs.iter().map(|&n| n.then(|| dy.clone())).collect())
    }
}

/// Records `a + b` (same shapes).
pub fn add<B: Backend>(tape: &mut Tape<B::Host, B>, a: Var, b: Var) -> Result<Var> {
    if tape.shape(a) != tape.shape(b) {
        bail!("add: shapes {:?} and {:?} differ", tape.shape(a), tape.shape(b));
    }
    let (be, v) = tape.split(&[a, b]);
    let y = be.add(v[0], v[1])?;
    Ok(tape.push_op(&[a, b], y, Box::new(AddBackward)))
}
