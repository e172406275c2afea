//! Softmax + weighted cross-entropy or focal loss in one launch over logits `[N, K]`: the f32 mean loss and the
//! logits' gradient (kept on the device for backward). Targets and class weights are uploaded.

use super::{Cuda, DType, Tensor, View, by_dtype, dim};
use crate::cuda::program::Access;
use crate::ops::loss::LossKind;
use crate::ops::loss::LossParams;
use anyhow::{Result, bail, ensure};

/// What the loss keeps for backward.
pub struct CudaLossSaved {
    /// d(loss)/d(logits) for an output gradient of 1.
    dlogits: Tensor,
    params: LossParams,
    targets: View,
    weights: Option<View>,
}

fn params(b: usize, k: usize, kind: &LossKind, grad_scale: f32) -> Result<LossParams> {
    let (focal, gamma) = match kind {
        LossKind::CrossEntropy => (0, 0.0),
        LossKind::Focal { gamma } => (1, *gamma as f32),
    };
    Ok(LossParams { b: dim(b, "batch")?, k: dim(k, "classes")?, focal, gamma, grad_scale, pad_: 0 })
}

/// Records one softmax-loss launch writing the loss into `loss` and, unless `grad_scale` is 0, `dlogits`.
fn record(
    cu: &mut Cuda,
    name: &str,
    p: LossParams,
    logits: &Tensor,
    targets: View,
    weights: Option<View>,
    (loss, dlogits): (View, View),
) {
    let bad = cu.scratch("loss bad-target flag", 4);
    let lv = logits.view;
    let dt = logits.dtype;
    let scale = cu.loss_scale;
    let mut reads = vec![logits.access(), targets.all()];
    reads.extend(weights.map(|w| w.all()));
    reads.extend(scale.map(|s| s.all()));
    cu.push(name, reads, vec![loss.all(), dlogits.all(), Access { buf: bad.buf, bytes: 4 }], move |b| {
        let gpu = b.gpu();
        let w = weights.map(|w| w.get(b)).transpose()?;
        let sc = scale.map(|s| s.get(b)).transpose()?;
        by_dtype!(dt, T => gpu.kernels.softmax_loss_scaled::<T>(&gpu.stream, &p, loss.get(b)?, dlogits.get(b)?, None, bad.get(b)?, lv.get(b)?, targets.get(b)?, w, sc))
    });
}

pub(super) fn forward(
    cu: &mut Cuda,
    logits: &Tensor,
    targets: &[usize],
    weights: Option<&[f32]>,
    kind: &LossKind,
) -> Result<(Tensor, CudaLossSaved)> {
    cu.expect_act("loss logits", logits)?;
    ensure!(logits.shape.len() == 2, "loss: logits must be [N, K], got {:?}", logits.shape);
    let (n, k) = (logits.shape[0], logits.shape[1]);
    ensure!(targets.len() == n, "loss: {} targets for {n} rows of logits", targets.len());
    if let Some(&bad) = targets.iter().find(|&&t| t >= k) {
        bail!("loss: target class {bad} is out of range for {k} classes");
    }
    if let Some(w) = weights {
        ensure!(w.len() == k, "loss: {} class weights for {k} classes", w.len());
        if cu.device_targets.is_none()
            && matches!(kind, LossKind::CrossEntropy)
            && targets.iter().map(|&t| w[t] as f64).sum::<f64>() == 0.0
        {
            bail!("loss: the class weights of this batch's targets sum to zero");
        }
    }
    let tv = match cu.device_targets {
        // A replayed step: the batch's targets are made on the device (validated when the data was loaded).
        Some(v) => {
            ensure!(v.bytes == n * 4, "loss: the device targets hold {} bytes for {n} rows", v.bytes);
            v
        }
        None => {
            let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
            cu.upload_raw("targets", &t32)?
        }
    };
    let wv = weights.map(|w| cu.upload_raw("class weights", w)).transpose()?;
    let p = params(n, k, kind, 1.0)?;
    let loss = cu.alloc("loss", &[], DType::F32);
    let dlogits = cu.alloc("dlogits", &logits.shape, logits.dtype);
    record(cu, &format!("softmax loss [{n}, {k}]"), p, logits, tv, wv, (loss.view, dlogits.view));
    Ok((loss, CudaLossSaved { dlogits, params: p, targets: tv, weights: wv }))
}

pub(super) fn backward(cu: &mut Cuda, saved: &CudaLossSaved, logits: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let Some(scale) = dy.constant else {
        bail!(
            "loss backward on the CUDA backend takes a constant output gradient (the backward seed), not a computed \
             tensor"
        )
    };
    if scale == 1.0 {
        return Ok(saved.dlogits.clone());
    }
    if scale == 0.0 {
        // The kernel reads a gradient scale of 0 as "skip the gradient": a zero seed gives zeros.
        let dlogits = cu.alloc("dlogits (zero seed)", &logits.shape, logits.dtype);
        let (v, dt, n) = (dlogits.view, logits.dtype, logits.numel());
        cu.push("zero logits gradient", vec![], vec![dlogits.access()], move |b| {
            let gpu = b.gpu();
            by_dtype!(dt, T => gpu.kernels.fill::<T>(&gpu.stream, v.get(b)?, 0.0, n))
        });
        return Ok(dlogits);
    }
    // Another seed (a loss scale): the same launch again with the kernel's gradient scale.
    let p = LossParams { grad_scale: scale as f32, ..saved.params };
    let loss = cu.alloc("loss (rescaled pass)", &[], DType::F32);
    let dlogits = cu.alloc("dlogits", &logits.shape, logits.dtype);
    record(cu, "softmax loss backward (scaled)", p, logits, saved.targets, saved.weights, (loss.view, dlogits.view));
    Ok(dlogits)
}
