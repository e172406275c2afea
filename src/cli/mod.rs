//! Subcommands, one module per area.

pub mod data;
pub mod train;
