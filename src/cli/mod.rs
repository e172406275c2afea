//! Subcommands, one module per area.

pub mod bench;
pub mod data;
pub mod eval;
pub mod predict;
pub mod train;
pub mod weights;
