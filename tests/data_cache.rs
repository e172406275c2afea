//! The decode cache as a user meets it, through the binary: one cache whatever the path spelling, a read-only
//! dataset folder used through its existing cache, a full disk refused before writing, and an interrupted
//! decode that keeps its work and resumes.

mod data_support;

use data_support::*;
use std::fs;
use std::path::Path;

fn decoded(o: &std::process::Output) -> (u64, u64) {
    assert!(o.status.success(), "{}", stderr(o));
    let j = json(o);
    (j["decoded"].as_u64().unwrap(), j["reused"].as_u64().unwrap())
}

#[test]
fn every_spelling_of_the_dataset_path_reuses_one_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth_isic(&root.join("base"), 24, 1);
    std::os::unix::fs::symlink("base", root.join("link")).unwrap();
    let abs = fs::canonicalize(root.join("base")).unwrap();
    let abs = abs.to_str().unwrap();
    let first = decoded(&derma(root, &["prepare", "--data", "base", "--size", "16", "--json"]));
    assert_eq!(first, (24, 0));
    for spelling in ["./base", abs, "base/", "base/../base", "link"] {
        let again = decoded(&derma(root, &["prepare", "--data", spelling, "--size", "16", "--json"]));
        assert_eq!(again, (0, 24), "--data {spelling} decoded again");
    }
    // An explicit --cache is shared the same way.
    let c = root.join("c");
    let c = c.to_str().unwrap();
    assert_eq!(decoded(&derma(root, &["prepare", "--data", "base", "--cache", c, "--size", "16", "--json"])), (24, 0));
    assert_eq!(decoded(&derma(root, &["prepare", "--data", abs, "--cache", c, "--size", "16", "--json"])), (0, 24));
}

#[test]
fn a_read_only_dataset_trains_and_evaluates_with_its_existing_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = root.join("base");
    synth_isic(&base, 40, 2);
    assert_eq!(decoded(&derma(root, &["prepare", "--data", "base", "--size", "32", "--json"])), (40, 0));
    let Some(ro) = read_only_view(&base, &root.join("ro")) else {
        println!(
            "SKIPPED: cannot make a read-only view of the dataset (no mount rights, and permission bits do not stop this user)"
        );
        return;
    };
    let ro_path = ro.path().to_str().unwrap().to_string();
    let before = fs::read(base.join(".derma-cache-32").join("manifest.json")).unwrap();

    let p = derma(root, &["prepare", "--data", &ro_path, "--size", "32", "--json"]);
    assert_eq!(decoded(&p), (0, 40));
    // Another split seed: the pixels serve, the lists in the read-only folder cannot be rewritten and it says so.
    let p = derma(root, &["prepare", "--data", &ro_path, "--size", "32", "--seed", "7", "--json"]);
    assert_eq!(decoded(&p), (0, 40));
    assert!(
        stderr(&p).contains("is read-only: split.csv and excluded.csv there describe an earlier run"),
        "{}",
        stderr(&p)
    );
    let t = derma(
        root,
        &[
            "train",
            "--data",
            &ro_path,
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            "run",
            "--quiet",
        ],
    );
    assert!(t.status.success(), "train on a read-only dataset: {}", stderr(&t));
    let e = derma(root, &["eval", "--checkpoint", "run/best.safetensors", "--data", &ro_path, "--json"]);
    assert!(e.status.success(), "eval on a read-only dataset: {}", stderr(&e));
    assert!(json(&e)["n"].as_u64().unwrap() > 0);
    assert_eq!(fs::read(base.join(".derma-cache-32").join("manifest.json")).unwrap(), before);

    // Without a cache at this size the read-only folder cannot hold one: the error says to pass --cache ...
    let no = derma(root, &["prepare", "--data", &ro_path, "--size", "24"]);
    assert_clean_failure(&no);
    assert!(stderr(&no).contains("--cache DIR"), "{}", stderr(&no));
    // ... and --cache works for every command that reads the dataset.
    let p = derma(root, &["prepare", "--data", &ro_path, "--size", "24", "--cache", "c24", "--json"]);
    assert_eq!(decoded(&p), (40, 0));
    let e = derma(root, &["eval", "--checkpoint", "run/best.safetensors", "--data", &ro_path, "--cache", "c32"]);
    assert!(e.status.success(), "eval --cache: {}", stderr(&e));
    assert!(root.join("c32").join("images.u8").is_file());
    let t = derma(
        root,
        &[
            "train",
            "--data",
            &ro_path,
            "--cache",
            "c32",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            "run2",
            "--quiet",
        ],
    );
    assert!(t.status.success(), "train --cache: {}", stderr(&t));
    assert_eq!(
        decoded(&derma(root, &["prepare", "--data", &ro_path, "--size", "32", "--cache", "c32", "--json"])),
        (0, 40)
    );
}

#[test]
fn a_cache_larger_than_the_free_space_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth_isic(&root.join("data"), 40, 3);
    let Some(disk) = tmpfs(&root.join("small"), "2m") else {
        println!("SKIPPED: cannot mount a 2 MiB tmpfs (needs root)");
        return;
    };
    let cache = disk.path.join("cache");
    let cache_s = cache.to_str().unwrap();
    // 40 images of 160x160x3 = 3.1 MB > 2 MiB.
    for args in [
        vec!["prepare", "--data", "data", "--size", "160", "--cache", cache_s],
        vec!["train", "--data", "data", "--image-size", "160", "--cache", cache_s, "--epochs", "1", "--out", "run"],
    ] {
        let o = derma(root, &args);
        assert_clean_failure(&o);
        let err = stderr(&o);
        assert!(err.contains("the cache needs 2.9 MiB (3076096 bytes: 40 images of 160x160x3 bytes)"), "{err}");
        assert!(err.contains("has 2.0 MiB (") && err.contains("bytes) free"), "{err}");
        assert!(files_under(&cache).is_empty(), "left behind: {:?}", files_under(&cache));
    }
    // A cache that fits is written there.
    assert_eq!(
        decoded(&derma(root, &["prepare", "--data", "data", "--size", "32", "--cache", cache_s, "--json"])),
        (40, 0)
    );
}

#[test]
fn image_sides_out_of_range_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth_isic(&root.join("data"), 8, 4);
    for (args, flag) in [
        (vec!["prepare", "--data", "data", "--size", "20000"], "--size 20000"),
        (vec!["prepare", "--data", "data", "--size", "8"], "--size 8"),
    ] {
        let o = derma(root, &args);
        assert_clean_failure(&o);
        assert!(stderr(&o).contains(&format!("{flag} is out of range")), "{}", stderr(&o));
    }
    assert!(!root.join("data").join(".derma-cache-20000").exists());
}

#[test]
fn an_interrupted_decode_keeps_its_work_and_the_next_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth_isic(&root.join("data"), 60, 5);
    let o = derma(root, &["prepare", "--data", "data", "--size", "24", "--stop-after-decodes", "10"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted while decoding") && err.contains("run the same command again"), "{err}");
    let cache = root.join("data").join(".derma-cache-24");
    let files = files_under(&cache);
    assert!(files.iter().all(|f| !f.ends_with(".tmp")), "{files:?}");
    assert!(cache.join("manifest.json").is_file());

    let (dec, reused) = decoded(&derma(root, &["prepare", "--data", "data", "--size", "24", "--json"]));
    assert_eq!(dec + reused, 60);
    assert!((10..60).contains(&reused), "kept {reused} of the interrupted run");
    // The resumed cache holds exactly what one uninterrupted build writes.
    assert_eq!(
        decoded(&derma(root, &["prepare", "--data", "data", "--size", "24", "--cache", "full", "--json"])),
        (60, 0)
    );
    let resumed = fs::read(cache.join("images.u8")).unwrap();
    let full = fs::read(root.join("full").join("images.u8")).unwrap();
    assert!(resumed == full, "resumed pixels differ from a fresh build");
    assert_eq!(decoded(&derma(root, &["prepare", "--data", "data", "--size", "24", "--json"])), (0, 60));
}

#[test]
fn an_edit_that_keeps_length_and_mtime_is_decoded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth_isic(&root.join("data"), 16, 6);
    assert_eq!(decoded(&derma(root, &["prepare", "--data", "data", "--size", "16", "--json"])), (16, 0));
    // Same length and modification time, different bytes at the end: the content fingerprint catches it.
    let dir = root.join("data").join("ISIC_2019_Training_Input");
    let mut files: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let victim: &Path = &files[0];
    let mtime = fs::metadata(victim).unwrap().modified().unwrap();
    let mut bytes = fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    fs::write(victim, &bytes).unwrap();
    fs::File::options().write(true).open(victim).unwrap().set_modified(mtime).unwrap();
    let o = derma(root, &["prepare", "--data", "data", "--size", "16", "--json"]);
    assert_eq!(decoded(&o), (1, 15));
}
