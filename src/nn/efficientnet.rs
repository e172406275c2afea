//! EfficientNet as torchvision builds it (B0 by default, B1–B7 through the width and depth multipliers), with
//! torchvision's classifier or the seed's deeper head.
//!
//! Structure (REFERENCE.md): `features` has 9 children — the stem (conv 3×3 s2 → BN → SiLU), seven stages of
//! MBConv blocks, and the head conv (1×1 → BN → SiLU) — then global average pooling and the classifier.
//! Parameter and buffer names are torchvision's, so state dicts load both ways.

use super::init::{kaiming_normal_fan_out, uniform};
use super::{BatchNorm, Conv2d, Ctx, Layout, Linear, Registry, maybe_dropout};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::backend::{Backend, MaskKind};
use crate::io::{StateDict, check_keys};
use crate::ops::activation::{self, Act};
use crate::ops::batchnorm::{BnCfg, BnState};
use crate::ops::conv::ConvCfg;
use crate::ops::{dropout, elementwise, pool, scale};
use crate::tensor::{Array, Float, Storage, Tensor};
use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand_pcg::Pcg64;
use std::collections::HashMap;

/// torchvision's base stage table for B0: (expand ratio, kernel, stride, in, out, blocks).
pub const B0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// Number of children of `features` (stem, 7 stages, head conv): the unit of freezing.
pub const FEATURE_BLOCKS: usize = 9;

/// torchvision's `_make_divisible`: round to a multiple of 8, never below 90% of `v`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (divisor).max(((v + d / 2.0) / d).floor() as usize * divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// The named EfficientNet sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    B0,
    B1,
    B2,
    B3,
    B4,
    B5,
    B6,
    B7,
}

impl Variant {
    pub const ALL: [Variant; 8] =
        [Variant::B0, Variant::B1, Variant::B2, Variant::B3, Variant::B4, Variant::B5, Variant::B6, Variant::B7];

    /// (width multiplier, depth multiplier, classifier dropout) as torchvision.
    pub fn multipliers(self) -> (f64, f64, f64) {
        match self {
            Variant::B0 => (1.0, 1.0, 0.2),
            Variant::B1 => (1.0, 1.1, 0.2),
            Variant::B2 => (1.1, 1.2, 0.3),
            Variant::B3 => (1.2, 1.4, 0.3),
            Variant::B4 => (1.4, 1.8, 0.4),
            Variant::B5 => (1.6, 2.2, 0.4),
            Variant::B6 => (1.8, 2.6, 0.5),
            Variant::B7 => (2.0, 3.1, 0.5),
        }
    }

    /// Batch-norm constants: torchvision uses eps 1e-3, momentum 0.01 from B5 on.
    pub fn bn(self) -> BnCfg {
        match self {
            Variant::B5 | Variant::B6 | Variant::B7 => BnCfg { eps: 1e-3, momentum: 0.01 },
            _ => BnCfg { eps: 1e-5, momentum: 0.1 },
        }
    }
}

/// Which classifier sits on the pooled features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// `[Dropout(p), Linear(features, C)]`.
    Torchvision,
    /// The seed's `[Dropout(0.5), Linear(features,256), ReLU, BatchNorm1d(256), Dropout(0.5), Linear(256,C)]`.
    Seed,
}

/// Everything that shapes a model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub width_mult: f64,
    pub depth_mult: f64,
    /// Dropout of torchvision's classifier.
    pub dropout: f64,
    /// Dropout before the seed head's first and last linear layers.
    pub seed_dropout: (f64, f64),
    pub stochastic_depth_prob: f64,
    pub num_classes: usize,
    pub head: HeadKind,
    pub bn_eps: f64,
    pub bn_momentum: f64,
    /// Width of the seed head's hidden layer.
    pub seed_hidden: usize,
}

impl ModelConfig {
    /// A named variant with the given head.
    pub fn variant(v: Variant, num_classes: usize, head: HeadKind) -> Self {
        let (w, d, p) = v.multipliers();
        let bn = v.bn();
        Self {
            width_mult: w,
            depth_mult: d,
            dropout: p,
            seed_dropout: (0.5, 0.5),
            stochastic_depth_prob: 0.2,
            num_classes,
            head,
            bn_eps: bn.eps,
            bn_momentum: bn.momentum,
            seed_hidden: 256,
        }
    }

    /// EfficientNet-B0.
    pub fn b0(num_classes: usize, head: HeadKind) -> Self {
        Self::variant(Variant::B0, num_classes, head)
    }

    fn bn(&self) -> BnCfg {
        BnCfg { eps: self.bn_eps, momentum: self.bn_momentum }
    }

    fn channels(&self, c: usize) -> usize {
        make_divisible(c as f64 * self.width_mult, 8)
    }

    fn depth(&self, n: usize) -> usize {
        (n as f64 * self.depth_mult).ceil() as usize
    }

    /// Per stage: (expand, kernel, stride, in, out, blocks) after the multipliers.
    pub fn stages(&self) -> Vec<(usize, usize, usize, usize, usize, usize)> {
        B0_STAGES
            .iter()
            .map(|&(e, k, s, i, o, n)| (e, k, s, self.channels(i), self.channels(o), self.depth(n)))
            .collect()
    }

    /// Channels entering the classifier (4 × the last stage's width).
    pub fn feature_channels(&self) -> usize {
        4 * self.channels(B0_STAGES[6].4)
    }
}

/// Conv → BN → optional activation, named `<prefix>.0` and `<prefix>.1`.
#[derive(Clone, Debug)]
pub struct ConvBnAct<T> {
    pub conv: Conv2d,
    pub bn: BatchNorm<T>,
    pub act: Option<Act>,
}

impl<T: Float> ConvBnAct<T> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reg: &mut Registry<'_, T>,
        bns: &mut Vec<String>,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        act: Option<Act>,
        bn: BnCfg,
        rng: &mut Pcg64,
    ) -> Self {
        let w = kaiming_normal_fan_out(&[cout, k, k, cin / groups], cout * k * k, rng);
        let weight = reg.add(&format!("{prefix}.0.weight"), w, Layout::ConvOhwi);
        let bn = new_bn(reg, bns, &format!("{prefix}.1"), cout, bn);
        Self { conv: Conv2d { weight, cfg: ConvCfg { stride, pad: (k - 1) / 2, groups } }, bn, act }
    }

    pub fn forward<B: Backend<Host = T>>(
        &mut self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
        ctx: &Ctx<'_>,
        frozen: bool,
    ) -> Result<Var> {
        let h = self.conv.forward(tape, store, x)?;
        self.bn.forward(tape, store, h, ctx.bn_mode(frozen), self.act)
    }
}

fn new_bn<T: Float>(
    reg: &mut Registry<'_, T>,
    bns: &mut Vec<String>,
    prefix: &str,
    c: usize,
    cfg: BnCfg,
) -> BatchNorm<T> {
    let weight = reg.add(&format!("{prefix}.weight"), Array::full(&[c], T::one()), Layout::Same);
    let bias = reg.add(&format!("{prefix}.bias"), Array::zeros(&[c]), Layout::Same);
    let index = bns.len();
    bns.push(prefix.to_string());
    BatchNorm { weight, bias, state: BnState::new(c), cfg, index }
}

/// Squeeze-excite: pool → fc1 → SiLU → fc2 → sigmoid → scale.
#[derive(Clone, Debug)]
pub struct SqueezeExcite {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl SqueezeExcite {
    fn new<T: Float>(
        reg: &mut Registry<'_, T>,
        prefix: &str,
        channels: usize,
        squeeze: usize,
        rng: &mut Pcg64,
    ) -> Self {
        let mut fc = |name: &str, o: usize, i: usize| {
            let w = kaiming_normal_fan_out(&[o, i], o, rng);
            let weight = reg.add(&format!("{prefix}.{name}.weight"), w, Layout::Conv1x1AsLinear);
            let bias = reg.add(&format!("{prefix}.{name}.bias"), Array::zeros(&[o]), Layout::Same);
            Linear { weight, bias }
        };
        let fc1 = fc("fc1", squeeze, channels);
        let fc2 = fc("fc2", channels, squeeze);
        Self { fc1, fc2 }
    }

    pub fn forward<T: Float, B: Backend<Host = T>>(
        &self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
    ) -> Result<Var> {
        let s = pool::global_avg_pool(tape, x)?;
        let s = self.fc1.forward(tape, store, s)?;
        let s = activation::silu(tape, s)?;
        let s = self.fc2.forward(tape, store, s)?;
        let s = activation::sigmoid(tape, s)?;
        scale::channel_scale(tape, x, s)
    }
}

/// One MBConv block: [expand 1×1 → BN → SiLU] → depthwise k×k → BN → SiLU → SE → project 1×1 → BN, with a
/// stochastic-depth residual when stride is 1 and the width is unchanged.
#[derive(Clone, Debug)]
pub struct MbConv<T> {
    pub expand: Option<ConvBnAct<T>>,
    pub depthwise: ConvBnAct<T>,
    pub se: SqueezeExcite,
    pub project: ConvBnAct<T>,
    pub residual: bool,
    pub stochastic_depth_prob: f64,
}

impl<T: Float> MbConv<T> {
    /// Builds a block under `prefix` (e.g. `features.2.0.block`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reg: &mut Registry<'_, T>,
        bns: &mut Vec<String>,
        prefix: &str,
        cin: usize,
        cout: usize,
        expand_ratio: usize,
        k: usize,
        stride: usize,
        sd_prob: f64,
        bn: BnCfg,
        rng: &mut Pcg64,
    ) -> Self {
        let expanded = make_divisible((cin * expand_ratio) as f64, 8);
        let mut idx = 0;
        let mut next = || {
            let s = format!("{prefix}.{idx}");
            idx += 1;
            s
        };
        let expand = (expanded != cin)
            .then(|| ConvBnAct::new(reg, bns, &next(), cin, expanded, 1, 1, 1, Some(Act::Silu), bn, rng));
        let depthwise =
            ConvBnAct::new(reg, bns, &next(), expanded, expanded, k, stride, expanded, Some(Act::Silu), bn, rng);
        let se = SqueezeExcite::new(reg, &next(), expanded, (cin / 4).max(1), rng);
        let project = ConvBnAct::new(reg, bns, &next(), expanded, cout, 1, 1, 1, None, bn, rng);
        Self { expand, depthwise, se, project, residual: stride == 1 && cin == cout, stochastic_depth_prob: sd_prob }
    }

    pub fn forward<B: Backend<Host = T>>(
        &mut self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
        ctx: &mut Ctx<'_>,
        frozen: bool,
    ) -> Result<Var> {
        let mut h = x;
        if let Some(e) = &mut self.expand {
            h = e.forward(tape, store, h, ctx, frozen)?;
        }
        h = self.depthwise.forward(tape, store, h, ctx, frozen)?;
        h = self.se.forward(tape, store, h)?;
        h = self.project.forward(tape, store, h, ctx, frozen)?;
        if self.residual {
            if ctx.train && ctx.stochastic_depth && self.stochastic_depth_prob > 0.0 {
                let source = ctx.mask_source();
                h = dropout::drop(tape, MaskKind::Row, h, self.stochastic_depth_prob, source)?;
            }
            h = elementwise::add(tape, h, x)?;
        }
        Ok(h)
    }
}

/// The classifier on the pooled features.
#[derive(Clone, Debug)]
pub enum Head<T> {
    Torchvision { dropout: f64, fc: Linear },
    Seed { dropout: (f64, f64), fc1: Linear, bn: BatchNorm<T>, fc2: Linear },
}

impl<T: Float> Head<T> {
    pub fn new(reg: &mut Registry<'_, T>, bns: &mut Vec<String>, cfg: &ModelConfig, rng: &mut Pcg64) -> Self {
        let fin = cfg.feature_channels();
        match cfg.head {
            HeadKind::Torchvision => {
                // torchvision: U(±1/√out_features), bias 0.
                let bound = 1.0 / (cfg.num_classes as f64).sqrt();
                let weight = reg.add("classifier.1.weight", uniform(&[cfg.num_classes, fin], bound, rng), Layout::Same);
                let bias = reg.add("classifier.1.bias", Array::zeros(&[cfg.num_classes]), Layout::Same);
                Head::Torchvision { dropout: cfg.dropout, fc: Linear { weight, bias } }
            }
            HeadKind::Seed => {
                // nn.Linear's default: weight and bias U(±1/√in_features).
                let mut lin = |name: &str, o: usize, i: usize| {
                    let b = 1.0 / (i as f64).sqrt();
                    let weight = reg.add(&format!("classifier.{name}.weight"), uniform(&[o, i], b, rng), Layout::Same);
                    let bias = reg.add(&format!("classifier.{name}.bias"), uniform(&[o], b, rng), Layout::Same);
                    Linear { weight, bias }
                };
                let fc1 = lin("1", cfg.seed_hidden, fin);
                let bn = new_bn(reg, bns, "classifier.3", cfg.seed_hidden, BnCfg::default());
                let fc2 = {
                    let b = 1.0 / (cfg.seed_hidden as f64).sqrt();
                    let weight = reg.add(
                        "classifier.5.weight",
                        uniform(&[cfg.num_classes, cfg.seed_hidden], b, rng),
                        Layout::Same,
                    );
                    let bias = reg.add("classifier.5.bias", uniform(&[cfg.num_classes], b, rng), Layout::Same);
                    Linear { weight, bias }
                };
                Head::Seed { dropout: cfg.seed_dropout, fc1, bn, fc2 }
            }
        }
    }

    /// Pooled features `[N, F]` → logits `[N, C]`.
    pub fn forward<B: Backend<Host = T>>(
        &mut self,
        tape: &mut Tape<T, B>,
        store: &ParamStore<T>,
        x: Var,
        ctx: &mut Ctx<'_>,
    ) -> Result<Var> {
        match self {
            Head::Torchvision { dropout, fc } => {
                let h = maybe_dropout(tape, ctx, x, *dropout)?;
                fc.forward(tape, store, h)
            }
            Head::Seed { dropout, fc1, bn, fc2 } => {
                let h = maybe_dropout(tape, ctx, x, dropout.0)?;
                let h = fc1.forward(tape, store, h)?;
                let h = activation::relu(tape, h)?;
                let h = bn.forward(tape, store, h, ctx.bn_mode(false), None)?;
                let h = maybe_dropout(tape, ctx, h, dropout.1)?;
                fc2.forward(tape, store, h)
            }
        }
    }
}

/// The whole model: parameters, running statistics and structure.
#[derive(Clone, Debug)]
pub struct EfficientNet<T> {
    pub config: ModelConfig,
    pub params: ParamStore<T>,
    /// PyTorch layout of each parameter, by id.
    pub layouts: Vec<Layout>,
    /// Name prefix of each batch norm, in [`EfficientNet::batch_norms`] order.
    pub bn_names: Vec<String>,
    pub stem: ConvBnAct<T>,
    pub stages: Vec<Vec<MbConv<T>>>,
    pub top: ConvBnAct<T>,
    pub head: Head<T>,
    /// Parameter ids of each of the 9 children of `features`.
    pub block_params: Vec<Vec<ParamId>>,
    /// How many leading feature blocks are frozen.
    pub frozen_blocks: usize,
}

impl<T: Float> EfficientNet<T> {
    /// Builds a model with torchvision's initialisation from `seed`. Every parameter starts trainable.
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        let mut rng = Pcg64::seed_from_u64(seed);
        let mut params = ParamStore::new();
        let mut layouts = Vec::new();
        let mut bn_names = Vec::new();
        let mut reg = Registry { store: &mut params, layouts: &mut layouts };
        let bn = config.bn();
        let stages_cfg = config.stages();
        let mut block_params = Vec::new();
        let mut mark = reg.store.len();
        let mut close_block = |store_len: usize, mark: &mut usize| {
            block_params.push((*mark..store_len).collect::<Vec<_>>());
            *mark = store_len;
        };
        let stem_out = stages_cfg[0].3;
        let stem =
            ConvBnAct::new(&mut reg, &mut bn_names, "features.0", 3, stem_out, 3, 2, 1, Some(Act::Silu), bn, &mut rng);
        close_block(reg.store.len(), &mut mark);
        let total_blocks: usize = stages_cfg.iter().map(|s| s.5).sum();
        let mut block_id = 0;
        let mut stages = Vec::new();
        for (si, &(e, k, s, cin, cout, n)) in stages_cfg.iter().enumerate() {
            let mut blocks = Vec::new();
            for j in 0..n {
                let (bin, stride) = if j == 0 { (cin, s) } else { (cout, 1) };
                let sd = config.stochastic_depth_prob * block_id as f64 / total_blocks as f64;
                let prefix = format!("features.{}.{j}.block", si + 1);
                blocks.push(MbConv::new(&mut reg, &mut bn_names, &prefix, bin, cout, e, k, stride, sd, bn, &mut rng));
                block_id += 1;
            }
            stages.push(blocks);
            close_block(reg.store.len(), &mut mark);
        }
        let last = stages_cfg[6].4;
        let top = ConvBnAct::new(
            &mut reg,
            &mut bn_names,
            "features.8",
            last,
            config.feature_channels(),
            1,
            1,
            1,
            Some(Act::Silu),
            bn,
            &mut rng,
        );
        close_block(reg.store.len(), &mut mark);
        let head = Head::new(&mut reg, &mut bn_names, &config, &mut rng);
        Self { config, params, layouts, bn_names, stem, stages, top, head, block_params, frozen_blocks: 0 }
    }

    /// Freezes feature blocks `0..k` and makes the rest (and the head) trainable.
    pub fn freeze_blocks(&mut self, k: usize) -> Result<()> {
        if k > FEATURE_BLOCKS {
            bail!("cannot freeze {k} blocks: features has {FEATURE_BLOCKS}");
        }
        for (i, ids) in self.block_params.iter().enumerate() {
            for &id in ids {
                self.params.set_trainable(id, i >= k);
            }
        }
        self.frozen_blocks = k;
        Ok(())
    }

    /// Images `[N, H, W, 3]` (NHWC, normalized) → logits `[N, C]`.
    pub fn forward<B: Backend<Host = T>>(&mut self, tape: &mut Tape<T, B>, x: Var, ctx: &mut Ctx<'_>) -> Result<Var> {
        let s = tape.shape(x);
        if s.len() != 4 || s[3] != 3 {
            bail!("model input must be NHWC images [N, H, W, 3], got shape {s:?}");
        }
        let fb = self.frozen_blocks;
        let store = &self.params;
        let mut h = self.stem.forward(tape, store, x, ctx, fb > 0)?;
        for (si, blocks) in self.stages.iter_mut().enumerate() {
            for b in blocks {
                h = b.forward(tape, store, h, ctx, si + 1 < fb)?;
            }
        }
        h = self.top.forward(tape, store, h, ctx, fb >= FEATURE_BLOCKS)?;
        let pooled = pool::global_avg_pool(tape, h)?;
        self.head.forward(tape, store, pooled, ctx)
    }

    /// Every batch norm, in `bn_names` order.
    pub fn batch_norms(&self) -> Vec<&BatchNorm<T>> {
        let mut v = vec![&self.stem.bn];
        for b in self.stages.iter().flatten() {
            v.extend(b.expand.as_ref().map(|e| &e.bn));
            v.push(&b.depthwise.bn);
            v.push(&b.project.bn);
        }
        v.push(&self.top.bn);
        if let Head::Seed { bn, .. } = &self.head {
            v.push(bn);
        }
        v
    }

    pub fn batch_norms_mut(&mut self) -> Vec<&mut BatchNorm<T>> {
        let mut v = vec![&mut self.stem.bn];
        for b in self.stages.iter_mut().flatten() {
            if let Some(e) = b.expand.as_mut() {
                v.push(&mut e.bn);
            }
            v.push(&mut b.depthwise.bn);
            v.push(&mut b.project.bn);
        }
        v.push(&mut self.top.bn);
        if let Head::Seed { bn, .. } = &mut self.head {
            v.push(bn);
        }
        v
    }

    /// Names and PyTorch shapes of every state-dict entry (parameters, then each BN's three buffers).
    pub fn expected_keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut keys: Vec<(String, Vec<usize>)> = self
            .params
            .iter()
            .zip(&self.layouts)
            .map(|(p, &l)| (p.name.clone(), torch_shape(l, &p.value.shape)))
            .collect();
        for (name, bn) in self.bn_names.iter().zip(self.batch_norms()) {
            let c = bn.state.running_mean.len();
            keys.push((format!("{name}.running_mean"), vec![c]));
            keys.push((format!("{name}.running_var"), vec![c]));
            keys.push((format!("{name}.num_batches_tracked"), vec![]));
        }
        keys
    }

    /// The state dict in PyTorch layout: f32 parameters and running statistics, i64 `num_batches_tracked`.
    pub fn state_dict(&self) -> StateDict {
        let mut out = StateDict::new();
        for (p, &l) in self.params.iter().zip(&self.layouts) {
            let (shape, data) = to_torch(l, &p.value);
            out.insert(
                p.name.clone(),
                Tensor { shape, storage: Storage::F32(data), device: crate::tensor::Device::Cpu },
            );
        }
        for (name, bn) in self.bn_names.iter().zip(self.batch_norms()) {
            let c = bn.state.running_mean.len();
            let f = |v: &[T]| Storage::F32(v.iter().map(|x| x.as_f64() as f32).collect());
            let cpu = crate::tensor::Device::Cpu;
            out.insert(
                format!("{name}.running_mean"),
                Tensor { shape: vec![c], storage: f(&bn.state.running_mean), device: cpu },
            );
            out.insert(
                format!("{name}.running_var"),
                Tensor { shape: vec![c], storage: f(&bn.state.running_var), device: cpu },
            );
            out.insert(
                format!("{name}.num_batches_tracked"),
                Tensor { shape: vec![], storage: Storage::I64(vec![bn.state.num_batches_tracked]), device: cpu },
            );
        }
        out
    }

    /// Loads a state dict with exactly this model's keys. Every missing, unexpected or mis-shaped key is listed
    /// in one error; nothing is changed unless all fit.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        self.load_filtered(sd, |_| true)
    }

    /// Loads only the backbone (`features.*`) from a state dict, ignoring its classifier (for pretrained
    /// ImageNet weights under a different head).
    pub fn load_backbone(&mut self, sd: &StateDict) -> Result<()> {
        let backbone: StateDict =
            sd.iter().filter(|(k, _)| k.starts_with("features.")).map(|(k, t)| (k.to_string(), t.clone())).collect();
        self.load_filtered(&backbone, |k| k.starts_with("features."))
    }

    fn load_filtered(&mut self, sd: &StateDict, wanted: impl Fn(&str) -> bool) -> Result<()> {
        let expected: Vec<(String, Vec<usize>)> = self.expected_keys().into_iter().filter(|(k, _)| wanted(k)).collect();
        check_keys(sd, &expected)?;
        let given: HashMap<&str, &Tensor> = sd.iter().collect();
        for id in 0..self.params.len() {
            let name = self.params.get(id).name.clone();
            if let Some(t) = given.get(name.as_str()) {
                let shape = self.params.get(id).value.shape.clone();
                *self.params.get_mut(id).value_mut() = from_torch(self.layouts[id], t, &shape);
            }
        }
        let names = self.bn_names.clone();
        for (name, bn) in names.iter().zip(self.batch_norms_mut()) {
            if let Some(t) = given.get(format!("{name}.running_mean").as_str()) {
                bn.state.running_mean = t.to_f64_vec().into_iter().map(T::of_f64).collect();
            }
            if let Some(t) = given.get(format!("{name}.running_var").as_str()) {
                bn.state.running_var = t.to_f64_vec().into_iter().map(T::of_f64).collect();
            }
            if let Some(t) = given.get(format!("{name}.num_batches_tracked").as_str()) {
                bn.state.num_batches_tracked = t.to_i64_vec()?.first().copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Reads the architecture off a state dict's shapes (head, class count, width and depth multipliers) and
    /// loads it. Named variants keep their batch-norm constants; other multipliers get B0's.
    pub fn from_state_dict(sd: &StateDict) -> Result<Self> {
        let cfg = infer_config(sd)?;
        let mut m = Self::new(cfg, 0);
        m.load_state_dict(sd)?;
        Ok(m)
    }
}

/// The [`ModelConfig`] a state dict was saved from, found by matching its shapes.
pub fn infer_config(sd: &StateDict) -> Result<ModelConfig> {
    let shape_of = |k: &str| sd.get(k).map(|t| t.shape.clone());
    let (head, classes) = if let Some(s) = shape_of("classifier.5.weight") {
        (HeadKind::Seed, s[0])
    } else if let Some(s) = shape_of("classifier.1.weight") {
        (HeadKind::Torchvision, s[0])
    } else {
        bail!("the weights have no classifier.1.weight or classifier.5.weight: not an EfficientNet with a known head");
    };
    // Blocks per stage and each stage's output width, read off the key names and projection shapes.
    let mut blocks = [0usize; 7];
    let mut widths = [0usize; 7];
    for (k, t) in sd.iter() {
        let mut parts = k.split('.');
        if parts.next() != Some("features") {
            continue;
        }
        let (Some(Ok(stage)), Some(Ok(block))) =
            (parts.next().map(str::parse::<usize>), parts.next().map(str::parse::<usize>))
        else {
            continue;
        };
        if (1..=7).contains(&stage) {
            blocks[stage - 1] = blocks[stage - 1].max(block + 1);
            if k.ends_with(".1.running_mean") {
                // The last BN of a block is the projection's: its width is the block's output.
                widths[stage - 1] = t.shape.first().copied().unwrap_or(0);
            }
        }
    }
    let stem = shape_of("features.0.0.weight").map(|s| s[0]).context("the weights have no features.0.0.weight")?;
    let fits = |c: &ModelConfig| {
        let st = c.stages();
        st[0].3 == stem
            && st.iter().zip(&blocks).all(|(s, &b)| s.5 == b)
            && st.iter().zip(&widths).all(|(s, &w)| s.4 == w)
    };
    for v in Variant::ALL {
        let c = ModelConfig::variant(v, classes, head);
        if fits(&c) {
            return Ok(with_hidden(c, &shape_of));
        }
    }
    let mut c = ModelConfig::b0(classes, head);
    let depth = (1..=400).map(|i| i as f64 / 100.0).find(|&d| {
        c.depth_mult = d;
        c.stages().iter().zip(&blocks).all(|(s, &b)| s.5 == b)
    });
    let width = (1..=400).map(|i| i as f64 / 100.0).find(|&w| {
        c.width_mult = w;
        fits(&c)
    });
    match (depth, width) {
        (Some(d), Some(w)) => {
            c.depth_mult = d;
            c.width_mult = w;
            Ok(with_hidden(c, &shape_of))
        }
        _ => bail!(
            "the weights match no EfficientNet layout (stem {stem}, blocks per stage {blocks:?}, widths {widths:?})"
        ),
    }
}

fn with_hidden(mut c: ModelConfig, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> ModelConfig {
    if c.head == HeadKind::Seed
        && let Some(s) = shape_of("classifier.1.weight")
    {
        c.seed_hidden = s[0];
    }
    c
}

/// PyTorch shape of an internal parameter shape.
pub fn torch_shape(layout: Layout, s: &[usize]) -> Vec<usize> {
    match layout {
        Layout::Same => s.to_vec(),
        Layout::ConvOhwi => vec![s[0], s[3], s[1], s[2]],
        Layout::Conv1x1AsLinear => vec![s[0], s[1], 1, 1],
    }
}

/// Internal array → PyTorch shape and f32 data.
pub fn to_torch<T: Float>(layout: Layout, a: &Array<T>) -> (Vec<usize>, Vec<f32>) {
    let shape = torch_shape(layout, &a.shape);
    let data: Vec<f32> = match layout {
        Layout::ConvOhwi => {
            let (o, kh, kw, i) = (a.shape[0], a.shape[1], a.shape[2], a.shape[3]);
            // Per output channel, [kh, kw, i] → [i, kh, kw].
            let mut out = Vec::with_capacity(a.numel());
            for oc in 0..o {
                for ic in 0..i {
                    for y in 0..kh {
                        for x in 0..kw {
                            out.push(a.data[((oc * kh + y) * kw + x) * i + ic].as_f64() as f32);
                        }
                    }
                }
            }
            out
        }
        _ => a.data.iter().map(|v| v.as_f64() as f32).collect(),
    };
    (shape, data)
}

/// PyTorch tensor → internal array of `shape` (shapes already checked).
pub fn from_torch<T: Float>(layout: Layout, t: &Tensor, shape: &[usize]) -> Array<T> {
    let v = t.to_f64_vec();
    let data = match layout {
        Layout::ConvOhwi => {
            let (o, kh, kw, i) = (shape[0], shape[1], shape[2], shape[3]);
            let mut out = vec![T::zero(); v.len()];
            for oc in 0..o {
                for ic in 0..i {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((oc * kh + y) * kw + x) * i + ic] = T::of_f64(v[((oc * i + ic) * kh + y) * kw + x]);
                        }
                    }
                }
            }
            out
        }
        _ => v.into_iter().map(T::of_f64).collect(),
    };
    Array { shape: shape.to_vec(), data }
}
