//! Global average pooling `[N,H,W,C]` → `[N,C]`.

mod cpu;
pub mod cuda;
pub use cpu::*;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Backend;
use anyhow::Result;

struct PoolBackward;

impl<B: Backend> Backward<B> for PoolBackward {
    fn name(&self) -> &'static str {
        "global_avg_pool"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let shape = B::shape(ctx.inputs[0]).to_vec();
        Ok(vec![Some(ctx.backend.global_avg_pool_backward(&shape, dy)?)])
    }
}

/// Records global average pooling.
pub fn global_avg_pool<B: Backend>(tape: &mut Tape<B::Host, B>, x: Var) -> Result<Var> {
    super::expect_rank("global_avg_pool", "input", tape.shape(x), 4)?;
    let (be, v) = tape.split(&[x]);
    let y = be.global_avg_pool(v[0])?;
    Ok(tape.push_op(&[x], y, Box::new(PoolBackward)))
}
