//! NaN propagates through every op as it does in PyTorch, forward and backward.
//!
//! PyTorch's ops are arithmetic, so an output (or gradient) element is NaN exactly when it depends on the NaN
//! input. For each op, the dependency is measured rather than written down: the op runs on fresh random finite
//! inputs, again with one input element moved by a finite step, and once more with that element NaN. An output or
//! gradient element that the step changed must be NaN in the third run, every other one must stay finite.
//! Selections are not arithmetic and are spelled out: ReLU (NaN passes forward, the gradient passes backward, as
//! `threshold_backward` does) and a dropped element (NaN · 0 = NaN).

use derma::autograd::{ParamStore, Tape, Var};
use derma::nn::{Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::activation::{self, Act};
use derma::ops::batchnorm::{self, BnCfg, BnMode, BnState};
use derma::ops::conv::{self, ConvCfg};
use derma::ops::loss::{self, LossKind};
use derma::ops::{dropout, elementwise, linear, pool, reduce, scale};
use derma::tensor::Array;
use rand::{Rng, RngExt, SeedableRng};
use rand_pcg::Pcg64;

type Op<'a> = &'a dyn Fn(&mut Tape<f64>, &[Var]) -> anyhow::Result<Var>;

fn rng() -> Pcg64 {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    Pcg64::seed_from_u64(seed)
}

fn rand_array(r: &mut impl Rng, shape: &[usize], lo: f64, hi: f64) -> Array<f64> {
    let n = shape.iter().product();
    Array::new(shape, (0..n).map(|_| r.random_range(lo..hi)).collect()).unwrap()
}

/// The op's output and the gradient of every input for the output gradient `dy` (drawn from `dy_seed`).
fn run(inputs: &[Array<f64>], dy_seed: u64, op: Op<'_>) -> (Array<f64>, Vec<Array<f64>>) {
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|a| tape.leaf(a.clone())).collect();
    let y = op(&mut tape, &vars).unwrap();
    let out = (**tape.value(y)).clone();
    let dy = rand_array(&mut Pcg64::seed_from_u64(dy_seed), &out.shape, -1.0, 1.0);
    let grads = tape.backward_with(y, dy, &mut ParamStore::new()).unwrap();
    let g =
        vars.iter().zip(inputs).map(|(&v, a)| grads.get(v).map_or_else(|| Array::zeros(&a.shape), |g| (**g).clone()));
    (out, g.collect())
}

/// Asserts `got` is NaN exactly where `base` and `moved` differ, naming the first element that is not.
fn assert_nan_where_dependent(what: &str, base: &[f64], moved: &[f64], got: &[f64]) -> usize {
    let mut dependent = 0;
    for (k, ((&b, &m), &g)) in base.iter().zip(moved).zip(got).enumerate() {
        let depends = b != m;
        dependent += depends as usize;
        if depends {
            assert!(g.is_nan(), "{what}[{k}] depends on the NaN input but is {g}");
        } else {
            assert!(g.is_finite(), "{what}[{k}] does not depend on the NaN input but is {g}");
        }
    }
    dependent
}

/// Runs `op` with input `which.0`'s element `which.1` moved and made NaN, checking output and every gradient.
fn nan_case(name: &str, inputs: Vec<Array<f64>>, which: (usize, usize), op: Op<'_>) {
    let dy_seed: u64 = rand::rng().random();
    let (out, grads) = run(&inputs, dy_seed, op);
    assert!(out.data.iter().all(|v| v.is_finite()), "{name}: finite inputs gave a non-finite output");
    let mut moved = inputs.clone();
    moved[which.0].data[which.1] += 0.371;
    let (out_m, grads_m) = run(&moved, dy_seed, op);
    let mut poisoned = inputs;
    poisoned[which.0].data[which.1] = f64::NAN;
    let (out_n, grads_n) = run(&poisoned, dy_seed, op);
    let n = assert_nan_where_dependent(&format!("{name} output"), &out.data, &out_m.data, &out_n.data);
    assert!(n > 0, "{name}: the output does not depend on the poisoned element; the case tests nothing");
    for (i, ((g, gm), gn)) in grads.iter().zip(&grads_m).zip(&grads_n).enumerate() {
        assert_nan_where_dependent(&format!("{name} grad of input {i}"), &g.data, &gm.data, &gn.data);
    }
}

#[test]
fn nan_through_conv2d() {
    let mut r = rng();
    for (shape, cout, k, stride, groups) in
        [([2, 5, 6, 3], 4, 3, 1, 1), ([2, 7, 5, 4], 4, 3, 2, 4), ([2, 3, 3, 5], 6, 1, 1, 1)]
    {
        let cfg = ConvCfg { stride, pad: (k - 1) / 2, groups };
        let x = rand_array(&mut r, &shape, -1.0, 1.0);
        let w = rand_array(&mut r, &[cout, k, k, shape[3] / groups], -1.0, 1.0);
        let b = rand_array(&mut r, &[cout], -1.0, 1.0);
        let op = |t: &mut Tape<f64>, v: &[Var]| conv::conv2d(t, v[0], v[1], Some(v[2]), cfg);
        let at = r.random_range(0..x.numel());
        nan_case("conv2d (input)", vec![x.clone(), w.clone(), b.clone()], (0, at), &op);
        // A NaN weight without padding: at a padded tap, 0 · NaN is NaN in an im2col convolution (derma's and
        // PyTorch's slow path) but skipped by direct ones, so PyTorch itself differs between backends there.
        let unpadded = ConvCfg { pad: 0, ..cfg };
        let op = |t: &mut Tape<f64>, v: &[Var]| conv::conv2d(t, v[0], v[1], Some(v[2]), unpadded);
        let at = r.random_range(0..w.numel());
        nan_case("conv2d (weight)", vec![x, w, b], (1, at), &op);
    }
}

#[test]
fn nan_through_batch_norm() {
    let mut r = rng();
    for mode in [BnMode::Train { update_running: true }, BnMode::Eval] {
        for act in [None, Some(Act::Silu)] {
            let x = rand_array(&mut r, &[2, 3, 5, 4], -2.0, 2.0);
            let g = rand_array(&mut r, &[4], 0.5, 1.5);
            let b = rand_array(&mut r, &[4], -0.5, 0.5);
            let mut state = BnState::new(4);
            state.running_mean = rand_array(&mut r, &[4], -0.5, 0.5).data;
            state.running_var = rand_array(&mut r, &[4], 0.5, 2.0).data;
            let op = |t: &mut Tape<f64>, v: &[Var]| {
                batchnorm::batch_norm(t, v[0], v[1], v[2], &mut state.clone(), mode, BnCfg::default(), act)
            };
            let at = r.random_range(0..x.numel());
            nan_case(&format!("batch norm {mode:?} {act:?}"), vec![x.clone(), g.clone(), b.clone()], (0, at), &op);
            nan_case(&format!("batch norm {mode:?} {act:?} (gamma)"), vec![x, g, b], (1, 2), &op);
        }
    }
}

#[test]
fn nan_through_batch_norm_running_stats() {
    // In train mode a NaN batch poisons the running statistics of its channel only (as in PyTorch).
    let mut r = rng();
    let mut x = rand_array(&mut r, &[4, 3], -1.0, 1.0);
    x.data[3 + 1] = f64::NAN;
    let mut state = BnState::<f64>::new(3);
    let mut tape = Tape::new();
    let xv = tape.leaf(x);
    let g = tape.leaf(Array::full(&[3], 1.0));
    let b = tape.leaf(Array::full(&[3], 0.0));
    let mode = BnMode::Train { update_running: true };
    batchnorm::batch_norm(&mut tape, xv, g, b, &mut state, mode, BnCfg::default(), None).unwrap();
    for (ch, (m, v)) in state.running_mean.iter().zip(&state.running_var).enumerate() {
        assert_eq!(m.is_nan(), ch == 1, "running_mean[{ch}] = {m}");
        assert_eq!(v.is_nan(), ch == 1, "running_var[{ch}] = {v}");
    }
}

#[test]
fn nan_through_smooth_activations() {
    let mut r = rng();
    for act in [Act::Silu, Act::Sigmoid] {
        let x = rand_array(&mut r, &[3, 7], -4.0, 4.0);
        let at = r.random_range(0..x.numel());
        nan_case(act.name(), vec![x], (0, at), &|t: &mut Tape<f64>, v: &[Var]| activation::activate(t, act, v[0]));
        // The f32 path has its own exponential.
        let mut y = vec![0f32; 3];
        let mut dx = vec![0f32; 3];
        activation::forward(act, &[0.5f32, f32::NAN, -0.5], &mut y);
        activation::backward(act, &[0.5f32, f32::NAN, -0.5], &[1.0, 1.0, 1.0], &mut dx);
        assert!(y[1].is_nan() && dx[1].is_nan(), "{}: f32 {y:?} {dx:?}", act.name());
        assert!(y[0].is_finite() && y[2].is_finite() && dx[0].is_finite() && dx[2].is_finite());
    }
}

#[test]
fn relu_passes_nan_forward_and_the_gradient_backward() {
    // PyTorch: relu(NaN) = NaN; its backward is threshold_backward(grad, result, 0), `result <= 0 ? 0 : grad`,
    // which lets the gradient through where the result is NaN.
    fn case<T: derma::tensor::Float>() {
        let x: Vec<T> = [1.5, f64::NAN, -2.0, 0.0, -0.0].iter().map(|&v| T::of_f64(v)).collect();
        let dy: Vec<T> = [0.25, 0.5, 0.75, 1.0, 1.25].iter().map(|&v| T::of_f64(v)).collect();
        let mut y = vec![T::zero(); 5];
        let mut dx = vec![T::zero(); 5];
        activation::forward(Act::Relu, &x, &mut y);
        activation::backward(Act::Relu, &x, &dy, &mut dx);
        let y: Vec<f64> = y.iter().map(|v| v.as_f64()).collect();
        let dx: Vec<f64> = dx.iter().map(|v| v.as_f64()).collect();
        assert_eq!(y[0], 1.5);
        assert!(y[1].is_nan(), "relu(NaN) = {}", y[1]);
        assert_eq!(&y[2..], &[0.0, 0.0, 0.0]);
        assert_eq!(dx, vec![0.25, 0.5, 0.0, 0.0, 0.0]);
    }
    case::<f32>();
    case::<f64>();
}

#[test]
fn relu_is_unchanged_for_every_non_nan_input() {
    // The golden CPU behaviour: bit for bit the former `x > 0 ? x : 0` (and its derivative) wherever x is a number.
    let mut r = rng();
    let mut xs: Vec<f32> = (0..10_000).map(|_| r.random_range(-3.0..3.0)).collect();
    xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-45, -1e-45]);
    for &x in &xs {
        let old = if x > 0.0 { x } else { 0.0 };
        let old_d = if x > 0.0 { 1.0f32 } else { 0.0 };
        assert_eq!(Act::Relu.apply(x).to_bits(), old.to_bits(), "relu({x})");
        assert_eq!(Act::Relu.derivative(x).to_bits(), old_d.to_bits(), "relu'({x})");
    }
}

#[test]
fn nan_through_pool_scale_add_linear_sum() {
    let mut r = rng();
    let x = rand_array(&mut r, &[2, 3, 5, 4], -1.0, 1.0);
    let at = r.random_range(0..x.numel());
    nan_case("global_avg_pool", vec![x.clone()], (0, at), &|t: &mut Tape<f64>, v: &[Var]| {
        pool::global_avg_pool(t, v[0])
    });
    let s = rand_array(&mut r, &[2, 4], 0.0, 1.0);
    let op = |t: &mut Tape<f64>, v: &[Var]| scale::channel_scale(t, v[0], v[1]);
    nan_case("channel_scale (input)", vec![x.clone(), s.clone()], (0, at), &op);
    nan_case("channel_scale (scale)", vec![x.clone(), s], (1, 5), &op);
    let b = rand_array(&mut r, &[2, 3, 5, 4], -1.0, 1.0);
    nan_case("add", vec![x.clone(), b], (1, at), &|t: &mut Tape<f64>, v: &[Var]| elementwise::add(t, v[0], v[1]));
    nan_case("sum", vec![x], (0, at), &|t: &mut Tape<f64>, v: &[Var]| Ok(reduce::sum(t, v[0])));
    let xl = rand_array(&mut r, &[3, 5], -1.0, 1.0);
    let w = rand_array(&mut r, &[4, 5], -1.0, 1.0);
    let bl = rand_array(&mut r, &[4], -1.0, 1.0);
    let op = |t: &mut Tape<f64>, v: &[Var]| linear::linear(t, v[0], v[1], Some(v[2]));
    nan_case("linear (input)", vec![xl.clone(), w.clone(), bl.clone()], (0, 7), &op);
    nan_case("linear (weight)", vec![xl.clone(), w.clone(), bl.clone()], (1, 3), &op);
    nan_case("linear (bias)", vec![xl, w, bl], (2, 1), &op);
}

#[test]
fn nan_through_dropout_even_where_dropped() {
    // PyTorch multiplies by the mask, so a dropped NaN stays NaN (NaN · 0); the gradient is dy · mask.
    let mut tape = Tape::<f64>::new();
    let x = tape.leaf(Array::new(&[4], vec![f64::NAN, f64::NAN, 1.0, 2.0]).unwrap());
    let y = dropout::dropout_with_mask(&mut tape, x, vec![2.0, 0.0, 0.0, 2.0]).unwrap();
    let out = tape.value(y).data.clone();
    assert!(out[0].is_nan() && out[1].is_nan(), "{out:?}");
    assert_eq!(&out[2..], &[0.0, 4.0]);
    let g = tape.backward_with(y, Array::full(&[4], 1.0), &mut ParamStore::new()).unwrap();
    assert_eq!(g.get(x).unwrap().data, vec![2.0, 0.0, 0.0, 2.0]);
}

#[test]
fn nan_through_log_softmax_and_losses() {
    let mut r = rng();
    let logits = rand_array(&mut r, &[3, 5], -2.0, 2.0);
    let at = 5 + r.random_range(0..5);
    nan_case("log_softmax", vec![logits.clone()], (0, at), &|t: &mut Tape<f64>, v: &[Var]| loss::log_softmax(t, v[0]));
    let weights = [0.5, 1.0, 2.0, 1.5, 0.75];
    for kind in [LossKind::CrossEntropy, LossKind::Focal { gamma: 2.0 }] {
        let op = |t: &mut Tape<f64>, v: &[Var]| loss::loss(t, v[0], &[1, 4, 0], Some(&weights), &kind);
        nan_case(&format!("{kind:?}"), vec![logits.clone()], (0, at), &op);
    }
    // A row holding only NaN, and one with NaN at its maximum's place: every probability of the row is NaN.
    let probs = loss::softmax_rows(&[f64::NAN, f64::NAN, 5.0, f64::NAN, 0.0, 1.0], 3);
    assert!(probs.iter().all(|p| p.is_nan()), "{probs:?}");
}

#[test]
fn nan_images_give_nan_logits() {
    // Formerly ReLU in the seed head mapped NaN to 0, so NaN images gave finite logits.
    for head in [HeadKind::Seed, HeadKind::Torchvision] {
        let mut model = EfficientNet::<f32>::new(ModelConfig::b0(8, head), 0);
        let mut tape = Tape::inference();
        let x = tape.constant(Array::full(&[1, 32, 32, 3], f32::NAN));
        let mut rng = Pcg64::seed_from_u64(0);
        let mut ctx = Ctx {
            train: false,
            dropout: false,
            stochastic_depth: false,
            frozen_bn_eval: true,
            rng: &mut rng,
            counter_masks: None,
            masks_drawn: 0,
        };
        let logits = model.forward(&mut tape, x, &mut ctx).unwrap();
        let l = &tape.value(logits).data;
        assert!(l.iter().all(|v| v.is_nan()), "{head:?} head: {l:?}");
    }
}

#[test]
fn derma_forward_writes_nan_logits_for_nan_images_and_warns() {
    use derma::io::{self, StateDict};
    use derma::tensor::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("w.safetensors");
    io::save_safetensors(&weights, &EfficientNet::<f32>::new(ModelConfig::b0(8, HeadKind::Seed), 1).state_dict(), None)
        .unwrap();
    let mut images = vec![0.25f32; 2 * 3 * 32 * 32];
    images[..3 * 32 * 32].fill(f32::NAN);
    let input = tmp.path().join("in.safetensors");
    let sd: StateDict =
        [("images".to_string(), Tensor::from_f32(&[2, 3, 32, 32], images).unwrap())].into_iter().collect();
    io::save_safetensors(&input, &sd, None).unwrap();
    let output = tmp.path().join("out.safetensors");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_derma"))
        .args(["forward", "--weights", weights.to_str().unwrap(), "--input", input.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap(), "--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("`images` holds 3072 NaN or infinite values"), "{stderr}");
    let logits = io::load_safetensors(&output).unwrap().0.get("logits").unwrap().to_f32_vec();
    assert!(logits[..8].iter().all(|v| v.is_nan()), "the NaN image: {logits:?}");
    assert!(logits[8..].iter().all(|v| v.is_finite()), "the finite image: {logits:?}");
}
