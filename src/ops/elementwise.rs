//! Residual add.

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};

/// Reference forward: `y = a + b`.
pub fn add_forward<T: Float>(a: &[T], b: &[T], y: &mut [T]) {
    y.iter_mut().zip(a.iter().zip(b)).for_each(|(y, (&a, &b))| *y = a + b);
}

struct AddBackward;

impl<T: Float> Backward<T> for AddBackward {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, g: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        Ok(ctx.needs.iter().map(|&n| n.then(|| g.clone())).collect())
    }
}

/// Records `a + b` (same shapes).
pub fn add<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    let (av, bv) = (tape.value(a), tape.value(b));
    if av.shape != bv.shape {
        bail!("add: shapes {:?} and {:?} differ", av.shape, bv.shape);
    }
    let mut y = Array::zeros(&av.shape);
    add_forward(&av.data, &bv.data, &mut y.data);
    Ok(tape.push_op(&[a, b], y, Box::new(AddBackward)))
}
