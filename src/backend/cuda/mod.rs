//! The CUDA backend: the model's forward and backward recorded as a step [`Program`] of launches over virtual
//! buffers, planned into one arena and run eagerly on a [`Gpu`] (a real one or the emulated device).
//!
//! Nothing computes while the model runs. Each [`Backend`] method allocates the buffers of its outputs (transient:
//! placed by the planner from their live range) and pushes one step per kernel-wrapper call, naming every buffer
//! the launch reads and writes and the bytes it moves. [`Cuda::run`] plans the program, allocates the arena and
//! executes it; results are read back with [`Cuda::download`], [`Cuda::grad`] and [`Cuda::bn_stats`].
//!
//! Device state, bound as persistent buffers:
//! - the f32 masters of every parameter (one block, one region per parameter, in parameter order), and for the f16
//!   path an f16 mirror of that block refreshed by one cast launch at the program's start;
//! - the flat f32 gradient buffer: one slot per trainable parameter, in parameter order (frozen ones have none),
//!   zeroed at the program's start. A parameter is read at most once per program, so a backward writes its weight
//!   gradient straight into the slot and hands the tape nothing for it;
//! - every batch norm's running mean and variance (updated by the training-mode statistics kernel);
//! - uploaded inputs, targets and class weights.
//!
//! Activations are NHWC in the precision's storage type (f32, or f16 with f32 accumulation); batch-norm statistics,
//! the loss and every gradient of a parameter are f32.
//!
//! Each op family's recording code lives with the family, as `src/ops/<family>/record.rs` beside its tape node,
//! CPU reference, launches and check; the files are children of this module (so they reach the backend's
//! internals, which stay private to it) through `#[path]`. `gemm.rs` here is the GEMM recording that conv and
//! linear share.

#[path = "../../ops/batchnorm/record.rs"]
mod batchnorm;
#[path = "../../ops/conv/record.rs"]
mod conv;
#[path = "../../ops/dropout/record.rs"]
mod dropout;
#[path = "../../ops/elementwise/record.rs"]
mod elementwise;
mod gemm;
#[path = "../../ops/linear/record.rs"]
mod linear;
#[path = "../../ops/loss/record.rs"]
mod loss;
#[path = "../../ops/pool/record.rs"]
mod pool;
#[path = "../../ops/scale/record.rs"]
mod scale;

use super::{Backend, BnStats, MaskKind, MaskSource, Want};
use crate::autograd::{ParamId, ParamStore};
use crate::cuda::Gpu;
use crate::cuda::alloc::Block;
use crate::cuda::blas::Blas;
use crate::cuda::dnn::Dnn;
use crate::cuda::kernels::DevSlice;
use crate::cuda::program::{Access, Bindings, Bound, BufId, Plan, Program};
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode, BnState};
use crate::ops::conv::ConvGeom;
use crate::ops::loss::LossKind;
use crate::tensor::Array;
use anyhow::{Context, Result, bail, ensure};
use std::sync::Arc;

pub use batchnorm::CudaBnSaved;
pub use dropout::CudaMask;
pub use loss::CudaLossSaved;

/// Storage precision of activations (and of the parameter copies GEMMs and cuDNN read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

/// Runs `$body` with `$T` the Rust element type of `$dt` (f32 or half::f16).
macro_rules! by_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            $crate::backend::cuda::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::backend::cuda::DType::F16 => {
                type $T = half::f16;
                $body
            }
        }
    };
}
pub(crate) use by_dtype;

/// A byte range of one program buffer: what a launch binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub buf: BufId,
    pub offset: usize,
    pub bytes: usize,
}

impl View {
    /// The range on the device, inside a running step.
    pub fn get<'b>(&self, b: &'b Bound<'_>) -> Result<DevSlice<'b>> {
        b.range(self.buf, self.offset, self.bytes)
    }

    /// This launch touches the whole view.
    pub fn all(&self) -> Access {
        Access { buf: self.buf, bytes: self.bytes }
    }
}

/// A value of the recorded program: a handle to (part of) a buffer, cheap to clone.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub view: View,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// The value every element holds, for tensors made by [`Backend::full`] (the backward seed).
    pub constant: Option<f64>,
    /// The parameter this tensor reads (its f32 master).
    pub param: Option<ParamId>,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn access(&self) -> Access {
        self.view.all()
    }
}

/// Where one parameter lives.
#[derive(Clone, Debug)]
struct ParamInfo {
    name: String,
    shape: Vec<usize>,
    /// Element offset in the master block (and in the f16 mirror).
    offset: usize,
    /// Element offset of its gradient slot, when trainable.
    slot: Option<usize>,
}

impl ParamInfo {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where one batch norm's running statistics live: element offsets of mean and variance in the statistics block.
#[derive(Clone, Copy, Debug)]
struct BnInfo {
    c: usize,
    mean: usize,
    var: usize,
}

/// Regions start at multiples of this many elements (256 bytes of f32), so every parameter and slot is as aligned
/// as a fresh allocation for the vector paths and cuBLASLt.
const REGION_ALIGN: usize = 64;

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

/// A persistent buffer the backend owns.
struct Owned {
    buf: BufId,
    block: Block,
}

/// What [`Cuda::run`] leaves behind: the plan and the arena the transient results are in (reused by every later
/// run of the same program, so the addresses never change).
struct Ran {
    plan: Plan,
    arena: Block,
}

/// The device state that outlives one recorded program: the f32 parameter masters and their f16 mirror, the flat
/// gradient buffer, the batch-norm running statistics, and the library handles (so cuDNN's algorithm choices and
/// cuBLASLt's workspace carry over). A training run records one program per unfreezing stage (and one for
/// evaluation) over the same state with [`Cuda::with_state`].
///
/// The gradient buffer has the masters' layout: parameter `i`'s slot is at its master's offset. The trainable
/// parameters are a suffix of the parameter order (freezing works by leading blocks), so a stage's gradients,
/// their unscaling and the optimizer cover one contiguous range of both.
pub struct DeviceState {
    gpu: Arc<Gpu>,
    blas: Arc<Blas>,
    dnn: Arc<Dnn>,
    precision: Precision,
    params: Vec<ParamInfo>,
    /// Elements of the master block (regions aligned, in parameter order).
    elems: usize,
    masters: Block,
    halves: Option<Block>,
    grads: Option<Block>,
    bn: Vec<BnInfo>,
    bn_block: Option<Block>,
}

impl DeviceState {
    /// Uploads the parameters of `store` (f32 masters, and an f16 mirror for `Precision::F16`, cast on the device)
    /// and the running statistics of `bn` (the model's batch norms, in their index order); `grads` allocates the
    /// gradient buffer (zeroed).
    pub fn new(
        gpu: Arc<Gpu>,
        store: &ParamStore<f32>,
        bn: &[&BnState<f32>],
        precision: Precision,
        grads: bool,
    ) -> Result<Self> {
        let blas = Arc::new(Blas::new(&gpu).context("creating the cuBLASLt handle")?);
        let dnn = Arc::new(Dnn::new_strict(&gpu).context("creating the cuDNN handle")?);
        let (mut params, mut elems) = (Vec::with_capacity(store.len()), 0);
        for p in store.iter() {
            let n = p.value.data.len();
            params.push(ParamInfo { name: p.name.clone(), shape: p.value.shape.clone(), offset: elems, slot: None });
            elems = align_up(elems + n, REGION_ALIGN);
        }
        let masters = gpu.zeros(elems.max(1) * 4).context("allocating the parameter masters")?;
        let halves = match precision {
            Precision::F32 => None,
            Precision::F16 => Some(gpu.zeros(elems.max(1) * 2).context("allocating the f16 parameter copies")?),
        };
        let grads = match grads && elems > 0 {
            true => Some(gpu.zeros(elems * 4).context("allocating the gradient buffer")?),
            false => None,
        };

        let (mut bn_info, mut bn_elems) = (Vec::with_capacity(bn.len()), 0);
        for s in bn {
            let c = s.running_mean.len();
            ensure!(s.running_var.len() == c, "batch norm running statistics of unequal lengths");
            let mean = bn_elems;
            let var = align_up(mean + c, REGION_ALIGN);
            bn_elems = align_up(var + c, REGION_ALIGN);
            bn_info.push(BnInfo { c, mean, var });
        }
        let bn_block = match bn_elems {
            0 => None,
            n => Some(gpu.zeros(n * 4).context("allocating the batch-norm running statistics")?),
        };
        let state = Self { gpu, blas, dnn, precision, params, elems, masters, halves, grads, bn: bn_info, bn_block };
        state.upload_params(store)?;
        state.upload_bn(bn)?;
        Ok(state)
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Elements of the master block (and of the gradient buffer): every parameter region, aligned.
    pub fn elems(&self) -> usize {
        self.elems
    }

    /// Element offset of parameter `id`'s master (and of its gradient slot) and its length.
    pub fn region(&self, id: ParamId) -> Result<(usize, usize)> {
        let p = self.params.get(id).with_context(|| format!("no parameter {id} on the device"))?;
        Ok((p.offset, p.numel()))
    }

    pub fn masters(&self) -> &Block {
        &self.masters
    }

    pub fn halves(&self) -> Option<&Block> {
        self.halves.as_ref()
    }

    pub fn grads(&self) -> Option<&Block> {
        self.grads.as_ref()
    }

    /// Writes every parameter of `store` (same names and shapes) into the masters and refreshes the f16 mirror.
    pub fn upload_params(&self, store: &ParamStore<f32>) -> Result<()> {
        ensure!(
            store.len() == self.params.len(),
            "the store has {} parameters, the device {}",
            store.len(),
            self.params.len()
        );
        let mut host = vec![0f32; self.elems.max(1)];
        for (info, p) in self.params.iter().zip(store.iter()) {
            ensure!(
                p.name == info.name && p.value.shape == info.shape,
                "parameter {} {:?} does not match the device's {} {:?}",
                p.name,
                p.value.shape,
                info.name,
                info.shape
            );
            host[info.offset..info.offset + p.value.data.len()].copy_from_slice(&p.value.data);
        }
        self.gpu.write(&self.masters, 0, &host).context("uploading the parameters")?;
        self.refresh_halves()
    }

    /// Recomputes the f16 mirror from the masters (one cast launch; nothing for f32).
    pub fn refresh_halves(&self) -> Result<()> {
        if let Some(h) = &self.halves {
            let n = self.masters.len_bytes() / 4;
            self.gpu.kernels.cast(&self.gpu.stream, DevSlice::of(h), DevSlice::of(&self.masters), n, true)?;
            self.gpu.sync()?;
        }
        Ok(())
    }

    /// Writes the running statistics of `bn` into the device's statistics block.
    pub fn upload_bn(&self, bn: &[&BnState<f32>]) -> Result<()> {
        ensure!(bn.len() == self.bn.len(), "{} batch norms given, the device holds {}", bn.len(), self.bn.len());
        let Some(block) = &self.bn_block else { return Ok(()) };
        let mut host = vec![0f32; block.len_bytes() / 4];
        for (info, s) in self.bn.iter().zip(bn) {
            ensure!(
                s.running_mean.len() == info.c,
                "a batch norm of {} channels where the device has {}",
                s.running_mean.len(),
                info.c
            );
            host[info.mean..info.mean + info.c].copy_from_slice(&s.running_mean);
            host[info.var..info.var + info.c].copy_from_slice(&s.running_var);
        }
        self.gpu.write(block, 0, &host).context("uploading the batch-norm running statistics")
    }

    /// Reads the masters back into `store`'s parameter values.
    pub fn download_params(&self, store: &mut ParamStore<f32>) -> Result<()> {
        let mut host = vec![0f32; self.elems.max(1)];
        self.gpu.read(&self.masters, 0, &mut host).context("reading the parameters back")?;
        for (id, info) in self.params.iter().enumerate() {
            let p = store.get_mut(id);
            ensure!(p.name == info.name, "parameter {id} is {} in the store but {} on the device", p.name, info.name);
            let n = info.numel();
            p.value_mut().data.copy_from_slice(&host[info.offset..info.offset + n]);
        }
        Ok(())
    }

    /// Running (mean, variance) of batch norm `index`.
    pub fn bn_stats(&self, index: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let info =
            *self.bn.get(index).with_context(|| format!("no batch norm {index} (the model has {})", self.bn.len()))?;
        let block = self.bn_block.as_ref().context("no batch-norm statistics on the device")?;
        let (mut mean, mut var) = (vec![0f32; info.c], vec![0f32; info.c]);
        self.gpu.read(block, info.mean * 4, &mut mean)?;
        self.gpu.read(block, info.var * 4, &mut var)?;
        Ok((mean, var))
    }
}

/// The program's buffer ids of the state's blocks.
#[derive(Clone, Copy)]
struct StateBufs {
    masters: BufId,
    halves: Option<BufId>,
    grads: Option<BufId>,
    bn: Option<BufId>,
}

/// The CUDA backend (see the module docs).
pub struct Cuda {
    gpu: Arc<Gpu>,
    blas: Arc<Blas>,
    dnn: Arc<Dnn>,
    state: Arc<DeviceState>,
    bufs: StateBufs,
    prog: Program,
    params: Vec<ParamInfo>,
    /// Whether a parameter was read already in this program.
    read: Vec<bool>,
    /// Whether the program may have a backward (trainable parameters have gradient slots).
    training: bool,
    /// The element range of the gradient buffer the trainable parameters' slots cover.
    grad_range: (usize, usize),
    uploads: Vec<Owned>,
    /// Persistent buffers the caller owns and binds at every run ([`Cuda::external`]).
    externals: Vec<BufId>,
    /// Transient buffers [`Cuda::download`] may read after the run (kept alive to the program's end).
    kept: Vec<BufId>,
    /// Batch norms whose running statistics this program updates (training mode), in recording order.
    bn_updates: Vec<usize>,
    /// Replayed-step sources: the targets, the loss scale and the mask-key table live in device buffers.
    device_targets: Option<View>,
    loss_scale: Option<View>,
    mask_keys: Option<(View, usize)>,
    ran: Option<Ran>,
    /// A step was recorded after the first run (the plan would not cover it).
    late_push: bool,
}

impl Cuda {
    /// Uploads the parameters of `store` (f32 masters, and an f16 mirror for `Precision::F16`) and the running
    /// statistics of `bn` (the model's batch norms, in their index order), allocates the gradient buffer over the
    /// trainable parameters, and starts the program with the gradient zeroing and the f16 refresh.
    pub fn new(gpu: Arc<Gpu>, store: &ParamStore<f32>, bn: &[&BnState<f32>], precision: Precision) -> Result<Self> {
        let state = Arc::new(DeviceState::new(gpu, store, bn, precision, true)?);
        Self::with_state(state, store, true, true)
    }

    /// As [`Cuda::new`] for a program without backward (an inference tape): no gradient buffer, no zeroing step.
    pub fn inference(
        gpu: Arc<Gpu>,
        store: &ParamStore<f32>,
        bn: &[&BnState<f32>],
        precision: Precision,
    ) -> Result<Self> {
        let state = Arc::new(DeviceState::new(gpu, store, bn, precision, false)?);
        Self::with_state(state, store, false, true)
    }

    /// A new program over existing device state: `training` gives the trainable parameters of `store` (which must
    /// have the state's names and shapes) their gradient slots and starts the program by zeroing them;
    /// `cast_halves` starts it by refreshing the f16 mirror from the masters (a training step whose optimizer
    /// refreshes the copies itself leaves it out).
    pub fn with_state(
        state: Arc<DeviceState>,
        store: &ParamStore<f32>,
        training: bool,
        cast_halves: bool,
    ) -> Result<Self> {
        ensure!(
            store.len() == state.params.len(),
            "the store has {} parameters but the device state {}: build the state from this model",
            store.len(),
            state.params.len()
        );
        ensure!(
            !training || state.grads.is_some() || state.elems == 0,
            "a training program over device state without a gradient buffer: build the state with grads"
        );
        let mut prog = Program::new();
        let masters = prog.persistent("params.f32", state.masters.len_bytes());
        let halves = state.halves.as_ref().map(|h| prog.persistent("params.f16", h.len_bytes()));
        let bn = state.bn_block.as_ref().map(|b| prog.persistent("bn.running", b.len_bytes()));
        let mut params = state.params.clone();
        let mut grad_range = (usize::MAX, 0);
        for (info, p) in params.iter_mut().zip(store.iter()) {
            ensure!(
                p.name == info.name && p.value.shape == info.shape,
                "parameter {} {:?} in the store is {} {:?} on the device: build the state from this store",
                p.name,
                p.value.shape,
                info.name,
                info.shape
            );
            if training && p.trainable {
                info.slot = Some(info.offset);
                grad_range = (grad_range.0.min(info.offset), align_up(info.offset + info.numel(), REGION_ALIGN));
            }
        }
        if grad_range.0 == usize::MAX {
            grad_range = (0, 0);
        }
        let grads = match (&state.grads, grad_range.1 > grad_range.0) {
            (Some(g), true) => Some(prog.persistent("grads.f32", g.len_bytes())),
            _ => None,
        };
        let n = store.len();
        let mut cuda = Self {
            gpu: state.gpu.clone(),
            blas: state.blas.clone(),
            dnn: state.dnn.clone(),
            bufs: StateBufs { masters, halves, grads, bn },
            state,
            prog,
            params,
            read: vec![false; n],
            training,
            grad_range,
            uploads: Vec::new(),
            externals: Vec::new(),
            kept: Vec::new(),
            bn_updates: Vec::new(),
            device_targets: None,
            loss_scale: None,
            mask_keys: None,
            ran: None,
            late_push: false,
        };
        cuda.record_prologue(cast_halves)?;
        Ok(cuda)
    }

    /// Batch norms (model indices) whose running statistics a run of this program updates.
    pub fn bn_updates(&self) -> &[usize] {
        &self.bn_updates
    }

    /// The device state this program runs over.
    pub fn state(&self) -> &Arc<DeviceState> {
        &self.state
    }

    /// The first steps of every program: zero the trainable range of the gradient buffer, refresh the f16 copies
    /// from the masters.
    fn record_prologue(&mut self, cast_halves: bool) -> Result<()> {
        if let Some(g) = self.bufs.grads {
            let (start, end) = self.grad_range;
            let view = View { buf: g, offset: start * 4, bytes: (end - start) * 4 };
            let n = end - start;
            self.prog.push(
                "zero gradients",
                vec![],
                vec![view.all()],
                Box::new(move |b| {
                    let gpu = b.gpu();
                    gpu.kernels.fill::<f32>(&gpu.stream, view.get(b)?, 0.0, n)
                }),
            );
        }
        if let (Some(h), true) = (self.bufs.halves, cast_halves) {
            let n = self.state.masters.len_bytes() / 4;
            let src = View { buf: self.bufs.masters, offset: 0, bytes: n * 4 };
            let dst = View { buf: h, offset: 0, bytes: n * 2 };
            self.prog.push(
                "cast parameters to f16",
                vec![src.all()],
                vec![dst.all()],
                Box::new(move |b| {
                    let gpu = b.gpu();
                    gpu.kernels.cast(&gpu.stream, dst.get(b)?, src.get(b)?, n, true)
                }),
            );
        }
        Ok(())
    }

    /// The activation storage type.
    pub fn dtype(&self) -> DType {
        self.state.precision.dtype()
    }

    pub fn precision(&self) -> Precision {
        self.state.precision
    }

    /// The recorded program so far.
    pub fn program(&self) -> &Program {
        &self.prog
    }

    /// The plan of the program as recorded so far (what [`Cuda::run`] would lay out).
    pub fn plan(&self) -> Result<Plan> {
        self.prog.plan()
    }

    /// Uploads host data as an activation-typed input tensor (persistent: bound, not placed).
    pub fn input(&mut self, a: &Array<f32>) -> Result<Tensor> {
        let dtype = self.dtype();
        let block = match dtype {
            DType::F32 => self.gpu.upload(&a.data)?,
            DType::F16 => {
                let h: Vec<half::f16> = a.data.iter().map(|&v| half::f16::from_f32(v)).collect();
                self.gpu.upload(&h)?
            }
        };
        let bytes = a.data.len() * dtype.size();
        let buf = self.prog.persistent(format!("input {:?}", a.shape), bytes);
        self.uploads.push(Owned { buf, block });
        Ok(Tensor { view: View { buf, offset: 0, bytes }, shape: a.shape.clone(), dtype, constant: None, param: None })
    }

    /// Uploads raw host values of any device type (targets, class weights) as a persistent buffer.
    fn upload_raw<T: cudarc::driver::DeviceRepr>(&mut self, name: &str, host: &[T]) -> Result<View> {
        let block = self.gpu.upload(host)?;
        let bytes = size_of_val(host);
        let buf = self.prog.persistent(name, bytes);
        self.uploads.push(Owned { buf, block });
        Ok(View { buf, offset: 0, bytes })
    }

    /// Declares a persistent buffer of `bytes` that the caller owns and binds at every run (a loader's batch, the
    /// optimizer's state, the step values): see [`Cuda::run_bound`].
    pub fn external(&mut self, name: impl Into<String>, bytes: usize) -> View {
        let buf = self.prog.persistent(name, bytes);
        self.externals.push(buf);
        View { buf, offset: 0, bytes }
    }

    /// An activation-typed input tensor of `shape` in an external buffer (a batch the device made).
    pub fn external_input(&mut self, name: &str, shape: &[usize]) -> Tensor {
        let dtype = self.dtype();
        let view = self.external(name, shape.iter().product::<usize>() * dtype.size());
        Tensor { view, shape: shape.to_vec(), dtype, constant: None, param: None }
    }

    /// The loss reads its targets (i32, one per row) from `targets`, an external buffer, instead of uploading the
    /// host's: the batch of a replayed step is made on the device.
    pub fn use_device_targets(&mut self, targets: View) {
        self.device_targets = Some(targets);
    }

    /// The loss's gradient is multiplied by the f32 at `scale` (the loss scaler's current scale, on the device):
    /// mixed-precision backward as GradScaler's `scale(loss).backward()`.
    pub fn use_loss_scale(&mut self, scale: View) {
        self.loss_scale = Some(scale);
    }

    /// Masks read their keys from `keys` (u64 per layer, `layers` of them, filled on the device each step by
    /// `mask_keys`) instead of the host's key: the masks of a replayed step change with the device's step counter.
    pub fn use_mask_keys(&mut self, keys: View, layers: usize) {
        self.mask_keys = Some((keys, layers));
    }

    /// A new transient tensor (an op's output).
    fn alloc(&mut self, name: &str, shape: &[usize], dtype: DType) -> Tensor {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let buf = self.prog.transient(name, bytes);
        Tensor { view: View { buf, offset: 0, bytes }, shape: shape.to_vec(), dtype, constant: None, param: None }
    }

    /// A transient scratch buffer (a workspace) of at least one alignment unit.
    fn scratch(&mut self, name: &str, bytes: usize) -> View {
        let bytes = bytes.max(256);
        View { buf: self.prog.transient(name, bytes), offset: 0, bytes }
    }

    /// Records one step: its name, every buffer range it reads and writes, and the launches it makes. Public so a
    /// trainer can append its own steps (the optimizer, the step counter) to the program the model recorded.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        reads: Vec<Access>,
        writes: Vec<Access>,
        run: impl Fn(&Bound<'_>) -> Result<()> + Send + Sync + 'static,
    ) {
        self.late_push |= self.ran.is_some();
        self.prog.push(name, reads, writes, Box::new(run));
    }

    /// The gradient buffer's view of the trainable range (element offsets `grad_range`), when there is one.
    pub fn grad_range_view(&self) -> Option<(View, (usize, usize))> {
        let (start, end) = self.grad_range;
        self.bufs.grads.map(|g| (View { buf: g, offset: start * 4, bytes: (end - start) * 4 }, self.grad_range))
    }

    /// The masters' view of element range `range` (the trainable range, for the optimizer).
    pub fn masters_view(&self, (start, end): (usize, usize)) -> View {
        View { buf: self.bufs.masters, offset: start * 4, bytes: (end - start) * 4 }
    }

    /// The f16 mirror's view of element range `range`, for the f16 path.
    pub fn halves_view(&self, (start, end): (usize, usize)) -> Option<View> {
        self.bufs.halves.map(|h| View { buf: h, offset: start * 2, bytes: (end - start) * 2 })
    }

    /// The f32 master of a parameter.
    fn master_view(&self, id: ParamId) -> View {
        let p = &self.params[id];
        View { buf: self.bufs.masters, offset: p.offset * 4, bytes: p.numel() * 4 }
    }

    /// A parameter's values in the activation type: the master for f32, the f16 copy for f16. `w` must be a
    /// parameter tensor or already of the activation type.
    fn weight_view(&self, w: &Tensor) -> Result<View> {
        if w.dtype == self.dtype() {
            return Ok(w.view);
        }
        match (w.param, self.bufs.halves) {
            (Some(id), Some(h)) => {
                let p = &self.params[id];
                Ok(View { buf: h, offset: p.offset * 2, bytes: p.numel() * 2 })
            }
            _ => bail!(
                "a weight of type {:?} is neither a parameter nor of the activation type {:?}",
                w.dtype,
                self.dtype()
            ),
        }
    }

    /// Where a parameter-like input's f32 gradient goes: its slot (`Want::Param` of a trainable parameter), a new
    /// f32 tensor (`Want::Value`, returned to the tape), or nowhere.
    fn grad_out(&mut self, want: Want, name: &str, shape: &[usize]) -> Result<GradOut> {
        Ok(match want {
            Want::No => GradOut::None,
            Want::Param(id) => match self.slot_view(id) {
                Some(v) => GradOut::Slot(v),
                None if !self.training => {
                    bail!("a backward on an inference backend (Cuda::inference): build it with Cuda::new to train")
                }
                None => bail!("parameter {} has no gradient slot (it is frozen)", self.params[id].name),
            },
            Want::Value => GradOut::Fresh(self.alloc(name, shape, DType::F32)),
        })
    }

    fn slot_view(&self, id: ParamId) -> Option<View> {
        let p = &self.params[id];
        let g = self.bufs.grads?;
        p.slot.map(|s| View { buf: g, offset: s * 4, bytes: p.numel() * 4 })
    }

    /// Keeps a transient result alive to the end of the program so [`Cuda::download`] can read it after the run.
    pub fn keep(&mut self, t: &Tensor) {
        if !self.kept.contains(&t.view.buf) {
            self.kept.push(t.view.buf);
        }
    }

    /// Plans the program, allocates its arena and runs it, then waits for the device. `poison` fills the arena with
    /// 0xFF bytes first (NaN in f32 and f16), so a read of a buffer never written shows as NaN in the results. A
    /// program may run again (the same plan and arena, so the same addresses); external buffers need
    /// [`Cuda::run_bound`].
    pub fn run(&mut self, poison: bool) -> Result<()> {
        self.run_bound(poison, &Bindings::default())?;
        self.gpu.sync()
    }

    /// Plans the program and allocates its arena (once; nothing runs). [`Cuda::run_bound`] calls it; a caller that
    /// captures the run calls it first, since nothing may allocate inside a capture.
    pub fn prepare(&mut self) -> Result<()> {
        if self.ran.is_some() {
            return Ok(());
        }
        if !self.kept.is_empty() {
            // A step that moves nothing: it only extends the kept buffers' live ranges to the end.
            let reads = self.kept.iter().map(|&buf| Access { buf, bytes: 0 }).collect();
            self.prog.push("keep results", reads, vec![], Box::new(|_| Ok(())));
        }
        let plan = self.prog.plan().context("planning the step program")?;
        let arena = self.gpu.alloc.alloc(plan.arena_bytes.max(1)).context("allocating the arena")?;
        self.ran = Some(Ran { plan, arena });
        Ok(())
    }

    /// Issues every step of the program on the device's stream without waiting for it, with the external buffers
    /// bound by `external` (every buffer [`Cuda::external`] declared must be bound). Plans and allocates on the
    /// first call.
    pub fn run_bound(&mut self, poison: bool, external: &Bindings<'_>) -> Result<()> {
        self.run_observed(poison, external, &mut |_| Ok(()))
    }

    /// [`Cuda::run_bound`], calling `after(i)` once step `i` is issued.
    pub fn run_observed(
        &mut self,
        poison: bool,
        external: &Bindings<'_>,
        after: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        ensure!(
            !self.late_push,
            "a step was recorded after this program first ran: its plan does not cover it; record a new program"
        );
        self.prepare()?;
        let ran = self.ran.as_ref().context("the program was not prepared")?;
        let mut bindings = external.clone();
        for &buf in &self.externals {
            ensure!(
                bindings.has(buf),
                "external buffer '{}' is not bound: bind it for every run",
                self.prog.buffers()[buf.0 as usize].name
            );
        }
        for (buf, block) in self.owned_blocks() {
            bindings.bind(buf, DevSlice::of(block));
        }
        for o in &self.uploads {
            bindings.bind(o.buf, DevSlice::of(&o.block));
        }
        self.prog
            .execute_observed(&ran.plan, &self.gpu, &ran.arena, &bindings, poison, after)
            .context("running the step program")
    }

    /// Fills the program's arena with 0xFF bytes (NaN in f32 and f16) outside any run: between replays of a
    /// captured step, a buffer whose stale contents a replay would read shows as NaN.
    pub fn poison_arena(&self) -> Result<()> {
        let ran = self.ran()?;
        self.gpu.fill(&ran.arena, 0, ran.arena.len_bytes(), 0xFF)
    }

    /// Bytes of the program's arena (after [`Cuda::prepare`]).
    pub fn arena_bytes(&self) -> Option<usize> {
        self.ran.as_ref().map(|r| r.arena.len_bytes())
    }

    fn ran(&self) -> Result<&Ran> {
        self.ran.as_ref().context("the program has not run yet: call Cuda::run first")
    }

    /// A tensor's values after the run, as f32: a persistent one (an input, a parameter) or a transient one that
    /// [`Cuda::keep`] kept.
    pub fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        let ran = self.ran()?;
        let n = t.numel();
        let (block, offset) = if let Some(o) = self.owned(t.view.buf) {
            (o, t.view.offset)
        } else {
            ensure!(
                self.kept.contains(&t.view.buf),
                "tensor {:?} was not kept: its arena space is reused later in the program; call Cuda::keep on it \
                 before Cuda::run",
                t.shape
            );
            let off = ran.plan.offsets.get(t.view.buf.0 as usize).copied().flatten().context("buffer has no offset")?;
            (&ran.arena, off + t.view.offset)
        };
        Ok(match t.dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                self.gpu.read(block, offset, &mut out)?;
                out
            }
            DType::F16 => {
                let mut out = vec![half::f16::ZERO; n];
                self.gpu.read(block, offset, &mut out)?;
                out.into_iter().map(f32::from).collect()
            }
        })
    }

    /// The program buffers the device state holds (masters, f16 copies, gradients, BN statistics) with their
    /// blocks.
    fn owned_blocks(&self) -> impl Iterator<Item = (BufId, &Block)> {
        let st = &self.state;
        [
            Some((self.bufs.masters, &st.masters)),
            self.bufs.halves.zip(st.halves.as_ref()),
            self.bufs.grads.zip(st.grads.as_ref()),
            self.bufs.bn.zip(st.bn_block.as_ref()),
        ]
        .into_iter()
        .flatten()
    }

    fn owned(&self, buf: BufId) -> Option<&Block> {
        self.owned_blocks()
            .find(|(b, _)| *b == buf)
            .map(|(_, block)| block)
            .or_else(|| self.uploads.iter().find(|o| o.buf == buf).map(|o| &o.block))
    }

    /// A parameter's gradient after the run (`None`: frozen, no slot).
    pub fn grad(&self, id: ParamId) -> Result<Option<Vec<f32>>> {
        self.ran()?;
        ensure!(id < self.params.len(), "no parameter {id} (the store has {})", self.params.len());
        let (Some(v), Some(g)) = (self.slot_view(id), &self.state.grads) else { return Ok(None) };
        let mut out = vec![0f32; v.bytes / 4];
        self.gpu.read(g, v.offset, &mut out)?;
        Ok(Some(out))
    }

    /// Whether a parameter has a gradient slot (is trainable).
    pub fn has_slot(&self, id: ParamId) -> bool {
        self.params.get(id).is_some_and(|p| p.slot.is_some())
    }

    /// Bytes of the flat gradient buffer (trainable parameters only, each slot aligned).
    pub fn grad_bytes(&self) -> usize {
        (self.grad_range.1 - self.grad_range.0) * 4
    }

    /// Running (mean, variance) of batch norm `index` on the device (after the run: updated by a training step).
    pub fn bn_stats(&self, index: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.ran()?;
        self.state.bn_stats(index)
    }

    /// The device views of batch norm `index`'s running mean and variance.
    fn bn_views(&self, index: usize, c: usize) -> Result<(View, View)> {
        let info = *self.state.bn.get(index).with_context(|| {
            format!("batch norm {index} has no device statistics (Cuda::new was given {})", self.state.bn.len())
        })?;
        ensure!(info.c == c, "batch norm {index}: {c} channels, but its device statistics hold {}", info.c);
        let buf = self.bufs.bn.context("no batch-norm statistics on the device")?;
        Ok((View { buf, offset: info.mean * 4, bytes: c * 4 }, View { buf, offset: info.var * 4, bytes: c * 4 }))
    }

    /// Activation-typed input check: every op family takes its activations in the precision's type.
    fn expect_act(&self, what: &str, t: &Tensor) -> Result<()> {
        ensure!(
            t.dtype == self.dtype(),
            "{what}: tensor {:?} is {:?} but activations are {:?} on this backend",
            t.shape,
            t.dtype,
            self.dtype()
        );
        Ok(())
    }
}

/// Where a gradient of a parameter-like input goes.
enum GradOut {
    None,
    Slot(View),
    Fresh(Tensor),
}

impl GradOut {
    fn view(&self) -> Option<View> {
        match self {
            GradOut::None => None,
            GradOut::Slot(v) => Some(*v),
            GradOut::Fresh(t) => Some(t.view),
        }
    }

    /// What the backward returns for this input.
    fn into_result(self) -> Option<Tensor> {
        match self {
            GradOut::Fresh(t) => Some(t),
            _ => None,
        }
    }
}

impl Backend for Cuda {
    type Host = f32;
    type Tensor = Tensor;
    type BnSaved = CudaBnSaved;
    type Mask = CudaMask;
    type LossSaved = CudaLossSaved;

    fn shape(t: &Tensor) -> &[usize] {
        &t.shape
    }

    fn param(&mut self, store: &ParamStore<f32>, id: ParamId) -> Result<Tensor> {
        let info = self.params.get(id).with_context(|| format!("parameter {id} was not uploaded to this backend"))?;
        let p = store.get(id);
        ensure!(
            p.name == info.name && p.value.shape == info.shape,
            "parameter {id} is {} {:?} in the store but {} {:?} on the device: build the backend from this store",
            p.name,
            p.value.shape,
            info.name,
            info.shape
        );
        ensure!(
            !self.training || p.trainable == info.slot.is_some(),
            "parameter {} was {} when the backend was built and is {} now: build a new backend after freezing",
            p.name,
            if info.slot.is_some() { "trainable" } else { "frozen" },
            if p.trainable { "trainable" } else { "frozen" }
        );
        ensure!(
            !self.read[id],
            "parameter {} is read twice in one program; the CUDA backend writes each weight gradient straight into \
             its slot, so a parameter may feed only one op per step",
            p.name
        );
        self.read[id] = true;
        Ok(Tensor {
            view: self.master_view(id),
            shape: info.shape.clone(),
            dtype: DType::F32,
            constant: None,
            param: Some(id),
        })
    }

    fn full(&mut self, shape: &[usize], value: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let view = self.upload_raw(&format!("full {shape:?} = {value}"), &vec![value as f32; n])?;
        Ok(Tensor { view, shape: shape.to_vec(), dtype: DType::F32, constant: Some(value), param: None })
    }

    fn accumulate(&mut self, acc: &mut Tensor, g: Tensor) -> Result<()> {
        elementwise::accumulate(self, acc, g)
    }

    fn accumulate_param_grad(&mut self, _store: &mut ParamStore<f32>, id: ParamId, g: Tensor) -> Result<()> {
        elementwise::accumulate_param_grad(self, id, g)
    }

    fn conv2d(&mut self, g: &ConvGeom, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        conv::forward(self, g, x, w, bias)
    }

    fn conv2d_backward(
        &mut self,
        g: &ConvGeom,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        want: [Want; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        conv::backward(self, g, x, w, dy, want)
    }

    fn linear(&mut self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear::forward(self, x, w, b)
    }

    fn linear_backward(&mut self, x: &Tensor, w: &Tensor, dy: &Tensor, want: [Want; 3]) -> Result<[Option<Tensor>; 3]> {
        linear::backward(self, x, w, dy, want)
    }

    fn batch_norm(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        stats: BnStats<'_, f32>,
        mode: BnMode,
        cfg: BnCfg,
        act: Option<Act>,
    ) -> Result<(Tensor, CudaBnSaved)> {
        if matches!(mode, BnMode::Train { update_running: true }) {
            self.bn_updates.push(stats.index);
        }
        batchnorm::forward(self, x, gamma, beta, stats.index, mode, cfg, act)
    }

    fn batch_norm_backward(
        &mut self,
        saved: &CudaBnSaved,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        dy: &Tensor,
        act: Option<Act>,
        want: [Want; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        batchnorm::backward(self, saved, x, gamma, beta, dy, act, want)
    }

    fn activation(&mut self, act: Act, x: &Tensor) -> Result<Tensor> {
        elementwise::activation(self, act, x)
    }

    fn activation_backward(&mut self, act: Act, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        elementwise::activation_backward(self, act, x, y, dy)
    }

    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise::add(self, a, b)
    }

    fn channel_scale(&mut self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        scale::channel_scale(self, x, s)
    }

    fn channel_scale_backward(
        &mut self,
        x: &Tensor,
        s: &Tensor,
        dy: &Tensor,
        want: [Want; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        scale::channel_scale_backward(self, x, s, dy, want)
    }

    fn global_avg_pool(&mut self, x: &Tensor) -> Result<Tensor> {
        pool::pool(self, x)
    }

    fn global_avg_pool_backward(&mut self, x_shape: &[usize], dy: &Tensor) -> Result<Tensor> {
        pool::pool_backward(self, x_shape, dy)
    }

    fn draw_mask(&mut self, kind: MaskKind, x_shape: &[usize], p: f64, source: MaskSource<'_>) -> Result<CudaMask> {
        dropout::draw_mask(self, kind, x_shape, p, source)
    }

    fn apply_mask(&mut self, x: &Tensor, mask: &CudaMask) -> Result<Tensor> {
        dropout::apply_mask(self, x, mask)
    }

    fn loss(
        &mut self,
        logits: &Tensor,
        targets: &[usize],
        weights: Option<&[f32]>,
        kind: &LossKind,
    ) -> Result<(Tensor, CudaLossSaved)> {
        loss::forward(self, logits, targets, weights, kind)
    }

    fn loss_backward(&mut self, saved: &CudaLossSaved, logits: &Tensor, dy: &Tensor) -> Result<Tensor> {
        loss::backward(self, saved, logits, dy)
    }
}

/// `i32` of a dimension, for kernel parameters.
fn dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).with_context(|| format!("{what} = {v} does not fit the kernels' 32-bit parameters"))
}
