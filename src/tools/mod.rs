//! Correctness tools: `derma check` (every device kernel against the CPU reference) and `derma forward` (one step
//! of a model, written out for comparison).

pub mod check;
pub mod forward;
