//! `derma forward`: one forward (and in train mode one backward) of a model on given inputs, written out for
//! comparison with PyTorch or with another backend.
//!
//! Contract:
//! - input file: `images` f32 `[N,3,H,W]` (NCHW, normalized), optional `targets` i64 `[N]`, optional `alpha`
//!   f32 `[C]` (class weights for the loss);
//! - eval mode writes `logits` f32 `[N,C]`;
//! - train mode runs with batch-statistics BN, no dropout, no stochastic depth, and writes `logits`, `loss` (f32
//!   scalar), `grad.<name>` for every parameter (PyTorch layout) and `running.<name>` for every BN
//!   `running_mean`/`running_var` after the step. No optimizer step. Names carry no `base_model.` prefix.

use crate::autograd::Tape;
use crate::nn::{Ctx, EfficientNet, efficientnet::to_torch};
use crate::ops::loss::{self, LossKind};
use crate::tensor::{Array, Tensor, nchw_to_nhwc};
use anyhow::{Context, Result, bail};
use rand::SeedableRng;

/// Eval (running statistics) or train (batch statistics and a backward pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Eval,
    Train,
}

/// The outputs, in the order they are written.
pub type Outputs = Vec<(String, Tensor)>;

fn find<'a>(inputs: &'a [(String, Tensor)], name: &str) -> Option<&'a Tensor> {
    inputs.iter().find(|(k, _)| k == name).map(|(_, t)| t)
}

/// `(name, count)` of every input holding NaN or infinite values. They are computed with (NaN propagates
/// as in PyTorch), but a caller should say so: such outputs are rarely what was meant.
pub fn non_finite_inputs(inputs: &[(String, Tensor)]) -> Vec<(String, usize)> {
    inputs
        .iter()
        .map(|(n, t)| (n.clone(), t.to_f64_vec().iter().filter(|v| !v.is_finite()).count()))
        .filter(|(_, k)| *k > 0)
        .collect()
}

/// Reads `images` as NHWC f32 and checks its shape.
pub fn images_nhwc(inputs: &[(String, Tensor)]) -> Result<Array<f32>> {
    let t = find(inputs, "images").context("the input file has no `images` tensor (f32 [N,3,H,W], NCHW)")?;
    if t.shape.len() != 4 || t.shape[1] != 3 {
        bail!("`images` must be [N,3,H,W] (NCHW), got {:?}", t.shape);
    }
    let (n, c, h, w) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
    let data = nchw_to_nhwc(&t.to_f32_vec(), n, c, h, w);
    Array::new(&[n, h, w, c], data)
}

/// The loss inputs of train mode: `targets` (class indices) and the optional `alpha` class weights.
fn targets_and_alpha(inputs: &[(String, Tensor)], n: usize, classes: usize) -> Result<(Vec<usize>, Option<Vec<f32>>)> {
    let targets: Vec<usize> = {
        let t = find(inputs, "targets").context("--mode train needs `targets` (i64 [N]) in the input file")?;
        if t.shape != [n] {
            bail!("`targets` must be [{n}], got {:?}", t.shape);
        }
        t.to_i64_vec()?
            .into_iter()
            .map(|v| usize::try_from(v).ok().filter(|&v| v < classes))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("`targets` must hold class indices in 0..{classes}"))?
    };
    let alpha = match find(inputs, "alpha") {
        Some(a) if a.shape != [classes] => bail!("`alpha` must be [{classes}], got {:?}", a.shape),
        Some(a) => Some(a.to_f32_vec()),
        None => None,
    };
    Ok((targets, alpha))
}

/// The contract's training context: batch statistics everywhere, no dropout, no stochastic depth.
fn forward_ctx(rng: &mut rand_pcg::Pcg64, train: bool) -> Ctx<'_> {
    Ctx { train, frozen_bn_eval: false, ..Ctx::eval(rng) }
}

/// Runs the model as the contract says.
pub fn run(model: &mut EfficientNet<f32>, inputs: &[(String, Tensor)], mode: Mode, kind: &LossKind) -> Result<Outputs> {
    let x = images_nhwc(inputs)?;
    let n = x.shape[0];
    let classes = model.config.num_classes;
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    let train = mode == Mode::Train;
    if train {
        model.freeze_blocks(0)?;
    }
    let mut tape = if train { Tape::new() } else { Tape::inference() };
    let xv = tape.constant(x);
    let mut ctx = forward_ctx(&mut rng, train);
    let logits = model.forward(&mut tape, xv, &mut ctx)?;
    let mut out: Outputs = vec![("logits".into(), Tensor::from_f32(&[n, classes], tape.value(logits).data.clone())?)];
    if !train {
        return Ok(out);
    }
    let (targets, alpha) = targets_and_alpha(inputs, n, classes)?;
    let l = loss::loss(&mut tape, logits, &targets, alpha.as_deref(), kind)?;
    out.push(("loss".into(), Tensor::from_f32(&[], vec![tape.value(l).data[0]])?));
    model.params.zero_grad();
    tape.backward(l, &mut model.params)?;
    for (id, (p, &layout)) in model.params.iter().zip(&model.layouts).enumerate() {
        let g = match model.params.grad(id) {
            Some(g) => Array::new(&p.value.shape, g.to_vec())?,
            None => Array::zeros(&p.value.shape),
        };
        let (shape, data) = to_torch(layout, &g);
        out.push((format!("grad.{}", p.name), Tensor::from_f32(&shape, data)?));
    }
    for (name, bn) in model.bn_names.iter().zip(model.batch_norms()) {
        let c = bn.state.running_mean.len();
        out.push((format!("running.{name}.running_mean"), Tensor::from_f32(&[c], bn.state.running_mean.clone())?));
        out.push((format!("running.{name}.running_var"), Tensor::from_f32(&[c], bn.state.running_var.clone())?));
    }
    Ok(out)
}

/// Runs the model as the contract says on the CUDA backend (a GPU or the emulated device), storing activations in
/// `precision`: the step is recorded as a program, run once, and its results read back. The outputs have the CPU
/// path's names, shapes and layouts.
pub fn run_device(
    model: &mut EfficientNet<f32>,
    inputs: &[(String, Tensor)],
    mode: Mode,
    kind: &LossKind,
    gpu: std::sync::Arc<crate::cuda::Gpu>,
    precision: crate::backend::cuda::Precision,
) -> Result<Outputs> {
    use crate::backend::cuda::Cuda;
    let x = images_nhwc(inputs)?;
    let n = x.shape[0];
    let classes = model.config.num_classes;
    let train = mode == Mode::Train;
    let loss_inputs = if train { Some(targets_and_alpha(inputs, n, classes)?) } else { None };
    if train {
        model.freeze_blocks(0)?;
    }
    let bns: Vec<&crate::ops::batchnorm::BnState<f32>> = model.batch_norms().into_iter().map(|b| &b.state).collect();
    let mut tape = if train {
        Tape::on(Cuda::new(gpu, &model.params, &bns, precision)?)
    } else {
        Tape::inference_on(Cuda::inference(gpu, &model.params, &bns, precision)?)
    };
    let xt = tape.backend_mut().input(&x)?;
    let xv = tape.input(xt);
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    let mut ctx = forward_ctx(&mut rng, train);
    let logits = model.forward(&mut tape, xv, &mut ctx)?;
    let logits_t = tape.value(logits).clone();
    tape.backend_mut().keep(&logits_t);
    let loss_t = match &loss_inputs {
        Some((targets, alpha)) => {
            let l = loss::loss(&mut tape, logits, targets, alpha.as_deref(), kind)?;
            let lt = tape.value(l).clone();
            tape.backend_mut().keep(&lt);
            tape.backward(l, &mut model.params)?;
            Some(lt)
        }
        None => None,
    };
    let mut cuda = tape.into_backend();
    cuda.run(false)?;
    let mut out: Outputs = vec![("logits".into(), Tensor::from_f32(&[n, classes], cuda.download(&logits_t)?)?)];
    let Some(lt) = loss_t else { return Ok(out) };
    out.push(("loss".into(), Tensor::from_f32(&[], cuda.download(&lt)?)?));
    for (id, (p, &layout)) in model.params.iter().zip(&model.layouts).enumerate() {
        let g = match cuda.grad(id)? {
            Some(g) => Array::new(&p.value.shape, g)?,
            None => Array::zeros(&p.value.shape),
        };
        let (shape, data) = to_torch(layout, &g);
        out.push((format!("grad.{}", p.name), Tensor::from_f32(&shape, data)?));
    }
    for (i, name) in model.bn_names.iter().enumerate() {
        let (mean, var) = cuda.bn_stats(i)?;
        let c = mean.len();
        out.push((format!("running.{name}.running_mean"), Tensor::from_f32(&[c], mean)?));
        out.push((format!("running.{name}.running_var"), Tensor::from_f32(&[c], var)?));
    }
    Ok(out)
}
