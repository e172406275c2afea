//! `derma train`.

use anyhow::{Context, Result, bail};
use clap::Args;
use derma::data::synth::{SynthOptions, synth};
use derma::train::config::{BnFrozenMode, DeviceRequest, LossKind, Precision, TrainConfig};
use derma::train::run_dir::{self, RunSource};
use derma::train::trainer::{self, TrainRun};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset folder (ISIC 2019 layout, or labels.csv + images/). Without it, derma makes a synthetic
    /// ISIC-layout dataset in the run folder and trains a short demonstration schedule on it.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cache folder for the decoded images [default: <DATA>/.derma-cache-<IMAGE_SIZE>]; needed when the dataset
    /// folder is read-only and has no cache yet. A resumed run reuses the one it recorded unless given here.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// TOML file with any training setting (flags given here override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder for checkpoints, history, plots and the resolved config; a folder that already holds a run is
    /// refused [default: a new runs/run-<UTC time>, linked as runs/latest].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace the run already in --out instead of refusing it.
    #[arg(long, requires = "out")]
    overwrite: bool,
    /// Continue the run in this folder from its last checkpoint, with its saved settings, data and cache folder.
    /// Only --epochs (to extend it), --workers, --device (CPU and GPU agree to about 1e-5 in f32), --stream-data
    /// and --quiet may differ from the run's settings.
    #[arg(long, conflicts_with_all = ["config", "out", "overwrite"])]
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
    #[arg(long, help = derma::cuda::DEVICE_HELP)]
    device: Option<DeviceRequest>,
    /// f32, or f16 (mixed precision with loss scaling, as the seed's autocast + GradScaler; needs --device cuda
    /// or emu) [default: f32].
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
    /// Wait for a signal after this many optimizer steps (for testing signal handling).
    #[arg(long, hide = true)]
    hold_after_steps: Option<usize>,
    /// Wait for a signal once this many epochs are complete and saved (for testing a kill at an epoch boundary).
    #[arg(long, hide = true)]
    hold_after_epochs: Option<usize>,
    /// With --device: keep the decoded dataset on the host and stream each batch to the device (double-buffered)
    /// even when it would fit there, leaving the memory to the model. A dataset too large for the device is
    /// streamed without it.
    #[arg(long)]
    stream_data: bool,
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

/// The flag that sets a config key, for errors about a resume.
fn flag_of(key: &str) -> String {
    match key {
        "bn_frozen_mode" => "--frozen-bn".into(),
        "early_stopping.patience" => "--patience".into(),
        k if !k.contains('.') => format!("--{}", k.replace('_', "-")),
        k => k.into(),
    }
}

/// A path as a shell word (quoted when it holds anything but plain path characters).
fn shell_word(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Applies the command-line settings to `cfg`.
fn apply_flags(a: &TrainArgs, cfg: &mut TrainConfig) {
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
}

/// Settings, data and cache of the run in `dir`, with the flags a resume allows applied.
fn resume_setup(a: &TrainArgs, dir: &Path) -> Result<(TrainConfig, PathBuf, Option<PathBuf>)> {
    let saved = TrainConfig::load(&dir.join("config.toml"))
        .with_context(|| format!("{} does not hold a run to resume", dir.display()))?;
    let mut cfg = saved.clone();
    apply_flags(a, &mut cfg);
    cfg.validate()?;
    let changed = cfg.changes_breaking_resume(&saved)?;
    if let Some(key) = changed.first() {
        let flags: Vec<String> = changed.iter().map(|k| flag_of(k)).collect();
        bail!(
            "--resume continues a run exactly as it was started, so it cannot change {} (the run has {key} = {}): \
             only --epochs, --workers, --device, --stream-data and --quiet may be given with --resume; start a new run \
             to change settings",
            flags.join(", "),
            serde_json::to_value(&saved)?.pointer(&format!("/{}", key.replace('.', "/"))).map_or_else(
                || "nothing".to_string(),
                |v| if v.is_null() { "nothing".to_string() } else { v.to_string() }
            )
        );
    }
    let source = RunSource::load(dir)?;
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (data, cache) = match (&a.data, source) {
        (Some(d), Some(s)) if canonical(d) != s.data => {
            if s.data.exists() {
                bail!(
                    "--data {} is not the run's data ({}): a resumed run trains on the same data (leave --data out)",
                    d.display(),
                    s.data.display()
                );
            }
            eprintln!("note: the run's data {} is gone; continuing on {} instead", s.data.display(), d.display());
            (d.clone(), None)
        }
        (Some(d), None) => (d.clone(), None),
        (_, Some(s)) => {
            if !s.data.exists() {
                bail!("the run's data folder {} no longer exists: pass its new place with --data", s.data.display());
            }
            let cache = s.cache.exists().then_some(s.cache);
            (s.data, cache)
        }
        (None, None) => {
            let synthetic = dir.join("synthetic-data");
            if !synthetic.exists() {
                bail!("{} does not record its data folder (run.toml): pass it with --data", dir.display());
            }
            (synthetic, None)
        }
    };
    Ok((cfg, data, cache))
}

/// Refuses an image size outside the supported range, and a batch whose memory estimate exceeds what is available,
/// before any data is read.
fn check_sizes(cfg: &TrainConfig) -> Result<()> {
    derma::data::check_image_side(cfg.image_size, "--image-size")?;
    let workers = cfg.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(6));
    let need = derma::data::memory::train_estimate(cfg.batch_size, cfg.image_size, workers, 2);
    derma::data::memory::check_fits(&need, "--batch-size or --image-size")
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    // First, so that a signal while the data is prepared is handled as well.
    derma::interrupt::install()?;
    let (cfg, out, data, cache) = match &a.resume {
        Some(dir) => {
            let (cfg, data, cache) = resume_setup(&a, dir)?;
            check_sizes(&cfg)?;
            (cfg, dir.clone(), data, a.cache.clone().or(cache))
        }
        None => {
            let mut cfg = match &a.config {
                Some(p) => TrainConfig::load(p)?,
                None if a.data.is_none() => demo_config(TrainConfig::default())?,
                None => TrainConfig::default(),
            };
            apply_flags(&a, &mut cfg);
            if let Some(p) = &cfg.pretrained {
                cfg.pretrained = Some(derma::io::fetch::resolve_pretrained(p)?);
            }
            cfg.validate()?;
            check_sizes(&cfg)?;
            let out = match &a.out {
                Some(o) => {
                    run_dir::claim(o, a.overwrite)?;
                    o.clone()
                }
                None => {
                    let root = Path::new("runs");
                    let dir = run_dir::create_unique(root)?;
                    run_dir::point_latest(root, &dir)?;
                    dir
                }
            };
            let data = match &a.data {
                Some(d) => d.clone(),
                None => {
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
            (cfg, out, data, a.cache.clone())
        }
    };
    let outcome = trainer::run(&TrainRun {
        cache,
        resume: a.resume.is_some(),
        overwrite: a.overwrite,
        quiet: a.quiet,
        stream_data: a.stream_data,
        stop_after_steps: a.stop_after_steps,
        hold_after_steps: a.hold_after_steps,
        hold_after_epochs: a.hold_after_epochs,
        ..TrainRun::new(cfg, data, out.clone())
    })?;
    if outcome.interrupted {
        eprintln!(
            "interrupted after {} (progress saved); continue with: derma train --resume {}",
            plural(outcome.epochs_completed, "complete epoch"),
            shell_word(&out)
        );
        std::process::exit(derma::interrupt::EXIT_INTERRUPTED);
    }
    if let Some(r) = &outcome.last {
        eprintln!(
            "done: {}, best val acc {:.4}, last val balanced acc {:.4}; run folder {}",
            plural(outcome.epochs_completed, "epoch"),
            outcome.best_val_acc.unwrap_or(0.0),
            r.val_balanced_acc,
            out.display()
        );
    }
    Ok(())
}
