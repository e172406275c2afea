//! `derma eval`: scores a checkpoint on a labelled dataset.

use anyhow::{Context, Result, bail};
use clap::Args;
use derma::backend::cuda::Precision as DevicePrecision;
use derma::cuda::{self, DeviceRequest};
use derma::data::{self, PrepareOptions};
use derma::ops::loss::LossKind;
use derma::train::checkpoint;
use derma::train::config::{LossKind as CfgLoss, TrainConfig};
use derma::train::device::DeviceEval;
use derma::train::metrics::{Report, render_report};
use derma::train::trainer;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Which images of the dataset to score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The validation split the checkpoint's run used (same fraction and seed).
    Val,
    /// Every usable image.
    All,
}

/// `derma eval` flags.
#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint to score: derma's .safetensors, the seed's .pth checkpoint or plain torchvision weights.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset folder (ISIC 2019 layout, or labels.csv + images/).
    #[arg(long)]
    data: PathBuf,
    /// Cache folder for the decoded images [default: <DATA>/.derma-cache-<checkpoint's image size>].
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "val")]
    split: Split,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// One JSON object on stdout instead of tables.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "auto", value_parser = cuda::parse_device, help = cuda::DEVICE_HELP)]
    device: DeviceRequest,
}

/// What `--json` prints: the report's fields plus what was scored.
#[derive(Serialize)]
struct EvalJson<'a> {
    checkpoint: String,
    data: String,
    split: Split,
    n: usize,
    class_names: &'a [String],
    image_size: usize,
    /// Mean loss with the checkpoint's loss settings (focal or cross-entropy, its class weights when saved).
    loss: f64,
    #[serde(flatten)]
    report: &'a Report,
}

/// Loads the checkpoint, prepares the data at its image size and split, evaluates and prints the report.
pub fn run_eval(a: EvalArgs) -> Result<()> {
    let selected = cuda::select(a.device)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let mut loaded = checkpoint::load(&a.checkpoint)?;
    data::check_image_side(loaded.image_size, &format!("the image size of {}", a.checkpoint.display()))?;
    derma::interrupt::install()?;
    // The split must be the one the run validated on: same fraction and seed as its config, else the defaults.
    let defaults = TrainConfig::default();
    let cfg = loaded.config.as_ref().unwrap_or(&defaults);
    let prepared = Arc::new(data::prepare(&PrepareOptions {
        cache: a.cache.clone(),
        size: loaded.image_size as u32,
        val_fraction: cfg.val_fraction,
        seed: cfg.seed,
        quiet: a.json,
        ..PrepareOptions::new(a.data.clone())
    })?);
    if prepared.class_names != loaded.class_names {
        bail!(
            "{} was trained on classes [{}] but {} has classes [{}]: evaluate on data with the same classes in the \
             same order",
            a.checkpoint.display(),
            loaded.class_names.join(", "),
            a.data.display(),
            prepared.class_names.join(", ")
        );
    }
    let indices: Vec<usize> = match a.split {
        Split::Val => prepared.val.clone(),
        Split::All => (0..prepared.len()).collect(),
    };
    if indices.is_empty() {
        match a.split {
            Split::Val => bail!(
                "the validation split of {} is empty (val_fraction {}): use --split all",
                a.data.display(),
                cfg.val_fraction
            ),
            Split::All => bail!("{} has no usable images", a.data.display()),
        }
    }
    // A batch never holds more than the images scored.
    let batch = a.batch_size.min(indices.len());
    if selected == cuda::Selected::Cpu {
        let need = derma::data::memory::eval_estimate(batch, loaded.image_size, loaded.model.params.counts().0);
        derma::data::memory::check_fits(&need, "--batch-size")?;
    }
    let kind = match cfg.loss {
        CfgLoss::Focal => LossKind::Focal { gamma: cfg.focal_gamma },
        CfgLoss::Ce => LossKind::CrossEntropy,
    };
    let alpha =
        loaded.state.as_ref().map(|s| s.class_weights.clone()).filter(|w| w.len() == prepared.class_names.len());
    let ev = match &selected {
        cuda::Selected::Cpu => {
            trainer::evaluate(&mut loaded.model, &prepared, &indices, batch, loaded.image_size, alpha.as_deref(), &kind)
        }
        // On a device: the eval-mode forward recorded once, in f32 (the checkpoint's weights as trained).
        sel => cuda::Gpu::open(sel)
            .and_then(|g| DeviceEval::new(Arc::new(g), &loaded.model, DevicePrecision::F32, batch, loaded.image_size))
            .and_then(|mut e| e.evaluate(&mut loaded.model, &prepared, &indices, alpha.as_deref(), &kind)),
    }
    .with_context(|| format!("evaluating {} on {}", a.checkpoint.display(), a.data.display()))?;
    if a.json {
        let out = EvalJson {
            checkpoint: a.checkpoint.display().to_string(),
            data: a.data.display().to_string(),
            split: a.split,
            n: indices.len(),
            class_names: &loaded.class_names,
            image_size: loaded.image_size,
            loss: ev.loss,
            report: &ev.report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let split = match a.split {
            Split::Val => "validation split",
            Split::All => "all images",
        };
        println!("checkpoint {}", a.checkpoint.display());
        println!("data       {} ({split}: {} images at {}px)", a.data.display(), indices.len(), loaded.image_size);
        println!("loss       {:.4}", ev.loss);
        println!();
        print!("{}", render_report(&ev.report, &loaded.class_names));
    }
    Ok(())
}
