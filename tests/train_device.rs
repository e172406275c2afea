//! The GPU trainer on the emulated device against the CPU trainer: the same recipe, the same masks (counter rule),
//! the same batches (the device's fused augmentation equals the CPU applier in f32), the same optimizer and loss
//! scaler. Six steps over two epochs whose unfreezing stages differ, with a forced overflow: the weights, BN
//! statistics, AdamW moments and step counts, and the scaler's state match the CPU trainer's; graph replay equals
//! eager execution bit for bit with the arena poisoned between replays and no allocation during a replay; a
//! checkpoint written by the device resumes on the CPU as it does on the device.

use derma::data::synth::{SynthOptions, synth};
use derma::io::load_safetensors;
use derma::train::checkpoint;
use derma::train::config::{DeviceRequest, Precision, TrainConfig};
use derma::train::scaler::GradScalerConfig;
use derma::train::trainer::{self, TrainOutcome, TrainRun};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A synthetic folder small enough for the emulator: 3 training steps of 4 images per epoch.
fn data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    synth(&SynthOptions { out: d.clone(), n: 20, seed: 3, faults: false, width: 40, height: 30 }).unwrap();
    d
}

/// Two epochs, the second in another unfreezing stage; dropout and stochastic depth on (non-default rates); the
/// loss scale starts at 2^127 so the first step overflows, then backs off to 2^4 (small enough for f16's range)
/// and grows every 2 clean steps.
fn config(device: DeviceRequest, precision: Precision) -> TrainConfig {
    let mut c = TrainConfig {
        image_size: 64,
        batch_size: 4,
        epochs: 2,
        workers: Some(1),
        lr: LR,
        head_dropout1: 0.25,
        head_dropout2: 0.1,
        stochastic_depth: 0.3,
        seed: 17,
        device,
        precision,
        loss_scale: GradScalerConfig {
            init_scale: 2f32.powi(127),
            growth_factor: 2.0,
            backoff_factor: 2f32.powi(-123),
            growth_interval: 2,
        },
        ..TrainConfig::default()
    };
    c.unfreeze = UnfreezeSchedule::new(vec![
        Stage { epoch: 0, frozen_blocks: 6, lr_multiplier: 0.5 },
        Stage { epoch: 1, frozen_blocks: 4, lr_multiplier: 0.25 },
    ])
    .unwrap();
    c.validate().unwrap();
    c
}

const LR: f64 = 2e-3;
/// f32 device vs f32 CPU (see [`assert_trainer_close`] for what each element is measured against).
const TOL_F32: f64 = 1e-5;
/// f16 device vs f32 CPU: f16 storage rounding through the random-init network.
const TOL_F16: f64 = 5e-2;

fn train(run: TrainRun) -> TrainOutcome {
    trainer::run(&run).unwrap_or_else(|e| panic!("training on {:?} failed: {e:#}", run.config.device))
}

fn run_of(cfg: TrainConfig, data: &Path, out: &Path) -> TrainRun {
    TrainRun { quiet: true, scale_loss_in_f32: true, ..TrainRun::new(cfg, data, out) }
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tensors(run_dir: &Path) -> Tensors {
    let (sd, _) = load_safetensors(&run_dir.join("last.safetensors")).unwrap();
    sd.iter().map(|(n, t)| (n.to_string(), (t.shape.clone(), t.to_f32_vec()))).collect()
}

/// The kind of a checkpoint tensor: weights, AdamW's moments, BN running statistics.
fn kind(name: &str) -> &'static str {
    if name.starts_with("optimizer.exp_avg_sq.") {
        "v"
    } else if name.starts_with("optimizer.exp_avg.") {
        "m"
    } else if name.ends_with("running_mean") {
        "mean"
    } else if name.ends_with("running_var") {
        "var"
    } else if name.ends_with("num_batches_tracked") {
        "count"
    } else {
        "weight"
    }
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64))
}

/// The device run `a` against the CPU run `b` after `steps` AdamW steps at learning rate `lr`, each element within
/// `tol` of its scale:
/// - moments (`m`, `v`: linear in the gradients): relative to the tensor's largest magnitude, or to 1e-3 of the
///   largest of that kind in the model for a tensor whose gradients are rounding noise (a bias before a batch
///   norm, whose gradient is mathematically zero);
/// - running variances: relative to the tensor's largest; running means in units of their layer's standard
///   deviation (a mean behind a batch norm is zero up to rounding); batch counts exactly;
/// - weights: relative to the tensor's largest, for every element whose gradient is signal (its first moment at
///   least 1e-3 of its tensor's largest and of 1e-3 of the model's). AdamW divides each step by √v + 1e-8, so a
///   noise-level gradient becomes a full step of ±lr whose sign is the noise's: two correct implementations
///   differ there by up to 2·lr per step, and those elements are held to that bound only.
fn assert_trainer_close(a: &Tensors, b: &Tensors, tol: f64, lr: f64, steps: usize, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different tensors");
    let mut kind_max: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, (_, v)) in b {
        let e = kind_max.entry(kind(name)).or_default();
        *e = e.max(max_abs(v));
    }
    let (mut worst, mut noise_elems, mut signal_elems) = ((0.0f64, String::new()), 0usize, 0usize);
    for (name, (sa, va)) in a {
        let (sb, vb) = &b[name];
        assert_eq!(sa, sb, "{what}: {name} shapes");
        let k = kind(name);
        let own = max_abs(vb);
        let moment = |prefix: &str| b.get(&format!("{prefix}{name}")).map(|(_, m)| m.as_slice());
        for (i, (&x, &y)) in va.iter().zip(vb).enumerate() {
            assert!(x.is_finite(), "{what}: {name}[{i}] = {x}");
            let diff = (x as f64 - y as f64).abs();
            let scale = match k {
                "count" => {
                    assert_eq!(x, y, "{what}: {name}");
                    continue;
                }
                "m" | "v" => own.max(1e-3 * kind_max[k]),
                "var" => own,
                "mean" => {
                    let var = &b[&name.replace("running_mean", "running_var")].1;
                    max_abs(var).sqrt()
                }
                _ => {
                    let m = moment("optimizer.exp_avg.");
                    let signal = m.is_some_and(|m| {
                        let mm = max_abs(m);
                        mm >= 1e-3 * kind_max["m"] && (m[i].abs() as f64) >= 1e-3 * mm
                    });
                    if !signal {
                        noise_elems += 1;
                        assert!(
                            diff <= 2.0 * lr * steps as f64 * 1.001,
                            "{what}: {name}[{i}] = {x} vs {y}: more than AdamW's noise bound 2·lr·steps"
                        );
                        continue;
                    }
                    signal_elems += 1;
                    own
                }
            };
            let err = diff / scale.max(1e-30);
            assert!(err <= tol, "{what}: {name}[{i}] = {x} vs {y} (error {err:.2e} of its scale {scale:.3e})");
            if err > worst.0 {
                worst = (err, name.clone());
            }
        }
    }
    eprintln!(
        "{what}: worst relative error {:.2e} in {}; weights with a signal gradient {signal_elems}, with a noise one \
         {noise_elems}",
        worst.0, worst.1
    );
}

fn assert_bitwise(a: &Tensors, b: &Tensors, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: different tensors");
    for (name, (_, va)) in a {
        let vb = &b[name].1;
        for (i, (&x, &y)) in va.iter().zip(vb).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}: {name}[{i}] = {x} vs {y}");
        }
    }
}

/// The training state a checkpoint keeps besides tensors: scaler, AdamW step counts, progress, history.
fn state(run_dir: &Path) -> checkpoint::TrainState {
    checkpoint::load(&run_dir.join("last.safetensors")).unwrap().state.unwrap()
}

fn assert_same_state(a: &checkpoint::TrainState, b: &checkpoint::TrainState, what: &str) {
    assert_eq!(a.scaler, b.scaler, "{what}: loss scaler state");
    assert_eq!(a.adam_steps, b.adam_steps, "{what}: AdamW step counts");
    assert_eq!(a.epoch, b.epoch, "{what}: epochs");
    assert_eq!(a.history.epochs.len(), b.history.epochs.len(), "{what}: history length");
    for (x, y) in a.history.epochs.iter().zip(&b.history.epochs) {
        assert_eq!(x.frozen_layers, y.frozen_layers, "{what}: stage");
        assert_eq!(x.loss_scale, y.loss_scale, "{what}: loss scale of epoch {}", x.epoch);
        assert!((x.train_loss - y.train_loss).abs() <= 1e-5 * y.train_loss.abs().max(1.0), "{what}: train loss");
        assert!((x.val_loss - y.val_loss).abs() <= 1e-5 * y.val_loss.abs().max(1.0), "{what}: val loss");
        assert_eq!(x.train_acc, y.train_acc, "{what}: train accuracy of epoch {}", x.epoch);
        assert_eq!(x.val_acc, y.val_acc, "{what}: validation accuracy of epoch {}", x.epoch);
    }
}

#[test]
fn device_trainer_matches_the_cpu_trainer_eagerly_and_by_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let dir = |n: &str| tmp.path().join(n);

    let cpu = train(run_of(config(DeviceRequest::Cpu, Precision::F32), &d, &dir("cpu")));
    assert_eq!(cpu.epochs_completed, 2);
    let cpu_state = state(&dir("cpu"));
    // The forced overflow happened (one backoff from 2^127 to 2^4) and growth followed.
    let scale = cpu_state.scaler.scale();
    assert!((2f32.powi(5)..2f32.powi(12)).contains(&scale), "CPU scaler ended at {scale}: no backoff or no growth");

    let eager =
        train(TrainRun { eager_steps: true, ..run_of(config(DeviceRequest::Emu, Precision::F32), &d, &dir("eager")) });
    let stats = eager.device.expect("device stats");
    assert_eq!((stats.captures, stats.replays), (0, 0), "eager mode replays nothing");
    let steps = stats.eager_steps;
    assert!(steps >= 6, "the folder gives {steps} steps in two epochs");

    let replay = train(TrainRun {
        poison_replays: true,
        ..run_of(config(DeviceRequest::Emu, Precision::F32), &d, &dir("replay"))
    });
    let stats = replay.device.expect("device stats");
    // One eager step and one capture per stage, the other steps replayed.
    assert_eq!((stats.eager_steps, stats.captures, stats.replays), (2, 2, steps - 2), "{stats:?}");
    assert_eq!(stats.allocations_during_replays, 0, "a replay allocated");

    let (tc, te, tr) = (tensors(&dir("cpu")), tensors(&dir("eager")), tensors(&dir("replay")));
    assert_trainer_close(&te, &tc, TOL_F32, LR, steps, "device (eager) vs CPU");
    assert_bitwise(&tr, &te, "replayed vs eager");
    let (se, sr) = (state(&dir("eager")), state(&dir("replay")));
    assert_same_state(&se, &cpu_state, "device vs CPU");
    assert_same_state(&sr, &se, "replayed vs eager");
}

#[test]
fn a_device_checkpoint_resumes_on_the_cpu_as_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let first = tmp.path().join("first");
    let stopped =
        train(TrainRun { stop_after_steps: Some(4), ..run_of(config(DeviceRequest::Emu, Precision::F32), &d, &first) });
    assert!(stopped.interrupted, "four steps stop inside the second epoch");
    let copy = |name: &str| {
        let to = tmp.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&first).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
        to
    };
    let (on_cpu, on_dev) = (copy("on_cpu"), copy("on_dev"));
    let resume = |cfg: TrainConfig, out: &Path| train(TrainRun { resume: true, ..run_of(cfg, &d, out) });
    // The device setting may change on resume (it is not a setting of the recipe).
    resume(config(DeviceRequest::Cpu, Precision::F32), &on_cpu);
    let rest = resume(config(DeviceRequest::Emu, Precision::F32), &on_dev).device.expect("device stats");
    let steps = 4 + rest.eager_steps + rest.replays;
    assert_trainer_close(
        &tensors(&on_dev),
        &tensors(&on_cpu),
        TOL_F32,
        LR,
        steps,
        "resumed on the device vs on the CPU",
    );
    assert_same_state(&state(&on_cpu), &state(&on_dev), "resumed on the CPU vs on the device");
}

#[test]
fn f16_device_training_scales_skips_and_tracks_the_cpu_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path());
    let (cpu_dir, f16_dir) = (tmp.path().join("cpu"), tmp.path().join("f16"));
    train(run_of(config(DeviceRequest::Cpu, Precision::F32), &d, &cpu_dir));
    let out =
        train(TrainRun { poison_replays: true, ..run_of(config(DeviceRequest::Emu, Precision::F16), &d, &f16_dir) });
    assert_eq!(out.device.map(|s| s.allocations_during_replays), Some(0));
    let (sc, s16) = (state(&cpu_dir), state(&f16_dir));
    // The overflow of 2^127 and the clean steps after it are found on the f16 path as on the CPU.
    assert_eq!(s16.scaler, sc.scaler, "f16 loss scaler trace");
    assert_eq!(s16.adam_steps, sc.adam_steps, "f16 AdamW step counts");
    let stats = out.device.expect("device stats");
    let steps = stats.eager_steps + stats.replays;
    assert_trainer_close(&tensors(&f16_dir), &tensors(&cpu_dir), TOL_F16, LR, steps, "f16 device vs f32 CPU");
}
