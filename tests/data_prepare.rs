//! End to end: synthesize an ISIC-layout folder with faults, prepare it, check verification, split, cache reuse
//! and rebuilds; then the plain layout and the loader over the prepared cache.

use derma::data::loader::{ImageSource, Loader, LoaderConfig};
use derma::data::synth::{SynthOptions, synth};
use derma::data::{ISIC_CLASSES, PrepareOptions, prepare};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

fn opts(dir: &std::path::Path, size: u32) -> PrepareOptions {
    let mut o = PrepareOptions::new(dir);
    o.size = size;
    o.quiet = true;
    o
}

#[test]
fn prepare_synthetic_isic_with_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    let s = synth(&SynthOptions { out: dir.clone(), n: 60, seed: 3, faults: true, width: 64, height: 48 }).unwrap();
    assert_eq!(s.faults.iter().filter(|f| !f.usable).count(), 7);
    assert_eq!(s.rows, 60 + 12);

    let p = prepare(&opts(&dir, 32)).unwrap();
    let sum = &p.summary;
    assert_eq!(p.class_names, ISIC_CLASSES[..8].iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(sum.rows, s.rows);
    assert_eq!(sum.usable, s.expected_usable);
    assert_eq!(sum.usable, 60 + 5);
    assert_eq!(p.len(), sum.usable);
    let counts: Vec<usize> = sum.class_counts.0.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, s.class_counts);
    assert!(counts.iter().all(|&n| n >= 3), "{counts:?}");
    for (c, n) in counts.iter().enumerate() {
        assert_eq!(p.labels.iter().filter(|&&l| l == c).count(), *n);
    }

    // Every unusable fault row is excluded with its reason; every usable one is present.
    let expect_reason: HashMap<&str, &str> = [
        ("missing file", "missing file"),
        ("empty file", "empty file"),
        ("truncated JPEG", "truncated"),
        ("undecodable file", "undecodable"),
        ("two positive labels", "2 positive classes"),
        ("no positive label", "no positive class"),
        ("duplicate image id", "duplicate image id"),
    ]
    .into_iter()
    .collect();
    assert_eq!(sum.excluded.len(), 7, "{:#?}", sum.excluded);
    for f in &s.faults {
        if f.usable {
            assert!(p.images.contains(&f.image), "{} ({}) should load", f.image, f.kind);
        } else {
            let want = expect_reason[f.kind.as_str()];
            assert!(
                sum.excluded.iter().any(|e| e.image == f.image && e.reason.contains(want)),
                "{} ({}) not excluded with {want:?}: {:#?}",
                f.image,
                f.kind,
                sum.excluded
            );
        }
    }
    let ids: HashSet<&String> = p.images.iter().collect();
    assert_eq!(ids.len(), p.images.len(), "duplicate id kept twice");

    // The grayscale file decodes to grey RGB; every cached image has the right size.
    let gray = s.faults.iter().find(|f| f.kind == "grayscale JPEG").unwrap();
    let gi = p.images.iter().position(|i| *i == gray.image).unwrap();
    assert!(p.image(gi).chunks(3).all(|px| px[0] == px[1] && px[1] == px[2]));
    for i in 0..p.len() {
        assert_eq!(p.image(i).len(), 32 * 32 * 3);
    }

    // Split: a partition, stratified, no lesion on both sides.
    assert_eq!(p.train.len() + p.val.len(), p.len());
    assert_eq!((sum.train, sum.val), (p.train.len(), p.val.len()));
    let val: HashSet<usize> = p.val.iter().copied().collect();
    assert!(p.train.iter().all(|t| !val.contains(t)));
    let train_lesions: HashSet<&str> = p.train.iter().filter_map(|&i| p.lesion_ids[i].as_deref()).collect();
    for &v in &p.val {
        if let Some(l) = p.lesion_ids[v].as_deref() {
            assert!(!train_lesions.contains(l), "lesion {l} in both splits");
        }
    }
    let mut per_lesion: HashMap<&str, usize> = HashMap::new();
    for l in p.lesion_ids.iter().flatten() {
        *per_lesion.entry(l.as_str()).or_default() += 1;
    }
    assert!(per_lesion.values().any(|&n| n >= 2), "no lesion with several images");
    assert!(p.lesion_ids.iter().any(Option::is_none), "no image without lesion id");
    let frac = p.val.len() as f64 / p.len() as f64;
    assert!((0.1..0.3).contains(&frac), "val fraction {frac}");

    // Class weights n/(C·n_c) over the training split.
    let n = p.train.len() as f32;
    for c in 0..8 {
        let nc = p.train.iter().filter(|&&i| p.labels[i] == c).count() as f32;
        let want = if nc == 0.0 { 0.0 } else { n / (8.0 * nc) };
        assert!((p.class_weights[c] - want).abs() < 1e-5);
    }

    // Files in the cache folder.
    let cache = dir.join(".derma-cache-32");
    let split = std::fs::read_to_string(cache.join("split.csv")).unwrap();
    assert!(split.starts_with("image,label,lesion_id,split\n"));
    assert_eq!(split.lines().count(), p.len() + 1);
    let excluded = std::fs::read_to_string(cache.join("excluded.csv")).unwrap();
    assert_eq!(excluded.lines().count(), 8);

    // The JSON summary has the documented keys.
    let json: serde_json::Value = serde_json::from_str(&serde_json::to_string(sum).unwrap()).unwrap();
    for k in ["rows", "usable", "excluded", "class_counts", "train", "val", "class_weights", "cache", "decoded"] {
        assert!(json.get(k).is_some(), "missing {k}");
    }
    assert_eq!(json["class_counts"]["NV"], counts[1]);
    assert!(json["excluded"][0]["reason"].is_string());
    let candidates = sum.usable + 4; // rows past the label checks: usable + 4 file faults
    assert_eq!(sum.decoded, candidates);

    // Second run: nothing decoded, same result.
    let first_pixels = p.image(0).to_vec();
    let (train, val_split) = (p.train.clone(), p.val.clone());
    drop(p);
    let p2 = prepare(&opts(&dir, 32)).unwrap();
    assert_eq!(p2.summary.decoded, 0);
    assert_eq!(p2.summary.reused, candidates);
    assert_eq!((p2.train.clone(), p2.val.clone()), (train, val_split));
    assert_eq!(p2.image(0), &first_pixels[..]);

    // A changed file is decoded again (and only it).
    let img0 = dir.join("ISIC_2019_Training_Input").join(format!("{}.jpg", p2.images[0]));
    let other = dir.join("ISIC_2019_Training_Input").join(format!("{}.jpg", gray.image));
    drop(p2);
    std::fs::copy(&other, &img0).unwrap();
    let p3 = prepare(&opts(&dir, 32)).unwrap();
    assert_eq!(p3.summary.decoded, 1);
    assert_eq!(p3.image(0), p3.image(p3.images.iter().position(|i| *i == gray.image).unwrap()));
    drop(p3);

    // Another size in the same cache folder rebuilds everything.
    let mut o = opts(&dir, 24);
    o.cache = Some(cache.clone());
    let p4 = prepare(&o).unwrap();
    assert_eq!(p4.summary.decoded, candidates);
    assert_eq!(p4.size(), 24);
    assert_eq!(p4.image(3).len(), 24 * 24 * 3);

    // The loader reads the prepared cache.
    let p4 = Arc::new(p4);
    let train = p4.train.clone();
    let loader = Loader::new(p4.clone(), train, LoaderConfig::train(8, 20, 1)).unwrap();
    let batches: Vec<_> = loader.epoch(0).map(Result::unwrap).collect();
    assert_eq!(batches.len(), p4.train.len() / 8);
    for b in &batches {
        assert_eq!(b.images.len(), 8 * 20 * 20 * 3);
        assert!(b.images.iter().all(|v| v.is_finite() && v.abs() < 4.0));
        assert_eq!(b.labels, b.indices.iter().map(|&i| p4.label(i)).collect::<Vec<_>>());
    }
}

#[test]
fn prepare_plain_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let isic = tmp.path().join("isic");
    synth(&SynthOptions { out: isic.clone(), n: 16, seed: 1, faults: false, width: 40, height: 30 }).unwrap();
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(plain.join("images")).unwrap();
    let mut csv = String::from("image,label,lesion_id\n");
    for (k, e) in std::fs::read_dir(isic.join("ISIC_2019_Training_Input")).unwrap().enumerate() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        std::fs::copy(e.path(), plain.join("images").join(&name)).unwrap();
        let label = ["zebra", "apple", "mango"][k % 3];
        csv += &format!("{name},{label},{}\n", if k % 4 == 0 { String::new() } else { format!("L{}", k / 2) });
    }
    csv += "nothere.png,apple,\n";
    std::fs::write(plain.join("labels.csv"), csv).unwrap();
    let p = prepare(&opts(&plain, 16)).unwrap();
    assert_eq!(p.class_names, vec!["apple", "mango", "zebra"]);
    assert_eq!(p.summary.layout, "plain");
    assert_eq!(p.len(), 16);
    assert_eq!(p.summary.excluded.len(), 1);
    assert_eq!(p.summary.excluded[0].reason, "missing file");
}

#[test]
fn missing_label_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = prepare(&opts(tmp.path(), 16)).unwrap_err().to_string();
    assert!(err.contains("labels.csv") && err.contains("ISIC_2019_Training_GroundTruth.csv"), "{err}");
}

/// The synthetic classes are separable from a small downsampled view: a nearest-class-mean classifier on two
/// colours of a 16×16 image (the centre, where the lesion is, and the border, which is skin), fitted on the
/// training split, has a balanced accuracy far above chance (1/8) on validation.
#[test]
fn synthetic_classes_are_learnable_from_a_small_view() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("isic");
    synth(&SynthOptions { out: dir.clone(), n: 240, seed: 8, faults: false, width: 64, height: 48 }).unwrap();
    let p = prepare(&opts(&dir, 16)).unwrap();
    let dim = 6;
    let feature = |x: &[u8]| {
        let (mut f, mut n) = (vec![0f64; dim], [0f64; 2]);
        for (k, px) in x.chunks(3).enumerate() {
            let (y, xx) = (k / 16, k % 16);
            let part = if (6..10).contains(&y) && (6..10).contains(&xx) {
                0
            } else if y == 0 || y == 15 || xx == 0 || xx == 15 {
                1
            } else {
                continue;
            };
            n[part] += 1.0;
            for c in 0..3 {
                f[part * 3 + c] += f64::from(px[c]);
            }
        }
        for (k, v) in f.iter_mut().enumerate() {
            *v /= n[k / 3];
        }
        // Lesion colour relative to the skin around it.
        for c in 0..3 {
            f[3 + c] = f[c] - f[3 + c];
        }
        f
    };
    let mut means = vec![vec![0f64; dim]; 8];
    let mut counts = [0usize; 8];
    for &i in &p.train {
        counts[p.labels[i]] += 1;
        for (m, v) in means[p.labels[i]].iter_mut().zip(feature(p.image(i))) {
            *m += v;
        }
    }
    for (m, &n) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= n.max(1) as f64);
    }
    let (mut hit, mut seen) = ([0usize; 8], [0usize; 8]);
    for &i in &p.val {
        let x = feature(p.image(i));
        let dist = |m: &Vec<f64>| m.iter().zip(&x).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        let pred =
            (0..8).filter(|&c| counts[c] > 0).min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b]))).unwrap();
        seen[p.labels[i]] += 1;
        hit[p.labels[i]] += usize::from(pred == p.labels[i]);
    }
    let recalls: Vec<f64> = (0..8).filter(|&c| seen[c] > 0).map(|c| hit[c] as f64 / seen[c] as f64).collect();
    let balanced = recalls.iter().sum::<f64>() / recalls.len() as f64;
    println!("balanced accuracy {balanced:.3} over {} val images, recalls {recalls:?}", p.val.len());
    assert!(balanced > 0.8, "balanced accuracy {balanced}");
}
