//! The EfficientNet model: torchvision's sizes and names, freezing, state dicts, batch-norm statistics.

use derma::autograd::Tape;
use derma::nn::efficientnet::{FEATURE_BLOCKS, make_divisible};
use derma::nn::summary::summarize;
use derma::nn::{Ctx, EfficientNet, HeadKind, ModelConfig};
use derma::ops::loss::{self, LossKind};
use derma::tensor::Array;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;

fn images(n: usize, size: usize, seed: u64) -> Array<f32> {
    let mut r = Pcg64::seed_from_u64(seed);
    Array::new(&[n, size, size, 3], (0..n * size * size * 3).map(|_| r.random_range(-2.0..2.0)).collect()).unwrap()
}

#[test]
fn b0_matches_torchvision_counts() {
    let m = EfficientNet::<f32>::new(ModelConfig::b0(1000, HeadKind::Torchvision), 0);
    assert_eq!(m.params.counts().0, 5_288_548);
    let sd = m.state_dict();
    assert_eq!(sd.len(), 360);
    assert_eq!(m.params.len(), 213);
    assert_eq!(m.block_params.len(), FEATURE_BLOCKS);
    let names: Vec<&str> = sd.names().collect();
    for k in [
        "features.0.0.weight",
        "features.0.1.num_batches_tracked",
        "features.1.0.block.0.0.weight",
        "features.1.0.block.1.fc1.weight",
        "features.1.0.block.2.1.running_var",
        "features.2.0.block.3.0.weight",
        "features.6.3.block.2.fc2.bias",
        "features.8.0.weight",
        "classifier.1.weight",
    ] {
        assert!(names.contains(&k), "missing {k}");
    }
    let shape = |k: &str| sd.get(k).unwrap().shape.clone();
    assert_eq!(shape("features.8.0.weight"), vec![1280, 320, 1, 1]);
    assert_eq!(shape("features.2.0.block.1.0.weight"), vec![96, 1, 3, 3]);
    // SE squeezes from the block's input width: 16 / 4 = 4 in features.2.0.
    assert_eq!(shape("features.2.0.block.2.fc1.weight"), vec![4, 96, 1, 1]);
    assert_eq!(shape("features.0.1.num_batches_tracked"), Vec::<usize>::new());
    let s = summarize(&m, 224);
    // torchvision lists 0.39 GFLOPs (mult-adds) for B0 at 224.
    assert!((0.38e9..0.40e9).contains(&(s.total_macs as f64)), "{}", s.total_macs);
}

#[test]
fn seed_head_and_multipliers() {
    let m = EfficientNet::<f32>::new(ModelConfig::b0(8, HeadKind::Seed), 0);
    // Backbone 4,007,548 + 1280·256 + 256 + 2·256 (BN) + 256·8 + 8.
    assert_eq!(m.params.counts().0, 4_007_548 + 1280 * 256 + 256 + 512 + 256 * 8 + 8);
    assert_eq!(make_divisible(32.0 * 1.1, 8), 32);
    assert_eq!(make_divisible(40.0 * 1.4, 8), 56);
    assert_eq!(make_divisible(320.0 * 0.1, 8), 32);
    let b4 = EfficientNet::<f32>::new(ModelConfig::variant(derma::nn::Variant::B4, 1000, HeadKind::Torchvision), 0);
    // torchvision's efficientnet_b4 has 19,341,616 parameters.
    assert_eq!(b4.params.counts().0, 19_341_616);
}

#[test]
fn frozen_backbone_is_never_entered() {
    let mut m = EfficientNet::<f32>::new(ModelConfig::b0(5, HeadKind::Seed), 1);
    m.freeze_blocks(FEATURE_BLOCKS).unwrap();
    let mut rng = Pcg64::seed_from_u64(2);
    let mut tape = Tape::new();
    let x = tape.constant(images(2, 32, 3));
    let mut ctx = Ctx {
        train: true,
        dropout: true,
        stochastic_depth: true,
        frozen_bn_eval: true,
        rng: &mut rng,
        counter_masks: None,
        masks_drawn: 0,
    };
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let l = loss::loss(&mut tape, logits, &[1, 4], None, &LossKind::Focal { gamma: 2.0 }).unwrap();
    // Only the head is on the tape, from its first linear on (the dropout before it has nothing to differentiate).
    assert_eq!(tape.node_names(), vec!["linear", "relu", "batch_norm", "dropout", "linear", "loss"]);
    tape.backward(l, &mut m.params).unwrap();
    for (i, ids) in m.block_params.iter().enumerate() {
        for &id in ids {
            assert!(m.params.grad(id).is_none(), "block {i} param {} got a gradient", m.params.get(id).name);
        }
    }
    assert!(
        (0..m.params.len())
            .filter(|&id| m.params.get(id).name.starts_with("classifier"))
            .all(|id| m.params.grad(id).is_some())
    );
    // Frozen blocks keep their running statistics by default; the head's BN updates.
    assert_eq!(m.stem.bn.state.num_batches_tracked, 0);
    assert_eq!(m.batch_norms().last().unwrap().state.num_batches_tracked, 1);
}

#[test]
fn partial_freeze_stops_backward_at_the_first_trainable_block() {
    let mut m = EfficientNet::<f32>::new(ModelConfig::b0(3, HeadKind::Torchvision), 1);
    m.freeze_blocks(7).unwrap();
    let mut rng = Pcg64::seed_from_u64(2);
    let mut tape = Tape::new();
    let x = tape.constant(images(2, 32, 4));
    let mut ctx = Ctx {
        train: true,
        dropout: false,
        stochastic_depth: false,
        frozen_bn_eval: false,
        rng: &mut rng,
        counter_masks: None,
        masks_drawn: 0,
    };
    let logits = m.forward(&mut tape, x, &mut ctx).unwrap();
    let l = loss::loss(&mut tape, logits, &[0, 2], None, &LossKind::CrossEntropy).unwrap();
    // Block 7 (one MBConv6: expand, dw, SE, project) + block 8 + pool + head + loss. The first recorded node is
    // block 7's expand conv.
    assert_eq!(tape.node_names()[0], "conv2d");
    tape.backward(l, &mut m.params).unwrap();
    for (i, ids) in m.block_params.iter().enumerate() {
        for &id in ids {
            assert_eq!(m.params.grad(id).is_some(), i >= 7, "{}", m.params.get(id).name);
        }
    }
    // With frozen_bn_eval off, frozen blocks' BN updates as in PyTorch's train mode.
    assert_eq!(m.stem.bn.state.num_batches_tracked, 1);
}

#[test]
fn state_dict_roundtrip_reproduces_outputs() {
    let mut a = EfficientNet::<f32>::new(ModelConfig::b0(4, HeadKind::Seed), 11);
    // Make running statistics non-trivial first.
    let mut rng = Pcg64::seed_from_u64(0);
    {
        let mut t = Tape::inference();
        let x = t.constant(images(3, 32, 5));
        let mut ctx = Ctx {
            train: true,
            dropout: false,
            stochastic_depth: false,
            frozen_bn_eval: false,
            rng: &mut rng,
            counter_masks: None,
            masks_drawn: 0,
        };
        a.forward(&mut t, x, &mut ctx).unwrap();
    }
    let sd = a.state_dict();
    let mut b = EfficientNet::<f32>::from_state_dict(&sd).unwrap();
    assert_eq!(b.config.head, HeadKind::Seed);
    assert_eq!(b.config.num_classes, 4);
    let run = |m: &mut EfficientNet<f32>| {
        let mut rng = Pcg64::seed_from_u64(0);
        let mut t = Tape::inference();
        let x = t.constant(images(2, 32, 6));
        let mut ctx = Ctx {
            train: false,
            dropout: false,
            stochastic_depth: false,
            frozen_bn_eval: true,
            rng: &mut rng,
            counter_masks: None,
            masks_drawn: 0,
        };
        let y = m.forward(&mut t, x, &mut ctx).unwrap();
        t.value(y).data.clone()
    };
    assert_eq!(run(&mut a), run(&mut b));
    // A wrong shape and a stray key are both listed.
    let mut bad = sd.clone();
    bad.remove("features.3.1.block.0.0.weight");
    bad.get_mut("features.0.0.weight").unwrap().shape = vec![32, 3, 3, 1];
    let extra = bad.get("features.0.1.weight").unwrap().clone();
    bad.insert("extra.weight", extra);
    let err = format!("{:#}", b.load_state_dict(&bad).unwrap_err());
    assert!(err.contains("1 missing, 1 unexpected, 1 with the wrong shape"), "{err}");
    assert!(err.contains("missing: features.3.1.block.0.0.weight [240, 40, 1, 1]"), "{err}");
    assert!(err.contains("unexpected: extra.weight [32]"), "{err}");
    assert!(err.contains("features.0.0.weight: file [32, 3, 3, 1], model [32, 3, 3, 3]"), "{err}");
}
