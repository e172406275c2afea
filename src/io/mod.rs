//! Weight files without Python: torch.save archives (`.pth`/`.pt`) and safetensors.
//!
//! - [`pickle`]: a pickle reader that only understands data (allow-listed globals; it never runs code).
//! - [`pth`]: the torch.save zip layout around it.
//! - [`safetensors`]: read and write safetensors with string metadata; atomic file writes.
//! - [`fetch`]: named pretrained weights (`imagenet`) downloaded into a cache, SHA-256 verified, resumable.
//! - [`state_dict`]: [`StateDict`] (named tensors in file order), [`load_checkpoint`] for either format (plain
//!   state dicts and training checkpoints such as `{epoch, model_state_dict, optimizer_state_dict, val_acc,
//!   frozen_layers, config}`), and [`check_keys`] to match weights against a model.

pub mod fetch;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod state_dict;

pub use pickle::{Value, unpickle};
pub use pth::{load_pth, load_pth_bytes};
pub use safetensors::{load_safetensors, load_safetensors_bytes, safetensors_bytes, save_safetensors, write_atomic};
pub use state_dict::{
    Checkpoint, CheckpointMeta, StateDict, check_keys, check_keys_with_dtype, checkpoint_from_value, load_checkpoint,
    load_checkpoint_bytes, load_state_dict,
};
