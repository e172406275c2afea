//! cuDNN's legacy convolution API on the emulated device: `cudnnFind*Algorithm` and `cudnnConvolution{Forward,
//! BackwardData,BackwardFilter}` in plain loops, taking the same descriptor values the real calls get (cuDNN's own
//! enums; dims in the order `cudnnSetTensor4dDescriptor` / `cudnnSetFilter4dDescriptor` take them).
//!
//! Semantics emulated, as cuDNN documents them:
//! - Tensors are 4-D `CUDNN_TENSOR_NHWC` (dims given as n, c, h, w; memory n, h, w, c, fully packed); filters with
//!   format `CUDNN_TENSOR_NHWC` are KRSC (dims k, c, r, s; memory k, r, s, c), which is derma's OHWI. NCHW is
//!   refused (derma does not use it, so the emulator does not pretend to check it).
//! - Output size `1 + (in + 2·pad − ((kernel − 1)·dilation + 1)) / stride`; padding, stride and dilation per axis;
//!   `CUDNN_CROSS_CORRELATION` uses the filter as stored, `CUDNN_CONVOLUTION` flips it in both spatial axes.
//! - Groups: input channels split into `groups` slices of the filter's c, output channels into `k / groups`.
//! - `dst = alpha·computed + beta·prior_dst` with f32 alpha/beta; when `beta == 0` the output is not read (it may
//!   hold NaN).
//! - Compute type `CUDNN_DATA_FLOAT` (also for half data): f16 values widen exactly, products and sums in f32 (in a
//!   fixed order: the real kernels' order is not modelled), the result rounds to nearest even to the data type.
//!   For f32 data, the math types that permit TF32 tensor cores (`CUDNN_DEFAULT_MATH`, `CUDNN_TENSOR_OP_MATH*`)
//!   round every input to TF32 first (the worst case they allow); `CUDNN_FMA_MATH` keeps full f32.
//! - Algorithms: each emulated algorithm exists under exactly one math type and needs a fixed workspace. Find
//!   lists the ones the descriptor's math type permits, fastest first, with their math type, as cuDNN 8+ reports
//!   `mathType` per result; a call whose descriptor's math type is not the one its algorithm was found with is an
//!   error. The ranking is made up and deliberately picks a different math type for backward data than for the
//!   other passes, so a caller that keeps one math type for all three fails here.
//! - The workspace must hold what Find reported; the emulated algorithm overwrites it with NaN, so a caller that
//!   reads it afterwards or shares it between live passes shows up.

use anyhow::{Result, bail, ensure};
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as BwdDataAlgo, cudnnConvolutionBwdFilterAlgo_t as BwdFilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t as Mode, cudnnDataType_t as DataType,
    cudnnMathType_t as MathType, cudnnTensorFormat_t as Format,
};
use half::f16;

/// `cudnnSetTensor4dDescriptor(format, dtype, n, c, h, w)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    /// Memory format.
    pub format: Format,
    /// Element type.
    pub dtype: DataType,
    /// Batch, channels, height, width.
    pub dims: [i32; 4],
}

/// `cudnnSetFilter4dDescriptor(dtype, format, k, c, r, s)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilterDesc {
    /// Element type.
    pub dtype: DataType,
    /// Memory format (NHWC = KRSC).
    pub format: Format,
    /// Output channels, input channels per group, height, width.
    pub dims: [i32; 4],
}

/// `cudnnSetConvolution2dDescriptor` plus the math type and group count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvDesc {
    /// Zero padding (h, w).
    pub pad: [i32; 2],
    /// Stride (h, w).
    pub stride: [i32; 2],
    /// Dilation (h, w).
    pub dilation: [i32; 2],
    /// Cross-correlation or true convolution.
    pub mode: Mode,
    /// Accumulation type.
    pub compute: DataType,
    /// `cudnnSetConvolutionMathType`.
    pub math: MathType,
    /// `cudnnSetConvolutionGroupCount`.
    pub groups: i32,
}

/// One entry of a Find result (`cudnnConvolution*AlgoPerf_t`: algorithm, workspace bytes, math type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perf<A> {
    /// The algorithm.
    pub algo: A,
    /// Workspace bytes it needs.
    pub memory: usize,
    /// The math type it runs under; set it on the descriptor before calling.
    pub math: MathType,
}

/// The geometry of one validated call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    oh: usize,
    ow: usize,
    groups: usize,
    pad: [isize; 2],
    stride: [isize; 2],
    dil: [isize; 2],
    flip: bool,
    dtype: DataType,
    tf32: bool,
}

impl Geom {
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn kg(&self) -> usize {
        self.k / self.groups
    }
    fn elems(&self) -> (usize, usize, usize) {
        (self.n * self.h * self.w * self.c, self.n * self.oh * self.ow * self.k, self.k * self.r * self.s * self.cg())
    }
    /// Input row/column for output position `o` and filter tap `t` along axis `ax`, `None` in the padding.
    fn src(&self, ax: usize, o: usize, t: usize, size: usize) -> Option<usize> {
        let i = o as isize * self.stride[ax] - self.pad[ax] + t as isize * self.dil[ax];
        (i >= 0 && (i as usize) < size).then_some(i as usize)
    }
    /// The stored filter tap used at spatial tap (r, s).
    fn tap(&self, r: usize, s: usize) -> (usize, usize) {
        if self.flip { (self.r - 1 - r, self.s - 1 - s) } else { (r, s) }
    }
    fn x_at(&self, n: usize, h: usize, w: usize, c: usize) -> usize {
        ((n * self.h + h) * self.w + w) * self.c + c
    }
    fn y_at(&self, n: usize, h: usize, w: usize, k: usize) -> usize {
        ((n * self.oh + h) * self.ow + w) * self.k + k
    }
    fn w_at(&self, k: usize, r: usize, s: usize, c: usize) -> usize {
        ((k * self.r + r) * self.s + s) * self.cg() + c
    }
}

/// `cudnnGetConvolution2dForwardOutputDim`: (n, c, h, w) of the output, after validating x, w and conv.
pub fn output_dims(x: &TensorDesc, w: &FilterDesc, conv: &ConvDesc) -> Result<[i32; 4]> {
    ensure!(
        x.format == Format::CUDNN_TENSOR_NHWC,
        "cuDNN emulation: tensor format {:?} is not emulated (NHWC only)",
        x.format
    );
    ensure!(
        w.format == Format::CUDNN_TENSOR_NHWC,
        "cuDNN emulation: filter format {:?} is not emulated (NHWC = KRSC only)",
        w.format
    );
    ensure!(x.dims.iter().all(|&d| d > 0), "cuDNN: tensor dims {:?} must be positive", x.dims);
    ensure!(w.dims.iter().all(|&d| d > 0), "cuDNN: filter dims {:?} must be positive", w.dims);
    let [n, c, h, wd] = x.dims;
    let [k, cg, r, s] = w.dims;
    let g = conv.groups;
    ensure!(g > 0 && c % g == 0 && k % g == 0, "cuDNN: {g} groups do not divide {c} input and {k} output channels");
    ensure!(cg * g == c, "cuDNN: filter has {cg} input channels per group, the tensor {c} over {g} groups");
    ensure!(conv.stride.iter().all(|&v| v > 0), "cuDNN: stride {:?} must be positive", conv.stride);
    ensure!(conv.dilation.iter().all(|&v| v > 0), "cuDNN: dilation {:?} must be positive", conv.dilation);
    ensure!(conv.pad.iter().all(|&v| v >= 0), "cuDNN: padding {:?} must not be negative", conv.pad);
    let out = |size: i32, kern: i32, ax: usize| {
        let span = (kern - 1) * conv.dilation[ax] + 1;
        let room = size + 2 * conv.pad[ax] - span;
        if room < 0 { 0 } else { room / conv.stride[ax] + 1 }
    };
    let (oh, ow) = (out(h, r, 0), out(wd, s, 1));
    ensure!(oh > 0 && ow > 0, "cuDNN: the {r}x{s} filter does not fit the padded {h}x{wd} input");
    Ok([n, k, oh, ow])
}

fn geometry(x: &TensorDesc, w: &FilterDesc, conv: &ConvDesc, y: &TensorDesc) -> Result<Geom> {
    let dims = output_dims(x, w, conv)?;
    ensure!(
        y.format == Format::CUDNN_TENSOR_NHWC,
        "cuDNN emulation: tensor format {:?} is not emulated (NHWC only)",
        y.format
    );
    ensure!(y.dims == dims, "cuDNN: output descriptor {:?} does not match the convolution's output {dims:?}", y.dims);
    ensure!(
        x.dtype == y.dtype && x.dtype == w.dtype,
        "cuDNN: x, w, y types differ ({:?}, {:?}, {:?})",
        x.dtype,
        w.dtype,
        y.dtype
    );
    ensure!(
        matches!(x.dtype, DataType::CUDNN_DATA_FLOAT | DataType::CUDNN_DATA_HALF),
        "cuDNN emulation: data type {:?} is not emulated (float and half only)",
        x.dtype
    );
    ensure!(
        conv.compute == DataType::CUDNN_DATA_FLOAT,
        "cuDNN emulation: compute type {:?} is not emulated (derma accumulates in CUDNN_DATA_FLOAT)",
        conv.compute
    );
    let tf32 = x.dtype == DataType::CUDNN_DATA_FLOAT && conv.math != MathType::CUDNN_FMA_MATH;
    let u = |v: i32| v as usize;
    Ok(Geom {
        n: u(x.dims[0]),
        c: u(x.dims[1]),
        h: u(x.dims[2]),
        w: u(x.dims[3]),
        k: u(w.dims[0]),
        r: u(w.dims[2]),
        s: u(w.dims[3]),
        oh: u(dims[2]),
        ow: u(dims[3]),
        groups: u(conv.groups),
        pad: conv.pad.map(|v| v as isize),
        stride: conv.stride.map(|v| v as isize),
        dil: conv.dilation.map(|v| v as isize),
        flip: conv.mode == Mode::CUDNN_CONVOLUTION,
        dtype: x.dtype,
        tf32,
    })
}

/// Whether an algorithm found under `found` may run on a descriptor that permits `allowed`.
fn permits(allowed: MathType, found: MathType) -> bool {
    use MathType::*;
    match allowed {
        CUDNN_FMA_MATH => found == CUDNN_FMA_MATH,
        CUDNN_DEFAULT_MATH => matches!(found, CUDNN_DEFAULT_MATH | CUDNN_FMA_MATH),
        CUDNN_TENSOR_OP_MATH | CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION => {
            matches!(found, CUDNN_TENSOR_OP_MATH | CUDNN_DEFAULT_MATH | CUDNN_FMA_MATH)
        }
    }
}

fn rank<A: Copy>(table: &[(A, MathType, usize)], conv: &ConvDesc) -> Vec<Perf<A>> {
    table
        .iter()
        .filter(|(_, math, _)| permits(conv.math, *math))
        .map(|&(algo, math, memory)| Perf { algo, memory, math })
        .collect()
}

fn fwd_table(g: &Geom) -> [(FwdAlgo, MathType, usize); 2] {
    [
        // A made-up "precomputed indices" table: one i32 per output pixel and tap.
        (
            FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            MathType::CUDNN_TENSOR_OP_MATH,
            4 * g.oh * g.ow * g.r * g.s,
        ),
        (FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, MathType::CUDNN_FMA_MATH, 0),
    ]
}

fn bwd_data_table(g: &Geom) -> [(BwdDataAlgo, MathType, usize); 2] {
    [
        (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, MathType::CUDNN_DEFAULT_MATH, 4 * g.h * g.w),
        (BwdDataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, MathType::CUDNN_FMA_MATH, 0),
    ]
}

fn bwd_filter_table(g: &Geom) -> [(BwdFilterAlgo, MathType, usize); 2] {
    [
        // f32 partial sums of the whole filter.
        (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, MathType::CUDNN_TENSOR_OP_MATH, 4 * g.elems().2),
        (BwdFilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, MathType::CUDNN_FMA_MATH, 0),
    ]
}

/// `cudnnFindConvolutionForwardAlgorithm`: the permitted algorithms, fastest first.
pub fn find_forward(x: &TensorDesc, w: &FilterDesc, conv: &ConvDesc, y: &TensorDesc) -> Result<Vec<Perf<FwdAlgo>>> {
    let g = geometry(x, w, conv, y)?;
    Ok(rank(&fwd_table(&g), conv))
}

/// `cudnnFindConvolutionBackwardDataAlgorithm`.
pub fn find_backward_data(
    w: &FilterDesc,
    dy: &TensorDesc,
    conv: &ConvDesc,
    dx: &TensorDesc,
) -> Result<Vec<Perf<BwdDataAlgo>>> {
    let g = geometry(dx, w, conv, dy)?;
    Ok(rank(&bwd_data_table(&g), conv))
}

/// `cudnnFindConvolutionBackwardFilterAlgorithm`.
pub fn find_backward_filter(
    x: &TensorDesc,
    dy: &TensorDesc,
    conv: &ConvDesc,
    dw: &FilterDesc,
) -> Result<Vec<Perf<BwdFilterAlgo>>> {
    let g = geometry(x, dw, conv, dy)?;
    Ok(rank(&bwd_filter_table(&g), conv))
}

/// The chosen algorithm's requirements, checked against the call.
fn admit<A: Copy + PartialEq + std::fmt::Debug>(
    table: &[(A, MathType, usize)],
    algo: A,
    conv: &ConvDesc,
    workspace_bytes: usize,
    pass: &str,
) -> Result<()> {
    let Some(&(_, math, memory)) = table.iter().find(|(a, _, _)| *a == algo) else {
        bail!("cuDNN emulation: {pass} algorithm {algo:?} is not one Find offers here");
    };
    ensure!(
        conv.math == math,
        "cuDNN: {pass} algorithm {algo:?} was found with math type {math:?}, but the descriptor is set to {:?} (set \
         the math type Find reported before the call)",
        conv.math
    );
    ensure!(
        workspace_bytes >= memory,
        "cuDNN: {pass} algorithm {algo:?} needs {memory} workspace bytes, {workspace_bytes} given"
    );
    Ok(())
}

/// A read-only tensor in host memory.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }
    fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::CUDNN_DATA_FLOAT,
            Self::F16(_) => DataType::CUDNN_DATA_HALF,
        }
    }
    /// Element `i` as the math sees it (TF32-rounded when `tf32`).
    fn get(&self, i: usize, tf32: bool) -> f32 {
        match self {
            Self::F32(v) if tf32 => super::blaslt::round_tf32(v[i]),
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
        }
    }
}

/// An output tensor in host memory.
#[derive(Debug)]
pub enum Dst<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

impl Dst<'_> {
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }
    fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::CUDNN_DATA_FLOAT,
            Self::F16(_) => DataType::CUDNN_DATA_HALF,
        }
    }
    /// dst[i] = alpha·v + beta·dst[i]; dst[i] is not read when beta is 0.
    fn blend(&mut self, i: usize, alpha: f32, v: f32, beta: f32) {
        match self {
            Self::F32(d) => d[i] = if beta == 0.0 { alpha * v } else { alpha * v + beta * d[i] },
            Self::F16(d) => {
                let out = if beta == 0.0 { alpha * v } else { alpha * v + beta * d[i].to_f32() };
                d[i] = f16::from_f32(out);
            }
        }
    }
}

fn expect(name: &str, dtype: DataType, want_type: DataType, len: usize, want: usize) -> Result<()> {
    ensure!(dtype == want_type, "cuDNN: {name} holds {dtype:?} but its descriptor says {want_type:?}");
    ensure!(len >= want, "cuDNN: {name} has {len} elements, its descriptor needs {want}");
    Ok(())
}

/// The three passes over host slices. Pure: what the pointer-level calls run after their checks, and what the
/// unit tests call.
pub mod host {
    use super::*;

    /// y = alpha · conv(x, w) + beta · y.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        alpha: f32,
        xd: &TensorDesc,
        x: Src,
        wd: &FilterDesc,
        w: Src,
        conv: &ConvDesc,
        beta: f32,
        yd: &TensorDesc,
        y: &mut Dst,
    ) -> Result<()> {
        let g = geometry(xd, wd, conv, yd)?;
        let (nx, ny, nw) = g.elems();
        expect("x", x.dtype(), g.dtype, x.len(), nx)?;
        expect("w", w.dtype(), g.dtype, w.len(), nw)?;
        expect("y", y.dtype(), g.dtype, y.len(), ny)?;
        let (cg, kg) = (g.cg(), g.kg());
        for n in 0..g.n {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    for k in 0..g.k {
                        let c0 = (k / kg) * cg;
                        let mut acc = 0f32;
                        for r in 0..g.r {
                            let Some(ih) = g.src(0, oh, r, g.h) else { continue };
                            for s in 0..g.s {
                                let Some(iw) = g.src(1, ow, s, g.w) else { continue };
                                let (fr, fs) = g.tap(r, s);
                                for c in 0..cg {
                                    acc +=
                                        x.get(g.x_at(n, ih, iw, c0 + c), g.tf32) * w.get(g.w_at(k, fr, fs, c), g.tf32);
                                }
                            }
                        }
                        y.blend(g.y_at(n, oh, ow, k), alpha, acc, beta);
                    }
                }
            }
        }
        Ok(())
    }

    /// dx = alpha · conv_backward_data(w, dy) + beta · dx: the gradient of `forward` with respect to x.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_data(
        alpha: f32,
        wd: &FilterDesc,
        w: Src,
        dyd: &TensorDesc,
        dy: Src,
        conv: &ConvDesc,
        beta: f32,
        dxd: &TensorDesc,
        dx: &mut Dst,
    ) -> Result<()> {
        let g = geometry(dxd, wd, conv, dyd)?;
        let (nx, ny, nw) = g.elems();
        expect("dy", dy.dtype(), g.dtype, dy.len(), ny)?;
        expect("w", w.dtype(), g.dtype, w.len(), nw)?;
        expect("dx", dx.dtype(), g.dtype, dx.len(), nx)?;
        let (cg, kg) = (g.cg(), g.kg());
        // Output position along one axis that reads input position `i` through tap `t`, if any.
        let out_of = |ax: usize, i: usize, t: usize, size: usize| -> Option<usize> {
            let num = i as isize + g.pad[ax] - t as isize * g.dil[ax];
            (num >= 0 && num % g.stride[ax] == 0 && ((num / g.stride[ax]) as usize) < size)
                .then_some((num / g.stride[ax]) as usize)
        };
        for n in 0..g.n {
            for ih in 0..g.h {
                for iw in 0..g.w {
                    for ci in 0..g.c {
                        let (grp, c) = (ci / cg, ci % cg);
                        let mut acc = 0f32;
                        for r in 0..g.r {
                            let Some(oh) = out_of(0, ih, r, g.oh) else { continue };
                            for s in 0..g.s {
                                let Some(ow) = out_of(1, iw, s, g.ow) else { continue };
                                let (fr, fs) = g.tap(r, s);
                                for k in grp * kg..(grp + 1) * kg {
                                    acc += dy.get(g.y_at(n, oh, ow, k), g.tf32) * w.get(g.w_at(k, fr, fs, c), g.tf32);
                                }
                            }
                        }
                        dx.blend(g.x_at(n, ih, iw, ci), alpha, acc, beta);
                    }
                }
            }
        }
        Ok(())
    }

    /// dw = alpha · conv_backward_filter(x, dy) + beta · dw: the gradient of `forward` with respect to w.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_filter(
        alpha: f32,
        xd: &TensorDesc,
        x: Src,
        dyd: &TensorDesc,
        dy: Src,
        conv: &ConvDesc,
        beta: f32,
        dwd: &FilterDesc,
        dw: &mut Dst,
    ) -> Result<()> {
        let g = geometry(xd, dwd, conv, dyd)?;
        let (nx, ny, nw) = g.elems();
        expect("x", x.dtype(), g.dtype, x.len(), nx)?;
        expect("dy", dy.dtype(), g.dtype, dy.len(), ny)?;
        expect("dw", dw.dtype(), g.dtype, dw.len(), nw)?;
        let (cg, kg) = (g.cg(), g.kg());
        for k in 0..g.k {
            let c0 = (k / kg) * cg;
            for fr in 0..g.r {
                for fs in 0..g.s {
                    // The spatial tap that uses stored tap (fr, fs): the flip is its own inverse.
                    let (r, s) = g.tap(fr, fs);
                    for c in 0..cg {
                        let mut acc = 0f32;
                        for n in 0..g.n {
                            for oh in 0..g.oh {
                                let Some(ih) = g.src(0, oh, r, g.h) else { continue };
                                for ow in 0..g.ow {
                                    let Some(iw) = g.src(1, ow, s, g.w) else { continue };
                                    acc +=
                                        x.get(g.x_at(n, ih, iw, c0 + c), g.tf32) * dy.get(g.y_at(n, oh, ow, k), g.tf32);
                                }
                            }
                        }
                        dw.blend(g.w_at(k, fr, fs, c), alpha, acc, beta);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A device buffer of one call: address and the bytes the caller vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Device (= host) address.
    pub addr: u64,
    /// Bytes readable (and, for outputs, writable) from `addr`.
    pub bytes: usize,
}

/// # Safety
/// `b` addresses `b.bytes` readable bytes that stay unchanged during the call.
unsafe fn src<'a>(b: Buf, dtype: DataType, name: &str) -> Result<Src<'a>> {
    ensure!(b.addr != 0, "cuDNN: {name} is a null pointer");
    // SAFETY: the caller vouches for b.bytes readable bytes at b.addr; alignment is checked before the cast.
    unsafe {
        Ok(match dtype {
            DataType::CUDNN_DATA_HALF => {
                ensure!(
                    b.addr.is_multiple_of(2),
                    "cuDNN: {name} at {:#x} is not aligned to its 2-byte elements",
                    b.addr
                );
                Src::F16(std::slice::from_raw_parts(b.addr as *const f16, b.bytes / 2))
            }
            _ => {
                ensure!(
                    b.addr.is_multiple_of(4),
                    "cuDNN: {name} at {:#x} is not aligned to its 4-byte elements",
                    b.addr
                );
                Src::F32(std::slice::from_raw_parts(b.addr as *const f32, b.bytes / 4))
            }
        })
    }
}

/// # Safety
/// `b` addresses `b.bytes` writable bytes that nothing else accesses during the call.
unsafe fn dst<'a>(b: Buf, dtype: DataType, name: &str) -> Result<Dst<'a>> {
    ensure!(b.addr != 0, "cuDNN: {name} is a null pointer");
    // SAFETY: as in `src`, and the memory is exclusively the call's.
    unsafe {
        Ok(match dtype {
            DataType::CUDNN_DATA_HALF => {
                ensure!(
                    b.addr.is_multiple_of(2),
                    "cuDNN: {name} at {:#x} is not aligned to its 2-byte elements",
                    b.addr
                );
                Dst::F16(std::slice::from_raw_parts_mut(b.addr as *mut f16, b.bytes / 2))
            }
            _ => {
                ensure!(
                    b.addr.is_multiple_of(4),
                    "cuDNN: {name} at {:#x} is not aligned to its 4-byte elements",
                    b.addr
                );
                Dst::F32(std::slice::from_raw_parts_mut(b.addr as *mut f32, b.bytes / 4))
            }
        })
    }
}

fn disjoint(out: (&str, Buf), inputs: &[(&str, Buf)]) -> Result<()> {
    let end = |b: Buf| b.addr + b.bytes as u64;
    for &(name, b) in inputs {
        ensure!(
            end(b) <= out.1.addr || end(out.1) <= b.addr,
            "cuDNN: output {} overlaps input {name} (cuDNN convolutions are not in place)",
            out.0
        );
    }
    Ok(())
}

/// Clobbers the workspace the algorithm was given (its contents after a call are unspecified).
///
/// # Safety
/// `ws` addresses `ws.bytes` writable bytes nothing else uses during the call.
unsafe fn scribble(ws: Buf, need: usize) {
    if ws.addr != 0 && need > 0 {
        // SAFETY: the caller vouches for ws.bytes >= need writable bytes.
        unsafe { std::ptr::write_bytes(ws.addr as *mut u8, 0xff, need) };
    }
}

/// `cudnnConvolutionForward` on the emulated device.
///
/// # Safety
/// Every [`Buf`] addresses host memory valid for its bytes (outputs and workspace writable and not otherwise
/// accessed during the call).
#[allow(clippy::too_many_arguments)]
pub unsafe fn convolution_forward(
    alpha: f32,
    xd: &TensorDesc,
    x: Buf,
    wd: &FilterDesc,
    w: Buf,
    conv: &ConvDesc,
    algo: FwdAlgo,
    ws: Buf,
    beta: f32,
    yd: &TensorDesc,
    y: Buf,
) -> Result<()> {
    let g = geometry(xd, wd, conv, yd)?;
    admit(&fwd_table(&g), algo, conv, ws.bytes, "forward")?;
    disjoint(("y", y), &[("x", x), ("w", w), ("workspace", ws)])?;
    if ws.bytes > 0 {
        disjoint(("workspace", ws), &[("x", x), ("w", w)])?;
    }
    // SAFETY: the caller's contract; the buffers are disjoint from the output (checked above).
    unsafe {
        scribble(ws, fwd_table(&g).iter().find(|t| t.0 == algo).map_or(0, |t| t.2));
        let (xs, wsrc) = (src(x, g.dtype, "x")?, src(w, g.dtype, "w")?);
        let mut yd_ = dst(y, g.dtype, "y")?;
        host::forward(alpha, xd, xs, wd, wsrc, conv, beta, yd, &mut yd_)
    }
}

/// `cudnnConvolutionBackwardData` on the emulated device.
///
/// # Safety
/// As [`convolution_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn convolution_backward_data(
    alpha: f32,
    wd: &FilterDesc,
    w: Buf,
    dyd: &TensorDesc,
    dy: Buf,
    conv: &ConvDesc,
    algo: BwdDataAlgo,
    ws: Buf,
    beta: f32,
    dxd: &TensorDesc,
    dx: Buf,
) -> Result<()> {
    let g = geometry(dxd, wd, conv, dyd)?;
    admit(&bwd_data_table(&g), algo, conv, ws.bytes, "backward-data")?;
    disjoint(("dx", dx), &[("w", w), ("dy", dy), ("workspace", ws)])?;
    if ws.bytes > 0 {
        disjoint(("workspace", ws), &[("w", w), ("dy", dy)])?;
    }
    // SAFETY: as in convolution_forward.
    unsafe {
        scribble(ws, bwd_data_table(&g).iter().find(|t| t.0 == algo).map_or(0, |t| t.2));
        let (ws_, dys) = (src(w, g.dtype, "w")?, src(dy, g.dtype, "dy")?);
        let mut out = dst(dx, g.dtype, "dx")?;
        host::backward_data(alpha, wd, ws_, dyd, dys, conv, beta, dxd, &mut out)
    }
}

/// `cudnnConvolutionBackwardFilter` on the emulated device.
///
/// # Safety
/// As [`convolution_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn convolution_backward_filter(
    alpha: f32,
    xd: &TensorDesc,
    x: Buf,
    dyd: &TensorDesc,
    dy: Buf,
    conv: &ConvDesc,
    algo: BwdFilterAlgo,
    ws: Buf,
    beta: f32,
    dwd: &FilterDesc,
    dw: Buf,
) -> Result<()> {
    let g = geometry(xd, dwd, conv, dyd)?;
    admit(&bwd_filter_table(&g), algo, conv, ws.bytes, "backward-filter")?;
    disjoint(("dw", dw), &[("x", x), ("dy", dy), ("workspace", ws)])?;
    if ws.bytes > 0 {
        disjoint(("workspace", ws), &[("x", x), ("dy", dy)])?;
    }
    // SAFETY: as in convolution_forward.
    unsafe {
        scribble(ws, bwd_filter_table(&g).iter().find(|t| t.0 == algo).map_or(0, |t| t.2));
        let (xs, dys) = (src(x, g.dtype, "x")?, src(dy, g.dtype, "dy")?);
        let mut out = dst(dw, g.dtype, "dw")?;
        host::backward_filter(alpha, xd, xs, dyd, dys, conv, beta, dwd, &mut out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::{self, ConvCfg, ConvGeom};
    use rand::RngExt;

    const U32: f64 = 1.0 / (1u64 << 24) as f64;
    const U11: f64 = 1.0 / (1u64 << 11) as f64;

    struct Case {
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        k: usize,
        r: usize,
        s: usize,
        stride: usize,
        pad: usize,
        dil: usize,
        groups: usize,
        flip: bool,
    }

    fn cases() -> Vec<Case> {
        let c = |n, h, w, c, k, r, s, stride, pad, dil, groups, flip| Case {
            n,
            h,
            w,
            c,
            k,
            r,
            s,
            stride,
            pad,
            dil,
            groups,
            flip,
        };
        vec![
            c(3, 9, 9, 3, 13, 3, 3, 2, 1, 1, 1, false),  // the stem, odd sizes
            c(3, 7, 7, 40, 13, 1, 1, 1, 0, 1, 1, false), // a 1×1 projection
            c(2, 8, 7, 16, 32, 3, 3, 1, 1, 1, 1, false),
            c(2, 9, 11, 6, 9, 5, 3, 2, 2, 1, 3, false), // grouped, non-square kernel
            c(1, 10, 9, 5, 5, 3, 3, 1, 1, 1, 5, false), // depthwise
            c(2, 11, 10, 4, 6, 3, 2, 1, 2, 2, 2, false), // dilation 2
            c(2, 7, 8, 3, 5, 3, 3, 2, 1, 1, 1, true),   // true convolution (flipped filter)
        ]
    }

    fn descs(cs: &Case, dtype: DataType, math: MathType) -> (TensorDesc, FilterDesc, ConvDesc) {
        let i = |v: usize| v as i32;
        let x = TensorDesc { format: Format::CUDNN_TENSOR_NHWC, dtype, dims: [i(cs.n), i(cs.c), i(cs.h), i(cs.w)] };
        let w = FilterDesc {
            dtype,
            format: Format::CUDNN_TENSOR_NHWC,
            dims: [i(cs.k), i(cs.c / cs.groups), i(cs.r), i(cs.s)],
        };
        let conv = ConvDesc {
            pad: [i(cs.pad); 2],
            stride: [i(cs.stride); 2],
            dilation: [i(cs.dil); 2],
            mode: if cs.flip { Mode::CUDNN_CONVOLUTION } else { Mode::CUDNN_CROSS_CORRELATION },
            compute: DataType::CUDNN_DATA_FLOAT,
            math,
            groups: i(cs.groups),
        };
        (x, w, conv)
    }

    /// The reference's view of the filter: flipped for CUDNN_CONVOLUTION, zero-stuffed for dilation, so that
    /// src/ops's cross-correlation (dilation 1) computes the same function. Returns (kernel, kh, kw).
    fn ref_filter(cs: &Case, w: &[f64]) -> (Vec<f64>, usize, usize) {
        let cg = cs.c / cs.groups;
        let (kh, kw) = ((cs.r - 1) * cs.dil + 1, (cs.s - 1) * cs.dil + 1);
        let mut out = vec![0.0; cs.k * kh * kw * cg];
        for k in 0..cs.k {
            for r in 0..cs.r {
                for s in 0..cs.s {
                    let (fr, fs) = if cs.flip { (cs.r - 1 - r, cs.s - 1 - s) } else { (r, s) };
                    for c in 0..cg {
                        out[((k * kh + r * cs.dil) * kw + s * cs.dil) * cg + c] =
                            w[((k * cs.r + fr) * cs.s + fs) * cg + c];
                    }
                }
            }
        }
        (out, kh, kw)
    }

    /// The stored-filter gradient from the reference's gradient of its stuffed, flipped view.
    fn from_ref_filter(cs: &Case, g: &[f64], kh: usize, kw: usize) -> Vec<f64> {
        let cg = cs.c / cs.groups;
        let mut out = vec![0.0; cs.k * cs.r * cs.s * cg];
        for k in 0..cs.k {
            for r in 0..cs.r {
                for s in 0..cs.s {
                    let (fr, fs) = if cs.flip { (cs.r - 1 - r, cs.s - 1 - s) } else { (r, s) };
                    for c in 0..cg {
                        out[((k * cs.r + fr) * cs.s + fs) * cg + c] =
                            g[((k * kh + r * cs.dil) * kw + s * cs.dil) * cg + c];
                    }
                }
            }
        }
        out
    }

    fn buf32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }
    fn buf16(v: &[f64]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f64(x)).collect()
    }

    /// Every element of `got` against `want` (computed on the inputs as the math sees them), with a bound of
    /// (terms + 2) f32 roundings of the sum of |terms| (`abs`) plus one rounding to the output type.
    fn compare(what: &str, got: &[f64], want: &[f64], abs: &[f64], terms: usize, out_u: f64) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, ((&g, &w), &a)) in got.iter().zip(want).zip(abs).enumerate() {
            let tol = (terms as f64 + 2.0) * U32 * a + out_u * w.abs() + 1e-30;
            assert!((g - w).abs() <= tol, "{what}[{i}] = {g}, reference {w}, |err| {} > {tol}", (g - w).abs());
        }
    }

    fn run(rng: &mut rand_pcg::Pcg64, cs: &Case, dtype: DataType, math: MathType, (alpha, beta): (f32, f32)) {
        let half = dtype == DataType::CUDNN_DATA_HALF;
        let round = |v: f64| if half { f16::from_f64(v).to_f64() } else { v as f32 as f64 };
        let mut draw = |len: usize| -> Vec<f64> { (0..len).map(|_| round(rng.random_range(-1.0..1.0))).collect() };
        let (xd, wd, conv) = descs(cs, dtype, math);
        let yd = TensorDesc { dims: output_dims(&xd, &wd, &conv).unwrap(), ..xd };
        let [_, _, oh, ow] = yd.dims.map(|v| v as usize);
        let cg = cs.c / cs.groups;
        let (nx, ny, nw) = (cs.n * cs.h * cs.w * cs.c, cs.n * oh * ow * cs.k, cs.k * cs.r * cs.s * cg);
        let (x, w, dy) = (draw(nx), draw(nw), draw(ny));
        let priors = (draw(ny), draw(nx), draw(nw));
        let (wr, kh, kw) = ref_filter(cs, &w);
        let geom = ConvGeom::new(
            &[cs.n, cs.h, cs.w, cs.c],
            &[cs.k, kh, kw, cg],
            ConvCfg { stride: cs.stride, pad: cs.pad, groups: cs.groups },
        )
        .unwrap();
        assert_eq!((geom.oh, geom.ow), (oh, ow), "output size");
        let tf32 = !half && math != MathType::CUDNN_FMA_MATH;
        // The reference sees what the math sees: TF32-rounded inputs where TF32 is allowed.
        let seen = |v: &[f64]| -> Vec<f64> {
            v.iter().map(|&e| if tf32 { super::super::blaslt::round_tf32(e as f32) as f64 } else { e }).collect()
        };
        let abs = |v: &[f64]| v.iter().map(|e| e.abs()).collect::<Vec<f64>>();
        let blend = |computed: &[f64], prior: &[f64], a: f64, b: f64| -> Vec<f64> {
            computed.iter().zip(prior).map(|(c, p)| a * c + b * p).collect()
        };
        let (alpha64, beta64) = (alpha as f64, beta as f64);
        let out_u = if half { U11 } else { U32 };

        // Forward.
        let (mut y, mut ya) = (vec![0.0; ny], vec![0.0; ny]);
        conv::forward(&geom, &seen(&x), &ref_filter(cs, &seen(&w)).0, None, &mut y);
        conv::forward(&geom, &abs(&x), &ref_filter(cs, &abs(&w)).0, None, &mut ya);
        let want = blend(&y, &priors.0, alpha64, beta64);
        let bound = blend(&ya, &abs(&priors.0), alpha64.abs(), beta64.abs());
        let got = exec_forward(&xd, &x, &wd, &w, &conv, &yd, &priors.0, alpha, beta, half);
        compare("y", &got, &want, &bound, cs.r * cs.s * cg, out_u);

        // Backward data.
        let (mut dx, mut dxa) = (vec![0.0; nx], vec![0.0; nx]);
        conv::backward_data(&geom, &seen(&dy), &ref_filter(cs, &seen(&w)).0, &mut dx);
        conv::backward_data(&geom, &abs(&dy), &ref_filter(cs, &abs(&w)).0, &mut dxa);
        let want = blend(&dx, &priors.1, alpha64, beta64);
        let bound = blend(&dxa, &abs(&priors.1), alpha64.abs(), beta64.abs());
        let got = exec_backward_data(&wd, &w, &yd, &dy, &conv, &xd, &priors.1, alpha, beta, half);
        compare("dx", &got, &want, &bound, cs.r * cs.s * (cs.k / cs.groups), out_u);

        // Backward filter.
        let (mut gw, mut gwa) = (vec![0.0; wr.len()], vec![0.0; wr.len()]);
        conv::backward_weight(&geom, &seen(&x), &seen(&dy), &mut gw);
        conv::backward_weight(&geom, &abs(&x), &abs(&dy), &mut gwa);
        let want = blend(&from_ref_filter(cs, &gw, kh, kw), &priors.2, alpha64, beta64);
        let bound = blend(&from_ref_filter(cs, &gwa, kh, kw), &abs(&priors.2), alpha64.abs(), beta64.abs());
        let got = exec_backward_filter(&xd, &x, &yd, &dy, &conv, &wd, &priors.2, alpha, beta, half);
        compare("dw", &got, &want, &bound, cs.n * oh * ow, out_u);
    }

    /// Runs a pass through the host-slice API with NaN in the output when beta is 0 (it must not be read).
    fn out_buf(prior: &[f64], beta: f32) -> Vec<f64> {
        if beta == 0.0 { vec![f64::NAN; prior.len()] } else { prior.to_vec() }
    }

    macro_rules! exec {
        ($name:ident, $pass:ident, ($ad:ty, $bd:ty, $od:ty)) => {
            #[allow(clippy::too_many_arguments)]
            fn $name(
                ad: &$ad,
                a: &[f64],
                bd: &$bd,
                b: &[f64],
                conv: &ConvDesc,
                od: &$od,
                prior: &[f64],
                alpha: f32,
                beta: f32,
                half: bool,
            ) -> Vec<f64> {
                let out = out_buf(prior, beta);
                if half {
                    let (a, b, mut o) = (buf16(a), buf16(b), buf16(&out));
                    host::$pass(alpha, ad, Src::F16(&a), bd, Src::F16(&b), conv, beta, od, &mut Dst::F16(&mut o))
                        .unwrap();
                    o.iter().map(|v| v.to_f64()).collect()
                } else {
                    let (a, b, mut o) = (buf32(a), buf32(b), buf32(&out));
                    host::$pass(alpha, ad, Src::F32(&a), bd, Src::F32(&b), conv, beta, od, &mut Dst::F32(&mut o))
                        .unwrap();
                    o.iter().map(|&v| v as f64).collect()
                }
            }
        };
    }
    exec!(exec_forward, forward, (TensorDesc, FilterDesc, TensorDesc));
    exec!(exec_backward_data, backward_data, (FilterDesc, TensorDesc, TensorDesc));
    exec!(exec_backward_filter, backward_filter, (TensorDesc, TensorDesc, FilterDesc));

    #[test]
    fn f32_passes_match_the_cpu_conv_every_element() {
        let mut rng = crate::cuda::emu::test_rng("cudnn f32");
        for cs in cases() {
            run(&mut rng, &cs, DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_FMA_MATH, (1.0, 0.0));
            run(&mut rng, &cs, DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_TENSOR_OP_MATH, (1.0, 0.0));
        }
        run(&mut rng, &cases()[3], DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_FMA_MATH, (-0.5, 1.0));
        run(&mut rng, &cases()[5], DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_DEFAULT_MATH, (2.0, -0.25));
    }

    #[test]
    fn f16_passes_accumulate_in_f32() {
        let mut rng = crate::cuda::emu::test_rng("cudnn f16");
        for cs in cases() {
            run(&mut rng, &cs, DataType::CUDNN_DATA_HALF, MathType::CUDNN_TENSOR_OP_MATH, (1.0, 0.0));
        }
        run(&mut rng, &cases()[0], DataType::CUDNN_DATA_HALF, MathType::CUDNN_TENSOR_OP_MATH, (1.0, 1.0));
    }

    #[test]
    fn find_reports_a_math_type_per_pass_and_calls_must_use_it() {
        let cs = &cases()[0];
        let (xd, wd, conv) = descs(cs, DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_TENSOR_OP_MATH);
        let yd = TensorDesc { dims: output_dims(&xd, &wd, &conv).unwrap(), ..xd };
        let f = find_forward(&xd, &wd, &conv, &yd).unwrap()[0];
        let d = find_backward_data(&wd, &yd, &conv, &xd).unwrap()[0];
        let b = find_backward_filter(&xd, &yd, &conv, &wd).unwrap()[0];
        assert_eq!(
            (f.math, d.math, b.math),
            (MathType::CUDNN_TENSOR_OP_MATH, MathType::CUDNN_DEFAULT_MATH, MathType::CUDNN_TENSOR_OP_MATH)
        );
        assert!(f.memory > 0 && d.memory > 0 && b.memory > 0);
        // A descriptor that permits only FMA math gets only FMA algorithms.
        let fma = ConvDesc { math: MathType::CUDNN_FMA_MATH, ..conv };
        assert!(find_backward_data(&wd, &yd, &fma, &xd).unwrap().iter().all(|p| p.math == MathType::CUDNN_FMA_MATH));
        // Backward data under the forward pass's math type: refused, naming what to do.
        let (nx, ny, nw) = (3 * 9 * 9 * 3, 3 * 5 * 5 * 13, 13 * 9 * 3);
        let (w, dy, mut dx, mut ws) = (vec![0f32; nw], vec![0f32; ny], vec![0f32; nx], vec![0u8; d.memory]);
        let buf = |p: *const u8, bytes: usize| Buf { addr: p as u64, bytes };
        let wb = buf(w.as_ptr().cast(), nw * 4);
        let dyb = buf(dy.as_ptr().cast(), ny * 4);
        let dxb = buf(dx.as_mut_ptr().cast(), nx * 4);
        let wsb = buf(ws.as_mut_ptr(), d.memory);
        // SAFETY: every Buf covers a live Vec; the output and workspace are exclusive to the call.
        let e = unsafe { convolution_backward_data(1.0, &wd, wb, &yd, dyb, &conv, d.algo, wsb, 0.0, &xd, dxb) }
            .unwrap_err();
        assert!(e.to_string().contains("found with math type CUDNN_DEFAULT_MATH"), "{e}");
        let with_math = ConvDesc { math: d.math, ..conv };
        // SAFETY: as above.
        unsafe { convolution_backward_data(1.0, &wd, wb, &yd, dyb, &with_math, d.algo, wsb, 0.0, &xd, dxb) }.unwrap();
        // Too small a workspace is refused, and the workspace is clobbered by a call.
        let small = Buf { bytes: d.memory - 1, ..wsb };
        // SAFETY: as above.
        let e = unsafe { convolution_backward_data(1.0, &wd, wb, &yd, dyb, &with_math, d.algo, small, 0.0, &xd, dxb) }
            .unwrap_err();
        assert!(e.to_string().contains("workspace bytes"), "{e}");
        assert!(ws.iter().all(|&b| b == 0xff));
        // An output overlapping an input is refused.
        // SAFETY: as above (refused before any access).
        let e = unsafe {
            convolution_backward_data(
                1.0,
                &wd,
                wb,
                &yd,
                dyb,
                &with_math,
                d.algo,
                wsb,
                0.0,
                &xd,
                Buf { addr: dyb.addr, bytes: dxb.bytes },
            )
        }
        .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let cs = &cases()[3];
        let (xd, wd, conv) = descs(cs, DataType::CUDNN_DATA_FLOAT, MathType::CUDNN_DEFAULT_MATH);
        let e = output_dims(&xd, &wd, &ConvDesc { groups: 4, ..conv }).unwrap_err().to_string();
        assert!(e.contains("groups"), "{e}");
        let nchw = TensorDesc { format: Format::CUDNN_TENSOR_NCHW, ..xd };
        assert!(output_dims(&nchw, &wd, &conv).unwrap_err().to_string().contains("NHWC"));
        let yd = TensorDesc { dims: output_dims(&xd, &wd, &conv).unwrap(), ..xd };
        let wrong = TensorDesc { dims: [yd.dims[0], yd.dims[1], yd.dims[2] + 1, yd.dims[3]], ..yd };
        assert!(find_forward(&xd, &wd, &conv, &wrong).unwrap_err().to_string().contains("does not match"));
        let half_w = FilterDesc { dtype: DataType::CUDNN_DATA_HALF, ..wd };
        assert!(find_forward(&xd, &half_w, &conv, &yd).unwrap_err().to_string().contains("types differ"));
    }
}
