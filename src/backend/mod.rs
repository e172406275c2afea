//! Backends: where a tape's values live and how each op family computes on them.
//!
//! The model ([`crate::nn::EfficientNet`]) and the tape ([`crate::autograd::Tape`]) are written once, generic over
//! a [`Backend`]; each op's tape node calls one method of it forward and one backward. Three backends exist:
//!
//! - **The CPU reference** ([`Cpu<T>`], the default backend of `Tape<T>`): host arrays and the reference functions
//!   in `src/ops` (plain loops, f64 accumulation), bitwise what they computed before backends existed.
//! - **The CUDA backend** (`crate::backend::cuda`), which computes nothing while the model runs: every method
//!   records launches over virtual buffers into a step program that a planner lays out in one arena and that runs
//!   eagerly or is captured as a CUDA graph.
//! - **The f16 storage reference** ([`F16Ref<T>`]): the CPU reference rounding to f16 exactly where the CUDA
//!   backend's f16 program stores f16, the yardstick of the f16 device path.
//!
//! Values are handles: a CPU tensor is a shared array (a parameter is read without a copy), a CUDA tensor names a
//! buffer of the program. Backward methods are told, per input, whether its gradient is wanted and whether it is a
//! parameter's ([`Want`]); a backend may write a parameter's gradient straight into that parameter's slot of the
//! flat gradient buffer and return `None` for it.

use crate::autograd::{ParamId, ParamStore};
use crate::cuda::mix64;
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode, BnState};
use crate::ops::conv::ConvGeom;
use crate::ops::loss::LossKind;
use crate::tensor::Float;
use anyhow::Result;
use rand_pcg::Pcg64;

mod cpu;
pub mod cuda;
mod f16ref;
pub use cpu::{Cpu, CpuBnSaved, CpuMask};
pub use f16ref::{F16Ref, round_f16, rounded};

/// What a backward method must produce for one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Nothing: the input needs no gradient (a constant, a frozen parameter).
    No,
    /// The gradient, returned as a tensor.
    Value,
    /// The gradient of this parameter: returned as a tensor, or added into the parameter's gradient slot by the
    /// backend (then the method returns `None` for it).
    Param(ParamId),
}

impl Want {
    pub fn any(self) -> bool {
        self != Want::No
    }
}

/// Which elements share one mask value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Dropout: one value per element.
    Element,
    /// Stochastic depth in row mode: one value per sample (dimension 0).
    Row,
}

/// Where a dropout or stochastic-depth mask comes from.
pub enum MaskSource<'a> {
    /// Drawn from a host generator, one `f64` per mask value in order (the CPU trainer's masks).
    Host(&'a mut Pcg64),
    /// A pure function of a 64-bit key and the value's index ([`counter_keep`]): what the device kernels
    /// compute, and what the CPU computes identically, so both backends draw the same masks.
    /// `layer`: the mask's index in the forward pass (a replayed step recomputes `key` on the device from it).
    Counter { key: u64, layer: u64 },
}

/// The counter key of one mask: distinct for every (seed, epoch, step, layer).
pub fn mask_key(seed: u64, epoch: u64, step: u64, layer: u64) -> u64 {
    let mut z = seed;
    for part in [epoch, step, layer] {
        z = mix64(z ^ mix64(part.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    }
    z
}

/// Whether mask value `index` of key `key` is kept with drop probability `p`: the device kernels' rule
/// (`uniform01(key, index) >= p`, kernels/common.cuh), bit for bit.
pub fn counter_keep(key: u64, index: u64, p: f64) -> bool {
    crate::cuda::uniform01(key, index) >= p as f32
}

/// A batch-norm layer's running statistics, as a backend sees them: the host copy (what the CPU reference updates
/// and what checkpoints hold) and the layer's index in the model's batch-norm order (how the CUDA backend finds its
/// device copy).
pub struct BnStats<'a, H> {
    pub index: usize,
    pub state: &'a mut BnState<H>,
}

/// A lone layer's statistics (index 0): what the op-level tests pass.
impl<'a, H> From<&'a mut BnState<H>> for BnStats<'a, H> {
    fn from(state: &'a mut BnState<H>) -> Self {
        Self { index: 0, state }
    }
}

/// One method per op family, forward and backward, plus parameter access, gradient slots and the backward seed.
///
/// Shapes are validated by the tape nodes before a method is called (the geometry structs carry them), so methods
/// may assume consistent inputs. Layouts: activations NHWC, convolution weights OHWI, linear weights `[out, in]`.
pub trait Backend: Sized + 'static {
    /// Element type of host values: parameters in the [`ParamStore`], batch-norm running statistics.
    type Host: Float;
    /// A value on the tape: a handle, cheap to clone.
    type Tensor: Clone + Send + Sync;
    /// What batch norm keeps for backward (the statistics it normalized with).
    type BnSaved: Send + Sync;
    /// A dropout or stochastic-depth mask.
    type Mask: Send + Sync;
    /// What the loss keeps for backward.
    type LossSaved: Send + Sync;

    /// The shape of a value.
    fn shape(t: &Self::Tensor) -> &[usize];

    // --- values and gradients ---

    /// Reads a parameter: a handle to its value, never a copy.
    fn param(&mut self, store: &ParamStore<Self::Host>, id: ParamId) -> Result<Self::Tensor>;
    /// A tensor filled with one value (the seed of backward).
    fn full(&mut self, shape: &[usize], value: f64) -> Result<Self::Tensor>;
    /// `acc += g` (two gradients reaching one value).
    fn accumulate(&mut self, acc: &mut Self::Tensor, g: Self::Tensor) -> Result<()>;
    /// Adds a parameter's gradient into its slot of the flat gradient buffer (the CPU backend's lives in the
    /// store, the CUDA backend's on the device).
    fn accumulate_param_grad(&mut self, store: &mut ParamStore<Self::Host>, id: ParamId, g: Self::Tensor)
    -> Result<()>;

    // --- op families ---

    /// Convolution, NHWC × OHWI, optional bias `[Cout]`.
    fn conv2d(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// Gradients of (x, w, bias).
    fn conv2d_backward(
        &mut self,
        g: &ConvGeom,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]>;

    /// `y[N,O] = x[N,I]·wᵀ + b`.
    fn linear(&mut self, x: &Self::Tensor, w: &Self::Tensor, b: Option<&Self::Tensor>) -> Result<Self::Tensor>;
    /// Gradients of (x, w, b).
    fn linear_backward(
        &mut self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]>;

    /// Batch norm over the last dimension, then `act`; updates the running statistics in training mode.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm(
        &mut self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        stats: BnStats<'_, Self::Host>,
        mode: BnMode,
        cfg: BnCfg,
        act: Option<Act>,
    ) -> Result<(Self::Tensor, Self::BnSaved)>;
    /// Gradients of (x, gamma, beta).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &mut self,
        saved: &Self::BnSaved,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        dy: &Self::Tensor,
        act: Option<Act>,
        want: [Want; 3],
    ) -> Result<[Option<Self::Tensor>; 3]>;

    /// An elementwise activation.
    fn activation(&mut self, act: Act, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Its input gradient (`x` the input, `y` the output: sigmoid's derivative reads either).
    fn activation_backward(
        &mut self,
        act: Act,
        x: &Self::Tensor,
        y: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// `a + b`, same shapes (the residual).
    fn add(&mut self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Squeeze-excite's scaling `y[n,h,w,c] = x[n,h,w,c]·s[n,c]`.
    fn channel_scale(&mut self, x: &Self::Tensor, s: &Self::Tensor) -> Result<Self::Tensor>;
    /// Gradients of (x, s).
    fn channel_scale_backward(
        &mut self,
        x: &Self::Tensor,
        s: &Self::Tensor,
        dy: &Self::Tensor,
        want: [Want; 2],
    ) -> Result<[Option<Self::Tensor>; 2]>;

    /// Global average pooling `[N,H,W,C]` → `[N,C]`.
    fn global_avg_pool(&mut self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Its input gradient, for an input of shape `x_shape`.
    fn global_avg_pool_backward(&mut self, x_shape: &[usize], dy: &Self::Tensor) -> Result<Self::Tensor>;

    /// Draws a mask for `x`: keep with probability `1 − p`, kept values scaled by `1/(1 − p)`.
    fn draw_mask(&mut self, kind: MaskKind, x_shape: &[usize], p: f64, source: MaskSource<'_>) -> Result<Self::Mask>;
    /// `x · mask` (forward, and backward on the output gradient).
    fn apply_mask(&mut self, x: &Self::Tensor, mask: &Self::Mask) -> Result<Self::Tensor>;

    /// The mean loss of logits `[N,C]` (a scalar tensor) and what its backward needs. `targets` and `weights` are
    /// host values (the CUDA backend uploads them).
    fn loss(
        &mut self,
        logits: &Self::Tensor,
        targets: &[usize],
        weights: Option<&[Self::Host]>,
        kind: &LossKind,
    ) -> Result<(Self::Tensor, Self::LossSaved)>;
    /// The logits' gradient for the scalar output gradient `dy`.
    fn loss_backward(
        &mut self,
        saved: &Self::LossSaved,
        logits: &Self::Tensor,
        dy: &Self::Tensor,
    ) -> Result<Self::Tensor>;
}
