//! Training checkpoints: one safetensors file holding everything a run needs to continue.
//!
//! - tensors: the model's state dict under torchvision's names (PyTorch can load it after dropping the
//!   `optimizer.` entries), and AdamW's moments as `optimizer.exp_avg.<name>` / `optimizer.exp_avg_sq.<name>`;
//! - metadata: `epoch`, `val_acc`, `frozen_layers` and `config` (JSON) as the seed's checkpoint has them, plus
//!   `class_names`, `image_size` and `derma.train_state` (scheduler, scaler, early stopping, unfreezing stage,
//!   position in the epoch, AdamW step counts, history).
//!
//! Files are written to a temporary name and renamed, so a crash never leaves a broken checkpoint.
//!
//! Integrity: `derma.checksums` holds a CRC-32 of every tensor (over its dtype, shape and bytes) and
//! `derma.metadata_crc32` one of all other metadata entries. Every load of a derma checkpoint ([`load`],
//! [`load_weights`]) verifies both and refuses a damaged file, naming the file and the tensor. Files without
//! checksums (PyTorch weights, checkpoints of derma before checksums) load with a warning when they look like a
//! derma checkpoint, since their integrity cannot be checked.

use super::adamw::{AdamW, ParamState};
use super::config::TrainConfig;
use super::early_stop::EarlyStopping;
use super::history::History;
use super::plateau::ReduceLrOnPlateau;
use super::scaler::GradScaler;
use crate::data::ISIC_CLASSES;
use crate::io::{self, Checkpoint, CheckpointMeta, StateDict};
use crate::nn::EfficientNet;
use crate::tensor::Tensor;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const OPT_M: &str = "optimizer.exp_avg.";
const OPT_V: &str = "optimizer.exp_avg_sq.";
const STATE_KEY: &str = "derma.train_state";
const CHECKSUMS_KEY: &str = "derma.checksums";
const META_CHECKSUM_KEY: &str = "derma.metadata_crc32";

/// Running sums of a partly trained epoch (so an interrupted epoch resumes exactly).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// Batches of the epoch already trained.
    pub step: usize,
    pub loss_sum: f64,
    pub correct: usize,
    pub seen: usize,
    /// Training seconds spent in the epoch so far.
    pub seconds: f64,
}

/// Everything besides weights and moments that a resumed run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The epoch in progress (or the next one, when `progress.step == 0`).
    pub epoch: usize,
    pub progress: EpochProgress,
    pub adam_steps: BTreeMap<String, u64>,
    pub plateau: ReduceLrOnPlateau,
    pub early: EarlyStopping,
    pub scaler: GradScaler,
    pub history: History,
    pub best_val_acc: Option<f64>,
    pub class_weights: Vec<f32>,
}

impl TrainState {
    /// The state of a run that has not started: `cfg`'s schedules, and a loss scaler that scales as the seed's
    /// GradScaler does for mixed precision (f16), or also in f32 when `scale_loss_in_f32`; f32 needs no scaling.
    pub fn fresh(cfg: &TrainConfig, class_weights: Vec<f32>, scale_loss_in_f32: bool) -> Result<Self> {
        use super::config::Precision;
        Ok(TrainState {
            epoch: 0,
            progress: EpochProgress::default(),
            adam_steps: Default::default(),
            plateau: ReduceLrOnPlateau::new(cfg.plateau, &[cfg.lr])?,
            early: EarlyStopping::new(cfg.early_stopping)?,
            scaler: match (cfg.precision, scale_loss_in_f32) {
                (Precision::F16, _) | (Precision::F32, true) => GradScaler::new(cfg.loss_scale)?,
                (Precision::F32, false) => GradScaler::disabled(),
            },
            history: History::new(),
            best_val_acc: None,
            class_weights,
        })
    }
}

/// A checkpoint as loaded.
pub struct Loaded {
    pub model: EfficientNet<f32>,
    pub class_names: Vec<String>,
    pub image_size: usize,
    pub config: Option<TrainConfig>,
    pub state: Option<TrainState>,
    pub meta: CheckpointMeta,
    moments: Vec<(String, Tensor, Tensor)>,
}

impl Loaded {
    /// Puts the saved moments and step counts into an optimizer.
    pub fn restore_optimizer(&self, adamw: &mut AdamW) -> Result<()> {
        let steps = self.state.as_ref().map(|s| &s.adam_steps);
        for (name, m, v) in &self.moments {
            let step = steps.and_then(|s| s.get(name)).copied().unwrap_or(0);
            adamw.insert_state(name, ParamState { step, exp_avg: m.to_f32_vec(), exp_avg_sq: v.to_f32_vec() })?;
        }
        Ok(())
    }
}

/// Writes a checkpoint atomically.
pub fn save(
    path: &Path,
    model: &EfficientNet<f32>,
    adamw: &AdamW,
    state: &TrainState,
    config: &TrainConfig,
    class_names: &[String],
    image_size: usize,
) -> Result<()> {
    let mut sd = model.state_dict();
    let mut steps = BTreeMap::new();
    for (name, st) in adamw.states() {
        // Moments stay in derma's internal layout (OHWI for convs), flattened: they only come back to derma.
        let n = st.exp_avg.len();
        sd.insert(format!("{OPT_M}{name}"), Tensor::from_f32(&[n], st.exp_avg.clone())?);
        sd.insert(format!("{OPT_V}{name}"), Tensor::from_f32(&[n], st.exp_avg_sq.clone())?);
        steps.insert(name.to_string(), st.step);
    }
    let mut st = state.clone();
    st.adam_steps = steps;
    let meta = CheckpointMeta {
        epoch: Some(state.epoch as i64),
        val_acc: state.history.epochs.last().map(|r| r.val_acc),
        frozen_layers: Some(model.frozen_blocks as i64),
        config: Some(serde_json::to_value(config)?),
        strings: Default::default(),
    };
    let mut strings = meta.to_strings();
    strings.insert("class_names".into(), serde_json::to_string(class_names)?);
    strings.insert("image_size".into(), image_size.to_string());
    strings.insert(STATE_KEY.into(), serde_json::to_string(&st)?);
    let sums: BTreeMap<&str, String> = sd.iter().map(|(n, t)| (n, format!("{:08x}", tensor_crc(t)))).collect();
    strings.insert(CHECKSUMS_KEY.into(), serde_json::to_string(&sums)?);
    strings.insert(META_CHECKSUM_KEY.into(), format!("{:08x}", metadata_crc(&strings)));
    io::save_safetensors(path, &sd, Some(strings)).with_context(|| format!("writing checkpoint {}", path.display()))
}

/// Class names for a model of `n` classes when the file does not name them.
fn default_class_names(n: usize) -> Vec<String> {
    if n == 8 || n == 9 {
        ISIC_CLASSES[..n].iter().map(|s| s.to_string()).collect()
    } else {
        (0..n).map(|i| format!("class{i}")).collect()
    }
}

/// CRC-32 of a tensor's dtype, shape and little-endian bytes.
fn tensor_crc(t: &Tensor) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(t.dtype().to_string().as_bytes());
    for d in &t.shape {
        h.update(&(*d as u64).to_le_bytes());
    }
    h.update(&t.storage.to_le_bytes());
    h.finalize()
}

/// CRC-32 of every metadata entry except the metadata checksum itself, in key order.
fn metadata_crc(strings: &HashMap<String, String>) -> u32 {
    let mut entries: Vec<(&String, &String)> = strings.iter().filter(|(k, _)| *k != META_CHECKSUM_KEY).collect();
    entries.sort();
    let mut h = crc32fast::Hasher::new();
    for (k, v) in entries {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize()
}

/// What [`verify`] could establish about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Every tensor and the metadata match the checksums written with them.
    Verified,
    /// The file carries no checksums (not written by this version of derma).
    Unchecked,
}

/// Checks a loaded file against the checksums it carries; a mismatch is an error naming the file and the tensor.
pub fn verify(path: &Path, ckpt: &Checkpoint) -> Result<Integrity> {
    let strings = &ckpt.meta.strings;
    let (Some(sums), Some(meta_sum)) = (strings.get(CHECKSUMS_KEY), strings.get(META_CHECKSUM_KEY)) else {
        if strings.contains_key(CHECKSUMS_KEY) || strings.contains_key(META_CHECKSUM_KEY) {
            bail!(
                "{}: the checkpoint's metadata is damaged (one of {CHECKSUMS_KEY}, {META_CHECKSUM_KEY} is missing)",
                path.display()
            );
        }
        return Ok(Integrity::Unchecked);
    };
    let damaged = |what: String| {
        anyhow::anyhow!(
            "{}: {what}: the file was damaged after it was written (disk or copy error); do not train or evaluate \
             on it: use another checkpoint of the run (best.safetensors / last.safetensors) or a backup",
            path.display()
        )
    };
    if format!("{:08x}", metadata_crc(strings)) != *meta_sum {
        return Err(damaged("the metadata (config, training state, class names) fails its checksum".into()));
    }
    let sums: BTreeMap<String, String> =
        serde_json::from_str(sums).map_err(|e| damaged(format!("the tensor checksum table is unreadable ({e})")))?;
    for (name, t) in ckpt.state_dict.iter() {
        let expected = sums.get(name).ok_or_else(|| damaged(format!("tensor {name} has no checksum")))?;
        let actual = format!("{:08x}", tensor_crc(t));
        if actual != *expected {
            return Err(damaged(format!("tensor {name} fails its checksum (crc32 {actual}, written {expected})")));
        }
    }
    if let Some(missing) = sums.keys().find(|n| !ckpt.state_dict.contains(n)) {
        return Err(damaged(format!("tensor {missing} is missing")));
    }
    Ok(Integrity::Verified)
}

/// Reads any weight file ([`io::load_checkpoint`]) and, when it is a derma checkpoint, verifies its checksums.
/// Use this rather than `io::load_checkpoint` wherever a derma checkpoint may be given.
pub fn load_weights(path: &Path) -> Result<Checkpoint> {
    let ckpt = io::load_checkpoint(path)?;
    if verify(path, &ckpt)? == Integrity::Unchecked {
        let s = &ckpt.meta.strings;
        if s.contains_key(STATE_KEY) || s.contains_key("class_names") {
            eprintln!(
                "warning: {} has no checksums (written by a derma before checksums were added): its integrity cannot \
                 be verified",
                path.display()
            );
        }
    }
    Ok(ckpt)
}

/// Loads a derma checkpoint (verifying its checksums), a seed checkpoint (.pth) or plain weights. A derma
/// training checkpoint's model is built with the dropout and stochastic depth of its saved config.
pub fn load(path: &Path) -> Result<Loaded> {
    let ckpt = load_weights(path)?;
    let mut weights = StateDict::new();
    let mut m_map = BTreeMap::new();
    let mut v_map = BTreeMap::new();
    for (k, t) in ckpt.state_dict.into_entries() {
        if let Some(n) = k.strip_prefix(OPT_M) {
            m_map.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix(OPT_V) {
            v_map.insert(n.to_string(), t);
        } else {
            weights.insert(k, t);
        }
    }
    let mut moments = Vec::new();
    for (n, m) in m_map {
        let v = v_map
            .remove(&n)
            .with_context(|| format!("{}: optimizer moment exp_avg_sq of {n} is missing", path.display()))?;
        moments.push((n, m, v));
    }
    let s = &ckpt.meta.strings;
    let config = match &ckpt.meta.config {
        Some(c) if s.contains_key(STATE_KEY) => Some(
            serde_json::from_value::<TrainConfig>(c.clone())
                .with_context(|| format!("{}: bad config", path.display()))?,
        ),
        _ => None,
    };
    let model = (|| -> Result<EfficientNet<f32>> {
        let mut mc = crate::nn::efficientnet::infer_config(&weights)?;
        if let Some(c) = &config {
            mc.seed_dropout = (c.head_dropout1, c.head_dropout2);
            mc.stochastic_depth_prob = c.stochastic_depth;
        }
        let mut model = EfficientNet::new(mc, 0);
        model.load_state_dict(&weights)?;
        Ok(model)
    })()
    .with_context(|| format!("loading {}", path.display()))?;
    let class_names = match s.get("class_names") {
        Some(j) => {
            serde_json::from_str::<Vec<String>>(j).with_context(|| format!("{}: bad class_names", path.display()))?
        }
        None => default_class_names(model.config.num_classes),
    };
    if class_names.len() != model.config.num_classes {
        bail!("{}: {} class names for a {}-class model", path.display(), class_names.len(), model.config.num_classes);
    }
    let image_size = match s.get("image_size") {
        Some(v) => v.parse().with_context(|| format!("{}: bad image_size {v:?}", path.display()))?,
        None => 224,
    };
    let state = match s.get(STATE_KEY) {
        Some(j) => Some(serde_json::from_str(j).with_context(|| format!("{}: bad training state", path.display()))?),
        None => None,
    };
    Ok(Loaded { model, class_names, image_size, config, state, meta: ckpt.meta, moments })
}
