//! The mixed-precision optimizer step on the device (kernels/optim.cu: amp_unscale → adamw_prepare → adamw_apply →
//! scaler_update) against the CPU `AdamW` + `GradScaler`, step by step, bit for bit.
//!
//! The layout is the trainer's: every parameter of a small model holds a region of one flat f32 buffer (masters,
//! gradients, both moments; an f16 copy with the same element layout), each region starting at a multiple of 64
//! elements with zero padding between; the trainable parameters are a suffix of the parameter order, given to the
//! kernels as one sub-range; step counts and coefficients are held per parameter in parameter order and passed as
//! the same suffix. Six steps over two learning-rate groups, parameters of odd sizes; after step 3 two more
//! parameters are unfrozen (the tables are rebuilt with more regions, the new parameters start at t = 0 with zero
//! moments, the backbone's learning rate changes on the device); step 4, the first after the unfreeze, overflows
//! (an inf and a NaN gradient), so the new parameters' first step is skipped and they start at step 5; the scale
//! starts at 1536 (not a power of two, so unscaling rounds) with a growth interval of 2, so it grows at steps 2
//! and 6 and backs off at step 4, with a clean step counted before it.
//!
//! Bitwise on every device: the kernels spell each f32/f64 operation with the `_rn` intrinsics, so nvcc cannot
//! contract a multiply and an add into an FMA (the PTX of these kernels has no fma.rn.f32), and every operation
//! left (IEEE mul, add, div, sqrt, f16 rounding) is correctly rounded on both sides. The one exception is f64 pow
//! in the bias corrections (CUDA's within 2 ulp, glibc's within 1), rounded to f32 once: a difference would need
//! an f64 ulp to straddle an f32 rounding boundary, and would show first in the coefficient comparison.
//!
//! Runs on the emulated device under two thread schedules, then on the first CUDA GPU when one is usable.

use derma::cuda::alloc::Block;
use derma::cuda::kernels::DevSlice;
use derma::cuda::{DeviceRequest, Gpu, Schedule, mix64, probe};
use derma::tools::check::device_for_check;
use derma::train::adamw::cuda::{ADAM_CHUNK, AdamCoeffs, AdamHyper, ScalerState, adam_tables};
use derma::train::adamw::{AdamW, AdamWConfig};
use derma::train::scaler::{GradScaler, GradScalerConfig};
use half::f16;

const SCHEDULES: [Schedule; 2] = [Schedule::WarpReverse, Schedule::Random];

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Runs `body` on the emulated device once per schedule, then on the first GPU if one is usable (a GPU that is
/// there but does not open is a failure).
fn on_every_device(test: &str, mut body: impl FnMut(&Gpu, &str, u64)) {
    let seed = fresh_seed();
    println!("{test}: seed {seed}");
    let emu = Gpu::emulated().unwrap_or_else(|e| panic!("{test}: the emulated device did not open: {e:#}"));
    for schedule in SCHEDULES {
        emu.set_schedule(schedule, seed).unwrap_or_else(|e| panic!("{test}: {e:#}"));
        body(&emu, &format!("emu (schedule {}), seed {seed}", schedule.name()), seed);
    }
    match device_for_check(&probe(), DeviceRequest::Cuda(0)) {
        Ok(sel) => {
            let gpu = Gpu::open(&sel).unwrap_or_else(|e| panic!("{test}: the probed GPU did not open: {e:#}"));
            let label = format!("cuda:0 ({}), seed {seed}", gpu.info.name);
            body(&gpu, &label, seed);
        }
        Err(e) => println!("{test}: ran on the emulated device only ({})", e.to_string().replace('\n', " ")),
    }
}

/// Uniform in [-1, 1) from a counter (splitmix64's finaliser).
struct Rng(u64);
impl Rng {
    fn sym(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        ((mix64(self.0) >> 40) as f64 / (1u64 << 23) as f64 - 1.0) as f32
    }
}

/// Asserts two slices hold the same bits (NaN = NaN of any payload where `nan_any`), naming the first mismatch.
fn same_bits<T: Copy + PartialEq + std::fmt::Debug>(
    what: &str,
    got: &[T],
    want: &[T],
    bits: impl Fn(T) -> u64,
    is_nan: impl Fn(T) -> bool,
) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad: Vec<usize> =
        (0..got.len()).filter(|&i| bits(got[i]) != bits(want[i]) && !(is_nan(got[i]) && is_nan(want[i]))).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} elements differ; first at {i}: got {:?}, want {:?}",
            bad.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}
fn same_f32(what: &str, got: &[f32], want: &[f32]) {
    same_bits(what, got, want, |x| x.to_bits() as u64, f32::is_nan);
}
fn same_f16(what: &str, got: &[f16], want: &[f16]) {
    same_bits(what, got, want, |x| x.to_bits() as u64, f16::is_nan);
}

/// The small model: parameter sizes (none a multiple of 64) and groups (0 backbone, 1 head).
const SIZES: [usize; 6] = [131, 1000, 7, 2049, 33, 517];
const GROUPS: [usize; 6] = [0, 0, 0, 0, 1, 1];
/// The first trainable parameter before and after the unfreeze (parameter 0 stays frozen).
const FIRST_BEFORE: usize = 3;
const FIRST_AFTER: usize = 1;
const STEPS: usize = 6;
const UNFREEZE_BEFORE_STEP: usize = 4;
const OVERFLOW_STEP: usize = 4;

struct Layout {
    offsets: Vec<usize>,
    total: usize,
}

impl Layout {
    fn new() -> Self {
        let mut offsets = Vec::new();
        let mut off = 0;
        for &n in &SIZES {
            offsets.push(off);
            off = (off + n).next_multiple_of(ADAM_CHUNK);
        }
        Layout { offsets, total: off }
    }

    /// Regions of the trainable suffix from parameter `first`, offsets from its start, and its length.
    fn tables(&self, first: usize) -> (Vec<(usize, usize, usize)>, usize) {
        let start = self.offsets[first];
        let regions = (first..SIZES.len()).map(|k| (self.offsets[k] - start, SIZES[k], GROUPS[k])).collect();
        (regions, self.total - start)
    }
}

/// Everything the device holds, as one snapshot.
#[derive(Clone)]
struct Snapshot {
    p: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    half: Vec<f16>,
    steps: Vec<i64>,
    coeffs: Vec<AdamCoeffs>,
}

struct Device<'g> {
    g: &'g Gpu,
    p: Block,
    grad: Block,
    m: Block,
    v: Block,
    half: Block,
    steps: Block,
    coeffs: Block,
    state: Block,
    lrs: Block,
}

impl Device<'_> {
    fn snapshot(&self, total: usize) -> Snapshot {
        let g = self.g;
        Snapshot {
            p: g.download(&self.p, total).unwrap(),
            m: g.download(&self.m, total).unwrap(),
            v: g.download(&self.v, total).unwrap(),
            half: g.download(&self.half, total).unwrap(),
            steps: g.download(&self.steps, SIZES.len()).unwrap(),
            coeffs: g.download(&self.coeffs, SIZES.len()).unwrap(),
        }
    }

    fn state(&self) -> ScalerState {
        self.g.download::<ScalerState>(&self.state, 1).unwrap()[0]
    }
}

/// The trainable range (from element `start`, `n` elements) of a flat f32 buffer.
fn range(b: &Block, start: usize, n: usize) -> DevSlice<'_> {
    suffix::<f32>(b, start, n)
}

/// A suffix of a block from element `first` of `T` on.
fn suffix<T>(b: &Block, first: usize, count: usize) -> DevSlice<'_> {
    DevSlice::range(b, first * size_of::<T>(), count * size_of::<T>()).unwrap()
}

#[test]
fn cuda_optim_step_matches_cpu_adamw_and_grad_scaler() {
    on_every_device("cuda_optim_step_matches_cpu_adamw_and_grad_scaler", |g, device, seed| {
        let mut rng = Rng(seed);
        let lay = Layout::new();
        let total = lay.total;
        let names: Vec<String> = (0..SIZES.len()).map(|k| format!("p{k}")).collect();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
        let hyper = AdamHyper::from(&cfg);
        let scfg = GradScalerConfig { init_scale: 1536.0, growth_interval: 2, ..GradScalerConfig::default() };
        let mut cpu = AdamW::new(cfg).unwrap();
        let mut scaler = GradScaler::new(scfg).unwrap();

        // CPU parameters, and the device's flat buffers (zero padding everywhere; the f16 copy of the start).
        let mut params: Vec<Vec<f32>> = SIZES.iter().map(|&n| (0..n).map(|_| rng.sym()).collect()).collect();
        let flat = |per: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> {
            let mut out = vec![0f32; total];
            for k in 0..SIZES.len() {
                out[lay.offsets[k]..lay.offsets[k] + SIZES[k]].copy_from_slice(&per(k));
            }
            out
        };
        let p0 = flat(&|k| params[k].clone());
        let zeros = vec![0f32; total];
        let d = Device {
            g,
            p: g.upload(&p0).unwrap(),
            grad: g.upload(&zeros).unwrap(),
            m: g.upload(&zeros).unwrap(),
            v: g.upload(&zeros).unwrap(),
            half: g.upload(&p0.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).unwrap(),
            steps: g.upload(&[0i64; SIZES.len()]).unwrap(),
            coeffs: g.upload(&[AdamCoeffs::default(); SIZES.len()]).unwrap(),
            state: g.upload(&[ScalerState::new(&scfg)]).unwrap(),
            lrs: g.upload(&[0f64; 2]).unwrap(),
        };
        let base_lr = 1e-3;
        let mut want_coeffs = vec![AdamCoeffs::default(); SIZES.len()];
        let mut skipped = 0;
        let mut trace = Vec::new();

        for step in 1..=STEPS {
            let first = if step < UNFREEZE_BEFORE_STEP { FIRST_BEFORE } else { FIRST_AFTER };
            // The backbone group's multiplier drops at the unfreeze, as the gradual-unfreezing schedule does.
            let lrs = [base_lr * if first == FIRST_BEFORE { 1.0 } else { 0.5 }, base_lr];
            g.write(&d.lrs, 0, &lrs).unwrap();
            let (regions, n) = lay.tables(first);
            let (entries, chunks) = adam_tables(&regions, n).unwrap();
            let (be, bc) = (g.upload(&entries).unwrap(), g.upload(&chunks).unwrap());
            let params_now = entries.len();

            // Gradients as the backward pass leaves them: g * scale, for the trainable parameters only.
            let scale = scaler.scale();
            let mut grads: Vec<Vec<f32>> = SIZES
                .iter()
                .map(|&n| (0..n).map(|_| (rng.sym() as f64 * 3.0 * scale as f64) as f32).collect())
                .collect();
            if step == OVERFLOW_STEP {
                grads[5][SIZES[5] / 3] = f32::INFINITY;
                grads[1][7] = f32::NAN;
            }
            for gk in grads.iter_mut().take(first) {
                gk.iter_mut().for_each(|x| *x = 0.0);
            }
            g.write(&d.grad, 0, &flat(&|k| grads[k].clone())).unwrap();
            let before = d.snapshot(total);

            // CPU: unscale every trainable gradient, then step them unless something overflowed.
            let found = {
                let mut slices: Vec<&mut [f32]> = grads[first..].iter_mut().map(|v| &mut v[..]).collect();
                scaler.unscale_and_check(&mut slices)
            };
            if !found {
                for k in first..SIZES.len() {
                    let lr = lrs[GROUPS[k]];
                    cpu.step_one(&names[k], &mut params[k], &grads[k], lr).unwrap();
                    want_coeffs[k] = AdamCoeffs::for_step(cpu.state(&names[k]).unwrap().step, lr, &hyper);
                }
            }
            scaler.update(found);
            skipped += found as i32;

            // Device: the same step over the trainable suffix.
            let start = lay.offsets[first];
            let st = Some(DevSlice::of(&d.state));
            let (coeffs, steps) =
                (suffix::<AdamCoeffs>(&d.coeffs, first, params_now), suffix::<i64>(&d.steps, first, params_now));
            g.kernels.amp_unscale(&g.stream, range(&d.grad, start, n), DevSlice::of(&d.state), n).unwrap();
            let (be, bc, lr) = (DevSlice::of(&be), DevSlice::of(&bc), DevSlice::of(&d.lrs));
            g.kernels.adamw_prepare(&g.stream, coeffs, steps, be, lr, st, &hyper, 2, params_now).unwrap();
            let half = Some(suffix::<f16>(&d.half, start, n));
            g.kernels
                .adamw_apply(
                    &g.stream,
                    range(&d.p, start, n),
                    range(&d.grad, start, n),
                    range(&d.m, start, n),
                    range(&d.v, start, n),
                    half,
                    coeffs,
                    bc,
                    st,
                    params_now,
                    n,
                )
                .unwrap();
            assert_eq!(d.state().found_inf, found as i32, "{device}, step {step}: found_inf before the update");
            g.kernels.scaler_update(&g.stream, DevSlice::of(&d.state), &scfg).unwrap();

            // Compare everything, every element, bitwise.
            let at = |what: &str| format!("{device}, step {step}: {what}");
            let got_g: Vec<f32> = g.download(&d.grad, total).unwrap();
            same_f32(&at("unscaled gradients"), &got_g[start..], &flat(&|k| grads[k].clone())[start..]);
            let now = d.snapshot(total);
            let want_p = flat(&|k| params[k].clone());
            let moment = |which: u8| {
                flat(&|k| match cpu.state(&names[k]) {
                    Some(s) => {
                        if which == 0 {
                            s.exp_avg.clone()
                        } else {
                            s.exp_avg_sq.clone()
                        }
                    }
                    None => vec![0.0; SIZES[k]],
                })
            };
            same_f32(&at("master weights"), &now.p, &want_p);
            same_f32(&at("exp_avg"), &now.m, &moment(0));
            same_f32(&at("exp_avg_sq"), &now.v, &moment(1));
            same_f16(&at("f16 weights"), &now.half, &want_p.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>());
            let want_steps: Vec<i64> = names.iter().map(|nm| cpu.state(nm).map_or(0, |s| s.step as i64)).collect();
            assert_eq!(now.steps, want_steps, "{}", at("step counts"));
            let cbits = |c: &[AdamCoeffs]| bytemuck::cast_slice::<AdamCoeffs, u32>(c).to_vec();
            assert_eq!(cbits(&now.coeffs), cbits(&want_coeffs), "{}", at("coefficients"));
            let s = d.state();
            let want_state = ScalerState {
                scale: scaler.scale(),
                growth_tracker: scaler.growth_tracker() as i32,
                found_inf: 0,
                skipped,
            };
            assert_eq!((s.scale.to_bits(), s), (want_state.scale.to_bits(), want_state), "{}", at("scaler state"));
            if found {
                // A skipped step: every bit as it was (weights, moments, f16 copy, step counts, coefficients).
                same_f32(&at("skipped: weights"), &now.p, &before.p);
                same_f32(&at("skipped: exp_avg"), &now.m, &before.m);
                same_f32(&at("skipped: exp_avg_sq"), &now.v, &before.v);
                same_f16(&at("skipped: f16 copy"), &now.half, &before.half);
                assert_eq!(now.steps, before.steps, "{}", at("skipped: step counts"));
                assert_eq!(cbits(&now.coeffs), cbits(&before.coeffs), "{}", at("skipped: coefficients"));
            } else {
                assert_ne!(now.p, before.p, "{}", at("a clean step moved no weight"));
            }
            trace.push((s.scale, s.growth_tracker, s.skipped));
        }
        // The scenario did what it is for: two growths and one backoff (with the tracker at 1, so its reset shows);
        // the unfrozen parameters counted from their own first step; parameter 0 never stepped.
        assert_eq!(
            trace,
            vec![(1536.0, 1, 0), (3072.0, 0, 0), (3072.0, 1, 0), (1536.0, 0, 1), (1536.0, 1, 1), (3072.0, 0, 1)],
            "{device}: scaler trace"
        );
        let steps: Vec<u64> = names.iter().map(|nm| cpu.state(nm).map_or(0, |s| s.step)).collect();
        assert_eq!(steps, vec![0, 2, 2, 5, 5, 5], "{device}: CPU step counts");
    });
}

#[test]
fn cuda_optim_step_without_scaler_never_skips() {
    // state None (f32 training, no GradScaler): prepare and apply run whatever a flag would say.
    on_every_device("cuda_optim_step_without_scaler_never_skips", |g, device, seed| {
        let mut rng = Rng(seed ^ 0x5eed);
        let sizes = [70usize, 3];
        let regions = [(0usize, sizes[0], 0usize), (128, sizes[1], 0)];
        let n = 131;
        let (entries, chunks) = adam_tables(&regions, n).unwrap();
        let cfg = AdamWConfig::default();
        let hyper = AdamHyper::from(&cfg);
        let mut cpu = AdamW::new(cfg).unwrap();
        let mut p: Vec<f32> = (0..n).map(|i| if !(70..128).contains(&i) { rng.sym() } else { 0.0 }).collect();
        let (bp, bm, bv) = (g.upload(&p).unwrap(), g.zeros(n * 4).unwrap(), g.zeros(n * 4).unwrap());
        let (be, bc, lr) = (g.upload(&entries).unwrap(), g.upload(&chunks).unwrap(), g.upload(&[3e-3f64]).unwrap());
        let (steps, coeffs) = (g.zeros(16).unwrap(), g.zeros(64).unwrap());
        for step in 1..=3 {
            let grad: Vec<f32> = (0..n).map(|i| if !(70..128).contains(&i) { rng.sym() } else { 0.0 }).collect();
            let bg = g.upload(&grad).unwrap();
            for (k, &(o, len, _)) in regions.iter().enumerate() {
                cpu.step_one(&format!("w{k}"), &mut p[o..o + len], &grad[o..o + len], 3e-3).unwrap();
            }
            let (c, s) = (DevSlice::of(&coeffs), DevSlice::of(&steps));
            g.kernels.adamw_prepare(&g.stream, c, s, DevSlice::of(&be), DevSlice::of(&lr), None, &hyper, 1, 2).unwrap();
            let (pp, gg, mm, vv) = (DevSlice::of(&bp), DevSlice::of(&bg), DevSlice::of(&bm), DevSlice::of(&bv));
            g.kernels.adamw_apply(&g.stream, pp, gg, mm, vv, None, c, DevSlice::of(&bc), None, 2, n).unwrap();
            same_f32(&format!("{device}, step {step}: weights"), &g.download::<f32>(&bp, n).unwrap(), &p);
            assert_eq!(g.download::<i64>(&steps, 2).unwrap(), vec![step; 2], "{device}: step counts");
        }
    });
}

#[test]
fn cuda_optim_step_refuses_bad_buffers() {
    on_every_device("cuda_optim_step_refuses_bad_buffers", |g, device, _| {
        let (entries, chunks) = adam_tables(&[(0, 100, 0)], 100).unwrap();
        let buf = g.upload(&vec![1f32; 100]).unwrap();
        let other = g.upload(&vec![1f32; 100]).unwrap();
        let (be, bc, lr) = (g.upload(&entries).unwrap(), g.upload(&chunks).unwrap(), g.upload(&[1e-3f64]).unwrap());
        let (steps, coeffs, state) = (g.zeros(8).unwrap(), g.zeros(32).unwrap(), g.zeros(16).unwrap());
        let (a, o, c) = (DevSlice::of(&buf), DevSlice::of(&other), DevSlice::of(&coeffs));
        let hyper = AdamHyper::from(&AdamWConfig::default());
        let e = g.kernels.adamw_apply(&g.stream, a, o, a, o, None, c, DevSlice::of(&bc), None, 1, 100);
        let e = e.expect_err("m aliasing the weights").to_string();
        assert!(e.contains("__restrict__") && e.contains("overlaps"), "{device}: {e}");
        let e = g.kernels.adamw_apply(&g.stream, a, o, a, o, None, c, DevSlice::of(&bc), None, 1, 101);
        assert!(e.expect_err("101 elements in 100").to_string().contains("bytes"), "{device}");
        let e = g.kernels.adamw_prepare(
            &g.stream,
            c,
            DevSlice::of(&steps),
            DevSlice::of(&be),
            DevSlice::of(&lr),
            None,
            &hyper,
            2,
            1,
        );
        assert!(e.expect_err("two groups in one lr").to_string().contains("learning rates"), "{device}");
        let e = g.kernels.amp_unscale(&g.stream, a, DevSlice::range(&buf, 0, 16).unwrap(), 100);
        assert!(e.expect_err("state inside the gradients").to_string().contains("overlaps"), "{device}");
        let bad = GradScalerConfig { growth_interval: 0, ..GradScalerConfig::default() };
        assert!(g.kernels.scaler_update(&g.stream, DevSlice::of(&state), &bad).is_err(), "{device}");
        // Nothing ran.
        assert_eq!(g.download::<f32>(&buf, 100).unwrap(), vec![1f32; 100], "{device}");
        assert_eq!(g.download::<ScalerState>(&state, 1).unwrap()[0], ScalerState::default(), "{device}");
    });
}

#[test]
fn cuda_amp_unscale_flags_any_position() {
    // One non-finite value at each lane of the first 16-byte vector, in the scalar tail and past a grid-stride
    // wrap, on an aligned range (vector path) and one f32 off (scalar path): the flag is set and every element,
    // the ones after the bad one in the same thread included, is unscaled.
    on_every_device("cuda_amp_unscale_flags_any_position", |g, device, seed| {
        let mut rng = Rng(seed ^ 0xa11);
        let n = g.kernels.grid_stride_threads() * 4 * 2 + 3;
        let scfg = GradScalerConfig { init_scale: 1000.0, ..GradScalerConfig::default() };
        let scaler = GradScaler::new(scfg).unwrap();
        let base: Vec<f32> = (0..n).map(|_| rng.sym() * 5000.0).collect();
        let stride = g.kernels.grid_stride_threads() * 4;
        let bad = [f32::INFINITY, f32::NAN, f32::NEG_INFINITY];
        for lead in [0usize, 1] {
            for (j, pos) in [0, 1, 2, 3, 5, n / 2, n - 3, n - 2, n - 1, stride - 1, stride + 2].into_iter().enumerate()
            {
                let mut grads = base.clone();
                grads[pos] = bad[j % bad.len()];
                let mut host = vec![0f32; lead];
                host.extend_from_slice(&grads);
                let b = g.upload(&host).unwrap();
                let state = g.upload(&[ScalerState::new(&scfg)]).unwrap();
                g.kernels.amp_unscale(&g.stream, suffix::<f32>(&b, lead, n), DevSlice::of(&state), n).unwrap();
                let found = scaler.unscale_and_check(&mut [&mut grads[..]]);
                assert!(found);
                let what = format!("{device}: lead {lead}, {} at {pos}", bad[j % bad.len()]);
                assert_eq!(g.download::<ScalerState>(&state, 1).unwrap()[0].found_inf, 1, "{what}: flag");
                same_f32(&what, &g.download::<f32>(&b, lead + n).unwrap()[lead..], &grads);
            }
        }
        // And a clean range leaves the flag clear.
        let b = g.upload(&base).unwrap();
        let state = g.upload(&[ScalerState::new(&scfg)]).unwrap();
        g.kernels.amp_unscale(&g.stream, DevSlice::of(&b), DevSlice::of(&state), n).unwrap();
        assert_eq!(g.download::<ScalerState>(&state, 1).unwrap()[0].found_inf, 0, "{device}: clean range");
    });
}
