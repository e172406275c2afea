//! Correctness tools: `derma forward` (one step of a model, written out for comparison).

pub mod forward;
