//! Depthwise convolution on the device. The tape node is [`crate::ops::conv::conv2d`] (a convolution with
//! `groups = C`), and its CPU reference is the depthwise path of `src/ops/conv/cpu.rs`; this folder holds the
//! CUDA launches of kernels/depthwise.cu and their check against that reference.

pub mod check;
pub mod cuda;
pub use cuda::{DwParams, dw_weight_workspace_bytes};
