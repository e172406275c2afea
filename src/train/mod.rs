//! Training building blocks: AdamW, the plateau scheduler, the loss scaler, gradual unfreezing, early stopping,
//! metrics, the per-epoch history, plots and the training configuration. Each piece is pure and reproduces the
//! PyTorch semantics of the seed pipeline; the training loop composes them.

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod early_stop;
pub mod history;
pub mod metrics;
pub mod plateau;
pub mod plots;
pub mod run_dir;
pub mod scaler;
pub mod trainer;
pub mod unfreeze;
