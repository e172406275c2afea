//! `derma plan`: records one training step of EfficientNet-B0 (seed head, dropout and stochastic depth on) on the
//! emulated device without running it, and prints the launches with the bytes each reads and writes, the arena
//! peak and the bytes moved per image: the yardstick for GPU work that can be read without a GPU.

use anyhow::{Context, Result, bail};
use clap::Args;
use derma::autograd::Tape;
use derma::backend::cuda::{Cuda, Precision as DevicePrecision};
use derma::cuda::Gpu;
use derma::cuda::program::human_bytes;
use derma::nn::efficientnet::FEATURE_BLOCKS;
use derma::nn::{CounterMasks, Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::batchnorm::BnState;
use derma::ops::loss::{self, LossKind};
use derma::tensor::Array;
use derma::train::config::Precision;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::sync::Arc;

#[derive(Args)]
pub struct PlanArgs {
    /// Unfreezing stage: feature blocks 0..K frozen (0: everything trains, 9: the head only).
    #[arg(long, default_value_t = 0)]
    stage: usize,
    /// Images per step.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, value_enum, default_value = "f16")]
    precision: Precision,
    /// Classes of the seed head.
    #[arg(long, default_value_t = 8)]
    classes: usize,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_plan(a: PlanArgs) -> Result<()> {
    if a.stage > FEATURE_BLOCKS {
        bail!("--stage {} is out of range: 0 (all blocks train) to {FEATURE_BLOCKS} (the head only)", a.stage);
    }
    if a.batch < 2 {
        bail!("--batch {} is too small: a training step's batch norm needs at least 2 images", a.batch);
    }
    if a.classes < 2 {
        bail!("--classes {} is too few: a classifier needs at least 2", a.classes);
    }
    derma::data::check_image_side(a.size, "--size")?;
    let precision = match a.precision {
        Precision::F32 => DevicePrecision::F32,
        Precision::F16 => DevicePrecision::F16,
    };
    let mut model = EfficientNet::<f32>::new(ModelConfig::b0(a.classes, HeadKind::Seed), 0);
    model.freeze_blocks(a.stage)?;
    let gpu = Arc::new(Gpu::emulated().context("opening the emulated device to record on")?);
    let bns: Vec<&BnState<f32>> = model.batch_norms().into_iter().map(|b| &b.state).collect();
    let cuda = Cuda::new(gpu, &model.params, &bns, precision)?;
    let mut tape = Tape::on(cuda);
    let images = Array::zeros(&[a.batch, a.size, a.size, 3]);
    let x = tape.backend_mut().input(&images)?;
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = Ctx { counter_masks: Some(CounterMasks { seed: 0, epoch: 0, step: 0 }), ..Ctx::train(&mut rng) };
    let logits = model.forward(&mut tape, x, &mut ctx).context("recording the forward pass")?;
    let targets: Vec<usize> = (0..a.batch).map(|i| i % a.classes).collect();
    let l = loss::loss(&mut tape, logits, &targets, None, &LossKind::Focal { gamma: 2.0 })?;
    tape.backward(l, &mut model.params).context("recording the backward pass")?;
    let cuda = tape.into_backend();
    let plan = cuda.plan()?;
    let report = cuda.program().report(&plan);
    let per_image = report.per_image(a.batch)?;
    if a.json {
        let json = serde_json::json!({
            "stage": a.stage,
            "batch": a.batch,
            "size": a.size,
            "precision": a.precision,
            "report": report.to_json()?,
            "per_image": per_image,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", report.table());
        println!(
            "per image (batch {}, {}x{}, {:?}, stage {}): {} moved ({} read, {} written)",
            a.batch,
            a.size,
            a.size,
            a.precision,
            a.stage,
            human_bytes(per_image.moved_bytes as usize),
            human_bytes(per_image.read_bytes as usize),
            human_bytes(per_image.written_bytes as usize)
        );
    }
    Ok(())
}
