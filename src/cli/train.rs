//! `derma train`.

use anyhow::{Context, Result, bail};
use clap::Args;
use derma::data::synth::{SynthOptions, synth};
use derma::train::config::{BnFrozenMode, DeviceRequest, LossKind, Precision, TrainConfig};
use derma::train::trainer::{self, TrainRun};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset folder (ISIC 2019 layout, or labels.csv + images/). Without it, derma makes a synthetic
    /// ISIC-layout dataset in the run folder and trains a short demonstration schedule on it.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cache folder for the decoded images [default: <DATA>/.derma-cache-<IMAGE_SIZE>]; needed when the dataset
    /// folder is read-only and has no cache yet.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// TOML file with any training setting (flags given here override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder for checkpoints, history, plots and the resolved config [default: runs/<time>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (the saved config is used).
    #[arg(long, conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Backbone weights: `imagenet` (torchvision's EfficientNet-B0 ImageNet weights, downloaded once into the
    /// cache: see `derma weights fetch`), or a file (.pth, .safetensors, a seed or derma checkpoint; a file
    /// literally named `imagenet` is `./imagenet`).
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Maximum number of epochs [config default: 100].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per optimizer step [config default: 32].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate (the head's; the backbone's is this times the stage multiplier) [default: 5e-5].
    #[arg(long)]
    lr: Option<f64>,
    /// Square input size in pixels [default: 224].
    #[arg(long)]
    image_size: Option<usize>,
    /// Seed of every random draw: split, initialisation, augmentation, dropout [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Data-loading threads [default: min(6, cores)].
    #[arg(long)]
    workers: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceRequest>,
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// focal (the seed) or ce.
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    /// Early-stopping patience in epochs (0 turns it off).
    #[arg(long)]
    patience: Option<u32>,
    /// Batch norm in frozen blocks: frozen-eval (derma's default: use and keep running statistics) or torch
    /// (batch statistics, running statistics updated, as PyTorch's train mode does).
    #[arg(long, value_enum)]
    frozen_bn: Option<BnFrozenMode>,
    /// Stop after this many optimizer steps, saving as on Ctrl-C (for testing resumption).
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
    /// Logs instead of progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The embedded demonstration: small images and a compressed version of the seed's unfreezing schedule, so a
/// 2-core CPU finishes in about two to three minutes on random initialisation.
fn demo_config(mut c: TrainConfig) -> Result<TrainConfig> {
    c.image_size = 64;
    c.batch_size = 16;
    c.epochs = 10;
    c.lr = 1e-3;
    c.head_dropout1 = 0.2;
    c.head_dropout2 = 0.2;
    c.unfreeze = UnfreezeSchedule::new(vec![
        Stage { epoch: 0, frozen_blocks: 3, lr_multiplier: 1.0 },
        Stage { epoch: 2, frozen_blocks: 0, lr_multiplier: 1.0 },
    ])?;
    c.early_stopping.patience = 0;
    // A short run shows the plateau scheduler at work only with a short patience.
    c.plateau.patience = 1;
    Ok(c)
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let (mut cfg, out, resume) = match &a.resume {
        Some(dir) => (TrainConfig::load(&dir.join("config.toml"))?, dir.clone(), true),
        None => {
            let cfg = match &a.config {
                Some(p) => TrainConfig::load(p)?,
                None if a.data.is_none() => demo_config(TrainConfig::default())?,
                None => TrainConfig::default(),
            };
            let out = a.out.clone().unwrap_or_else(|| {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                PathBuf::from("runs").join(format!("run-{t}"))
            });
            (cfg, out, false)
        }
    };
    if let Some(v) = &a.pretrained {
        cfg.pretrained = Some(v.clone());
    }
    macro_rules! set {
        ($field:ident, $v:expr) => {
            if let Some(v) = $v {
                cfg.$field = v;
            }
        };
    }
    set!(epochs, a.epochs);
    set!(batch_size, a.batch_size);
    set!(lr, a.lr);
    set!(image_size, a.image_size);
    set!(seed, a.seed);
    set!(device, a.device);
    set!(precision, a.precision);
    set!(loss, a.loss);
    set!(bn_frozen_mode, a.frozen_bn);
    if let Some(w) = a.workers {
        cfg.workers = Some(w);
    }
    if let Some(p) = a.patience {
        cfg.early_stopping.patience = p;
    }
    if !resume && let Some(p) = &cfg.pretrained {
        cfg.pretrained = Some(derma::io::fetch::resolve_pretrained(p)?);
    }
    cfg.validate()?;
    derma::data::check_image_side(cfg.image_size, "--image-size")?;
    let workers = cfg.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(6));
    let need = derma::data::memory::train_estimate(cfg.batch_size, cfg.image_size, workers, 2);
    derma::data::memory::check_fits(&need, "--batch-size or --image-size")?;
    let data = match (&a.data, resume) {
        (Some(d), _) => d.clone(),
        (None, true) => {
            let synthetic = out.join("synthetic-data");
            if !synthetic.exists() {
                bail!(
                    "--resume {} needs --data: the run was not trained on the embedded synthetic data",
                    out.display()
                );
            }
            synthetic
        }
        (None, false) => {
            let dir = out.join("synthetic-data");
            eprintln!("no --data: writing a synthetic ISIC 2019-layout dataset to {}", dir.display());
            let s = synth(&SynthOptions {
                out: dir.clone(),
                n: 1200,
                seed: cfg.seed,
                faults: false,
                width: 160,
                height: 120,
            })
            .context("making the synthetic dataset")?;
            eprintln!("{} images, classes {:?}", s.rows, s.class_counts);
            dir
        }
    };
    derma::interrupt::install()?;
    let outcome = trainer::run(&TrainRun {
        config: cfg,
        data,
        out: out.clone(),
        resume,
        cache: a.cache.clone(),
        quiet: a.quiet,
        stop_after_steps: a.stop_after_steps,
    })?;
    if outcome.interrupted {
        eprintln!("stopped early at the user's request; resume with: derma train --resume {}", out.display());
        return Ok(());
    }
    if let Some(r) = &outcome.last {
        eprintln!(
            "done: {} epochs, best val acc {:.4}, last val balanced acc {:.4}; run folder {}",
            outcome.epochs_completed,
            outcome.best_val_acc.unwrap_or(0.0),
            r.val_balanced_acc,
            out.display()
        );
    }
    Ok(())
}
