//! derma: EfficientNet-B0 training for skin-lesion classification (ISIC 2019), with its own autograd, a CPU
//! reference backend and a CUDA backend.
//!
//! Map of the crate:
//! - [`tensor`]: shapes, dtypes, host storage, NCHW/NHWC at the boundary.
//! - [`autograd`]: the tape, parameters with trainable flags, gradients, inference mode.
//! - [`ops`]: one module per op family: CPU reference forward and backward (and the CUDA launch where built).
//! - [`nn`]: layers and the EfficientNet model with torchvision's names.
//! - [`io`]: torch.save (.pth) reader, safetensors, checkpoints.
//! - [`data`]: ISIC reading, verification, split, decode cache, augmentation, loader, synthetic data.
//! - [`train`]: trainer, losses, AdamW, plateau scheduler, unfreezing, loss scaler, metrics, plots.
//! - [`cuda`]: driver probe, embedded kernel images, device selection.
//! - [`tools`]: `derma forward`, the comparison tool for kernel and model work.

pub mod autograd;
pub mod backend;
pub mod cuda;
pub mod data;
pub mod interrupt;
pub mod io;
pub mod nn;
pub mod ops;
pub mod tensor;
pub mod tools;
pub mod train;
