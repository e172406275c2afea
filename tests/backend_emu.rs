//! The CUDA backend on the emulated device against the CPU reference: full-size EfficientNet-B0 with the seed head
//! (running statistics calibrated on another batch), one training step at batch 4, 64x64 (forward, class-weighted
//! focal loss, backward; dropout and stochastic depth on, counter masks) recorded as a program, run with the arena
//! poisoned with NaN, and compared in every unfreezing stage: logits, loss, every trainable parameter's gradient,
//! every batch norm's running statistics.
//!
//! What "matches" means. Two f32 implementations of this step cannot agree to 1e-5: the network amplifies
//! rounding (the CPU f32 path itself is up to ~1e-4 off the exact logits and ~1e-2 off the exact gradients of
//! some layers, measured here). So both are judged against the exact step (the CPU reference in f64 from the same
//! weights), element by element, in units of `max(|exact|, rms(exact tensor), floor)`: the device must be within
//! `1e-5 + 8 x (the CPU f32 path's worst error on that tensor)`. A wrong index, mask, layout or statistic is off by
//! orders of magnitude more. `floor` covers structural zeros (a bias gradient in front of a training-mode BN sums
//! to zero; a running mean of zero-mean activations): their error is that of the terms that cancel.

use derma::autograd::{ParamStore, Tape};
use derma::backend::cuda::{Cuda, Precision};
use derma::cuda::Gpu;
use derma::nn::efficientnet::Head;
use derma::nn::{BatchNorm, CounterMasks, Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::batchnorm::BnState;
use derma::ops::loss::{self, LossKind};
use derma::tensor::Array;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;
use std::sync::Arc;

/// Batch and image side of a step.
#[derive(Clone, Copy, Debug)]
struct Setup {
    batch: usize,
    size: usize,
}

/// What the stage tests run: the emulator takes about a second per stage here.
const SMALL: Setup = Setup { batch: 4, size: 64 };
const CLASSES: usize = 8;
const MASKS: CounterMasks = CounterMasks { seed: 11, epoch: 2, step: 5 };

fn images(seed: u64, s: Setup) -> Array<f32> {
    let mut r = Pcg64::seed_from_u64(seed);
    let n = s.batch * s.size * s.size * 3;
    Array::new(&[s.batch, s.size, s.size, 3], (0..n).map(|_| r.random_range(-2.0..2.0)).collect()).unwrap()
}

fn train_ctx(rng: &mut Pcg64, frozen_bn_eval: bool) -> Ctx<'_> {
    Ctx { frozen_bn_eval, counter_masks: Some(MASKS), ..Ctx::train(rng) }
}

/// Every batch norm of the model, mutably.
fn batch_norms(m: &mut EfficientNet<f32>) -> Vec<&mut BatchNorm<f32>> {
    let mut v = vec![&mut m.stem.bn];
    for b in m.stages.iter_mut().flatten() {
        v.extend(b.expand.as_mut().map(|e| &mut e.bn));
        v.push(&mut b.depthwise.bn);
        v.push(&mut b.project.bn);
    }
    v.push(&mut m.top.bn);
    if let Head::Seed { bn, .. } = &mut m.head {
        v.push(bn);
    }
    v
}

/// Full-size B0 with the seed head, its running statistics calibrated on one batch of other images (as after
/// training: a frozen block's eval-mode BN then normalizes), and blocks `0..frozen` frozen.
fn model(frozen: usize, s: Setup) -> EfficientNet<f32> {
    let mut m = EfficientNet::<f32>::new(ModelConfig::b0(CLASSES, HeadKind::Seed), 7);
    for bn in batch_norms(&mut m) {
        bn.cfg.momentum = 1.0;
    }
    let mut tape = Tape::inference();
    let x = tape.constant(images(99, s));
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = Ctx { dropout: false, stochastic_depth: false, frozen_bn_eval: false, ..Ctx::train(&mut rng) };
    m.forward(&mut tape, x, &mut ctx).unwrap();
    for bn in batch_norms(&mut m) {
        bn.cfg.momentum = 0.1;
    }
    m.freeze_blocks(frozen).unwrap();
    m
}

fn targets(s: Setup) -> Vec<usize> {
    [3, 6, 0, 7].into_iter().cycle().take(s.batch).collect()
}
const KIND: LossKind = LossKind::Focal { gamma: 2.0 };

fn class_weights() -> Vec<f32> {
    (0..CLASSES).map(|k| 0.5 + 0.25 * k as f32).collect()
}

fn new_backend(m: &EfficientNet<f32>, precision: Precision) -> Cuda {
    let gpu = Arc::new(Gpu::emulated().unwrap());
    let bns: Vec<&BnState<f32>> = m.batch_norms().into_iter().map(|b| &b.state).collect();
    Cuda::new(gpu, &m.params, &bns, precision).unwrap()
}

/// Records one training step of `m` on the CUDA backend; returns the backend (not run) and the logits and loss.
fn record(
    m: &mut EfficientNet<f32>,
    precision: Precision,
    frozen_bn_eval: bool,
    s: Setup,
) -> (Cuda, [derma::backend::cuda::Tensor; 2]) {
    let mut tape = Tape::on(new_backend(m, precision));
    let x = tape.backend_mut().input(&images(1, s)).unwrap();
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = train_ctx(&mut rng, frozen_bn_eval);
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let weights = class_weights();
    let l = loss::loss(&mut tape, logits, &targets(s), Some(&weights), &KIND).unwrap();
    let (lt, ll) = (tape.value(logits).clone(), tape.value(l).clone());
    tape.backend_mut().keep(&lt);
    tape.backend_mut().keep(&ll);
    tape.backward(l, &mut m.params).unwrap();
    (tape.into_backend(), [lt, ll])
}

/// The same step on the CPU reference: logits, loss; gradients and statistics stay in `m`.
fn cpu_step(m: &mut EfficientNet<f32>, frozen_bn_eval: bool, s: Setup) -> (Vec<f32>, f32) {
    let mut tape = Tape::new();
    let x = tape.constant(images(1, s));
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = train_ctx(&mut rng, frozen_bn_eval);
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let weights = class_weights();
    let l = loss::loss(&mut tape, logits, &targets(s), Some(&weights), &KIND).unwrap();
    let out = (tape.value(logits).data.clone(), tape.value(l).data[0]);
    tape.backward(l, &mut m.params).unwrap();
    out
}

/// The reference the device and the CPU f32 path are both judged against: the same step on the CPU in f64, from the
/// same f32 weights. Returns logits, loss, each parameter's gradient and each batch norm's running statistics.
struct Exact {
    logits: Vec<f64>,
    loss: f64,
    grads: Vec<Option<Vec<f64>>>,
    stats: Vec<(Vec<f64>, Vec<f64>)>,
}

fn exact_step(m32: &EfficientNet<f32>, frozen_bn_eval: bool, s: Setup) -> Exact {
    let mut m = EfficientNet::<f64>::new(m32.config.clone(), 7);
    m.load_state_dict(&m32.state_dict()).unwrap();
    m.freeze_blocks(m32.frozen_blocks).unwrap();
    let mut tape = Tape::<f64>::new();
    let img = images(1, s);
    let x = tape.constant(Array::new(&img.shape, img.data.iter().map(|&v| v as f64).collect()).unwrap());
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = train_ctx(&mut rng, frozen_bn_eval);
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let weights: Vec<f64> = class_weights().iter().map(|&v| v as f64).collect();
    let l = loss::loss(&mut tape, logits, &targets(s), Some(&weights), &KIND).unwrap();
    let (logits, loss) = (tape.value(logits).data.clone(), tape.value(l).data[0]);
    tape.backward(l, &mut m.params).unwrap();
    let grads = (0..m.params.len()).map(|id| m.params.grad(id).map(|g| g.to_vec())).collect();
    let stats = m.batch_norms().iter().map(|b| (b.state.running_mean.clone(), b.state.running_var.clone())).collect();
    Exact { logits, loss, grads, stats }
}

/// How much less accurate than the CPU f32 path (f64 sums) the device (f32 sums) may be.
const CPU_FACTOR: f64 = 8.0;

/// Errors of `got` against the exact `want`, element by element, in units of `max(|want|, rms(want))`.
fn errors(got: &[f32], want: &[f64], floor: f64) -> Vec<f64> {
    assert_eq!(got.len(), want.len());
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let floor = rms.max(floor).max(f64::MIN_POSITIVE);
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(floor)).collect()
}

/// Asserts the device is within `tol + 4·(the CPU f32 path's worst error on this tensor)` of the exact value at
/// every element; returns (device's worst error, CPU f32's worst error).
fn check(what: &str, dev: &[f32], cpu: &[f32], exact: &[f64], tol: f64) -> (f64, f64) {
    check_floor(what, dev, cpu, exact, tol, 0.0)
}

/// As [`check`], with errors measured against at least `floor` (for tensors whose exact values are structural
/// zeros: their error is that of the terms that cancel).
fn check_floor(what: &str, dev: &[f32], cpu: &[f32], exact: &[f64], tol: f64, floor: f64) -> (f64, f64) {
    let cpu_worst = errors(cpu, exact, floor).into_iter().fold(0.0, f64::max);
    let bound = tol + CPU_FACTOR * cpu_worst;
    let mut worst = 0f64;
    for (i, e) in errors(dev, exact, floor).into_iter().enumerate() {
        assert!(dev[i].is_finite(), "{what}[{i}] = {} on the device (a read of unwritten memory shows as NaN)", dev[i]);
        assert!(
            e <= bound,
            "{what}[{i}]: device {} vs exact {} (error {e:.3e} > {tol:.0e} + {CPU_FACTOR} x the CPU f32 error {cpu_worst:.3e})",
            dev[i],
            exact[i]
        );
        worst = worst.max(e);
    }
    (worst, cpu_worst)
}

/// Worst errors against the exact step, per class of tensor, as (device, CPU f32).
#[derive(Debug, Default)]
#[allow(dead_code)] // printed for the record; every element is asserted in `check`
struct Worst {
    logits: (f64, f64),
    loss: (f64, f64),
    weight_grads: (f64, f64),
    bias_and_bn_grads: (f64, f64),
    running_stats: (f64, f64),
}

fn max2(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    (a.0.max(b.0), a.1.max(b.1))
}

fn compare_stage(frozen: usize, precision: Precision, frozen_bn_eval: bool, s: Setup) -> Worst {
    let tol = match precision {
        Precision::F32 => 1e-5,
        Precision::F16 => 2e-2,
    };
    let mut dev_model = model(frozen, s);
    let mut cpu_model = dev_model.clone();
    let exact = exact_step(&dev_model, frozen_bn_eval, s);
    let (mut cuda, [lt, ll]) = record(&mut dev_model, precision, frozen_bn_eval, s);
    cuda.run(true).unwrap();
    let (logits, l) = cpu_step(&mut cpu_model, frozen_bn_eval, s);
    let tag = format!("stage {frozen} {precision:?}");
    let mut w = Worst {
        logits: check(&format!("{tag} logits"), &cuda.download(&lt).unwrap(), &logits, &exact.logits, tol),
        loss: check(&format!("{tag} loss"), &cuda.download(&ll).unwrap(), &[l], &[exact.loss], tol),
        ..Worst::default()
    };
    let store: &ParamStore<f32> = &cpu_model.params;
    let mut trainable = 0;
    for id in 0..store.len() {
        let p = store.get(id);
        assert_eq!(cuda.has_slot(id), p.trainable, "{}: a slot exactly when trainable", p.name);
        match (cuda.grad(id).unwrap(), store.grad(id), &exact.grads[id]) {
            (None, None, None) => assert!(!p.trainable, "{} is trainable but got no gradient", p.name),
            (Some(d), Some(c), Some(x)) => {
                trainable += 1;
                // A bias's (or BN beta's) gradient sums the output gradient over rows; where the next op's
                // gradient sums to zero over rows (a following training-mode BN) it is a structural zero, and its
                // error is that of the cancelling terms: judged against the sibling weight's gradient scale.
                let sibling = p.name.strip_suffix(".bias").and_then(|stem| store.id(&format!("{stem}.weight")));
                let floor = sibling
                    .and_then(|s| exact.grads[s].as_ref())
                    .map_or(0.0, |g| (g.iter().map(|v| v * v).sum::<f64>() / g.len().max(1) as f64).sqrt());
                let e = check_floor(&format!("{tag} grad {}", p.name), &d, c, x, tol, floor);
                if e.1 > 1e-2 {
                    eprintln!("{tag} grad {}: weak bound, CPU f32 error {:.2e}, device {:.2e}", p.name, e.1, e.0);
                }
                if p.value.shape.len() > 1 {
                    w.weight_grads = max2(w.weight_grads, e);
                } else {
                    w.bias_and_bn_grads = max2(w.bias_and_bn_grads, e);
                }
            }
            (d, c, _) => panic!("{tag} {}: device gradient {} but CPU gradient {}", p.name, d.is_some(), c.is_some()),
        }
    }
    assert_eq!(trainable, store.iter().filter(|p| p.trainable).count());
    let initial = dev_model.batch_norms();
    for (i, bn) in cpu_model.batch_norms().iter().enumerate() {
        let (mean, var) = cuda.bn_stats(i).unwrap();
        let name = &cpu_model.bn_names[i];
        // The running mean moves by momentum x the batch mean, whose error is that of sums of terms of the batch's
        // spread: the floor is momentum x the batch standard deviation, recovered from the variance update.
        let mo = bn.cfg.momentum;
        let batch_var: f64 = exact.stats[i]
            .1
            .iter()
            .zip(&initial[i].state.running_var)
            .map(|(&rv, &rv0)| ((rv - (1.0 - mo) * rv0 as f64) / mo).max(0.0))
            .sum::<f64>()
            / mean.len() as f64;
        let floor = mo * batch_var.sqrt();
        let e1 = check_floor(
            &format!("{tag} {name}.running_mean"),
            &mean,
            &bn.state.running_mean,
            &exact.stats[i].0,
            tol,
            floor,
        );
        let e2 = check(&format!("{tag} {name}.running_var"), &var, &bn.state.running_var, &exact.stats[i].1, tol);
        w.running_stats = max2(w.running_stats, max2(e1, e2));
    }
    eprintln!("{tag}: worst errors against the exact step (device, CPU f32) {w:?}");
    w
}

#[test]
fn f32_step_is_as_accurate_as_the_cpu_reference_in_every_stage() {
    for frozen in 0..=9 {
        compare_stage(frozen, Precision::F32, true, SMALL);
    }
}

#[test]
fn f32_step_with_frozen_blocks_in_train_mode_bn() {
    // PyTorch's train mode: frozen blocks' BN uses batch statistics and updates its running statistics.
    compare_stage(7, Precision::F32, false, SMALL);
}

/// Relative RMS error of `got` against `want`, and the cosine between them.
fn rms_error_and_cosine(got: &[f32], want: &[f64]) -> (f64, f64) {
    let (mut e2, mut w2, mut g2, mut dot) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let g = g as f64;
        e2 += (g - w).powi(2);
        w2 += w * w;
        g2 += g * g;
        dot += g * w;
    }
    ((e2 / w2.max(f64::MIN_POSITIVE)).sqrt(), dot / (g2 * w2).sqrt().max(f64::MIN_POSITIVE))
}

/// The f16 step: every value finite with the arena poisoned (the f16 program reads nothing it did not write),
/// slots exactly for the trainable parameters, and logits, loss and the whole gradient close to the exact step.
/// The bounds are looser than 2e-2 per element because this random-init network amplifies rounding by about
/// 2000x at the logits (the CPU f32 path's own logits error is ~1e-4 = 2000 f32 roundings): f16's rounding, 8192x
/// f32's, shows at the few-percent level in the logits and more in individual gradient elements.
fn f16_stage(frozen: usize) {
    let mut dev_model = model(frozen, SMALL);
    let exact = exact_step(&dev_model, true, SMALL);
    let (mut cuda, [lt, ll]) = record(&mut dev_model, Precision::F16, true, SMALL);
    cuda.run(true).unwrap();
    let logits = cuda.download(&lt).unwrap();
    let loss = cuda.download(&ll).unwrap();
    assert!(logits.iter().chain(&loss).all(|v| v.is_finite()), "stage {frozen}: non-finite logits or loss");
    let (logit_err, _) = rms_error_and_cosine(&logits, &exact.logits);
    let loss_err = ((loss[0] as f64 - exact.loss) / exact.loss).abs();
    let (mut all_dev, mut all_exact) = (Vec::new(), Vec::new());
    for id in 0..dev_model.params.len() {
        let p = dev_model.params.get(id);
        assert_eq!(cuda.has_slot(id), p.trainable, "{}: a slot exactly when trainable", p.name);
        match (cuda.grad(id).unwrap(), &exact.grads[id]) {
            (Some(d), Some(x)) => {
                assert!(d.iter().all(|v| v.is_finite()), "stage {frozen} f16 grad {}: non-finite values", p.name);
                // Each tensor at its own scale, so the model-wide figure is not one layer's.
                let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|e| e * e).sum::<f64>().sqrt();
                let n = norm(&mut x.iter().copied()).max(norm(&mut d.iter().map(|&e| e as f64))).max(f64::MIN_POSITIVE);
                all_dev.extend(d.iter().map(|&v| (v as f64 / n) as f32));
                all_exact.extend(x.iter().map(|v| v / n));
            }
            (None, None) => assert!(!p.trainable),
            (d, x) => {
                panic!("stage {frozen} {}: device gradient {} but exact gradient {}", p.name, d.is_some(), x.is_some())
            }
        }
    }
    let (grad_err, grad_cos) = rms_error_and_cosine(&all_dev, &all_exact);
    eprintln!(
        "stage {frozen} F16: logits rms error {logit_err:.3e}, loss error {loss_err:.3e}, gradients rms error \
         {grad_err:.3e} (cosine {grad_cos:.4})"
    );
    assert!(logit_err < F16_LOGITS, "stage {frozen}: f16 logits rms error {logit_err:.3e}");
    assert!(loss_err < F16_LOGITS, "stage {frozen}: f16 loss error {loss_err:.3e}");
    assert!(grad_cos > F16_GRAD_COSINE, "stage {frozen}: f16 gradients' cosine to the exact ones {grad_cos:.4}");
}

const F16_LOGITS: f64 = 0.3;
const F16_GRAD_COSINE: f64 = 0.6;

#[test]
fn f32_step_at_224_matches_in_the_first_and_last_stage() {
    // Full resolution (the smallest batch a training-mode BN takes): the spatial sizes the model trains at.
    for frozen in [0, 9] {
        compare_stage(frozen, Precision::F32, true, Setup { batch: 2, size: 224 });
    }
}

#[test]
fn f16_step_runs_and_tracks_the_exact_step() {
    for frozen in [0, 5, 9] {
        f16_stage(frozen);
    }
}

#[test]
fn two_recordings_are_identical_and_the_arena_is_planned() {
    for frozen in [0, 6] {
        let mut m = model(frozen, SMALL);
        let (a, _) = record(&mut m.clone(), Precision::F32, true, SMALL);
        let (b, _) = record(&mut m, Precision::F32, true, SMALL);
        assert!(a.program().same_as(b.program()), "stage {frozen}: two recordings differ");
        let plan = a.plan().unwrap();
        eprintln!(
            "stage {frozen}: {} steps, arena {} B, naive {} B",
            a.program().steps().len(),
            plan.arena_bytes,
            plan.naive_bytes
        );
        assert!(plan.arena_bytes < plan.naive_bytes, "arena {} >= naive {}", plan.arena_bytes, plan.naive_bytes);
        assert!(
            plan.arena_bytes * 2 < plan.naive_bytes,
            "the planner reuses little: {} of {}",
            plan.arena_bytes,
            plan.naive_bytes
        );
        // The gradient buffer covers the trainable parameters only.
        let trainable: usize = m.params.iter().filter(|p| p.trainable).map(|p| p.value.data.len()).sum();
        assert!(a.grad_bytes() >= trainable * 4 && a.grad_bytes() < trainable * 4 + m.params.len() * 256);
    }
    let (f16, _) = record(&mut model(0, SMALL), Precision::F16, true, SMALL);
    let (f32_, _) = record(&mut model(0, SMALL), Precision::F32, true, SMALL);
    assert!(!f16.program().same_as(f32_.program()), "f16 and f32 programs move different bytes");
}

#[test]
fn host_masks_and_second_parameter_reads_are_refused() {
    let mut m = model(0, SMALL);
    let mut tape = Tape::on(new_backend(&m, Precision::F32));
    let x = tape.backend_mut().input(&images(1, SMALL)).unwrap();
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = Ctx::train(&mut rng);
    let e = m.forward(&mut tape, x, &mut ctx).expect_err("host masks must be refused").to_string();
    assert!(e.contains("counter masks"), "{e}");

    let mut tape = Tape::on(new_backend(&m, Precision::F32));
    tape.param(&m.params, 0).unwrap();
    let e = tape.param(&m.params, 0).expect_err("a second read must be refused").to_string();
    assert!(e.contains("read twice") && e.contains(&m.params.get(0).name), "{e}");

    // An inference backend has no gradient buffer and no zeroing step, and runs eval forward.
    let bns: Vec<&BnState<f32>> = m.batch_norms().into_iter().map(|b| &b.state).collect();
    let inf = Cuda::inference(Arc::new(Gpu::emulated().unwrap()), &m.params, &bns, Precision::F32).unwrap();
    assert_eq!(inf.grad_bytes(), 0);
    assert!(inf.program().steps().is_empty());
    let mut tape = Tape::inference_on(inf);
    let x = tape.backend_mut().input(&images(1, SMALL)).unwrap();
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let logits = m.forward(&mut tape, x, &mut Ctx::eval(&mut rng)).unwrap();
    let lt = tape.value(logits).clone();
    let mut inf = tape.into_backend();
    inf.keep(&lt);
    inf.run(true).unwrap();
    let mut cpu = Tape::inference();
    let xc = cpu.constant(images(1, SMALL));
    let mut rng = Pcg64::seed_from_u64(0);
    let want = m.clone().forward(&mut cpu, xc, &mut Ctx::eval(&mut rng)).unwrap();
    let (got, want) = (inf.download(&lt).unwrap(), &cpu.value(want).data);
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    for (g, w) in got.iter().zip(want.iter()) {
        assert!((g - w).abs() <= 1e-4 * rms.max(w.abs()), "eval logits {g} vs {w}");
    }

    // A backend built before freezing refuses the now-frozen store.
    let mut tape = Tape::on(new_backend(&m, Precision::F32));
    m.freeze_blocks(1).unwrap();
    let e = tape.param(&m.params, 0).expect_err("stale trainability must be refused").to_string();
    assert!(e.contains("build a new backend"), "{e}");
}

#[test]
fn loss_backward_scales_by_a_constant_seed() {
    use derma::backend::{Backend, Cpu};
    let (n, k) = (3, 5);
    let mut r = Pcg64::seed_from_u64(4);
    let logits = Array::new(&[n, k], (0..n * k).map(|_| r.random_range(-3.0..3.0)).collect()).unwrap();
    let targets = [4, 0, 2];
    let mut cpu = Cpu::<f32>::default();
    let cl = Arc::new(logits.clone());
    let (_, saved) = cpu.loss(&cl, &targets, None, &LossKind::CrossEntropy).unwrap();
    let empty = ParamStore::<f32>::new();
    for seed in [1.0, 2.5, 0.0] {
        let seed_t = cpu.full(&[], seed).unwrap();
        let want = cpu.loss_backward(&saved, &cl, &seed_t).unwrap();
        let gpu = Arc::new(Gpu::emulated().unwrap());
        let mut cuda = Cuda::new(gpu, &empty, &[], Precision::F32).unwrap();
        let x = cuda.input(&logits).unwrap();
        let (_, saved_d) = cuda.loss(&x, &targets, None, &LossKind::CrossEntropy).unwrap();
        let s = cuda.full(&[], seed).unwrap();
        let g = cuda.loss_backward(&saved_d, &x, &s).unwrap();
        cuda.keep(&g);
        cuda.run(true).unwrap();
        let got = cuda.download(&g).unwrap();
        for (i, (&a, &b)) in got.iter().zip(&want.data).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "seed {seed}: dlogits[{i}] {a} vs {b}");
        }
    }
    // A computed (non-constant) output gradient is refused with a clear error.
    let gpu = Arc::new(Gpu::emulated().unwrap());
    let mut cuda = Cuda::new(gpu, &empty, &[], Precision::F32).unwrap();
    let x = cuda.input(&logits).unwrap();
    let (l, saved_d) = cuda.loss(&x, &targets, None, &LossKind::CrossEntropy).unwrap();
    let e = cuda.loss_backward(&saved_d, &x, &l).expect_err("a computed seed must be refused").to_string();
    assert!(e.contains("constant output gradient"), "{e}");
}

/// Eval-mode logits of full-size B0 on the device in `p` against the CPU f32 reference: relative rms error.
fn eval_logits_error(p: Precision) -> f64 {
    let m = model(0, SMALL);
    let bns: Vec<&BnState<f32>> = m.batch_norms().into_iter().map(|b| &b.state).collect();
    let backend = Cuda::inference(Arc::new(Gpu::emulated().unwrap()), &m.params, &bns, p).unwrap();
    let mut tape = Tape::inference_on(backend);
    let x = tape.backend_mut().input(&images(1, SMALL)).unwrap();
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let logits = m.clone().forward(&mut tape, x, &mut Ctx::eval(&mut rng)).unwrap();
    let lt = tape.value(logits).clone();
    let mut backend = tape.into_backend();
    backend.keep(&lt);
    backend.run(true).unwrap();
    let mut cpu = Tape::inference();
    let xc = cpu.constant(images(1, SMALL));
    let mut rng = Pcg64::seed_from_u64(0);
    let want = m.clone().forward(&mut cpu, xc, &mut Ctx::eval(&mut rng)).unwrap();
    let want: Vec<f64> = cpu.value(want).data.iter().map(|&v| v as f64).collect();
    let got = backend.download(&lt).unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "{p:?}: non-finite logits");
    rms_error_and_cosine(&got, &want).0
}

/// The f16 path loses no more than f16 storage must: its eval logits' error, in f16 roundings (2^-11), is at
/// most twice the f32 path's in f32 roundings (2^-24). This network amplifies rounding some hundreds of times
/// (measured: f32 1.4e-5 = 240 roundings; f16 7.2e-2 = 148 roundings), so a per-element 2e-2 is out of reach for
/// f16 here, but a wrong f16 kernel, cast or copy would show as far more than twice the f32 path's amplification.
#[test]
fn f16_eval_forward_amplifies_rounding_no_more_than_f32() {
    let (e32, e16) = (eval_logits_error(Precision::F32), eval_logits_error(Precision::F16));
    let (u32_, u16_) = (2f64.powi(-24), 2f64.powi(-11));
    eprintln!("eval logits rms error: f32 {e32:.3e} ({:.0} roundings), f16 {e16:.3e} ({:.0})", e32 / u32_, e16 / u16_);
    assert!(e32 <= 1e-4, "f32 eval logits error {e32:.3e}");
    assert!(e16 / u16_ <= 2.0 * e32 / u32_, "f16 amplifies its rounding more than f32: {e16:.3e} vs {e32:.3e}");
}
