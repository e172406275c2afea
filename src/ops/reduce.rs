//! Reductions used by tests and losses: sum of all elements.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Cpu;
use crate::tensor::{Array, Float};
use anyhow::Result;
use std::sync::Arc;

struct SumBackward;

impl<T: Float> Backward<Cpu<T>> for SumBackward {
    fn name(&self) -> &'static str {
        "sum"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, Cpu<T>>, g: &Arc<Array<T>>) -> Result<Vec<Option<Arc<Array<T>>>>> {
        Ok(vec![Some(Arc::new(Array::full(&ctx.inputs[0].shape, g.data[0])))])
    }
}

/// Records the sum of every element, a scalar.
pub fn sum<T: Float>(tape: &mut Tape<T>, x: Var) -> Var {
    let s = tape.value(x).data.iter().copied().sum();
    tape.push_op(&[x], Arc::new(Array::scalar(s)), Box::new(SumBackward))
}
