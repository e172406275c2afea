//! The training loop: the seed's recipe on derma's engine.
//!
//! Per epoch: the unfreezing stage sets which feature blocks are frozen and the backbone's learning-rate
//! multiplier; each batch runs forward, focal loss (class weights = balanced weights of the training split),
//! backward, loss-scale check and AdamW on the trainable parameters (head at the scheduler's learning rate,
//! backbone at that times the stage multiplier); then validation, the plateau scheduler and early stopping on
//! validation accuracy, the history files, the plots and the checkpoints.
//!
//! Every random draw is a pure function of (seed, epoch, step), so an interrupted run resumed from its last
//! checkpoint continues bit for bit as the uninterrupted run would have on the CPU: the model is rebuilt from the
//! checkpoint's saved settings (dropout, stochastic depth), and a resume that changes any setting other than
//! `epochs` and `workers` is refused.
//!
//! Epochs count from 1 wherever a person reads them (console, history files, plots, checkpoint metadata: the
//! `epoch` of a checkpoint is the number of epochs it has completed).

use super::adamw::AdamW;
use super::checkpoint::{self, EpochProgress, TrainState};
use super::config::{BnFrozenMode, ClassWeighting, LossKind as CfgLoss, Precision, TrainConfig};
use super::device::{DeviceEngine, DeviceOptions, StepMode};
use super::history::EpochRecord;
use super::metrics::{Report, compute_report};
use super::plots;
use super::run_dir::{self, RunSource};
use crate::autograd::Tape;
use crate::cuda;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::{self, PrepareOptions, PreparedData, split_mix};
use crate::nn::{CounterMasks, Ctx, EfficientNet};
use crate::ops::loss::{self, LossKind, softmax_rows};
use crate::tensor::Array;
use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What to train and where.
#[derive(Clone, Debug)]
pub struct TrainRun {
    pub config: TrainConfig,
    /// Dataset folder (ISIC 2019 or plain layout).
    pub data: PathBuf,
    /// Run folder: checkpoints, history, plots, resolved config.
    pub out: PathBuf,
    /// Decode cache folder; `None` = the data layer's default next to the data.
    pub cache: Option<PathBuf>,
    /// Continue from `out/last.safetensors`.
    pub resume: bool,
    /// Replace a run already in `out` (without it such a folder is refused unless resuming).
    pub overwrite: bool,
    /// No progress bars; one log line per epoch.
    pub quiet: bool,
    /// Stop (saving, as on Ctrl-C) after this many optimizer steps in this process: for tests of resumption.
    pub stop_after_steps: Option<usize>,
    /// On a device: run every step eagerly instead of capturing each stage's step once and replaying it (for
    /// tests that compare the two, and to debug a step).
    pub eager_steps: bool,
    /// Scale the loss with the GradScaler in f32 too (f16 always does): lets tests compare the scaler paths of
    /// the CPU and the device trainers, forced overflows included.
    pub scale_loss_in_f32: bool,
    /// On a device: fill the step's arena with NaN bytes before every graph replay (a test hook: a replay that
    /// reads a buffer it did not write this step fails).
    pub poison_replays: bool,
    /// On a device: keep the dataset on the host and stream each batch to the device (double-buffered) even when
    /// it would fit there (`--stream-data`).
    pub stream_data: bool,
    /// Test hook: after this many optimizer steps in this process, print a line and wait for a signal (to test
    /// SIGTERM mid-epoch on a real process).
    pub hold_after_steps: Option<usize>,
    /// Test hook: after this many epochs are complete and checkpointed, print a line and wait for a signal (to
    /// test SIGKILL right after an epoch's checkpoint is written).
    pub hold_after_epochs: Option<usize>,
}

impl TrainRun {
    /// A fresh run (no resume, no overwrite, progress bars, no test hooks).
    pub fn new(config: TrainConfig, data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        TrainRun {
            config,
            data: data.into(),
            out: out.into(),
            cache: None,
            resume: false,
            overwrite: false,
            quiet: false,
            stop_after_steps: None,
            eager_steps: false,
            scale_loss_in_f32: false,
            poison_replays: false,
            stream_data: false,
            hold_after_steps: None,
            hold_after_epochs: None,
        }
    }
}

/// Marker printed (to stderr) by the test hooks once the process waits for a signal.
pub const HOLD_MARKER: &str = "derma: holding for a signal";

/// The test hooks' wait: until an interruption is requested, at most ten minutes.
fn hold(what: &str) -> Result<()> {
    eprintln!("{HOLD_MARKER} ({what})");
    let start = Instant::now();
    while !crate::interrupt::requested() {
        if start.elapsed().as_secs() > 600 {
            bail!("test hook: no signal within ten minutes ({what})");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub epochs_completed: usize,
    pub interrupted: bool,
    pub early_stopped: bool,
    pub best_val_acc: Option<f64>,
    pub last: Option<EpochRecord>,
    pub run_dir: PathBuf,
    /// What the device engine did (`None` on the CPU).
    pub device: Option<super::device::DeviceStats>,
}

/// Validation results.
pub struct Evaluation {
    pub loss: f64,
    pub report: Report,
    pub y_true: Vec<usize>,
    pub y_pred: Vec<usize>,
    /// Softmax probabilities `[N, C]`.
    pub probs: Vec<f32>,
}

fn loss_kind(cfg: &TrainConfig) -> LossKind {
    match cfg.loss {
        CfgLoss::Focal => LossKind::Focal { gamma: cfg.focal_gamma },
        CfgLoss::Ce => LossKind::CrossEntropy,
    }
}

pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Runs the model in eval mode over `indices` of `data` and scores it.
pub fn evaluate(
    model: &mut EfficientNet<f32>,
    data: &Arc<PreparedData>,
    indices: &[usize],
    batch_size: usize,
    image_size: usize,
    alpha: Option<&[f32]>,
    kind: &LossKind,
) -> Result<Evaluation> {
    if indices.is_empty() {
        bail!("nothing to evaluate: the split is empty");
    }
    let classes = model.config.num_classes;
    let cfg = LoaderConfig::eval(batch_size, image_size as u32);
    let loader = Loader::new(data.clone(), indices.to_vec(), cfg)?;
    let (mut loss_sum, mut n) = (0.0, 0usize);
    let (mut y_true, mut y_pred, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = Pcg64::seed_from_u64(0);
    for batch in loader.epoch(0) {
        let batch = batch?;
        let b = batch.labels.len();
        let mut tape = Tape::inference();
        let x = tape.constant(Array::new(&[b, batch.size, batch.size, 3], batch.images)?);
        let mut ctx = Ctx::eval(&mut rng);
        let logits = model.forward(&mut tape, x, &mut ctx)?;
        let l = loss::loss(&mut tape, logits, &batch.labels, alpha, kind)?;
        loss_sum += tape.value(l).data[0] as f64 * b as f64;
        n += b;
        let lv = &tape.value(logits).data;
        for (row, &t) in lv.chunks(classes).zip(&batch.labels) {
            y_pred.push(argmax(row));
            y_true.push(t);
        }
        probs.extend(softmax_rows(lv, classes).into_iter().map(|p| p as f32));
    }
    let report = compute_report(&y_true, &y_pred, Some(&probs), classes)?;
    Ok(Evaluation { loss: loss_sum / n as f64, report, y_true, y_pred, probs })
}

/// Where the run trains: the CPU reference or a CUDA backend device (a GPU or the emulated device).
enum Where {
    Cpu,
    Device(Arc<cuda::Gpu>),
}

fn resolve_device(cfg: &TrainConfig) -> Result<Where> {
    match cuda::select(cfg.device)? {
        cuda::Selected::Cpu => {
            if cfg.precision == Precision::F16 {
                bail!(
                    "precision f16 (mixed precision with loss scaling) needs the CUDA path (--device cuda, or emu \
                     to run it on the emulated device); the CPU trains in f32"
                );
            }
            Ok(Where::Cpu)
        }
        sel => Ok(Where::Device(Arc::new(cuda::Gpu::open(&sel)?))),
    }
}

fn class_weights(cfg: &TrainConfig, data: &PreparedData) -> Result<Vec<f32>> {
    let c = data.class_names.len();
    Ok(match (&cfg.class_weights, cfg.class_weighting) {
        (Some(w), _) => {
            if w.len() != c {
                bail!("class_weights has {} values for {c} classes ({})", w.len(), data.class_names.join(", "));
            }
            w.iter().map(|&v| v as f32).collect()
        }
        (None, ClassWeighting::Balanced) => data.class_weights.clone(),
        (None, ClassWeighting::Uniform) => vec![1.0; c],
    })
}

fn step_rng(seed: u64, epoch: usize, step: usize) -> Pcg64 {
    Pcg64::seed_from_u64(split_mix(split_mix(seed ^ 0xD50_0000 ^ epoch as u64) ^ step as u64))
}

/// Where one step of the loop is: the positions and learning rates an engine needs.
#[derive(Clone, Copy, Debug)]
pub struct StepCtx {
    pub epoch: usize,
    /// The step (batch index in the epoch) about to run; for `begin_epoch`, the first step of this process.
    pub step: usize,
    pub first: usize,
    pub steps_per_epoch: usize,
    pub frozen: usize,
    pub lr: f64,
    pub backbone_lr: f64,
}

/// What computes the training steps and the validation: the CPU reference ([`CpuEngine`]) or the CUDA backend
/// (`super::device::DeviceEngine`). The epoch loop, the schedules, the history, the plots and the checkpoints are
/// the same for both.
pub trait Engine {
    /// Before the epoch's first step (of this process: a resumed epoch starts at `ctx.first`).
    fn begin_epoch(&mut self, model: &mut EfficientNet<f32>, state: &TrainState, ctx: &StepCtx) -> Result<()>;
    /// One optimizer step (forward, loss, backward, unscale and check, AdamW, scaler update).
    fn step(
        &mut self,
        model: &mut EfficientNet<f32>,
        adamw: &mut AdamW,
        state: &mut TrainState,
        ctx: &StepCtx,
    ) -> Result<()>;
    /// After the epoch's last step: `state.progress` holds the epoch's sums.
    fn end_epoch(&mut self, state: &mut TrainState, ctx: &StepCtx) -> Result<()>;
    /// Brings the model, the optimizer, the scaler and `state.progress` up to date on the host (before a
    /// checkpoint or an evaluation).
    fn sync(&mut self, model: &mut EfficientNet<f32>, adamw: &mut AdamW, state: &mut TrainState) -> Result<()>;
    /// What a device engine did (none for the CPU).
    fn device_stats(&self) -> Option<super::device::DeviceStats> {
        None
    }
    /// The progress bar's message after `steps_done` steps of this process in the epoch.
    fn progress_message(&self, state: &TrainState, secs: f64, steps_done: usize) -> String;
    /// Validation over `indices`.
    fn evaluate(
        &mut self,
        model: &mut EfficientNet<f32>,
        data: &Arc<PreparedData>,
        indices: &[usize],
        alpha: Option<&[f32]>,
        kind: &LossKind,
    ) -> Result<Evaluation>;
}

/// The CPU reference trainer's steps: batches from the host loader, the tape on the CPU backend.
struct CpuEngine {
    loader: Loader,
    batches: Option<std::iter::Skip<std::iter::Enumerate<crate::data::loader::EpochIter>>>,
    alpha: Vec<f32>,
    kind: LossKind,
    seed: u64,
    frozen_bn_eval: bool,
    batch_size: usize,
    image_size: usize,
    classes: usize,
}

impl Engine for CpuEngine {
    fn begin_epoch(&mut self, _model: &mut EfficientNet<f32>, _state: &TrainState, ctx: &StepCtx) -> Result<()> {
        self.batches = Some(self.loader.epoch(ctx.epoch as u64).enumerate().skip(ctx.first));
        Ok(())
    }

    fn step(
        &mut self,
        model: &mut EfficientNet<f32>,
        adamw: &mut AdamW,
        state: &mut TrainState,
        ctx: &StepCtx,
    ) -> Result<()> {
        let (epoch, step, lr) = (ctx.epoch, ctx.step, ctx.lr);
        let Some((i, batch)) = self.batches.as_mut().and_then(|b| b.next()) else {
            bail!("the loader ended before step {} of epoch {}", step + 1, epoch + 1)
        };
        ensure!(i == step, "the loader gave batch {i} for step {step}");
        let batch = batch?;
        let b = batch.labels.len();
        let mut rng = step_rng(self.seed, epoch, step);
        let mut tape = Tape::new();
        let x = tape.constant(Array::new(&[b, batch.size, batch.size, 3], batch.images)?);
        // Counter masks: the rule the device kernels compute, so a run moves between devices unchanged.
        let mut ctx_nn = Ctx {
            frozen_bn_eval: self.frozen_bn_eval,
            counter_masks: Some(CounterMasks { seed: self.seed, epoch: epoch as u64, step: step as u64 }),
            ..Ctx::train(&mut rng)
        };
        let logits = model.forward(&mut tape, x, &mut ctx_nn)?;
        let l = loss::loss(&mut tape, logits, &batch.labels, Some(&self.alpha), &self.kind)?;
        let lv = tape.value(l).data[0];
        if !lv.is_finite() {
            return Err(diverged(&format!("the training loss is {lv}"), epoch, step, ctx.steps_per_epoch, lr));
        }
        for (row, &t) in tape.value(logits).data.chunks(self.classes).zip(&batch.labels) {
            state.progress.correct += usize::from(argmax(row) == t);
        }
        if state.scaler.is_enabled() {
            // GradScaler's scale(loss).backward(): the seed is the scale.
            let seed = Array::new(&[], vec![state.scaler.scale()])?;
            tape.backward_with(l, seed, &mut model.params)?;
        } else {
            tape.backward(l, &mut model.params)?;
        }
        drop(tape);
        let found_inf = {
            let mut grads: Vec<&mut [f32]> = model.params.grads_mut().map(|(_, g)| g).collect();
            state.scaler.unscale_and_check(&mut grads)
        };
        if !found_inf {
            for (p, g) in model.params.params_and_grads_mut() {
                let plr = if p.name.starts_with("classifier.") { lr } else { ctx.backbone_lr };
                adamw.step_one(&p.name, &mut Arc::make_mut(&mut p.value).data, g, plr)?;
                if p.value.data.iter().any(|v| !v.is_finite()) {
                    let what = format!("the update made parameter {} non-finite", p.name);
                    return Err(diverged(&what, epoch, step, ctx.steps_per_epoch, lr));
                }
            }
        }
        model.params.zero_grad();
        state.scaler.update(found_inf);
        state.progress.loss_sum += lv as f64 * b as f64;
        state.progress.seen += b;
        Ok(())
    }

    fn end_epoch(&mut self, _state: &mut TrainState, _ctx: &StepCtx) -> Result<()> {
        self.batches = None;
        Ok(())
    }

    fn sync(&mut self, _model: &mut EfficientNet<f32>, _adamw: &mut AdamW, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }

    fn progress_message(&self, state: &TrainState, secs: f64, _steps_done: usize) -> String {
        format!(
            "loss {:.4}  acc {:.3}  {:.1} img/s",
            state.progress.loss_sum / state.progress.seen.max(1) as f64,
            state.progress.correct as f64 / state.progress.seen.max(1) as f64,
            (state.progress.seen as f64) / secs.max(1e-9)
        )
    }

    fn evaluate(
        &mut self,
        model: &mut EfficientNet<f32>,
        data: &Arc<PreparedData>,
        indices: &[usize],
        alpha: Option<&[f32]>,
        kind: &LossKind,
    ) -> Result<Evaluation> {
        evaluate(model, data, indices, self.batch_size, self.image_size, alpha, kind)
    }
}

/// Trains as configured; see the module docs.
pub fn run(run: &TrainRun) -> Result<TrainOutcome> {
    let cfg = &run.config;
    let place = resolve_device(cfg)?;
    if run.stream_data && matches!(place, Where::Cpu) {
        bail!(
            "--stream-data streams the dataset to a device; the CPU trainer reads it from the host anyway (use it \
             with --device cuda or emu)"
        );
    }
    let last_path = run.out.join("last.safetensors");
    let best_path = run.out.join("best.safetensors");
    // Read the checkpoint first: a resume that cannot be exact fails before any work.
    let loaded = if run.resume {
        let loaded =
            checkpoint::load(&last_path).with_context(|| format!("cannot resume from {}", run.out.display()))?;
        let saved = loaded.config.as_ref().with_context(|| {
            format!("cannot resume from {}: {} holds no training config", run.out.display(), last_path.display())
        })?;
        let changed = cfg.changes_breaking_resume(saved)?;
        if !changed.is_empty() {
            bail!(
                "cannot resume {} with changed settings: {} (a resumed run continues exactly as the interrupted one; \
                 only epochs, workers and device may change): start a new run to change them",
                run.out.display(),
                changed.join(", ")
            );
        }
        Some(loaded)
    } else {
        run_dir::claim(&run.out, run.overwrite)?;
        None
    };
    std::fs::create_dir_all(&run.out).with_context(|| format!("cannot create run folder {}", run.out.display()))?;

    let prepare_options = PrepareOptions {
        cache: run.cache.clone(),
        size: cfg.image_size as u32,
        val_fraction: cfg.val_fraction,
        seed: cfg.seed,
        quiet: run.quiet,
        ..PrepareOptions::new(run.data.clone())
    };
    let prepared = Arc::new(data::prepare(&prepare_options)?);
    let canonical = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    RunSource { data: canonical(run.data.clone()), cache: canonical(prepare_options.cache_dir()) }.save(&run.out)?;
    if !run.quiet {
        eprintln!(
            "data: {} usable of {} rows ({} excluded), {} train / {} val, classes {}",
            prepared.summary.usable,
            prepared.summary.rows,
            prepared.summary.excluded.len(),
            prepared.train.len(),
            prepared.val.len(),
            prepared.class_names.join(" ")
        );
    }
    let class_names = prepared.class_names.clone();
    let classes = class_names.len();
    if prepared.train.len() < cfg.batch_size {
        bail!(
            "the training split has {} images, fewer than one batch of {}: lower --batch-size or add data",
            prepared.train.len(),
            cfg.batch_size
        );
    }

    let mut adamw = AdamW::new(cfg.adamw())?;
    let (mut model, mut state) = if let Some(loaded) = loaded {
        if loaded.class_names != class_names {
            bail!(
                "{} was trained on classes {:?}, the data has {:?}",
                last_path.display(),
                loaded.class_names,
                class_names
            );
        }
        let state = loaded.state.clone().with_context(|| format!("{} holds no training state", last_path.display()))?;
        if cfg.epochs < state.epoch {
            bail!(
                "{} has completed {} epochs; --epochs {} cannot shorten it (give at least {})",
                run.out.display(),
                state.epoch,
                cfg.epochs,
                state.epoch
            );
        }
        loaded.restore_optimizer(&mut adamw)?;
        (loaded.model, state)
    } else {
        let mut model = EfficientNet::<f32>::new(cfg.model_config(classes), cfg.seed);
        match &cfg.pretrained {
            Some(p) => {
                let ckpt = checkpoint::load_weights(p)?;
                model.load_backbone(&ckpt.state_dict).with_context(|| format!("pretrained weights {}", p.display()))?;
            }
            None => {
                eprintln!(
                    "warning: no --pretrained weights: the backbone starts from random initialisation (the seed \
                     fine-tunes ImageNet weights; pass --pretrained imagenet to fetch them)"
                );
                let frozen = cfg.unfreeze.stages().iter().any(|s| s.frozen_blocks > 0);
                if cfg.precision == Precision::F16 && cfg.bn_frozen_mode == BnFrozenMode::FrozenEval && frozen {
                    // Measured in tests/train_device.rs: the running statistics of a fresh network (mean 0,
                    // variance 1) do not normalise its activations, which pass f16's range in the frozen blocks.
                    eprintln!(
                        "warning: in f16, frozen blocks of a randomly initialised network that normalise with their \
                         running statistics (--frozen-bn frozen-eval) can pass f16's largest value (65,504): the \
                         loss scaler then skips steps and lowers the scale, possibly until the gradients underflow \
                         and the frozen stages barely train; use --pretrained imagenet, --frozen-bn torch or \
                         --precision f32"
                    );
                }
            }
        }
        let state = TrainState::fresh(cfg, class_weights(cfg, &prepared)?, run.scale_loss_in_f32)?;
        (model, state)
    };
    cfg.save(&run.out.join("config.toml"))?;
    let alpha = state.class_weights.clone();
    let kind = loss_kind(cfg);
    let workers = cfg.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(6));
    let mut lcfg = LoaderConfig::train(cfg.batch_size, cfg.image_size as u32, cfg.seed);
    lcfg.workers = workers;
    let loader = Loader::new(prepared.clone(), prepared.train.clone(), lcfg)?;
    let steps_per_epoch = loader.batches_per_epoch();
    let mut engine: Box<dyn Engine> = match place {
        Where::Cpu => Box::new(CpuEngine {
            loader,
            batches: None,
            alpha: alpha.clone(),
            kind: kind.clone(),
            seed: cfg.seed,
            frozen_bn_eval: cfg.bn_frozen_mode == BnFrozenMode::FrozenEval,
            batch_size: cfg.batch_size,
            image_size: cfg.image_size,
            classes,
        }),
        Where::Device(gpu) => {
            let opts = DeviceOptions {
                step_mode: if run.eager_steps { StepMode::Eager } else { StepMode::Graph },
                quiet: run.quiet,
                poison_replays: run.poison_replays,
                stream_data: run.stream_data,
            };
            let e = DeviceEngine::new(gpu, cfg, &model, &adamw, &state, loader, alpha.clone(), kind.clone(), opts)?;
            Box::new(e)
        }
    };
    let mut steps_this_process = 0usize;
    let mut early_stopped = false;
    plots::register_font()?;

    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let stage = cfg.unfreeze.stage_for_epoch(epoch);
        model.freeze_blocks(stage.frozen_blocks)?;
        if state.progress.step == 0 && cfg.unfreeze.is_transition(epoch) && cfg.early_stopping.reset_on_stage_change {
            state.early.reset_patience();
        }
        let lr = state.plateau.lr();
        let backbone_lr = lr * stage.lr_multiplier;
        let bar = progress_bar(run.quiet, steps_per_epoch, epoch, cfg.epochs);
        bar.set_position(state.progress.step as u64);
        let t0 = Instant::now();
        let first = state.progress.step;
        let mut sctx =
            StepCtx { epoch, step: first, first, steps_per_epoch, frozen: stage.frozen_blocks, lr, backbone_lr };
        engine.begin_epoch(&mut model, &state, &sctx)?;
        for step in first..steps_per_epoch {
            sctx.step = step;
            engine.step(&mut model, &mut adamw, &mut state, &sctx)?;
            state.progress.step = step + 1;
            steps_this_process += 1;
            let secs = state.progress.seconds + t0.elapsed().as_secs_f64();
            bar.set_message(engine.progress_message(&state, secs, step + 1 - first));
            bar.inc(1);
            if run.hold_after_steps == Some(steps_this_process) {
                hold(&format!("after step {} of epoch {}", step + 1, epoch + 1))?;
            }
            if crate::interrupt::requested() || run.stop_after_steps.is_some_and(|n| steps_this_process >= n) {
                state.progress.seconds = secs;
                bar.abandon_with_message("interrupted");
                engine.sync(&mut model, &mut adamw, &mut state)?;
                checkpoint::save(&last_path, &model, &adamw, &state, cfg, &class_names, cfg.image_size)?;
                eprintln!(
                    "saved {} in epoch {} after step {}/{steps_per_epoch}",
                    last_path.display(),
                    epoch + 1,
                    step + 1
                );
                return Ok(outcome(&state, true, false, &run.out, engine.device_stats()));
            }
        }
        engine.end_epoch(&mut state, &sctx)?;
        engine.sync(&mut model, &mut adamw, &mut state)?;
        let train_seconds = state.progress.seconds + t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let ev = engine.evaluate(&mut model, &prepared, &prepared.val, Some(&alpha), &kind)?;
        let p = &state.progress;
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: p.loss_sum / p.seen.max(1) as f64,
            train_acc: p.correct as f64 / p.seen.max(1) as f64,
            val_loss: ev.loss,
            val_acc: ev.report.accuracy,
            val_balanced_acc: ev.report.balanced_accuracy,
            frozen_layers: stage.frozen_blocks,
            lr_multiplier: stage.lr_multiplier,
            lr,
            loss_scale: state.scaler.scale() as f64,
            seconds: train_seconds,
            images_per_s: p.seen as f64 / train_seconds.max(1e-9),
        };
        state.plateau.step(record.val_acc);
        let decision = state.early.update(record.epoch, record.val_acc);
        state.history.push(record.clone())?;
        state.history.write_files(&run.out)?;
        plots::write_plots(&run.out, &state.history, Some(&ev.report), &class_names)?;
        log_epoch(&record, cfg.epochs, run.quiet);
        state.epoch += 1;
        state.progress = EpochProgress::default();
        if decision.improved || state.best_val_acc.is_none() {
            state.best_val_acc = Some(record.val_acc);
            checkpoint::save(&best_path, &model, &adamw, &state, cfg, &class_names, cfg.image_size)?;
        }
        checkpoint::save(&last_path, &model, &adamw, &state, cfg, &class_names, cfg.image_size)?;
        if run.hold_after_epochs == Some(state.epoch) {
            hold(&format!("after epoch {}", state.epoch))?;
        }
        if decision.stop {
            eprintln!(
                "early stopping: validation accuracy has not improved for {} epochs",
                cfg.early_stopping.patience
            );
            early_stopped = true;
            break;
        }
        // A signal during validation or saving: the epoch is complete and saved, stop at this boundary.
        if crate::interrupt::requested() && state.epoch < cfg.epochs {
            eprintln!("saved {} after epoch {}", last_path.display(), state.epoch);
            return Ok(outcome(&state, true, false, &run.out, engine.device_stats()));
        }
    }
    Ok(outcome(&state, false, early_stopped, &run.out, engine.device_stats()))
}

/// The error for a diverged run: what went non-finite, where (epochs and steps counted from 1), and what to do.
fn diverged(what: &str, epoch: usize, step: usize, steps_per_epoch: usize, lr: f64) -> anyhow::Error {
    anyhow::anyhow!(
        "training diverged in epoch {} at step {}/{steps_per_epoch}: {what} (learning rate {lr:e}); lower --lr \
         (or the config's lr); the run folder keeps the checkpoint of the last completed epoch",
        epoch + 1,
        step + 1
    )
}

fn outcome(
    state: &TrainState,
    interrupted: bool,
    early_stopped: bool,
    dir: &Path,
    device: Option<super::device::DeviceStats>,
) -> TrainOutcome {
    TrainOutcome {
        device,
        epochs_completed: state.epoch,
        interrupted,
        early_stopped,
        best_val_acc: state.best_val_acc,
        last: state.history.epochs.last().cloned(),
        run_dir: dir.to_path_buf(),
    }
}

fn progress_bar(quiet: bool, steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    bar
}

fn log_epoch(r: &EpochRecord, epochs: usize, _quiet: bool) {
    eprintln!(
        "epoch {}/{epochs}: train loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} bal {:.3} | frozen {} lr {:.2e}×{} | {:.1}s {:.1} img/s",
        r.epoch,
        r.train_loss,
        r.train_acc,
        r.val_loss,
        r.val_acc,
        r.val_balanced_acc,
        r.frozen_layers,
        r.lr,
        r.lr_multiplier,
        r.seconds,
        r.images_per_s
    );
}
