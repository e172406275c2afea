//! `derma check`: every hand-written CUDA kernel, the cuBLASLt GEMM and the cuDNN convolution against the CPU
//! reference in [`crate::ops`] (and the optimizer / loss scaler in [`crate::train`]), forward and backward, in f32
//! and f16 storage, on fresh random inputs, on a GPU or on the emulated device.
//!
//! Each check draws inputs (odd sizes such as N=3, 7×7 or 9×9, C=13 or 40, aligned shapes where the kernels take
//! vectorised paths, flat lengths past three passes of the largest grid so every grid-stride loop wraps, and
//! reductions whose workspace splits the rows 6 ways and 256 ways, the cap), rounds them to the storage type,
//! uploads them, fills every output with NaN before the launch (an element the kernel forgets to write shows up
//! as a failure) between two 256-byte canaries (a write past either end shows up as `outside_writes`), runs the
//! device op, runs the reference in f64 on the same rounded inputs, and compares every element.
//!
//! Error measures, both must hold: the max-norm relative error `rel = max|got − ref| / max(max|ref|, 1e-30)` at
//! most `tol`, and per element `|got − ref| ≤ atol + tol·|ref|` with `atol = tol · floor · max|ref|` (plus the
//! storage type's smallest subnormal), so a wrong small element that the max-norm cannot see fails too; any
//! non-finite output where the reference is finite, or a length mismatch, fails regardless. Tolerances: f32
//! storage 1e-5 (floor 0.1), or 1e-4 (floor 0.1) for outputs that are sums over many rows (batch-norm and
//! depthwise weight gradients, pooling, loss, and cuBLASLt GEMMs with an f32 output, which run with strict
//! CUBLAS_COMPUTE_32F), 5e-3 (max-norm only) for cuDNN in f32 (tensor-op math: cuDNN runs with
//! CUDNN_TENSOR_OP_MATH, which may round inputs to TF32); f16 storage 1e-2 (floor 1e-3 elementwise, 1e-2 for sums).

use anyhow::{Result, bail};
use cudarc::driver::DeviceRepr;
use half::f16;
use serde::Serialize;
use std::fmt::Write as _;

use super::alloc::Block;
use super::kernels::{
    AdamParams, BnParams, DevSlice, DwParams, Elem, LossParams, Unary, bn_workspace_bytes, dw_weight_workspace_bytes,
    rows_split,
};
use super::{DeviceRequest, Gpu, Probe, Schedule, Selected, build_info, parse_device, probe, select_from, uniform01};
use crate::ops;
use crate::ops::activation::Act;
use crate::ops::batchnorm::{BnCfg, BnMode, BnState};
use crate::ops::conv::{ConvCfg, ConvGeom};
use crate::ops::loss::LossKind;
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::scaler::{GradScaler, GradScalerConfig};

/// Arguments of `derma check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Device to check: cuda, cuda:N (auto means cuda:0; there is nothing to check on the CPU), or emu (a test
    /// device: runs the CUDA code path's kernels on the CPU through the emulator).
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    pub device: DeviceRequest,
    /// Emulated device only: the order of threads between sync points and of blocks [default: forward].
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Print the results as JSON: {device, seed, relative_error, results, failures, ptxas_resources}.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random inputs (default: from the clock, printed so a failure can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only these op families (comma-separated); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub family: Vec<Family>,
}

/// The op families `derma check` covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// SiLU / sigmoid / ReLU forward and backward, add, scale, axpy, fill, casts.
    Elementwise,
    /// Batch-norm statistics, forward and backward (train and eval, with and without fused SiLU).
    Batchnorm,
    /// Depthwise convolution forward, backward data and backward weight; the weight-layout transposes.
    Depthwise,
    /// Squeeze-excitation global pool and channel scale, forward and backward.
    Se,
    /// Dropout and stochastic depth (masks reproduced on the CPU with [`uniform01`]).
    Dropout,
    /// Softmax + weighted cross-entropy / focal loss and its gradient.
    Loss,
    /// Gradient unscaling and the AdamW step.
    Optim,
    /// cuBLASLt GEMM: f32, f16 and f16 inputs into f32, plain and accumulating (beta = 1).
    Gemm,
    /// Linear-layer bias add and bias gradient (column sum, written or accumulated into f32).
    Linear,
    /// cuDNN convolution forward, backward data and backward filter.
    Conv,
    /// The fused training augmentation against the CPU applier, per element (see [`super::augment`]).
    Augment,
}

impl Family {
    /// Every family, in the order `derma check` runs them.
    pub const ALL: [Family; 11] = [
        Family::Elementwise,
        Family::Batchnorm,
        Family::Depthwise,
        Family::Se,
        Family::Dropout,
        Family::Loss,
        Family::Optim,
        Family::Gemm,
        Family::Linear,
        Family::Conv,
        Family::Augment,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Elementwise => "elementwise",
            Self::Batchnorm => "batchnorm",
            Self::Depthwise => "depthwise",
            Self::Se => "se",
            Self::Dropout => "dropout",
            Self::Loss => "loss",
            Self::Optim => "optim",
            Self::Gemm => "gemm",
            Self::Linear => "linear",
            Self::Conv => "conv",
            Self::Augment => "augment",
        }
    }
}

/// Storage type of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float storage.
    F32,
    /// 16-bit float storage (fp32 math inside the kernels).
    F16,
}

impl Dtype {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// How an output is computed, which sets its tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accuracy {
    /// Elementwise or short sums: rounding of the output only.
    Elementwise,
    /// Sums over many rows in f32 (reductions, GEMM): error grows with the row count.
    Reduction,
    /// cuDNN / cuBLASLt with tensor-op math allowed (TF32 for f32 storage).
    TensorOp,
}

/// What an output must meet: the max-norm relative error at most `rel`, and every element within
/// `|got − ref| ≤ atol + rel·|ref|`, where `atol = rel · floor · max|ref|` plus the storage type's subnormal step.
/// `floor` below 1 makes the per-element bound stricter than the max-norm one for elements much smaller than the
/// largest, which the max-norm error cannot see (a wrong element of 1e-3·max moves it by only 1e-3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    /// Bound on the max-norm relative error, and the per-element relative term.
    pub rel: f64,
    /// The per-element absolute term as a fraction of `rel · max|ref|`.
    pub floor: f64,
}

impl Tolerance {
    /// Bit-exact (after widening to f64): for casts and skipped updates.
    pub const EXACT: Tolerance = Tolerance { rel: 0.0, floor: 0.0 };
}

/// The tolerance for a storage type and kind of output. The floors: f32 elementwise and reduction outputs are
/// allowed 10× their storage's rounding in absolute terms at cancellation points (an f32 sum of terms of size
/// max|ref| carries ~1e-7·max), f16 outputs are rounded per element (relative 2^-11) so their floor is tight; the
/// tensor-op libraries round operands to TF32 / fp16, an error proportional to the operands rather than to each
/// output, so only the max-norm bound applies to them (floor 1).
pub fn tolerance(dtype: Dtype, acc: Accuracy) -> Tolerance {
    let (rel, floor) = match (dtype, acc) {
        (Dtype::F32, Accuracy::Elementwise) => (1e-5, 0.1),
        (Dtype::F32, Accuracy::Reduction) => (1e-4, 0.1),
        (Dtype::F32, Accuracy::TensorOp) => (5e-3, 1.0),
        (Dtype::F16, Accuracy::Elementwise) => (1e-2, 1e-3),
        (Dtype::F16, Accuracy::Reduction) => (1e-2, 1e-2),
        (Dtype::F16, Accuracy::TensorOp) => (1e-2, 1.0),
    };
    Tolerance { rel, floor }
}

/// The smallest positive subnormal of a storage type: rounding an output to it is off by up to half this much
/// whatever its magnitude.
fn subnormal_step(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => f32::from_bits(1) as f64,
        Dtype::F16 => f16::from_bits(1).to_f64(),
    }
}

/// Error of `got` against `want`: (max |Δ|, max |Δ| / max(max |want|, 1e-30)). Infinite when the lengths differ or
/// an output is not finite where the reference is.
pub fn max_errors(got: &[f64], want: &[f64]) -> (f64, f64) {
    if got.len() != want.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() && w.is_finite() || g.is_nan() {
            return (f64::INFINITY, f64::INFINITY);
        }
        if w.is_finite() {
            max_abs = max_abs.max((g - w).abs());
            max_ref = max_ref.max(w.abs());
        } else if g != w {
            return (f64::INFINITY, f64::INFINITY);
        }
    }
    (max_abs, max_abs / max_ref.max(1e-30))
}

/// The worst element against its own bound: max over i of |got_i − want_i| / (atol + rtol·|want_i|), so 1 is the
/// limit; 0 where an element matches exactly, infinite where it differs from a zero bound or is not finite where
/// the reference is (lengths must match: [`max_errors`] reports a mismatch).
pub fn element_error(got: &[f64], want: &[f64], rtol: f64, atol: f64) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if g == w {
            continue;
        }
        if !(g.is_finite() && w.is_finite()) {
            return f64::INFINITY;
        }
        let bound = atol + rtol * w.abs();
        worst = worst.max(if bound > 0.0 { (g - w).abs() / bound } else { f64::INFINITY });
    }
    worst
}

/// One comparison.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Op family.
    pub family: Family,
    /// Op and output, e.g. "bn_backward dx".
    pub op: String,
    /// Storage type.
    pub dtype: Dtype,
    /// Shape in words, e.g. "N=3 H=W=7 C=13".
    pub shape: String,
    /// max |got − ref| (infinite when an output is NaN/inf or missing).
    pub max_abs_err: f64,
    /// max |got − ref| / max |ref|.
    pub rel_err: f64,
    /// Bound on `rel_err` (and the per-element relative term).
    pub tol: f64,
    /// The worst element's |got − ref| / (atol + tol·|ref|); must be at most 1.
    pub elem_err: f64,
    /// Bytes changed in the canaries before and after the output (must be 0: a write outside the output).
    pub outside_writes: usize,
    /// rel_err <= tol, elem_err <= 1, no write outside the output, and every output finite.
    pub pass: bool,
}

/// Compares `got` with `want` under `tol` and builds the result row; `outside_writes` counts canary bytes the op
/// changed around its output.
#[allow(clippy::too_many_arguments)]
pub fn judge(
    family: Family,
    op: &str,
    dtype: Dtype,
    shape: &str,
    got: &[f64],
    want: &[f64],
    tol: Tolerance,
    outside_writes: usize,
) -> CheckResult {
    let (max_abs_err, rel_err) = max_errors(got, want);
    let max_ref = want.iter().filter(|w| w.is_finite()).fold(0.0f64, |m, w| m.max(w.abs()));
    let atol = if tol.rel == 0.0 { 0.0 } else { tol.rel * tol.floor * max_ref + subnormal_step(dtype) };
    let elem_err = element_error(got, want, tol.rel, atol);
    CheckResult {
        family,
        op: op.to_string(),
        dtype,
        shape: shape.to_string(),
        max_abs_err,
        rel_err,
        tol: tol.rel,
        elem_err,
        outside_writes,
        pass: rel_err.is_finite() && rel_err <= tol.rel && elem_err <= 1.0 && outside_writes == 0,
    }
}

/// The device `derma check` runs on: the emulated device for `emu`, else a usable CUDA device by the same rule as
/// [`super::select`], an error naming what is missing otherwise (`auto` does not fall back to the CPU here: there
/// is nothing to compare there, nor to the emulated device, which is only ever asked for by name).
pub fn device_for_check(p: &Probe, request: DeviceRequest) -> Result<Selected> {
    let ordinal = match request {
        DeviceRequest::Cpu => bail!(
            "derma check compares the CUDA kernels with the CPU reference, so it needs a CUDA device: use --device \
             cuda, --device cuda:N, or --device emu (the kernels on the CPU through the emulator)"
        ),
        DeviceRequest::Emu => return Ok(Selected::Emulated),
        DeviceRequest::Auto => 0,
        DeviceRequest::Cuda(n) => n,
    };
    match select_from(p, ordinal) {
        Ok(s @ Selected::Cuda(_)) => Ok(s),
        Ok(_) => bail!("derma check needs a CUDA device, and cuda:{ordinal} resolved to something else"),
        Err(missing) => bail!(
            "derma check needs a CUDA device, and {} cannot be used:\n  - {}",
            if request == DeviceRequest::Auto {
                "the first one (--device auto)".to_string()
            } else {
                request.to_string()
            },
            missing.join("\n  - ")
        ),
    }
}

/// Storage element types with conversions to and from f64 (for rounding inputs and reading outputs).
pub trait Store: Elem + Default + Clone + Into<f64> {
    /// Which storage type.
    const DTYPE: Dtype;
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
}

impl Store for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Store for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

/// splitmix64: reproducible inputs from `--seed` without tying the check to a rand version.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }
}

/// The state of one family's run: device, random source, results so far.
struct Ctx<'g> {
    g: &'g Gpu,
    rng: SplitMix,
    family: Family,
    out: Vec<CheckResult>,
}

fn s(b: &Block) -> DevSlice<'_> {
    DevSlice::of(b)
}

/// Canary bytes before and after every output: a multiple of 256, so the output view keeps cudaMalloc's alignment
/// (the vector paths and cuBLASLt see the addresses they would see on a fresh allocation), and wider than any
/// vector store, so an overrun by one vector lands inside it.
pub(crate) const FENCE: usize = 256;
/// The canary byte: neither 0x00 (zeroed memory) nor 0xFF (fresh emulated memory), and as f32 (-2.9e-16) or f16
/// (-0.0221) a finite value no kernel here writes by accident.
pub(crate) const CANARY: u8 = 0xA5;

/// A device buffer between two canaries: [FENCE canary bytes | `len` bytes | FENCE canary bytes]. Kernels get
/// only the middle ([`Fenced::v`]), so a write past either end of an output changes a canary.
struct Fenced {
    block: Block,
    len: usize,
}

impl Fenced {
    /// The view a kernel writes to.
    fn v(&self) -> Result<DevSlice<'_>> {
        DevSlice::range(&self.block, FENCE, self.len)
    }
}

/// An output read back: its values and how many canary bytes around it the op changed.
struct Fetched {
    values: Vec<f64>,
    outside: usize,
}

impl<'g> Ctx<'g> {
    /// `n` values uniform in [offset − scale, offset + scale), rounded to `T`: (the rounded values, a device copy).
    fn rand<T: Store>(&mut self, n: usize, scale: f64, offset: f64) -> Result<(Vec<f64>, Block)> {
        let host: Vec<T> = (0..n).map(|_| T::from_f64(offset + scale * self.rng.sym())).collect();
        let b = self.g.upload(&host)?;
        Ok((host.into_iter().map(T::to_f64).collect(), b))
    }

    /// Uploads `v` rounded to `T`.
    fn put<T: Store>(&self, v: &[f64]) -> Result<Block> {
        let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
        self.g.upload(&host)
    }

    /// A fenced buffer holding `init`.
    fn fenced<T: DeviceRepr>(&self, init: &[T]) -> Result<Fenced> {
        let len = size_of_val(init);
        let block = self.g.alloc.alloc(2 * FENCE + len)?;
        let canary = [CANARY; FENCE];
        self.g.write(&block, 0, &canary)?;
        self.g.write(&block, FENCE, init)?;
        self.g.write(&block, FENCE + len, &canary)?;
        Ok(Fenced { block, len })
    }

    /// A fenced output of `n` NaNs of `T` (an element the kernel forgets to write reads back as NaN).
    fn poison<T: Store>(&self, n: usize) -> Result<Fenced> {
        self.fenced(&vec![T::from_f64(f64::NAN); n])
    }

    /// A fenced in/out buffer holding `v` rounded to `T`.
    fn output<T: Store>(&self, v: &[f64]) -> Result<Fenced> {
        self.fenced(&v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>())
    }

    /// A fenced, zeroed workspace of `bytes`.
    fn scratch(&self, bytes: usize) -> Result<Fenced> {
        self.fenced(&vec![0u8; bytes])
    }

    /// Canary bytes of `f` that are no longer canaries.
    fn outside(&self, f: &Fenced) -> Result<usize> {
        let (mut before, mut after) = ([0u8; FENCE], [0u8; FENCE]);
        self.g.read(&f.block, 0, &mut before)?;
        self.g.read(&f.block, FENCE + f.len, &mut after)?;
        Ok(before.iter().chain(&after).filter(|&&b| b != CANARY).count())
    }

    /// The values of `f` as f64 and its canary damage (waits for the queued launches).
    fn fetch<T: DeviceRepr + Default + Copy + Into<f64>>(&self, f: &Fenced) -> Result<Fetched> {
        let mut values = vec![T::default(); f.len / size_of::<T>()];
        self.g.read(&f.block, FENCE, &mut values)?;
        Ok(Fetched { values: values.into_iter().map(Into::into).collect(), outside: self.outside(f)? })
    }

    fn record(&mut self, op: &str, dtype: Dtype, shape: &str, got: &Fetched, want: &[f64], acc: Accuracy) {
        let r = judge(self.family, op, dtype, shape, &got.values, want, tolerance(dtype, acc), got.outside);
        self.out.push(r);
    }

    /// A bit-exact comparison.
    fn record_exact(&mut self, op: &str, dtype: Dtype, shape: &str, got: &Fetched, want: &[f64]) {
        let r = judge(self.family, op, dtype, shape, &got.values, want, Tolerance::EXACT, got.outside);
        self.out.push(r);
    }

    /// A row for a workspace: it passes when the ops that used it wrote nothing outside it.
    fn record_fence(&mut self, op: &str, shape: &str, f: &Fenced) -> Result<()> {
        let outside = self.outside(f)?;
        let r = judge(self.family, op, Dtype::F32, shape, &[], &[], Tolerance::EXACT, outside);
        self.out.push(r);
        Ok(())
    }

    /// Elements for a flat grid-stride kernel that make every thread of its largest grid loop three times, also in
    /// the 16-byte vector path (8 halves per vector), plus an odd tail for the scalar loop.
    fn wrapping_len(&self) -> usize {
        3 * self.g.kernels.grid_stride_threads() * 8 + 13
    }
}

/// One part of a family's checks (a storage type, or a kind of op) that runs on its own.
type Part = fn(&mut Ctx) -> Result<()>;

/// The parts of a family, each with its name and storage type.
fn parts(family: Family) -> Vec<(&'static str, Dtype, Part)> {
    match family {
        Family::Elementwise => vec![
            ("elementwise f32", Dtype::F32, elementwise::<f32>),
            ("elementwise f16", Dtype::F16, elementwise::<f16>),
            ("casts", Dtype::F16, casts),
        ],
        Family::Batchnorm => {
            vec![("batchnorm f32", Dtype::F32, batchnorm::<f32>), ("batchnorm f16", Dtype::F16, batchnorm::<f16>)]
        }
        Family::Depthwise => {
            vec![("depthwise f32", Dtype::F32, depthwise::<f32>), ("depthwise f16", Dtype::F16, depthwise::<f16>)]
        }
        Family::Se => vec![("se f32", Dtype::F32, se::<f32>), ("se f16", Dtype::F16, se::<f16>)],
        Family::Dropout => {
            vec![("dropout f32", Dtype::F32, dropout::<f32>), ("dropout f16", Dtype::F16, dropout::<f16>)]
        }
        Family::Loss => vec![("loss f32", Dtype::F32, loss::<f32>), ("loss f16", Dtype::F16, loss::<f16>)],
        Family::Optim => vec![("optim", Dtype::F32, optim)],
        Family::Gemm => vec![("gemm", Dtype::F32, gemm)],
        Family::Linear => vec![("linear f32", Dtype::F32, linear::<f32>), ("linear f16", Dtype::F16, linear::<f16>)],
        Family::Conv => vec![("conv f32", Dtype::F32, conv::<f32>), ("conv f16", Dtype::F16, conv::<f16>)],
        // Checked by `super::augment::check` (see check_family).
        Family::Augment => vec![],
    }
}

/// A failed row for a part that stopped with an error (a launch, copy or library call failed: itself a finding).
fn error_row(family: Family, part: &str, dtype: Dtype, e: &anyhow::Error) -> CheckResult {
    CheckResult {
        family,
        op: format!("ERROR in {part}: {e:#}"),
        dtype,
        shape: "-".into(),
        max_abs_err: f64::INFINITY,
        rel_err: f64::INFINITY,
        tol: 0.0,
        elem_err: f64::INFINITY,
        outside_writes: 0,
        pass: false,
    }
}

/// Runs one family's checks on `gpu` with inputs from `seed`. Numerical mismatches are rows with `pass: false`;
/// a part that errors (a launch, copy or library call failed) keeps the rows it produced, adds one failed row
/// naming the error, and the family goes on with its next part. The `Result` is kept for callers; it is `Ok`.
pub fn check_family(gpu: &Gpu, family: Family, seed: u64) -> Result<Vec<CheckResult>> {
    if family == Family::Augment {
        // One part: an error becomes a failed row, as for the other families.
        return Ok(super::augment::check(gpu, seed).unwrap_or_else(|e| {
            vec![error_row(family, "augment", Dtype::F32, &e.context("checking the augment kernels"))]
        }));
    }
    let mut c =
        Ctx { g: gpu, rng: SplitMix(seed ^ (family as u64).wrapping_mul(0x2545f4914f6cdd1d)), family, out: vec![] };
    run_parts(&mut c, &parts(family));
    Ok(c.out)
}

/// Runs each part; one that errors leaves its rows, adds an error row, and the next part runs.
fn run_parts(c: &mut Ctx, parts: &[(&'static str, Dtype, Part)]) {
    for &(name, dtype, part) in parts {
        if let Err(e) = part(c) {
            let row = error_row(c.family, name, dtype, &e.context(format!("checking the {} kernels", c.family.name())));
            c.out.push(row);
        }
    }
}

fn act_of(op: Unary) -> Act {
    match op {
        Unary::Silu => Act::Silu,
        Unary::Sigmoid => Act::Sigmoid,
        Unary::Relu => Act::Relu,
    }
}

fn elementwise<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // 3·7·7·13 (odd), 4096 (aligned, vectorised path), 7 (shorter than one vector), and a length past three grid
    // passes (the grid-stride loops wrap).
    for n in [3 * 7 * 7 * 13, 4096, 7, c.wrapping_len()] {
        let shape = format!("n={n}");
        let (x, bx) = c.rand::<T>(n, 6.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(n, 1.0, 0.0)?;
        for op in [Unary::Silu, Unary::Sigmoid, Unary::Relu] {
            let act = act_of(op);
            let y = c.poison::<T>(n)?;
            g.kernels.unary::<T>(&g.stream, op, y.v()?, s(&bx), n)?;
            let mut want = vec![0.0; n];
            ops::activation::forward(act, &x, &mut want);
            let got = c.fetch::<T>(&y)?;
            c.record(&format!("{}_fwd", act.name()), dt, &shape, &got, &want, Accuracy::Elementwise);
            // Sigmoid's backward takes the forward output: give it the reference output rounded to T, and take
            // the reference from that same rounded y (near y = 1, 1 − y loses most of its digits to the rounding).
            let y_rounded: Vec<f64> = want.iter().map(|&v| T::from_f64(v).to_f64()).collect();
            let saved = if op == Unary::Sigmoid { c.put::<T>(&y_rounded)? } else { c.put::<T>(&x)? };
            let dx = c.poison::<T>(n)?;
            g.kernels.unary_backward::<T>(&g.stream, op, dx.v()?, s(&saved), s(&bdy), n)?;
            let mut want = vec![0.0; n];
            if op == Unary::Sigmoid {
                for ((w, y), d) in want.iter_mut().zip(&y_rounded).zip(&dy) {
                    *w = d * y * (1.0 - y);
                }
            } else {
                ops::activation::backward(act, &x, &dy, &mut want);
            }
            let got = c.fetch::<T>(&dx)?;
            c.record(&format!("{}_bwd", act.name()), dt, &shape, &got, &want, Accuracy::Elementwise);
        }
        let y = c.poison::<T>(n)?;
        g.kernels.add::<T>(&g.stream, y.v()?, s(&bx), s(&bdy), n)?;
        let mut want = vec![0.0; n];
        ops::elementwise::add_forward(&x, &dy, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("add", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(n)?;
        g.kernels.scale::<T>(&g.stream, y.v()?, s(&bx), -0.5, n, false)?;
        let want: Vec<f64> = x.iter().map(|v| -0.5 * v).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("scale", dt, &shape, &got, &want, Accuracy::Elementwise);
        // axpy onto the rounded scale output: y = -0.5 x + 2 dy.
        let base = got.values;
        g.kernels.scale::<T>(&g.stream, y.v()?, s(&bdy), 2.0, n, true)?;
        let want: Vec<f64> = base.iter().zip(&dy).map(|(b, d)| b + 2.0 * d).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("axpy", dt, &shape, &got, &want, Accuracy::Elementwise);
        // fill over NaN (never read): zero, an exact value, and one that rounds (once, from the f32 argument).
        for value in [0.0f32, 1.5, -0.1] {
            let y = c.poison::<T>(n)?;
            g.kernels.fill::<T>(&g.stream, y.v()?, value, n)?;
            let want = vec![T::from_f64(value as f64).to_f64(); n];
            let got = c.fetch::<T>(&y)?;
            c.record_exact(&format!("fill {value}"), dt, &shape, &got, &want);
        }
    }
    // A view offset by one element is not 16-byte aligned: the kernels must take their scalar path.
    let n = 1001;
    let (x, bx) = c.rand::<T>(n + 1, 3.0, 0.0)?;
    let y = c.poison::<T>(n + 1)?;
    let es = size_of::<T>();
    g.kernels.unary::<T>(
        &g.stream,
        Unary::Silu,
        DevSlice::range(&y.block, FENCE + es, n * es)?,
        DevSlice::range(&bx, es, n * es)?,
        n,
    )?;
    let got = c.fetch::<T>(&y)?;
    let mut want = vec![0.0; n];
    ops::activation::forward(Act::Silu, &x[1..], &mut want);
    let view = Fetched { values: got.values[1..].to_vec(), outside: got.outside };
    c.record("silu_fwd (view at +1 element)", dt, &format!("n={n}"), &view, &want, Accuracy::Elementwise);
    // The element before the view must stay untouched (NaN).
    let untouched = Fetched { values: vec![if got.values[0].is_nan() { 0.0 } else { f64::INFINITY }], outside: 0 };
    c.record_exact("silu_fwd (no write before the view)", dt, "1", &untouched, &[0.0]);
    // Only the second input misaligned: every pointer of a vector load must be checked, not just the first two.
    // x86 loads a misaligned 16-byte vector silently, so a guard that forgets one pointer shows under UBSan's
    // alignment check (the ASan/UBSan flavour) or on a GPU.
    let (a, ba) = c.rand::<T>(n, 3.0, 0.0)?;
    let y = c.poison::<T>(n)?;
    g.kernels.add::<T>(&g.stream, y.v()?, s(&ba), DevSlice::range(&bx, es, n * es)?, n)?;
    let got = c.fetch::<T>(&y)?;
    let mut want = vec![0.0; n];
    ops::elementwise::add_forward(&a, &x[1..], &mut want);
    c.record("add (second input at +1 element)", dt, &format!("n={n}"), &got, &want, Accuracy::Elementwise);
    // fill through a view at +1 element: the scalar path, and nothing written before the view.
    let y = c.poison::<T>(n + 1)?;
    g.kernels.fill::<T>(&g.stream, DevSlice::range(&y.block, FENCE + es, n * es)?, 2.0, n)?;
    let got = c.fetch::<T>(&y)?;
    let view = Fetched { values: got.values[1..].to_vec(), outside: got.outside };
    c.record_exact("fill 2 (view at +1 element)", dt, &format!("n={n}"), &view, &vec![2.0; n]);
    let untouched = Fetched { values: vec![if got.values[0].is_nan() { 0.0 } else { f64::INFINITY }], outside: 0 };
    c.record_exact("fill (no write before the view)", dt, "1", &untouched, &[0.0]);
    Ok(())
}

fn casts(c: &mut Ctx) -> Result<()> {
    let g = c.g;
    for n in [1003usize, 4096, c.wrapping_len()] {
        let shape = format!("n={n}");
        let (x, bx) = c.rand::<f32>(n, 100.0, 0.0)?;
        let y = c.poison::<f16>(n)?;
        g.kernels.cast(&g.stream, y.v()?, s(&bx), n, true)?;
        let want: Vec<f64> = x.iter().map(|&v| f16::from_f64(v).to_f64()).collect();
        let got = c.fetch::<f16>(&y)?;
        // Round-to-nearest-even both sides: exact.
        c.record_exact("cast f32->f16", Dtype::F16, &shape, &got, &want);
        let (h, bh) = c.rand::<f16>(n, 100.0, 0.0)?;
        let y = c.poison::<f32>(n)?;
        g.kernels.cast(&g.stream, y.v()?, s(&bh), n, false)?;
        let got = c.fetch::<f32>(&y)?;
        c.record_exact("cast f16->f32", Dtype::F32, &shape, &got, &h);
    }
    Ok(())
}

fn batchnorm<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    let (eps, momentum) = (1e-3, 0.1);
    let cfg = BnCfg { eps, momentum };
    // (N, H=W, channels, fused SiLU): odd shapes; rows_split 4 with C a multiple of 8 (vector path); rows_split 6
    // with a vectorised flat pass that wraps the grid; and rows_split at its cap (256) with C = 3 (a block of 32
    // channel lanes, 29 of them idle).
    for (n, hw, ch, silu) in [
        (3, 7, 13, true),
        (3, 9, 40, true),
        (3, 9, 40, false),
        (8, 16, 32, true),
        (4, 29, 32, true),
        (2, 257, 3, false),
    ] {
        let m = n * hw * hw;
        let split = rows_split(m as i64);
        let shape = format!("N={n} H=W={hw} C={ch}{} rows_split={split}", if silu { " +SiLU" } else { "" });
        let act = silu.then_some(Act::Silu);
        // An offset mean: a one-pass E[x²]−E[x]² would lose digits here.
        let (x, bx) = c.rand::<T>(m * ch, 2.0, 3.0)?;
        let (dy, bdy) = c.rand::<T>(m * ch, 1.0, 0.0)?;
        let (gamma, bgam) = c.rand::<f32>(ch, 0.5, 1.0)?;
        let (beta, bbet) = c.rand::<f32>(ch, 0.5, 0.0)?;
        let p = BnParams {
            m: m as i64,
            c: ch as i32,
            act: silu as i32,
            eps: eps as f32,
            momentum: momentum as f32,
            training: 1,
            rows_split: 0,
        };
        // Training: batch statistics, running stats updated, gradient through the statistics.
        let mut state = BnState::<f64>::new(ch);
        let mut want_y = vec![0.0; m * ch];
        let (rmean, rinv) = ops::batchnorm::forward(
            &x,
            ch,
            &gamma,
            &beta,
            &mut state,
            BnMode::Train { update_running: true },
            cfg,
            act,
            &mut want_y,
        )?;
        let (mean, invstd) = (c.poison::<f32>(ch)?, c.poison::<f32>(ch)?);
        let rm = c.output::<f32>(&vec![0.0; ch])?;
        let rv = c.output::<f32>(&vec![1.0; ch])?;
        let ws = c.scratch(bn_workspace_bytes(m as i64, ch as i32))?;
        g.kernels.bn_stats::<T>(
            &g.stream,
            &p,
            s(&bx),
            mean.v()?,
            invstd.v()?,
            Some(rm.v()?),
            Some(rv.v()?),
            ws.v()?,
        )?;
        let y = c.poison::<T>(m * ch)?;
        g.kernels.bn_forward::<T>(&g.stream, &p, y.v()?, s(&bx), mean.v()?, invstd.v()?, s(&bgam), s(&bbet))?;
        let (dx, dgam, dbet, sums) =
            (c.poison::<T>(m * ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(2 * ch)?);
        g.kernels.bn_backward::<T>(
            &g.stream,
            &p,
            dx.v()?,
            s(&bx),
            s(&bdy),
            mean.v()?,
            invstd.v()?,
            s(&bgam),
            s(&bbet),
            Some(dgam.v()?),
            Some(dbet.v()?),
            ws.v()?,
            sums.v()?,
        )?;
        let (mut wdx, mut wdg, mut wdb) = (vec![0.0; m * ch], vec![0.0; ch], vec![0.0; ch]);
        ops::batchnorm::backward(
            &x,
            ch,
            &gamma,
            &beta,
            &rmean,
            &rinv,
            true,
            act,
            &dy,
            Some(&mut wdx),
            Some(&mut wdg),
            Some(&mut wdb),
        );
        // Statistics are f32 whatever the storage: judge them at f32 reduction tolerance.
        let got = c.fetch::<f32>(&mean)?;
        c.record("bn_stats mean", Dtype::F32, &shape, &got, &rmean, Accuracy::Reduction);
        let got = c.fetch::<f32>(&invstd)?;
        c.record("bn_stats invstd", Dtype::F32, &shape, &got, &rinv, Accuracy::Reduction);
        let got = c.fetch::<f32>(&rm)?;
        c.record("bn_stats running_mean", Dtype::F32, &shape, &got, &state.running_mean, Accuracy::Reduction);
        let got = c.fetch::<f32>(&rv)?;
        c.record("bn_stats running_var", Dtype::F32, &shape, &got, &state.running_var, Accuracy::Reduction);
        let got = c.fetch::<T>(&y)?;
        c.record("bn_forward (train) y", dt, &shape, &got, &want_y, Accuracy::Elementwise);
        let got = c.fetch::<T>(&dx)?;
        c.record("bn_backward (train) dx", dt, &shape, &got, &wdx, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dgam)?;
        c.record("bn_backward (train) dgamma", Dtype::F32.max_of(dt), &shape, &got, &wdg, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dbet)?;
        c.record("bn_backward (train) dbeta", Dtype::F32.max_of(dt), &shape, &got, &wdb, Accuracy::Reduction);
        c.record_fence("bn workspace (train)", &shape, &ws)?;
        c.record_fence("bn sums (train)", &shape, &sums)?;

        // Eval: running statistics, the gradient treats them as constants.
        let (rmv, brm) = c.rand::<f32>(ch, 0.5, 3.0)?;
        let (rvv, brv) = c.rand::<f32>(ch, 0.5, 1.5)?;
        let mut state = BnState { running_mean: rmv.clone(), running_var: rvv.clone(), num_batches_tracked: 0 };
        let mut want_y = vec![0.0; m * ch];
        let (emean, einv) =
            ops::batchnorm::forward(&x, ch, &gamma, &beta, &mut state, BnMode::Eval, cfg, act, &mut want_y)?;
        let pe = BnParams { training: 0, ..p };
        let (mean, invstd) = (c.poison::<f32>(ch)?, c.poison::<f32>(ch)?);
        g.kernels.bn_eval_stats(&g.stream, &pe, s(&brm), s(&brv), mean.v()?, invstd.v()?)?;
        let y = c.poison::<T>(m * ch)?;
        g.kernels.bn_forward::<T>(&g.stream, &pe, y.v()?, s(&bx), mean.v()?, invstd.v()?, s(&bgam), s(&bbet))?;
        let (dx, dgam, dbet, sums) =
            (c.poison::<T>(m * ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(ch)?, c.poison::<f32>(2 * ch)?);
        g.kernels.bn_backward::<T>(
            &g.stream,
            &pe,
            dx.v()?,
            s(&bx),
            s(&bdy),
            mean.v()?,
            invstd.v()?,
            s(&bgam),
            s(&bbet),
            Some(dgam.v()?),
            Some(dbet.v()?),
            ws.v()?,
            sums.v()?,
        )?;
        let (mut wdx, mut wdg, mut wdb) = (vec![0.0; m * ch], vec![0.0; ch], vec![0.0; ch]);
        ops::batchnorm::backward(
            &x,
            ch,
            &gamma,
            &beta,
            &emean,
            &einv,
            false,
            act,
            &dy,
            Some(&mut wdx),
            Some(&mut wdg),
            Some(&mut wdb),
        );
        let got = c.fetch::<f32>(&mean)?;
        c.record("bn_eval_stats mean", Dtype::F32, &shape, &got, &emean, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&invstd)?;
        c.record("bn_eval_stats invstd", Dtype::F32, &shape, &got, &einv, Accuracy::Elementwise);
        let got = c.fetch::<T>(&y)?;
        c.record("bn_forward (eval) y", dt, &shape, &got, &want_y, Accuracy::Elementwise);
        let got = c.fetch::<T>(&dx)?;
        c.record("bn_backward (eval) dx", dt, &shape, &got, &wdx, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&dgam)?;
        c.record("bn_backward (eval) dgamma", Dtype::F32.max_of(dt), &shape, &got, &wdg, Accuracy::Reduction);
        let got = c.fetch::<f32>(&dbet)?;
        c.record("bn_backward (eval) dbeta", Dtype::F32.max_of(dt), &shape, &got, &wdb, Accuracy::Reduction);
        c.record_fence("bn workspace (eval)", &shape, &ws)?;
        c.record_fence("bn sums (eval)", &shape, &sums)?;
    }
    Ok(())
}

impl Dtype {
    /// The looser of two storage types: an f32 output computed from f16 inputs is judged at the f16 tolerance.
    fn max_of(self, other: Dtype) -> Dtype {
        if self == Dtype::F16 || other == Dtype::F16 { Dtype::F16 } else { Dtype::F32 }
    }
}

fn depthwise<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // (N, H, W, C, k, stride): odd shapes, an aligned one (C a multiple of 8), rows_split 6 (N·Ho·Wo = 3364), and
    // rows_split at its cap (N·Ho·Wo = 132098).
    for (n, h, w, ch, k, st) in [
        (3, 7, 7, 13, 3, 1),
        (3, 9, 9, 40, 5, 2),
        (3, 9, 7, 13, 3, 2),
        (2, 8, 8, 32, 5, 1),
        (4, 29, 29, 32, 3, 1),
        (2, 257, 257, 3, 3, 1),
    ] {
        let pad = (k - 1) / 2;
        let geom = ConvGeom::new(&[n, h, w, ch], &[ch, k, k, 1], ConvCfg { stride: st, pad, groups: ch })?;
        let (ho, wo) = (geom.oh, geom.ow);
        let p = DwParams {
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: ch as i32,
            ho: ho as i32,
            wo: wo as i32,
            k: k as i32,
            stride: st as i32,
            pad: pad as i32,
            rows_split: 0,
        };
        let split = rows_split((n * ho * wo) as i64);
        let shape = format!("N={n} H={h} W={w} C={ch} k={k} s={st} rows_split={split}");
        let (nx, ny, nw) = (n * h * w * ch, n * ho * wo * ch, k * k * ch);
        let (x, bx) = c.rand::<T>(nx, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(ny, 1.0, 0.0)?;
        // The GPU weights are [k, k, C]; the reference's are [C, k, k, 1].
        let (wk, bw) = c.rand::<T>(nw, 1.0, 0.0)?;
        let to_ref = |v: &[f64]| -> Vec<f64> { (0..nw).map(|i| v[(i % (k * k)) * ch + i / (k * k)]).collect() };
        let from_ref = |v: &[f64]| -> Vec<f64> { (0..nw).map(|i| v[(i % ch) * k * k + i / ch]).collect() };
        let wr = to_ref(&wk);
        let y = c.poison::<T>(ny)?;
        g.kernels.dw_forward::<T>(&g.stream, &p, y.v()?, s(&bx), s(&bw))?;
        let mut want = vec![0.0; ny];
        ops::conv::forward(&geom, &x, &wr, None, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("dw_forward y", dt, &shape, &got, &want, Accuracy::Elementwise);
        let dx = c.poison::<T>(nx)?;
        g.kernels.dw_backward_data::<T>(&g.stream, &p, dx.v()?, s(&bdy), s(&bw))?;
        let mut want = vec![0.0; nx];
        ops::conv::backward_data(&geom, &dy, &wr, &mut want);
        let got = c.fetch::<T>(&dx)?;
        c.record("dw_backward_data dx", dt, &shape, &got, &want, Accuracy::Elementwise);
        let dw = c.poison::<f32>(nw)?;
        let ws = c.scratch(dw_weight_workspace_bytes(&p))?;
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw.v()?, s(&bx), s(&bdy), ws.v()?, false)?;
        let mut want_r = vec![0.0; nw];
        ops::conv::backward_weight(&geom, &x, &dy, &mut want_r);
        let want = from_ref(&want_r);
        let got = c.fetch::<f32>(&dw)?;
        c.record("dw_backward_weight dw", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Reduction);
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw.v()?, s(&bx), s(&bdy), ws.v()?, true)?;
        let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
        let got = c.fetch::<f32>(&dw)?;
        c.record(
            "dw_backward_weight dw (accumulate)",
            Dtype::F32.max_of(dt),
            &shape,
            &got,
            &twice,
            Accuracy::Reduction,
        );
        c.record_fence("dw_backward_weight workspace", &shape, &ws)?;
        // The weight layouts end to end: the kernels' weights permuted from an f32 master [C, k*k], and their
        // gradient moved into a master-layout slot, against the CPU reference's [C, k, k, 1] gradient.
        let (master, bm) = c.rand::<f32>(nw, 1.0, 0.0)?;
        let wt = c.poison::<T>(nw)?;
        g.kernels.permute_from_f32::<T>(&g.stream, wt.v()?, s(&bm), ch, k * k)?;
        let want: Vec<f64> = from_ref(&master).iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let got = c.fetch::<T>(&wt)?;
        c.record_exact("permute master [C,kk] -> [kk,C]", dt, &shape, &got, &want);
        let slot = c.poison::<f32>(nw)?;
        let dw_dev = DevSlice::range(&dw.block, FENCE, nw * 4)?;
        g.kernels.dw_backward_weight::<T>(&g.stream, &p, dw_dev, s(&bx), s(&bdy), ws.v()?, false)?;
        g.kernels.transpose_add(&g.stream, slot.v()?, dw_dev, k * k, ch, false)?;
        let got = c.fetch::<f32>(&slot)?;
        c.record(
            "dw weight grad into the master slot",
            Dtype::F32.max_of(dt),
            &shape,
            &got,
            &want_r,
            Accuracy::Reduction,
        );
    }
    // Layout transposes alone: B0's largest depthwise weight (C = 1152, k = 5) and a tall one, both with more
    // 32x32 tiles than the grid has blocks (the tile loop wraps), and a single column.
    for (rows, cols) in [(1152usize, 25usize), (1061, 13), (7, 1)] {
        let shape = format!("rows={rows} cols={cols}");
        let n = rows * cols;
        let (x, bx) = c.rand::<f32>(n, 1.0, 0.0)?;
        let transposed: Vec<f64> = (0..n).map(|i| x[(i % rows) * cols + i / rows]).collect();
        let y = c.poison::<T>(n)?;
        g.kernels.permute_from_f32::<T>(&g.stream, y.v()?, s(&bx), rows, cols)?;
        let want: Vec<f64> = transposed.iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let got = c.fetch::<T>(&y)?;
        c.record_exact("permute", dt, &shape, &got, &want);
        if dt == Dtype::F32 {
            let y = c.poison::<f32>(n)?;
            g.kernels.transpose_add(&g.stream, y.v()?, s(&bx), rows, cols, false)?;
            let got = c.fetch::<f32>(&y)?;
            c.record_exact("transpose_add (write)", Dtype::F32, &shape, &got, &transposed);
            let (y0, _) = c.rand::<f32>(n, 1.0, 0.0)?;
            let y = c.output::<f32>(&y0)?;
            g.kernels.transpose_add(&g.stream, y.v()?, s(&bx), rows, cols, true)?;
            let want: Vec<f64> = y0.iter().zip(&transposed).map(|(a, b)| a + b).collect();
            let got = c.fetch::<f32>(&y)?;
            c.record("transpose_add (accumulate)", Dtype::F32, &shape, &got, &want, Accuracy::Elementwise);
        }
    }
    Ok(())
}

fn se<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // The last shape's flat passes (N·HW·C = 100352, vectorised by 4 or 8) wrap the emulated device's grid.
    for (n, hw, ch) in [(3usize, 49usize, 13usize), (3, 81, 40), (4, 196, 32), (2, 1, 7), (2, 784, 64)] {
        let shape = format!("N={n} HW={hw} C={ch}");
        let (nt, nc) = (n * hw * ch, n * ch);
        let (x, bx) = c.rand::<T>(nt, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(nt, 1.0, 0.0)?;
        let (sc, bs) = c.rand::<T>(nc, 1.0, 0.0)?;
        let (dp, bdp) = c.rand::<T>(nc, 1.0, 0.0)?;
        let (ni, hwi, ci) = (n as i32, hw as i32, ch as i32);
        let pooled = c.poison::<T>(nc)?;
        g.kernels.se_pool::<T>(&g.stream, pooled.v()?, s(&bx), ni, hwi, ci)?;
        let mut want = vec![0.0; nc];
        ops::pool::forward(&x, n, hw, ch, &mut want);
        let got = c.fetch::<T>(&pooled)?;
        c.record("se_pool", dt, &shape, &got, &want, Accuracy::Reduction);
        let pdx = c.poison::<T>(nt)?;
        g.kernels.se_pool_backward::<T>(&g.stream, pdx.v()?, s(&bdp), ni, hwi, ci)?;
        let mut want = vec![0.0; nt];
        ops::pool::backward(&dp, hw, ch, &mut want);
        let got = c.fetch::<T>(&pdx)?;
        c.record("se_pool_backward dx", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(nt)?;
        g.kernels.se_scale::<T>(&g.stream, y.v()?, s(&bx), s(&bs), ni, hwi, ci)?;
        let mut want = vec![0.0; nt];
        ops::scale::forward(&x, &sc, hw, ch, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("se_scale y", dt, &shape, &got, &want, Accuracy::Elementwise);
        let (dx, ds) = (c.poison::<T>(nt)?, c.poison::<T>(nc)?);
        g.kernels.se_scale_backward::<T>(&g.stream, Some(dx.v()?), ds.v()?, s(&bx), s(&bs), s(&bdy), (ni, hwi, ci))?;
        let (mut wdx, mut wds) = (vec![0.0; nt], vec![0.0; nc]);
        ops::scale::backward(&x, &sc, &dy, hw, ch, Some(&mut wdx), Some(&mut wds));
        let got = c.fetch::<T>(&dx)?;
        c.record("se_scale_backward dx", dt, &shape, &got, &wdx, Accuracy::Elementwise);
        let got = c.fetch::<T>(&ds)?;
        c.record("se_scale_backward dscale", dt, &shape, &got, &wds, Accuracy::Reduction);
        let ds = c.poison::<T>(nc)?;
        g.kernels.se_scale_backward::<T>(&g.stream, None, ds.v()?, s(&bx), s(&bs), s(&bdy), (ni, hwi, ci))?;
        let got = c.fetch::<T>(&ds)?;
        c.record("se_scale_backward dscale (no dx)", dt, &shape, &got, &wds, Accuracy::Reduction);
    }
    Ok(())
}

fn dropout<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    let seed = c.rng.next_u64();
    for (n, p) in [(3 * 9 * 9 * 40usize, 0.3f32), (4096, 0.2), (c.wrapping_len(), 0.1)] {
        let shape = format!("n={n} p={p}");
        let keep = 1.0 / (1.0 - p as f64);
        let (x, bx) = c.rand::<T>(n, 1.0, 0.0)?;
        let y = c.poison::<T>(n)?;
        g.kernels.dropout::<T>(&g.stream, y.v()?, s(&bx), p, seed, n)?;
        let mask: Vec<f64> = (0..n).map(|i| if uniform01(seed, i as u64) >= p { keep } else { 0.0 }).collect();
        let mut want = vec![0.0; n];
        ops::dropout::forward(&x, &mask, 1, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("dropout", dt, &shape, &got, &want, Accuracy::Elementwise);
    }
    // Stochastic depth: one coin per sample of H·W·C elements; forward adds the residual, backward does not.
    for (n, per, p) in [(3usize, 7 * 7 * 13usize, 0.5f32), (8, 8 * 8 * 32, 0.2), (5, c.wrapping_len() / 5, 0.4)] {
        let shape = format!("N={n} per_sample={per} p={p}");
        let total = n * per;
        let keep = 1.0 / (1.0 - p as f64);
        let (x, bx) = c.rand::<T>(total, 1.0, 0.0)?;
        let (res, bres) = c.rand::<T>(total, 1.0, 0.0)?;
        let mask: Vec<f64> = (0..n).map(|i| if uniform01(seed, i as u64) >= p { keep } else { 0.0 }).collect();
        let mut scaled = vec![0.0; total];
        ops::dropout::forward(&x, &mask, per, &mut scaled);
        let y = c.poison::<T>(total)?;
        g.kernels.stochastic_depth::<T>(&g.stream, y.v()?, s(&bx), Some(s(&bres)), p, seed, (total, per))?;
        let mut want = vec![0.0; total];
        ops::elementwise::add_forward(&res, &scaled, &mut want);
        let got = c.fetch::<T>(&y)?;
        c.record("stochastic_depth (+residual)", dt, &shape, &got, &want, Accuracy::Elementwise);
        let y = c.poison::<T>(total)?;
        g.kernels.stochastic_depth::<T>(&g.stream, y.v()?, s(&bx), None, p, seed, (total, per))?;
        let got = c.fetch::<T>(&y)?;
        c.record("stochastic_depth backward", dt, &shape, &got, &scaled, Accuracy::Elementwise);
    }
    Ok(())
}

fn loss<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    for (b, k) in [(37usize, 8usize), (5, 13), (256, 8)] {
        let (logits, bl) = c.rand::<T>(b * k, 4.0, 0.0)?;
        let targets: Vec<usize> = (0..b).map(|_| (c.rng.next_u64() % k as u64) as usize).collect();
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        let bt = g.upload(&t32)?;
        let (alpha, ba) = c.rand::<f32>(k, 0.4, 1.0)?;
        for (kind, grad_scale) in [
            (LossKind::CrossEntropy, 1.0f32),
            (LossKind::Focal { gamma: 2.0 }, 1.0),
            (LossKind::Focal { gamma: 0.5 }, 1024.0),
        ] {
            let (focal, gamma) = match kind {
                LossKind::Focal { gamma } => (1, gamma as f32),
                LossKind::CrossEntropy => (0, 0.0),
            };
            let shape = format!(
                "B={b} K={k} {} scale={grad_scale}",
                if focal == 1 { format!("focal γ={gamma}") } else { "CE".into() }
            );
            let p = LossParams { b: b as i32, k: k as i32, focal, gamma, grad_scale, pad_: 0 };
            let (lo, dl, probs, bad) =
                (c.poison::<f32>(1)?, c.poison::<T>(b * k)?, c.poison::<f32>(b * k)?, c.poison::<f32>(1)?);
            g.kernels.softmax_loss::<T>(
                &g.stream,
                &p,
                lo.v()?,
                dl.v()?,
                Some(probs.v()?),
                bad.v()?,
                s(&bl),
                s(&bt),
                Some(s(&ba)),
            )?;
            let (want_loss, grad) = ops::loss::forward_backward(&logits, k, &targets, Some(&alpha), &kind)?;
            let want_dl: Vec<f64> = grad.iter().map(|v| v * grad_scale as f64).collect();
            let got = c.fetch::<f32>(&lo)?;
            c.record("softmax_loss loss", Dtype::F32.max_of(dt), &shape, &got, &[want_loss], Accuracy::Reduction);
            let got = c.fetch::<T>(&dl)?;
            c.record("softmax_loss dlogits", dt, &shape, &got, &want_dl, Accuracy::Reduction);
            let got = c.fetch::<f32>(&probs)?;
            let want = ops::loss::softmax_rows(&logits, k);
            c.record("softmax_loss probs", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Elementwise);
            let got = c.fetch::<i32>(&bad)?;
            c.record_exact("softmax_loss bad_target (none)", dt, &shape, &got, &[0.0]);
        }
        // Targets outside [0, K) in two rows: the first of them is reported, by its 1-based row, whichever
        // thread reaches its bad row last (with one block of 256 threads, rows below 256 have one thread each).
        let (first, second) = (b / 3, b - 1);
        let mut t2 = t32.clone();
        t2[first] = k as i32;
        t2[second] = -1;
        let bt2 = g.upload(&t2)?;
        let p = LossParams { b: b as i32, k: k as i32, focal: 0, gamma: 0.0, grad_scale: 1.0, pad_: 0 };
        // The buffer starts as NaN bits: the kernel must write it whatever it held.
        let (lo, dl, bad) = (c.poison::<f32>(1)?, c.poison::<T>(b * k)?, c.poison::<f32>(1)?);
        g.kernels.softmax_loss::<T>(&g.stream, &p, lo.v()?, dl.v()?, None, bad.v()?, s(&bl), s(&bt2), None)?;
        let got = c.fetch::<i32>(&bad)?;
        let shape = format!("B={b} K={k} target[{first}]={k} target[{second}]=-1");
        c.record_exact("softmax_loss bad_target (first bad row, 1-based)", dt, &shape, &got, &[(first + 1) as f64]);
    }
    Ok(())
}

fn optim(c: &mut Ctx) -> Result<()> {
    let g = c.g;
    let scaler = GradScaler::new(GradScalerConfig { init_scale: 1024.0, ..GradScalerConfig::default() })?;
    let inv = 1.0 / 1024.0;
    for n in [4099usize, 4096, c.wrapping_len()] {
        let shape = format!("n={n}");
        for dt in [Dtype::F32, Dtype::F16] {
            let (gr, bg) = match dt {
                Dtype::F32 => c.rand::<f32>(n, 100.0, 0.0)?,
                Dtype::F16 => c.rand::<f16>(n, 100.0, 0.0)?,
            };
            for with_inf in [false, true] {
                let mut host = gr.clone();
                if with_inf {
                    host[n - 2] = f64::INFINITY;
                }
                let bg_inf;
                let src = if with_inf {
                    bg_inf = match dt {
                        Dtype::F32 => c.put::<f32>(&host)?,
                        Dtype::F16 => c.put::<f16>(&host)?,
                    };
                    &bg_inf
                } else {
                    &bg
                };
                let (out, fi) = (c.poison::<f32>(n)?, c.fenced(&[0i32])?);
                match dt {
                    Dtype::F32 => g.kernels.unscale::<f32>(&g.stream, out.v()?, s(src), inv, fi.v()?, n)?,
                    Dtype::F16 => g.kernels.unscale::<f16>(&g.stream, out.v()?, s(src), inv, fi.v()?, n)?,
                }
                let mut reference: Vec<f32> = host.iter().map(|&v| v as f32).collect();
                let found = scaler.unscale_and_check(&mut [&mut reference[..]]);
                let got_fi = c.fetch::<i32>(&fi)?;
                let tag = if with_inf { " (one inf)" } else { "" };
                c.record_exact(&format!("unscale found_inf{tag}"), dt, &shape, &got_fi, &[found as i32 as f64]);
                if !with_inf {
                    let want: Vec<f64> = reference.iter().map(|&v| v as f64).collect();
                    let got = c.fetch::<f32>(&out)?;
                    c.record("unscale out", dt, &shape, &got, &want, Accuracy::Elementwise);
                }
            }
        }
        // AdamW: three steps against the CPU optimizer, with the fp16 weight copy.
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let lr = 1e-3;
        let mut cpu = AdamW::new(cfg)?;
        let p0: Vec<f64> = (0..n).map(|_| c.rng.sym() as f32 as f64).collect();
        let (bp, bm, bv, p16) = (
            c.output::<f32>(&p0)?,
            c.output::<f32>(&vec![0.0; n])?,
            c.output::<f32>(&vec![0.0; n])?,
            c.poison::<f16>(n)?,
        );
        let zero = c.fenced(&[0i32])?;
        let mut param: Vec<f32> = p0.iter().map(|&v| v as f32).collect();
        for t in 1..=3u64 {
            let (gr, bgr) = c.rand::<f32>(n, 1.0, 0.0)?;
            let grad: Vec<f32> = gr.iter().map(|&v| v as f32).collect();
            cpu.step_one("p", &mut param, &grad, lr)?;
            let a = AdamParams::for_step(n, t, lr, &cfg);
            g.kernels.adamw(&g.stream, &a, bp.v()?, s(&bgr), bm.v()?, bv.v()?, Some(p16.v()?), Some(zero.v()?))?;
        }
        let Some(state) = cpu.state("p") else { bail!("the CPU AdamW kept no state for its parameter") };
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let want_p = f(&param);
        let got = c.fetch::<f32>(&bp)?;
        c.record("adamw param (3 steps)", Dtype::F32, &shape, &got, &want_p, Accuracy::Elementwise);
        let got = c.fetch::<f32>(&bm)?;
        c.record("adamw exp_avg", Dtype::F32, &shape, &got, &f(&state.exp_avg), Accuracy::Elementwise);
        let got = c.fetch::<f32>(&bv)?;
        c.record("adamw exp_avg_sq", Dtype::F32, &shape, &got, &f(&state.exp_avg_sq), Accuracy::Elementwise);
        let got = c.fetch::<f16>(&p16)?;
        c.record("adamw fp16 weight copy", Dtype::F16, &shape, &got, &want_p, Accuracy::Elementwise);
        // found_inf set: the device skips the whole step. Compare with a snapshot of the state taken just before,
        // exactly (the CPU reference differs from the device by rounding, so it cannot show "untouched").
        let before = [c.fetch::<f32>(&bp)?, c.fetch::<f32>(&bm)?, c.fetch::<f32>(&bv)?, c.fetch::<f16>(&p16)?];
        let one = g.upload(&[1i32])?;
        let (_, bgr) = c.rand::<f32>(n, 1.0, 0.0)?;
        let a = AdamParams::for_step(n, 4, lr, &cfg);
        g.kernels.adamw(&g.stream, &a, bp.v()?, s(&bgr), bm.v()?, bv.v()?, Some(p16.v()?), Some(s(&one)))?;
        let after = [c.fetch::<f32>(&bp)?, c.fetch::<f32>(&bm)?, c.fetch::<f32>(&bv)?, c.fetch::<f16>(&p16)?];
        for (name, (b, a)) in ["param", "exp_avg", "exp_avg_sq", "fp16 copy"].iter().zip(before.iter().zip(&after)) {
            let dt = if *name == "fp16 copy" { Dtype::F16 } else { Dtype::F32 };
            c.record_exact(&format!("adamw skipped on found_inf: {name} untouched"), dt, &shape, a, &b.values);
        }
    }
    Ok(())
}

fn gemm(c: &mut Ctx) -> Result<()> {
    if !c.g.is_emulated() && !probe().cublaslt {
        bail!("cuBLASLt (libcublasLt.so) was not found: add it to LD_LIBRARY_PATH");
    }
    let blas = super::blas::Blas::new(c.g)?;
    for (m, k, n, ta, tb) in [
        (37, 24, 40, false, false),
        (64, 32, 16, true, false),
        (13, 40, 9, false, true),
        (64, 64, 64, true, true),
        (7, 3, 5, true, false),
    ] {
        let spec = super::blas::Gemm { m, n, k, trans_a: ta, trans_b: tb };
        let shape = format!("[{m}x{k}]x[{k}x{n}] ta={ta} tb={tb}");
        // (alpha, beta): a plain product, and an update of what C holds (beta = 1: gradient accumulation).
        for (alpha, beta) in [(1.0f32, 0.0f32), (-0.75, 1.0)] {
            let ab = format!("alpha={alpha} beta={beta}");
            // Inputs of $a, output of $c; C starts as NaN when beta = 0 (it must not be read), else random.
            macro_rules! run {
                ($a:ty, $c:ty, $op:expr, $dt:expr, $acc:expr) => {{
                    let (a, ba) = c.rand::<$a>(m * k, 1.0, 0.0)?;
                    let (b, bb) = c.rand::<$a>(k * n, 1.0, 0.0)?;
                    let mut want = if beta == 0.0 { vec![0.0; m * n] } else { c.rand::<$c>(m * n, 1.0, 0.0)?.0 };
                    let bc = if beta == 0.0 { c.poison::<$c>(m * n)? } else { c.output::<$c>(&want)? };
                    blas.gemm_into::<$a, $c>(&spec, alpha, s(&ba), s(&bb), beta, bc.v()?)?;
                    ops::gemm::gemm(m, k, n, alpha as f64, &a, ta, &b, tb, beta as f64, &mut want);
                    let got = c.fetch::<$c>(&bc)?;
                    c.record(&format!("{} {ab}", $op), $dt, &shape, &got, &want, $acc);
                }};
            }
            // Strict f32 compute (no TF32): an f32 sum over k, judged as one.
            run!(f32, f32, "gemm f32", Dtype::F32, Accuracy::Reduction);
            run!(f16, f16, "gemm f16", Dtype::F16, Accuracy::TensorOp);
            // f16 inputs are exact in f32 and so are their products: only the f32 accumulation rounds.
            run!(f16, f32, "gemm f16->f32", Dtype::F32, Accuracy::Reduction);
        }
    }
    Ok(())
}

fn linear<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    // (rows, cols): the classifier at batch 3 (9 classes), odd shapes, an aligned one (vector path), a column
    // count one past a 32-column tile, flat lengths past three grid passes (vectorised and scalar), and many rows
    // per column lane.
    for (rows, cols) in [(3usize, 9usize), (37, 13), (64, 40), (5, 33), (97, 1032), (101, 999), (1031, 7)] {
        let shape = format!("rows={rows} cols={cols}");
        let n = rows * cols;
        let (y0, _) = c.rand::<T>(n, 1.0, 0.0)?;
        let (bias, bb) = c.rand::<f32>(cols, 1.0, 0.0)?;
        let y = c.output::<T>(&y0)?;
        g.kernels.bias_add::<T>(&g.stream, y.v()?, s(&bb), rows, cols)?;
        let want: Vec<f64> = (0..n).map(|i| y0[i] + bias[i % cols]).collect();
        let got = c.fetch::<T>(&y)?;
        c.record("bias_add", dt, &shape, &got, &want, Accuracy::Elementwise);

        let (x, bx) = c.rand::<T>(n, 1.0, 0.0)?;
        let mut sums = vec![0.0; cols];
        for (i, v) in x.iter().enumerate() {
            sums[i % cols] += v;
        }
        let out = c.poison::<f32>(cols)?;
        g.kernels.col_sum::<T>(&g.stream, out.v()?, s(&bx), rows, cols, false)?;
        let got = c.fetch::<f32>(&out)?;
        c.record("col_sum", Dtype::F32.max_of(dt), &shape, &got, &sums, Accuracy::Reduction);
        // Accumulate into a gradient slot that already holds values.
        let (slot0, _) = c.rand::<f32>(cols, 1.0, 0.0)?;
        let slot = c.output::<f32>(&slot0)?;
        g.kernels.col_sum::<T>(&g.stream, slot.v()?, s(&bx), rows, cols, true)?;
        let want: Vec<f64> = slot0.iter().zip(&sums).map(|(a, b)| a + b).collect();
        let got = c.fetch::<f32>(&slot)?;
        c.record("col_sum (accumulate)", Dtype::F32.max_of(dt), &shape, &got, &want, Accuracy::Reduction);
    }
    // bias_add through a view at +1 element (cols a multiple of the vector): the scalar path.
    let (rows, cols) = (16usize, 40usize);
    let n = rows * cols;
    let es = size_of::<T>();
    let (y0, _) = c.rand::<T>(n + 1, 1.0, 0.0)?;
    let (bias, bb) = c.rand::<f32>(cols, 1.0, 0.0)?;
    let y = c.output::<T>(&y0)?;
    g.kernels.bias_add::<T>(&g.stream, DevSlice::range(&y.block, FENCE + es, n * es)?, s(&bb), rows, cols)?;
    let mut want = y0.clone();
    for i in 0..n {
        want[i + 1] += bias[i % cols];
    }
    let got = c.fetch::<T>(&y)?;
    c.record(
        "bias_add (view at +1 element)",
        dt,
        &format!("rows={rows} cols={cols}"),
        &got,
        &want,
        Accuracy::Elementwise,
    );
    Ok(())
}

fn conv<T: Store>(c: &mut Ctx) -> Result<()> {
    let (g, dt) = (c.g, T::DTYPE);
    if !g.is_emulated() && !probe().cudnn {
        bail!("cuDNN (libcudnn.so) was not found: install cuDNN 9 or add it to LD_LIBRARY_PATH");
    }
    let dnn = super::dnn::Dnn::new(g)?;
    // (N, H=W, Cin, Cout, k, stride, groups): a stem-like 3×3 s2, a 1×1 projection, an aligned 3×3.
    for (n, hw, cin, cout, k, st) in
        [(3usize, 9usize, 3usize, 13usize, 3usize, 2usize), (3, 7, 40, 13, 1, 1), (2, 8, 16, 32, 3, 1)]
    {
        let pad = (k - 1) / 2;
        let geom = ConvGeom::new(&[n, hw, hw, cin], &[cout, k, k, cin], ConvCfg { stride: st, pad, groups: 1 })?;
        let sh = super::dnn::ConvShape {
            n: n as i32,
            c_in: cin as i32,
            h: hw as i32,
            w: hw as i32,
            c_out: cout as i32,
            k: k as i32,
            stride: st as i32,
            pad: pad as i32,
            groups: 1,
            half: dt == Dtype::F16,
        };
        let shape = format!("N={n} H=W={hw} Cin={cin} Cout={cout} k={k} s={st}");
        let (nx, nw, ny) = (n * hw * hw * cin, cout * k * k * cin, n * geom.oh * geom.ow * cout);
        let (x, bx) = c.rand::<T>(nx, 1.0, 0.0)?;
        let (w, bw) = c.rand::<T>(nw, 1.0, 0.0)?;
        let (dy, bdy) = c.rand::<T>(ny, 1.0, 0.0)?;
        let mut ws_bytes = 1;
        for pass in [super::dnn::Pass::Forward, super::dnn::Pass::BackwardData, super::dnn::Pass::BackwardFilter] {
            ws_bytes = ws_bytes.max(dnn.workspace_bytes(&sh, pass)?);
        }
        let ws = c.scratch(ws_bytes)?;
        let (y, dx, dw) = (c.poison::<T>(ny)?, c.poison::<T>(nx)?, c.poison::<T>(nw)?);
        dnn.forward::<T>(&sh, s(&bx), s(&bw), y.v()?, ws.v()?)?;
        dnn.backward_data::<T>(&sh, s(&bdy), s(&bw), dx.v()?, ws.v()?)?;
        dnn.backward_filter::<T>(&sh, s(&bx), s(&bdy), dw.v()?, ws.v()?, false)?;
        let (mut wy, mut wdx, mut wdw) = (vec![0.0; ny], vec![0.0; nx], vec![0.0; nw]);
        ops::conv::forward(&geom, &x, &w, None, &mut wy);
        ops::conv::backward_data(&geom, &dy, &w, &mut wdx);
        ops::conv::backward_weight(&geom, &x, &dy, &mut wdw);
        let got = c.fetch::<T>(&y)?;
        c.record("cudnn conv forward y", dt, &shape, &got, &wy, Accuracy::TensorOp);
        let got = c.fetch::<T>(&dx)?;
        c.record("cudnn conv backward_data dx", dt, &shape, &got, &wdx, Accuracy::TensorOp);
        let got = c.fetch::<T>(&dw)?;
        c.record("cudnn conv backward_filter dw", dt, &shape, &got, &wdw, Accuracy::TensorOp);
        c.record_fence("cudnn conv workspace", &shape, &ws)?;
    }
    Ok(())
}

/// ptxas's per-kernel report as JSON objects (empty when the kernels were not built).
pub fn resources_json() -> Vec<serde_json::Value> {
    build_info::RESOURCES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
            serde_json::json!({
                "file": f.first(),
                "kernel": f.get(1),
                "arch": f.get(2),
                "registers": num(3),
                "smem_bytes": num(4),
                "stack_bytes": num(5),
                "spill_stores": num(6),
                "spill_loads": num(7),
            })
        })
        .collect()
}

fn fmt_err(v: f64) -> String {
    if v.is_finite() { format!("{v:.2e}") } else { "NaN/inf".into() }
}

/// The results as a text table, one row per comparison, failures marked.
pub fn render_table(results: &[CheckResult]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<12} {:<40} {:<5} {:<44} {:>10} {:>10} {:>8} {:>9} {:>7}  result",
        "family", "op", "dtype", "shape", "max_abs", "rel", "tol", "elem", "outside"
    );
    for r in results {
        let _ = writeln!(
            t,
            "{:<12} {:<40} {:<5} {:<44} {:>10} {:>10} {:>8.0e} {:>9} {:>7}  {}",
            r.family.name(),
            r.op,
            r.dtype.name(),
            r.shape,
            fmt_err(r.max_abs_err),
            fmt_err(r.rel_err),
            r.tol,
            fmt_err(r.elem_err),
            r.outside_writes,
            if r.pass { "ok" } else { "FAIL" }
        );
    }
    t
}

/// Runs `derma check`: an error (non-zero exit) when there is no usable device, a launch fails, or any
/// comparison is outside its tolerance.
pub fn run(args: &CheckArgs) -> Result<()> {
    let selected = device_for_check(&probe(), args.device)?;
    let gpu = Gpu::open(&selected)?;
    let info = gpu.info.clone();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let schedule = match (gpu.is_emulated(), args.schedule) {
        (true, s) => Some(s.unwrap_or(Schedule::Forward)),
        (false, None) => None,
        (false, Some(s)) => bail!(
            "--schedule {} applies to the emulated device only (--device emu): a GPU schedules its own threads",
            s.name()
        ),
    };
    if let Some(s) = schedule {
        gpu.set_schedule(s, seed)?;
    }
    let families: Vec<Family> = if args.family.is_empty() { Family::ALL.to_vec() } else { args.family.clone() };
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for f in families {
        match check_family(&gpu, f, seed) {
            Ok(r) => results.extend(r),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let failures: Vec<&CheckResult> = results.iter().filter(|r| !r.pass).collect();
    if args.json {
        let doc = serde_json::json!({
            "device": {
                "ordinal": info.ordinal,
                "name": info.name,
                "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
                "emulated": gpu.is_emulated(),
                "schedule": schedule,
                "sms": gpu.kernels.sms(),
            },
            "seed": seed,
            "relative_error": "max|got - ref| / max(max|ref|, 1e-30), per output tensor",
            "element_error": "max over elements of |got - ref| / (atol + tol*|ref|), atol = tol*floor*max|ref| + the \
                              smallest subnormal; at most 1",
            "outside_writes": "bytes changed in the 256-byte canaries before and after each output; must be 0",
            "results": results,
            "failures": failures.len(),
            "errors": errors,
            "ptxas_resources": resources_json(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        match schedule {
            Some(s) => println!("derma check on emu ({}), schedule {}, seed {seed}", info.name, s.name()),
            None => println!("derma check on cuda:{} ({}), seed {seed}", info.ordinal, info.name),
        }
        println!(
            "rel = max|got - ref| / max|ref| per output tensor, elem = worst |got - ref| / (atol + tol*|ref|) per \
             element (<= 1), outside = canary bytes changed around the output; reference: src/ops in f64 on the \
             same inputs"
        );
        print!("{}", render_table(&results));
        for e in &errors {
            println!("ERROR: {e}");
        }
        println!("{} checks, {} failed, {} families errored", results.len(), failures.len(), errors.len());
    }
    if !failures.is_empty() || !errors.is_empty() {
        bail!(
            "{} of {} GPU-vs-CPU comparisons failed and {} families could not run (seed {seed}; rerun with --seed \
             {seed} to replay)",
            failures.len(),
            results.len(),
            errors.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_naming_it() {
        let none = Probe::default();
        for req in [DeviceRequest::Auto, DeviceRequest::Cuda(0), DeviceRequest::Cuda(2)] {
            let e = device_for_check(&none, req).unwrap_err().to_string();
            assert!(e.contains("needs a CUDA device"), "{e}");
            assert!(e.contains("libcuda.so"), "{e}");
        }
        let e = device_for_check(&none, DeviceRequest::Auto).unwrap_err().to_string();
        assert!(e.contains("--device auto"), "{e}");
        let e = device_for_check(&none, DeviceRequest::Cpu).unwrap_err().to_string();
        assert!(e.contains("needs a CUDA device") && e.contains("--device cuda") && e.contains("--device emu"), "{e}");
        // The emulated device needs no driver.
        assert_eq!(device_for_check(&none, DeviceRequest::Emu).unwrap(), Selected::Emulated);
    }

    #[test]
    fn a_usable_probe_selects_its_device() {
        let p = crate::cuda::usable_test_probe();
        assert!(matches!(device_for_check(&p, DeviceRequest::Auto), Ok(Selected::Cuda(g)) if g.name == "Test GPU"));
        let e = device_for_check(&p, DeviceRequest::Cuda(1)).unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("no CUDA device 1"), "{e}");
    }

    fn row(got: &[f64], want: &[f64], dtype: Dtype, tol: Tolerance) -> CheckResult {
        judge(Family::Se, "x", dtype, "3", got, want, tol, 0)
    }

    #[test]
    fn errors_and_tolerances_on_hand_cases() {
        let want = [1.0, -2.0, 4.0];
        let f32_elem = tolerance(Dtype::F32, Accuracy::Elementwise);
        assert_eq!(max_errors(&want, &want), (0.0, 0.0));
        assert!(row(&want, &want, Dtype::F32, f32_elem).pass);
        // Exact match passes even at tolerance 0.
        assert!(row(&want, &want, Dtype::F32, Tolerance::EXACT).pass);
        // One element off by 4e-5: rel = 4e-5 / 4 = 1e-5.
        let got = [1.0, -2.0, 4.00004];
        let (a, r) = max_errors(&got, &want);
        assert!((a - 4e-5).abs() < 1e-12 && (r - 1e-5).abs() < 1e-12, "{a} {r}");
        assert!(!row(&[1.0, -2.0, 4.0001], &want, Dtype::F32, f32_elem).pass);
        assert!(row(&[1.0, -2.0, 4.0001], &want, Dtype::F16, tolerance(Dtype::F16, Accuracy::Elementwise)).pass);
        // NaN (an unwritten, poisoned element) or inf fails whatever the tolerance.
        for bad in [f64::NAN, f64::INFINITY] {
            let got = [1.0, bad, 4.0];
            assert!(max_errors(&got, &want).1.is_infinite());
            assert!(!row(&got, &want, Dtype::F16, Tolerance { rel: 1.0, floor: 1.0 }).pass);
        }
        // Missing elements fail.
        assert!(!row(&want[..2], &want, Dtype::F32, Tolerance { rel: 1.0, floor: 1.0 }).pass);
        // An all-zero reference: exact zeros pass, anything above the smallest subnormal fails.
        assert!(row(&[0.0, 0.0], &[0.0, 0.0], Dtype::F32, f32_elem).pass);
        assert!(!row(&[0.0, 1e-20], &[0.0, 0.0], Dtype::F32, f32_elem).pass);
        assert_eq!(tolerance(Dtype::F16, Accuracy::Elementwise).rel, 1e-2);
        assert!(tolerance(Dtype::F32, Accuracy::Reduction).rel > tolerance(Dtype::F32, Accuracy::Elementwise).rel);
        // Bit-exact rows: one ulp apart fails.
        let one_ulp = f32::from_bits(1.0f32.to_bits() + 1) as f64;
        assert!(!row(&[one_ulp], &[1.0], Dtype::F32, Tolerance::EXACT).pass);
    }

    #[test]
    fn per_element_error_catches_a_wrong_small_element() {
        // An f16 output whose largest element is 1 and one element of 1e-3 came back as 0: the max-norm error
        // (1e-3) is well inside f16's 1e-2, the element itself is 100% off.
        let want: Vec<f64> = (0..64).map(|i| if i == 5 { 1e-3 } else { 0.5 + i as f64 / 128.0 }).collect();
        let mut got = want.clone();
        got[5] = 0.0;
        let tol = tolerance(Dtype::F16, Accuracy::Elementwise);
        let r = row(&got, &want, Dtype::F16, tol);
        assert!(r.rel_err <= tol.rel, "the max-norm error alone would pass: {r:?}");
        assert!(r.elem_err > 1.0 && !r.pass, "{r:?}");
        // The same element rounded as f16 rounds it (relative 2^-11) passes.
        got[5] = f16::from_f64(1e-3).to_f64();
        let r = row(&got, &want, Dtype::F16, tol);
        assert!(r.pass && r.elem_err < 0.1, "{r:?}");
        // In f32: an element of 1e-4·max off by 2% passes the max-norm bound (rel 2e-6) but not its own (atol 1e-6).
        let want = [1.0, 1e-4];
        let r = row(&[1.0, 1.02e-4], &want, Dtype::F32, tolerance(Dtype::F32, Accuracy::Elementwise));
        assert!(r.rel_err <= 1e-5 && !r.pass, "{r:?}");
        // element_error's own scale: exactly at the bound is 1.
        assert!((element_error(&[1.1], &[1.0], 0.05, 0.05) - 1.0).abs() < 1e-12);
        assert_eq!(element_error(&[2.0], &[2.0], 0.0, 0.0), 0.0);
        assert!(element_error(&[2.0], &[2.5], 0.0, 0.0).is_infinite());
    }

    #[test]
    fn a_write_outside_the_output_fails_the_row() {
        let r = judge(Family::Se, "x", Dtype::F32, "3", &[1.0], &[1.0], Tolerance::EXACT, 4);
        assert!(!r.pass && r.outside_writes == 4, "{r:?}");
        let t = render_table(&[r]);
        assert!(t.lines().nth(1).is_some_and(|l| l.ends_with("4  FAIL")), "{t}");
    }

    #[test]
    fn fences_count_bytes_written_around_an_output() {
        let g = Gpu::emulated().unwrap();
        let c = Ctx { g: &g, rng: SplitMix(1), family: Family::Se, out: vec![] };
        let f = c.poison::<f32>(10).unwrap();
        assert_eq!(f.v().unwrap().len_bytes(), 40);
        assert_eq!(f.v().unwrap().addr() % 256, 0, "the view keeps cudaMalloc's alignment");
        let got = c.fetch::<f32>(&f).unwrap();
        assert!(got.values.len() == 10 && got.values.iter().all(|v| v.is_nan()) && got.outside == 0);
        // One f32 past the end and one byte before the start.
        g.write(&f.block, FENCE + 40, &[1.0f32]).unwrap();
        g.write(&f.block, FENCE - 1, &[0u8]).unwrap();
        assert_eq!(c.fetch::<f32>(&f).unwrap().outside, 5);
        // Writing inside the view leaves the canaries alone.
        let f = c.output::<f16>(&[1.0, 2.0, 3.0]).unwrap();
        g.write(&f.block, FENCE, &[f16::from_f32(7.0); 3]).unwrap();
        let got = c.fetch::<f16>(&f).unwrap();
        assert_eq!((got.values, got.outside), (vec![7.0; 3], 0));
    }

    #[test]
    fn table_and_resources_render() {
        let rows = vec![
            row(&[1.0], &[1.0], Dtype::F16, tolerance(Dtype::F16, Accuracy::Elementwise)),
            row(&[f64::NAN], &[1.0], Dtype::F32, tolerance(Dtype::F32, Accuracy::Elementwise)),
        ];
        let t = render_table(&rows);
        assert_eq!(t.lines().count(), 3, "{t}");
        assert!(t.lines().nth(1).is_some_and(|l| l.ends_with("ok")), "{t}");
        assert!(t.lines().nth(2).is_some_and(|l| l.ends_with("FAIL") && l.contains("NaN/inf")), "{t}");
        let n = build_info::RESOURCES.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
        assert_eq!(resources_json().len(), n);
    }

    #[test]
    fn an_erroring_part_becomes_a_failed_row_and_the_family_goes_on() {
        let gpu = Gpu::emulated().unwrap();
        let mut c = Ctx { g: &gpu, rng: SplitMix(1), family: Family::Elementwise, out: vec![] };
        fn ok_part(c: &mut Ctx) -> Result<()> {
            c.record(
                "first",
                Dtype::F32,
                "1",
                &Fetched { values: vec![1.0], outside: 0 },
                &[1.0],
                Accuracy::Elementwise,
            );
            Ok(())
        }
        fn failing_part(c: &mut Ctx) -> Result<()> {
            c.record(
                "before the error",
                Dtype::F16,
                "1",
                &Fetched { values: vec![2.0], outside: 0 },
                &[2.0],
                Accuracy::Elementwise,
            );
            // A wrapper's error: an in-place call of a restrict kernel.
            let b = c.g.upload(&[0.5f32; 8])?;
            c.g.kernels.unary::<f32>(&c.g.stream, Unary::Silu, s(&b), s(&b), 8)?;
            c.record(
                "never reached",
                Dtype::F16,
                "1",
                &Fetched { values: vec![0.0], outside: 0 },
                &[0.0],
                Accuracy::Elementwise,
            );
            Ok(())
        }
        fn last_part(c: &mut Ctx) -> Result<()> {
            c.record(
                "after",
                Dtype::F32,
                "1",
                &Fetched { values: vec![3.0], outside: 0 },
                &[3.0],
                Accuracy::Elementwise,
            );
            Ok(())
        }
        let parts: [(&'static str, Dtype, Part); 3] =
            [("a", Dtype::F32, ok_part), ("b", Dtype::F16, failing_part), ("c", Dtype::F32, last_part)];
        run_parts(&mut c, &parts);
        let ops: Vec<&str> = c.out.iter().map(|r| r.op.as_str()).collect();
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert_eq!((ops[0], ops[1], ops[3]), ("first", "before the error", "after"));
        let err = &c.out[2];
        assert!(!err.pass && err.rel_err.is_infinite() && err.dtype == Dtype::F16);
        assert!(
            err.op.starts_with("ERROR in b: checking the elementwise kernels")
                && err.op.contains("unary: output y overlaps x"),
            "{}",
            err.op
        );
    }

    #[test]
    fn splitmix_is_reproducible_and_spread() {
        let (mut a, mut b) = (SplitMix(7), SplitMix(7));
        let xs: Vec<f64> = (0..1000).map(|_| a.sym()).collect();
        assert!(xs.iter().all(|&x| (-1.0..1.0).contains(&x)));
        assert_eq!(xs[999], (0..1000).map(|_| b.sym()).last().unwrap_or(f64::NAN));
        let mean = xs.iter().sum::<f64>() / 1000.0;
        assert!(mean.abs() < 0.1, "{mean}");
    }
}
