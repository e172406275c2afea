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
//!
//! The f16 path is judged against the f16 storage reference ([`F16Ref`]: the CPU reference in f64 rounding to f16
//! exactly where the f16 program stores f16), op by op on the device's own inputs (each within one f16 ulp) and
//! as a whole step where this random-init network does not make that comparison chaotic (see the f16 tests).

use derma::autograd::{ParamStore, Tape};
use derma::backend::cuda::{Cuda, Precision};
use derma::backend::cuda::{CudaBnSaved, CudaLossSaved, CudaMask, Tensor as DevT};
use derma::backend::{Backend, BnStats, Cpu, F16Ref, MaskKind, MaskSource, Want, rounded};
use derma::cuda::Gpu;
use derma::nn::efficientnet::Head;
use derma::nn::{BatchNorm, CounterMasks, Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::activation::Act;
use derma::ops::batchnorm::BnState;
use derma::ops::batchnorm::{BnCfg, BnMode};
use derma::ops::conv::ConvGeom;
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
    model_with(frozen, s, HeadKind::Seed)
}

/// As [`model`], with the given head.
fn model_with(frozen: usize, s: Setup, head: HeadKind) -> EfficientNet<f32> {
    let mut m = EfficientNet::<f32>::new(ModelConfig::b0(CLASSES, head), 7);
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
    reference_step(m32, Cpu::<f64>::default(), false, frozen_bn_eval, s)
}

/// The step on a CPU reference backend in f64 (exact, or with the f16 program's storage rounding, which also
/// rounds the input: `round_input`), from the same f32 weights.
fn reference_step<B: Backend<Host = f64, Tensor = Arc<Array<f64>>>>(
    m32: &EfficientNet<f32>,
    backend: B,
    round_input: bool,
    frozen_bn_eval: bool,
    s: Setup,
) -> Exact {
    let mut m = EfficientNet::<f64>::new(m32.config.clone(), 7);
    m.load_state_dict(&m32.state_dict()).unwrap();
    m.freeze_blocks(m32.frozen_blocks).unwrap();
    let mut tape = Tape::<f64, B>::on(backend);
    let img = images(1, s);
    let img = Array::new(&img.shape, img.data.iter().map(|&v| v as f64).collect()).unwrap();
    let x = tape.input(Arc::new(if round_input { rounded(&img) } else { img }));
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

#[test]
fn f32_step_at_224_matches_in_the_first_and_last_stage() {
    // Full resolution (the smallest batch a training-mode BN takes): the spatial sizes the model trains at.
    for frozen in [0, 9] {
        compare_stage(frozen, Precision::F32, true, Setup { batch: 2, size: 224 });
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

/// `‖got − want‖ / max(‖want‖, floor·√n)`: the rms error relative to the tensor's rms (or to `floor` where the
/// tensor is a structural zero).
fn rms_rel(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    let n = want.len().max(1) as f64;
    let (mut e2, mut w2) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite device value");
        e2 += (g as f64 - w).powi(2);
        w2 += w * w;
    }
    (e2 / n).sqrt() / (w2 / n).sqrt().max(floor).max(f64::MIN_POSITIVE)
}

/// Worst per-tensor rms-relative error of the f16 device step against the f16 storage reference, per class of
/// tensor: (logits, loss, gradients, running statistics), with the name of the worst gradient; and the same for
/// the reference against the exact step (how far f16 storage itself moves this step).
#[derive(Debug, Default, Clone)]
struct F16Worst {
    logits: f64,
    loss: f64,
    grads: f64,
    worst_grad: String,
    stats: f64,
}

fn f16_against_reference(frozen: usize, s: Setup, head: HeadKind, frozen_bn_eval: bool) -> (F16Worst, F16Worst) {
    let mut dev_model = model_with(frozen, s, head);
    let initial = dev_model.clone();
    let reference = reference_step(&dev_model, F16Ref::<f64>::default(), true, frozen_bn_eval, s);
    let exact = exact_step(&dev_model, frozen_bn_eval, s);
    let (mut cuda, [lt, ll]) = record(&mut dev_model, Precision::F16, frozen_bn_eval, s);
    cuda.run(true).unwrap();
    let (mut d, mut x) = (F16Worst::default(), F16Worst::default());
    let to32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
    d.logits = rms_rel(&cuda.download(&lt).unwrap(), &reference.logits, 0.0);
    x.logits = rms_rel(&to32(&reference.logits), &exact.logits, 0.0);
    d.loss = rms_rel(&cuda.download(&ll).unwrap(), &[reference.loss], 0.0);
    x.loss = rms_rel(&[reference.loss as f32], &[exact.loss], 0.0);
    let store = &dev_model.params;
    let rms = |g: &[f64]| (g.iter().map(|v| v * v).sum::<f64>() / g.len().max(1) as f64).sqrt();
    for id in 0..store.len() {
        let p = store.get(id);
        assert_eq!(cuda.has_slot(id), p.trainable, "{}: a slot exactly when trainable", p.name);
        let (Some(dg), Some(rg), Some(eg)) = (cuda.grad(id).unwrap(), &reference.grads[id], &exact.grads[id]) else {
            assert!(!p.trainable, "{} is trainable but has no gradient", p.name);
            continue;
        };
        // A bias (or BN beta) whose gradient is a structural zero: judged at its sibling weight's gradient scale.
        let sibling = p.name.strip_suffix(".bias").and_then(|stem| store.id(&format!("{stem}.weight")));
        let floor = sibling.and_then(|s| reference.grads[s].as_ref()).map_or(0.0, |g| rms(g));
        let e = rms_rel(&dg, rg, floor);
        if e > d.grads {
            (d.grads, d.worst_grad) = (e, p.name.clone());
        }
        let e = rms_rel(&to32(rg), eg, floor);
        if e > x.grads {
            (x.grads, x.worst_grad) = (e, p.name.clone());
        }
    }
    let start = initial.batch_norms();
    for (i, bn) in dev_model.batch_norms().iter().enumerate() {
        let (mean, var) = cuda.bn_stats(i).unwrap();
        // The running mean of zero-mean activations is a structural zero: judged at momentum × the batch std.
        let mo = bn.cfg.momentum;
        let batch_var = reference.stats[i]
            .1
            .iter()
            .zip(&start[i].state.running_var)
            .map(|(&rv, &rv0)| ((rv - (1.0 - mo) * rv0 as f64) / mo).max(0.0))
            .sum::<f64>()
            / mean.len() as f64;
        let floor = mo * batch_var.sqrt();
        let (rm, rv) = &reference.stats[i];
        d.stats = d.stats.max(rms_rel(&mean, rm, floor)).max(rms_rel(&var, rv, 0.0));
        x.stats =
            x.stats.max(rms_rel(&to32(rm), &exact.stats[i].0, floor)).max(rms_rel(&to32(rv), &exact.stats[i].1, 0.0));
    }
    eprintln!(
        "stage {frozen} {head:?} {}x{} b{}: device vs f16 reference {d:.3?}; f16 reference vs exact {x:.3?}",
        s.size, s.size, s.batch
    );
    (d, x)
}

/// The f16 step against the f16 storage reference, per tensor (rms error relative to the tensor's rms; floors for
/// structural zeros as in the f32 comparison), on full-size B0 at 64x64, batch 4, with the torchvision head.
///
/// Where it is meaningful. This random-init network is chaotic under f16 storage: the device's f32 sums flip about
/// one f16 rounding in 2,000 against the reference's f64 sums (each op is within one f16 ulp, see
/// `f16_ops_agree_with_the_f16_storage_reference_on_their_own_inputs`), and the network amplifies those flips as
/// it amplifies the rounding itself, so the device lands about as far from the reference as the reference is from
/// the exact step. Measured (device vs reference; reference vs exact), worst tensor: with the seed head, stage 0,
/// gradients 0.69; 0.53, stage 9 logits 0.10; 0.23 (eval-mode frozen BN amplifies the forward, the batch-4
/// BatchNorm1d after a ReLU turns gradients of channels with one active sample into rounding noise); with the
/// torchvision head, stage 0: logits 0.008; 0.016, gradients 0.088; 0.108; stage 5: logits 0.010; 0.021,
/// gradients 0.036; 0.069; stage 9 with frozen blocks' BN in train mode: everything within 0.013; 0.018. So
/// logits, loss and running statistics are held to 2e-2 in every stage, gradients to 2e-2 in stage 9 (head only)
/// and, in stages 0 and 5, to 2e-2 or 1.5x the reference's own distance from the exact step, whichever is larger:
/// a wrong kernel or layout is off by order one.
#[test]
fn f16_step_matches_the_f16_storage_reference() {
    for (frozen, frozen_bn_eval) in [(0, true), (5, true), (9, false)] {
        let (d, x) = f16_against_reference(frozen, SMALL, HeadKind::Torchvision, frozen_bn_eval);
        let tag = format!("stage {frozen} f16 against the f16 storage reference");
        assert!(d.logits <= F16_TOL, "{tag}: logits {:.3e}", d.logits);
        assert!(d.loss <= F16_TOL, "{tag}: loss {:.3e}", d.loss);
        assert!(d.stats <= F16_TOL, "{tag}: running statistics {:.3e}", d.stats);
        let grad_bound = if frozen == 9 { F16_TOL } else { F16_TOL.max(F16_CHAOS * x.grads) };
        assert!(d.grads <= grad_bound, "{tag}: gradient of {} {:.3e} > {grad_bound:.3e}", d.worst_grad, d.grads);
    }
}

const F16_TOL: f64 = 2e-2;
/// How much farther from the f16 reference the device may be than the reference is from the exact step, where
/// the comparison is chaotic (see `f16_step_matches_the_f16_storage_reference`).
const F16_CHAOS: f64 = 1.5;

// Per-op replay: each f16 device op against the f16 storage reference fed the device's own inputs.

/// One recorded call: what the replay needs to recompute it on the CPU.
enum Call {
    Conv { g: ConvGeom, x: DevT, w: DevT, b: Option<DevT>, y: DevT },
    ConvB { g: ConvGeom, x: DevT, w: DevT, dy: DevT, want: [Want; 3], out: [Option<DevT>; 3] },
    Linear { x: DevT, w: DevT, b: Option<DevT>, y: DevT },
    LinearB { x: DevT, w: DevT, dy: DevT, want: [Want; 3], out: [Option<DevT>; 3] },
    Bn { x: DevT, g: DevT, b: DevT, index: usize, mode: BnMode, cfg: BnCfg, act: Option<Act>, y: DevT },
    BnB { fwd: usize, x: DevT, g: DevT, b: DevT, dy: DevT, act: Option<Act>, want: [Want; 3], out: [Option<DevT>; 3] },
    Act { act: Act, x: DevT, y: DevT },
    ActB { act: Act, x: DevT, y: DevT, dy: DevT, dx: DevT },
    Add { a: DevT, b: DevT, y: DevT },
    Accum { a: DevT, b: DevT, y: DevT },
    Scale { x: DevT, s: DevT, y: DevT },
    ScaleB { x: DevT, s: DevT, dy: DevT, want: [Want; 2], out: [Option<DevT>; 2] },
    Pool { x: DevT, y: DevT },
    PoolB { shape: Vec<usize>, dy: DevT, dx: DevT },
    Mask { x: DevT, kind: MaskKind, p: f64, key: u64, y: DevT },
    LossB { logits: DevT, targets: Vec<usize>, weights: Option<Vec<f32>>, kind: LossKind, dy: f64, dx: DevT },
}

/// The CUDA backend, logging every call and keeping every result for the replay.
struct Trace {
    cu: Cuda,
    calls: Vec<Call>,
    /// The backward seed (a loss scale, as GradScaler applies it).
    seed: f64,
}

struct TraceMask {
    m: CudaMask,
    kind: MaskKind,
    p: f64,
    key: u64,
}

struct TraceLoss {
    s: CudaLossSaved,
    targets: Vec<usize>,
    weights: Option<Vec<f32>>,
    kind: LossKind,
}

impl Trace {
    fn keep(&mut self, t: &DevT) -> DevT {
        self.cu.keep(t);
        t.clone()
    }
    fn keep_all<const N: usize>(&mut self, o: &[Option<DevT>; N]) -> [Option<DevT>; N] {
        o.clone().map(|t| t.map(|t| self.keep(&t)))
    }
}

impl Backend for Trace {
    type Host = f32;
    type Tensor = DevT;
    type BnSaved = (CudaBnSaved, usize);
    type Mask = TraceMask;
    type LossSaved = TraceLoss;
    fn shape(t: &DevT) -> &[usize] {
        &t.shape
    }
    fn param(&mut self, store: &ParamStore<f32>, id: usize) -> anyhow::Result<DevT> {
        self.cu.param(store, id)
    }
    fn full(&mut self, shape: &[usize], value: f64) -> anyhow::Result<DevT> {
        self.cu.full(shape, value * self.seed)
    }
    fn accumulate(&mut self, acc: &mut DevT, g: DevT) -> anyhow::Result<()> {
        let a = self.keep(acc);
        let b = self.keep(&g);
        self.cu.accumulate(acc, g)?;
        let y = self.keep(acc);
        self.calls.push(Call::Accum { a, b, y });
        Ok(())
    }
    fn accumulate_param_grad(&mut self, store: &mut ParamStore<f32>, id: usize, g: DevT) -> anyhow::Result<()> {
        self.cu.accumulate_param_grad(store, id, g)
    }
    fn conv2d(&mut self, g: &ConvGeom, x: &DevT, w: &DevT, b: Option<&DevT>) -> anyhow::Result<DevT> {
        let y = self.cu.conv2d(g, x, w, b)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Conv { g: *g, x, w: w.clone(), b: b.cloned(), y: y.clone() });
        Ok(y)
    }
    fn conv2d_backward(
        &mut self,
        g: &ConvGeom,
        x: &DevT,
        w: &DevT,
        dy: &DevT,
        want: [Want; 3],
    ) -> anyhow::Result<[Option<DevT>; 3]> {
        let out = self.cu.conv2d_backward(g, x, w, dy, want)?;
        let (x, dy, o) = (self.keep(x), self.keep(dy), self.keep_all(&out));
        self.calls.push(Call::ConvB { g: *g, x, w: w.clone(), dy, want, out: o });
        Ok(out)
    }
    fn linear(&mut self, x: &DevT, w: &DevT, b: Option<&DevT>) -> anyhow::Result<DevT> {
        let y = self.cu.linear(x, w, b)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Linear { x, w: w.clone(), b: b.cloned(), y: y.clone() });
        Ok(y)
    }
    fn linear_backward(&mut self, x: &DevT, w: &DevT, dy: &DevT, want: [Want; 3]) -> anyhow::Result<[Option<DevT>; 3]> {
        let out = self.cu.linear_backward(x, w, dy, want)?;
        let (x, dy, o) = (self.keep(x), self.keep(dy), self.keep_all(&out));
        self.calls.push(Call::LinearB { x, w: w.clone(), dy, want, out: o });
        Ok(out)
    }
    fn batch_norm(
        &mut self,
        x: &DevT,
        g: &DevT,
        b: &DevT,
        stats: BnStats<'_, f32>,
        mode: BnMode,
        cfg: BnCfg,
        act: Option<Act>,
    ) -> anyhow::Result<(DevT, (CudaBnSaved, usize))> {
        let index = stats.index;
        let (y, s) = self.cu.batch_norm(x, g, b, stats, mode, cfg, act)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Bn { x, g: g.clone(), b: b.clone(), index, mode, cfg, act, y: y.clone() });
        Ok((y, (s, self.calls.len() - 1)))
    }
    fn batch_norm_backward(
        &mut self,
        saved: &(CudaBnSaved, usize),
        x: &DevT,
        g: &DevT,
        b: &DevT,
        dy: &DevT,
        act: Option<Act>,
        want: [Want; 3],
    ) -> anyhow::Result<[Option<DevT>; 3]> {
        let out = self.cu.batch_norm_backward(&saved.0, x, g, b, dy, act, want)?;
        let (x, dy, o) = (self.keep(x), self.keep(dy), self.keep_all(&out));
        self.calls.push(Call::BnB { fwd: saved.1, x, g: g.clone(), b: b.clone(), dy, act, want, out: o });
        Ok(out)
    }
    fn activation(&mut self, act: Act, x: &DevT) -> anyhow::Result<DevT> {
        let y = self.cu.activation(act, x)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Act { act, x, y: y.clone() });
        Ok(y)
    }
    fn activation_backward(&mut self, act: Act, x: &DevT, y: &DevT, dy: &DevT) -> anyhow::Result<DevT> {
        let dx = self.cu.activation_backward(act, x, y, dy)?;
        let (x, y, dy, dx) = (self.keep(x), self.keep(y), self.keep(dy), self.keep(&dx));
        self.calls.push(Call::ActB { act, x, y, dy, dx: dx.clone() });
        Ok(dx)
    }
    fn add(&mut self, a: &DevT, b: &DevT) -> anyhow::Result<DevT> {
        let y = self.cu.add(a, b)?;
        let (a, b, y) = (self.keep(a), self.keep(b), self.keep(&y));
        self.calls.push(Call::Add { a, b, y: y.clone() });
        Ok(y)
    }
    fn channel_scale(&mut self, x: &DevT, s: &DevT) -> anyhow::Result<DevT> {
        let y = self.cu.channel_scale(x, s)?;
        let (x, s, y) = (self.keep(x), self.keep(s), self.keep(&y));
        self.calls.push(Call::Scale { x, s, y: y.clone() });
        Ok(y)
    }
    fn channel_scale_backward(
        &mut self,
        x: &DevT,
        s: &DevT,
        dy: &DevT,
        want: [Want; 2],
    ) -> anyhow::Result<[Option<DevT>; 2]> {
        let out = self.cu.channel_scale_backward(x, s, dy, want)?;
        let (x, s, dy, o) = (self.keep(x), self.keep(s), self.keep(dy), self.keep_all(&out));
        self.calls.push(Call::ScaleB { x, s, dy, want, out: o });
        Ok(out)
    }
    fn global_avg_pool(&mut self, x: &DevT) -> anyhow::Result<DevT> {
        let y = self.cu.global_avg_pool(x)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Pool { x, y: y.clone() });
        Ok(y)
    }
    fn global_avg_pool_backward(&mut self, shape: &[usize], dy: &DevT) -> anyhow::Result<DevT> {
        let dx = self.cu.global_avg_pool_backward(shape, dy)?;
        let (dy, dx) = (self.keep(dy), self.keep(&dx));
        self.calls.push(Call::PoolB { shape: shape.to_vec(), dy, dx: dx.clone() });
        Ok(dx)
    }
    fn draw_mask(
        &mut self,
        kind: MaskKind,
        shape: &[usize],
        p: f64,
        source: MaskSource<'_>,
    ) -> anyhow::Result<TraceMask> {
        let MaskSource::Counter { key, layer } = source else { panic!("the trace takes counter masks") };
        let m = self.cu.draw_mask(kind, shape, p, MaskSource::Counter { key, layer })?;
        Ok(TraceMask { m, kind, p, key })
    }
    fn apply_mask(&mut self, x: &DevT, mask: &TraceMask) -> anyhow::Result<DevT> {
        let y = self.cu.apply_mask(x, &mask.m)?;
        let (x, y) = (self.keep(x), self.keep(&y));
        self.calls.push(Call::Mask { x, kind: mask.kind, p: mask.p, key: mask.key, y: y.clone() });
        Ok(y)
    }
    fn loss(
        &mut self,
        logits: &DevT,
        targets: &[usize],
        weights: Option<&[f32]>,
        kind: &LossKind,
    ) -> anyhow::Result<(DevT, TraceLoss)> {
        let (l, s) = self.cu.loss(logits, targets, weights, kind)?;
        self.keep(logits);
        Ok((l, TraceLoss { s, targets: targets.to_vec(), weights: weights.map(|w| w.to_vec()), kind: kind.clone() }))
    }
    fn loss_backward(&mut self, saved: &TraceLoss, logits: &DevT, dy: &DevT) -> anyhow::Result<DevT> {
        let dx = self.cu.loss_backward(&saved.s, logits, dy)?;
        let dx = self.keep(&dx);
        self.calls.push(Call::LossB {
            logits: logits.clone(),
            targets: saved.targets.clone(),
            weights: saved.weights.clone(),
            kind: saved.kind.clone(),
            dy: dy.constant.unwrap(),
            dx: dx.clone(),
        });
        Ok(dx)
    }
}

/// Per-op errors of the replay, in f16 roundings (2^-11) of `max(|reference element|, rms(reference tensor))`.
#[derive(Default, Debug)]
struct OpErr {
    worst: f64,
    tensors: usize,
    elems: usize,
    differing: usize,
    /// Elements off by more than a tenth of a rounding: what a missing or extra f16 storage point shows as.
    off: usize,
}

fn replay(tr: &Trace, m: &EfficientNet<f32>) -> std::collections::BTreeMap<String, OpErr> {
    use std::collections::{BTreeMap, HashMap};
    let cu = &tr.cu;
    let get = |t: &DevT| -> Arc<Array<f64>> {
        Arc::new(Array::new(&t.shape, cu.download(t).unwrap().into_iter().map(|v| v as f64).collect()).unwrap())
    };
    let mut out: BTreeMap<String, OpErr> = BTreeMap::new();
    let mut note = |what: &str, dev: &[f32], want: &Array<f64>| {
        let n = want.data.len().max(1) as f64;
        let rms = (want.data.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
        let e = out.entry(what.to_string()).or_default();
        e.tensors += 1;
        for (&d, &w) in dev.iter().zip(&want.data) {
            assert!(d.is_finite(), "{what}: non-finite device value");
            // Below f16's smallest normal (2^-14) its spacing is fixed: one rounding there is 2^-25.
            let u = (d as f64 - w).abs() / (w.abs().max(rms).max(2f64.powi(-14)) * 2f64.powi(-11));
            e.worst = e.worst.max(u);
            e.elems += 1;
            e.differing += (d as f64 != w) as usize;
            e.off += (u > 0.1) as usize;
        }
    };
    let slot = |w: Want| match w {
        Want::Param(_) => Want::Value,
        o => o,
    };
    let grads_of = |want: &[Want], outs: &[Option<DevT>]| -> Vec<Option<Vec<f32>>> {
        want.iter()
            .zip(outs)
            .map(|(w, o)| match (w, o) {
                (_, Some(t)) => Some(cu.download(t).unwrap()),
                (Want::Param(id), None) => cu.grad(*id).unwrap(),
                _ => None,
            })
            .collect()
    };
    let mut r = F16Ref::<f64>::default();
    let bns = m.batch_norms();
    let mut saved: HashMap<usize, derma::backend::CpuBnSaved> = HashMap::new();
    for (i, c) in tr.calls.iter().enumerate() {
        match c {
            Call::Conv { g, x, w, b, y } => {
                let kind = if g.is_pointwise() {
                    "conv1x1"
                } else if g.is_depthwise() {
                    "depthwise"
                } else {
                    "stem conv"
                };
                let want = r.conv2d(g, &get(x), &get(w), b.as_ref().map(get).as_ref()).unwrap();
                note(&format!("{kind} y"), &cu.download(y).unwrap(), &want);
            }
            Call::ConvB { g, x, w, dy, want, out: o } => {
                let kind = if g.is_pointwise() {
                    "conv1x1"
                } else if g.is_depthwise() {
                    "depthwise"
                } else {
                    "stem conv"
                };
                let rw = r.conv2d_backward(g, &get(x), &get(w), &get(dy), want.map(slot)).unwrap();
                for (k, (d, w)) in grads_of(want, o).iter().zip(&rw).enumerate() {
                    if let (Some(d), Some(w)) = (d, w) {
                        note(&format!("{kind} backward {}", ["dx", "dw", "db"][k]), d, w);
                    }
                }
            }
            Call::Linear { x, w, b, y } => {
                let kind = if x.shape[1] == 1280 || x.shape[1] == 256 { "head linear" } else { "se linear" };
                let want = r.linear(&get(x), &get(w), b.as_ref().map(get).as_ref()).unwrap();
                note(&format!("{kind} y"), &cu.download(y).unwrap(), &want);
            }
            Call::LinearB { x, w, dy, want, out: o } => {
                let kind = if x.shape[1] == 1280 || x.shape[1] == 256 { "head linear" } else { "se linear" };
                let rw = r.linear_backward(&get(x), &get(w), &get(dy), want.map(slot)).unwrap();
                for (k, (d, w)) in grads_of(want, o).iter().zip(&rw).enumerate() {
                    if let (Some(d), Some(w)) = (d, w) {
                        note(&format!("{kind} backward {}", ["dx", "dw", "db"][k]), d, w);
                    }
                }
            }
            Call::Bn { x, g, b, index, mode, cfg, act, y } => {
                let s0 = &bns[*index].state;
                let mut st = derma::ops::batchnorm::BnState {
                    running_mean: s0.running_mean.iter().map(|&v| v as f64).collect(),
                    running_var: s0.running_var.iter().map(|&v| v as f64).collect(),
                    num_batches_tracked: 0,
                };
                let (want, sv) = r
                    .batch_norm(&get(x), &get(g), &get(b), BnStats { index: *index, state: &mut st }, *mode, *cfg, *act)
                    .unwrap();
                saved.insert(i, sv);
                let m = if matches!(mode, BnMode::Eval) { "eval" } else { "train" };
                note(&format!("bn {m} y"), &cu.download(y).unwrap(), &want);
            }
            Call::BnB { fwd, x, g, b, dy, act, want, out: o } => {
                let m = match &tr.calls[*fwd] {
                    Call::Bn { mode: BnMode::Eval, .. } => "eval",
                    _ => "train",
                };
                let rw = r
                    .batch_norm_backward(&saved[fwd], &get(x), &get(g), &get(b), &get(dy), *act, want.map(slot))
                    .unwrap();
                for (k, (d, w)) in grads_of(want, o).iter().zip(&rw).enumerate() {
                    if let (Some(d), Some(w)) = (d, w) {
                        note(&format!("bn {m} backward {}", ["dx", "dgamma", "dbeta"][k]), d, w);
                    }
                }
            }
            Call::Act { act, x, y } => {
                let want = r.activation(*act, &get(x)).unwrap();
                note(&format!("{act:?} y"), &cu.download(y).unwrap(), &want);
            }
            Call::ActB { act, x, y, dy, dx } => {
                let want = r.activation_backward(*act, &get(x), &get(y), &get(dy)).unwrap();
                note(&format!("{act:?} backward dx"), &cu.download(dx).unwrap(), &want);
            }
            Call::Add { a, b, y } => {
                let want = r.add(&get(a), &get(b)).unwrap();
                note("add y", &cu.download(y).unwrap(), &want);
            }
            Call::Accum { a, b, y } => {
                let mut acc = get(a);
                r.accumulate(&mut acc, get(b)).unwrap();
                note("accumulate", &cu.download(y).unwrap(), &acc);
            }
            Call::Scale { x, s, y } => {
                let want = r.channel_scale(&get(x), &get(s)).unwrap();
                note("se scale y", &cu.download(y).unwrap(), &want);
            }
            Call::ScaleB { x, s, dy, want, out: o } => {
                let rw = r.channel_scale_backward(&get(x), &get(s), &get(dy), *want).unwrap();
                for (k, (d, w)) in grads_of(want, o).iter().zip(&rw).enumerate() {
                    if let (Some(d), Some(w)) = (d, w) {
                        note(&format!("se scale backward {}", ["dx", "ds"][k]), d, w);
                    }
                }
            }
            Call::Pool { x, y } => {
                let want = r.global_avg_pool(&get(x)).unwrap();
                note("pool y", &cu.download(y).unwrap(), &want);
            }
            Call::PoolB { shape, dy, dx } => {
                let want = r.global_avg_pool_backward(shape, &get(dy)).unwrap();
                note("pool backward dx", &cu.download(dx).unwrap(), &want);
            }
            Call::Mask { x, kind, p, key, y } => {
                let xs = get(x);
                let mk = r.draw_mask(*kind, &xs.shape, *p, MaskSource::Counter { key: *key, layer: 0 }).unwrap();
                let want = r.apply_mask(&xs, &mk).unwrap();
                note(&format!("{kind:?} mask y"), &cu.download(y).unwrap(), &want);
            }
            Call::LossB { logits, targets, weights, kind, dy, dx } => {
                let w64: Option<Vec<f64>> = weights.as_ref().map(|w| w.iter().map(|&v| v as f64).collect());
                let l = get(logits);
                let (_, sv) = r.loss(&l, targets, w64.as_deref(), kind).unwrap();
                let seed = r.full(&[], *dy).unwrap();
                let want = r.loss_backward(&sv, &l, &seed).unwrap();
                note("loss backward dlogits", &cu.download(dx).unwrap(), &want);
            }
        }
    }
    out
}

fn trace_step(frozen: usize, s: Setup, seed: f64) -> std::collections::BTreeMap<String, OpErr> {
    let mut m = model(frozen, s);
    let initial = m.clone();
    let mut tape = Tape::on(Trace { cu: new_backend(&m, Precision::F16), calls: Vec::new(), seed });
    let x = tape.backend_mut().cu.input(&images(1, s)).unwrap();
    let x = tape.input(x);
    let mut rng = Pcg64::seed_from_u64(0);
    let mut ctx = train_ctx(&mut rng, true);
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let weights = class_weights();
    let l = loss::loss(&mut tape, logits, &targets(s), Some(&weights), &KIND).unwrap();
    tape.backward(l, &mut m.params).unwrap();
    let mut tr = tape.into_backend();
    tr.cu.run(true).unwrap();
    replay(&tr, &initial)
}

/// Every op of the f16 step (seed head, stages 0, 5 and 9: train- and eval-mode BN, the stem's cuDNN passes, SE,
/// dropout, stochastic depth, the loss, sums of gradients), recomputed by the f16 storage reference from the
/// device's own inputs: each output element within one f16 ulp (2 roundings of `max(|reference|,
/// rms(reference))`), and at most 2 + 0.5% of the elements off by more than a tenth of a rounding. A wrong kernel is off by far more than an ulp; a storage
/// point the device and the reference disagree on (an f16 value where the reference keeps f32, or the reverse)
/// puts most elements of that tensor off by a fraction of a rounding. Measured: worst 2.00 roundings (a flipped
/// rounding at a power of two); off by more than 0.1: 0.09% of train-mode BN's dbeta, at most 0.03% of any class
/// of f16 activations or gradients.
#[test]
fn f16_ops_agree_with_the_f16_storage_reference_on_their_own_inputs() {
    // Stage 0 also under a loss scale of 1024 (GradScaler's seed): every f16 value stays finite, the f32 weight
    // gradients included (measured: the first overflow, an f16 BN input gradient, comes at 4096).
    for (frozen, seed) in [(0, 1.0), (0, 1024.0), (5, 1.0), (9, 1.0)] {
        let ops = trace_step(frozen, SMALL, seed);
        let frozen = format!("{frozen} (loss scale {seed})");
        assert!(ops.len() > 20, "stage {frozen}: only {} op classes traced", ops.len());
        for (k, e) in &ops {
            eprintln!(
                "stage {frozen} {k:28} worst {:5.2} roundings over {} tensors, {} of {} elements off by > 0.1",
                e.worst, e.tensors, e.off, e.elems
            );
            assert!(e.worst <= 2.0 + 1e-9, "stage {frozen} {k}: {:.3} f16 roundings off the reference", e.worst);
            assert!(
                e.off as f64 <= 2.0 + 5e-3 * e.elems as f64,
                "stage {frozen} {k}: {} of {} elements off the reference by more than a tenth of a rounding",
                e.off,
                e.elems
            );
        }
        for must in ["stem conv y", "depthwise y", "conv1x1 y", "se scale y", "loss backward dlogits"] {
            assert!(ops.contains_key(must), "stage {frozen}: no {must} traced");
        }
    }
}
