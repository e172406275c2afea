//! `derma train`, `derma eval` and `derma predict` through the built binary on a tiny synthetic dataset.

use derma::data::{self, PrepareOptions};
use derma::ops::loss::LossKind;
use derma::train::{checkpoint, trainer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn derma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_derma")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Rows of the split the trainer (and so `eval --split val`) uses, from the cache's split.csv.
fn val_count(data: &Path) -> usize {
    let text = std::fs::read_to_string(data.join(".derma-cache-32").join("split.csv")).unwrap();
    text.lines().skip(1).filter(|l| l.ends_with(",val")).count()
}

#[test]
fn train_then_eval_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let run = tmp.path().join("run");
    ok(derma(&["synth", "--out", s(&data), "--n", "96", "--size", "64x48"]), "synth");
    ok(
        derma(&[
            "train",
            "--data",
            s(&data),
            "--out",
            s(&run),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ]),
        "train",
    );
    let ckpt = run.join("best.safetensors");
    assert!(ckpt.is_file());

    // eval --json: the report's fields, the class names, and n = the validation split.
    let text = ok(derma(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data), "--json", "--device", "cpu"]), "eval");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    for key in
        ["accuracy", "balanced_accuracy", "per_class", "macro_avg", "weighted_avg", "confusion", "class_names", "split"]
    {
        assert!(v.get(key).is_some(), "eval --json lacks {key}: {text}");
    }
    let n = v["n"].as_u64().unwrap() as usize;
    assert_eq!(n, val_count(&data));
    assert!(n > 0);
    assert_eq!(v["split"], "val");
    let classes: Vec<String> = serde_json::from_value(v["class_names"].clone()).unwrap();
    assert_eq!(classes, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]);
    assert_eq!(v["per_class"].as_array().unwrap().len(), classes.len());
    let total: u64 = v["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, n);
    let acc = v["accuracy"].as_f64().unwrap();
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("history.json")).unwrap()).unwrap();
    assert_eq!(Some(acc), history["epochs"][0]["val_acc"].as_f64(), "eval accuracy vs the trainer's record");

    // eval as tables, on every image.
    let text =
        ok(derma(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data), "--split", "all", "--device", "cpu"]), "eval");
    for needle in ["balanced accuracy", "confusion matrix", "macro avg", "weighted avg", "roc-auc", "MEL"] {
        assert!(text.contains(needle), "eval output lacks {needle:?}:\n{text}");
    }

    // Two of the synthetic JPEGs.
    let mut jpegs: Vec<PathBuf> = std::fs::read_dir(data.join("ISIC_2019_Training_Input"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    jpegs.sort();
    let (a, b) = (s(&jpegs[0]), s(&jpegs[1]));

    let text = ok(derma(&["predict", "--checkpoint", s(&ckpt), "--json", "--top", "2", a, b]), "predict --json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    for (p, path) in arr.iter().zip([a, b]) {
        assert_eq!(p["image"], path);
        let probs = p["probabilities"].as_object().unwrap();
        assert_eq!(probs.keys().cloned().collect::<Vec<_>>().len(), 8);
        let sum: f64 = probs.values().map(|x| x.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "probabilities sum to {sum}");
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        let (p0, p1) = (top[0]["probability"].as_f64().unwrap(), top[1]["probability"].as_f64().unwrap());
        assert!(p0 >= p1);
        let max = probs.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(p0, max);
        assert_eq!(probs[top[0]["class"].as_str().unwrap()].as_f64().unwrap(), p0);
    }

    // The same probabilities as the library's evaluation of the cached images (same resize, normalization,
    // class order and eval-mode forward). A one-epoch model from random initialisation varies little between
    // images, so this mostly pins the class order and the softmax; the resize is shared code (square_resize).
    let mut loaded = checkpoint::load(&ckpt).unwrap();
    let prep =
        Arc::new(data::prepare(&PrepareOptions { size: 32, quiet: true, ..PrepareOptions::new(&data) }).unwrap());
    let all: Vec<usize> = (0..prep.len()).collect();
    let ev = trainer::evaluate(&mut loaded.model, &prep, &all, 8, 32, None, &LossKind::CrossEntropy).unwrap();
    let c = classes.len();
    for (p, path) in arr.iter().zip([&jpegs[0], &jpegs[1]]) {
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let i = prep.images.iter().position(|id| id == stem).unwrap();
        for (k, name) in classes.iter().enumerate() {
            let got = p["probabilities"][name].as_f64().unwrap();
            let want = ev.probs[i * c + k] as f64;
            assert!((got - want).abs() < 1e-6, "{stem} {name}: predict {got}, evaluate {want}");
        }
    }

    // The table.
    let text = ok(derma(&["predict", "--checkpoint", s(&ckpt), a]), "predict");
    assert!(text.contains("top-1") && text.contains(a), "{text}");

    // The ISIC 2019 submission file.
    let csv_path = tmp.path().join("sub.csv");
    ok(derma(&["predict", "--checkpoint", s(&ckpt), "--isic-csv", s(&csv_path), a, b]), "predict --isic-csv");
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2);
    for (row, path) in rows.iter().zip([&jpegs[0], &jpegs[1]]) {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 10, "{row}");
        assert_eq!(cells[0], path.file_stem().unwrap().to_str().unwrap());
        let p: Vec<f64> = cells[1..].iter().map(|c| c.parse().unwrap()).collect();
        assert!(p.iter().all(|&x| (0.0..=1.0).contains(&x)), "{row}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{row}");
        assert_eq!(cells[9], "0.0", "the model has no UNK class: {row}");
    }

    // A missing file: named in the error, the other image still predicted, non-zero exit.
    let missing = tmp.path().join("no_such_image.jpg");
    let out = derma(&["predict", "--checkpoint", s(&ckpt), "--json", a, s(&missing)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_image.jpg"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);

    // A file that is not an image.
    let junk = tmp.path().join("notes.jpg");
    std::fs::write(&junk, b"not an image").unwrap();
    let out = derma(&["predict", "--checkpoint", s(&ckpt), s(&junk)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes.jpg"));

    // Data whose classes differ from the checkpoint's.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(other.join("ISIC_2019_Training_Input")).unwrap();
    for p in &jpegs {
        std::fs::copy(p, other.join("ISIC_2019_Training_Input").join(p.file_name().unwrap())).unwrap();
    }
    let gt = std::fs::read_to_string(data.join("ISIC_2019_Training_GroundTruth.csv")).unwrap();
    std::fs::write(other.join("ISIC_2019_Training_GroundTruth.csv"), gt.replacen("MEL", "XYZ", 1)).unwrap();
    let out = derma(&["eval", "--checkpoint", s(&ckpt), "--data", s(&other), "--device", "cpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("XYZ") && stderr.contains("trained on classes"), "{stderr}");
}
