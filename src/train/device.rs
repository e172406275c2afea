//! The training step on the CUDA backend (a GPU or the emulated device): the seed's recipe with nothing between
//! steps but a graph replay.
//!
//! Device state, laid out once per run:
//! - the backend's [`DeviceState`]: f32 masters, their f16 mirror (f16 precision), the flat f32 gradient buffer
//!   (the masters' layout) and the batch-norm running statistics;
//! - AdamW's moments `m`, `v` (the masters' layout), one i64 step count per parameter and one coefficient record
//!   per parameter; the learning rates of the two groups (head, backbone) as f64;
//! - the loss scaler's state (scale, growth tracker, found-inf flag, skipped steps), the step values (batch index
//!   in the epoch, seed, epoch) with the table of mask keys they derive, and the epoch's sums (loss, correct,
//!   seen, non-finite losses).
//!
//! One program per unfreezing stage, recorded by the same model code the CPU trainer runs: mask keys from the step
//! counter, forward, loss (its gradient multiplied by the device scale), the epoch sums, backward into the gradient
//! slots, then unscale + inf check, AdamW's per-parameter coefficients, AdamW over the trainable range (refreshing
//! the f16 copies), the scaler's update and the step counter's advance. The stage's first step runs eagerly (it
//! also runs cuDNN's algorithm search and loads every kernel); the next is captured as one graph (the batch's
//! augmentation included, reading a resident dataset or the streamed batch's slot of a double buffer) and every
//! later step replays it. The host writes the step values and learning rates at an epoch's start and reads the
//! sums and the scaler at its end; with a streamed dataset it also copies each next batch while a step runs.
//!
//! The trainable parameters are a suffix of the parameter order, so the gradient, unscale and optimizer work
//! cover one contiguous element range.

use super::adamw::cuda::{AdamCoeffs, AdamEntry, AdamHyper, ScalerState, adam_tables};
use super::adamw::{AdamW, ParamState};
use super::checkpoint::TrainState;
use super::config::{BnFrozenMode, Precision as CfgPrecision, TrainConfig};
use super::scaler::GradScaler;
use super::trainer::{Engine, Evaluation, StepCtx, argmax};
use crate::autograd::Tape;
use crate::backend::cuda::{Cuda, DeviceState, Precision, View};
use crate::cuda::Gpu;
use crate::cuda::alloc::Block;
use crate::cuda::kernels::DevSlice;
use crate::cuda::program::Bindings;
use crate::data::PreparedData;
use crate::data::device::{DeviceDataset, DeviceLoader, UploadOptions};
use crate::data::loader::{Loader, LoaderConfig};
use crate::nn::{CounterMasks, Ctx, EfficientNet};
use crate::ops::dropout::cuda::StepValues;
use crate::ops::loss::{self, LossKind, softmax_rows};
use crate::tensor::Array;
use crate::train::metrics::compute_report;
use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use std::sync::Arc;

/// Masks a forward pass may draw (B0 draws 17: stochastic depth in 16 blocks and the head's dropout).
const MASK_LAYERS: usize = 64;

/// How steps run: eagerly every time, or captured once per stage and replayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    Eager,
    Graph,
}

/// How a [`DeviceEngine`] runs.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    /// Eager steps, or one captured graph per stage.
    pub step_mode: StepMode,
    /// No upload progress bar and no notices.
    pub quiet: bool,
    /// Fill the step's arena with NaN bytes before every replay (a test hook: see `TrainRun::poison_replays`).
    pub poison_replays: bool,
    /// Keep the dataset on the host and stream every batch (double-buffered), even when it would fit the device.
    pub stream_data: bool,
}

impl Default for DeviceOptions {
    /// Captured steps, a progress bar, no test hooks, the dataset resident when it fits.
    fn default() -> Self {
        DeviceOptions { step_mode: StepMode::Graph, quiet: false, poison_replays: false, stream_data: false }
    }
}

/// The optimizer's and the step's device state (see the module docs).
struct StepState {
    m: Block,
    v: Block,
    steps: Block,
    coeffs: Block,
    lrs: Block,
    scaler: Block,
    values: Block,
    keys: Block,
    sums: Block,
}

/// The recorded program of one unfreezing stage.
struct StageProgram {
    frozen: usize,
    cuda: Cuda,
    entries: Block,
    chunks: Block,
    /// Batch norms the program updates (their host `num_batches_tracked` counts the stage's steps).
    bn_updates: Vec<usize>,
    views: StageViews,
    graph: Option<crate::cuda::Graph>,
    /// Program step indices where the forward (with the loss) and the backward end: the optimizer follows.
    phases: (usize, usize),
    /// Steps this program has run (eagerly or by replay).
    steps_run: usize,
}

/// The external buffers of a stage program, bound at every run.
#[derive(Clone, Copy)]
struct StageViews {
    values: View,
    keys: View,
    batch: View,
    labels: View,
    scaler: Option<View>,
    sums: View,
    m: View,
    v: View,
    steps: View,
    coeffs: View,
    lrs: View,
    entries: View,
    chunks: View,
}

/// The inference program, recorded once.
struct EvalProgram {
    cuda: Cuda,
    input: Block,
    input_view: View,
    logits: crate::backend::cuda::Tensor,
}

/// Inference on the CUDA backend: the model's eval-mode forward recorded once for batches of `batch` images of
/// side `size` over device state, run once per batch (a short batch is padded; in eval mode rows are
/// independent). Validation in the GPU trainer, and `derma eval` / `derma predict` on a device.
pub struct DeviceEval {
    state: Arc<DeviceState>,
    batch: usize,
    size: usize,
    prog: Option<EvalProgram>,
}

impl DeviceEval {
    /// Uploads `model` (its weights and running statistics) to `gpu` for inference in `precision`.
    pub fn new(
        gpu: Arc<Gpu>,
        model: &EfficientNet<f32>,
        precision: Precision,
        batch: usize,
        size: usize,
    ) -> Result<Self> {
        ensure!(batch > 0 && size > 0, "inference needs a batch and a size of at least 1");
        let bns: Vec<_> = model.batch_norms().into_iter().map(|b| &b.state).collect();
        let state = Arc::new(DeviceState::new(gpu, &model.params, &bns, precision, false)?);
        Ok(Self::over(state, batch, size))
    }

    fn over(state: Arc<DeviceState>, batch: usize, size: usize) -> Self {
        DeviceEval { state, batch, size, prog: None }
    }

    fn program(&mut self, model: &mut EfficientNet<f32>) -> Result<&mut EvalProgram> {
        if self.prog.is_none() {
            let (b, s) = (self.batch, self.size);
            let mut cu = Cuda::with_state(self.state.clone(), &model.params, false, false)?;
            let x = cu.external_input("eval batch", &[b, s, s, 3]);
            let input_view = x.view;
            let input = self.state.gpu().zeros(x.view.bytes)?;
            let mut tape = Tape::inference_on(cu);
            let xv = tape.input(x);
            let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
            let mut ctx = Ctx::eval(&mut rng);
            let logits = model.forward(&mut tape, xv, &mut ctx)?;
            let lt = tape.value(logits).clone();
            let mut cu = tape.into_backend();
            cu.keep(&lt);
            cu.prepare()?;
            self.prog = Some(EvalProgram { cuda: cu, input, input_view, logits: lt });
        }
        self.prog.as_mut().context("no eval program")
    }

    /// Logits `[n, classes]` of `n` (at most the batch) NHWC images of side `size`, normalized f32.
    pub fn logits(&mut self, model: &mut EfficientNet<f32>, images: &[f32], n: usize) -> Result<Vec<f32>> {
        let (b, s) = (self.batch, self.size);
        let per = s * s * 3;
        ensure!(n <= b, "{n} images for an inference program of batch {b}");
        ensure!(images.len() == n * per, "{} values for {n} images of {s}x{s}x3", images.len());
        let classes = model.config.num_classes;
        let gpu = self.state.gpu().clone();
        let f16 = self.state.precision() == Precision::F16;
        let prog = self.program(model)?;
        let mut padded = images.to_vec();
        padded.resize(b * per, 0.0);
        if f16 {
            let h: Vec<half::f16> = padded.iter().map(|&v| half::f16::from_f32(v)).collect();
            gpu.write(&prog.input, 0, &h)?;
        } else {
            gpu.write(&prog.input, 0, &padded)?;
        }
        let mut bind = Bindings::default();
        bind.bind(prog.input_view.buf, DevSlice::of(&prog.input));
        prog.cuda.run_bound(false, &bind)?;
        gpu.sync()?;
        let all = prog.cuda.download(&prog.logits)?;
        Ok(all[..n * classes].to_vec())
    }

    /// The model in eval mode over `indices` of `data`, scored as the CPU's `trainer::evaluate` scores it.
    pub fn evaluate(
        &mut self,
        model: &mut EfficientNet<f32>,
        data: &Arc<PreparedData>,
        indices: &[usize],
        alpha: Option<&[f32]>,
        kind: &LossKind,
    ) -> Result<Evaluation> {
        if indices.is_empty() {
            bail!("nothing to evaluate: the split is empty");
        }
        let (b, s) = (self.batch, self.size);
        let classes = model.config.num_classes;
        let loader = Loader::new(data.clone(), indices.to_vec(), LoaderConfig::eval(b, s as u32))?;
        let (mut loss_sum, mut n) = (0.0, 0usize);
        let (mut y_true, mut y_pred, mut probs) = (Vec::new(), Vec::new(), Vec::new());
        for batch in loader.epoch(0) {
            let batch = batch?;
            let rows = batch.labels.len();
            ensure!(batch.size == s, "an evaluation batch of side {} for a program of side {s}", batch.size);
            let lv = self.logits(model, &batch.images, rows)?;
            let mut tape = Tape::inference();
            let z = tape.constant(Array::new(&[rows, classes], lv.clone())?);
            let l = loss::loss(&mut tape, z, &batch.labels, alpha, kind)?;
            loss_sum += tape.value(l).data[0] as f64 * rows as f64;
            n += rows;
            for (row, &t) in lv.chunks(classes).zip(&batch.labels) {
                y_pred.push(argmax(row));
                y_true.push(t);
            }
            probs.extend(softmax_rows(&lv, classes).into_iter().map(|p| p as f32));
        }
        let report = compute_report(&y_true, &y_pred, Some(&probs), classes)?;
        Ok(Evaluation { loss: loss_sum / n as f64, report, y_true, y_pred, probs })
    }
}

/// What the device engine did, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStats {
    /// Steps run eagerly (each stage's first, and every step in eager mode).
    pub eager_steps: usize,
    /// Graphs captured (one per stage in graph mode).
    pub captures: usize,
    /// Steps run by replaying a captured graph.
    pub replays: usize,
    /// Device allocations (cache hits included) made while replays ran: a captured step allocates nothing.
    pub allocations_during_replays: u64,
}

/// The device training engine.
pub struct DeviceEngine {
    gpu: Arc<Gpu>,
    state: Arc<DeviceState>,
    precision: Precision,
    step_mode: StepMode,
    st: StepState,
    scaler_cfg: Option<super::scaler::GradScalerConfig>,
    loader: DeviceLoader,
    stage: Option<StageProgram>,
    eval: Option<DeviceEval>,
    cfg: TrainConfig,
    alpha: Vec<f32>,
    kind: LossKind,
    batch: usize,
    /// The epoch's progress when it began (a resumed epoch continues the checkpoint's sums).
    base: super::checkpoint::EpochProgress,
    /// Steps run since the host's copies (model, optimizer, scaler) were last synced.
    unsynced_bn_steps: Vec<(usize, usize)>,
    /// Poison the stage program's arena before every replay (a test hook: a replay must not read what an earlier
    /// step left behind).
    poison_replays: bool,
    stats: DeviceStats,
}

fn f16_batch(p: Precision) -> bool {
    p == Precision::F16
}

/// Issues the augmentation of the batch the device step counter in `values` names, in the batch element type.
fn augment_at_device_step(loader: &DeviceLoader, gpu: &Gpu, values: &Block, f16: bool) -> Result<()> {
    let step = DevSlice::of(values);
    if f16 {
        loader.batch_at_device_step::<half::f16>(gpu, step)
    } else {
        loader.batch_at_device_step::<f32>(gpu, step)
    }
}

impl DeviceEngine {
    /// Lays out the device state for `model`, `adamw` and `state` (a fresh run or a resumed one) and uploads the
    /// training split for on-device augmentation.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: Arc<Gpu>,
        cfg: &TrainConfig,
        model: &EfficientNet<f32>,
        adamw: &AdamW,
        state: &TrainState,
        loader: Loader,
        alpha: Vec<f32>,
        kind: LossKind,
        opts: DeviceOptions,
    ) -> Result<Self> {
        let DeviceOptions { step_mode, quiet, poison_replays, stream_data } = opts;
        let precision = match cfg.precision {
            CfgPrecision::F32 => Precision::F32,
            CfgPrecision::F16 => Precision::F16,
        };
        let bns: Vec<_> = model.batch_norms().into_iter().map(|b| &b.state).collect();
        let dev = Arc::new(DeviceState::new(gpu.clone(), &model.params, &bns, precision, true)?);
        let elems = dev.elems().max(1);
        let p = model.params.len().max(1);
        let st = StepState {
            m: gpu.zeros(elems * 4).context("allocating AdamW's first moments")?,
            v: gpu.zeros(elems * 4).context("allocating AdamW's second moments")?,
            steps: gpu.zeros(p * 8)?,
            coeffs: gpu.zeros(p * size_of::<AdamCoeffs>())?,
            lrs: gpu.zeros(2 * 8)?,
            scaler: gpu.zeros(size_of::<ScalerState>())?,
            values: gpu.zeros(size_of::<StepValues>())?,
            keys: gpu.zeros(MASK_LAYERS * 8)?,
            sums: gpu.zeros(4 * 8)?,
        };
        let batch = cfg.batch_size;
        let src = loader.source().clone();
        let upload = UploadOptions { quiet, keep_on_host: stream_data, ..UploadOptions::default() };
        let data = DeviceDataset::upload(&gpu, src, &upload)?;
        let loader = if f16_batch(precision) {
            DeviceLoader::new::<half::f16>(&gpu, loader, data)?
        } else {
            DeviceLoader::new::<f32>(&gpu, loader, data)?
        };
        let scaler_cfg = state.scaler.is_enabled().then_some(state.scaler.config);
        let mut engine = DeviceEngine {
            gpu,
            state: dev,
            precision,
            step_mode,
            st,
            scaler_cfg,
            loader,
            stage: None,
            eval: None,
            cfg: cfg.clone(),
            alpha,
            kind,
            batch,
            base: Default::default(),
            unsynced_bn_steps: Vec::new(),
            poison_replays,
            stats: DeviceStats::default(),
        };
        engine.upload_optimizer(model, adamw, &state.scaler)?;
        Ok(engine)
    }

    /// Writes AdamW's states (stepped parameters) and the scaler's state to the device.
    fn upload_optimizer(&mut self, model: &EfficientNet<f32>, adamw: &AdamW, scaler: &GradScaler) -> Result<()> {
        let elems = self.state.elems().max(1);
        let (mut m, mut v) = (vec![0f32; elems], vec![0f32; elems]);
        let mut steps = vec![0i64; model.params.len().max(1)];
        for (id, p) in model.params.iter().enumerate() {
            if let Some(s) = adamw.state(&p.name) {
                let (off, n) = self.state.region(id)?;
                ensure!(s.exp_avg.len() == n, "AdamW state of {} has {} values for {n}", p.name, s.exp_avg.len());
                m[off..off + n].copy_from_slice(&s.exp_avg);
                v[off..off + n].copy_from_slice(&s.exp_avg_sq);
                steps[id] = i64::try_from(s.step)?;
            }
        }
        self.gpu.write(&self.st.m, 0, &m)?;
        self.gpu.write(&self.st.v, 0, &v)?;
        self.gpu.write(&self.st.steps, 0, &steps)?;
        let s = ScalerState {
            scale: scaler.scale(),
            growth_tracker: i32::try_from(scaler.growth_tracker())?,
            found_inf: 0,
            skipped: 0,
        };
        self.gpu.write(&self.st.scaler, 0, bytemuck::bytes_of(&s))
    }

    fn read_scaler(&self) -> Result<ScalerState> {
        let mut s = [ScalerState::default()];
        self.gpu.read(&self.st.scaler, 0, &mut s)?;
        Ok(s[0])
    }

    /// Records the program of the stage with `frozen` leading blocks frozen (the model is frozen already).
    fn record_stage(&mut self, model: &mut EfficientNet<f32>, frozen: usize) -> Result<StageProgram> {
        let (b, s) = (self.batch, self.cfg.image_size);
        let mut cu = Cuda::with_state(self.state.clone(), &model.params, true, false)?;
        // The optimizer's tables over the trainable range (known once the program's gradient slots are).
        let (grads, range) = cu.grad_range_view().context("the stage has no trainable parameters")?;
        let n = range.1 - range.0;
        let first = (0..model.params.len()).find(|&id| cu.has_slot(id)).context("no trainable parameter")?;
        let mut regions = Vec::new();
        for id in first..model.params.len() {
            ensure!(
                cu.has_slot(id),
                "parameter {} is frozen after a trainable one: the device optimizer needs the trainable parameters \
                 to be a suffix of the parameter order",
                model.params.get(id).name
            );
            let (off, len) = self.state.region(id)?;
            let group = usize::from(!model.params.get(id).name.starts_with("classifier."));
            regions.push((off - range.0, len, group));
        }
        let (entries, chunks) = adam_tables(&regions, n)?;
        let entries_block = self.gpu.upload(bytemuck_entries(&entries))?;
        let chunks_block = self.gpu.upload(&chunks)?;
        let views = |cu: &mut Cuda, st: &StepState, scaler: bool| -> StageViews {
            let batch_bytes = b * s * s * 3 * cu.dtype().size();
            StageViews {
                values: cu.external("step values", st.values.len_bytes()),
                keys: cu.external("mask keys", st.keys.len_bytes()),
                batch: cu.external("batch", batch_bytes),
                labels: cu.external("batch labels", b * 4),
                scaler: scaler.then(|| cu.external("loss scaler", st.scaler.len_bytes())),
                sums: cu.external("epoch sums", st.sums.len_bytes()),
                m: cu.external("adamw m", st.m.len_bytes()),
                v: cu.external("adamw v", st.v.len_bytes()),
                steps: cu.external("adamw steps", st.steps.len_bytes()),
                coeffs: cu.external("adamw coefficients", st.coeffs.len_bytes()),
                lrs: cu.external("learning rates", st.lrs.len_bytes()),
                entries: cu.external("adamw entries", entries_block.len_bytes()),
                chunks: cu.external("adamw chunk table", chunks_block.len_bytes()),
            }
        };
        let v = views(&mut cu, &self.st, self.scaler_cfg.is_some());
        cu.use_mask_keys(v.keys, MASK_LAYERS);
        cu.use_device_targets(v.labels);
        if let Some(sc) = v.scaler {
            // ScalerState.scale is its first f32.
            cu.use_loss_scale(View { buf: sc.buf, offset: 0, bytes: 4 });
        }
        let (keys, values) = (v.keys, v.values);
        cu.push("mask keys", vec![values.all()], vec![keys.all()], move |bd| {
            let g = bd.gpu();
            g.kernels.mask_keys(&g.stream, keys.get(bd)?, values.get(bd)?, MASK_LAYERS)
        });
        let x = crate::backend::cuda::Tensor {
            view: v.batch,
            shape: vec![b, s, s, 3],
            dtype: cu.dtype(),
            constant: None,
            param: None,
        };

        let mut tape = Tape::on(cu);
        let xv = tape.input(x);
        // The host rng is never drawn from: every mask is a counter mask whose key the device derives.
        let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
        let mut ctx = Ctx {
            frozen_bn_eval: self.cfg.bn_frozen_mode == BnFrozenMode::FrozenEval,
            counter_masks: Some(CounterMasks { seed: self.cfg.seed, epoch: 0, step: 0 }),
            ..Ctx::train(&mut rng)
        };
        let logits = model.forward(&mut tape, xv, &mut ctx)?;
        ensure!(
            ctx.masks_drawn as usize <= MASK_LAYERS,
            "the model draws {} masks per step, more than the device's key table of {MASK_LAYERS}",
            ctx.masks_drawn
        );
        // The targets are read from the device batch; the host slice only gives the loss its row count.
        let l = loss::loss(&mut tape, logits, &vec![0; b], Some(&self.alpha), &self.kind)?;
        let (lt, zt) = (tape.value(l).clone(), tape.value(logits).clone());
        let classes = model.config.num_classes;
        let (sums, labels, dt) = (v.sums, v.labels, zt.dtype);
        tape.backend_mut().push(
            "epoch sums",
            vec![lt.access(), zt.access(), labels.all()],
            vec![sums.all()],
            move |bd| {
                let g = bd.gpu();
                let (sv, lv, zv, tv) = (sums.get(bd)?, lt.view.get(bd)?, zt.view.get(bd)?, labels.get(bd)?);
                crate::backend::cuda::by_dtype!(dt, T => g.kernels.train_metrics::<T>(&g.stream, sv, lv, zv, tv, (b, classes)))
            },
        );
        let forward_end = tape.backend_mut().program().steps().len();
        tape.backward(l, &mut model.params)?;
        let mut cu = tape.into_backend();
        let backward_end = cu.program().steps().len();
        let bn_updates = cu.bn_updates().to_vec();

        let masters = cu.masters_view(range);
        let halves = cu.halves_view(range);
        let sub = |w: View| View { buf: w.buf, offset: range.0 * 4, bytes: n * 4 };
        let (m, vv) = (sub(v.m), sub(v.v));
        let params = regions.len();
        let steps = View { buf: v.steps.buf, offset: first * 8, bytes: params * 8 };
        let coeffs = View { buf: v.coeffs.buf, offset: 0, bytes: params * size_of::<AdamCoeffs>() };
        let (lrs, ent, chk, scaler) = (v.lrs, v.entries, v.chunks, v.scaler);
        if let Some(sc) = scaler {
            cu.push(
                "unscale gradients, find inf/NaN",
                vec![grads.all(), sc.all()],
                vec![grads.all(), sc.all()],
                move |bd| {
                    let g = bd.gpu();
                    g.kernels.amp_unscale(&g.stream, grads.get(bd)?, sc.get(bd)?, n)
                },
            );
        }
        let hyper = AdamHyper::from(&self.cfg.adamw());
        let mut reads = vec![steps.all(), ent.all(), lrs.all()];
        reads.extend(scaler.map(|s| s.all()));
        cu.push("adamw coefficients", reads, vec![steps.all(), coeffs.all()], move |bd| {
            let g = bd.gpu();
            let sc = scaler.map(|s| s.get(bd)).transpose()?;
            g.kernels.adamw_prepare(
                &g.stream,
                coeffs.get(bd)?,
                steps.get(bd)?,
                ent.get(bd)?,
                lrs.get(bd)?,
                sc,
                &hyper,
                2,
                params,
            )
        });
        let mut reads = vec![masters.all(), grads.all(), m.all(), vv.all(), coeffs.all(), chk.all()];
        reads.extend(scaler.map(|s| s.all()));
        let mut writes = vec![masters.all(), m.all(), vv.all()];
        writes.extend(halves.map(|h| h.all()));
        cu.push(format!("adamw [{n}]"), reads, writes, move |bd| {
            let g = bd.gpu();
            let sc = scaler.map(|s| s.get(bd)).transpose()?;
            let h = halves.map(|h| h.get(bd)).transpose()?;
            g.kernels.adamw_apply(
                &g.stream,
                masters.get(bd)?,
                grads.get(bd)?,
                m.get(bd)?,
                vv.get(bd)?,
                h,
                coeffs.get(bd)?,
                chk.get(bd)?,
                sc,
                params,
                n,
            )
        });
        if let (Some(sc), Some(scfg)) = (scaler, self.scaler_cfg) {
            cu.push("loss scaler update", vec![sc.all()], vec![sc.all()], move |bd| {
                let g = bd.gpu();
                g.kernels.scaler_update(&g.stream, sc.get(bd)?, &scfg)
            });
        }
        cu.push("advance the step counter", vec![values.all()], vec![values.all()], move |bd| {
            let g = bd.gpu();
            g.kernels.step_advance(&g.stream, values.get(bd)?)
        });
        cu.prepare()?;
        Ok(StageProgram {
            frozen,
            cuda: cu,
            entries: entries_block,
            chunks: chunks_block,
            bn_updates,
            views: v,
            graph: None,
            phases: (forward_end, backward_end),
            steps_run: 0,
        })
    }

    /// The bindings of a stage program's external buffers (`tables`: its AdamW entries and chunk table).
    fn bindings<'a>(
        st: &'a StepState,
        loader: &'a DeviceLoader,
        v: &StageViews,
        (entries, chunks): (&'a Block, &'a Block),
    ) -> Bindings<'a> {
        let (batch, labels) = loader.outputs();
        let mut b = Bindings::default();
        let pairs: [(View, &Block); 12] = [
            (v.values, &st.values),
            (v.keys, &st.keys),
            (v.batch, batch),
            (v.labels, labels),
            (v.sums, &st.sums),
            (v.m, &st.m),
            (v.v, &st.v),
            (v.steps, &st.steps),
            (v.coeffs, &st.coeffs),
            (v.lrs, &st.lrs),
            (v.entries, entries),
            (v.chunks, chunks),
        ];
        for (view, block) in pairs {
            b.bind(view.buf, DevSlice::of(block));
        }
        if let Some(sc) = v.scaler {
            b.bind(sc.buf, DevSlice::of(&st.scaler));
        }
        b
    }

    /// Makes the batch of the current device step from the step counter (a streamed batch must be prepared:
    /// [`DeviceLoader::prepare_step`]).
    fn issue_batch(&self) -> Result<()> {
        augment_at_device_step(&self.loader, &self.gpu, &self.st.values, f16_batch(self.precision))
    }

    fn run_step(&mut self, step: usize) -> Result<()> {
        let capture = self.step_mode == StepMode::Graph;
        let prog = self.stage.as_ref().context("no stage program: begin_epoch first")?;
        if capture && prog.steps_run > 0 && prog.graph.is_none() {
            let graph = {
                let gpu = self.gpu.clone();
                let (st, loader) = (&self.st, &self.loader);
                let prog = self.stage.as_mut().context("no stage program")?;
                let StageProgram { cuda, entries, chunks, views, .. } = prog;
                let bindings = Self::bindings(st, loader, views, (entries, chunks));
                let f16 = f16_batch(self.precision);
                gpu.capture(|| {
                    augment_at_device_step(loader, &gpu, &st.values, f16)?;
                    cuda.run_bound(false, &bindings)
                })
                .context("capturing the training step as a CUDA graph")?
            };
            if let Some(p) = self.stage.as_mut() {
                p.graph = Some(graph);
            }
            self.stats.captures += 1;
        }
        let replay = self.stage.as_ref().is_some_and(|p| p.graph.is_some());
        // A streamed batch is copied (or on its way) before the step that reads it, and the next one is copied
        // while it runs; nothing to do for resident data.
        self.loader.prepare_step(&self.gpu, step)?;
        if replay {
            let p = self.stage.as_ref().context("no stage program")?;
            if self.poison_replays {
                p.cuda.poison_arena()?;
            }
            if let Some(g) = &p.graph {
                let before = self.gpu.allocations();
                g.replay(&self.gpu)?;
                self.stats.allocations_during_replays += self.gpu.allocations() - before;
                self.stats.replays += 1;
            }
        } else {
            self.stats.eager_steps += 1;
            self.issue_batch()?;
            let (st, loader) = (&self.st, &self.loader);
            let prog = self.stage.as_mut().context("no stage program")?;
            let StageProgram { cuda, entries, chunks, views, steps_run, .. } = prog;
            let bindings = Self::bindings(st, loader, views, (entries, chunks));
            cuda.run_bound(false, &bindings)?;
            if *steps_run == 0 {
                // The stage's first step: surface any error of the program here, where it can be named.
                self.gpu.sync().context("the stage's first (eager) training step")?;
            }
        }
        self.loader.step_issued(&self.gpu, step)?;
        let p = self.stage.as_mut().context("no stage program")?;
        p.steps_run += 1;
        match self.unsynced_bn_steps.iter_mut().find(|(f, _)| *f == p.frozen) {
            Some((_, n)) => *n += 1,
            None => self.unsynced_bn_steps.push((p.frozen, 1)),
        }
        Ok(())
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Waits for every step issued so far.
    pub fn sync_device(&self) -> Result<()> {
        self.gpu.sync()
    }

    /// What the current stage's program moves per step and its arena ([`crate::cuda::program::Report`]).
    pub fn stage_report(&self) -> Result<crate::cuda::program::Report> {
        let p = self.stage.as_ref().context("no stage program: begin_epoch first")?;
        Ok(p.cuda.program().report(&p.cuda.plan()?))
    }

    /// Runs one training step eagerly with the device synchronised at each phase boundary: the seconds of the
    /// batch's augmentation, the forward (with the loss), the backward, and the optimizer (unscale, AdamW,
    /// scaler, counter). The syncs cost time a replayed step does not pay, so the four add up to more than a
    /// replayed step; their proportions are what they show.
    pub fn timed_phases(&mut self, step: usize) -> Result<[f64; 4]> {
        use std::time::Instant;
        self.gpu.sync()?;
        let t0 = Instant::now();
        self.loader.prepare_step(&self.gpu, step)?;
        self.issue_batch()?;
        self.gpu.sync()?;
        let data = t0.elapsed().as_secs_f64();
        let gpu = self.gpu.clone();
        let (st, loader) = (&self.st, &self.loader);
        let prog = self.stage.as_mut().context("no stage program: begin_epoch first")?;
        let StageProgram { cuda, entries, chunks, views, phases, steps_run, .. } = prog;
        let bindings = Self::bindings(st, loader, views, (entries, chunks));
        let (fwd_end, bwd_end) = *phases;
        let mut marks = Vec::with_capacity(3);
        let mut last = Instant::now();
        cuda.run_observed(false, &bindings, &mut |i| {
            if i + 1 == fwd_end || i + 1 == bwd_end {
                gpu.sync()?;
                marks.push(last.elapsed().as_secs_f64());
                last = Instant::now();
            }
            Ok(())
        })?;
        gpu.sync()?;
        marks.push(last.elapsed().as_secs_f64());
        *steps_run += 1;
        self.stats.eager_steps += 1;
        self.loader.step_issued(&self.gpu, step)?;
        ensure!(marks.len() == 3, "the program's phases were not all seen ({} marks)", marks.len());
        Ok([data, marks[0], marks[1], marks[2]])
    }

    /// Reads the epoch's device sums (which began at the epoch's progress so far) into `state.progress`.
    fn read_sums(&self, state: &mut TrainState) -> Result<f64> {
        let mut sums = [0f64; 4];
        self.gpu.sync()?;
        self.gpu.read(&self.st.sums, 0, &mut sums)?;
        state.progress.loss_sum = sums[0];
        state.progress.correct = sums[1] as usize;
        state.progress.seen = sums[2] as usize;
        Ok(sums[3])
    }
}

fn bytemuck_entries(e: &[AdamEntry]) -> &[u8] {
    bytemuck::cast_slice(e)
}

impl Engine for DeviceEngine {
    fn begin_epoch(&mut self, model: &mut EfficientNet<f32>, state: &TrainState, ctx: &StepCtx) -> Result<()> {
        let frozen = ctx.frozen;
        if self.stage.as_ref().is_none_or(|p| p.frozen != frozen) {
            self.stage = None;
            let prog = self.record_stage(model, frozen)?;
            self.stage = Some(prog);
        }
        self.loader.begin_epoch(&self.gpu, ctx.epoch as u64)?;
        let values = StepValues { step: ctx.first as i64, seed: self.cfg.seed, epoch: ctx.epoch as u64, pad_: 0 };
        self.gpu.write(&self.st.values, 0, bytemuck::bytes_of(&values))?;
        self.gpu.write(&self.st.lrs, 0, &[ctx.lr, ctx.backbone_lr])?;
        // The sums continue from the epoch's progress so far (a resumed epoch), in the order an uninterrupted epoch
        // adds its steps: a resumed run's sums are the uninterrupted run's, bit for bit.
        let p = &state.progress;
        self.gpu.write(&self.st.sums, 0, &[p.loss_sum, p.correct as f64, p.seen as f64, 0.0])?;
        self.base = state.progress.clone();
        Ok(())
    }

    fn step(
        &mut self,
        _model: &mut EfficientNet<f32>,
        _adamw: &mut AdamW,
        _state: &mut TrainState,
        ctx: &StepCtx,
    ) -> Result<()> {
        self.run_step(ctx.step)
    }

    fn end_epoch(&mut self, state: &mut TrainState, ctx: &StepCtx) -> Result<()> {
        let nonfinite = self.read_sums(state)?;
        if nonfinite > 0.0 && self.scaler_cfg.is_none() {
            bail!(
                "training diverged in epoch {}: {nonfinite} steps had a non-finite loss (learning rate {:e}); lower \
                 --lr (or the config's lr); the run folder keeps the checkpoint of the last completed epoch",
                ctx.epoch + 1,
                ctx.lr
            );
        }
        Ok(())
    }

    fn sync(&mut self, model: &mut EfficientNet<f32>, adamw: &mut AdamW, state: &mut TrainState) -> Result<()> {
        self.gpu.sync()?;
        self.state.download_params(&mut model.params)?;
        for p in model.params.iter() {
            if p.value.data.iter().any(|v| !v.is_finite()) {
                bail!(
                    "training diverged: parameter {} is non-finite on the device; lower --lr (or the config's lr); \
                     the run folder keeps the checkpoint of the last completed epoch",
                    p.name
                );
            }
        }
        let updates: Vec<(Vec<usize>, usize)> = self
            .unsynced_bn_steps
            .drain(..)
            .map(|(frozen, n)| {
                let same = self.stage.as_ref().filter(|p| p.frozen == frozen).map(|p| p.bn_updates.clone());
                (same.unwrap_or_default(), n)
            })
            .collect();
        let mut bns = model.batch_norms_mut();
        for (i, bn) in bns.iter_mut().enumerate() {
            let (mean, var) = self.state.bn_stats(i)?;
            bn.state.running_mean = mean;
            bn.state.running_var = var;
            for (ids, n) in &updates {
                if ids.contains(&i) {
                    bn.state.num_batches_tracked += *n as i64;
                }
            }
        }
        drop(bns);
        let elems = self.state.elems().max(1);
        let (mut m, mut v) = (vec![0f32; elems], vec![0f32; elems]);
        let mut steps = vec![0i64; model.params.len().max(1)];
        self.gpu.read(&self.st.m, 0, &mut m)?;
        self.gpu.read(&self.st.v, 0, &mut v)?;
        self.gpu.read(&self.st.steps, 0, &mut steps)?;
        for (id, p) in model.params.iter().enumerate() {
            if steps[id] > 0 {
                let (off, n) = self.state.region(id)?;
                let s = ParamState {
                    step: steps[id] as u64,
                    exp_avg: m[off..off + n].to_vec(),
                    exp_avg_sq: v[off..off + n].to_vec(),
                };
                adamw.insert_state(&p.name, s)?;
            }
        }
        if let Some(cfg) = self.scaler_cfg {
            let s = self.read_scaler()?;
            state.scaler = GradScaler::with_state(cfg, s.scale, u32::try_from(s.growth_tracker)?)?;
        }
        self.read_sums(state)?;
        Ok(())
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        Some(self.stats)
    }

    fn progress_message(&self, _state: &TrainState, secs: f64, steps_done: usize) -> String {
        let seen = self.base.seen + steps_done * self.batch;
        format!("{:.1} img/s (loss and accuracy at the epoch's end)", seen as f64 / secs.max(1e-9))
    }

    fn evaluate(
        &mut self,
        model: &mut EfficientNet<f32>,
        data: &Arc<PreparedData>,
        indices: &[usize],
        alpha: Option<&[f32]>,
        kind: &LossKind,
    ) -> Result<Evaluation> {
        let (b, s) = (self.batch, self.cfg.image_size);
        let eval = self.eval.get_or_insert_with(|| DeviceEval::over(self.state.clone(), b, s));
        eval.evaluate(model, data, indices, alpha, kind)
    }
}
