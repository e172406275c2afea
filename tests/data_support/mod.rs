//! Helpers shared by the data tests: running the binary, synthetic datasets, and file systems mounted for a test
//! (read-only views, tiny tmpfs disks) that unmount themselves.

#![allow(dead_code)]

use derma::data::synth::{SynthOptions, synth};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `derma ARGS` in `cwd` with two decoding threads.
pub fn derma(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_derma"))
        .args(args)
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("running the derma binary")
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout parsed as one JSON value.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {}\nstderr: {}", String::from_utf8_lossy(&o.stdout), stderr(o))
    })
}

/// Asserts the process ended by itself with a non-zero status and a message, not by a signal or an abort.
pub fn assert_clean_failure(o: &Output) {
    use std::os::unix::process::ExitStatusExt;
    let err = stderr(o);
    assert_eq!(o.status.signal(), None, "killed by a signal: {err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.lines().any(|l| l.starts_with("error: ")), "{err}");
    assert!(!err.contains("memory allocation") && !err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// A synthetic ISIC-layout dataset of `n` small images in `dir`.
pub fn synth_isic(dir: &Path, n: usize, seed: u64) {
    synth(&SynthOptions { out: dir.to_path_buf(), n, seed, faults: false, width: 48, height: 40 }).unwrap();
}

/// A file system mounted for one test; unmounted (lazily) on drop.
pub struct Mounted {
    pub path: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Option<Mounted> {
    std::fs::create_dir_all(at).ok()?;
    let ok = Command::new("mount").args(args).arg(at).stderr(std::process::Stdio::null()).status().ok()?.success();
    ok.then(|| Mounted { path: at.to_path_buf() })
}

/// A tmpfs of `size` (e.g. `2m`) at `at`; `None` without the privilege to mount.
pub fn tmpfs(at: &Path, size: &str) -> Option<Mounted> {
    mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], at)
}

/// A read-only view of `src` at `at`: a read-only bind mount where mounting is allowed (root), else the folder
/// itself with its write permissions removed when that really stops writes (not root). `None` when neither.
pub enum ReadOnly {
    Mount(Mounted),
    Chmod(PathBuf),
}

impl ReadOnly {
    pub fn path(&self) -> &Path {
        match self {
            ReadOnly::Mount(m) => &m.path,
            ReadOnly::Chmod(p) => p,
        }
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if let ReadOnly::Chmod(p) = self {
            let _ = Command::new("chmod").arg("-R").arg("u+w").arg(&*p).status();
        }
    }
}

pub fn read_only_view(src: &Path, at: &Path) -> Option<ReadOnly> {
    let src_s = src.to_str()?;
    if let Some(m) = mount(&["--bind", "-o", "ro", src_s], at) {
        // Older mount(8) ignore `ro` on the first bind: make sure the view is read-only.
        if std::fs::write(at.join(".probe"), b"x").is_err() {
            return Some(ReadOnly::Mount(m));
        }
        let _ = std::fs::remove_file(at.join(".probe"));
        drop(m);
    }
    Command::new("chmod").arg("-R").arg("a-w").arg(src).status().ok()?;
    let view = ReadOnly::Chmod(src.to_path_buf());
    if std::fs::write(src.join(".probe"), b"x").is_ok() {
        // Permission bits do not stop this user (root without mount rights).
        let _ = std::fs::remove_file(src.join(".probe"));
        return None;
    }
    Some(view)
}

/// Every file name under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
