//! Data-layer throughput: the CPU augmentation applier and eval normalization at 224 px (one image per
//! iteration, one thread).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use derma::data::augment::{AugConfig, AugParams, apply, draw, normalize_eval};
use std::hint::black_box;

fn bench_augment(c: &mut Criterion) {
    let s = 224u32;
    let src: Vec<u8> = (0..(s * s * 3) as usize).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = vec![0f32; src.len()];
    let cfg = AugConfig::default();
    let mut g = c.benchmark_group("augment");
    g.throughput(Throughput::Elements(1));
    let mut pos = 0u64;
    g.bench_function("draw+apply 224->224", |b| {
        b.iter(|| {
            pos += 1;
            let p = draw(&cfg, 1, 0, pos, s, s);
            apply(black_box(&src), s, s, &p, &mut out).unwrap();
        })
    });
    let mut quiet = draw(&cfg, 1, 0, 0, s, s);
    quiet.noise_std = 0.0;
    g.bench_function("apply 224->224 without noise", |b| {
        b.iter(|| apply(black_box(&src), s, s, &quiet, &mut out).unwrap())
    });
    let id = AugParams::identity(s);
    g.bench_function("apply 224->224 identity", |b| b.iter(|| apply(black_box(&src), s, s, &id, &mut out).unwrap()));
    g.bench_function("normalize_eval 224", |b| b.iter(|| normalize_eval(black_box(&src), &mut out).unwrap()));
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: they need system fonts, which build machines often lack.
    config = Criterion::default().without_plots();
    targets = bench_augment
}
criterion_main!(benches);
