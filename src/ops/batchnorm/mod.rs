//! Batch normalization over the last dimension (BatchNorm2d on NHWC, BatchNorm1d on `[N, C]`), optionally fused
//! with an activation into one tape node; the reference is in `cpu.rs`.

pub mod check;
mod cpu;
pub mod cuda;
pub use cpu::*;
pub use cuda::{BnParams, bn_workspace_bytes};

use super::activation::Act;
use crate::autograd::{Backward, BackwardCtx, Tape, Var};
use crate::backend::{Backend, BnStats, Want};
use crate::tensor::Float;
use anyhow::{Result, bail};

/// Running statistics of one batch-norm layer (the layer's buffers).
#[derive(Clone, Debug, PartialEq)]
pub struct BnState<T> {
    pub running_mean: Vec<T>,
    pub running_var: Vec<T>,
    pub num_batches_tracked: i64,
}

impl<T: Float> BnState<T> {
    /// PyTorch's initial buffers: mean 0, variance 1.
    pub fn new(c: usize) -> Self {
        Self { running_mean: vec![T::zero(); c], running_var: vec![T::one(); c], num_batches_tracked: 0 }
    }
}

/// Which statistics normalize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; the running statistics are updated only when `update_running`.
    Train { update_running: bool },
    /// Running statistics.
    Eval,
}

/// Constants of a batch-norm layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnCfg {
    pub eps: f64,
    pub momentum: f64,
}

impl Default for BnCfg {
    fn default() -> Self {
        Self { eps: 1e-5, momentum: 0.1 }
    }
}

struct BnBackward<S> {
    saved: S,
    act: Option<Act>,
}

impl<B: Backend> Backward<B> for BnBackward<B::BnSaved> {
    fn name(&self) -> &'static str {
        match self.act {
            None => "batch_norm",
            Some(Act::Silu) => "batch_norm_silu",
            Some(Act::Relu) => "batch_norm_relu",
            Some(Act::Sigmoid) => "batch_norm_sigmoid",
        }
    }
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, dy: &B::Tensor) -> Result<Vec<Option<B::Tensor>>> {
        let want: [Want; 3] = [ctx.want[0], ctx.want[1], ctx.want[2]];
        let (x, gamma, beta) = (ctx.inputs[0], ctx.inputs[1], ctx.inputs[2]);
        Ok(ctx.backend.batch_norm_backward(&self.saved, x, gamma, beta, dy, self.act, want)?.into())
    }
}

/// Records batch norm over the last dimension of `x`, followed by `act` when given (one fused node). `stats` are
/// the layer's running statistics and its index in the model's batch-norm order.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<'s, B: Backend>(
    tape: &mut Tape<B::Host, B>,
    x: Var,
    gamma: Var,
    beta: Var,
    stats: impl Into<BnStats<'s, B::Host>>,
    mode: BnMode,
    cfg: BnCfg,
    act: Option<Act>,
) -> Result<Var> {
    let stats = stats.into();
    let shape = tape.shape(x).to_vec();
    let Some(&c) = shape.last() else { bail!("batch norm: input is a scalar") };
    if tape.shape(gamma) != [c] || tape.shape(beta) != [c] || stats.state.running_mean.len() != c {
        bail!(
            "batch norm: input {:?} has {c} channels but weight {:?}, bias {:?}, running stats [{}]",
            shape,
            tape.shape(gamma),
            tape.shape(beta),
            stats.state.running_mean.len()
        );
    }
    let (be, v) = tape.split(&[x, gamma, beta]);
    let (y, saved) = be.batch_norm(v[0], v[1], v[2], stats, mode, cfg, act)?;
    Ok(tape.push_op(&[x, gamma, beta], y, Box::new(BnBackward::<B::BnSaved> { saved, act })))
}
