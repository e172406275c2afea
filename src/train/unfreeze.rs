//! Gradual unfreezing: which of the backbone's `features` children are frozen, and the backbone's learning-rate
//! multiplier, as a function of the epoch (0-based).
//!
//! `features` has 9 children (stem, stages 1–7, head conv); "k frozen" freezes children `0..k`. The head
//! (classifier) is always trainable and always gets the full learning rate; the trainable backbone children get
//! `lr × multiplier`.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Number of children of the backbone's `features` module, the most that can be frozen.
pub const NUM_FEATURE_BLOCKS: usize = 9;

/// One stage: from `epoch` on (until the next stage), `frozen_blocks` children are frozen and the backbone's
/// learning rate is multiplied by `lr_multiplier`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Epochs completed before the stage begins (0: from the start; 20: from the 21st epoch, as the console
    /// counts), the seed's `epoch >= 20` on its 0-based loop counter.
    pub epoch: usize,
    /// Number of leading `features` children frozen (0..=9).
    pub frozen_blocks: usize,
    /// Backbone learning-rate multiplier (> 0).
    pub lr_multiplier: f64,
}

impl Stage {
    /// Learning rate of the backbone group for a base learning rate.
    pub fn backbone_lr(&self, base_lr: f64) -> f64 {
        base_lr * self.lr_multiplier
    }

    /// Whether `features` child `block` (0..9) is frozen in this stage.
    pub fn is_block_frozen(&self, block: usize) -> bool {
        block < self.frozen_blocks
    }
}

/// Where an epoch falls in the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageInfo {
    /// Index of the stage in the schedule.
    pub index: usize,
    /// Number of frozen `features` children.
    pub frozen_blocks: usize,
    /// Backbone learning-rate multiplier.
    pub lr_multiplier: f64,
}

/// A validated schedule: non-empty, starting at epoch 0, strictly increasing epochs, `frozen_blocks ≤ 9`, finite
/// positive multipliers. Deserialization validates too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Stage>", into = "Vec<Stage>")]
pub struct UnfreezeSchedule {
    stages: Vec<Stage>,
}

impl Default for UnfreezeSchedule {
    /// The seed's schedule: (0,7,1.0) (20,5,0.5) (40,3,0.2) (60,1,0.1) (80,0,0.05).
    fn default() -> Self {
        let s = |epoch, frozen_blocks, lr_multiplier| Stage { epoch, frozen_blocks, lr_multiplier };
        UnfreezeSchedule { stages: vec![s(0, 7, 1.0), s(20, 5, 0.5), s(40, 3, 0.2), s(60, 1, 0.1), s(80, 0, 0.05)] }
    }
}

impl TryFrom<Vec<Stage>> for UnfreezeSchedule {
    type Error = anyhow::Error;
    fn try_from(stages: Vec<Stage>) -> Result<Self> {
        UnfreezeSchedule::new(stages)
    }
}

impl From<UnfreezeSchedule> for Vec<Stage> {
    fn from(s: UnfreezeSchedule) -> Self {
        s.stages
    }
}

impl UnfreezeSchedule {
    /// Validates and builds a schedule.
    pub fn new(stages: Vec<Stage>) -> Result<Self> {
        let Some(first) = stages.first() else {
            bail!("unfreezing schedule is empty; give at least one stage starting at epoch 0");
        };
        if first.epoch != 0 {
            bail!("unfreezing schedule must start at epoch 0, its first stage starts at epoch {}", first.epoch);
        }
        for (i, s) in stages.iter().enumerate() {
            if s.frozen_blocks > NUM_FEATURE_BLOCKS {
                bail!(
                    "unfreezing stage {i} (epoch {}) freezes {} blocks; the backbone has {NUM_FEATURE_BLOCKS}",
                    s.epoch,
                    s.frozen_blocks
                );
            }
            if !(s.lr_multiplier.is_finite() && s.lr_multiplier > 0.0) {
                bail!("unfreezing stage {i} (epoch {}) has lr_multiplier {}; it must be > 0", s.epoch, s.lr_multiplier);
            }
            if i > 0 && s.epoch <= stages[i - 1].epoch {
                bail!(
                    "unfreezing stages must have strictly increasing epochs: stage {i} starts at {} after {}",
                    s.epoch,
                    stages[i - 1].epoch
                );
            }
        }
        Ok(UnfreezeSchedule { stages })
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The stage in force at `epoch` (0-based): the last stage whose start is ≤ `epoch`.
    pub fn stage_for_epoch(&self, epoch: usize) -> StageInfo {
        // The first stage starts at 0, so the partition point is at least 1.
        let index = self.stages.partition_point(|s| s.epoch <= epoch).saturating_sub(1);
        let s = self.stages[index];
        StageInfo { index, frozen_blocks: s.frozen_blocks, lr_multiplier: s.lr_multiplier }
    }

    /// Whether `epoch` starts a new stage (other than the first), i.e. the trainer must change what is frozen.
    pub fn is_transition(&self, epoch: usize) -> bool {
        epoch > 0 && self.stages.iter().any(|s| s.epoch == epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_lookup() {
        let s = UnfreezeSchedule::default();
        let check = |e, i, f, m| {
            let st = s.stage_for_epoch(e);
            assert_eq!((st.index, st.frozen_blocks, st.lr_multiplier), (i, f, m), "epoch {e}");
        };
        check(0, 0, 7, 1.0);
        check(19, 0, 7, 1.0);
        check(20, 1, 5, 0.5);
        check(39, 1, 5, 0.5);
        check(40, 2, 3, 0.2);
        check(59, 2, 3, 0.2);
        check(60, 3, 1, 0.1);
        check(79, 3, 1, 0.1);
        check(80, 4, 0, 0.05);
        check(10_000, 4, 0, 0.05);
        assert!(s.is_transition(20) && s.is_transition(80) && !s.is_transition(0) && !s.is_transition(21));
        let st = s.stages()[1];
        assert!((st.backbone_lr(5e-5) - 2.5e-5).abs() < 1e-20);
        assert!(st.is_block_frozen(4) && !st.is_block_frozen(5));
    }

    #[test]
    fn validation() {
        let s = |epoch, frozen_blocks, lr_multiplier| Stage { epoch, frozen_blocks, lr_multiplier };
        assert!(UnfreezeSchedule::new(vec![]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(1, 7, 1.0)]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(0, 10, 1.0)]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(0, 7, 0.0)]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(0, 7, f64::NAN)]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(0, 7, 1.0), s(5, 3, 1.0), s(5, 2, 1.0)]).is_err());
        assert!(UnfreezeSchedule::new(vec![s(0, 9, 1.0), s(3, 0, 0.1)]).is_ok());
        let one = UnfreezeSchedule::new(vec![s(0, 0, 1.0)]).unwrap();
        assert_eq!(one.stage_for_epoch(7).index, 0);
    }

    #[test]
    fn serde_validates() {
        let json = serde_json::to_string(&UnfreezeSchedule::default()).unwrap();
        let back: UnfreezeSchedule = serde_json::from_str(&json).unwrap();
        assert_eq!(back, UnfreezeSchedule::default());
        let bad = r#"[{"epoch":3,"frozen_blocks":1,"lr_multiplier":1.0}]"#;
        let err = serde_json::from_str::<UnfreezeSchedule>(bad).unwrap_err().to_string();
        assert!(err.contains("epoch 0"), "{err}");
    }
}
