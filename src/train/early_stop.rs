//! Early stopping on a validation metric (mode max: validation accuracy).
//!
//! An epoch improves when its metric is strictly greater than the best so far by more than `min_delta`
//! (the first finite metric always improves; NaN never does). Training stops once `patience` consecutive epochs
//! have not improved. The default patience, 15, is three plateau periods: the learning rate has been halved at
//! least twice without any gain before training stops. [`EarlyStopping::reset_patience`] lets the trainer restart
//! the count when an unfreezing stage begins, so a flat frozen stage does not end training before the backbone is
//! unfrozen (the best value is kept).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EarlyStoppingConfig {
    /// Consecutive non-improving epochs that end training; 0 disables early stopping.
    pub patience: u32,
    /// Improvement needed over the best value (absolute).
    pub min_delta: f64,
    /// Restart the non-improving count when an unfreezing stage begins.
    pub reset_on_stage_change: bool,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        EarlyStoppingConfig { patience: 15, min_delta: 0.0, reset_on_stage_change: true }
    }
}

/// What one epoch's metric means for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStopDecision {
    /// The metric is a new best (save the best checkpoint).
    pub improved: bool,
    /// Stop training after this epoch.
    pub stop: bool,
}

/// Early-stopping state (serializable for checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Settings.
    pub config: EarlyStoppingConfig,
    best: Option<f64>,
    best_epoch: Option<usize>,
    bad_epochs: u32,
}

impl EarlyStopping {
    /// A fresh tracker.
    pub fn new(config: EarlyStoppingConfig) -> Result<Self> {
        if !(config.min_delta.is_finite() && config.min_delta >= 0.0) {
            bail!("early stopping min_delta must be finite and >= 0, got {}", config.min_delta);
        }
        Ok(EarlyStopping { config, best: None, best_epoch: None, bad_epochs: 0 })
    }

    /// Records epoch `epoch`'s metric.
    pub fn update(&mut self, epoch: usize, metric: f64) -> EarlyStopDecision {
        let improved = match self.best {
            _ if metric.is_nan() => false,
            None => true,
            Some(best) => metric > best + self.config.min_delta,
        };
        if improved {
            self.best = Some(metric);
            self.best_epoch = Some(epoch);
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        let stop = self.config.patience > 0 && self.bad_epochs >= self.config.patience;
        EarlyStopDecision { improved, stop }
    }

    /// Restarts the non-improving count (keeps the best value).
    pub fn reset_patience(&mut self) {
        self.bad_epochs = 0;
    }

    /// Best metric so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Epoch of the best metric.
    pub fn best_epoch(&self) -> Option<usize> {
        self.best_epoch
    }

    /// Consecutive non-improving epochs.
    pub fn bad_epochs(&self) -> u32 {
        self.bad_epochs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_bad_epochs() {
        let cfg = EarlyStoppingConfig { patience: 3, ..Default::default() };
        let mut es = EarlyStopping::new(cfg).unwrap();
        let metrics = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.69, 0.7];
        let decisions: Vec<(bool, bool)> = metrics
            .iter()
            .enumerate()
            .map(|(e, &m)| {
                let d = es.update(e, m);
                (d.improved, d.stop)
            })
            .collect();
        assert_eq!(
            decisions,
            vec![
                (true, false),
                (true, false),
                (false, false),
                (false, false),
                (true, false),
                (false, false),
                (false, false),
                (false, true)
            ]
        );
        assert_eq!(es.best(), Some(0.7));
        assert_eq!(es.best_epoch(), Some(4));
    }

    #[test]
    fn min_delta_nan_reset_and_disabled() {
        let cfg = EarlyStoppingConfig { patience: 2, min_delta: 0.01, ..Default::default() };
        let mut es = EarlyStopping::new(cfg).unwrap();
        assert!(!es.update(0, f64::NAN).improved);
        assert!(es.update(1, 0.5).improved);
        assert!(!es.update(2, 0.505).improved);
        es.reset_patience();
        assert_eq!(es.bad_epochs(), 0);
        assert!(!es.update(3, 0.51).stop);
        assert!(es.update(4, 0.5).stop);
        let back: EarlyStopping = serde_json::from_str(&serde_json::to_string(&es).unwrap()).unwrap();
        assert_eq!(back, es);
        let mut off = EarlyStopping::new(EarlyStoppingConfig { patience: 0, ..Default::default() }).unwrap();
        off.update(0, 1.0);
        for e in 1..100 {
            assert!(!off.update(e, 0.0).stop);
        }
        assert!(EarlyStopping::new(EarlyStoppingConfig { min_delta: -1.0, ..Default::default() }).is_err());
    }
}
