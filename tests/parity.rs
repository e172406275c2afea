//! PyTorch parity on committed fixtures written by scripts/torch_reference.py (narrow EfficientNets with
//! weights fp16 represents exactly): eval logits, and in train mode the logits, the loss, every parameter's
//! gradient and every BN's running statistics after the step. Targets: ‖Δ‖/‖ref‖ ≤ 1e-4 for logits, 1e-3 for
//! each gradient.

use derma::backend::cuda::Precision;
use derma::cuda::Gpu;
use derma::io;
use derma::nn::{EfficientNet, HeadKind};
use derma::ops::loss::LossKind;
use derma::tensor::Tensor;
use derma::tools::forward::{self, Mode};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn load(dir: &Path, file: &str) -> HashMap<String, Tensor> {
    io::load_safetensors(&dir.join(file)).unwrap().0.into_entries().into_iter().collect()
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.to_f64_vec(), b.to_f64_vec());
    let d: f64 = x.iter().zip(&y).map(|(p, q)| (p - q) * (p - q)).sum::<f64>().sqrt();
    let n: f64 = x.iter().map(|p| p * p).sum::<f64>().sqrt();
    if n > 0.0 { d / n } else { d }
}

/// How one forward is computed: the CPU reference, or the CUDA backend on the emulated device.
#[derive(Clone, Copy, Debug)]
enum Path_ {
    Cpu,
    Emu(Precision),
}

fn forward_on(path: Path_, model: &mut EfficientNet<f32>, inputs: &[(String, Tensor)], mode: Mode) -> forward::Outputs {
    let kind = LossKind::Focal { gamma: 2.0 };
    match path {
        Path_::Cpu => forward::run(model, inputs, mode, &kind).unwrap(),
        Path_::Emu(p) => {
            let gpu = Arc::new(Gpu::emulated().unwrap());
            forward::run_device(model, inputs, mode, &kind, gpu, p).unwrap()
        }
    }
}

/// Relative-error bounds: eval logits; train logits and loss; each gradient (`None`: only checked finite);
/// each running statistic.
struct Tols {
    eval: f64,
    train_out: f64,
    grad: Option<f64>,
    running: f64,
}

const F32_TOLS: Tols = Tols { eval: 1e-4, train_out: 1e-4, grad: Some(1e-3), running: 1e-3 };

fn check_fixture(name: &str, weights: &str, head: HeadKind) {
    check_fixture_on(Path_::Cpu, name, weights, head, &F32_TOLS);
}

fn check_fixture_on(path: Path_, name: &str, weights: &str, head: HeadKind, tols: &Tols) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name);
    let ckpt = io::load_checkpoint(&dir.join(weights)).unwrap();
    let mut model = EfficientNet::<f32>::from_state_dict(&ckpt.state_dict).unwrap();
    assert_eq!(model.config.head, head);
    let inputs: Vec<(String, Tensor)> = load(&dir, "input.safetensors").into_iter().collect();

    let eval = forward_on(path, &mut model, &inputs, Mode::Eval);
    let expected = load(&dir, "expected_eval.safetensors");
    let e = rel(&expected["logits"], &eval[0].1);
    eprintln!("{name} {path:?} eval logits rel {e:.2e}");
    assert!(e <= tols.eval, "{path:?}: eval logits rel error {e}");

    let train = forward_on(path, &mut model, &inputs, Mode::Train);
    let got: HashMap<String, Tensor> = train.into_iter().collect();
    let expected = load(&dir, "expected_train.safetensors");
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    assert_eq!(got.len(), expected.len(), "derma wrote {} tensors, torch {}", got.len(), expected.len());
    let grad_scale = expected
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, t)| t.to_f64_vec().iter().map(|v| v * v).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    let mut worst = (0.0, String::new());
    for k in names {
        let (x, y) = (&expected[k], got.get(k).unwrap_or_else(|| panic!("derma did not write {k}")));
        let norm = x.to_f64_vec().iter().map(|v| v * v).sum::<f64>().sqrt();
        // Analytically zero gradients (BN shift invariance) hold rounding noise on both sides: measure them
        // against the largest gradient instead.
        let err =
            if k.starts_with("grad.") && norm < 1e-5 * grad_scale { rel(x, y) * norm / grad_scale } else { rel(x, y) };
        let tol = match k.as_str() {
            "logits" | "loss" => tols.train_out,
            _ if k.starts_with("grad.") => match tols.grad {
                Some(t) => t,
                None => {
                    assert!(y.to_f64_vec().iter().all(|v| v.is_finite()), "{name} {path:?}: {k} is not finite");
                    continue;
                }
            },
            _ => tols.running,
        };
        assert!(err <= tol, "{name} {path:?}: {k} rel error {err:.3e} > {tol:e}");
        if err > worst.0 {
            worst = (err, k.clone());
        }
    }
    eprintln!("{name} {path:?} train: worst rel error {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn parity_seed_checkpoint_narrow() {
    check_fixture("seed_narrow", "weights.pth", HeadKind::Seed);
}

#[test]
fn parity_torchvision_safetensors_narrow() {
    check_fixture("tv_narrow", "weights.safetensors", HeadKind::Torchvision);
}

// The same fixtures through the CUDA backend on the emulated device (what `derma forward --device emu` runs).
#[test]
fn parity_seed_checkpoint_narrow_emu_f32() {
    check_fixture_on(Path_::Emu(Precision::F32), "seed_narrow", "weights.pth", HeadKind::Seed, &F32_TOLS);
}

#[test]
fn parity_torchvision_safetensors_narrow_emu_f32() {
    check_fixture_on(Path_::Emu(Precision::F32), "tv_narrow", "weights.safetensors", HeadKind::Torchvision, &F32_TOLS);
}

/// f16 storage: eval logits measured 6.8e-4 off PyTorch, train logits 2.9e-2 and loss 8.6e-3 (batch-statistics BN
/// on this small batch amplifies f16 rounding), running statistics 6e-4. Gradients are ~30% off per tensor at this
/// batch (the same amplification through BN backward): checked finite only.
#[test]
fn parity_seed_checkpoint_narrow_emu_f16() {
    let tols = Tols { eval: 2e-3, train_out: 5e-2, grad: None, running: 2e-3 };
    check_fixture_on(Path_::Emu(Precision::F16), "seed_narrow", "weights.pth", HeadKind::Seed, &tols);
}
