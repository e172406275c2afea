//! Tape autograd.
//!
//! The forward pass records one [`Node`] per op on a [`Tape`]; [`Tape::backward`] replays the nodes in reverse and
//! accumulates into one gradient buffer per trainable parameter of a [`ParamStore`].
//!
//! - A node is recorded only when at least one input needs a gradient. Inputs that come from frozen parameters or
//!   constants need none, so with the whole backbone frozen no backbone node exists and backward never enters it.
//! - Each op's backward is told which of its inputs need a gradient ([`BackwardCtx::needs`]) and skips the rest:
//!   a frozen weight costs no weight-gradient work and gets no buffer.
//! - A fused op (say batch norm + SiLU) is one node with its own backward, exactly like a primitive: the autograd
//!   never looks inside.
//! - [`Tape::inference`] builds a tape that records nothing.

pub mod gradcheck;
mod params;

pub use params::{Param, ParamId, ParamStore};

use crate::tensor::{Array, Float};
use anyhow::{Result, bail};

/// A value on a tape (an index into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// What a backward function sees: the node's inputs and output values, and which inputs need a gradient.
pub struct BackwardCtx<'a, T> {
    pub inputs: Vec<&'a Array<T>>,
    pub output: &'a Array<T>,
    pub needs: Vec<bool>,
}

/// The backward of one recorded op. It returns one entry per input: `Some(grad)` where `needs[i]`, else `None`.
pub trait Backward<T>: Send + Sync {
    /// Op name, for error messages and debugging.
    fn name(&self) -> &'static str;
    fn backward(&self, ctx: &BackwardCtx<'_, T>, grad_out: &Array<T>) -> Result<Vec<Option<Array<T>>>>;
}

struct Node<T> {
    inputs: Vec<Var>,
    output: Var,
    op: Box<dyn Backward<T>>,
}

/// The record of a forward pass.
pub struct Tape<T> {
    values: Vec<Array<T>>,
    requires_grad: Vec<bool>,
    /// The parameter a var reads, if any: where its gradient goes.
    param_of: Vec<Option<ParamId>>,
    nodes: Vec<Node<T>>,
    record: bool,
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Float> Tape<T> {
    /// A recording tape (training).
    pub fn new() -> Self {
        Self { values: Vec::new(), requires_grad: Vec::new(), param_of: Vec::new(), nodes: Vec::new(), record: true }
    }

    /// A tape that records nothing (inference): no node, no gradient, values only.
    pub fn inference() -> Self {
        Self { record: false, ..Self::new() }
    }

    /// Whether this tape records ops.
    pub fn is_recording(&self) -> bool {
        self.record
    }

    /// Number of recorded nodes (what backward will visit).
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Names of the recorded ops, in forward order.
    pub fn node_names(&self) -> Vec<&'static str> {
        self.nodes.iter().map(|n| n.op.name()).collect()
    }

    fn push_value(&mut self, a: Array<T>, requires_grad: bool, param: Option<ParamId>) -> Var {
        self.values.push(a);
        self.requires_grad.push(requires_grad);
        self.param_of.push(param);
        Var(self.values.len() - 1)
    }

    /// A value that needs no gradient (input images, targets, masks).
    pub fn constant(&mut self, a: Array<T>) -> Var {
        self.push_value(a, false, None)
    }

    /// A leaf whose gradient is wanted but which is no parameter (gradient checks read it with [`Tape::grad_of`]).
    pub fn leaf(&mut self, a: Array<T>) -> Var {
        let rg = self.record;
        self.push_value(a, rg, None)
    }

    /// Reads a parameter onto the tape. It needs a gradient only if it is trainable and the tape records.
    pub fn param(&mut self, store: &ParamStore<T>, id: ParamId) -> Var {
        let p = store.get(id);
        let rg = self.record && p.trainable;
        self.push_value(p.value.clone(), rg, Some(id))
    }

    pub fn value(&self, v: Var) -> &Array<T> {
        &self.values[v.0]
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        &self.values[v.0].shape
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.requires_grad[v.0]
    }

    /// Adds an op's output. The op is recorded only if the tape records and some input needs a gradient.
    pub fn push_op(&mut self, inputs: &[Var], output: Array<T>, op: Box<dyn Backward<T>>) -> Var {
        let rg = self.record && inputs.iter().any(|v| self.requires_grad[v.0]);
        let out = self.push_value(output, rg, None);
        if rg {
            self.nodes.push(Node { inputs: inputs.to_vec(), output: out, op });
        }
        out
    }

    /// Backward from a scalar: seeds d(loss)/d(loss) = 1.
    pub fn backward(&mut self, loss: Var, store: &mut ParamStore<T>) -> Result<Gradients<T>> {
        if self.values[loss.0].numel() != 1 {
            bail!("backward needs a scalar loss, got shape {:?}", self.values[loss.0].shape);
        }
        let seed = Array::full(&self.values[loss.0].shape, T::one());
        self.backward_with(loss, seed, store)
    }

    /// Backward from any output with an explicit output gradient. Parameter gradients are accumulated into the
    /// store; the gradients of non-parameter leaves are returned.
    pub fn backward_with(&mut self, out: Var, seed: Array<T>, store: &mut ParamStore<T>) -> Result<Gradients<T>> {
        if seed.shape != self.values[out.0].shape {
            bail!("output gradient shape {:?} differs from the output's {:?}", seed.shape, self.values[out.0].shape);
        }
        let mut grads: Vec<Option<Array<T>>> = (0..self.values.len()).map(|_| None).collect();
        if !self.requires_grad[out.0] {
            return Ok(Gradients { grads });
        }
        grads[out.0] = Some(seed);
        for node in self.nodes.iter().rev() {
            let Some(g) = grads[node.output.0].take() else { continue };
            let needs: Vec<bool> = node.inputs.iter().map(|v| self.requires_grad[v.0]).collect();
            let ctx = BackwardCtx {
                inputs: node.inputs.iter().map(|v| &self.values[v.0]).collect(),
                output: &self.values[node.output.0],
                needs: needs.clone(),
            };
            let in_grads = node.op.backward(&ctx, &g)?;
            if in_grads.len() != node.inputs.len() {
                bail!(
                    "backward of {} returned {} gradients for {} inputs",
                    node.op.name(),
                    in_grads.len(),
                    node.inputs.len()
                );
            }
            for ((v, gi), need) in node.inputs.iter().zip(in_grads).zip(needs) {
                let Some(gi) = gi else { continue };
                if !need {
                    continue;
                }
                if gi.shape != self.values[v.0].shape {
                    bail!(
                        "backward of {} gave a gradient of shape {:?} for an input of shape {:?}",
                        node.op.name(),
                        gi.shape,
                        self.values[v.0].shape
                    );
                }
                accumulate(&mut grads[v.0], gi);
            }
        }
        // Parameter gradients go into the store; everything else is handed back.
        for (i, g) in grads.iter_mut().enumerate() {
            if let (Some(id), Some(gv)) = (self.param_of[i], g.as_ref()) {
                store.accumulate_grad(id, gv)?;
                *g = None;
            }
        }
        Ok(Gradients { grads })
    }
}

fn accumulate<T: Float>(slot: &mut Option<Array<T>>, g: Array<T>) {
    match slot {
        Some(acc) => acc.data.iter_mut().zip(&g.data).for_each(|(a, &b)| *a += b),
        None => *slot = Some(g),
    }
}

/// Gradients of the non-parameter leaves of a backward pass.
pub struct Gradients<T> {
    grads: Vec<Option<Array<T>>>,
}

impl<T: Float> Gradients<T> {
    /// The gradient of a leaf created with [`Tape::leaf`], if backward reached it.
    pub fn get(&self, v: Var) -> Option<&Array<T>> {
        self.grads.get(v.0).and_then(|g| g.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    #[test]
    fn frozen_params_get_no_buffer_and_no_nodes() {
        let mut store = ParamStore::<f64>::new();
        let w1 = store.add("a.weight", Array::full(&[3, 4], 0.5), false);
        let w2 = store.add("b.weight", Array::full(&[2, 3], 0.25), true);
        let mut tape = Tape::new();
        let x = tape.constant(Array::full(&[5, 4], 1.0));
        let p1 = tape.param(&store, w1);
        let h = ops::linear::linear(&mut tape, x, p1, None).unwrap();
        let h = ops::activation::silu(&mut tape, h);
        assert_eq!(tape.num_nodes(), 0, "nothing upstream of the frozen layer needs a gradient");
        let p2 = tape.param(&store, w2);
        let y = ops::linear::linear(&mut tape, h, p2, None).unwrap();
        let loss = ops::reduce::sum(&mut tape, y);
        assert_eq!(tape.node_names(), vec!["linear", "sum"]);
        tape.backward(loss, &mut store).unwrap();
        assert!(store.get(w1).grad.is_none());
        assert!(store.get(w2).grad.is_some());
    }

    #[test]
    fn inference_records_nothing() {
        let mut store = ParamStore::<f64>::new();
        let w = store.add("w", Array::full(&[2, 2], 1.0), true);
        let mut tape = Tape::inference();
        let x = tape.constant(Array::full(&[1, 2], 1.0));
        let p = tape.param(&store, w);
        let y = ops::linear::linear(&mut tape, x, p, None).unwrap();
        assert_eq!(tape.value(y).data, vec![2.0, 2.0]);
        assert_eq!(tape.num_nodes(), 0);
        assert!(!tape.requires_grad(y));
    }
}
