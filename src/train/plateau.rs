//! `ReduceLROnPlateau` with PyTorch's semantics (relative threshold mode).
//!
//! Each [`ReduceLrOnPlateau::step`] with the monitored metric:
//!
//! 1. better (mode max: `cur > best·(1 + threshold)`; mode min: `cur < best·(1 − threshold)`) → `best = cur`,
//!    `bad = 0`; otherwise `bad += 1`. The first metric is always better (best starts at ∓∞). NaN is never better.
//! 2. in cooldown (`cooldown_counter > 0`): `cooldown_counter -= 1`, `bad = 0`.
//! 3. `bad > patience`: every group's `lr ← max(lr·factor, min_lr)`, applied only when that lowers it by more than
//!    `eps`; then `cooldown_counter = cooldown`, `bad = 0` (even when no learning rate changed).
//!
//! So with patience 5 the cut comes on the 6th consecutive non-improving epoch. Like torch, the relative threshold
//! is applied to `best` as is, so for a negative `best` in max mode a slightly worse value counts as better.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Whether the monitored metric should go up (accuracy) or down (loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Higher is better.
    Max,
    /// Lower is better.
    Min,
}

/// Settings of the scheduler (torch names; the seed's values as defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlateauConfig {
    /// Direction of improvement.
    pub mode: PlateauMode,
    /// Multiplier applied to the learning rate on a cut.
    pub factor: f64,
    /// Non-improving epochs tolerated before a cut.
    pub patience: u32,
    /// Lower bound on every learning rate.
    pub min_lr: f64,
    /// Relative improvement needed to count as better.
    pub threshold: f64,
    /// Epochs after a cut during which bad epochs are not counted.
    pub cooldown: u32,
    /// A cut smaller than this is not applied.
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        PlateauConfig {
            mode: PlateauMode::Max,
            factor: 0.5,
            patience: 5,
            min_lr: 1e-6,
            threshold: 1e-4,
            cooldown: 0,
            eps: 1e-8,
        }
    }
}

impl PlateauConfig {
    /// Checks the values as torch does (factor < 1) and that all are finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.factor.is_finite() && self.factor >= 0.0 && self.factor < 1.0) {
            bail!("plateau factor must be in [0, 1), got {}", self.factor);
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            bail!("plateau min_lr must be finite and >= 0, got {}", self.min_lr);
        }
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            bail!("plateau threshold must be finite and >= 0, got {}", self.threshold);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("plateau eps must be finite and >= 0, got {}", self.eps);
        }
        Ok(())
    }
}

/// The scheduler and its state. It owns the learning rate of each group it manages (usually one: the base lr).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrOnPlateau {
    /// Settings.
    pub config: PlateauConfig,
    lrs: Vec<f64>,
    /// Best metric so far; `None` before the first step (torch: ∓∞).
    best: Option<f64>,
    num_bad_epochs: u32,
    cooldown_counter: u32,
    last_epoch: u64,
}

impl ReduceLrOnPlateau {
    /// A scheduler managing the given learning rates (one per group).
    pub fn new(config: PlateauConfig, initial_lrs: &[f64]) -> Result<Self> {
        config.validate()?;
        if initial_lrs.is_empty() {
            bail!("plateau scheduler needs at least one learning rate");
        }
        if let Some(bad) = initial_lrs.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
            bail!("plateau scheduler: learning rate must be finite and >= 0, got {bad}");
        }
        Ok(ReduceLrOnPlateau {
            config,
            lrs: initial_lrs.to_vec(),
            best: None,
            num_bad_epochs: 0,
            cooldown_counter: 0,
            last_epoch: 0,
        })
    }

    fn is_better(&self, cur: f64) -> bool {
        let Some(best) = self.best else { return !cur.is_nan() };
        match self.config.mode {
            PlateauMode::Max => cur > best * (1.0 + self.config.threshold),
            PlateauMode::Min => cur < best * (1.0 - self.config.threshold),
        }
    }

    /// Feeds one epoch's metric. Returns true when at least one learning rate was lowered.
    pub fn step(&mut self, metric: f64) -> bool {
        self.last_epoch += 1;
        if self.is_better(metric) {
            self.best = Some(metric);
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        let mut reduced = false;
        if self.num_bad_epochs > self.config.patience {
            for lr in self.lrs.iter_mut() {
                let new_lr = (*lr * self.config.factor).max(self.config.min_lr);
                if *lr - new_lr > self.config.eps {
                    *lr = new_lr;
                    reduced = true;
                }
            }
            self.cooldown_counter = self.config.cooldown;
            self.num_bad_epochs = 0;
        }
        reduced
    }

    /// The current learning rates, one per group.
    pub fn lrs(&self) -> &[f64] {
        &self.lrs
    }

    /// The first group's learning rate (the base lr when one group is managed). NaN only for a state read from
    /// a corrupt checkpoint with no groups, which the optimizer then rejects.
    pub fn lr(&self) -> f64 {
        self.lrs.first().copied().unwrap_or(f64::NAN)
    }

    /// Best metric seen so far (`None` before the first step).
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// Consecutive non-improving epochs counted so far.
    pub fn num_bad_epochs(&self) -> u32 {
        self.num_bad_epochs
    }

    /// Number of steps taken.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(lr: f64) -> ReduceLrOnPlateau {
        ReduceLrOnPlateau::new(PlateauConfig::default(), &[lr]).unwrap()
    }

    #[test]
    fn cut_on_sixth_bad_epoch_then_every_sixth() {
        let mut s = sched(5e-5);
        // Epoch 1 and 2 improve, then a flat metric.
        let metrics = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6];
        let mut lrs = Vec::new();
        let mut cuts = Vec::new();
        for (i, &m) in metrics.iter().enumerate() {
            if s.step(m) {
                cuts.push(i + 1);
            }
            lrs.push(s.lr());
        }
        // bad counts: ep3..7 = 1..5, ep8 = 6 > 5 → cut; ep9..13 = 1..5, ep14 = 6 → cut.
        assert_eq!(cuts, vec![8, 14]);
        let expected: Vec<f64> = (1..=14)
            .map(|e| {
                if e < 8 {
                    5e-5
                } else if e < 14 {
                    2.5e-5
                } else {
                    1.25e-5
                }
            })
            .collect();
        assert_eq!(lrs, expected);
        assert_eq!(s.best(), Some(0.6));
        assert_eq!(s.last_epoch(), 14);
    }

    #[test]
    fn improvement_within_threshold_does_not_count() {
        let mut s = sched(1e-3);
        s.step(0.6);
        // 0.6·1.0001 = 0.60006: 0.60005 is not better, 0.60007 is.
        s.step(0.60005);
        assert_eq!(s.num_bad_epochs(), 1);
        assert_eq!(s.best(), Some(0.6));
        s.step(0.60007);
        assert_eq!(s.num_bad_epochs(), 0);
        assert_eq!(s.best(), Some(0.60007));
        // Equal is not better.
        s.step(0.60007);
        assert_eq!(s.num_bad_epochs(), 1);
        // A bad epoch in between resets nothing but an improvement resets the count.
        for _ in 0..4 {
            s.step(0.1);
        }
        assert_eq!(s.num_bad_epochs(), 5);
        s.step(0.9);
        assert_eq!(s.num_bad_epochs(), 0);
        assert_eq!(s.lr(), 1e-3);
    }

    #[test]
    fn min_lr_clamp_and_counter_reset_at_floor() {
        let mut s = sched(1.5e-6);
        s.step(0.5);
        for _ in 0..5 {
            assert!(!s.step(0.5));
        }
        // 6th bad: max(7.5e-7, 1e-6) = 1e-6, a change of 5e-7 > eps.
        assert!(s.step(0.5));
        assert_eq!(s.lr(), 1e-6);
        for _ in 0..5 {
            assert!(!s.step(0.5));
        }
        // At the floor: no change, but the counter still resets.
        assert!(!s.step(0.5));
        assert_eq!(s.lr(), 1e-6);
        assert_eq!(s.num_bad_epochs(), 0);
    }

    #[test]
    fn eps_rule_skips_tiny_cuts() {
        // lr = min_lr + 5e-9: the cut would lower it by 5e-9 < 1e-8, so it is not applied.
        let mut s = sched(1e-6 + 5e-9);
        s.step(1.0);
        for _ in 0..6 {
            assert!(!s.step(1.0));
        }
        assert_eq!(s.lr(), 1e-6 + 5e-9);
        // lr = min_lr + 1.5e-8: lowered by 1.5e-8 > 1e-8, applied.
        let mut s = sched(1e-6 + 1.5e-8);
        s.step(1.0);
        for _ in 0..5 {
            s.step(1.0);
        }
        assert!(s.step(1.0));
        assert_eq!(s.lr(), 1e-6);
        // With min_lr 0, an lr of 1.5e-8 would drop by 7.5e-9 < eps: kept.
        let cfg = PlateauConfig { min_lr: 0.0, ..Default::default() };
        let mut s = ReduceLrOnPlateau::new(cfg, &[1.5e-8, 1e-3]).unwrap();
        for _ in 0..7 {
            s.step(0.0);
        }
        assert_eq!(s.lrs(), &[1.5e-8, 5e-4]);
    }

    #[test]
    fn cooldown_delays_counting() {
        let cfg = PlateauConfig { patience: 1, cooldown: 2, ..Default::default() };
        let mut s = ReduceLrOnPlateau::new(cfg, &[1.0]).unwrap();
        let mut cuts = Vec::new();
        for e in 1..=12 {
            if s.step(0.5) {
                cuts.push(e);
            }
        }
        // ep1 best; ep2 bad 1; ep3 bad 2 > 1 → cut, cooldown 2; ep4, ep5 in cooldown (bad reset);
        // ep6 bad 1; ep7 bad 2 → cut; ep8, ep9 cooldown; ep10 1; ep11 → cut.
        assert_eq!(cuts, vec![3, 7, 11]);
        assert_eq!(s.lr(), 0.125);
    }

    #[test]
    fn nan_is_bad_and_negative_best_quirk() {
        let mut s = sched(1.0);
        s.step(f64::NAN);
        assert_eq!(s.best(), None);
        assert_eq!(s.num_bad_epochs(), 1);
        s.step(-1.0);
        assert_eq!(s.best(), Some(-1.0));
        // torch quirk: best·1.0001 = −1.0001, so −1.00005 (worse) counts as better.
        s.step(-1.00005);
        assert_eq!(s.best(), Some(-1.00005));
        s.step(f64::NAN);
        assert_eq!(s.num_bad_epochs(), 1);
    }

    #[test]
    fn min_mode_and_serde() {
        let cfg = PlateauConfig { mode: PlateauMode::Min, patience: 0, ..Default::default() };
        let mut s = ReduceLrOnPlateau::new(cfg, &[1e-3]).unwrap();
        s.step(2.0);
        assert!(!s.step(1.0));
        assert!(s.step(1.0));
        assert_eq!(s.lr(), 5e-4);
        let json = serde_json::to_string(&s).unwrap();
        let back: ReduceLrOnPlateau = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let fresh = sched(1.0);
        let back: ReduceLrOnPlateau = serde_json::from_str(&serde_json::to_string(&fresh).unwrap()).unwrap();
        assert_eq!(back, fresh);
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(ReduceLrOnPlateau::new(PlateauConfig { factor: 1.0, ..Default::default() }, &[1.0]).is_err());
        assert!(ReduceLrOnPlateau::new(PlateauConfig::default(), &[]).is_err());
        assert!(ReduceLrOnPlateau::new(PlateauConfig::default(), &[f64::NAN]).is_err());
    }
}
