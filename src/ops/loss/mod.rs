//! Log-softmax, weighted cross-entropy and the seed's focal loss, on logits `[N, C]`; the reference (and the exact
//! formulas) in `cpu.rs`.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;
pub use cuda::LossParams;

use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::Backend;
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use std::sync::Arc;

/// Which loss, and its constants.
#[derive(Clone, Debug, PartialEq)]
pub enum LossKind {
    /// Weighted cross-entropy, mean over the weights.
    CrossEntropy,
    /// The seed's focal loss with focusing parameter γ.
    Focal { gamma: f64 },
}

struct LossBackward<S> {
    saved: S,
}

impl<B: Backend> Backward<B> for LossBackward<B::LossSaved> {
    fn name(&self) -> &'static str {
        "loss"
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let mut out = vec![Some(ctx.backend.loss_backward(&self.saved, ctx.inputs[0], dy)?)];
        out.extend((1..ctx.inputs.len()).map(|_| None));
        Ok(out)
    }
}

/// Records a loss of `logits` `[N, C]` against `targets`, a scalar. Class weights, when given, are constants.
pub fn loss<B: Backend>(
    tape: &mut Tape<B::Host, B>,
    logits: Var,
    targets: &[usize],
    weights: Option<&[B::Host]>,
    kind: &LossKind,
) -> Result<Var> {
    let s = tape.shape(logits).to_vec();
    super::expect_rank("loss", "logits", &s, 2)?;
    if s[0] != targets.len() {
        bail!("loss: {} targets for {} rows of logits", targets.len(), s[0]);
    }
    let (be, v) = tape.split(&[logits]);
    let (l, saved) = be.loss(v[0], targets, weights, kind)?;
    Ok(tape.push_op(&[logits], l, Box::new(LossBackward::<B::LossSaved> { saved })))
}

struct LogSoftmaxBackward {
    c: usize,
}

impl<T: Float> Backward<crate::backend::Cpu<T>> for LogSoftmaxBackward {
    fn name(&self) -> &'static str {
        "log_softmax"
    }
    fn backward(
        &self,
        ctx: &mut BackwardCtx<'_, crate::backend::Cpu<T>>,
        dy: &Arc<Array<T>>,
    ) -> Result<Vec<Option<Arc<Array<T>>>>> {
        // dx = dy − softmax · Σ dy, with softmax = exp(output).
        let mut dx = Array::zeros(&dy.shape);
        for ((dxr, dyr), yr) in
            dx.data.chunks_mut(self.c).zip(dy.data.chunks(self.c)).zip(ctx.output.data.chunks(self.c))
        {
            let s: f64 = dyr.iter().map(|v| v.as_f64()).sum();
            for j in 0..self.c {
                dxr[j] = T::of_f64(dyr[j].as_f64() - yr[j].as_f64().exp() * s);
            }
        }
        Ok(vec![Some(Arc::new(dx))])
    }
}

/// Records row-wise log-softmax of `[N, C]` (CPU: prediction and tests).
pub fn log_softmax<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let s = tape.shape(x).to_vec();
    super::expect_rank("log_softmax", "input", &s, 2)?;
    let y: Vec<T> = log_softmax_rows(&tape.value(x).data, s[1]).into_iter().map(T::of_f64).collect();
    Ok(tape.push_op(&[x], Arc::new(Array::new(&s, y)?), Box::new(LogSoftmaxBackward { c: s[1] })))
}
