//! Tape autograd.
//!
//! The forward pass records one [`Node`] per op on a [`Tape`]; [`Tape::backward`] replays the nodes in reverse and
//! accumulates each trainable parameter's gradient into its slot of the [`ParamStore`]'s flat gradient buffer (or,
//! on the CUDA backend, of the device's). Tape, nodes and model are generic over a [`crate::backend::Backend`].
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

use crate::backend::{Backend, Cpu, Want};
use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use std::sync::Arc;

/// A value on a tape (an index into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// What a backward function sees: the node's input and output values, what each input needs, and the backend.
pub struct BackwardCtx<'a, B: Backend> {
    pub inputs: Vec<&'a B::Tensor>,
    pub output: &'a B::Tensor,
    /// Whether each input needs a gradient.
    pub needs: Vec<bool>,
    /// The same, naming the parameter an input reads (its gradient may go straight to the parameter's slot).
    pub want: Vec<Want>,
    pub backend: &'a mut B,
}

/// The backward of one recorded op. It returns one entry per input: `Some(grad)` where the input needs one, else
/// `None` — also `None` for a parameter whose gradient the backend already added to its slot (`Want::Param`).
pub trait Backward<B: Backend>: Send + Sync {
    /// Op name, for error messages and debugging.
    fn name(&self) -> &'static str;
    fn backward(&self, ctx: &mut BackwardCtx<'_, B>, grad_out: &B::Tensor) -> Result<Vec<Option<B::Tensor>>>;
}

struct Node<B: Backend> {
    inputs: Vec<Var>,
    output: Var,
    op: Box<dyn Backward<B>>,
}

/// The record of a forward pass on backend `B` (the CPU reference computing in `T` unless said otherwise).
pub struct Tape<T: Float, B: Backend<Host = T> = Cpu<T>> {
    backend: B,
    values: Vec<B::Tensor>,
    requires_grad: Vec<bool>,
    /// The parameter a var reads, if any: where its gradient goes.
    param_of: Vec<Option<ParamId>>,
    nodes: Vec<Node<B>>,
    record: bool,
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Float> Tape<T> {
    /// A recording tape on the CPU reference (training).
    pub fn new() -> Self {
        Self::on(Cpu::default())
    }

    /// A CPU tape that records nothing (inference): no node, no gradient, values only.
    pub fn inference() -> Self {
        Self::inference_on(Cpu::default())
    }

    /// A value that needs no gradient (input images, targets, masks).
    pub fn constant(&mut self, a: Array<T>) -> Var {
        self.input(Arc::new(a))
    }

    /// A leaf whose gradient is wanted but which is no parameter (gradient checks read it with
    /// [`Gradients::get`]).
    pub fn leaf(&mut self, a: Array<T>) -> Var {
        let rg = self.record;
        self.push_value(Arc::new(a), rg, None)
    }

    /// Backward from any output with an explicit output gradient. Parameter gradients are accumulated into the
    /// store; the gradients of non-parameter leaves are returned.
    pub fn backward_with(&mut self, out: Var, seed: Array<T>, store: &mut ParamStore<T>) -> Result<Gradients<T>> {
        if seed.shape != self.values[out.0].shape {
            bail!("output gradient shape {:?} differs from the output's {:?}", seed.shape, self.values[out.0].shape);
        }
        self.run_backward(out, Arc::new(seed), store)
    }
}

impl<T: Float, B: Backend<Host = T>> Tape<T, B> {
    /// A recording tape on `backend`.
    pub fn on(backend: B) -> Self {
        Self {
            backend,
            values: Vec::new(),
            requires_grad: Vec::new(),
            param_of: Vec::new(),
            nodes: Vec::new(),
            record: true,
        }
    }

    /// A tape on `backend` that records nothing.
    pub fn inference_on(backend: B) -> Self {
        Self { record: false, ..Self::on(backend) }
    }

    /// The backend the tape computes on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Ends the tape, handing back its backend (the CUDA backend's recorded program).
    pub fn into_backend(self) -> B {
        self.backend
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

    fn push_value(&mut self, a: B::Tensor, requires_grad: bool, param: Option<ParamId>) -> Var {
        self.values.push(a);
        self.requires_grad.push(requires_grad);
        self.param_of.push(param);
        Var(self.values.len() - 1)
    }

    /// A backend value that needs no gradient.
    pub fn input(&mut self, t: B::Tensor) -> Var {
        self.push_value(t, false, None)
    }

    /// Reads a parameter onto the tape as a handle (no copy). It needs a gradient only if it is trainable and the
    /// tape records.
    pub fn param(&mut self, store: &ParamStore<T>, id: ParamId) -> Result<Var> {
        let rg = self.record && store.get(id).trainable;
        let t = self.backend.param(store, id)?;
        Ok(self.push_value(t, rg, Some(id)))
    }

    pub fn value(&self, v: Var) -> &B::Tensor {
        &self.values[v.0]
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        B::shape(&self.values[v.0])
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.requires_grad[v.0]
    }

    /// The backend and the values of `vars`, borrowed together (what an op's forward needs).
    pub fn split(&mut self, vars: &[Var]) -> (&mut B, Vec<&B::Tensor>) {
        (&mut self.backend, vars.iter().map(|v| &self.values[v.0]).collect())
    }

    /// Adds an op's output. The op is recorded only if the tape records and some input needs a gradient.
    pub fn push_op(&mut self, inputs: &[Var], output: B::Tensor, op: Box<dyn Backward<B>>) -> Var {
        let rg = self.record && inputs.iter().any(|v| self.requires_grad[v.0]);
        let out = self.push_value(output, rg, None);
        if rg {
            self.nodes.push(Node { inputs: inputs.to_vec(), output: out, op });
        }
        out
    }

    /// Backward from a scalar: seeds d(loss)/d(loss) = 1.
    pub fn backward(&mut self, loss: Var, store: &mut ParamStore<T>) -> Result<Gradients<T, B>> {
        let shape = B::shape(&self.values[loss.0]).to_vec();
        if shape.iter().product::<usize>() != 1 {
            bail!("backward needs a scalar loss, got shape {shape:?}");
        }
        let seed = self.backend.full(&shape, 1.0)?;
        self.run_backward(loss, seed, store)
    }

    fn run_backward(&mut self, out: Var, seed: B::Tensor, store: &mut ParamStore<T>) -> Result<Gradients<T, B>> {
        let mut grads: Vec<Option<B::Tensor>> = (0..self.values.len()).map(|_| None).collect();
        if !self.requires_grad[out.0] {
            return Ok(Gradients { grads });
        }
        grads[out.0] = Some(seed);
        for node in self.nodes.iter().rev() {
            let Some(g) = grads[node.output.0].take() else { continue };
            let needs: Vec<bool> = node.inputs.iter().map(|v| self.requires_grad[v.0]).collect();
            let want = node
                .inputs
                .iter()
                .zip(&needs)
                .map(|(v, &need)| match (need, self.param_of[v.0]) {
                    (false, _) => Want::No,
                    (true, Some(id)) => Want::Param(id),
                    (true, None) => Want::Value,
                })
                .collect();
            let mut ctx = BackwardCtx {
                inputs: node.inputs.iter().map(|v| &self.values[v.0]).collect(),
                output: &self.values[node.output.0],
                needs: needs.clone(),
                want,
                backend: &mut self.backend,
            };
            let in_grads = node.op.backward(&mut ctx, &g)?;
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
                if B::shape(&gi) != B::shape(&self.values[v.0]) {
                    bail!(
                        "backward of {} gave a gradient of shape {:?} for an input of shape {:?}",
                        node.op.name(),
                        B::shape(&gi),
                        B::shape(&self.values[v.0])
                    );
                }
                match &mut grads[v.0] {
                    Some(acc) => self.backend.accumulate(acc, gi)?,
                    slot => *slot = Some(gi),
                }
            }
        }
        // Parameter gradients go into their slots; everything else is handed back.
        for (i, g) in grads.iter_mut().enumerate() {
            if let Some(id) = self.param_of[i]
                && let Some(gv) = g.take()
            {
                self.backend.accumulate_param_grad(store, id, gv)?;
            }
        }
        Ok(Gradients { grads })
    }
}

/// Gradients of the non-parameter leaves of a backward pass.
pub struct Gradients<T: Float, B: Backend<Host = T> = Cpu<T>> {
    grads: Vec<Option<B::Tensor>>,
}

impl<T: Float, B: Backend<Host = T>> Gradients<T, B> {
    /// The gradient of a leaf created with [`Tape::leaf`], if backward reached it.
    pub fn get(&self, v: Var) -> Option<&B::Tensor> {
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
        let p1 = tape.param(&store, w1).unwrap();
        let h = ops::linear::linear(&mut tape, x, p1, None).unwrap();
        let h = ops::activation::silu(&mut tape, h).unwrap();
        assert_eq!(tape.num_nodes(), 0, "nothing upstream of the frozen layer needs a gradient");
        let p2 = tape.param(&store, w2).unwrap();
        let y = ops::linear::linear(&mut tape, h, p2, None).unwrap();
        let loss = ops::reduce::sum(&mut tape, y);
        assert_eq!(tape.node_names(), vec!["linear", "sum"]);
        tape.backward(loss, &mut store).unwrap();
        assert!(store.grad(w1).is_none());
        assert!(store.grad(w2).is_some());
    }

    #[test]
    fn inference_records_nothing() {
        let mut store = ParamStore::<f64>::new();
        let w = store.add("w", Array::full(&[2, 2], 1.0), true);
        let mut tape = Tape::inference();
        let x = tape.constant(Array::full(&[1, 2], 1.0));
        let p = tape.param(&store, w).unwrap();
        let y = ops::linear::linear(&mut tape, x, p, None).unwrap();
        assert_eq!(tape.value(y).data, vec![2.0, 2.0]);
        assert_eq!(tape.num_nodes(), 0);
        assert!(!tape.requires_grad(y));
    }
}
