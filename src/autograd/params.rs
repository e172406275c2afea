//! Parameters: named values with a trainable flag, and one flat gradient buffer with a slot per trainable parameter.
//!
//! A value is an `Arc<Array<T>>`: a tape reads a parameter by sharing it, never by copying it, and a write after
//! the tape is gone ([`Param::value_mut`]) finds the storage unshared. Gradients live in one buffer laid out in
//! parameter order over the trainable parameters only, so a frozen parameter has no slot at all.

use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Index of a parameter in its [`ParamStore`].
pub type ParamId = usize;

/// One learnable tensor.
#[derive(Clone, Debug)]
pub struct Param<T> {
    /// torchvision-style name, e.g. `features.1.0.block.0.0.weight`.
    pub name: String,
    pub value: Arc<Array<T>>,
    pub trainable: bool,
}

impl<T: Float> Param<T> {
    /// The value for writing (an optimizer step, a weight load); copies only if a live tape still shares it.
    pub fn value_mut(&mut self) -> &mut Array<T> {
        Arc::make_mut(&mut self.value)
    }
}

/// The flat gradient buffer: one slot per trainable parameter, in parameter order.
#[derive(Clone, Debug, Default)]
struct GradBuffer<T> {
    data: Vec<T>,
    /// Slot of each parameter (`None` for frozen ones).
    slots: Vec<Option<Range<usize>>>,
    /// Whether a backward pass reached the slot since the last clear.
    reached: Vec<bool>,
}

/// The parameters of a model, in creation order, addressable by id or name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore<T> {
    params: Vec<Param<T>>,
    by_name: HashMap<String, ParamId>,
    grads: GradBuffer<T>,
}

impl<T: Float> ParamStore<T> {
    pub fn new() -> Self {
        Self { params: Vec::new(), by_name: HashMap::new(), grads: GradBuffer::default() }
    }

    /// Adds a parameter; names must be unique (a duplicate is a programming error in the model definition).
    pub fn add(&mut self, name: &str, value: Array<T>, trainable: bool) -> ParamId {
        assert!(!self.by_name.contains_key(name), "duplicate parameter name {name}");
        let id = self.params.len();
        self.params.push(Param { name: name.to_string(), value: Arc::new(value), trainable });
        self.by_name.insert(name.to_string(), id);
        self.drop_grads();
        id
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    pub fn get(&self, id: ParamId) -> &Param<T> {
        &self.params[id]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut Param<T> {
        &mut self.params[id]
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param<T>> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param<T>> {
        self.params.iter_mut()
    }

    /// Freezes or unfreezes; the gradient buffer is laid out anew on the next backward pass.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        if self.params[id].trainable != trainable {
            self.params[id].trainable = trainable;
            self.drop_grads();
        }
    }

    /// Total element count, and the trainable part of it.
    pub fn counts(&self) -> (usize, usize) {
        let total = self.params.iter().map(|p| p.value.numel()).sum();
        let trainable = self.params.iter().filter(|p| p.trainable).map(|p| p.value.numel()).sum();
        (total, trainable)
    }

    /// The gradient accumulated for a parameter since the last [`ParamStore::zero_grad`], if backward reached it
    /// (never for a frozen parameter).
    pub fn grad(&self, id: ParamId) -> Option<&[T]> {
        let slot = self.grads.slots.get(id)?.as_ref()?;
        self.grads.reached[id].then(|| &self.grads.data[slot.clone()])
    }

    /// Every reached gradient with its parameter, mutably (unscaling, clipping), in parameter order.
    pub fn grads_mut(&mut self) -> impl Iterator<Item = (&Param<T>, &mut [T])> {
        // Slots are contiguous in parameter order, so the buffer splits into them front to back.
        let mut rest: &mut [T] = &mut self.grads.data;
        let mut out = Vec::new();
        for (id, slot) in self.grads.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            let (g, tail) = std::mem::take(&mut rest).split_at_mut(slot.len());
            rest = tail;
            if self.grads.reached[id] {
                out.push((&self.params[id], g));
            }
        }
        out.into_iter()
    }

    /// Every reached gradient with its parameter, for an optimizer step that writes the values.
    pub fn params_and_grads_mut(&mut self) -> impl Iterator<Item = (&mut Param<T>, &[T])> {
        let grads = &self.grads;
        self.params.iter_mut().enumerate().filter_map(move |(id, p)| {
            let slot = grads.slots.get(id)?.as_ref()?;
            grads.reached[id].then(|| (p, &grads.data[slot.clone()]))
        })
    }

    /// The whole flat buffer (trainable parameters in order; unreached slots hold zeros).
    pub fn grad_buffer(&self) -> &[T] {
        &self.grads.data
    }

    /// Clears every gradient: the buffer is kept, filled with zeros, and no slot counts as reached.
    pub fn zero_grad(&mut self) {
        self.grads.data.iter_mut().for_each(|v| *v = T::zero());
        self.grads.reached.iter_mut().for_each(|r| *r = false);
    }

    /// Forgets the buffer's layout (after a parameter is added or its trainable flag changes).
    fn drop_grads(&mut self) {
        self.grads = GradBuffer::default();
    }

    /// Lays out the buffer for the current trainable set, zeroed.
    fn layout_grads(&mut self) {
        let mut next = 0;
        let slots: Vec<Option<Range<usize>>> = self
            .params
            .iter()
            .map(|p| {
                p.trainable.then(|| {
                    let r = next..next + p.value.numel();
                    next = r.end;
                    r
                })
            })
            .collect();
        self.grads = GradBuffer { data: vec![T::zero(); next], reached: vec![false; slots.len()], slots };
    }

    /// Adds `g` into the parameter's slot (a frozen parameter ignores it).
    pub(crate) fn accumulate_grad(&mut self, id: ParamId, g: &Array<T>) -> Result<()> {
        let Some(p) = self.params.get(id) else {
            bail!(
                "a gradient for parameter #{id} reached a store of {} parameters: tape and store differ",
                self.params.len()
            );
        };
        if !p.trainable {
            return Ok(());
        }
        if g.shape != p.value.shape {
            bail!("gradient of {} has shape {:?}, the parameter {:?}", p.name, g.shape, p.value.shape);
        }
        if self.grads.slots.len() != self.params.len() {
            self.layout_grads();
        }
        let Some(slot) = self.grads.slots[id].clone() else {
            bail!("parameter {} is trainable but has no gradient slot: the buffer is stale", self.params[id].name);
        };
        let dst = &mut self.grads.data[slot];
        if self.grads.reached[id] {
            dst.iter_mut().zip(&g.data).for_each(|(a, &b)| *a += b);
        } else {
            // The first gradient is stored as it is (a copy, as the per-parameter buffers did), so -0.0 survives.
            dst.copy_from_slice(&g.data);
            self.grads.reached[id] = true;
        }
        Ok(())
    }
}
