//! Reductions used by tests and losses: sum of all elements.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::Result;

struct SumBackward;

impl<T: Float> Backward<T> for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, g: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        Ok(vec![Some(Array::full(&ctx.inputs[0].shape, g.data[0]))])
    }
}

/// Records the sum of every element, a scalar.
pub fn sum<T: Float>(tape: &mut Tape<T>, x: Var) -> Var {
    let s = tape.value(x).data.iter().copied().sum();
    tape.push_op(&[x], Array::scalar(s), Box::new(SumBackward))
}
