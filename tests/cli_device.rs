//! `derma plan`, `derma forward`, `train`, `eval`, `predict` and `bench train` on the emulated device through the
//! binary.

use std::path::Path;
use std::process::{Command, Output};

fn derma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_derma")).args(args).output().unwrap()
}

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let out = derma(&all);
    assert!(out.status.success(), "derma plan failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn plan_reports_bytes_and_the_arena() {
    let full = plan_json(&["--batch", "4", "--size", "64", "--stage", "0", "--precision", "f32"]);
    let head = plan_json(&["--batch", "4", "--size", "64", "--stage", "9", "--precision", "f32"]);
    let half = plan_json(&["--batch", "4", "--size", "64", "--stage", "0", "--precision", "f16"]);
    let r = &full["report"];
    let num = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert!(num(r, "arena_bytes") < num(r, "naive_bytes"));
    assert_eq!(num(r, "moved_bytes"), num(r, "read_bytes") + num(r, "written_bytes"));
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len() as u64, num(r, "step_count"));
    for name in ["zero gradients", "depthwise", "bn 0 stats", "softmax loss", "conv 3x3 s2 forward (cuDNN)"] {
        assert!(steps.iter().any(|s| s["name"].as_str().unwrap().contains(name)), "no step named like {name:?}");
    }
    // Freezing the backbone drops its backward and its saved activations; f16 storage moves fewer bytes.
    assert!(num(&head["report"], "step_count") < num(r, "step_count") / 2);
    assert!(num(&head["report"], "arena_bytes") < num(r, "arena_bytes"));
    assert!(num(&half["report"], "moved_bytes") < num(r, "moved_bytes"));
    let per = full["per_image"]["moved_bytes"].as_f64().unwrap();
    assert!((per * 4.0 - num(r, "moved_bytes") as f64).abs() < 1.0);

    let out = derma(&["plan", "--stage", "10"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stage 10 is out of range"));
    let out = derma(&["plan", "--batch", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 images"));
}

#[test]
fn forward_on_the_emulated_device_matches_the_cpu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/seed_narrow");
    let tmp = tempfile::tempdir().unwrap();
    let (weights, input) = (dir.join("weights.pth"), dir.join("input.safetensors"));
    let run = |device: &str, mode: &str| {
        let out_path = tmp.path().join(format!("{device}-{mode}.safetensors"));
        let out = derma(&[
            "forward",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
            "--mode",
            mode,
            "--device",
            device,
        ]);
        assert!(out.status.success(), "forward --device {device}: {}", String::from_utf8_lossy(&out.stderr));
        derma::io::load_safetensors(&out_path).unwrap().0.into_entries()
    };
    for mode in ["eval", "train"] {
        let (cpu, emu) = (run("cpu", mode), run("emu", mode));
        assert_eq!(cpu.len(), emu.len(), "{mode}: same outputs");
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let grad_scale =
            cpu.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, t)| norm(&t.to_f64_vec())).fold(0.0, f64::max);
        for ((kc, tc), (ke, te)) in cpu.iter().zip(&emu) {
            assert_eq!((kc, &tc.shape), (ke, &te.shape));
            let (a, b) = (tc.to_f64_vec(), te.to_f64_vec());
            let d = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            let n = norm(&a);
            // BN-shift-invariant gradients are zero up to rounding on both sides: judged against the largest.
            let tol = 2e-3 * if kc.starts_with("grad.") && n < 1e-5 * grad_scale { grad_scale } else { n };
            assert!(d <= tol, "{mode} {kc}: |cpu - emu| {d:.3e} for |cpu| {n:.3e}");
        }
    }
    let out =
        derma(&["forward", "--weights", "x", "--input", "y", "--output", "z", "--precision", "f16", "--device", "cpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--precision f16 needs a CUDA device"));
}

#[test]
fn train_and_bench_train_run_on_the_emulated_device() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let synth = derma(&["synth", "--out", &s(&data), "--n", "32"]);
    assert!(synth.status.success(), "derma synth failed: {}", String::from_utf8_lossy(&synth.stderr));
    let args = [
        "train",
        "--device",
        "emu",
        "--precision",
        "f16",
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--workers",
        "1",
        // The batches streamed from the host through the double buffer (f16 here; resident f16 and streamed f32
        // are in tests/train_device.rs).
        "--stream-data",
        "--quiet",
    ];
    let run = derma(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "derma train --device emu failed: {err}");
    // f16, random initialisation, frozen blocks in frozen-eval mode (the defaults): the trainer says what to expect.
    assert!(err.contains("can pass f16's largest value") && err.contains("--frozen-bn torch"), "no f16 warning: {err}");
    for f in ["last.safetensors", "best.safetensors", "history.json", "config.toml"] {
        assert!(out.join(f).exists(), "no {f} after derma train --device emu:\n{err}");
    }
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    assert_eq!(history["epochs"].as_array().map(|e| e.len()), Some(1), "{history}");

    // eval and predict on the device agree with the CPU.
    let ckpt = s(&out.join("last.safetensors"));
    let eval = |device: &str| -> serde_json::Value {
        let o = derma(&[
            "eval",
            "--checkpoint",
            &ckpt,
            "--data",
            &s(&data),
            "--device",
            device,
            "--split",
            "all",
            "--json",
        ]);
        assert!(o.status.success(), "derma eval --device {device} failed: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (ec, ee) = (eval("cpu"), eval("emu"));
    let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
    assert!((loss(&ec) - loss(&ee)).abs() <= 1e-4 * loss(&ec).abs().max(1.0), "eval loss: cpu {ec} vs emu {ee}");
    assert_eq!(ec["accuracy"], ee["accuracy"], "eval accuracy on the CPU and on the device");
    let images: Vec<String> =
        walk(&data).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jpg")).take(3).map(|p| s(&p)).collect();
    assert!(!images.is_empty(), "the synthetic folder has no JPEG");
    let predict = |device: &str| -> serde_json::Value {
        let mut args =
            vec!["predict", "--checkpoint", ckpt.as_str(), "--device", device, "--json", "--batch-size", "2"];
        args.extend(images.iter().map(String::as_str));
        let o = derma(&args);
        assert!(o.status.success(), "derma predict --device {device} failed: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (pc, pe) = (predict("cpu"), predict("emu"));
    let rows = |v: &serde_json::Value| v.as_array().unwrap().clone();
    assert_eq!(rows(&pc).len(), images.len());
    for (rc, re) in rows(&pc).iter().zip(rows(&pe)) {
        let (a, b) = (rc["probabilities"].as_object().unwrap(), re["probabilities"].as_object().unwrap());
        for (class, p) in a {
            let d = (p.as_f64().unwrap() - b[class].as_f64().unwrap()).abs();
            assert!(d <= 1e-4, "predict {class}: cpu {p} vs emu {}", b[class]);
        }
    }

    let bench =
        derma(&["bench", "train", "--device", "emu", "--batch", "2", "--size", "64", "--steps", "1", "--windows", "2"]);
    let text = String::from_utf8_lossy(&bench.stdout);
    assert!(bench.status.success(), "derma bench train failed: {}", String::from_utf8_lossy(&bench.stderr));
    for want in ["images/s", "floor:", "phases of one synchronised eager step", "peak device memory", "data resident"] {
        assert!(text.contains(want), "derma bench train printed no {want:?}:\n{text}");
    }
    let json = derma(&[
        "bench",
        "train",
        "--device",
        "emu",
        "--batch",
        "2",
        "--size",
        "64",
        "--steps",
        "1",
        "--windows",
        "1",
        "--stream-data",
        "--json",
    ]);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let j: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    for k in ["images_per_s", "ms_per_step", "floor_images_per_s", "peak_device_bytes", "bytes_per_step"] {
        assert!(j[k].as_f64().is_some_and(|v| v > 0.0), "bench train JSON has no positive {k}: {j}");
    }
    assert_eq!(j["streamed_data"], true, "bench train --stream-data streams: {j}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out.sort();
    out
}

/// `derma bench data` on the emulated device: the kernel's rate and the training loader's, resident and streamed,
/// all measured and positive; the CPU is refused with the devices it takes.
#[test]
fn bench_data_reports_the_kernel_and_the_loader_resident_and_streamed() {
    let args = ["bench", "data", "--device", "emu", "--batch", "3", "--size", "40", "--out", "24", "--steps", "2"];
    let text = derma(&args);
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(text.status.success(), "derma bench data failed: {}", String::from_utf8_lossy(&text.stderr));
    for want in ["images/s", "bytes per image", "training loader, 2 batches: resident", "streamed from the host"] {
        assert!(out.contains(want), "derma bench data printed no {want:?}:\n{out}");
    }
    let mut json_args = args.to_vec();
    json_args.extend(["--dtype", "f32", "--json"]);
    let json = derma(&json_args);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let j: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!((j["batch"].as_u64(), j["size"].as_u64(), j["out"].as_u64()), (Some(3), Some(40), Some(24)), "{j}");
    // u8 source + f32 output + the parameters of one image.
    let params = j["bytes_per_image"].as_u64().unwrap() - 40 * 40 * 3 - 24 * 24 * 3 * 4;
    assert!((16..=256).contains(&params), "bytes per image {j}");
    for k in ["images_per_s", "loader_resident_images_per_s", "loader_streamed_images_per_s", "streamed_over_resident"]
    {
        assert!(j[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "bench data JSON has no positive {k}: {j}");
    }
    let cpu = derma(&["bench", "data", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&cpu.stderr);
    assert!(!cpu.status.success() && err.contains("--device cuda"), "{err}");
}
