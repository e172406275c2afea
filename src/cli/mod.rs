//! Subcommands, one module per area.

pub mod bench;
pub mod bench_data;
pub mod bench_train;
pub mod data;
pub mod eval;
pub mod plan;
pub mod predict;
pub mod train;
pub mod weights;
