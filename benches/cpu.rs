//! CPU reference backend: representative EfficientNet-B0 layers (forward and backward) and the whole model's
//! forward (eval) and training step at 224×224.
//!
//! `cargo bench --bench cpu`. Compare with scripts/bench_torch_cpu.py run on the same machine.

use criterion::{Criterion, criterion_group, criterion_main};
use derma::autograd::{ParamStore, Tape};
use derma::nn::efficientnet::MbConv;
use derma::nn::{Ctx, EfficientNet, HeadKind, ModelConfig, Registry};
use derma::ops::batchnorm::BnCfg;
use derma::ops::conv::{self, ConvCfg, ConvGeom};
use derma::ops::loss::{self, LossKind};
use derma::tensor::Array;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;
use std::hint::black_box;

fn random(shape: &[usize], seed: u64) -> Array<f32> {
    let mut r = Pcg64::seed_from_u64(seed);
    let n = shape.iter().product();
    Array::new(shape, (0..n).map(|_| r.random_range(-1.0..1.0)).collect()).unwrap()
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("layers_b8");
    g.sample_size(10);
    // The stem: 3→32, 3×3 stride 2, 224 → 112.
    let x = random(&[8, 224, 224, 3], 1);
    let w = random(&[32, 3, 3, 3], 2);
    let geom = ConvGeom::new(&x.shape, &w.shape, ConvCfg { stride: 2, pad: 1, groups: 1 }).unwrap();
    let mut y = vec![0.0f32; 8 * 112 * 112 * 32];
    g.bench_function("stem_conv_forward", |b| {
        b.iter(|| conv::forward(&geom, &x.data, &w.data, None, black_box(&mut y)))
    });
    // Depthwise 5×5 stride 1 on 28×28×240 (stage 4's shape at 224).
    let x = random(&[8, 28, 28, 240], 3);
    let w = random(&[240, 5, 5, 1], 4);
    let geom = ConvGeom::new(&x.shape, &w.shape, ConvCfg { stride: 1, pad: 2, groups: 240 }).unwrap();
    let mut y = vec![0.0f32; x.numel()];
    g.bench_function("depthwise5x5_forward", |b| {
        b.iter(|| conv::forward(&geom, &x.data, &w.data, None, black_box(&mut y)))
    });
    let mut dw = vec![0.0f32; w.numel()];
    g.bench_function("depthwise5x5_backward_weight", |b| {
        b.iter(|| conv::backward_weight(&geom, &x.data, &y, black_box(&mut dw)))
    });
    // A stage-2 MBConv (24→24, expand 6, 3×3) at 56×56: forward and backward.
    let mut store = ParamStore::new();
    let mut layouts = Vec::new();
    let mut bns = Vec::new();
    let mut init = Pcg64::seed_from_u64(5);
    let mut block = {
        let mut reg = Registry { store: &mut store, layouts: &mut layouts };
        MbConv::<f32>::new(&mut reg, &mut bns, "b", 24, 24, 6, 3, 1, 0.0, BnCfg::default(), &mut init)
    };
    let x = random(&[8, 56, 56, 24], 6);
    g.bench_function("mbconv6_56x56x24_train_step", |b| {
        b.iter(|| {
            let mut rng = Pcg64::seed_from_u64(0);
            let mut tape = Tape::new();
            let xv = tape.leaf(x.clone());
            let mut ctx = Ctx {
                train: true,
                dropout: false,
                stochastic_depth: false,
                frozen_bn_eval: true,
                rng: &mut rng,
                counter_masks: None,
                masks_drawn: 0,
            };
            let y = block.forward(&mut tape, &store, xv, &mut ctx, false).unwrap();
            let seed = Array::full(tape.shape(y), 1.0);
            let mut s2 = store.clone();
            black_box(tape.backward_with(y, seed, &mut s2).unwrap());
        })
    });
    g.finish();
}

fn model(c: &mut Criterion) {
    let mut g = c.benchmark_group("efficientnet_b0_224_b8");
    g.sample_size(10);
    let mut m = EfficientNet::<f32>::new(ModelConfig::b0(1000, HeadKind::Torchvision), 0);
    let x = random(&[8, 224, 224, 3], 7);
    g.bench_function("forward_eval", |b| {
        b.iter(|| {
            let mut rng = Pcg64::seed_from_u64(0);
            let mut tape = Tape::inference();
            let xv = tape.constant(x.clone());
            let mut ctx = Ctx {
                train: false,
                dropout: false,
                stochastic_depth: false,
                frozen_bn_eval: true,
                rng: &mut rng,
                counter_masks: None,
                masks_drawn: 0,
            };
            black_box(m.forward(&mut tape, xv, &mut ctx).unwrap());
        })
    });
    let targets: Vec<usize> = (0..8).map(|i| i * 97 % 1000).collect();
    g.bench_function("train_step_forward_backward", |b| {
        b.iter(|| {
            let mut rng = Pcg64::seed_from_u64(0);
            let mut tape = Tape::new();
            let xv = tape.constant(x.clone());
            let mut ctx = Ctx {
                train: true,
                dropout: true,
                stochastic_depth: true,
                frozen_bn_eval: true,
                rng: &mut rng,
                counter_masks: None,
                masks_drawn: 0,
            };
            let logits = m.forward(&mut tape, xv, &mut ctx).unwrap();
            let l = loss::loss(&mut tape, logits, &targets, None, &LossKind::CrossEntropy).unwrap();
            m.params.zero_grad();
            black_box(tape.backward(l, &mut m.params).unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, layers, model);
criterion_main!(benches);
