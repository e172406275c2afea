//! The training configuration: every setting of a run, with the seed's values as defaults, read from and written
//! to TOML. Unknown keys are rejected so a typo never silently falls back to a default.
//!
//! A partial file overrides only what it names, e.g.
//!
//! ```toml
//! epochs = 30
//! precision = "f16"
//! device = "cuda:1"
//!
//! [plateau]
//! patience = 3
//!
//! [[unfreeze]]
//! epoch = 0
//! frozen_blocks = 9
//! lr_multiplier = 1.0
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::early_stop::EarlyStoppingConfig;
use super::history::write_atomic;
use super::plateau::{PlateauConfig, PlateauMode};
use super::scaler::GradScalerConfig;
use super::unfreeze::UnfreezeSchedule;

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32, no loss scaling.
    F32,
    /// Mixed precision: f16 activations and matmuls, f32 master weights, dynamic loss scaling.
    F16,
}

pub use crate::cuda::DeviceRequest;

/// How BatchNorm layers inside frozen backbone blocks behave during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BnFrozenMode {
    /// Frozen blocks' BN normalise with, and keep, their running statistics (eval behaviour): frozen really means
    /// unchanged.
    FrozenEval,
    /// As the seed under `model.train()`: BN in frozen blocks still normalises with batch statistics and updates
    /// its running statistics (only its affine weights are frozen).
    Torch,
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Focal loss over class-weighted cross-entropy (the seed).
    Focal,
    /// Class-weighted cross-entropy, mean over the batch.
    Ce,
}

/// Where the per-class loss weights `alpha` come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassWeighting {
    /// scikit-learn's "balanced": `n_samples / (n_classes · count_c)` over the training split.
    Balanced,
    /// All weights 1.
    Uniform,
}

/// Every training setting. Field defaults are the seed's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Images per optimizer step.
    pub batch_size: usize,
    /// Maximum number of epochs.
    pub epochs: usize,
    /// Base learning rate (head group; the backbone gets `lr × stage multiplier`).
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW first-moment decay.
    pub adam_beta1: f64,
    /// AdamW second-moment decay.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Training loss.
    pub loss: LossKind,
    /// Focal loss exponent γ.
    pub focal_gamma: f64,
    /// Source of the per-class loss weights when `class_weights` is not given.
    pub class_weighting: ClassWeighting,
    /// Explicit per-class loss weights (one per class); overrides `class_weighting`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_weights: Option<Vec<f64>>,
    /// Square input size in pixels.
    pub image_size: usize,
    /// Fraction of the lesions held out for validation.
    pub val_fraction: f64,
    /// Seed of every random draw (split, init, augmentation, dropout).
    pub seed: u64,
    /// Data-loading threads; absent means `min(6, available cores)` as in the seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// f32, or f16 mixed precision with loss scaling.
    pub precision: Precision,
    /// auto, cpu, cuda or cuda:N.
    pub device: DeviceRequest,
    /// BatchNorm behaviour in frozen blocks.
    pub bn_frozen_mode: BnFrozenMode,
    /// ImageNet weights to start from (torchvision's `.pth`); absent means random init.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<PathBuf>,
    /// Dropout before the head's first linear layer.
    pub head_dropout1: f64,
    /// Dropout before the head's last linear layer.
    pub head_dropout2: f64,
    /// Stochastic depth probability of the last MBConv block (scaled linearly over blocks).
    pub stochastic_depth: f64,
    /// Learning-rate plateau scheduler on validation accuracy.
    pub plateau: PlateauConfig,
    /// Dynamic loss scaling (used with `precision = "f16"`).
    pub loss_scale: GradScalerConfig,
    /// Early stopping on validation accuracy.
    pub early_stopping: EarlyStoppingConfig,
    /// Gradual unfreezing stages, as an array of tables `[[unfreeze]]` with `epoch`, `frozen_blocks`,
    /// `lr_multiplier`.
    pub unfreeze: UnfreezeSchedule,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            epochs: 100,
            lr: 5e-5,
            weight_decay: 1e-5,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            loss: LossKind::Focal,
            focal_gamma: 2.0,
            class_weighting: ClassWeighting::Balanced,
            class_weights: None,
            image_size: 224,
            val_fraction: 0.2,
            seed: 42,
            workers: None,
            precision: Precision::F32,
            device: DeviceRequest::Auto,
            bn_frozen_mode: BnFrozenMode::FrozenEval,
            pretrained: None,
            head_dropout1: 0.5,
            head_dropout2: 0.5,
            stochastic_depth: 0.2,
            plateau: PlateauConfig::default(),
            loss_scale: GradScalerConfig::default(),
            early_stopping: EarlyStoppingConfig::default(),
            unfreeze: UnfreezeSchedule::default(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file; keys it does not name keep their defaults. Unknown keys and invalid values are errors
    /// naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read training config {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("invalid training config {}", path.display()))
    }

    /// Parses TOML text and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML (every setting, resolved).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).context("cannot serialize the training config to TOML")
    }

    /// Writes the resolved configuration as TOML (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_toml_string()?.as_bytes())
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> super::adamw::AdamWConfig {
        super::adamw::AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The network these settings train: EfficientNet-B0 with the seed's head, this run's dropout and stochastic
    /// depth. A resumed run rebuilds it from the saved settings, never from defaults.
    pub fn model_config(&self, num_classes: usize) -> crate::nn::ModelConfig {
        let mut mc = crate::nn::ModelConfig::b0(num_classes, crate::nn::HeadKind::Seed);
        mc.seed_dropout = (self.head_dropout1, self.head_dropout2);
        mc.stochastic_depth_prob = self.stochastic_depth;
        mc
    }

    /// The settings (TOML keys, dotted inside tables) in which `self` differs from `saved`, leaving out
    /// [`RESUME_CHANGEABLE`]: a resumed run must compute exactly what the uninterrupted run would have.
    pub fn changes_breaking_resume(&self, saved: &TrainConfig) -> Result<Vec<String>> {
        let new = serde_json::to_value(self).context("cannot compare training configs")?;
        let old = serde_json::to_value(saved).context("cannot compare training configs")?;
        let mut changed = Vec::new();
        diff_keys("", &new, &old, &mut changed);
        changed.retain(|k| !RESUME_CHANGEABLE.contains(&k.as_str()));
        Ok(changed)
    }

    /// Checks ranges and consistency of every setting.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("batch_size must be > 0");
        }
        if self.epochs == 0 {
            bail!("epochs must be > 0");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr must be finite and > 0, got {}", self.lr);
        }
        self.adamw().validate()?;
        if !(self.focal_gamma.is_finite() && self.focal_gamma >= 0.0) {
            bail!("focal_gamma must be finite and >= 0, got {}", self.focal_gamma);
        }
        if let Some(w) = &self.class_weights
            && (w.is_empty() || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)))
        {
            bail!("class_weights must be a non-empty list of finite non-negative numbers");
        }
        if self.image_size < 32 {
            bail!("image_size must be at least 32 (the network downsamples by 32), got {}", self.image_size);
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            bail!("val_fraction must be in (0, 1), got {}", self.val_fraction);
        }
        if self.workers == Some(0) {
            bail!("workers must be > 0 (leave it out for the default)");
        }
        for (name, p) in [
            ("head_dropout1", self.head_dropout1),
            ("head_dropout2", self.head_dropout2),
            ("stochastic_depth", self.stochastic_depth),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("{name} must be in [0, 1), got {p}");
            }
        }
        self.plateau.validate()?;
        if self.plateau.mode != PlateauMode::Max {
            bail!("plateau.mode must be \"max\": the scheduler monitors validation accuracy");
        }
        self.loss_scale.validate()?;
        super::early_stop::EarlyStopping::new(self.early_stopping)?;
        Ok(())
    }
}

/// Settings a resumed run may change: `epochs` (to extend a run; nothing else depends on it), `workers` (the
/// loader's output does not depend on its thread count) and `device` (the CPU reference and the CUDA backend run
/// the same recipe with the same masks and batches; in f32 they agree to about 1e-5, so a run moved between them
/// continues as it would have, to that agreement, not bit for bit).
pub const RESUME_CHANGEABLE: [&str; 3] = ["epochs", "workers", "device"];

/// Collects the dotted keys where two JSON trees differ (a key present on one side only counts as a difference).
fn diff_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                diff_keys(&path, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_and_round_trip() {
        let d = TrainConfig::default();
        assert_eq!((d.batch_size, d.epochs, d.lr, d.weight_decay, d.focal_gamma), (32, 100, 5e-5, 1e-5, 2.0));
        assert_eq!((d.plateau.factor, d.plateau.patience, d.plateau.min_lr), (0.5, 5, 1e-6));
        assert_eq!(d.unfreeze.stages().len(), 5);
        d.validate().unwrap();
        let text = d.to_toml_string().unwrap();
        assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), d);
        // An empty file is the defaults.
        assert_eq!(TrainConfig::from_toml_str("").unwrap(), d);
        // Options and non-default enums survive the trip too.
        let mut c = d.clone();
        c.workers = Some(3);
        c.pretrained = Some(PathBuf::from("weights/b0.pth"));
        c.class_weights = Some(vec![1.0, 2.5]);
        c.device = DeviceRequest::Cuda(2);
        c.precision = Precision::F16;
        c.bn_frozen_mode = BnFrozenMode::Torch;
        c.loss = LossKind::Ce;
        let back = TrainConfig::from_toml_str(&c.to_toml_string().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn resume_comparison_names_every_changed_setting_but_epochs_and_workers() {
        let saved = TrainConfig { head_dropout1: 0.2, ..Default::default() };
        assert!(saved.changes_breaking_resume(&saved).unwrap().is_empty());
        let mut c = saved.clone();
        c.epochs = 300;
        c.workers = Some(2);
        assert!(c.changes_breaking_resume(&saved).unwrap().is_empty());
        c.image_size = 64;
        c.batch_size = 7;
        c.plateau.patience = 9;
        c.head_dropout1 = 0.5;
        c.pretrained = Some(PathBuf::from("b0.pth"));
        assert_eq!(
            c.changes_breaking_resume(&saved).unwrap(),
            ["batch_size", "head_dropout1", "image_size", "plateau.patience", "pretrained"]
        );
    }

    #[test]
    fn partial_file_overrides_only_what_it_names() {
        let text = r#"
            epochs = 30
            precision = "f16"
            device = "cuda:1"
            bn_frozen_mode = "torch"

            [plateau]
            patience = 3

            [[unfreeze]]
            epoch = 0
            frozen_blocks = 9
            lr_multiplier = 1.0

            [[unfreeze]]
            epoch = 4
            frozen_blocks = 0
            lr_multiplier = 0.1
        "#;
        let c = TrainConfig::from_toml_str(text).unwrap();
        let mut expected = TrainConfig {
            epochs: 30,
            precision: Precision::F16,
            device: DeviceRequest::Cuda(1),
            bn_frozen_mode: BnFrozenMode::Torch,
            ..Default::default()
        };
        expected.plateau.patience = 3;
        expected.unfreeze = UnfreezeSchedule::new(vec![
            super::super::unfreeze::Stage { epoch: 0, frozen_blocks: 9, lr_multiplier: 1.0 },
            super::super::unfreeze::Stage { epoch: 4, frozen_blocks: 0, lr_multiplier: 0.1 },
        ])
        .unwrap();
        assert_eq!(c, expected);
        assert_eq!(c.plateau.factor, 0.5);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(&path, "epoch = 3\n").unwrap();
        let err = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(err.contains("train.toml") && err.contains("epoch"), "{err}");
        std::fs::write(&path, "[plateau]\npatiense = 3\n").unwrap();
        let err = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(err.contains("patiense"), "{err}");
        // "gpu" is an accepted alias of cuda:0 (the same parser as --device); "tpu" is not a device.
        std::fs::write(&path, "device = \"tpu\"\n").unwrap();
        let err = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(err.contains("tpu"), "{err}");
        std::fs::write(&path, "[[unfreeze]]\nepoch = 2\nfrozen_blocks = 1\nlr_multiplier = 1.0\n").unwrap();
        let err = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(err.contains("epoch 0"), "{err}");
        std::fs::write(&path, "val_fraction = 1.5\n").unwrap();
        let err = format!("{:#}", TrainConfig::load(&path).unwrap_err());
        assert!(err.contains("val_fraction"), "{err}");
        let err = format!("{:#}", TrainConfig::load(&dir.path().join("nope.toml")).unwrap_err());
        assert!(err.contains("nope.toml"), "{err}");
        // save + load.
        let c = TrainConfig { seed: 7, ..Default::default() };
        c.save(&path).unwrap();
        assert_eq!(TrainConfig::load(&path).unwrap(), c);
    }
}
