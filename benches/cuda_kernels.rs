//! Criterion benches of every hand-written CUDA kernel at EfficientNet-B0 batch-256 shapes, in f32 and f16
//! storage. Throughput is reported in bytes (the napkin count of what each kernel must read and write once), so
//! criterion's B/s column is the achieved memory bandwidth to compare with the device's peak. Each iteration is
//! one launch (or the launches of one op) followed by a stream synchronise.
//!
//! Without a usable CUDA device the bench prints a skip line and exits 0 (the emulated device runs the same
//! kernels, but its timings say nothing about a GPU's, so it is not benched).

use anyhow::Result;
use criterion::{Criterion, Throughput};
use derma::cuda::alloc::Block;
use derma::cuda::kernels::DevSlice;
use derma::cuda::{DeviceRequest, Gpu, probe};
use derma::ops::activation::Unary;
use derma::ops::batchnorm::{BnParams, bn_workspace_bytes};
use derma::ops::depthwise::{DwParams, dw_weight_workspace_bytes};
use derma::ops::loss::LossParams;
use derma::tools::check::{Store, device_for_check};
use derma::train::adamw::AdamWConfig;
use derma::train::adamw::cuda::{AdamCoeffs, AdamHyper, ScalerState, adam_tables};
use derma::train::scaler::GradScalerConfig;
use half::f16;

fn s(b: &Block) -> DevSlice<'_> {
    DevSlice::of(b)
}

/// A bench iteration's launches failed: nothing sensible to measure.
fn ok(r: Result<()>) {
    if let Err(e) = r {
        panic!("CUDA bench launch failed: {e:#}");
    }
}

/// `n` values in roughly [-1.25, 1.25] (no zeros or denormals that could take fast paths).
fn pattern<T: Store>(n: usize) -> Vec<T> {
    (0..n).map(|i| T::from_f64((i % 251) as f64 * 0.01 - 1.245)).collect()
}

fn upload<T: Store>(g: &Gpu, n: usize) -> Block {
    g.upload(&pattern::<T>(n)).unwrap_or_else(|e| panic!("uploading {n} values: {e:#}"))
}

fn zeros(g: &Gpu, bytes: usize) -> Block {
    g.zeros(bytes).unwrap_or_else(|e| panic!("allocating {bytes} bytes: {e:#}"))
}

fn bench_one(c: &mut Criterion, g: &Gpu, group: &str, id: &str, bytes: usize, mut f: impl FnMut() -> Result<()>) {
    let mut grp = c.benchmark_group(group);
    grp.throughput(Throughput::Bytes(bytes as u64));
    grp.bench_function(id, |b| {
        b.iter(|| {
            ok(f());
            ok(g.sync());
        })
    });
    grp.finish();
}

fn elementwise<T: Store>(c: &mut Criterion, g: &Gpu) {
    let dt = T::DTYPE.name();
    let n = 256 * 56 * 56 * 144;
    let es = size_of::<T>();
    let (x, dy, y) = (upload::<T>(g, n), upload::<T>(g, n), zeros(g, n * es));
    let id = format!("{dt}/256x56x56x144");
    bench_one(c, g, "silu_fwd", &id, 2 * n * es, || g.kernels.unary::<T>(&g.stream, Unary::Silu, s(&y), s(&x), n));
    bench_one(c, g, "silu_bwd", &id, 3 * n * es, || {
        g.kernels.unary_backward::<T>(&g.stream, Unary::Silu, s(&y), s(&x), s(&dy), n)
    });
    bench_one(c, g, "add", &id, 3 * n * es, || g.kernels.add::<T>(&g.stream, s(&y), s(&x), s(&dy), n));
    bench_one(c, g, "axpy", &id, 3 * n * es, || g.kernels.scale::<T>(&g.stream, s(&y), s(&x), 0.5, n, true));
    bench_one(c, g, "dropout", &id, 2 * n * es, || g.kernels.dropout::<T>(&g.stream, s(&y), s(&x), 0.2, 7, n));
    bench_one(c, g, "stochastic_depth", &id, 3 * n * es, || {
        g.kernels.stochastic_depth::<T>(&g.stream, s(&y), s(&x), Some(s(&dy)), 0.2, 7, (n, n / 256))
    });
}

fn casts(c: &mut Criterion, g: &Gpu) {
    let n = 256 * 56 * 56 * 144;
    let (x32, x16, y) = (upload::<f32>(g, n), upload::<f16>(g, n), zeros(g, n * 4));
    let id = "256x56x56x144";
    bench_one(c, g, "cast_f32_to_f16", id, 6 * n, || g.kernels.cast(&g.stream, s(&y), s(&x32), n, true));
    bench_one(c, g, "cast_f16_to_f32", id, 6 * n, || g.kernels.cast(&g.stream, s(&y), s(&x16), n, false));
}

fn batchnorm<T: Store>(c: &mut Criterion, g: &Gpu) {
    let dt = T::DTYPE.name();
    let es = size_of::<T>();
    for (hw, ch) in [(112usize, 32usize), (14, 672)] {
        let m = 256 * hw * hw;
        let id = format!("{dt}/256x{hw}x{hw}x{ch}+silu");
        let p = BnParams { m: m as i64, c: ch as i32, act: 1, eps: 1e-3, momentum: 0.01, training: 1, rows_split: 0 };
        let (x, dy, y) = (upload::<T>(g, m * ch), upload::<T>(g, m * ch), zeros(g, m * ch * es));
        let (gam, bet) = (upload::<f32>(g, ch), upload::<f32>(g, ch));
        let (mean, inv, rm, rv) = (zeros(g, ch * 4), zeros(g, ch * 4), zeros(g, ch * 4), upload::<f32>(g, ch));
        let (dg, db, sums) = (zeros(g, ch * 4), zeros(g, ch * 4), zeros(g, 2 * ch * 4));
        let ws = zeros(g, bn_workspace_bytes(m as i64, ch as i32));
        let t = m * ch * es;
        bench_one(c, g, "bn_stats", &id, t, || {
            g.kernels.bn_stats::<T>(&g.stream, &p, s(&x), s(&mean), s(&inv), Some(s(&rm)), Some(s(&rv)), s(&ws))
        });
        bench_one(c, g, "bn_forward", &id, 2 * t, || {
            g.kernels.bn_forward::<T>(&g.stream, &p, s(&y), s(&x), s(&mean), s(&inv), s(&gam), s(&bet))
        });
        // Two passes: the partial sums read x and dy, the dx pass reads them again and writes dx.
        bench_one(c, g, "bn_backward", &id, 5 * t, || {
            g.kernels.bn_backward::<T>(
                &g.stream,
                &p,
                s(&y),
                s(&x),
                s(&dy),
                s(&mean),
                s(&inv),
                s(&gam),
                s(&bet),
                Some(s(&dg)),
                Some(s(&db)),
                s(&ws),
                s(&sums),
            )
        });
    }
}

fn depthwise<T: Store>(c: &mut Criterion, g: &Gpu) {
    let dt = T::DTYPE.name();
    let es = size_of::<T>();
    for (hw, ch, k, st) in [(56i32, 144i32, 3i32, 1i32), (28, 240, 5, 2)] {
        let pad = (k - 1) / 2;
        let ho = (hw + 2 * pad - k) / st + 1;
        let p = DwParams { n: 256, h: hw, w: hw, c: ch, ho, wo: ho, k, stride: st, pad, rows_split: 0 };
        let (nx, ny, nw) = ((256 * hw * hw * ch) as usize, (256 * ho * ho * ch) as usize, (k * k * ch) as usize);
        let id = format!("{dt}/256x{hw}x{hw}x{ch} k{k} s{st}");
        let (x, dy, w) = (upload::<T>(g, nx), upload::<T>(g, ny), upload::<T>(g, nw));
        let (y, dx, dw) = (zeros(g, ny * es), zeros(g, nx * es), zeros(g, nw * 4));
        let ws = zeros(g, dw_weight_workspace_bytes(&p));
        let io = (nx + ny) * es;
        bench_one(c, g, "dw_forward", &id, io, || g.kernels.dw_forward::<T>(&g.stream, &p, s(&y), s(&x), s(&w)));
        bench_one(c, g, "dw_backward_data", &id, io, || {
            g.kernels.dw_backward_data::<T>(&g.stream, &p, s(&dx), s(&dy), s(&w))
        });
        bench_one(c, g, "dw_backward_weight", &id, io, || {
            g.kernels.dw_backward_weight::<T>(&g.stream, &p, s(&dw), s(&x), s(&dy), s(&ws), false)
        });
    }
}

fn se<T: Store>(c: &mut Criterion, g: &Gpu) {
    let dt = T::DTYPE.name();
    let es = size_of::<T>();
    let (n, hw, ch) = (256i32, 14 * 14, 480i32);
    let (nt, nc) = ((n * hw * ch) as usize, (n * ch) as usize);
    let id = format!("{dt}/256x14x14x480");
    let (x, dy, sc) = (upload::<T>(g, nt), upload::<T>(g, nt), upload::<T>(g, nc));
    let (y, dx, pooled, ds) = (zeros(g, nt * es), zeros(g, nt * es), zeros(g, nc * es), zeros(g, nc * es));
    let t = nt * es;
    bench_one(c, g, "se_pool", &id, t, || g.kernels.se_pool::<T>(&g.stream, s(&pooled), s(&x), n, hw, ch));
    bench_one(c, g, "se_pool_backward", &id, t, || {
        g.kernels.se_pool_backward::<T>(&g.stream, s(&dx), s(&pooled), n, hw, ch)
    });
    bench_one(c, g, "se_scale", &id, 2 * t, || g.kernels.se_scale::<T>(&g.stream, s(&y), s(&x), s(&sc), n, hw, ch));
    bench_one(c, g, "se_scale_backward", &id, 3 * t, || {
        g.kernels.se_scale_backward::<T>(&g.stream, Some(s(&dx)), s(&ds), s(&x), s(&sc), s(&dy), (n, hw, ch))
    });
}

fn loss<T: Store>(c: &mut Criterion, g: &Gpu) {
    let dt = T::DTYPE.name();
    let es = size_of::<T>();
    let (b, k) = (256usize, 8usize);
    let logits = upload::<T>(g, b * k);
    let targets: Vec<i32> = (0..b as i32).map(|i| i % k as i32).collect();
    let tg = g.upload(&targets).unwrap_or_else(|e| panic!("{e:#}"));
    let (alpha, lo, dl, probs, bad) =
        (upload::<f32>(g, k), zeros(g, 4), zeros(g, b * k * es), zeros(g, b * k * 4), zeros(g, 4));
    let p = LossParams { b: b as i32, k: k as i32, focal: 1, gamma: 2.0, grad_scale: 1.0, pad_: 0 };
    bench_one(c, g, "softmax_focal_loss", &format!("{dt}/256x8"), b * k * (2 * es + 4) + b * 4, || {
        g.kernels.softmax_loss::<T>(
            &g.stream,
            &p,
            s(&lo),
            s(&dl),
            Some(s(&probs)),
            s(&bad),
            s(&logits),
            s(&tg),
            Some(s(&alpha)),
        )
    });
}

/// The trainer's optimizer launches over one 4.0M-element trainable range (B0 trains 4.0M to 5.3M parameters
/// depending on the stage): amp_unscale in place, and adamw_apply with the f16 copy (its coefficients prepared
/// once by adamw_prepare; the overflow flag clear, so every iteration does the whole step).
fn optim(c: &mut Criterion, g: &Gpu) {
    let n = 4_000_000usize;
    let scfg = GradScalerConfig { init_scale: 1.0, ..GradScalerConfig::default() };
    let (grads, state) = (upload::<f32>(g, n), ok_block(g.upload(&[ScalerState::new(&scfg)])));
    // Scale 1: the gradients keep their values however many iterations run.
    bench_one(c, g, "amp_unscale", "f32/4.0M", 8 * n, || g.kernels.amp_unscale(&g.stream, s(&grads), s(&state), n));
    let (entries, chunks) = adam_tables(&[(0, n, 0)], n).unwrap_or_else(|e| panic!("AdamW tables: {e:#}"));
    let (be, bc) = (ok_block(g.upload(&entries)), ok_block(g.upload(&chunks)));
    let (steps, coeffs) = (zeros(g, 8), zeros(g, size_of::<AdamCoeffs>()));
    let lrs = ok_block(g.upload(&[1e-3f64]));
    let hyper = AdamHyper::from(&AdamWConfig::default());
    ok(g.kernels.adamw_prepare(&g.stream, s(&coeffs), s(&steps), s(&be), s(&lrs), Some(s(&state)), &hyper, 1, 1));
    let (p, m, v, p16) = (upload::<f32>(g, n), zeros(g, n * 4), zeros(g, n * 4), zeros(g, n * 2));
    // Reads p, g, m, v (16 B), writes p, m, v (12 B) and the fp16 copy (2 B).
    bench_one(c, g, "adamw_apply", "f32+f16 copy/4.0M", 30 * n, || {
        let st = Some(s(&state));
        g.kernels.adamw_apply(&g.stream, s(&p), s(&grads), s(&m), s(&v), Some(s(&p16)), s(&coeffs), s(&bc), st, 1, n)
    });
}

fn ok_block(r: Result<Block>) -> Block {
    r.unwrap_or_else(|e| panic!("uploading a bench input: {e:#}"))
}

fn main() {
    let gpu = match device_for_check(&probe(), DeviceRequest::Cuda(0)).and_then(|sel| Gpu::open(&sel)) {
        Ok(g) => g,
        Err(e) => {
            println!("SKIPPED (no CUDA device): cuda_kernels benches: {}", e.to_string().replace('\n', " "));
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    elementwise::<f32>(&mut c, &gpu);
    elementwise::<f16>(&mut c, &gpu);
    casts(&mut c, &gpu);
    batchnorm::<f32>(&mut c, &gpu);
    batchnorm::<f16>(&mut c, &gpu);
    depthwise::<f32>(&mut c, &gpu);
    depthwise::<f16>(&mut c, &gpu);
    se::<f32>(&mut c, &gpu);
    se::<f16>(&mut c, &gpu);
    loss::<f32>(&mut c, &gpu);
    loss::<f16>(&mut c, &gpu);
    optim(&mut c, &gpu);
    c.final_summary();
}
