//! `derma bench train`: training throughput of the GPU trainer (the captured step replayed), with the time of each
//! phase, the peak device memory, and the memory-traffic floor: the bytes the step program moves (`derma plan`)
//! over the device's measured copy bandwidth, so each run says how far it is from the limit.

use anyhow::{Result, bail};
use clap::Args;
use derma::cuda::{DeviceRequest, Gpu, Selected, parse_device, select};
use derma::data::loader::{Loader, LoaderConfig, VecSource};
use derma::nn::EfficientNet;
use derma::train::adamw::AdamW;
use derma::train::checkpoint::TrainState;
use derma::train::config::{Precision, TrainConfig};
use derma::train::device::{DeviceEngine, DeviceOptions};
use derma::train::trainer::{Engine, StepCtx};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use serde::Serialize;
use std::sync::Arc;

/// Options of `derma bench train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Device: cuda, cuda:N, or emu (the emulated device: its numbers measure the emulator, not a GPU).
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    device: DeviceRequest,
    /// Images per batch [default: 256 on a GPU, 2 on the emulated device].
    #[arg(long)]
    batch: Option<usize>,
    /// Input resolution (square) [default: 224 on a GPU, 64 on the emulated device].
    #[arg(long)]
    size: Option<usize>,
    /// Replayed steps per timed window [default: 20 on a GPU, 1 on the emulated device].
    #[arg(long)]
    steps: Option<usize>,
    /// Timed windows; the median is reported.
    #[arg(long, default_value_t = 5)]
    windows: usize,
    /// Storage precision of activations.
    #[arg(long, value_enum, default_value = "f16")]
    precision: Precision,
    /// Unfreezing stage: feature blocks 0..K frozen (0: every layer trains, as a plain PyTorch training step does;
    /// 9: the head only), as in `derma plan`.
    #[arg(long, default_value_t = 0)]
    stage: usize,
    /// Keep the synthetic dataset on the host and stream every batch to the device (double-buffered), as a
    /// dataset too large for the device is: measures what streaming costs.
    #[arg(long)]
    stream_data: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Phases {
    data_ms: f64,
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
}

#[derive(Serialize)]
struct TrainReport {
    device: String,
    emulated: bool,
    batch: usize,
    size: usize,
    precision: Precision,
    frozen_blocks: usize,
    /// Whether the batches were streamed from the host (`--stream-data`) rather than made from resident data.
    streamed_data: bool,
    steps_per_window: usize,
    windows_ms_per_step: Vec<f64>,
    ms_per_step: f64,
    images_per_s: f64,
    /// Each phase of one eager step run with a sync at every phase boundary.
    phases: Phases,
    peak_device_bytes: usize,
    arena_bytes: usize,
    bytes_per_step: usize,
    bytes_per_image: f64,
    device_copy_gb_per_s: f64,
    floor_ms_per_step: f64,
    floor_images_per_s: f64,
    fraction_of_floor: f64,
    launches_per_step: usize,
    note: &'static str,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 }
}

/// Steps the engine through epochs of the synthetic set: a new epoch (a new plan, nothing recaptured) every
/// `steps_per_epoch` steps keeps the device step counter inside the plan.
struct Driver {
    engine: DeviceEngine,
    model: EfficientNet<f32>,
    adamw: AdamW,
    state: TrainState,
    ctx: StepCtx,
    steps_per_epoch: usize,
    in_epoch: usize,
}

impl Driver {
    fn roll_epoch_if_done(&mut self) -> Result<()> {
        if self.in_epoch == self.steps_per_epoch {
            self.engine.sync_device()?;
            self.ctx = StepCtx { epoch: self.ctx.epoch + 1, step: 0, first: 0, ..self.ctx };
            self.engine.begin_epoch(&mut self.model, &self.state, &self.ctx)?;
            self.in_epoch = 0;
        }
        Ok(())
    }

    fn next(&mut self) -> Result<()> {
        self.roll_epoch_if_done()?;
        self.ctx.step = self.in_epoch;
        self.engine.step(&mut self.model, &mut self.adamw, &mut self.state, &self.ctx)?;
        self.in_epoch += 1;
        Ok(())
    }
}

/// Runs `derma bench train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let sel = select(a.device)?;
    if sel == Selected::Cpu {
        bail!(
            "derma bench train measures the GPU trainer: use --device cuda, cuda:N or emu (derma bench cpu times the CPU)"
        );
    }
    let gpu = Arc::new(Gpu::open(&sel)?);
    let emulated = gpu.is_emulated();
    let batch = a.batch.unwrap_or(if emulated { 2 } else { 256 });
    let size = a.size.unwrap_or(if emulated { 64 } else { 224 });
    let steps = a.steps.unwrap_or(if emulated { 1 } else { 20 });
    if batch == 0 || steps == 0 || a.windows == 0 {
        bail!("--batch, --steps and --windows must be at least 1");
    }
    // 256 MiB copies on a GPU (16 MiB on the emulated device).
    let copy = super::bench_data::device_copy_bandwidth(&gpu, if emulated { 16 << 20 } else { 256 << 20 })?;

    // Synthetic images resident on the device, one batch more than a window replays (a window never spans an
    // epoch change, which writes the new plan from the host); eight classes as ISIC.
    let classes = 8;
    let n = (steps + 1) * batch;
    let images: Vec<Vec<u8>> = (0..n)
        .map(|i| (0..size * size * 3).map(|j| (derma::data::split_mix((i * 7919 + j) as u64) >> 56) as u8).collect())
        .collect();
    let src = Arc::new(VecSource { size, images, labels: (0..n).map(|i| i % classes).collect() });
    let mut cfg = TrainConfig { batch_size: batch, image_size: size, precision: a.precision, ..TrainConfig::default() };
    cfg.unfreeze = UnfreezeSchedule::new(vec![Stage { epoch: 0, frozen_blocks: a.stage, lr_multiplier: 1.0 }])?;
    cfg.validate()?;
    let mut lcfg = LoaderConfig::train(batch, size as u32, cfg.seed);
    lcfg.workers = 1;
    let loader = Loader::new(src, (0..n).collect(), lcfg)?;
    let steps_per_epoch = loader.batches_per_epoch();
    let mut model = EfficientNet::<f32>::new(cfg.model_config(classes), cfg.seed);
    model.freeze_blocks(a.stage)?;
    let adamw = AdamW::new(cfg.adamw())?;
    let state = TrainState::fresh(&cfg, vec![1.0; classes], false)?;
    let alpha = vec![1.0; classes];
    let kind = derma::ops::loss::LossKind::Focal { gamma: cfg.focal_gamma };
    let engine = DeviceEngine::new(
        gpu.clone(),
        &cfg,
        &model,
        &adamw,
        &state,
        loader,
        alpha,
        kind,
        DeviceOptions { quiet: true, stream_data: a.stream_data, ..DeviceOptions::default() },
    )?;
    let ctx =
        StepCtx { epoch: 0, step: 0, first: 0, steps_per_epoch, frozen: a.stage, lr: cfg.lr, backbone_lr: cfg.lr };
    let mut d = Driver { engine, model, adamw, state, ctx, steps_per_epoch, in_epoch: 0 };
    d.engine.begin_epoch(&mut d.model, &d.state, &d.ctx)?;
    // Eager first step (algorithm search, kernel loading), the capture with its first replay, one more warm-up.
    for _ in 0..3 {
        d.next()?;
    }
    d.engine.sync_device()?;
    let mut windows = Vec::with_capacity(a.windows);
    for _ in 0..a.windows {
        // An epoch change (a host write) between windows, never inside one.
        d.roll_epoch_if_done()?;
        let window = steps.min(d.steps_per_epoch - d.in_epoch).max(1);
        let t = gpu.start_timer()?;
        for _ in 0..window {
            d.next()?;
        }
        windows.push(t.stop_ms(&gpu)? / window as f64);
    }
    let ms_per_step = median(&windows);
    d.roll_epoch_if_done()?;
    let (mut engine, in_epoch) = (d.engine, d.in_epoch);
    let ph = engine.timed_phases(in_epoch)?;
    let report = engine.stage_report()?;
    let peak = gpu.alloc.stats().peak_in_use;
    let floor_ms = report.moved_bytes as f64 / copy * 1e3;
    let r = TrainReport {
        device: gpu.info.name.clone(),
        emulated,
        batch,
        size,
        precision: a.precision,
        frozen_blocks: a.stage,
        streamed_data: a.stream_data,
        steps_per_window: steps,
        windows_ms_per_step: windows,
        ms_per_step,
        images_per_s: batch as f64 / (ms_per_step / 1e3),
        phases: Phases {
            data_ms: ph[0] * 1e3,
            forward_ms: ph[1] * 1e3,
            backward_ms: ph[2] * 1e3,
            optimizer_ms: ph[3] * 1e3,
        },
        peak_device_bytes: peak,
        arena_bytes: report.arena_bytes,
        bytes_per_step: report.moved_bytes,
        bytes_per_image: report.moved_bytes as f64 / batch as f64,
        device_copy_gb_per_s: copy / 1e9,
        floor_ms_per_step: floor_ms,
        floor_images_per_s: batch as f64 / (floor_ms / 1e3),
        fraction_of_floor: floor_ms / ms_per_step,
        launches_per_step: report.step_count,
        note: if emulated {
            "emulated device: the step ran on the CPU through the emulator; these numbers show that the command and \
             the captured step run, not GPU throughput"
        } else {
            "images/s: median over the windows of replayed steps, timed with CUDA events; phases: one eager step \
             synchronised at each boundary (host clock); floor: the step program's bytes over the measured device copy \
             bandwidth (the augmentation's own bytes are not in it)"
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "derma training step on {}: batch {}, {}x{}, {:?}, {} frozen blocks, data {}; median of {} windows of {} \
         replayed steps",
        r.device,
        r.batch,
        r.size,
        r.size,
        r.precision,
        r.frozen_blocks,
        if r.streamed_data { "streamed from the host" } else { "resident" },
        a.windows,
        steps
    );
    println!(
        "  {:10.1} images/s   {:8.2} ms per step   ({} program steps)",
        r.images_per_s, r.ms_per_step, r.launches_per_step
    );
    println!(
        "  phases of one synchronised eager step: data {:.2} ms, forward {:.2} ms, backward {:.2} ms, optimizer {:.2} ms",
        r.phases.data_ms, r.phases.forward_ms, r.phases.backward_ms, r.phases.optimizer_ms
    );
    println!(
        "  peak device memory {:.1} MiB (arena {:.1} MiB)",
        r.peak_device_bytes as f64 / (1 << 20) as f64,
        r.arena_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  floor: {:.1} MiB moved per step ({:.2} MiB per image) at {:.1} GB/s copy bandwidth = {:.2} ms per step, \
         {:.0} images/s; this run is at {:.0}% of it",
        r.bytes_per_step as f64 / (1 << 20) as f64,
        r.bytes_per_image / (1 << 20) as f64,
        r.device_copy_gb_per_s,
        r.floor_ms_per_step,
        r.floor_images_per_s,
        100.0 * r.fraction_of_floor
    );
    if emulated {
        println!("  note: {}", r.note);
    }
    Ok(())
}
