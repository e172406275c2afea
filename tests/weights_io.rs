//! Every command that takes weights reads every weight format, derma's own training checkpoints included;
//! weight files with NaN or infinite values are refused by every loader; damaged files get errors that say what
//! is wrong.

use derma::io::{self, StateDict, Value};
use derma::tensor::Tensor;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn derma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_derma")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// A `train --stop-after-steps` run: it stops as an interruption does, saving and exiting 130.
fn stopped(out: Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(derma::interrupt::EXIT_INTERRUPTED),
        "{what} failed ({}):\n{stderr}",
        out.status
    );
}

fn failed(out: Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should fail but succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io").join(name)
}

/// A tiny synthetic dataset and a real derma training checkpoint from one optimizer step on it (made once per
/// test binary): `(data, checkpoint)`.
fn trained() -> &'static (PathBuf, PathBuf) {
    static RUN: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("weights_io");
        let _ = std::fs::remove_dir_all(&root);
        let (data, run) = (root.join("data"), root.join("run"));
        ok(derma(&["synth", "--out", s(&data), "--n", "40", "--size", "48x40"]), "synth");
        stopped(derma(&train_args(&data, &run, None)), "train");
        let ckpt = run.join("last.safetensors");
        assert!(ckpt.is_file(), "the stopped run wrote no last.safetensors");
        (data, ckpt)
    })
}

fn train_args<'a>(data: &'a Path, out: &'a Path, pretrained: Option<&'a Path>) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--data",
        s(data),
        "--out",
        s(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--stop-after-steps",
        "1",
    ];
    if let Some(p) = pretrained {
        a.extend(["--pretrained", s(p)]);
    }
    a
}

fn jpegs(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("ISIC_2019_Training_Input"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_command_takes_a_derma_training_checkpoint() {
    let (data, ckpt) = trained();
    let tmp = tempfile::tempdir().unwrap();
    let (sd, _) = io::load_safetensors(ckpt).unwrap();
    let moments = sd.names().filter(|n| n.starts_with("optimizer.")).count();
    assert!(moments > 0, "the checkpoint holds no optimizer moments, so it would not test anything");

    // model export: only the model's tensors, equal to the checkpoint's.
    let exported = tmp.path().join("export.safetensors");
    ok(derma(&["model", "export", "--weights", s(ckpt), "--out", s(&exported)]), "model export");
    let (ex, _) = io::load_safetensors(&exported).unwrap();
    assert_eq!(ex.len() + moments, sd.len());
    for (name, t) in ex.iter() {
        assert_eq!(Some(t), sd.get(name), "{name} differs from the checkpoint");
    }

    // forward on the checkpoint and on its export: the same logits.
    let input = tmp.path().join("in.safetensors");
    let images: Vec<f32> = (0..2 * 3 * 32 * 32).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    let sd_in: StateDict =
        [("images".to_string(), Tensor::from_f32(&[2, 3, 32, 32], images).unwrap())].into_iter().collect();
    io::save_safetensors(&input, &sd_in, None).unwrap();
    let mut logits = Vec::new();
    for w in [ckpt.as_path(), exported.as_path()] {
        let out = tmp.path().join("out.safetensors");
        ok(
            derma(&["forward", "--weights", s(w), "--input", s(&input), "--output", s(&out), "--device", "cpu"]),
            "forward",
        );
        let (o, _) = io::load_safetensors(&out).unwrap();
        let l = o.get("logits").unwrap();
        assert_eq!(l.shape, vec![2, 8]);
        logits.push(l.to_f32_vec());
    }
    assert_eq!(logits[0], logits[1]);

    // predict and eval.
    let imgs = jpegs(data);
    let text = ok(derma(&["predict", "--checkpoint", s(ckpt), "--json", s(&imgs[0])]), "predict");
    assert!(text.contains("probabilities"), "{text}");
    let text = ok(
        derma(&["eval", "--checkpoint", s(ckpt), "--data", s(data), "--split", "all", "--json", "--device", "cpu"]),
        "eval",
    );
    assert!(text.contains("balanced_accuracy"), "{text}");

    // train --pretrained: the checkpoint's backbone.
    let run = tmp.path().join("run2");
    stopped(derma(&train_args(data, &run, Some(ckpt))), "train --pretrained <derma checkpoint>");
}

/// `bytes` as a zip with `entry`'s content replaced by `f(content)` (other entries copied, stored uncompressed as
/// torch.save writes them).
fn rewrite_zip(bytes: &[u8], f: impl Fn(&str, Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut zout = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        zout.start_file(name.as_str(), opts).unwrap();
        zout.write_all(&f(&name, content)).unwrap();
    }
    zout.finish().unwrap().into_inner()
}

/// Puts NaN, +inf and NaN into the first three f32 values of every storage of a torch.save file.
fn poison_pth(bytes: &[u8]) -> Vec<u8> {
    rewrite_zip(bytes, |name, mut content| {
        if name.contains("/data/") && !name.ends_with(".pkl") && content.len() >= 12 {
            content[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
            content[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            content[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        content
    })
}

fn assert_names_non_finite(err: &str, file: &str) {
    assert!(err.contains(file), "the error does not name the file {file}: {err}");
    assert!(err.contains("non-finite"), "the error does not say what is wrong: {err}");
}

#[test]
fn non_finite_weights_are_refused_by_every_loader() {
    let tmp = tempfile::tempdir().unwrap();

    // The seed's checkpoints (.pth): the rewritten copies still load when nothing is poisoned, so the refusal
    // below is the values' doing. (state_dict.pth, a plain state dict, holds ±inf on purpose already.)
    let parity_seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/seed_narrow/weights.pth");
    for (path, clean) in [(fixture("checkpoint.pth"), true), (parity_seed, true), (fixture("state_dict.pth"), false)] {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let bytes = std::fs::read(&path).unwrap();
        let same = tmp.path().join(format!("same-{name}"));
        std::fs::write(&same, rewrite_zip(&bytes, |_, c| c)).unwrap();
        assert_eq!(io::load_checkpoint(&same).is_ok(), clean, "{name}");
        let bad = tmp.path().join(format!("nan-{name}"));
        std::fs::write(&bad, poison_pth(&bytes)).unwrap();
        let err = format!("{:#}", io::load_checkpoint(&bad).unwrap_err());
        assert_names_non_finite(&err, s(&bad));
        assert!(err.contains("NaN"), "{err}");
    }

    // safetensors: one tensor with one NaN.
    let (mut sd, meta) = io::load_safetensors(&fixture("reference.safetensors")).unwrap();
    let name = sd.iter().find(|(_, t)| t.dtype() == derma::tensor::DType::F32).unwrap().0.to_string();
    let t = sd.get(&name).unwrap();
    let mut v = t.to_f32_vec();
    let last = v.len() - 1;
    v[last] = f32::NAN;
    let shape = t.shape.clone();
    sd.insert(name.clone(), Tensor::from_f32(&shape, v).unwrap());
    let bad = tmp.path().join("nan.safetensors");
    io::save_safetensors(&bad, &sd, Some(meta)).unwrap();
    let err = format!("{:#}", io::load_checkpoint(&bad).unwrap_err());
    assert_names_non_finite(&err, s(&bad));
    assert!(err.contains(&format!("`{name}`")) && err.contains("1 NaN"), "{err}");

    // A derma checkpoint with an infinite weight: refused by the checkpoint loader and by every command.
    let (_, ckpt) = trained();
    let (mut sd, meta) = io::load_safetensors(ckpt).unwrap();
    let key = "features.0.0.weight";
    let t = sd.get(key).unwrap();
    let mut v = t.to_f32_vec();
    v[5] = f32::NEG_INFINITY;
    v[9] = f32::NAN;
    let shape = t.shape.clone();
    sd.insert(key, Tensor::from_f32(&shape, v).unwrap());
    let bad = tmp.path().join("inf-checkpoint.safetensors");
    io::save_safetensors(&bad, &sd, Some(meta)).unwrap();
    let err = format!("{:#}", derma::train::checkpoint::load(&bad).err().unwrap());
    assert_names_non_finite(&err, s(&bad));
    assert!(err.contains(key) && err.contains("2 of 864"), "{err}");

    let (data, _) = trained();
    let img = jpegs(data).remove(0);
    let out_file = tmp.path().join("x.safetensors");
    let run = tmp.path().join("run");
    let input = tmp.path().join("in.safetensors");
    let sd_in: StateDict = [("images".to_string(), Tensor::from_f32(&[1, 3, 32, 32], vec![0.5; 3 * 32 * 32]).unwrap())]
        .into_iter()
        .collect();
    io::save_safetensors(&input, &sd_in, None).unwrap();
    for (what, args) in [
        ("predict", vec!["predict", "--checkpoint", s(&bad), s(&img)]),
        ("eval", vec!["eval", "--checkpoint", s(&bad), "--data", s(data), "--device", "cpu"]),
        ("forward", vec!["forward", "--weights", s(&bad), "--input", s(&input), "--output", s(&out_file)]),
        ("model export", vec!["model", "export", "--weights", s(&bad), "--out", s(&out_file)]),
        ("train --pretrained", train_args(data, &run, Some(&bad))),
    ] {
        let err = failed(derma(&args), what);
        assert_names_non_finite(&err, s(&bad));
        assert!(err.contains(key), "{what}: {err}");
    }
    assert!(!out_file.exists(), "a refused file must not produce output");
}

#[test]
fn safetensors_header_longer_than_the_file_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("reference.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap());
    // Truncated inside the header, and a header length field that claims more than the file holds.
    let mut claims_more = good.clone();
    claims_more[..8].copy_from_slice(&(good.len() as u64 * 3).to_le_bytes());
    for (name, bytes) in
        [("cut.safetensors", good[..(8 + header_len as usize / 2)].to_vec()), ("long.safetensors", claims_more)]
    {
        let path = tmp.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let claimed = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        for err in [
            format!("{:#}", io::load_checkpoint(&path).unwrap_err()),
            format!("{:#}", io::load_safetensors(&path).unwrap_err()),
        ] {
            assert!(err.contains(name), "{err}");
            assert!(err.contains("header"), "{err}");
            assert!(err.contains(&claimed.to_string()) && err.contains(&bytes.len().to_string()), "{err}");
            assert!(!err.contains("neither"), "{err}");
        }
    }
    // Cut inside the tensor data: says how much is missing.
    let path = tmp.path().join("short-data.safetensors");
    std::fs::write(&path, &good[..good.len() - 10]).unwrap();
    let err = format!("{:#}", io::load_checkpoint(&path).unwrap_err());
    assert!(err.contains("short-data.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn predict_reports_each_unusable_image_once() {
    let (data, ckpt) = trained();
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk-image.jpg");
    std::fs::write(&junk, b"not an image").unwrap();
    let good = jpegs(data).remove(0);
    let err = failed(derma(&["predict", "--checkpoint", s(ckpt), s(&good), s(&junk)]), "predict");
    assert_eq!(err.matches("junk-image.jpg").count(), 1, "{err}");
    assert!(err.contains("1 of 2 images"), "{err}");
}

#[test]
fn a_checkpoint_value_with_non_finite_weights_is_refused() {
    // The seed's checkpoint layout as decoded from a .pth, built directly.
    let t = Tensor::from_f32(&[3], vec![1.0, f32::INFINITY, 2.0]).unwrap();
    let v = Value::Dict(vec![
        (Value::Str("epoch".into()), Value::Int(3)),
        (
            Value::Str("model_state_dict".into()),
            Value::Dict(vec![(Value::Str("base_model.features.0.1.bias".into()), Value::Tensor(t))]),
        ),
    ]);
    let err = format!("{:#}", io::checkpoint_from_value(v).unwrap_err());
    assert!(err.contains("features.0.1.bias") && err.contains("1 of 3") && err.contains("1 infinite"), "{err}");
    // A plain state dict, f16 and f64.
    let h = Tensor::new(&[2], derma::tensor::Storage::F16(vec![half::f16::NAN, half::f16::ONE])).unwrap();
    let d = Tensor::new(&[1], derma::tensor::Storage::F64(vec![f64::NEG_INFINITY])).unwrap();
    let v = Value::Dict(vec![(Value::Str("a".into()), Value::Tensor(h)), (Value::Str("b".into()), Value::Tensor(d))]);
    let err = format!("{:#}", io::checkpoint_from_value(v).unwrap_err());
    assert!(
        err.contains("2 tensors") && err.contains("`a`: 1 of 2 values (1 NaN") && err.contains("`b`: 1 of 1"),
        "{err}"
    );
}
