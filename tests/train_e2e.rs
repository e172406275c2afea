//! End-to-end training on a tiny synthetic dataset: the run folder's files, evaluation of the best checkpoint,
//! bitwise kill-and-resume, and clear errors on bad input. Sizes are tiny (32 px, ~10 steps per epoch) so the
//! whole file runs in seconds on a small CPU.

use derma::data::synth::{SynthOptions, synth};
use derma::data::{self, PrepareOptions};
use derma::io::load_safetensors;
use derma::ops::loss::LossKind;
use derma::train::checkpoint::{self, TrainState};
use derma::train::config::{DeviceRequest, TrainConfig};
use derma::train::history::{EpochRecord, History};
use derma::train::trainer::{self, TrainRun};
use derma::train::unfreeze::{Stage, UnfreezeSchedule};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn synth_data(dir: &Path, seed: u64) -> PathBuf {
    let data = dir.join("data");
    synth(&SynthOptions { out: data.clone(), n: 96, seed, faults: false, width: 64, height: 48 }).unwrap();
    data
}

/// Tiny settings with a two-stage unfreezing schedule (5 blocks frozen, then none at half the backbone rate).
fn tiny_config(epochs: usize) -> TrainConfig {
    let mut c = TrainConfig {
        image_size: 32,
        batch_size: 8,
        epochs,
        lr: 2e-3,
        workers: Some(1),
        device: DeviceRequest::Cpu,
        ..TrainConfig::default()
    };
    c.early_stopping.patience = 0;
    c.unfreeze = UnfreezeSchedule::new(vec![
        Stage { epoch: 0, frozen_blocks: 5, lr_multiplier: 1.0 },
        Stage { epoch: 1, frozen_blocks: 0, lr_multiplier: 0.5 },
    ])
    .unwrap();
    c.validate().unwrap();
    c
}

fn train_run(config: TrainConfig, data: &Path, out: &Path) -> TrainRun {
    TrainRun { quiet: true, ..TrainRun::new(config, data, out) }
}

/// Tiny settings where every key differs from its default (precision aside: the CPU trains in f32), so a resume
/// that silently falls back to a default anywhere diverges. `pretrained` points at a B0 written here.
fn every_setting_changed(dir: &Path) -> TrainConfig {
    let pretrained = dir.join("imagenet-like.safetensors");
    let b0 =
        derma::nn::EfficientNet::<f32>::new(derma::nn::ModelConfig::b0(1000, derma::nn::HeadKind::Torchvision), 77);
    derma::io::save_safetensors(&pretrained, &b0.state_dict(), None).unwrap();
    let mut c = TrainConfig {
        batch_size: 6,
        epochs: 3,
        lr: 3e-3,
        weight_decay: 1e-3,
        adam_beta1: 0.85,
        adam_beta2: 0.99,
        adam_eps: 1e-7,
        loss: derma::train::config::LossKind::Ce,
        focal_gamma: 1.5,
        class_weighting: derma::train::config::ClassWeighting::Uniform,
        class_weights: None,
        image_size: 32,
        val_fraction: 0.25,
        seed: 11,
        workers: Some(1),
        device: DeviceRequest::Cpu,
        bn_frozen_mode: derma::train::config::BnFrozenMode::Torch,
        pretrained: Some(pretrained),
        head_dropout1: 0.3,
        head_dropout2: 0.15,
        stochastic_depth: 0.35,
        ..TrainConfig::default()
    };
    c.plateau.factor = 0.3;
    c.plateau.patience = 0;
    c.plateau.min_lr = 1e-4;
    c.plateau.threshold = 1e-3;
    c.plateau.cooldown = 1;
    c.plateau.eps = 1e-9;
    c.loss_scale.init_scale = 1024.0;
    c.loss_scale.growth_factor = 3.0;
    c.loss_scale.backoff_factor = 0.25;
    c.loss_scale.growth_interval = 7;
    c.early_stopping.patience = 4;
    c.early_stopping.min_delta = 1e-3;
    c.early_stopping.reset_on_stage_change = false;
    c.unfreeze = UnfreezeSchedule::new(vec![
        Stage { epoch: 0, frozen_blocks: 6, lr_multiplier: 1.0 },
        Stage { epoch: 1, frozen_blocks: 2, lr_multiplier: 0.3 },
        Stage { epoch: 2, frozen_blocks: 0, lr_multiplier: 0.7 },
    ])
    .unwrap();
    c.validate().unwrap();
    // Every key (every key of every table) differs from the defaults.
    let (ours, defaults) = (serde_json::to_value(&c).unwrap(), serde_json::to_value(TrainConfig::default()).unwrap());
    let default_keys = defaults.as_object().unwrap();
    for (key, value) in ours.as_object().unwrap() {
        if key == "precision" {
            continue;
        }
        match (value.as_object(), default_keys.get(key)) {
            (Some(table), Some(d)) => {
                for (k, v) in table {
                    let same = d.get(k) == Some(v) && !(key == "plateau" && k == "mode");
                    assert!(!same, "{key}.{k} is at its default");
                }
            }
            (_, d) => assert_ne!(d, Some(value), "{key} is at its default"),
        }
    }
    c
}

fn prepared(data: &Path, cfg: &TrainConfig) -> Arc<data::PreparedData> {
    Arc::new(
        data::prepare(&PrepareOptions {
            size: cfg.image_size as u32,
            val_fraction: cfg.val_fraction,
            seed: cfg.seed,
            quiet: true,
            ..PrepareOptions::new(data)
        })
        .unwrap(),
    )
}

fn assert_finite(r: &EpochRecord) {
    for (name, v) in [
        ("train_loss", r.train_loss),
        ("train_acc", r.train_acc),
        ("val_loss", r.val_loss),
        ("val_acc", r.val_acc),
        ("val_balanced_acc", r.val_balanced_acc),
        ("lr", r.lr),
        ("lr_multiplier", r.lr_multiplier),
        ("seconds", r.seconds),
        ("images_per_s", r.images_per_s),
    ] {
        assert!(v.is_finite(), "epoch {}: {name} = {v}", r.epoch);
    }
    for (name, v) in [("train_acc", r.train_acc), ("val_acc", r.val_acc), ("val_balanced_acc", r.val_balanced_acc)] {
        assert!((0.0..=1.0).contains(&v), "epoch {}: {name} = {v}", r.epoch);
    }
}

#[test]
fn end_to_end_run_writes_every_file_and_the_best_checkpoint_reproduces_its_score() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 3);
    let out = tmp.path().join("run");
    let cfg = tiny_config(3);
    let outcome = trainer::run(&train_run(cfg.clone(), &data, &out)).unwrap();
    assert!(!outcome.interrupted && !outcome.early_stopped);
    assert_eq!(outcome.epochs_completed, 3);

    for f in ["last.safetensors", "best.safetensors", "history.json", "history.csv", "config.toml"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for f in ["accuracy.png", "loss.png", "unfreezing.png", "lr.png", "confusion_matrix.png", "f1_per_class.png"] {
        let bytes = std::fs::read(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(bytes.len() > 100 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{f} is not a PNG");
    }
    assert_eq!(TrainConfig::load(&out.join("config.toml")).unwrap(), cfg);

    let history = History::load_json(&out.join("history.json")).unwrap();
    assert_eq!(history.epochs.len(), 3);
    for (e, r) in history.epochs.iter().enumerate() {
        assert_eq!(r.epoch, e + 1, "epochs count from 1");
        assert_finite(r);
    }
    // The schedule: 5 frozen blocks in epoch 0, then none at half rate.
    assert_eq!(history.epochs.iter().map(|r| r.frozen_layers).collect::<Vec<_>>(), [5, 0, 0]);
    assert_eq!(history.epochs.iter().map(|r| r.lr_multiplier).collect::<Vec<_>>(), [1.0, 0.5, 0.5]);
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + one row per epoch:\n{csv}");
    assert_eq!(outcome.last.as_ref().map(|r| r.epoch), Some(3));
    let best_acc = history.epochs.iter().map(|r| r.val_acc).fold(f64::MIN, f64::max);
    assert_eq!(outcome.best_val_acc, Some(best_acc));

    // The best checkpoint: saved at the end of the epoch with the best validation accuracy.
    let mut best = checkpoint::load(&out.join("best.safetensors")).unwrap();
    assert_eq!(best.image_size, 32);
    assert_eq!(best.config.as_ref(), Some(&cfg));
    let state = best.state.clone().unwrap();
    let epoch = state.epoch - 1;
    let recorded = &history.epochs[epoch];
    assert_eq!(recorded.val_acc, best_acc);
    assert_eq!(best.meta.val_acc, Some(recorded.val_acc));
    let prep = prepared(&data, &cfg);
    assert_eq!(best.class_names, prep.class_names);
    let kind = LossKind::Focal { gamma: cfg.focal_gamma };
    let ev =
        trainer::evaluate(&mut best.model, &prep, &prep.val, cfg.batch_size, 32, Some(&state.class_weights), &kind)
            .unwrap();
    assert_eq!(ev.report.accuracy, recorded.val_acc);
    assert_eq!(ev.report.balanced_accuracy, recorded.val_balanced_acc);
    assert!(
        (ev.loss - recorded.val_loss).abs() <= 1e-9 * recorded.val_loss.abs().max(1.0),
        "{} vs {}",
        ev.loss,
        recorded.val_loss
    );
    assert_eq!(ev.y_true.len(), prep.val.len());
    let c = prep.class_names.len();
    for row in ev.probs.chunks(c) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-4, "probabilities sum to {s}");
    }
}

/// Every tensor of a checkpoint (weights and optimizer moments) by name, as raw f32 bits.
fn tensors_bits(path: &Path) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let (sd, _) = load_safetensors(path).unwrap();
    let mut v: Vec<_> = sd
        .iter()
        .map(|(n, t)| (n.to_string(), t.shape.clone(), t.to_f32_vec().iter().map(|x| x.to_bits()).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The history without its wall-clock fields.
fn history_numbers(s: &TrainState) -> Vec<[f64; 9]> {
    s.history
        .epochs
        .iter()
        .map(|r| {
            [
                r.epoch as f64,
                r.train_loss,
                r.train_acc,
                r.val_loss,
                r.val_acc,
                r.val_balanced_acc,
                r.frozen_layers as f64,
                r.lr_multiplier,
                r.lr,
            ]
        })
        .collect()
}

/// Asserts two finished runs hold bitwise the same checkpoints (every tensor: weights, BN statistics, optimizer
/// moments), training state and history (every value but wall-clock times), in the checkpoints and on disk.
fn assert_same_run(dir_a: &Path, dir_b: &Path) {
    for file in ["last.safetensors", "best.safetensors"] {
        let (ta, tb) = (tensors_bits(&dir_a.join(file)), tensors_bits(&dir_b.join(file)));
        assert_eq!(ta.len(), tb.len(), "{file}");
        assert!(ta.iter().any(|(n, ..)| n.starts_with("optimizer.exp_avg.")), "no optimizer moments saved");
        assert!(ta.iter().any(|(n, ..)| n.starts_with("optimizer.exp_avg_sq.")), "no optimizer moments saved");
        assert!(ta.iter().any(|(n, ..)| n.ends_with("running_var")), "no BN statistics saved");
        for ((na, sa, va), (nb, sb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb, "{file}");
            assert_eq!(sa, sb, "{file} {na}");
            let diff = va.iter().zip(vb).filter(|(x, y)| x != y).count();
            assert_eq!(diff, 0, "{file} {na}: {diff} of {} values differ", va.len());
        }
        let sa = checkpoint::load(&dir_a.join(file)).unwrap().state.unwrap();
        let sb = checkpoint::load(&dir_b.join(file)).unwrap().state.unwrap();
        assert_eq!(history_numbers(&sa), history_numbers(&sb), "{file}");
        assert_eq!(sa.adam_steps, sb.adam_steps);
        assert_eq!(sa.epoch, sb.epoch);
        let (pa, pb) = (&sa.progress, &sb.progress);
        assert_eq!(
            (pa.step, pa.loss_sum.to_bits(), pa.correct, pa.seen),
            (pb.step, pb.loss_sum.to_bits(), pb.correct, pb.seen)
        );
        assert_eq!(sa.scaler, sb.scaler);
        assert_eq!(sa.plateau, sb.plateau);
        assert_eq!(sa.early, sb.early);
        assert_eq!(sa.best_val_acc.map(f64::to_bits), sb.best_val_acc.map(f64::to_bits));
        assert_eq!(sa.class_weights, sb.class_weights);
    }
    let (ha, hb) = (
        History::load_json(&dir_a.join("history.json")).unwrap(),
        History::load_json(&dir_b.join("history.json")).unwrap(),
    );
    assert_eq!(ha.epochs.len(), hb.epochs.len());
    let bits = |r: &EpochRecord| {
        [r.train_loss, r.train_acc, r.val_loss, r.val_acc, r.val_balanced_acc, r.lr_multiplier, r.lr, r.loss_scale]
            .map(f64::to_bits)
    };
    for (x, y) in ha.epochs.iter().zip(&hb.epochs) {
        assert_eq!((x.epoch, x.frozen_layers, bits(x)), (y.epoch, y.frozen_layers, bits(y)));
    }
}

#[test]
fn interrupted_and_resumed_run_is_bitwise_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 5);
    let cfg = every_setting_changed(tmp.path());
    let steps_per_epoch = prepared(&data, &cfg).train.len() / cfg.batch_size;
    assert!(steps_per_epoch >= 4, "{steps_per_epoch} steps per epoch");

    let dir_a = tmp.path().join("a");
    let a = trainer::run(&train_run(cfg.clone(), &data, &dir_a)).unwrap();
    assert!(!a.interrupted);
    assert_eq!(a.epochs_completed, 3);
    let history = History::load_json(&dir_a.join("history.json")).unwrap();
    assert_eq!(history.epochs.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2, 3], "epochs count from 1");
    assert_eq!(history.epochs.iter().map(|r| r.frozen_layers).collect::<Vec<_>>(), [6, 2, 0]);

    // Interrupted in the middle of epoch 2 (after the first unfreezing transition), then right after the last
    // step of epoch 2 (before its validation), each time resumed in a new `trainer::run` with another worker
    // count.
    let dir_b = tmp.path().join("b");
    let mut run_b = train_run(cfg.clone(), &data, &dir_b);
    run_b.stop_after_steps = Some(steps_per_epoch + steps_per_epoch / 2);
    let b1 = trainer::run(&run_b).unwrap();
    assert!(b1.interrupted);
    assert_eq!(b1.epochs_completed, 1);
    let mid = checkpoint::load(&dir_b.join("last.safetensors")).unwrap().state.unwrap();
    assert_eq!((mid.epoch, mid.progress.step), (1, steps_per_epoch / 2));
    assert_eq!(mid.history.epochs.len(), 1);

    run_b.resume = true;
    run_b.config.workers = Some(2);
    run_b.stop_after_steps = Some(steps_per_epoch - steps_per_epoch / 2);
    assert!(trainer::run(&run_b).unwrap().interrupted);
    let end = checkpoint::load(&dir_b.join("last.safetensors")).unwrap().state.unwrap();
    assert_eq!((end.epoch, end.progress.step), (1, steps_per_epoch));

    run_b.stop_after_steps = None;
    run_b.config.workers = Some(3);
    let b2 = trainer::run(&run_b).unwrap();
    assert!(!b2.interrupted);
    assert_eq!(b2.epochs_completed, 3);
    assert_same_run(&dir_a, &dir_b);
}

#[test]
fn resume_refuses_changed_settings_and_a_used_folder_is_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 6);
    let cfg = tiny_config(1);
    let dir = tmp.path().join("run");
    let mut run = train_run(cfg.clone(), &data, &dir);
    run.stop_after_steps = Some(2);
    assert!(trainer::run(&run).unwrap().interrupted);
    let before = std::fs::read(dir.join("last.safetensors")).unwrap();

    // Without --resume a folder holding a run is refused and left as it was.
    run.stop_after_steps = None;
    let e = err_text(trainer::run(&run));
    assert!(e.contains("already holds a run") && e.contains("--resume") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(dir.join("last.safetensors")).unwrap(), before);

    // A resume with a setting that changes the result is refused, naming it.
    run.resume = true;
    run.config.image_size = 64;
    run.config.head_dropout2 = 0.1;
    let e = err_text(trainer::run(&run));
    assert!(e.contains("head_dropout2") && e.contains("image_size"), "{e}");
    assert_eq!(std::fs::read(dir.join("last.safetensors")).unwrap(), before);

    // --overwrite starts afresh: the old run's files are gone, the new run's are there.
    run.resume = false;
    run.overwrite = true;
    run.config = cfg.clone();
    run.config.seed = 99;
    let o = trainer::run(&run).unwrap();
    assert_eq!(o.epochs_completed, 1);
    assert_eq!(TrainConfig::load(&dir.join("config.toml")).unwrap().seed, 99);
    assert_eq!(checkpoint::load(&dir.join("last.safetensors")).unwrap().config.unwrap().seed, 99);
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_input_stops_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();

    // A data folder without a label file.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = err_text(trainer::run(&train_run(tiny_config(1), &empty, &tmp.path().join("r1"))));
    assert!(e.contains("ISIC_2019_Training_GroundTruth.csv") && e.contains("labels.csv"), "{e}");
    assert!(e.contains(&empty.display().to_string()), "{e}");

    // A batch larger than the training split.
    let data = synth_data(tmp.path(), 7);
    let mut cfg = tiny_config(1);
    cfg.batch_size = 500;
    let e = err_text(trainer::run(&train_run(cfg, &data, &tmp.path().join("r2"))));
    assert!(e.contains("fewer than one batch of 500") && e.contains("--batch-size"), "{e}");
    assert!(!tmp.path().join("r2").join("last.safetensors").exists());
    // Nothing was trained, so the folder may be used again with a batch that fits.
    let mut cfg = tiny_config(1);
    cfg.batch_size = 16;
    let mut again = train_run(cfg, &data, &tmp.path().join("r2"));
    again.stop_after_steps = Some(1);
    assert!(trainer::run(&again).unwrap().interrupted);

    // A config with a misspelt key.
    let toml = tmp.path().join("bad.toml");
    std::fs::write(&toml, "epochs = 3\nbatch_sise = 8\n").unwrap();
    let e = err_text(TrainConfig::load(&toml));
    assert!(e.contains("batch_sise") && e.contains("unknown field"), "{e}");
    assert!(e.contains("bad.toml"), "{e}");
}

// ---- The `derma train` process: signals, exit codes, run folders, damaged checkpoints, divergence. ----

fn derma() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_derma"));
    c.stdin(std::process::Stdio::null());
    c
}

/// Runs `derma ARGS` to the end: (exit code, stderr).
fn derma_run(args: &[&str], cwd: &Path) -> (Option<i32>, String) {
    let out = derma().args(args).current_dir(cwd).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Starts `derma ARGS` and reads its stderr until a test hook holds it; returns the child and what it printed.
// The child is returned to the caller, which signals and waits on it.
#[allow(clippy::zombie_processes)]
fn derma_until_hold(args: &[&str]) -> (std::process::Child, String, std::io::BufReader<std::process::ChildStderr>) {
    use std::io::BufRead;
    let mut child = derma().args(args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!("derma ended ({status}) before holding:\n{text}");
        }
        text.push_str(&line);
        if line.contains(trainer::HOLD_MARKER) {
            return (child, text, reader);
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[cfg(unix)]
#[test]
fn sigterm_mid_epoch_and_sigkill_at_an_epoch_boundary_then_resume_is_bitwise_the_uninterrupted_run() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 8);
    // Every setting off its default, two epochs (extended to three on resume).
    let mut cfg = every_setting_changed(tmp.path());
    cfg.epochs = 2;
    let toml = tmp.path().join("settings.toml");
    cfg.save(&toml).unwrap();
    let steps_per_epoch = prepared(&data, &cfg).train.len() / cfg.batch_size;
    assert!(steps_per_epoch >= 4);

    // The uninterrupted run, three epochs.
    let dir_a = tmp.path().join("a");
    let mut full = cfg.clone();
    full.epochs = 3;
    assert_eq!(trainer::run(&train_run(full.clone(), &data, &dir_a)).unwrap().epochs_completed, 3);

    // SIGTERM in the middle of epoch 2: progress saved, exit 130, a resume command that works as printed.
    let dir_b = tmp.path().join("b");
    let hold_at = (steps_per_epoch + 2).to_string();
    let args = ["train", "--data", path_str(&data), "--out", path_str(&dir_b), "--config", path_str(&toml)];
    let (mut child, _, mut rest) =
        derma_until_hold(&[&args[..], &["--quiet", "--hold-after-steps", &hold_at]].concat());
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut tail = String::new();
    rest.read_to_string(&mut tail).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{tail}");
    let mid = checkpoint::load(&dir_b.join("last.safetensors")).unwrap().state.unwrap();
    assert_eq!((mid.epoch, mid.progress.step), (1, 2), "saved mid-epoch");
    let hint = tail.lines().find_map(|l| l.split_once("continue with: ").map(|x| x.1.to_string()));
    let hint = hint.unwrap_or_else(|| panic!("no resume command in:\n{tail}"));
    assert_eq!(hint, format!("derma train --resume {}", dir_b.display()));

    // The printed command (extended to 3 epochs, with other workers), killed with SIGKILL right after the
    // checkpoint of epoch 2 is written.
    let resume: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let extra = ["--epochs", "3", "--workers", "2", "--quiet", "--hold-after-epochs", "2"];
    let (mut child, _, _) = derma_until_hold(&[&resume[..], &extra[..]].concat());
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    assert_eq!(checkpoint::load(&dir_b.join("last.safetensors")).unwrap().state.unwrap().epoch, 2);

    // Resumed from that last.safetensors, to the end.
    let (code, err) = derma_run(&[&resume[..], &["--quiet"]].concat(), tmp.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("done: 3 epochs"), "{err}");
    // The saved settings: the uninterrupted run's, with the extension and the last worker count.
    assert_eq!(TrainConfig::load(&dir_b.join("config.toml")).unwrap(), TrainConfig { workers: Some(2), ..full });
    assert_same_run(&dir_a, &dir_b);
}

#[cfg(unix)]
#[test]
fn sigterm_between_epochs_stops_at_the_boundary_with_exit_130() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 12);
    let toml = tmp.path().join("tiny.toml");
    tiny_config(3).save(&toml).unwrap();
    let run = tmp.path().join("run");
    let args = ["train", "--data", path_str(&data), "--config", path_str(&toml), "--out", path_str(&run)];
    let (mut child, _, rest) = derma_until_hold(&[&args[..], &["--quiet", "--hold-after-epochs", "1"]].concat());
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let tail = std::io::read_to_string(rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{tail}");
    assert!(tail.contains("after 1 complete epoch (progress saved)"), "{tail}");
    let state = checkpoint::load(&run.join("last.safetensors")).unwrap().state.unwrap();
    assert_eq!((state.epoch, state.progress.step, state.history.epochs.len()), (1, 0, 1));
}

#[test]
fn run_folders_are_never_overwritten_and_resume_refuses_changed_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 9);
    let toml = tmp.path().join("tiny.toml");
    tiny_config(1).save(&toml).unwrap();
    let run = tmp.path().join("run");
    let base = ["train", "--data", path_str(&data), "--config", path_str(&toml), "--quiet"];
    let with_out = [&base[..], &["--out", path_str(&run)]].concat();
    let (code, err) = derma_run(&with_out, tmp.path());
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("done: 1 epoch,"), "{err}");
    let (last, config) = (std::fs::read(run.join("last.safetensors")).unwrap(), std::fs::read(run.join("config.toml")));

    // The same --out again: refused, nothing touched.
    let (code, err) = derma_run(&with_out, tmp.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already holds a run") && err.contains("--resume") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), last);

    // --resume with a setting that would change the result: refused naming the flag, config.toml unchanged.
    for (flag, value) in [("--image-size", "64"), ("--batch-size", "4"), ("--lr", "0.1"), ("--seed", "3")] {
        let (code, err) = derma_run(&["train", "--resume", path_str(&run), flag, value], tmp.path());
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(err.contains(flag) && err.contains("--resume"), "{flag}: {err}");
        assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config.as_ref().unwrap().clone());
    }
    // Extending, with other workers, needs neither --data nor anything else.
    let (code, err) =
        derma_run(&["train", "--resume", path_str(&run), "--epochs", "2", "--workers", "2", "--quiet"], tmp.path());
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(History::load_json(&run.join("history.json")).unwrap().epochs.len(), 2);
    // --overwrite replaces it.
    let (code, err) = derma_run(&[&with_out[..], &["--overwrite", "--seed", "5"]].concat(), tmp.path());
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(History::load_json(&run.join("history.json")).unwrap().epochs.len(), 1);

    // Default folders: two runs get two folders, runs/latest is the second.
    let stop = [&base[..], &["--stop-after-steps", "1"]].concat();
    let (c1, e1) = derma_run(&stop, tmp.path());
    let (c2, e2) = derma_run(&stop, tmp.path());
    assert_eq!((c1, c2), (Some(130), Some(130)), "{e1}\n{e2}");
    let runs = tmp.path().join("runs");
    let mut dirs: Vec<_> = std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().file_name()).collect();
    dirs.sort();
    assert_eq!(dirs.len(), 3, "two runs and latest: {dirs:?}");
    assert!(dirs.iter().all(|d| d == "latest" || d.to_string_lossy().starts_with("run-")), "{dirs:?}");
    let second = e2.lines().find_map(|l| l.split_once("--resume ").map(|x| PathBuf::from(x.1))).unwrap();
    assert_eq!(
        std::fs::canonicalize(runs.join("latest")).unwrap(),
        std::fs::canonicalize(tmp.path().join(&second)).unwrap()
    );
    assert!(runs.join("latest").join("last.safetensors").is_file());
}

/// The byte range of tensor `name`'s data in a safetensors file.
fn tensor_bytes(file: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let off = &header[name]["data_offsets"];
    (8 + n + off[0].as_u64().unwrap() as usize)..(8 + n + off[1].as_u64().unwrap() as usize)
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 10);
    let run = tmp.path().join("run");
    let mut r = train_run(tiny_config(1), &data, &run);
    r.stop_after_steps = Some(3);
    assert!(trainer::run(&r).unwrap().interrupted);
    let last = run.join("last.safetensors");
    let good = std::fs::read(&last).unwrap();
    checkpoint::load(&last).unwrap();

    // One flipped bit inside a weight tensor.
    let name = "features.4.0.block.1.0.weight";
    let mut bad = good.clone();
    let range = tensor_bytes(&bad, name);
    bad[range.start + range.len() / 2] ^= 0x10;
    std::fs::write(&last, &bad).unwrap();
    let e = err_text(checkpoint::load(&last));
    assert!(e.contains(path_str(&last)) && e.contains(name) && e.contains("checksum"), "{e}");
    r.resume = true;
    r.stop_after_steps = None;
    let e = err_text(trainer::run(&r));
    assert!(e.contains(name) && e.contains("checksum"), "{e}");
    let (code, err) = derma_run(&["eval", "--checkpoint", path_str(&last), "--data", path_str(&data)], tmp.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(name) && err.contains(path_str(&last)), "{err}");
    let (code, err) = derma_run(&["train", "--resume", path_str(&run)], tmp.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(name), "{err}");
    let out = tmp.path().join("export.safetensors");
    let (code, err) =
        derma_run(&["model", "export", "--weights", path_str(&last), "--out", path_str(&out)], tmp.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(name), "{err}");

    // An optimizer moment.
    let mut bad = good.clone();
    let moment = "optimizer.exp_avg.classifier.5.weight";
    let range = tensor_bytes(&bad, moment);
    bad[range.end - 1] ^= 0x01;
    std::fs::write(&last, &bad).unwrap();
    assert!(err_text(checkpoint::load(&last)).contains(moment));

    // A digit of the training state in the metadata (still valid JSON, a different number).
    let mut bad = good.clone();
    let key = b"\\\"loss_sum\\\":";
    let at = bad.windows(key.len()).position(|w| w == key).expect("loss_sum in the header") + key.len();
    let digit = (at..at + 8).find(|&i| bad[i].is_ascii_digit() && bad[i] != b'0').unwrap();
    bad[digit] = if bad[digit] == b'9' { b'8' } else { bad[digit] + 1 };
    std::fs::write(&last, &bad).unwrap();
    let e = err_text(checkpoint::load(&last));
    assert!(e.contains("metadata") && e.contains("checksum"), "{e}");

    // A checkpoint written before checksums (the two keys removed) still loads, with a warning.
    let (sd, mut meta) = load_safetensors(&{
        std::fs::write(&last, &good).unwrap();
        last.clone()
    })
    .unwrap();
    meta.remove("derma.checksums");
    meta.remove("derma.metadata_crc32");
    derma::io::save_safetensors(&last, &sd, Some(meta)).unwrap();
    let loaded = checkpoint::load(&last).unwrap();
    assert_eq!(loaded.state.unwrap().progress.step, 3);
}

#[test]
fn a_diverging_run_stops_at_the_first_non_finite_value_naming_epoch_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_data(tmp.path(), 11);
    let toml = tmp.path().join("tiny.toml");
    tiny_config(2).save(&toml).unwrap();
    let run = tmp.path().join("run");
    let args = ["train", "--data", path_str(&data), "--config", path_str(&toml), "--out", path_str(&run), "--quiet"];
    let (code, err) = derma_run(&[&args[..], &["--lr", "1e6"]].concat(), tmp.path());
    assert_eq!(code, Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line:\n{err}"));
    assert!(line.contains("diverged in epoch ") && line.contains(" at step ") && line.contains("--lr"), "{line}");
    assert!(!line.contains("probability"), "{line}");
}

#[test]
fn train_help_names_the_default_run_folder_as_it_is_made() {
    let (code, text) = {
        let out = derma().args(["train", "--help"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(code, Some(0));
    assert!(text.contains("runs/run-<UTC time>") && text.contains("runs/latest"), "{text}");
    assert!(!text.contains("runs/<time>"), "{text}");
}
