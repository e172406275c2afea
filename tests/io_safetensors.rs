//! safetensors read/write, format dispatch by content, metadata, and matching weights against a model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use derma::io::{
    CheckpointMeta, StateDict, check_keys, check_keys_with_dtype, load_checkpoint, load_safetensors, load_state_dict,
    save_safetensors, write_atomic,
};
use derma::tensor::{DType, Storage, Tensor};
use half::{bf16, f16};
use rand::{RngExt, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io").join(name)
}

fn random_state_dict(seed: u64) -> StateDict {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut sd = StateDict::new();
    let mut f = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-4.0..4.0)).collect() };
    sd.insert(
        "features.0.0.weight",
        Tensor::from_f32(&[4, 3, 3, 3], f(108).iter().map(|&x| x as f32).collect()).unwrap(),
    );
    sd.insert("features.0.1.num_batches_tracked", Tensor::from_i64(&[], vec![123_456_789_012]).unwrap());
    sd.insert("half", Tensor::new(&[5], Storage::F16(f(5).iter().map(|&x| f16::from_f64(x)).collect())).unwrap());
    sd.insert("brain", Tensor::new(&[3, 1], Storage::BF16(f(3).iter().map(|&x| bf16::from_f64(x)).collect())).unwrap());
    sd.insert("double", Tensor::new(&[2, 2], Storage::F64(f(4))).unwrap());
    sd.insert("ints", Tensor::from_i64(&[3], vec![i64::MIN, -1, i64::MAX]).unwrap());
    sd.insert("bytes", Tensor::new(&[4], Storage::U8(vec![0, 1, 254, 255])).unwrap());
    sd.insert("empty", Tensor::from_f32(&[0, 7], vec![]).unwrap());
    sd.insert("classifier.1.bias", Tensor::from_f32(&[3], f(3).iter().map(|&x| x as f32).collect()).unwrap());
    sd
}

#[test]
fn roundtrip_keeps_names_shapes_dtypes_values_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let sd = random_state_dict(7);
    let meta: HashMap<String, String> =
        [("format".to_string(), "pt".to_string()), ("note".into(), "é ünïcode".into())].into();
    save_safetensors(&path, &sd, Some(meta.clone())).unwrap();
    let (back, back_meta) = load_safetensors(&path).unwrap();
    assert_eq!(back_meta, meta);
    assert_eq!(back.len(), sd.len());
    for (name, t) in sd.iter() {
        // Storage equality is element-wise and exact (bit-exact for every float type here: no NaNs).
        assert_eq!(back.get(name), Some(t), "{name}");
    }
    // Only the file itself is left behind (the temporary was renamed).
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files, vec![std::ffi::OsString::from("w.safetensors")]);
    // Overwriting replaces the file.
    let sd2 = random_state_dict(8);
    save_safetensors(&path, &sd2, None).unwrap();
    let (back2, meta2) = load_safetensors(&path).unwrap();
    assert!(meta2.is_empty());
    assert_eq!(back2.get("half"), sd2.get("half"));
}

#[test]
fn reads_files_written_by_python_safetensors() {
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let (sd, meta) = load_safetensors(&fixture("reference.safetensors")).unwrap();
    assert_eq!(meta.get("source").map(String::as_str), Some("safetensors.torch"));
    let want = e["state_dict"].as_array().unwrap();
    assert_eq!(sd.len(), want.len());
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = sd.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        if let Some(bits) = w.get("f64_bits") {
            let got: Vec<u64> = t.to_f64_vec().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u64> = bits
                .as_array()
                .unwrap()
                .iter()
                .map(|b| u64::from_str_radix(b.as_str().unwrap(), 16).unwrap())
                .collect();
            assert_eq!(got, want, "{name}");
        } else {
            let want: Vec<i64> = w["values"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(t.to_i64_vec().unwrap(), want, "{name}");
        }
    }
    // The .pth and the safetensors copy of the same state dict load to the same tensors.
    // (Through the raw readers: the fixtures hold ±inf and NaN on purpose, which the weight loaders refuse.)
    let value = derma::io::load_pth(&fixture("state_dict.pth")).unwrap();
    let pth: StateDict = value
        .as_dict()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_tensor().unwrap().clone()))
        .collect();
    for (name, t) in pth.iter() {
        assert_eq!(sd.get(name), Some(t), "{name}");
    }
}

#[test]
fn format_is_chosen_by_content_not_extension() {
    let dir = tempfile::tempdir().unwrap();
    let zip_named_safetensors = dir.path().join("actually_a_zip.safetensors");
    std::fs::copy(fixture("checkpoint.pth"), &zip_named_safetensors).unwrap();
    let ck = load_checkpoint(&zip_named_safetensors).unwrap();
    assert_eq!(ck.meta.epoch, Some(12));
    assert!(ck.state_dict.contains("0.weight"));

    let st_named_pth = dir.path().join("actually_safetensors.pth");
    std::fs::copy(fixture("reference.safetensors"), &st_named_pth).unwrap();
    // Read as safetensors: all 17 tensors decoded, then refused for the fixture's deliberate ±inf and NaN.
    let err = format!("{:#}", load_state_dict(&st_named_pth).unwrap_err());
    assert!(err.contains("non-finite") && !err.contains("neither"), "{err}");
    let bytes = std::fs::read(&st_named_pth).unwrap();
    assert_eq!(derma::io::load_safetensors_bytes(&bytes).unwrap().0.len(), 17);
}

#[test]
fn checkpoint_metadata_roundtrips_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = load_checkpoint(&fixture("checkpoint.pth")).unwrap();
    let path = dir.path().join("best.safetensors");
    save_safetensors(&path, &ck.state_dict, Some(ck.meta.to_strings())).unwrap();
    let back = load_checkpoint(&path).unwrap();
    assert_eq!(back.meta.epoch, Some(12));
    assert_eq!(back.meta.val_acc, Some(83.25));
    assert_eq!(back.meta.frozen_layers, Some(5));
    assert_eq!(back.meta.config, ck.meta.config);
    assert_eq!(back.meta.strings, ck.meta.to_strings());
    for (name, t) in ck.state_dict.iter() {
        assert_eq!(back.state_dict.get(name), Some(t), "{name}");
    }
    // A malformed typed field is an error naming the key.
    let mut bad = CheckpointMeta::default().to_strings();
    bad.insert("epoch".into(), "twelve".into());
    save_safetensors(&path, &ck.state_dict, Some(bad)).unwrap();
    let err = format!("{:#}", load_checkpoint(&path).unwrap_err());
    assert!(err.contains("epoch") && err.contains("best.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors_is_an_error() {
    let sd = random_state_dict(3);
    let bytes = derma::io::safetensors_bytes(&sd, None).unwrap();
    assert!(derma::io::load_safetensors_bytes(&bytes).is_ok());
    for n in 0..bytes.len() {
        assert!(derma::io::load_checkpoint_bytes(&bytes[..n]).is_err(), "{n} bytes loaded");
    }
}

#[test]
fn check_keys_lists_every_problem_at_once() {
    let mut sd = StateDict::new();
    sd.insert("a.weight", Tensor::from_f32(&[2, 3], vec![0.0; 6]).unwrap());
    sd.insert("a.bias", Tensor::from_f32(&[2], vec![0.0; 2]).unwrap());
    sd.insert("bn.num_batches_tracked", Tensor::from_i64(&[], vec![0]).unwrap());
    sd.insert("extra.one", Tensor::from_f32(&[5], vec![0.0; 5]).unwrap());
    sd.insert("extra.two", Tensor::from_f32(&[1, 1], vec![0.0]).unwrap());

    let matching: Vec<(String, Vec<usize>)> =
        vec![("a.weight".into(), vec![2, 3]), ("a.bias".into(), vec![2]), ("bn.num_batches_tracked".into(), vec![])];
    let mut exact = matching.clone();
    exact.push(("extra.one".into(), vec![5]));
    exact.push(("extra.two".into(), vec![1, 1]));
    check_keys(&sd, &exact).unwrap();

    let expected: Vec<(String, Vec<usize>)> = vec![
        ("a.weight".into(), vec![3, 2]),
        ("a.bias".into(), vec![2]),
        ("bn.num_batches_tracked".into(), vec![]),
        ("b.weight".into(), vec![4, 4, 1, 1]),
        ("c.bias".into(), vec![9]),
    ];
    let err = check_keys(&sd, &expected).unwrap_err().to_string();
    assert!(err.contains("2 missing, 2 unexpected, 1 with the wrong shape"), "{err}");
    for line in [
        "missing: b.weight [4, 4, 1, 1]",
        "missing: c.bias [9]",
        "unexpected: extra.one [5]",
        "unexpected: extra.two [1, 1]",
        "wrong shape: a.weight: file [2, 3], model [3, 2]",
    ] {
        assert!(err.lines().any(|l| l.trim() == line), "{line:?} not in:\n{err}");
    }
    assert_eq!(err.lines().count(), 6, "{err}");

    let typed: Vec<(String, Vec<usize>, DType)> = exact
        .iter()
        .map(|(n, s)| (n.clone(), s.clone(), if n.ends_with("tracked") { DType::I64 } else { DType::F32 }))
        .collect();
    check_keys_with_dtype(&sd, &typed).unwrap();
    let mut wrong = typed.clone();
    wrong[1].2 = DType::F16;
    let err = check_keys_with_dtype(&sd, &wrong).unwrap_err().to_string();
    assert!(err.contains("wrong dtype: a.bias: file f32, model f16"), "{err}");
}

#[test]
fn state_dict_keeps_order_on_replace_and_remove() {
    let t = |v: f32| Tensor::from_f32(&[1], vec![v]).unwrap();
    let mut sd = StateDict::new();
    for (i, n) in ["c", "a", "b", "d"].iter().enumerate() {
        assert!(sd.insert(*n, t(i as f32)).is_none());
    }
    assert_eq!(sd.insert("a", t(9.0)), Some(t(1.0)));
    assert_eq!(sd.names().collect::<Vec<_>>(), ["c", "a", "b", "d"]);
    assert_eq!(sd.remove("a"), Some(t(9.0)));
    assert_eq!(sd.names().collect::<Vec<_>>(), ["c", "b", "d"]);
    assert_eq!(sd.get("d"), Some(&t(3.0)));
    assert_eq!(sd.get("b"), Some(&t(2.0)));
    assert!(!sd.contains("a") && sd.remove("a").is_none());
}

#[test]
fn write_atomic_leaves_old_file_when_target_dir_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.bin");
    write_atomic(&path, b"old").unwrap();
    write_atomic(&path, b"new contents").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
    let err = format!("{:#}", write_atomic(&dir.path().join("no/such/dir/x.bin"), b"x").unwrap_err());
    assert!(err.contains("cannot create"), "{err}");
}
