//! Linear layer: `y[N,O] = x[N,I] · Wᵀ + b`, W stored `[O, I]` as PyTorch.

use super::gemm::gemm;
use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};

/// Reference forward.
pub fn forward<T: Float>(x: &[T], w: &[T], b: Option<&[T]>, n: usize, i: usize, o: usize, y: &mut [T]) {
    gemm(n, i, o, T::one(), x, false, w, true, T::zero(), y);
    if let Some(b) = b {
        for row in y.chunks_mut(o) {
            row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
    }
}

struct LinearBackward {
    n: usize,
    i: usize,
    o: usize,
}

impl<T: Float> Backward<T> for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn backward(&self, ctx: &BackwardCtx<'_, T>, dy: &Array<T>) -> Result<Vec<Option<Array<T>>>> {
        let (n, i, o) = (self.n, self.i, self.o);
        let (x, w) = (ctx.inputs[0], ctx.inputs[1]);
        let dx = ctx.needs[0].then(|| {
            let mut dx = Array::zeros(&x.shape);
            gemm(n, o, i, T::one(), &dy.data, false, &w.data, false, T::zero(), &mut dx.data);
            dx
        });
        let dw = ctx.needs[1].then(|| {
            let mut dw = Array::zeros(&w.shape);
            gemm(o, n, i, T::one(), &dy.data, true, &x.data, false, T::zero(), &mut dw.data);
            dw
        });
        let mut out = vec![dx, dw];
        if ctx.inputs.len() == 3 {
            out.push(ctx.needs[2].then(|| {
                let mut db = Array::zeros(&[o]);
                super::conv::backward_bias(o, &dy.data, &mut db.data);
                db
            }));
        }
        Ok(out)
    }
}

/// Records `x[N,I] · w[O,I]ᵀ + b[O]`.
pub fn linear<T: Float>(tape: &mut Tape<T>, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    let (xs, ws) = (tape.shape(x).to_vec(), tape.shape(w).to_vec());
    super::expect_rank("linear", "input", &xs, 2)?;
    super::expect_rank("linear", "weight", &ws, 2)?;
    let (n, i, o) = (xs[0], xs[1], ws[0]);
    if ws[1] != i {
        bail!("linear: input {xs:?} does not fit weight {ws:?} ([out, in])");
    }
    if let Some(b) = b
        && tape.shape(b) != [o]
    {
        bail!("linear: bias shape {:?}, expected [{o}]", tape.shape(b));
    }
    let mut y = Array::zeros(&[n, o]);
    forward(&tape.value(x).data, &tape.value(w).data, b.map(|b| tape.value(b).data.as_slice()), n, i, o, &mut y.data);
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(tape.push_op(&inputs, y, Box::new(LinearBackward { n, i, o })))
}
