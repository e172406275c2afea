//! Run folders: what marks a folder as holding a run, unique default names (`runs/run-<UTC time>`, created
//! atomically so two runs started together never share one), the `runs/latest` link, and `run.toml`, which
//! records where the run's data and decode cache are so `derma train --resume DIR` needs nothing else.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::history::write_atomic;

/// The file that records the run's data source.
pub const SOURCE_FILE: &str = "run.toml";

/// Files whose presence means a folder holds a run worth keeping: a checkpoint or a history. A folder with only a
/// config (a run that failed before its first save) may be reused.
const MARKERS: [&str; 4] = ["last.safetensors", "best.safetensors", "history.json", "history.csv"];

/// Everything a run writes (removed by [`clear`] before a run overwrites a folder).
const RUN_FILES: [&str; 12] = [
    "config.toml",
    "last.safetensors",
    "best.safetensors",
    "history.json",
    "history.csv",
    SOURCE_FILE,
    "accuracy.png",
    "loss.png",
    "unfreezing.png",
    "lr.png",
    "confusion_matrix.png",
    "f1_per_class.png",
];

/// Whether `dir` holds (part of) a run: a checkpoint or a history.
pub fn holds_run(dir: &Path) -> bool {
    MARKERS.iter().any(|f| dir.join(f).exists())
}

/// Refuses a folder that holds a run, unless `overwrite`, in which case the old run's files are removed (so no
/// stale checkpoint or history of the other run survives next to the new one).
pub fn claim(dir: &Path, overwrite: bool) -> Result<()> {
    if !holds_run(dir) {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "{} already holds a run (checkpoints or history): continue it with `derma train --resume {}`, \
             pick another --out, or pass --overwrite to replace it",
            dir.display(),
            dir.display()
        );
    }
    clear(dir)
}

/// Removes the files a run writes from `dir` (other files stay).
pub fn clear(dir: &Path) -> Result<()> {
    for f in RUN_FILES {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {} to overwrite the run", p.display())),
        }
    }
    Ok(())
}

/// `YYYYMMDD-HHMMSS-mmm` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar, in 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{:03}", rem / 3600, rem / 60 % 60, rem % 60, d.subsec_millis())
}

/// Creates a new, empty run folder `root/run-<UTC time>` (with `-2`, `-3`… when that name is taken) and returns
/// it. The folder is created with `create_dir`, which fails when it exists, so concurrent runs never share one.
pub fn create_unique(root: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let base = format!("run-{}", utc_stamp(SystemTime::now()));
    for n in 1..10_000 {
        let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        let dir = root.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create run folder {}", dir.display())),
        }
    }
    bail!("cannot find a free run folder name {base}-N in {}", root.display())
}

/// Points `root/latest` at `dir` (a relative symbolic link, replaced atomically by a rename). Where links are
/// not supported this does nothing.
pub fn point_latest(root: &Path, dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let name = dir.file_name().with_context(|| format!("{} has no folder name", dir.display()))?;
        let tmp = root.join(format!(".latest.tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).with_context(|| format!("cannot create link {}", tmp.display()))?;
        let latest = root.join("latest");
        if let Err(e) = std::fs::rename(&tmp, &latest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot update {}", latest.display()));
        }
    }
    #[cfg(not(unix))]
    let _ = (root, dir);
    Ok(())
}

/// Where a run's data comes from (`run.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSource {
    /// The dataset folder, canonical.
    pub data: PathBuf,
    /// The decode cache folder.
    pub cache: PathBuf,
}

impl RunSource {
    /// Writes `dir/run.toml` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).context("cannot serialize run.toml")?;
        write_atomic(&dir.join(SOURCE_FILE), text.as_bytes())
    }

    /// Reads `dir/run.toml`; `None` when the run has none (runs of older derma versions).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(SOURCE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let s = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"));
        s.map(Some).with_context(|| format!("invalid {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_times() {
        let at = |s: u64, ms: u64| utc_stamp(UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "19700101-000000-000");
        // 2000-02-29 (a leap day of a century leap year) 23:59:59.999.
        assert_eq!(at(951_868_799, 999), "20000229-235959-999");
        assert_eq!(at(1_709_251_200, 5), "20240301-000000-005");
        assert_eq!(at(4_102_444_800, 0), "21000101-000000-000");
    }

    #[test]
    fn concurrent_runs_get_distinct_folders_and_latest_follows_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runs");
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| create_unique(&root).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut names: Vec<_> = dirs.iter().map(|d| d.file_name().unwrap().to_owned()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 8, "{dirs:?}");
        for d in &dirs {
            assert!(d.is_dir() && d.starts_with(&root) && !holds_run(d));
        }
        point_latest(&root, &dirs[0]).unwrap();
        point_latest(&root, &dirs[3]).unwrap();
        std::fs::write(dirs[3].join("marker"), "x").unwrap();
        assert_eq!(std::fs::read_to_string(root.join("latest").join("marker")).unwrap(), "x");
        assert_eq!(std::fs::read_link(root.join("latest")).unwrap(), dirs[3].file_name().unwrap());
    }

    #[test]
    fn a_folder_holding_a_run_is_refused_unless_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        claim(dir, false).unwrap();
        std::fs::write(dir.join("history.json"), "{}").unwrap();
        std::fs::write(dir.join("best.safetensors"), "old").unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = format!("{:#}", claim(dir, false).unwrap_err());
        assert!(e.contains("already holds a run") && e.contains("--resume") && e.contains("--overwrite"), "{e}");
        assert!(dir.join("best.safetensors").exists());
        claim(dir, true).unwrap();
        assert!(!holds_run(dir) && !dir.join("best.safetensors").exists());
        assert!(dir.join("notes.txt").exists(), "files a run does not write are kept");
    }

    #[test]
    fn source_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(RunSource::load(tmp.path()).unwrap(), None);
        let s = RunSource { data: "/data/isic".into(), cache: "/data/isic/.derma-cache-224".into() };
        s.save(tmp.path()).unwrap();
        assert_eq!(RunSource::load(tmp.path()).unwrap(), Some(s));
        std::fs::write(tmp.path().join(SOURCE_FILE), "dta = 1\n").unwrap();
        let e = format!("{:#}", RunSource::load(tmp.path()).unwrap_err());
        assert!(e.contains("run.toml") && e.contains("dta"), "{e}");
    }
}
