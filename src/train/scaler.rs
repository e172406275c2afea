//! Dynamic loss scaling with `torch.amp.GradScaler`'s semantics.
//!
//! One training step with a scaler:
//!
//! 1. backward from `loss × scale()` (the scale seeds the backward pass);
//! 2. [`GradScaler::unscale_and_check`] multiplies every gradient by `1/scale` (computed in f64, rounded to f32, as
//!    torch does) and reports whether any gradient was inf or NaN. Gradients are unscaled regardless;
//! 3. if it found a non-finite gradient the optimizer step is **skipped entirely**: no weight decay, no moment
//!    update, no step count (the caller simply does not call the optimizer);
//! 4. [`GradScaler::update`] with the same flag: overflow → `scale × backoff`, counter reset; otherwise the counter
//!    grows and after `growth_interval` consecutive clean steps `scale × growth` (only if that stays finite).
//!
//! With `enabled = false` (f32 training) the scale is 1, nothing is checked or changed and no step is skipped.

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// Settings (torch's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GradScalerConfig {
    /// Initial scale.
    pub init_scale: f32,
    /// Multiplier after `growth_interval` clean steps.
    pub growth_factor: f32,
    /// Multiplier after an overflow.
    pub backoff_factor: f32,
    /// Consecutive clean steps before growing.
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

impl GradScalerConfig {
    /// Checks the values as torch does (growth > 1, 0 < backoff < 1, positive finite scale and interval).
    pub fn validate(&self) -> Result<()> {
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            bail!("loss scaler init_scale must be finite and > 0, got {}", self.init_scale);
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            bail!("loss scaler growth_factor must be > 1, got {}", self.growth_factor);
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            bail!("loss scaler backoff_factor must be in (0, 1), got {}", self.backoff_factor);
        }
        if self.growth_interval == 0 {
            bail!("loss scaler growth_interval must be > 0");
        }
        Ok(())
    }
}

/// The scaler and its state (serializable for checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradScaler {
    /// Settings.
    pub config: GradScalerConfig,
    enabled: bool,
    scale: f32,
    growth_tracker: u32,
}

impl GradScaler {
    /// An enabled scaler at `config.init_scale`.
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(GradScaler { config, enabled: true, scale: config.init_scale, growth_tracker: 0 })
    }

    /// An enabled scaler with a given state (what a device trainer read back from the device).
    pub fn with_state(config: GradScalerConfig, scale: f32, growth_tracker: u32) -> Result<Self> {
        config.validate()?;
        ensure!(scale.is_finite() && scale > 0.0, "loss scale {scale} must be finite and positive");
        ensure!(
            growth_tracker < config.growth_interval,
            "growth tracker {growth_tracker} must be below the growth interval {}",
            config.growth_interval
        );
        Ok(GradScaler { config, enabled: true, scale, growth_tracker })
    }

    /// A disabled scaler: scale 1, never reports an overflow, never changes.
    pub fn disabled() -> Self {
        GradScaler { config: GradScalerConfig::default(), enabled: false, scale: 1.0, growth_tracker: 0 }
    }

    /// Whether scaling is active.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale (1 when disabled): multiply the loss (the backward seed) by it.
    pub fn scale(&self) -> f32 {
        if self.enabled { self.scale } else { 1.0 }
    }

    /// Consecutive clean steps since the last growth or overflow.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// Multiplies every gradient by `1/scale` and returns whether any gradient value (before unscaling) was inf
    /// or NaN. All gradients are unscaled even after an overflow is found. When disabled: does nothing, returns
    /// false.
    pub fn unscale_and_check(&self, grads: &mut [&mut [f32]]) -> bool {
        if !self.enabled {
            return false;
        }
        let inv_scale = (1.0f64 / self.scale as f64) as f32;
        let mut found_inf = false;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                if !x.is_finite() {
                    found_inf = true;
                }
                if inv_scale != 1.0 {
                    *x *= inv_scale;
                }
            }
        }
        found_inf
    }

    /// Updates the scale after a step (`found_inf` from [`Self::unscale_and_check`]). No-op when disabled.
    pub fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= self.config.backoff_factor;
            self.growth_tracker = 0;
        } else {
            let successful = self.growth_tracker + 1;
            if successful == self.config.growth_interval {
                let grown = self.scale * self.config.growth_factor;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscale_multiplies_by_inverse_and_finds_overflow() {
        let s = GradScaler::new(GradScalerConfig::default()).unwrap();
        assert_eq!(s.scale(), 65536.0);
        let mut a = vec![65536.0f32, -131072.0, 3.0];
        let mut b = vec![1.0f32, f32::INFINITY, 2.0];
        let found = s.unscale_and_check(&mut [&mut a, &mut b]);
        assert!(found);
        assert_eq!(a, vec![1.0, -2.0, 3.0 / 65536.0]);
        // Unscaled regardless of the overflow.
        assert_eq!(b[0], 1.0 / 65536.0);
        assert_eq!(b[2], 2.0 / 65536.0);
        let mut c = vec![0.5f32, f32::NAN];
        assert!(s.unscale_and_check(&mut [&mut c]));
        let mut d = vec![0.5f32, 1e30];
        assert!(!s.unscale_and_check(&mut [&mut d]));
    }

    #[test]
    fn trace_with_forced_overflow() {
        let mut s = GradScaler::new(GradScalerConfig { growth_interval: 3, ..Default::default() }).unwrap();
        // clean, clean, overflow, clean, clean, clean (grow), overflow, overflow
        let flags = [false, false, true, false, false, false, true, true];
        let mut scales = Vec::new();
        let mut trackers = Vec::new();
        for f in flags {
            s.update(f);
            scales.push(s.scale());
            trackers.push(s.growth_tracker());
        }
        assert_eq!(scales, vec![65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 65536.0, 32768.0, 16384.0]);
        assert_eq!(trackers, vec![1, 2, 0, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn two_thousand_clean_steps_double_the_scale() {
        let mut s = GradScaler::new(GradScalerConfig::default()).unwrap();
        for i in 1..2000 {
            s.update(false);
            assert_eq!(s.scale(), 65536.0, "step {i}");
            assert_eq!(s.growth_tracker(), i);
        }
        s.update(false);
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.growth_tracker(), 0);
        // An overflow after 1999 clean steps resets the count.
        for _ in 0..1999 {
            s.update(false);
        }
        s.update(true);
        assert_eq!(s.scale(), 65536.0);
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        assert_eq!(s.scale(), 131072.0);
    }

    #[test]
    fn growth_stops_at_f32_max() {
        let cfg = GradScalerConfig { init_scale: 2.0e38, growth_interval: 1, ..Default::default() };
        let mut s = GradScaler::new(cfg).unwrap();
        s.update(false);
        assert_eq!(s.scale(), 2.0e38);
        assert_eq!(s.growth_tracker(), 0);
    }

    #[test]
    fn disabled_never_skips_or_scales() {
        let mut s = GradScaler::disabled();
        assert_eq!(s.scale(), 1.0);
        let mut g = vec![3.0f32, f32::INFINITY];
        assert!(!s.unscale_and_check(&mut [&mut g]));
        assert_eq!(g[0], 3.0);
        s.update(true);
        assert_eq!(s.scale(), 1.0);
        assert!(!s.is_enabled());
    }

    #[test]
    fn serde_and_validation() {
        let mut s = GradScaler::new(GradScalerConfig::default()).unwrap();
        s.update(true);
        s.update(false);
        let back: GradScaler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(GradScaler::new(GradScalerConfig { growth_factor: 1.0, ..Default::default() }).is_err());
        assert!(GradScaler::new(GradScalerConfig { backoff_factor: 1.0, ..Default::default() }).is_err());
        assert!(GradScaler::new(GradScalerConfig { growth_interval: 0, ..Default::default() }).is_err());
    }
}
