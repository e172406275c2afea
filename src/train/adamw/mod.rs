//! AdamW with PyTorch's semantics (`torch.optim.AdamW`, single-tensor path, `amsgrad=False`).
//!
//! Per parameter and step, with the group's learning rate `lr`:
//!
//! ```text
//! t += 1
//! p  ← p·(1 − lr·wd)                       (decoupled weight decay, applied first)
//! m  ← m + (1−β1)·(g − m)                  (torch's lerp)
//! v  ← β2·v + (1−β2)·g·g
//! step_size = lr / (1 − β1^t)
//! denom     = √v / √(1 − β2^t) + eps
//! p  ← p − step_size·m / denom
//! ```
//!
//! Scalars (`1 − lr·wd`, `step_size`, the bias corrections) are computed in f64 as Python floats are, and applied to
//! the f32 tensors in f32, as torch's CPU kernels do.
//!
//! State is kept per parameter name and created lazily on the first step of that parameter, as torch does: a
//! parameter that was frozen (no gradient, so never stepped) starts with `t = 0` and zero moments when it becomes
//! trainable. Parameter groups are expressed by the learning rate the caller passes to each step (the backbone
//! group gets `base_lr × unfreezing multiplier`, the head group the full `base_lr`); see
//! [`crate::train::unfreeze::Stage::backbone_lr`].

pub mod check;
pub mod cuda;

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Hyper-parameters shared by every parameter (torch's defaults except `weight_decay`, which is the seed's 1e-5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment (torch `betas[0]`).
    pub beta1: f64,
    /// Exponential decay of the second moment (torch `betas[1]`).
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay coefficient (multiplied by the step's learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-5 }
    }
}

impl AdamWConfig {
    /// Checks that the values are usable (betas in [0, 1), eps and weight decay finite and non-negative).
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("AdamW {name} must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("AdamW eps must be finite and >= 0, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("AdamW weight_decay must be finite and >= 0, got {}", self.weight_decay);
        }
        Ok(())
    }
}

/// One parameter's optimizer state (torch: `state[p] = {step, exp_avg, exp_avg_sq}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamState {
    /// Number of steps taken for this parameter.
    pub step: u64,
    /// First moment `m` (torch `exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Second moment `v` (torch `exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
}

/// A parameter, its gradient and the learning rate of its group, for [`AdamW::step`].
pub struct ParamSlot<'a> {
    /// Parameter name (torchvision naming, e.g. `base_model.features.0.0.weight`); keys the state.
    pub name: &'a str,
    /// The parameter values, updated in place.
    pub param: &'a mut [f32],
    /// The (unscaled) gradient, same length as `param`.
    pub grad: &'a [f32],
    /// Learning rate of the parameter's group for this step.
    pub lr: f64,
}

/// A named borrowed tensor, as written to a checkpoint.
pub type NamedSlice<'a> = (String, &'a [f32]);

/// The AdamW optimizer: hyper-parameters plus per-parameter state. Serializable for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// State per parameter name; absent until the parameter's first step.
    states: BTreeMap<String, ParamState>,
}

/// One entry of a torch-style optimizer state dict (`state[index]`), borrowed from an [`AdamW`].
#[derive(Debug, Clone, Serialize)]
pub struct TorchStateEntry<'a> {
    /// Index of the parameter in the `param_groups[*].params` order.
    pub index: usize,
    /// The parameter's name (not part of torch's layout; kept so the mapping can be checked).
    pub name: &'a str,
    /// torch stores `step` as a float32 scalar tensor.
    pub step: f32,
    /// First moment.
    pub exp_avg: &'a [f32],
    /// Second moment.
    pub exp_avg_sq: &'a [f32],
}

/// One torch-style param group (`param_groups[i]`), with AdamW's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchParamGroup {
    /// The group's learning rate.
    pub lr: f64,
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Always false here.
    pub amsgrad: bool,
    /// Indices of the group's parameters in the global parameter order.
    pub params: Vec<usize>,
}

/// A torch `optimizer.state_dict()` view: `{state: {index: {...}}, param_groups: [...]}`.
#[derive(Debug, Clone, Serialize)]
pub struct TorchOptimizerState<'a> {
    /// Stepped parameters only (torch leaves never-stepped parameters out of `state`).
    pub state: Vec<TorchStateEntry<'a>>,
    /// The groups, in order.
    pub param_groups: Vec<TorchParamGroup>,
}

impl AdamW {
    /// A fresh optimizer with no state.
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(AdamW { config, states: BTreeMap::new() })
    }

    /// One AdamW step for one parameter at learning rate `lr`. Creates the state on the parameter's first step.
    pub fn step_one(&mut self, name: &str, param: &mut [f32], grad: &[f32], lr: f64) -> Result<()> {
        if param.len() != grad.len() {
            bail!("AdamW: parameter {name} has {} values but its gradient has {}", param.len(), grad.len());
        }
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("AdamW: learning rate for {name} must be finite and >= 0, got {lr}");
        }
        let cfg = self.config;
        let state = self.states.entry(name.to_string()).or_insert_with(|| ParamState {
            step: 0,
            exp_avg: vec![0.0; param.len()],
            exp_avg_sq: vec![0.0; param.len()],
        });
        if state.exp_avg.len() != param.len() || state.exp_avg_sq.len() != param.len() {
            bail!(
                "AdamW: state for {name} has {} values but the parameter has {}; the checkpoint does not match \
                 the model",
                state.exp_avg.len(),
                param.len()
            );
        }
        state.step += 1;
        let t = state.step as f64;
        let decay = (1.0 - lr * cfg.weight_decay) as f32;
        let one_minus_b1 = (1.0 - cfg.beta1) as f32;
        let b2 = cfg.beta2 as f32;
        let one_minus_b2 = (1.0 - cfg.beta2) as f32;
        let bias_correction1 = 1.0 - cfg.beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - cfg.beta2.powf(t)).sqrt();
        let neg_step_size = (-(lr / bias_correction1)) as f32;
        let bc2_sqrt = bias_correction2_sqrt as f32;
        let eps = cfg.eps as f32;
        for (((p, &g), m), v) in
            param.iter_mut().zip(grad.iter()).zip(state.exp_avg.iter_mut()).zip(state.exp_avg_sq.iter_mut())
        {
            *p *= decay;
            *m += one_minus_b1 * (g - *m);
            *v = *v * b2 + one_minus_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
        Ok(())
    }

    /// One step over several parameters, each at its slot's learning rate. Slots are independent (as in torch,
    /// where each parameter's update depends only on its own state).
    pub fn step(&mut self, slots: &mut [ParamSlot<'_>]) -> Result<()> {
        for slot in slots.iter_mut() {
            self.step_one(slot.name, slot.param, slot.grad, slot.lr)?;
        }
        Ok(())
    }

    /// The state of one parameter, if it has been stepped.
    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.states.get(name)
    }

    /// All states, ordered by parameter name.
    pub fn states(&self) -> impl Iterator<Item = (&str, &ParamState)> {
        self.states.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of parameters with state.
    pub fn num_states(&self) -> usize {
        self.states.len()
    }

    /// Installs a state (from a checkpoint). Fails when the moments' lengths disagree.
    pub fn insert_state(&mut self, name: &str, state: ParamState) -> Result<()> {
        if state.exp_avg.len() != state.exp_avg_sq.len() {
            bail!(
                "AdamW state for {name}: exp_avg has {} values but exp_avg_sq has {}",
                state.exp_avg.len(),
                state.exp_avg_sq.len()
            );
        }
        self.states.insert(name.to_string(), state);
        Ok(())
    }

    /// Drops all state (a fresh optimizer with the same hyper-parameters).
    pub fn clear(&mut self) {
        self.states.clear();
    }

    /// Flat tensor names and values for a checkpoint file: `"{name}.exp_avg"`, `"{name}.exp_avg_sq"` per stepped
    /// parameter, plus the steps as `(name, step)` pairs (steps are metadata, not tensors).
    pub fn tensor_entries(&self) -> (Vec<NamedSlice<'_>>, Vec<(String, u64)>) {
        let mut tensors = Vec::with_capacity(self.states.len() * 2);
        let mut steps = Vec::with_capacity(self.states.len());
        for (name, s) in &self.states {
            tensors.push((format!("{name}.exp_avg"), s.exp_avg.as_slice()));
            tensors.push((format!("{name}.exp_avg_sq"), s.exp_avg_sq.as_slice()));
            steps.push((name.clone(), s.step));
        }
        (tensors, steps)
    }

    /// torch's `optimizer.state_dict()` layout: parameters are numbered by their position in `groups` (each
    /// group: its learning rate and its parameter names, in model order), and `state` holds the stepped ones.
    /// Fails when a stepped parameter is missing from `groups` or a name appears twice.
    pub fn torch_layout<'a>(&'a self, groups: &[(f64, Vec<&'a str>)]) -> Result<TorchOptimizerState<'a>> {
        let mut index_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut param_groups = Vec::with_capacity(groups.len());
        let mut next = 0usize;
        for (lr, names) in groups {
            let mut params = Vec::with_capacity(names.len());
            for &n in names {
                if index_of.insert(n, next).is_some() {
                    bail!("parameter {n} appears twice in the optimizer's parameter groups");
                }
                params.push(next);
                next += 1;
            }
            param_groups.push(TorchParamGroup {
                lr: *lr,
                betas: (self.config.beta1, self.config.beta2),
                eps: self.config.eps,
                weight_decay: self.config.weight_decay,
                amsgrad: false,
                params,
            });
        }
        let mut state = Vec::with_capacity(self.states.len());
        for (name, s) in &self.states {
            let Some(&index) = index_of.get(name.as_str()) else {
                bail!("optimizer has state for {name}, which is in no parameter group");
            };
            state.push(TorchStateEntry {
                index,
                name: name.as_str(),
                step: s.step as f32,
                exp_avg: &s.exp_avg,
                exp_avg_sq: &s.exp_avg_sq,
            });
        }
        state.sort_by_key(|e| e.index);
        Ok(TorchOptimizerState { state, param_groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 re-statement of the torch update, for comparison.
    fn reference(p0: f64, grads: &[f64], lrs: &[f64], cfg: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0f64, 0.0f64);
        for (t, (&g, &lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as f64;
            p *= 1.0 - lr * cfg.weight_decay;
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            let step = lr / (1.0 - cfg.beta1.powf(t));
            let denom = v.sqrt() / (1.0 - cfg.beta2.powf(t)).sqrt() + cfg.eps;
            p -= step * m / denom;
        }
        p
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // At t=1, m̂ = g and v̂ = g², so the update is lr·g/(|g|+eps) ≈ lr·sign(g), after decay.
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(cfg).unwrap();
        let mut p = vec![1.0f32, -2.0, 0.5, 3.0];
        let g = vec![0.3f32, -4.0, 0.0, 1e-3];
        let lr = 0.01;
        opt.step_one("w", &mut p, &g, lr).unwrap();
        let init = [1.0f64, -2.0, 0.5, 3.0];
        for i in 0..4 {
            let gi = g[i] as f64;
            let expected = init[i] * (1.0 - lr * 0.1) - lr * gi / (gi.abs() + 1e-8);
            assert!((p[i] as f64 - expected).abs() < 1e-6, "i={i}: {} vs {expected}", p[i]);
        }
        let s = opt.state("w").unwrap();
        assert_eq!(s.step, 1);
        assert!((s.exp_avg[1] - (-0.4)).abs() < 1e-7);
        assert!((s.exp_avg_sq[1] - 0.016).abs() < 1e-9);
    }

    #[test]
    fn matches_f64_reference_over_many_steps_with_changing_lr() {
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(cfg).unwrap();
        let p0 = [0.7f64, -1.3, 2.0e-3, 5.0];
        let mut p: Vec<f32> = p0.iter().map(|&x| x as f32).collect();
        let mut grads_hist: Vec<Vec<f64>> = vec![Vec::new(); 4];
        let mut lrs = Vec::new();
        for t in 0..50 {
            let g: Vec<f32> = (0..4).map(|i| (((t * 7 + i * 13) % 11) as f32 - 5.0) * 0.1 * (i as f32 + 1.0)).collect();
            let lr = if t < 25 { 5e-3 } else { 2.5e-3 };
            opt.step_one("w", &mut p, &g, lr).unwrap();
            for i in 0..4 {
                grads_hist[i].push(g[i] as f64);
            }
            lrs.push(lr);
        }
        for i in 0..4 {
            let r = reference(p0[i], &grads_hist[i], &lrs, cfg);
            assert!((p[i] as f64 - r).abs() < 2e-5 * (1.0 + r.abs()), "i={i}: {} vs {r}", p[i]);
        }
        assert_eq!(opt.state("w").unwrap().step, 50);
    }

    #[test]
    fn lazy_state_per_parameter_and_groups() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut head = vec![1.0f32; 3];
        let mut back = vec![1.0f32; 2];
        // Two steps with only the head trainable.
        for _ in 0..2 {
            opt.step(&mut [ParamSlot { name: "head", param: &mut head, grad: &[0.1, 0.2, 0.3], lr: 1e-3 }]).unwrap();
        }
        assert!(opt.state("back").is_none());
        // The backbone becomes trainable: its own t starts at 1, at its own (smaller) lr.
        opt.step(&mut [
            ParamSlot { name: "head", param: &mut head, grad: &[0.1, 0.2, 0.3], lr: 1e-3 },
            ParamSlot { name: "back", param: &mut back, grad: &[0.5, -0.5], lr: 5e-4 },
        ])
        .unwrap();
        assert_eq!(opt.state("head").unwrap().step, 3);
        assert_eq!(opt.state("back").unwrap().step, 1);
        let expected = 1.0 * (1.0 - 5e-4 * 1e-5) - 5e-4 * 0.5 / (0.5 + 1e-8);
        assert!((back[0] as f64 - expected).abs() < 3e-7);
        assert!((back[1] as f64 - (1.0 * (1.0 - 5e-4 * 1e-5) + 5e-4)).abs() < 3e-7);
    }

    #[test]
    fn rejects_mismatched_lengths_and_bad_lr() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![0.0f32; 3];
        assert!(opt.step_one("w", &mut p, &[0.0; 2], 1e-3).is_err());
        assert!(opt.step_one("w", &mut p, &[0.0; 3], f64::NAN).is_err());
        opt.step_one("w", &mut p, &[0.0; 3], 1e-3).unwrap();
        let mut q = vec![0.0f32; 4];
        let err = opt.step_one("w", &mut q, &[0.0; 4], 1e-3).unwrap_err().to_string();
        assert!(err.contains("w"), "{err}");
        assert!(AdamW::new(AdamWConfig { beta1: 1.0, ..Default::default() }).is_err());
    }

    #[test]
    fn serde_round_trip_continues_identically() {
        let mut a = AdamW::new(AdamWConfig::default()).unwrap();
        let mut p = vec![0.5f32, -0.25];
        a.step_one("w", &mut p, &[0.1, -0.2], 1e-2).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        let mut b: AdamW = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        let mut p2 = p.clone();
        a.step_one("w", &mut p, &[0.3, 0.4], 1e-2).unwrap();
        b.step_one("w", &mut p2, &[0.3, 0.4], 1e-2).unwrap();
        assert_eq!(p, p2);
    }

    #[test]
    fn torch_layout_numbers_params_in_group_order() {
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let mut x = vec![0.0f32; 2];
        opt.step_one("head.w", &mut x, &[1.0, 1.0], 1e-3).unwrap();
        opt.step_one("head.w", &mut x, &[1.0, 1.0], 1e-3).unwrap();
        let groups = vec![(5e-4, vec!["back.w", "back.b"]), (1e-3, vec!["head.w"])];
        let layout = opt.torch_layout(&groups).unwrap();
        assert_eq!(layout.param_groups.len(), 2);
        assert_eq!(layout.param_groups[0].params, vec![0, 1]);
        assert_eq!(layout.param_groups[1].params, vec![2]);
        assert_eq!(layout.state.len(), 1);
        assert_eq!(layout.state[0].index, 2);
        assert_eq!(layout.state[0].step, 2.0);
        assert!(opt.torch_layout(&[(1e-3, vec!["other"])]).is_err());
        let (tensors, steps) = opt.tensor_entries();
        assert_eq!(tensors[0].0, "head.w.exp_avg");
        assert_eq!(tensors[1].0, "head.w.exp_avg_sq");
        assert_eq!(steps, vec![("head.w".to_string(), 2)]);
    }
}
