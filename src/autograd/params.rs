//! Parameters: named values with a trainable flag and, only while trainable, a gradient buffer.

use crate::tensor::{Array, Float};
use anyhow::{Result, bail};
use std::collections::HashMap;

/// Index of a parameter in its [`ParamStore`].
pub type ParamId = usize;

/// One learnable tensor.
#[derive(Clone, Debug)]
pub struct Param<T> {
    /// torchvision-style name, e.g. `features.1.0.block.0.0.weight`.
    pub name: String,
    pub value: Array<T>,
    pub trainable: bool,
    /// Accumulated gradient; `None` until a backward pass reaches it, and always `None` when frozen.
    pub grad: Option<Array<T>>,
}

/// The parameters of a model, in creation order, addressable by id or name.
#[derive(Clone, Debug, Default)]
pub struct ParamStore<T> {
    params: Vec<Param<T>>,
    by_name: HashMap<String, ParamId>,
}

impl<T: Float> ParamStore<T> {
    pub fn new() -> Self {
        Self { params: Vec::new(), by_name: HashMap::new() }
    }

    /// Adds a parameter; names must be unique (a duplicate is a programming error in the model definition).
    pub fn add(&mut self, name: &str, value: Array<T>, trainable: bool) -> ParamId {
        assert!(!self.by_name.contains_key(name), "duplicate parameter name {name}");
        let id = self.params.len();
        self.params.push(Param { name: name.to_string(), value, trainable, grad: None });
        self.by_name.insert(name.to_string(), id);
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

    /// Freezes or unfreezes; freezing drops the gradient buffer.
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        let p = &mut self.params[id];
        p.trainable = trainable;
        if !trainable {
            p.grad = None;
        }
    }

    /// Clears every gradient (buffers are kept for reuse, filled with zeros).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            if let Some(g) = &mut p.grad {
                g.data.iter_mut().for_each(|v| *v = T::zero());
            }
        }
    }

    /// Total element count, and the trainable part of it.
    pub fn counts(&self) -> (usize, usize) {
        let total = self.params.iter().map(|p| p.value.numel()).sum();
        let trainable = self.params.iter().filter(|p| p.trainable).map(|p| p.value.numel()).sum();
        (total, trainable)
    }

    pub(crate) fn accumulate_grad(&mut self, id: ParamId, g: &Array<T>) -> Result<()> {
        let Some(p) = self.params.get_mut(id) else {
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
        match &mut p.grad {
            Some(acc) => acc.data.iter_mut().zip(&g.data).for_each(|(a, &b)| *a += b),
            None => p.grad = Some(g.clone()),
        }
        Ok(())
    }
}
