//! Renders every training plot from a synthetic 100-epoch history and a report, and checks the PNGs.
//! Set `DERMA_PLOTS_PREVIEW=<folder>` to also keep a copy there for viewing.

use std::path::Path;

use derma::train::history::{EpochRecord, History};
use derma::train::metrics::{Report, compute_report};
use derma::train::plateau::{PlateauConfig, ReduceLrOnPlateau};
use derma::train::plots::write_plots;
use derma::train::unfreeze::UnfreezeSchedule;

fn sample_history() -> History {
    let schedule = UnfreezeSchedule::default();
    let mut plateau = ReduceLrOnPlateau::new(PlateauConfig::default(), &[5e-5]).unwrap();
    let mut h = History::new();
    for e in 0..100usize {
        let stage = schedule.stage_for_epoch(e);
        let x = e as f64;
        // Rising accuracy that flattens, with small wiggles, jumping a little at each unfreezing stage.
        let val_acc = 0.55 + 0.25 * (1.0 - (-x / 25.0).exp()) + 0.01 * (x * 1.7).sin() + 0.01 * stage.index as f64;
        let record = EpochRecord {
            epoch: e,
            train_loss: 0.9 * (-x / 30.0).exp() + 0.15,
            train_acc: (0.5 + 0.4 * (1.0 - (-x / 20.0).exp())).min(0.99),
            val_loss: 0.8 * (-x / 30.0).exp() + 0.25 + 0.02 * (x * 0.9).cos(),
            val_acc,
            val_balanced_acc: val_acc - 0.12,
            frozen_layers: stage.frozen_blocks,
            lr_multiplier: stage.lr_multiplier,
            lr: plateau.lr(),
            loss_scale: 65536.0,
            seconds: 60.0,
            images_per_s: 350.0,
        };
        plateau.step(val_acc);
        h.push(record).unwrap();
    }
    h
}

fn sample_report() -> (Report, Vec<String>) {
    let names: Vec<String> =
        ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"].iter().map(|s| s.to_string()).collect();
    let c = names.len();
    let (mut t, mut p, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    let mut state = 12345u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for i in 0..2000usize {
        let truth = i % c;
        let pred = if next() % 100 < 40 + 6 * truth { truth } else { next() % c };
        t.push(truth);
        p.push(pred);
        for k in 0..c {
            probs.push(if k == pred { 0.6 } else { 0.4 / (c - 1) as f32 } + (next() % 10) as f32 * 1e-3);
        }
    }
    (compute_report(&t, &p, Some(&probs), c).unwrap(), names)
}

fn check_png(path: &Path) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    assert!(img.width() >= 600 && img.height() >= 400, "{} is {}x{}", path.display(), img.width(), img.height());
    // Something besides the white background was drawn: text is dark, lines are coloured.
    let dark = img.pixels().filter(|p| p.0.iter().all(|&v| v < 80)).count();
    let coloured = img.pixels().filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60).count();
    assert!(dark > 500, "{}: only {dark} dark pixels (no text?)", path.display());
    assert!(coloured > 500, "{}: only {coloured} coloured pixels", path.display());
}

#[test]
fn renders_all_plots() {
    let dir = tempfile::tempdir().unwrap();
    let h = sample_history();
    let (report, names) = sample_report();
    let files = write_plots(dir.path(), &h, Some(&report), &names).unwrap();
    assert_eq!(files.len(), 6);
    for f in &files {
        check_png(f);
    }
    // Only the six PNGs, no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 6);
    if let Ok(preview) = std::env::var("DERMA_PLOTS_PREVIEW") {
        write_plots(Path::new(&preview), &h, Some(&report), &names).unwrap();
        h.write_files(Path::new(&preview)).unwrap();
    }
}

#[test]
fn empty_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_plots(dir.path(), &History::new(), None, &[]).unwrap_err().to_string();
    assert!(err.contains("no epochs"), "{err}");
}

#[test]
fn one_epoch_and_nan_values_still_draw() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = History::new();
    h.push(EpochRecord {
        epoch: 0,
        train_loss: 1.2,
        train_acc: 0.4,
        val_loss: f64::NAN,
        val_acc: 0.45,
        val_balanced_acc: 0.3,
        frozen_layers: 7,
        lr_multiplier: 1.0,
        lr: 5e-5,
        loss_scale: 65536.0,
        seconds: 1.0,
        images_per_s: 10.0,
    })
    .unwrap();
    let files = write_plots(dir.path(), &h, None, &[]).unwrap();
    assert_eq!(files.len(), 4);
}
