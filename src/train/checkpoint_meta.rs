//! The non-tensor part of a training checkpoint: everything needed to resume a run exactly, beside the model
//! weights and the optimizer moments (which are tensors and go into the tensor file, named by
//! [`crate::train::adamw::AdamW::tensor_entries`]).
//!
//! It mirrors the seed's `best_model_gradual.pth` keys (`epoch`, `val_acc`, `frozen_layers`, `config`) and adds
//! the scheduler, loss-scaler and early-stopping states and the per-parameter optimizer step counts.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::adamw::AdamWConfig;
use super::config::TrainConfig;
use super::early_stop::EarlyStopping;
use super::history::write_atomic;
use super::plateau::ReduceLrOnPlateau;
use super::scaler::GradScaler;

/// Resumable training state, serialized as JSON beside the tensor file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Last completed epoch (0-based).
    pub epoch: usize,
    /// Validation accuracy at that epoch.
    pub val_acc: f64,
    /// Frozen `features` children at that epoch.
    pub frozen_layers: usize,
    /// The run's resolved configuration.
    pub config: TrainConfig,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Step count of every parameter that has optimizer state, by parameter name.
    pub optimizer_steps: Vec<(String, u64)>,
    /// Learning-rate scheduler state.
    pub plateau: ReduceLrOnPlateau,
    /// Loss-scaler state.
    pub scaler: GradScaler,
    /// Early-stopping state.
    pub early_stopping: EarlyStopping,
}

impl CheckpointMeta {
    /// Writes the metadata as pretty JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("cannot serialize checkpoint metadata")?;
        write_atomic(path, text.as_bytes())
    }

    /// Reads metadata written by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read checkpoint metadata {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid checkpoint metadata", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::early_stop::EarlyStoppingConfig;
    use crate::train::plateau::PlateauConfig;
    use crate::train::scaler::GradScalerConfig;

    #[test]
    fn round_trip_through_a_file() {
        let mut plateau = ReduceLrOnPlateau::new(PlateauConfig::default(), &[5e-5]).unwrap();
        for m in [0.5, 0.6, 0.6] {
            plateau.step(m);
        }
        let mut scaler = GradScaler::new(GradScalerConfig::default()).unwrap();
        scaler.update(true);
        let mut early_stopping = EarlyStopping::new(EarlyStoppingConfig::default()).unwrap();
        early_stopping.update(0, 0.5);
        let meta = CheckpointMeta {
            epoch: 2,
            val_acc: 0.6,
            frozen_layers: 7,
            config: TrainConfig::default(),
            adamw: AdamWConfig::default(),
            optimizer_steps: vec![("base_model.classifier.1.weight".into(), 300)],
            plateau,
            scaler,
            early_stopping,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        meta.save(&path).unwrap();
        assert_eq!(CheckpointMeta::load(&path).unwrap(), meta);
        std::fs::write(&path, "{}").unwrap();
        let err = format!("{:#}", CheckpointMeta::load(&path).unwrap_err());
        assert!(err.contains("checkpoint.json"), "{err}");
    }
}
