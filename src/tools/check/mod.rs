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

use crate::cuda::alloc::Block;
use crate::cuda::kernels::{DevSlice, Elem};
use crate::cuda::{DeviceRequest, Gpu, Probe, Schedule, Selected, build_info, parse_device, probe, select_from};

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
    /// The fused training augmentation against the CPU applier, per element (see [`crate::data::augment::cuda`]).
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
pub(crate) fn subnormal_step(dtype: Dtype) -> f64 {
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
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn sym(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }
}

/// The state of one family's run: device, random source, results so far.
pub(crate) struct Ctx<'g> {
    pub(crate) g: &'g Gpu,
    pub(crate) rng: SplitMix,
    pub(crate) family: Family,
    pub(crate) out: Vec<CheckResult>,
}

pub(crate) fn s(b: &Block) -> DevSlice<'_> {
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
pub(crate) struct Fenced {
    pub(crate) block: Block,
    pub(crate) len: usize,
}

impl Fenced {
    /// The view a kernel writes to.
    pub(crate) fn v(&self) -> Result<DevSlice<'_>> {
        DevSlice::range(&self.block, FENCE, self.len)
    }
}

/// An output read back: its values and how many canary bytes around it the op changed.
pub(crate) struct Fetched {
    pub(crate) values: Vec<f64>,
    pub(crate) outside: usize,
}

impl<'g> Ctx<'g> {
    /// `n` values uniform in [offset − scale, offset + scale), rounded to `T`: (the rounded values, a device copy).
    pub(crate) fn rand<T: Store>(&mut self, n: usize, scale: f64, offset: f64) -> Result<(Vec<f64>, Block)> {
        let host: Vec<T> = (0..n).map(|_| T::from_f64(offset + scale * self.rng.sym())).collect();
        let b = self.g.upload(&host)?;
        Ok((host.into_iter().map(T::to_f64).collect(), b))
    }

    /// Uploads `v` rounded to `T`.
    pub(crate) fn put<T: Store>(&self, v: &[f64]) -> Result<Block> {
        let host: Vec<T> = v.iter().map(|&x| T::from_f64(x)).collect();
        self.g.upload(&host)
    }

    /// A fenced buffer holding `init`.
    pub(crate) fn fenced<T: DeviceRepr>(&self, init: &[T]) -> Result<Fenced> {
        let len = size_of_val(init);
        let block = self.g.alloc.alloc(2 * FENCE + len)?;
        let canary = [CANARY; FENCE];
        self.g.write(&block, 0, &canary)?;
        self.g.write(&block, FENCE, init)?;
        self.g.write(&block, FENCE + len, &canary)?;
        Ok(Fenced { block, len })
    }

    /// A fenced output of `n` NaNs of `T` (an element the kernel forgets to write reads back as NaN).
    pub(crate) fn poison<T: Store>(&self, n: usize) -> Result<Fenced> {
        self.fenced(&vec![T::from_f64(f64::NAN); n])
    }

    /// A fenced in/out buffer holding `v` rounded to `T`.
    pub(crate) fn output<T: Store>(&self, v: &[f64]) -> Result<Fenced> {
        self.fenced(&v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>())
    }

    /// A fenced, zeroed workspace of `bytes`.
    pub(crate) fn scratch(&self, bytes: usize) -> Result<Fenced> {
        self.fenced(&vec![0u8; bytes])
    }

    /// Canary bytes of `f` that are no longer canaries.
    pub(crate) fn outside(&self, f: &Fenced) -> Result<usize> {
        let (mut before, mut after) = ([0u8; FENCE], [0u8; FENCE]);
        self.g.read(&f.block, 0, &mut before)?;
        self.g.read(&f.block, FENCE + f.len, &mut after)?;
        Ok(before.iter().chain(&after).filter(|&&b| b != CANARY).count())
    }

    /// The values of `f` as f64 and its canary damage (waits for the queued launches).
    pub(crate) fn fetch<T: DeviceRepr + Default + Copy + Into<f64>>(&self, f: &Fenced) -> Result<Fetched> {
        let mut values = vec![T::default(); f.len / size_of::<T>()];
        self.g.read(&f.block, FENCE, &mut values)?;
        Ok(Fetched { values: values.into_iter().map(Into::into).collect(), outside: self.outside(f)? })
    }

    pub(crate) fn record(&mut self, op: &str, dtype: Dtype, shape: &str, got: &Fetched, want: &[f64], acc: Accuracy) {
        let r = judge(self.family, op, dtype, shape, &got.values, want, tolerance(dtype, acc), got.outside);
        self.out.push(r);
    }

    /// A bit-exact comparison.
    pub(crate) fn record_exact(&mut self, op: &str, dtype: Dtype, shape: &str, got: &Fetched, want: &[f64]) {
        let r = judge(self.family, op, dtype, shape, &got.values, want, Tolerance::EXACT, got.outside);
        self.out.push(r);
    }

    /// A row for a workspace: it passes when the ops that used it wrote nothing outside it.
    pub(crate) fn record_fence(&mut self, op: &str, shape: &str, f: &Fenced) -> Result<()> {
        let outside = self.outside(f)?;
        let r = judge(self.family, op, Dtype::F32, shape, &[], &[], Tolerance::EXACT, outside);
        self.out.push(r);
        Ok(())
    }

    /// Elements for a flat grid-stride kernel that make every thread of its largest grid loop three times, also in
    /// the 16-byte vector path (8 halves per vector), plus an odd tail for the scalar loop.
    pub(crate) fn wrapping_len(&self) -> usize {
        3 * self.g.kernels.grid_stride_threads() * 8 + 13
    }
}

/// One part of a family's checks (a storage type, or a kind of op) that runs on its own.
pub(crate) type Part = fn(&mut Ctx) -> Result<()>;

/// The parts of a family, each with its name and storage type.
pub(crate) fn parts(family: Family) -> Vec<(&'static str, Dtype, Part)> {
    match family {
        Family::Elementwise => vec![
            ("elementwise f32", Dtype::F32, crate::ops::elementwise::check::elementwise::<f32>),
            ("elementwise f16", Dtype::F16, crate::ops::elementwise::check::elementwise::<f16>),
            ("casts", Dtype::F16, crate::ops::elementwise::check::casts),
        ],
        Family::Batchnorm => {
            vec![
                ("batchnorm f32", Dtype::F32, crate::ops::batchnorm::check::batchnorm::<f32>),
                ("batchnorm f16", Dtype::F16, crate::ops::batchnorm::check::batchnorm::<f16>),
            ]
        }
        Family::Depthwise => {
            vec![
                ("depthwise f32", Dtype::F32, crate::ops::depthwise::check::depthwise::<f32>),
                ("depthwise f16", Dtype::F16, crate::ops::depthwise::check::depthwise::<f16>),
            ]
        }
        Family::Se => vec![
            ("se f32", Dtype::F32, crate::ops::scale::check::se::<f32>),
            ("se f16", Dtype::F16, crate::ops::scale::check::se::<f16>),
        ],
        Family::Dropout => {
            vec![
                ("dropout f32", Dtype::F32, crate::ops::dropout::check::dropout::<f32>),
                ("dropout f16", Dtype::F16, crate::ops::dropout::check::dropout::<f16>),
            ]
        }
        Family::Loss => vec![
            ("loss f32", Dtype::F32, crate::ops::loss::check::loss::<f32>),
            ("loss f16", Dtype::F16, crate::ops::loss::check::loss::<f16>),
        ],
        Family::Optim => vec![("optim", Dtype::F32, crate::train::adamw::check::optim)],
        Family::Gemm => vec![("gemm", Dtype::F32, crate::ops::linear::check::gemm)],
        Family::Linear => vec![
            ("linear f32", Dtype::F32, crate::ops::linear::check::linear::<f32>),
            ("linear f16", Dtype::F16, crate::ops::linear::check::linear::<f16>),
        ],
        Family::Conv => vec![
            ("conv f32", Dtype::F32, crate::ops::conv::check::conv::<f32>),
            ("conv f16", Dtype::F16, crate::ops::conv::check::conv::<f16>),
        ],
        // Checked by `crate::data::augment::cuda::check` (see check_family).
        Family::Augment => vec![],
    }
}

/// A failed row for a part that stopped with an error (a launch, copy or library call failed: itself a finding).
pub(crate) fn error_row(family: Family, part: &str, dtype: Dtype, e: &anyhow::Error) -> CheckResult {
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
        return Ok(crate::data::augment::cuda::check(gpu, seed).unwrap_or_else(|e| {
            vec![error_row(family, "augment", Dtype::F32, &e.context("checking the augment kernels"))]
        }));
    }
    let mut c =
        Ctx { g: gpu, rng: SplitMix(seed ^ (family as u64).wrapping_mul(0x2545f4914f6cdd1d)), family, out: vec![] };
    run_parts(&mut c, &parts(family));
    Ok(c.out)
}

/// Runs each part; one that errors leaves its rows, adds an error row, and the next part runs.
pub(crate) fn run_parts(c: &mut Ctx, parts: &[(&'static str, Dtype, Part)]) {
    for &(name, dtype, part) in parts {
        if let Err(e) = part(c) {
            let row = error_row(c.family, name, dtype, &e.context(format!("checking the {} kernels", c.family.name())));
            c.out.push(row);
        }
    }
}

impl Dtype {
    /// The looser of two storage types: an f32 output computed from f16 inputs is judged at the f16 tolerance.
    pub(crate) fn max_of(self, other: Dtype) -> Dtype {
        if self == Dtype::F16 || other == Dtype::F16 { Dtype::F16 } else { Dtype::F32 }
    }
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

pub(crate) fn fmt_err(v: f64) -> String {
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
    use crate::ops::activation::Unary;

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
