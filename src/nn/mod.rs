//! Layers and the EfficientNet model, with torchvision's parameter and buffer names.
//!
//! A layer holds [`ParamId`]s into the model's [`ParamStore`] and, for batch norm, its running statistics. The
//! forward functions record ops on a [`Tape`]; a [`Ctx`] says whether the model trains and how batch norm,
//! dropout and stochastic depth behave.

pub mod efficientnet;
pub mod init;
pub mod summary;

use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::backend::{Backend, BnStats, MaskKind, MaskSource, mask_key};
use crate::ops::activation::Act;
use crate::ops::batchnorm::{self, BnCfg, BnMode, BnState};
use crate::ops::conv::{self, ConvCfg};
use crate::ops::dropout;
use crate::ops::linear;
use crate::tensor::{Array, Float};
use anyhow::Result;
use rand_pcg::Pcg64;

pub use efficientnet::{EfficientNet, HeadKind, ModelConfig, Variant};

/// How one forward pass behaves.
pub struct Ctx<'a> {
    /// Training mode (batch statistics in BN, dropout and stochastic depth when enabled below).
    pub train: bool,
    /// Apply dropout in training (off for `derma forward --mode train`, which compares against PyTorch).
    pub dropout: bool,
    /// Apply stochastic depth in training.
    pub stochastic_depth: bool,
    /// In training, batch norm of frozen feature blocks normalizes with and keeps its running statistics
    /// (derma's default). When false, it uses batch statistics and updates them, as PyTorch's train mode does.
    pub frozen_bn_eval: bool,
    /// Randomness for dropout and stochastic-depth masks drawn on the host (the CPU trainer's).
    pub rng: &'a mut Pcg64,
    /// When set, masks follow the counter rule instead, keyed by (seed, epoch, step, layer): what the device
    /// kernels draw, so a CPU and a CUDA run of one step use the same masks.
    pub counter_masks: Option<CounterMasks>,
    /// Masks drawn so far in this forward pass (the layer part of a counter key).
    pub masks_drawn: u64,
}

/// The step a counter-rule mask belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterMasks {
    pub seed: u64,
    pub epoch: u64,
    pub step: u64,
}

impl<'a> Ctx<'a> {
    /// Inference: no batch statistics, no dropout, no stochastic depth.
    pub fn eval(rng: &'a mut Pcg64) -> Self {
        Self {
            train: false,
            dropout: false,
            stochastic_depth: false,
            frozen_bn_eval: true,
            rng,
            counter_masks: None,
            masks_drawn: 0,
        }
    }

    /// Training with the trainer's defaults (dropout, stochastic depth, frozen blocks' BN in eval), host masks.
    pub fn train(rng: &'a mut Pcg64) -> Self {
        Self { train: true, dropout: true, stochastic_depth: true, ..Self::eval(rng) }
    }

    /// Where the next mask comes from.
    pub fn mask_source(&mut self) -> MaskSource<'_> {
        let layer = self.masks_drawn;
        self.masks_drawn += 1;
        match self.counter_masks {
            Some(c) => MaskSource::Counter { key: mask_key(c.seed, c.epoch, c.step, layer), layer },
            None => MaskSource::Host(self.rng),
        }
    }

    /// The batch-norm mode for a layer inside a block that is `frozen` or not.
    pub fn bn_mode(&self, frozen: bool) -> BnMode {
        if !self.train || (frozen && self.frozen_bn_eval) {
            BnMode::Eval
        } else {
            BnMode::Train { update_running: true }
        }
    }
}

/// How a parameter's internal layout maps to PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same shape and order as PyTorch.
    Same,
    /// A conv weight: OHWI inside, OIHW in PyTorch.
    ConvOhwi,
    /// A 1×1 conv used as a linear layer (squeeze-excite): `[O, I]` inside, `[O, I, 1, 1]` in PyTorch.
    Conv1x1AsLinear,
}

/// A convolution (no bias unless given).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: ParamId,
    pub cfg: ConvCfg,
}

impl Conv2d {
    pub fn forward<T: Float, B: Backend<Host = T>>(
        &self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
    ) -> Result<Var> {
        let w = tape.param(store, self.weight)?;
        conv::conv2d(tape, x, w, None, self.cfg)
    }
}

/// Batch norm over the last dimension, with its running statistics.
#[derive(Clone, Debug)]
pub struct BatchNorm<T> {
    pub weight: ParamId,
    pub bias: ParamId,
    pub state: BnState<T>,
    pub cfg: BnCfg,
    /// Position in the model's batch-norm order (how a device backend finds its copy of the statistics).
    pub index: usize,
}

impl<T: Float> BatchNorm<T> {
    pub fn forward<B: Backend<Host = T>>(
        &mut self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
        mode: BnMode,
        act: Option<Act>,
    ) -> Result<Var> {
        let g = tape.param(store, self.weight)?;
        let b = tape.param(store, self.bias)?;
        let stats = BnStats { index: self.index, state: &mut self.state };
        batchnorm::batch_norm(tape, x, g, b, stats, mode, self.cfg, act)
    }
}

/// A linear layer with bias.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: ParamId,
}

impl Linear {
    pub fn forward<T: Float, B: Backend<Host = T>>(
        &self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
    ) -> Result<Var> {
        let w = tape.param(store, self.weight)?;
        let b = tape.param(store, self.bias)?;
        linear::linear(tape, x, w, Some(b))
    }
}

/// Dropout in training when enabled, identity otherwise.
pub fn maybe_dropout<T: Float, B: Backend<Host = T>>(
    tape: &mut Tape<T, B>,
    ctx: &mut Ctx<'_>,
    x: Var,
    p: f64,
) -> Result<Var> {
    if ctx.train && ctx.dropout && p > 0.0 {
        let source = ctx.mask_source();
        dropout::drop(tape, MaskKind::Element, x, p, source)
    } else {
        Ok(x)
    }
}

/// Where layers register their parameters: the store and, alongside, each parameter's PyTorch layout.
pub struct Registry<'a, T> {
    pub store: &'a mut ParamStore<T>,
    pub layouts: &'a mut Vec<Layout>,
}

impl<T: Float> Registry<'_, T> {
    pub fn add(&mut self, name: &str, value: Array<T>, layout: Layout) -> ParamId {
        let id = self.store.add(name, value, true);
        self.layouts.push(layout);
        id
    }
}
