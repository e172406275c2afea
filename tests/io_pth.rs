//! torch.save reading: fixtures written by PyTorch (scripts/make_pth_fixtures.py), hostile and damaged inputs.

use std::io::Read;
use std::path::{Path, PathBuf};

use derma::io::{Value, load_checkpoint, load_pth, load_pth_bytes, load_state_dict, unpickle};
use derma::tensor::{DType, Tensor};
use serde_json::Value as J;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io").join(name)
}

/// The file's tensors in order, without the weight loaders' refusal of non-finite values.
fn raw_state_dict(path: &Path) -> derma::io::StateDict {
    let value = load_pth(path).unwrap();
    let items = value.as_dict().unwrap();
    items.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_tensor().unwrap().clone())).collect()
}

fn expected() -> J {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn dtype_of(torch_name: &str) -> DType {
    match torch_name {
        "float32" => DType::F32,
        "float16" => DType::F16,
        "bfloat16" => DType::BF16,
        "float64" => DType::F64,
        "int64" => DType::I64,
        other => panic!("fixture dtype {other}"),
    }
}

/// Every element of `t` equals the value PyTorch reported (exactly; i64 compared as integers).
fn assert_tensor(name: &str, t: &Tensor, e: &J) {
    assert_eq!(t.dtype(), dtype_of(e["dtype"].as_str().unwrap()), "{name} dtype");
    let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(t.shape, shape, "{name} shape");
    let values = e["values"].as_array().unwrap();
    assert_eq!(t.numel(), values.len(), "{name} numel");
    if t.dtype() == DType::I64 {
        let got = t.to_i64_vec().unwrap();
        for (i, (g, w)) in got.iter().zip(values).enumerate() {
            assert_eq!(*g, w.as_i64().unwrap(), "{name}[{i}]");
        }
        return;
    }
    // Floats are compared by bit pattern (serde_json's default float parsing is not correctly rounded).
    let bits = e["f64_bits"].as_array().unwrap();
    for (i, (g, w)) in t.to_f64_vec().iter().zip(bits).enumerate() {
        let w = u64::from_str_radix(w.as_str().unwrap(), 16).unwrap();
        assert_eq!(g.to_bits(), w, "{name}[{i}]: got {g}, torch has {}", f64::from_bits(w));
    }
}

#[test]
fn state_dict_matches_torch_elementwise() {
    let e = expected();
    let want = e["state_dict"].as_array().unwrap();
    let value = load_pth(&fixture("state_dict.pth")).unwrap();
    let items = value.as_dict().unwrap();
    assert_eq!(items.len(), want.len());
    for ((k, v), w) in items.iter().zip(want) {
        let name = w["name"].as_str().unwrap();
        assert_eq!(k.as_str(), Some(name), "file order");
        assert_tensor(name, v.as_tensor().unwrap(), w);
    }
    // The fixture holds ±inf and NaN on purpose (their decoding is tested here), so the weight loaders refuse
    // it, naming the tensors.
    let err = format!("{:#}", load_state_dict(&fixture("state_dict.pth")).unwrap_err());
    assert!(err.contains("state_dict.pth") && err.contains("non-finite") && err.contains("`half.weight`"), "{err}");
    // The same through the state-dict conversion, which keeps names and order.
    let sd = raw_state_dict(&fixture("state_dict.pth"));
    let names: Vec<&str> = sd.names().collect();
    let want_names: Vec<&str> = want.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, want_names);
    for w in want {
        let name = w["name"].as_str().unwrap();
        assert_tensor(name, sd.get(name).unwrap(), w);
    }
}

#[test]
fn views_share_storage_and_decode_exactly() {
    let sd = raw_state_dict(&fixture("state_dict.pth"));
    // lin.weight = arange(24).reshape(4, 6) / 8 - 1; lin.weight_t is its transpose; lin.slice = [1:, ::2].
    let base: Vec<f32> = (0..24).map(|i| i as f32 / 8.0 - 1.0).collect();
    assert_eq!(sd.get("lin.weight").unwrap().to_f32_vec(), base);
    let t = sd.get("lin.weight_t").unwrap();
    assert_eq!(t.shape, vec![6, 4]);
    let tv = t.to_f32_vec();
    for r in 0..6 {
        for c in 0..4 {
            assert_eq!(tv[r * 4 + c], base[c * 6 + r]);
        }
    }
    let s = sd.get("lin.slice").unwrap().to_f32_vec();
    for r in 0..3 {
        for c in 0..3 {
            assert_eq!(s[r * 3 + c], base[(r + 1) * 6 + 2 * c]);
        }
    }
    // f16: 0.1 rounds to 0x2E66; 6e-8 is the smallest subnormal 2^-24; -0.0 keeps its sign.
    let h = sd.get("half.weight").unwrap().to_f64_vec();
    assert_eq!(h[0], half::f16::from_bits(0x2e66).to_f64());
    assert_eq!(h[1], -2.5);
    assert_eq!(h[2], 65504.0);
    assert_eq!(h[3], 2f64.powi(-24));
    assert!(h[4] == 0.0 && h[4].is_sign_negative());
    assert_eq!(h[5], f64::INFINITY);
    // bf16: 0.1 rounds to 0x3DCD.
    let b = sd.get("bf16.weight").unwrap();
    assert_eq!(b.to_f64_vec()[0], half::bf16::from_bits(0x3dcd).to_f64());
    assert_eq!(b.to_f64_vec()[3], 7.0);
    assert_eq!(sd.get("long.buf").unwrap().to_i64_vec().unwrap(), vec![1 << 40, -3, (1 << 62) + 1]);
    let nbt = sd.get("1.num_batches_tracked").unwrap();
    assert_eq!((nbt.shape.len(), nbt.dtype(), nbt.to_i64_vec().unwrap()), (0, DType::I64, vec![1]));
    assert_eq!(sd.get("expanded").unwrap().to_f32_vec(), vec![4.0, 4.0, 4.0, 5.0, 5.0, 5.0]);
    assert_eq!(sd.get("empty").unwrap().shape, vec![0, 3]);
}

#[test]
fn seed_checkpoint_strips_prefix_and_keeps_metadata() {
    let e = expected();
    let c = &e["checkpoint"];
    let ck = load_checkpoint(&fixture("checkpoint.pth")).unwrap();
    assert_eq!(ck.meta.epoch, Some(12));
    assert_eq!(ck.meta.val_acc, Some(83.25));
    assert_eq!(ck.meta.frozen_layers, Some(5));
    assert_eq!(ck.meta.config.as_ref().unwrap(), &c["config"]);
    let want = c["model_state_dict"].as_array().unwrap();
    assert_eq!(ck.state_dict.len(), want.len());
    for ((name, t), w) in ck.state_dict.iter().zip(want) {
        let full = w["name"].as_str().unwrap();
        assert_eq!(Some(name), full.strip_prefix("base_model."));
        assert_tensor(full, t, w);
    }

    // Optimizer state in torch's layout: state keyed by parameter index, then param_groups.
    let opt = ck.optimizer_state.as_ref().unwrap();
    let state = opt.get("state").unwrap().as_dict().unwrap();
    let want_state = c["optimizer_state"].as_object().unwrap();
    assert_eq!(state.len(), want_state.len());
    for (k, v) in state {
        let idx = k.as_int().unwrap();
        let w = want_state[&idx.to_string()].as_array().unwrap();
        let entries = v.as_dict().unwrap();
        assert_eq!(entries.len(), w.len());
        for ((ek, ev), ew) in entries.iter().zip(w) {
            assert_eq!(ek.as_str(), ew["name"].as_str());
            assert_tensor(ek.as_str().unwrap(), ev.as_tensor().unwrap(), ew);
        }
        assert_eq!(v.get("step").unwrap().as_f64(), Some(2.0));
    }
    let groups = opt.get("param_groups").unwrap();
    let Value::List(groups) = groups else { panic!("param_groups is a {}", groups.kind()) };
    let want_groups = c["param_groups"].as_array().unwrap();
    assert_eq!(groups.len(), want_groups.len());
    for (g, w) in groups.iter().zip(want_groups) {
        for (key, wv) in w.as_object().unwrap() {
            assert_eq!(&g.get(key).unwrap().to_json(), wv, "param_groups.{key}");
        }
    }
    assert!(matches!(groups[0].get("betas"), Some(Value::Tuple(b)) if b == &[Value::Float(0.9), Value::Float(0.999)]));
}

#[test]
fn numpy_scalars_in_metadata() {
    let e = expected();
    let ck = load_checkpoint(&fixture("numpy_scalar.pth")).unwrap();
    assert_eq!(ck.meta.epoch, e["numpy_scalar"]["epoch"].as_i64());
    assert_eq!(ck.meta.val_acc, e["numpy_scalar"]["val_acc"].as_f64());
    assert_eq!(ck.state_dict.len(), 7);
}

#[test]
fn legacy_format_is_refused_clearly() {
    let err = format!("{:#}", load_pth(&fixture("legacy.pth")).unwrap_err());
    assert!(err.contains("legacy") && err.contains("legacy.pth"), "{err}");
    let err = format!("{:#}", load_state_dict(&fixture("legacy.pth")).unwrap_err());
    assert!(err.contains("legacy"), "{err}");
}

#[test]
fn hostile_fixture_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let err = format!("{:#}", load_pth(&fixture("hostile.pth")).unwrap_err());
    // os.system pickles as posix.system on Linux (nt.system on Windows).
    assert!(err.contains("refusing global") && err.contains("system`"), "{err}");
    assert!(err.contains("hostile.pth"), "{err}");
    assert!(!cwd.join("hostile_marker.txt").exists());
    assert!(!dir.path().join("hostile_marker.txt").exists());
}

/// Hand-written protocol-2 opcodes.
fn global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

fn int_tuple(xs: &[u32]) -> Vec<u8> {
    let mut v = vec![b'('];
    for &x in xs {
        v.push(b'J');
        v.extend((x as i32).to_le_bytes());
    }
    v.push(b't');
    v
}

/// `_rebuild_tensor_v2(storage('0', FloatStorage, numel), offset, size, stride, False, OrderedDict())`.
fn tensor_pickle(numel: u32, offset: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(global("torch._utils", "_rebuild_tensor_v2"));
    p.push(b'(');
    p.push(b'(');
    p.extend(unicode("storage"));
    p.extend(global("torch", "FloatStorage"));
    p.extend(unicode("0"));
    p.extend(unicode("cpu"));
    p.push(b'J');
    p.extend((numel as i32).to_le_bytes());
    p.push(b't');
    p.push(b'Q');
    p.push(b'J');
    p.extend((offset as i32).to_le_bytes());
    p.extend(int_tuple(size));
    p.extend(int_tuple(stride));
    p.push(0x89);
    p.extend(global("collections", "OrderedDict"));
    p.extend(b")R");
    p.extend(b"tR.");
    p
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes()).collect()
}

#[test]
fn strided_views_from_hand_written_pickles() {
    let storage = floats(12);
    let read = |key: &str, n: usize| {
        assert_eq!(key, "0");
        Ok(storage[..n].to_vec())
    };
    // [2, 3] view at offset 1 with strides (5, 2): storage elements 1, 3, 5, 6, 8, 10.
    let v = unpickle(&tensor_pickle(12, 1, &[2, 3], &[5, 2]), read).unwrap();
    let t = v.as_tensor().unwrap();
    let idx = [1, 3, 5, 6, 8, 10];
    assert_eq!(t.shape, vec![2, 3]);
    assert_eq!(t.to_f32_vec(), idx.iter().map(|&i| i as f32 * 0.5 - 1.0).collect::<Vec<_>>());
    // Scalar at offset 11 (the last element).
    let v = unpickle(&tensor_pickle(12, 11, &[], &[]), read).unwrap();
    assert_eq!(v.as_tensor().unwrap().to_f32_vec(), vec![4.5]);
}

#[test]
fn out_of_range_views_are_errors() {
    let storage = floats(12);
    let read = |_: &str, n: usize| Ok(storage[..n].to_vec());
    for (offset, size, stride) in
        [(0, vec![13], vec![1]), (1, vec![12], vec![1]), (0, vec![3, 3], vec![4, 2]), (12, vec![], vec![])]
    {
        let err = format!("{:#}", unpickle(&tensor_pickle(12, offset, &size, &stride), read).unwrap_err());
        assert!(err.contains("storage holds 12 elements"), "{err}");
    }
    // A stride-0 view that would expand one storage into terabytes.
    let err = format!("{:#}", unpickle(&tensor_pickle(12, 0, &[1 << 20, 1 << 20], &[0, 0]), read).unwrap_err());
    assert!(err.contains("refusing to expand"), "{err}");
    // Rank mismatch between size and stride.
    let err = format!("{:#}", unpickle(&tensor_pickle(12, 0, &[3], &[1, 1]), read).unwrap_err());
    assert!(err.contains("differ in rank"), "{err}");
    // A storage shorter than the persistent id says.
    let short = |_: &str, _: usize| Ok(floats(3));
    let err = format!("{:#}", unpickle(&tensor_pickle(12, 0, &[3], &[1]), short).unwrap_err());
    assert!(err.contains("holds 12 bytes"), "{err}");
}

#[test]
fn hostile_hand_written_pickles_are_refused() {
    let none = |k: &str, _: usize| -> anyhow::Result<Vec<u8>> { panic!("storage {k} must not be read") };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        ([&b"\x80\x02"[..], &global("os", "system"), &unicode("touch pwned"), b"\x85R."].concat(), "`os.system`"),
        ([&b"\x80\x02"[..], &global("builtins", "eval"), &unicode("1"), b"\x85R."].concat(), "`builtins.eval`"),
        (
            [&b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00"[..], b"\x8c\x08builtins\x94\x8c\x04exec\x94\x93."]
                .concat(),
            "`builtins.exec`",
        ),
        ([&b"\x80\x02"[..], &global("torch.storage", "_load_from_bytes"), b"."].concat(), "_load_from_bytes"),
        ([&b"\x80\x02"[..], &global("torch", "load"), b"."].concat(), "`torch.load`"),
        // REDUCE on something that is not an allowed callable (a string).
        ([&b"\x80\x02"[..], &unicode("os.system"), b")R."].concat(), "not an allowed callable"),
        // Instance building opcodes.
        (b"\x80\x02(i__main__\nX\n.".to_vec(), "not allowed"),
    ];
    for (p, want) in cases {
        let err = format!("{:#}", unpickle(&p, none).unwrap_err());
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn exponential_sharing_is_refused() {
    // x = 1; 40 times: x = (x, x)  -> 2^40 leaves if copied naively.
    let mut p = b"\x80\x02K\x01q\x00".to_vec();
    for _ in 0..40 {
        p.extend(b"h\x00h\x00\x86q\x00");
    }
    p.push(b'.');
    let err = format!("{:#}", unpickle(&p, |_: &str, _: usize| Ok(vec![])).unwrap_err());
    assert!(err.contains("expands"), "{err}");
}

fn fixture_pickle() -> Vec<u8> {
    let bytes = std::fs::read(fixture("state_dict.pth")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = Vec::new();
    zip.by_name("state_dict/data.pkl").unwrap().read_to_end(&mut out).unwrap();
    out
}

fn fixture_storages() -> impl FnMut(&str, usize) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(fixture("state_dict.pth")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    move |key: &str, _n: usize| {
        let mut out = Vec::new();
        zip.by_name(&format!("state_dict/data/{key}"))?.read_to_end(&mut out)?;
        Ok(out)
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = std::fs::read(fixture("state_dict.pth")).unwrap();
    for n in 0..bytes.len() {
        assert!(load_pth_bytes(&bytes[..n]).is_err(), "zip truncated to {n} bytes loaded");
    }
    let pickle = fixture_pickle();
    let mut read = fixture_storages();
    assert!(unpickle(&pickle, &mut read).is_ok());
    for n in 0..pickle.len() {
        assert!(unpickle(&pickle[..n], &mut read).is_err(), "pickle truncated to {n} bytes loaded");
    }
}

#[test]
fn corrupted_pickles_never_panic() {
    let pickle = fixture_pickle();
    let mut read = fixture_storages();
    // A fixed-seed xorshift: flip one or two bytes at a time, thousands of times; any outcome but a panic is fine.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..3000 {
        let mut p = pickle.clone();
        for _ in 0..1 + next() % 2 {
            let i = (next() % p.len() as u64) as usize;
            p[i] = next() as u8;
        }
        let _ = unpickle(&p, &mut read);
    }
}

#[test]
fn non_weight_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.pth");
    std::fs::write(&path, b"hello, not weights").unwrap();
    let err = format!("{:#}", load_state_dict(&path).unwrap_err());
    assert!(err.contains("notes.pth") && err.contains("neither"), "{err}");
    let err = format!("{:#}", load_state_dict(&dir.path().join("absent.pth")).unwrap_err());
    assert!(err.contains("absent.pth"), "{err}");
}
