//! The CPU trainer's golden hashes: three training steps on a synthetic folder, every tensor of the checkpoint
//! (weights, BN running statistics, AdamW moments) hashed bit for bit. The hashes were taken from the trainer
//! before the backend-generic autograd existed; a refactor of the tape, the ops or the model that changes one bit
//! of CPU training fails here. Two configurations: the defaults, and one where dropout, stochastic depth, the
//! loss, BN's frozen mode, the optimizer and the unfreezing stage all differ from them.

use derma::data::synth::{SynthOptions, synth};
use derma::io::load_safetensors;
use derma::train::config::{BnFrozenMode, DeviceRequest, LossKind, TrainConfig};
use derma::train::trainer::{self, TrainRun};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Three steps of `config` on a fixed synthetic folder; the SHA-256 of every checkpoint tensor (sorted by name:
/// name, shape, f32 bits).
fn three_step_hash(config: TrainConfig) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synth(&SynthOptions { out: data.clone(), n: 64, seed: 5, faults: false, width: 64, height: 48 }).unwrap();
    let out = tmp.path().join("run");
    let mut run = TrainRun { quiet: true, ..TrainRun::new(config, &data, &out) };
    run.stop_after_steps = Some(3);
    assert!(trainer::run(&run).unwrap().interrupted, "three steps must end inside the first epoch");
    hash_tensors(&out.join("last.safetensors"))
}

fn hash_tensors(path: &Path) -> String {
    let (sd, _) = load_safetensors(path).unwrap();
    let mut names: Vec<_> = sd.iter().map(|(n, t)| (n.to_string(), t)).collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in names {
        h.update(name.as_bytes());
        for &d in &t.shape {
            h.update((d as u64).to_le_bytes());
        }
        for v in t.to_f32_vec() {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn base() -> TrainConfig {
    TrainConfig {
        image_size: 32,
        batch_size: 6,
        epochs: 1,
        workers: Some(1),
        device: DeviceRequest::Cpu,
        ..TrainConfig::default()
    }
}

#[test]
fn three_cpu_steps_with_the_defaults_are_bitwise_the_golden_run() {
    let c = base();
    c.validate().unwrap();
    assert_eq!(three_step_hash(c), "9b82430d6430a568390f65fdd014f48bd291603fa1558e136b186a91404f4f24");
}

#[test]
fn three_cpu_steps_with_other_settings_are_bitwise_the_golden_run() {
    let mut c = TrainConfig {
        lr: 3e-3,
        weight_decay: 1e-3,
        loss: LossKind::Ce,
        bn_frozen_mode: BnFrozenMode::Torch,
        head_dropout1: 0.3,
        head_dropout2: 0.15,
        stochastic_depth: 0.35,
        seed: 11,
        ..base()
    };
    c.unfreeze = UnfreezeSchedule::new(vec![Stage { epoch: 0, frozen_blocks: 2, lr_multiplier: 0.3 }]).unwrap();
    c.validate().unwrap();
    assert_eq!(three_step_hash(c), "c22fd5d7015f396c3a7a927cdbcd5c642702436f765fa2fb71d83eea11a3fb9b");
}
