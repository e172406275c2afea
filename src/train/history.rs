//! Per-epoch training history, written as `history.json` and `history.csv` (each atomically: a temporary file in
//! the same folder, then a rename, so a crash never leaves a half-written file).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One epoch's record (the seed's history keys plus timing, learning rate and loss scale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochRecord {
    /// Epoch number, counting from 1 (as the console shows it).
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy (fraction).
    pub train_acc: f64,
    /// Mean validation loss.
    pub val_loss: f64,
    /// Validation accuracy (fraction).
    pub val_acc: f64,
    /// Validation balanced accuracy (mean per-class recall).
    pub val_balanced_acc: f64,
    /// Frozen `features` children during the epoch.
    pub frozen_layers: usize,
    /// Backbone learning-rate multiplier during the epoch.
    pub lr_multiplier: f64,
    /// Base (head) learning rate during the epoch.
    pub lr: f64,
    /// Loss scale at the end of the epoch (1 without mixed precision).
    pub loss_scale: f64,
    /// Wall time of the epoch in seconds (training and validation).
    pub seconds: f64,
    /// Training throughput, images per second.
    pub images_per_s: f64,
}

/// The ordered list of epoch records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// Records in epoch order.
    pub epochs: Vec<EpochRecord>,
}

const CSV_HEADER: [&str; 12] = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_balanced_acc",
    "frozen_layers",
    "lr_multiplier",
    "lr",
    "loss_scale",
    "seconds",
    "images_per_s",
];

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot flush {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        History::default()
    }

    /// Appends a record. Fails when its epoch is not after the last one.
    pub fn push(&mut self, record: EpochRecord) -> Result<()> {
        if let Some(last) = self.epochs.last()
            && record.epoch <= last.epoch
        {
            bail!("history: epoch {} recorded after epoch {}", record.epoch, last.epoch);
        }
        self.epochs.push(record);
        Ok(())
    }

    /// The record with the best validation accuracy (first on ties).
    pub fn best_val_acc(&self) -> Option<&EpochRecord> {
        self.epochs.iter().fold(None, |best: Option<&EpochRecord>, r| match best {
            Some(b) if b.val_acc >= r.val_acc || r.val_acc.is_nan() => Some(b),
            _ => Some(r),
        })
    }

    /// The history as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("history: cannot serialize to JSON")
    }

    /// The history as CSV with a header row (one row per epoch, columns as [`EpochRecord`]).
    pub fn to_csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(CSV_HEADER)?;
        for r in &self.epochs {
            w.write_record([
                r.epoch.to_string(),
                r.train_loss.to_string(),
                r.train_acc.to_string(),
                r.val_loss.to_string(),
                r.val_acc.to_string(),
                r.val_balanced_acc.to_string(),
                r.frozen_layers.to_string(),
                r.lr_multiplier.to_string(),
                r.lr.to_string(),
                r.loss_scale.to_string(),
                r.seconds.to_string(),
                r.images_per_s.to_string(),
            ])?;
        }
        let bytes = w.into_inner().context("history: cannot finish the CSV")?;
        String::from_utf8(bytes).context("history: CSV is not UTF-8")
    }

    /// Writes `history.json` and `history.csv` into `dir` (atomically each) and returns their paths.
    pub fn write_files(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
        let json = dir.join("history.json");
        let csv = dir.join("history.csv");
        write_atomic(&json, self.to_json()?.as_bytes())?;
        write_atomic(&csv, self.to_csv()?.as_bytes())?;
        Ok((json, csv))
    }

    /// Reads a `history.json` (to resume a run).
    pub fn load_json(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).with_context(|| format!("cannot read history {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("history {} is not a valid history file", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(epoch: usize, val_acc: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: 1.0 / (epoch as f64 + 1.0),
            train_acc: 0.5,
            val_loss: 0.9,
            val_acc,
            val_balanced_acc: val_acc / 2.0,
            frozen_layers: 7,
            lr_multiplier: 1.0,
            lr: 5e-5,
            loss_scale: 65536.0,
            seconds: 12.5,
            images_per_s: 800.25,
        }
    }

    #[test]
    fn push_order_and_best() {
        let mut h = History::new();
        h.push(record(0, 0.5)).unwrap();
        h.push(record(1, 0.7)).unwrap();
        h.push(record(2, 0.7)).unwrap();
        assert!(h.push(record(2, 0.9)).is_err());
        assert_eq!(h.best_val_acc().unwrap().epoch, 1);
    }

    #[test]
    fn files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::new();
        h.push(record(0, 0.5)).unwrap();
        h.push(record(1, 0.625)).unwrap();
        let (json, csv) = h.write_files(dir.path()).unwrap();
        assert_eq!(History::load_json(&json).unwrap(), h);
        let text = fs::read_to_string(csv).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER.join(","));
        assert_eq!(lines[2], "1,0.5,0.5,0.9,0.625,0.3125,7,1,0.00005,65536,12.5,800.25");
        // No temporary files left behind.
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let err = History::load_json(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
