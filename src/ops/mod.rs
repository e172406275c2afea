//! Ops, one folder per family: the tape node and its backward (`mod.rs`, generic over the backend), the CPU
//! reference forward and backward as plain loops over slices (`cpu.rs`, parallel over batch or channels with
//! rayon), the CUDA launches of the family's kernels (`cuda.rs`, beside `kernels/<family>.cu`), their check
//! against the reference (`check.rs`, run by `derma check`), and the CUDA backend's recording of the family into
//! a step program (`record.rs`, compiled as a child of [`crate::backend::cuda`], whose internals it uses).
//!
//! Layout conventions: image-shaped tensors are NHWC; convolution weights are OHWI (`[out, kh, kw, in/groups]`);
//! linear weights are `[out, in]` as in PyTorch. Batch norm works on the last dimension, so one op serves
//! BatchNorm2d on `[N, H, W, C]` and BatchNorm1d on `[N, C]`.

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod depthwise;
pub mod dropout;
pub mod elementwise;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod reduce;
pub mod scale;

use anyhow::{Result, bail};

/// Errors when `shape` does not have `rank` dimensions, naming the op and the tensor.
pub(crate) fn expect_rank(op: &str, what: &str, shape: &[usize], rank: usize) -> Result<()> {
    if shape.len() != rank {
        bail!("{op}: {what} must have {rank} dimensions, got shape {shape:?}");
    }
    Ok(())
}
