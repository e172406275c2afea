//! Linear layers `y[N, O] = x[N, I]·wᵀ + b` through cuBLASLt, the bias by its epilogue kernel, the weight gradient
//! in f32 straight into its slot, the bias gradient by a column sum.

use super::{Cuda, Tensor, gemm};
use crate::backend::Want;
use anyhow::{Result, ensure};

pub(super) fn forward(cu: &mut Cuda, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    cu.expect_act("linear input", x)?;
    ensure!(x.shape.len() == 2 && w.shape.len() == 2, "linear: input {:?}, weight {:?}", x.shape, w.shape);
    gemm::forward(cu, "linear", x, w, b, x.shape[0])
}

pub(super) fn backward(
    cu: &mut Cuda,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want: [Want; 3],
) -> Result<[Option<Tensor>; 3]> {
    cu.expect_act("linear output gradient", dy)?;
    let (n, o) = (x.shape[0], w.shape[0]);
    let dx = if want[0].any() { Some(gemm::backward_data(cu, "linear", w, dy, &x.shape, n)?) } else { None };
    let dw = cu.grad_out(want[1], "linear dw", &w.shape)?;
    gemm::backward_weight(cu, "linear", x, dy, &dw)?;
    let db = cu.grad_out(want[2], "linear db", &[o])?;
    gemm::backward_bias(cu, "linear", dy, &db, n, o)?;
    Ok([dx, dw.into_result(), db.into_result()])
}
