//! Every op's backward against central finite differences in f64, on fresh random inputs of awkward sizes (odd
//! H and W, channel counts not divisible by 8, batches of 1 and 3, stride 2 on odd sizes), plus composites: an
//! MBConv block with expansion, SE and residual, and the seed's head.

use derma::autograd::gradcheck::{Tolerance, check_inputs, check_params};
use derma::autograd::{ParamStore, Tape, Var};
use derma::nn::efficientnet::{Head, MbConv};
use derma::nn::{Ctx, HeadKind, ModelConfig, Registry};
use derma::ops::activation::{self, Act};
use derma::ops::batchnorm::{self, BnCfg, BnMode, BnState};
use derma::ops::conv::{self, ConvCfg};
use derma::ops::loss::{self, LossKind};
use derma::ops::{dropout, elementwise, linear, pool, scale};
use derma::tensor::Array;
use rand::{Rng, RngExt, SeedableRng};
use rand_pcg::Pcg64;

/// A fresh generator per run: inputs differ from run to run, and the seed is printed for reproduction.
fn rng() -> Pcg64 {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    Pcg64::seed_from_u64(seed)
}

fn rand_array(rng: &mut impl Rng, shape: &[usize], lo: f64, hi: f64) -> Array<f64> {
    let n = shape.iter().product();
    Array::new(shape, (0..n).map(|_| rng.random_range(lo..hi)).collect()).unwrap()
}

fn tol() -> Tolerance {
    Tolerance::default()
}

fn check(inputs: &[Array<f64>], f: impl FnMut(&mut Tape<f64>, &[Var]) -> anyhow::Result<Var>) {
    let rep = check_inputs(inputs, f, tol()).unwrap();
    assert!(rep.checked > 0);
}

fn conv_case(shape_x: [usize; 4], cout: usize, k: usize, stride: usize, groups: usize, bias: bool) {
    let mut r = rng();
    let cfg = ConvCfg { stride, pad: (k - 1) / 2, groups };
    let x = rand_array(&mut r, &shape_x, -1.0, 1.0);
    let w = rand_array(&mut r, &[cout, k, k, shape_x[3] / groups], -1.0, 1.0);
    let b = rand_array(&mut r, &[cout], -1.0, 1.0);
    let mut inputs = vec![x, w];
    if bias {
        inputs.push(b);
    }
    check(&inputs, |t, v| conv::conv2d(t, v[0], v[1], v.get(2).copied(), cfg));
}

#[test]
fn gradcheck_conv2d() {
    // The stem's shape: 3 → 5 channels, 3×3, stride 2 on odd sizes, batch 3.
    conv_case([3, 7, 5, 3], 5, 3, 2, 1, false);
    // Grouped (not depthwise), with bias, batch 1.
    conv_case([1, 5, 6, 6], 4, 3, 1, 2, true);
}

#[test]
fn gradcheck_conv2d_depthwise() {
    conv_case([3, 7, 9, 5], 5, 3, 1, 5, false);
    conv_case([1, 9, 7, 11], 11, 5, 2, 11, false);
}

#[test]
fn gradcheck_conv2d_pointwise() {
    conv_case([3, 5, 3, 7], 13, 1, 1, 1, false);
    conv_case([1, 3, 3, 5], 3, 1, 1, 1, true);
}

fn bn_case(shape: &[usize], mode: BnMode, act: Option<Act>) {
    let mut r = rng();
    let c = *shape.last().unwrap();
    let x = rand_array(&mut r, shape, -2.0, 2.0);
    let g = rand_array(&mut r, &[c], 0.5, 1.5);
    let b = rand_array(&mut r, &[c], -0.5, 0.5);
    let mut state = BnState::new(c);
    state.running_mean = rand_array(&mut r, &[c], -0.5, 0.5).data;
    state.running_var = rand_array(&mut r, &[c], 0.5, 2.0).data;
    check(&[x, g, b], |t, v| {
        batchnorm::batch_norm(t, v[0], v[1], v[2], &mut state.clone(), mode, BnCfg::default(), act)
    });
}

#[test]
fn gradcheck_batchnorm2d_train() {
    bn_case(&[3, 5, 3, 7], BnMode::Train { update_running: true }, None);
}

#[test]
fn gradcheck_batchnorm2d_eval() {
    bn_case(&[1, 3, 5, 7], BnMode::Eval, None);
}

#[test]
fn gradcheck_batchnorm1d() {
    bn_case(&[5, 11], BnMode::Train { update_running: true }, None);
    bn_case(&[3, 11], BnMode::Eval, None);
}

#[test]
fn gradcheck_batchnorm_silu() {
    // The fused node, in both modes.
    bn_case(&[3, 3, 5, 9], BnMode::Train { update_running: true }, Some(Act::Silu));
    bn_case(&[1, 3, 5, 9], BnMode::Eval, Some(Act::Silu));
}

fn act_case(act: Act) {
    let mut r = rng();
    let mut x = rand_array(&mut r, &[3, 5, 3, 7], -4.0, 4.0);
    // Keep ReLU's kink out of reach of the finite difference.
    x.data.iter_mut().for_each(|v| {
        if v.abs() < 1e-3 {
            *v = 0.5
        }
    });
    check(&[x], |t, v| activation::activate(t, act, v[0]));
}

#[test]
fn gradcheck_silu() {
    act_case(Act::Silu);
}

#[test]
fn gradcheck_sigmoid() {
    act_case(Act::Sigmoid);
}

#[test]
fn gradcheck_relu() {
    act_case(Act::Relu);
}

#[test]
fn gradcheck_global_avg_pool() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 5, 7, 11], -1.0, 1.0);
    check(&[x], |t, v| pool::global_avg_pool(t, v[0]));
}

#[test]
fn gradcheck_channel_scale() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 5, 3, 7], -1.0, 1.0);
    let s = rand_array(&mut r, &[3, 7], 0.0, 1.0);
    check(&[x, s], |t, v| scale::channel_scale(t, v[0], v[1]));
}

#[test]
fn gradcheck_add() {
    let mut r = rng();
    let a = rand_array(&mut r, &[1, 3, 5, 7], -1.0, 1.0);
    let b = rand_array(&mut r, &[1, 3, 5, 7], -1.0, 1.0);
    // The same var on both sides too: gradients must accumulate.
    check(&[a.clone(), b], |t, v| elementwise::add(t, v[0], v[1]));
    check(&[a], |t, v| elementwise::add(t, v[0], v[0]));
}

#[test]
fn gradcheck_linear() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 13], -1.0, 1.0);
    let w = rand_array(&mut r, &[7, 13], -1.0, 1.0);
    let b = rand_array(&mut r, &[7], -1.0, 1.0);
    check(&[x, w, b], |t, v| linear::linear(t, v[0], v[1], Some(v[2])));
}

#[test]
fn gradcheck_dropout() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 11], -1.0, 1.0);
    let mask: Vec<f64> = dropout::draw_mask(33, 0.5, &mut r);
    assert!(mask.iter().all(|&m| m == 0.0 || m == 2.0));
    check(&[x], |t, v| dropout::dropout_with_mask(t, v[0], mask.clone()));
}

#[test]
fn gradcheck_stochastic_depth() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 3, 5, 7], -1.0, 1.0);
    let mask = vec![0.0, 1.25, 1.25];
    check(&[x], |t, v| dropout::stochastic_depth_with_mask(t, v[0], mask.clone()));
}

#[test]
fn gradcheck_log_softmax() {
    let mut r = rng();
    let x = rand_array(&mut r, &[3, 9], -3.0, 3.0);
    check(&[x], |t, v| loss::log_softmax(t, v[0]));
}

fn loss_case(kind: LossKind, weighted: bool) {
    let mut r = rng();
    let (n, c) = (5, 9);
    let x = rand_array(&mut r, &[n, c], -3.0, 3.0);
    let targets: Vec<usize> = (0..n).map(|_| r.random_range(0..c)).collect();
    let w = rand_array(&mut r, &[c], 0.2, 3.0).data;
    let weights = weighted.then_some(w.as_slice());
    check(&[x], |t, v| loss::loss(t, v[0], &targets, weights, &kind));
}

#[test]
fn gradcheck_cross_entropy() {
    loss_case(LossKind::CrossEntropy, true);
    loss_case(LossKind::CrossEntropy, false);
}

#[test]
fn gradcheck_focal_loss() {
    loss_case(LossKind::Focal { gamma: 2.0 }, true);
    loss_case(LossKind::Focal { gamma: 1.5 }, false);
}

/// A small model config for composites: narrow so finite differences over every parameter stay cheap.
fn tiny_config(classes: usize, head: HeadKind) -> ModelConfig {
    let mut cfg = ModelConfig::b0(classes, head);
    cfg.width_mult = 0.1;
    cfg.seed_hidden = 6;
    cfg
}

#[test]
fn gradcheck_mbconv() {
    // Expansion 6, SE (squeeze from the 12-wide input: 3), stride 1 and in = out: a residual with stochastic depth.
    let mut r = rng();
    let mut store = ParamStore::new();
    let mut layouts = Vec::new();
    let mut bns = Vec::new();
    let mut init = Pcg64::seed_from_u64(r.random());
    let mut block = {
        let mut reg = Registry { store: &mut store, layouts: &mut layouts };
        MbConv::new(&mut reg, &mut bns, "b", 12, 12, 6, 3, 1, 0.25, BnCfg::default(), &mut init)
    };
    assert!(block.residual && block.expand.is_some());
    let x = rand_array(&mut r, &[3, 5, 3, 12], -1.0, 1.0);
    // Gradients with respect to every parameter, then to the input.
    let xs = x.clone();
    let mut b2 = block.clone();
    let rep = check_params(
        &mut store,
        |t, s| {
            let mut mask_rng = Pcg64::seed_from_u64(3);
            let mut ctx = Ctx {
                train: true,
                dropout: true,
                stochastic_depth: true,
                frozen_bn_eval: true,
                rng: &mut mask_rng,
                counter_masks: None,
                masks_drawn: 0,
            };
            let xv = t.constant(xs.clone());
            block.forward(t, s, xv, &mut ctx, false)
        },
        tol(),
    )
    .unwrap();
    assert!(rep.checked > 1000, "checked {}", rep.checked);
    // Input gradients with the weights held fixed (frozen: no weight-gradient work).
    let mut frozen = store.clone();
    (0..frozen.len()).for_each(|id| frozen.set_trainable(id, false));
    check(&[x], |t, v| {
        let mut mask_rng = Pcg64::seed_from_u64(3);
        let mut ctx = Ctx {
            train: true,
            dropout: true,
            stochastic_depth: true,
            frozen_bn_eval: true,
            rng: &mut mask_rng,
            counter_masks: None,
            masks_drawn: 0,
        };
        b2.forward(t, &frozen, v[0], &mut ctx, false)
    });
}

#[test]
fn gradcheck_seed_head() {
    let mut r = rng();
    let cfg = tiny_config(7, HeadKind::Seed);
    let mut store = ParamStore::new();
    let mut layouts = Vec::new();
    let mut bns = Vec::new();
    let mut init = Pcg64::seed_from_u64(r.random());
    let mut head = {
        let mut reg = Registry { store: &mut store, layouts: &mut layouts };
        Head::new(&mut reg, &mut bns, &cfg, &mut init)
    };
    assert_eq!(bns, vec!["classifier.3".to_string()]);
    let x = rand_array(&mut r, &[5, cfg.feature_channels()], -1.0, 1.0);
    let targets = [0usize, 3, 6, 3, 1];
    let alpha: Vec<f64> = (0..7).map(|i| 0.5 + i as f64 * 0.25).collect();
    let rep = check_params(
        &mut store,
        |t, s| {
            let mut mask_rng = Pcg64::seed_from_u64(9);
            let mut ctx = Ctx {
                train: true,
                dropout: true,
                stochastic_depth: true,
                frozen_bn_eval: true,
                rng: &mut mask_rng,
                counter_masks: None,
                masks_drawn: 0,
            };
            let xv = t.constant(x.clone());
            let logits = head.forward(t, s, xv, &mut ctx)?;
            loss::loss(t, logits, &targets, Some(&alpha), &LossKind::Focal { gamma: 2.0 })
        },
        tol(),
    )
    .unwrap();
    assert!(rep.checked > 500, "checked {}", rep.checked);
}
