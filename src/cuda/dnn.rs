//! cuDNN convolutions on NHWC tensors (forward, backward data, backward filter) for the dense k×k convolutions
//! (the stem and any grouped conv the kernels do not cover). Weights are stored [Cout, kh, kw, Cin] (cuDNN's NHWC
//! filter layout, KRSC). fp16 storage computes in fp32.
//!
//! [`descriptors`] maps a [`ConvShape`] to the descriptor values once; both devices get exactly those: the real
//! cuDNN on a GPU, the loops of [`super::emu::cudnn`] on the emulated device.
//!
//! The algorithm for each shape and pass is chosen once with cudnnFind* (which runs and times the candidates, on a
//! descriptor that permits tensor-op math) and cached with the workspace and the math type Find reports for it.
//! Each pass then runs on its own convolution descriptor set to that pass's math type: an algorithm found under
//! `CUDNN_DEFAULT_MATH` runs under it, not under the tensor-op math another pass chose. The workspace comes from
//! the caller ([`Dnn::workspace_bytes`]).
//!
//! Graph capture: a call made while a capture is open on the device's stream is captured (on the emulated device,
//! recorded with the same descriptors, algorithm and addresses, and run at replay); it allocates nothing, as the
//! workspace is the caller's. Find is not capturable (it runs and times candidates, allocating its own scratch),
//! so a shape first seen inside a capture is an error: run the step once eagerly before capturing, which plans
//! every shape it uses.
//!
//! Precision: for f32 storage the math types Find may return (default or tensor-op) allow TF32 tensor cores, so
//! `derma check` judges cuDNN in f32 at 5e-3; the emulated device rounds every input to TF32 under those math types
//! (the worst they allow) so that tolerance is tested.
//!
//! UNVERIFIED on hardware: the real path is written against cuDNN 9's legacy convolution API through cudarc and
//! compiled, but has not run on a GPU; scripts/gpu-check.sh runs `derma check` there.

use anyhow::{Result, anyhow, ensure};
use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use super::device::{Gpu, Stream};
use super::emu::cudnn::{self as emu, Buf, ConvDesc, FilterDesc, TensorDesc};
use super::emu::graph::EmuStream;
use super::kernels::{DevSlice, Elem};

/// Shape of one 2-D convolution, NHWC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch.
    pub n: i32,
    /// Input channels.
    pub c_in: i32,
    /// Input height.
    pub h: i32,
    /// Input width.
    pub w: i32,
    /// Output channels.
    pub c_out: i32,
    /// Kernel size (square).
    pub k: i32,
    /// Stride.
    pub stride: i32,
    /// Padding.
    pub pad: i32,
    /// Groups (1 for a dense conv).
    pub groups: i32,
    /// fp16 storage (else fp32).
    pub half: bool,
}

impl ConvShape {
    /// Output (height, width).
    pub fn out_hw(&self) -> (i32, i32) {
        ((self.h + 2 * self.pad - self.k) / self.stride + 1, (self.w + 2 * self.pad - self.k) / self.stride + 1)
    }
}

fn check(st: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if st == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS { Ok(()) } else { Err(anyhow!("cuDNN {what} failed: {st:?}")) }
}

/// The descriptor values of one convolution: (x, y, w, conv). `conv` permits tensor-op math, for Find; each pass
/// runs with the math type Find chose for it.
pub fn descriptors(s: &ConvShape) -> Result<(TensorDesc, TensorDesc, FilterDesc, ConvDesc)> {
    ensure!(
        s.groups > 0 && s.c_in % s.groups == 0 && s.c_out % s.groups == 0,
        "conv groups {} do not divide channels {} -> {}",
        s.groups,
        s.c_in,
        s.c_out
    );
    let (ho, wo) = s.out_hw();
    ensure!(s.k > 0 && s.stride > 0 && ho > 0 && wo > 0, "conv output would be empty for {s:?}");
    let dtype = if s.half { sys::cudnnDataType_t::CUDNN_DATA_HALF } else { sys::cudnnDataType_t::CUDNN_DATA_FLOAT };
    let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let x = TensorDesc { format: nhwc, dtype, dims: [s.n, s.c_in, s.h, s.w] };
    let y = TensorDesc { format: nhwc, dtype, dims: [s.n, s.c_out, ho, wo] };
    // With format NHWC, a filter's memory is KRSC: [Cout, kh, kw, Cin / groups], derma's OHWI.
    let w = FilterDesc { dtype, format: nhwc, dims: [s.c_out, s.c_in / s.groups, s.k, s.k] };
    let conv = ConvDesc {
        pad: [s.pad; 2],
        stride: [s.stride; 2],
        dilation: [1; 2],
        // The weights are applied as stored (PyTorch's conv2d is a cross-correlation).
        mode: sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        compute: sys::cudnnDataType_t::CUDNN_DATA_FLOAT, // accumulate in fp32 for fp16 storage too
        math: sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        groups: s.groups,
    };
    Ok((x, y, w, conv))
}

/// What Find chose for one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chosen<A> {
    /// The algorithm.
    pub algo: A,
    /// Its workspace bytes.
    pub memory: usize,
    /// The math type Find ran it under, set on this pass's descriptor.
    pub math: sys::cudnnMathType_t,
}

/// cuDNN descriptor objects of one shape on a GPU: x, y, w and one convolution descriptor per pass.
struct RealDescs {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    /// Forward, backward data, backward filter (null until created).
    conv: [sys::cudnnConvolutionDescriptor_t; 3],
}

impl Drop for RealDescs {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this plan and is destroyed once, here.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_filter_descriptor(self.w);
            for c in self.conv {
                if !c.is_null() {
                    let _ = result::destroy_convolution_descriptor(c);
                }
            }
        }
    }
}

/// A convolution descriptor object that is destroyed unless kept.
struct ConvObject(sys::cudnnConvolutionDescriptor_t);

impl ConvObject {
    /// Creates and sets a descriptor from `d`.
    fn new(d: &ConvDesc) -> Result<Self> {
        let c = Self(result::create_convolution_descriptor().map_err(|e| anyhow!("cuDNN conv descriptor: {e:?}"))?);
        // SAFETY: the descriptor is fresh and owned by `c` (destroyed on the error paths by its Drop).
        unsafe {
            result::set_convolution2d_descriptor(
                c.0,
                d.pad[0],
                d.pad[1],
                d.stride[0],
                d.stride[1],
                d.dilation[0],
                d.dilation[1],
                d.mode,
                d.compute,
            )
            .map_err(|e| anyhow!("cuDNN conv descriptor {d:?}: {e:?}"))?;
            result::set_convolution_math_type(c.0, d.math)
                .map_err(|e| anyhow!("cuDNN math type {:?}: {e:?}", d.math))?;
            if d.groups > 1 {
                result::set_convolution_group_count(c.0, d.groups)
                    .map_err(|e| anyhow!("cuDNN group count {}: {e:?}", d.groups))?;
            }
        }
        Ok(c)
    }

    fn keep(self) -> sys::cudnnConvolutionDescriptor_t {
        let c = self.0;
        std::mem::forget(self);
        c
    }
}

impl Drop for ConvObject {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once unless handed on by `keep`.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// Descriptors and chosen algorithms for one shape.
struct Plan {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
    fwd: Chosen<sys::cudnnConvolutionFwdAlgo_t>,
    bwd_data: Chosen<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: Chosen<sys::cudnnConvolutionBwdFilterAlgo_t>,
    /// The library's descriptor objects (GPU only).
    real: Option<RealDescs>,
}

impl Plan {
    /// The convolution descriptor values a pass runs with: the shape's, at the math type Find chose for the pass.
    fn conv_for(&self, pass: Pass) -> ConvDesc {
        let math = match pass {
            Pass::Forward => self.fwd.math,
            Pass::BackwardData => self.bwd_data.math,
            Pass::BackwardFilter => self.bwd_filter.math,
        };
        ConvDesc { math, ..self.conv }
    }
}

enum Backend {
    Cuda {
        handle: sys::cudnnHandle_t,
        stream: Arc<CudaStream>,
    },
    /// The emulated library, on the emulated device's stream (which records calls while a capture is open).
    Emulated(Arc<EmuStream>),
}

impl Backend {
    /// Whether a graph capture is open on the stream the calls go to.
    fn capturing(&self) -> bool {
        match self {
            Self::Cuda { stream, .. } => super::device::cuda_capturing(stream),
            Self::Emulated(e) => e.is_capturing(),
        }
    }
}

/// cuDNN on one device, with a per-shape plan cache.
pub struct Dnn {
    backend: Backend,
    plans: Mutex<HashMap<ConvShape, Arc<Plan>>>,
    /// f32 convolutions in full f32 (`CUDNN_FMA_MATH`, no TF32 tensor cores): what a backend that must match the
    /// CPU reference to 1e-5 needs. f16 storage is unaffected.
    strict_f32: bool,
    /// Held around every call on the handle: cuDNN allows a handle on any thread, but not two calls at once.
    calls: Mutex<()>,
}

// SAFETY: the handle is only used while `calls` is held, so calls on it never overlap; the plan cache is behind a
// mutex and launches are ordered on one stream.
unsafe impl Send for Dnn {}
// SAFETY: see above.
unsafe impl Sync for Dnn {}
// SAFETY: a plan's descriptors are immutable after creation.
unsafe impl Send for Plan {}
// SAFETY: see above.
unsafe impl Sync for Plan {}

impl Drop for Dnn {
    fn drop(&mut self) {
        if let Backend::Cuda { handle, .. } = &self.backend {
            // SAFETY: the handle was created in `new` and is destroyed once.
            let _ = unsafe { result::destroy_handle(*handle) };
        }
    }
}

/// Which pass a workspace is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// y = conv(x, w)
    Forward,
    /// dx from dy and w
    BackwardData,
    /// dw from x and dy
    BackwardFilter,
}

fn buf(s: DevSlice) -> Buf {
    Buf { addr: s.addr(), bytes: s.len_bytes() }
}

/// The first successful entry of a cudnnFind* result (they come fastest first).
fn best<P, A: Copy>(
    perfs: &[P],
    count: i32,
    view: impl Fn(&P) -> (sys::cudnnStatus_t, A, usize, sys::cudnnMathType_t),
    what: &str,
    s: &ConvShape,
) -> Result<Chosen<A>> {
    perfs[..count.clamp(0, perfs.len() as i32) as usize]
        .iter()
        .map(view)
        .find(|p| p.0 == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
        .map(|(_, algo, memory, math)| Chosen { algo, memory, math })
        .ok_or_else(|| anyhow!("cuDNN has no {what} algorithm for {s:?}"))
}

impl Dnn {
    /// Creates a handle on `gpu`'s stream (the emulated library on the emulated device). On a GPU, call only after
    /// [`super::probe`] reported cuDNN present: cudarc panics when the library cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let backend = match &gpu.stream {
            Stream::Emulated(e) => Backend::Emulated(e.clone()),
            Stream::Cuda(stream) => {
                let handle = result::create_handle().map_err(|e| anyhow!("creating the cuDNN handle: {e:?}"))?;
                // SAFETY: handle is fresh; the stream outlives it (kept in the backend).
                unsafe { result::set_stream(handle, stream.cu_stream() as _) }
                    .map_err(|e| anyhow!("binding cuDNN to the stream: {e:?}"))?;
                Backend::Cuda { handle, stream: stream.clone() }
            }
        };
        Ok(Self { backend, plans: Mutex::new(HashMap::new()), strict_f32: false, calls: Mutex::new(()) })
    }

    /// As [`Dnn::new`], but f32 convolutions never use TF32 (`CUDNN_FMA_MATH`): full f32 products.
    pub fn new_strict(gpu: &Gpu) -> Result<Self> {
        let mut dnn = Self::new(gpu)?;
        dnn.strict_f32 = true;
        Ok(dnn)
    }

    fn plan(&self, s: &ConvShape) -> Result<Arc<Plan>> {
        if let Ok(p) = self.plans.lock()
            && let Some(plan) = p.get(s)
        {
            return Ok(plan.clone());
        }
        ensure!(
            !self.backend.capturing(),
            "cuDNN algorithm search (Find) for conv {s:?} is {}: it runs and times candidate algorithms and \
             allocates scratch memory; run the first step eagerly before capturing, so every shape it uses is planned",
            super::device::NOT_IN_CAPTURE
        );
        let (x, y, w, mut conv) = descriptors(s)?;
        if self.strict_f32 && !s.half {
            conv.math = sys::cudnnMathType_t::CUDNN_FMA_MATH;
        }
        let plan = match &self.backend {
            Backend::Emulated(_) => {
                let first = |what: &str| anyhow!("the emulated cuDNN has no {what} algorithm for {s:?}");
                let f = *emu::find_forward(&x, &w, &conv, &y)?.first().ok_or_else(|| first("forward"))?;
                let d = *emu::find_backward_data(&w, &y, &conv, &x)?.first().ok_or_else(|| first("backward-data"))?;
                let b =
                    *emu::find_backward_filter(&x, &y, &conv, &w)?.first().ok_or_else(|| first("backward-filter"))?;
                Plan {
                    x,
                    y,
                    w,
                    conv,
                    fwd: Chosen { algo: f.algo, memory: f.memory, math: f.math },
                    bwd_data: Chosen { algo: d.algo, memory: d.memory, math: d.math },
                    bwd_filter: Chosen { algo: b.algo, memory: b.memory, math: b.math },
                    real: None,
                }
            }
            Backend::Cuda { handle, .. } => {
                let _held = self.calls.lock().map_err(|_| anyhow!("a cuDNN call panicked earlier"))?;
                Self::real_plan(*handle, s, x, y, w, conv)?
            }
        };
        let plan = Arc::new(plan);
        if let Ok(mut p) = self.plans.lock() {
            p.insert(*s, plan.clone());
        }
        Ok(plan)
    }

    /// Creates the descriptor objects, runs cudnnFind* for each pass, and gives each pass its own convolution
    /// descriptor at the math type Find reported for it.
    fn real_plan(
        handle: sys::cudnnHandle_t,
        s: &ConvShape,
        x: TensorDesc,
        y: TensorDesc,
        w: FilterDesc,
        conv: ConvDesc,
    ) -> Result<Plan> {
        let mut real = RealDescs {
            x: result::create_tensor_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?,
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: [std::ptr::null_mut(); 3],
        };
        real.y = result::create_tensor_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        real.w = result::create_filter_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        let search = ConvObject::new(&conv)?;
        // SAFETY: the descriptors are fresh and owned by `real` / `search` (destroyed on every error path by their
        // Drop); Find writes at most the requested 8 results into each array.
        let (fwd, bwd_data, bwd_filter) = unsafe {
            result::set_tensor4d_descriptor(real.x, x.format, x.dtype, x.dims)
                .map_err(|e| anyhow!("cuDNN x descriptor {s:?}: {e:?}"))?;
            result::set_tensor4d_descriptor(real.y, y.format, y.dtype, y.dims)
                .map_err(|e| anyhow!("cuDNN y descriptor {s:?}: {e:?}"))?;
            result::set_filter4d_descriptor(real.w, w.dtype, w.format, w.dims)
                .map_err(|e| anyhow!("cuDNN filter descriptor {s:?}: {e:?}"))?;

            let mut count = 0;
            let mut fp: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionForwardAlgorithm(
                    handle,
                    real.x,
                    real.w,
                    search.0,
                    real.y,
                    8,
                    &mut count,
                    fp.as_mut_ptr(),
                ),
                "find forward algorithm",
            )?;
            let fwd = best(&fp, count, |p| (p.status, p.algo, p.memory, p.mathType), "forward", s)?;
            let mut dp: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    handle,
                    real.w,
                    real.y,
                    search.0,
                    real.x,
                    8,
                    &mut count,
                    dp.as_mut_ptr(),
                ),
                "find backward-data algorithm",
            )?;
            let bwd_data = best(&dp, count, |p| (p.status, p.algo, p.memory, p.mathType), "backward-data", s)?;
            let mut bp: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    handle,
                    real.x,
                    real.y,
                    search.0,
                    real.w,
                    8,
                    &mut count,
                    bp.as_mut_ptr(),
                ),
                "find backward-filter algorithm",
            )?;
            let bwd_filter = best(&bp, count, |p| (p.status, p.algo, p.memory, p.mathType), "backward-filter", s)?;
            (fwd, bwd_data, bwd_filter)
        };
        let mut plan = Plan { x, y, w, conv, fwd, bwd_data, bwd_filter, real: None };
        for (i, pass) in [Pass::Forward, Pass::BackwardData, Pass::BackwardFilter].into_iter().enumerate() {
            real.conv[i] = ConvObject::new(&plan.conv_for(pass))?.keep();
        }
        plan.real = Some(real);
        Ok(plan)
    }

    /// What Find chose for each pass of shape `s` (plans the shape on first use): algorithm, workspace, math type.
    pub fn chosen(
        &self,
        s: &ConvShape,
    ) -> Result<(
        Chosen<sys::cudnnConvolutionFwdAlgo_t>,
        Chosen<sys::cudnnConvolutionBwdDataAlgo_t>,
        Chosen<sys::cudnnConvolutionBwdFilterAlgo_t>,
    )> {
        let p = self.plan(s)?;
        Ok((p.fwd, p.bwd_data, p.bwd_filter))
    }

    /// Workspace bytes the chosen algorithm of `pass` needs for shape `s` (plans the shape on first use).
    pub fn workspace_bytes(&self, s: &ConvShape, pass: Pass) -> Result<usize> {
        let p = self.plan(s)?;
        Ok(match pass {
            Pass::Forward => p.fwd.memory,
            Pass::BackwardData => p.bwd_data.memory,
            Pass::BackwardFilter => p.bwd_filter.memory,
        })
    }

    fn sizes<T: Elem>(s: &ConvShape) -> Result<(usize, usize, usize)> {
        ensure!(
            s.half == (T::SUFFIX == "f16"),
            "conv shape says half={} but the element type is {}",
            s.half,
            T::SUFFIX
        );
        let (ho, wo) = s.out_hw();
        let e = size_of::<T>();
        let x = s.n as usize * s.h as usize * s.w as usize * s.c_in as usize * e;
        let y = s.n as usize * ho as usize * wo as usize * s.c_out as usize * e;
        let w = s.c_out as usize * s.k as usize * s.k as usize * (s.c_in / s.groups) as usize * e;
        Ok((x, y, w))
    }

    fn real<'p>(&self, p: &'p Plan) -> Result<(sys::cudnnHandle_t, &'p RealDescs)> {
        match (&self.backend, &p.real) {
            (Backend::Cuda { handle, .. }, Some(r)) => Ok((*handle, r)),
            _ => Err(anyhow!("cuDNN plan without descriptor objects on a GPU")),
        }
    }

    /// y = conv(x, w) (beta = 0: y is overwritten, not read).
    pub fn forward<T: Elem>(&self, s: &ConvShape, x: DevSlice, w: DevSlice, y: DevSlice, ws: DevSlice) -> Result<()> {
        let (xb, yb, wb) = Self::sizes::<T>(s)?;
        let p = self.plan(s)?;
        ensure!(
            x.len_bytes() >= xb && y.len_bytes() >= yb && w.len_bytes() >= wb,
            "conv forward buffers too small for {s:?}"
        );
        ensure!(ws.len_bytes() >= p.fwd.memory, "conv forward workspace {} < {} bytes", ws.len_bytes(), p.fwd.memory);
        let (alpha, beta) = (1f32, 0f32);
        if let Backend::Emulated(stream) = &self.backend {
            let (conv, s) = (p.conv_for(Pass::Forward), *s);
            let (xd, wd, yd, algo) = (p.x, p.w, p.y, p.fwd.algo);
            let (x, w, ws, y) = (buf(x), buf(w), buf(ws), buf(y));
            return stream.call(
                || format!("cuDNN conv forward {s:?}"),
                move || {
                    // SAFETY: on the emulated device, device addresses are host addresses of blocks the caller
                    // borrows, each at least as long as its descriptor needs (checked above). A replay addresses
                    // the same memory, which a live graph keeps allocated (it pins the allocator's cache).
                    unsafe { emu::convolution_forward(alpha, &xd, x, &wd, w, &conv, algo, ws, beta, &yd, y) }
                        .map_err(|e| e.context(format!("conv forward {s:?}")))
                },
            );
        }
        let (handle, r) = self.real(&p)?;
        let _held = self.calls.lock().map_err(|_| anyhow!("a cuDNN call panicked earlier"))?;
        // SAFETY: buffers cover the shapes (checked above); descriptors match them; ordered on the handle's stream.
        unsafe {
            result::convolution_forward(
                handle,
                &alpha as *const f32 as *const c_void,
                r.x,
                x.addr() as *const c_void,
                r.w,
                w.addr() as *const c_void,
                r.conv[0],
                p.fwd.algo,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                r.y,
                y.addr() as *mut c_void,
            )
        }
        .map_err(|e| anyhow!("cuDNN conv forward {s:?}: {e:?}"))
    }

    /// dx = conv_backward_data(dy, w) (overwritten).
    pub fn backward_data<T: Elem>(
        &self,
        s: &ConvShape,
        dy: DevSlice,
        w: DevSlice,
        dx: DevSlice,
        ws: DevSlice,
    ) -> Result<()> {
        let (xb, yb, wb) = Self::sizes::<T>(s)?;
        let p = self.plan(s)?;
        ensure!(
            dx.len_bytes() >= xb && dy.len_bytes() >= yb && w.len_bytes() >= wb,
            "conv backward-data buffers too small for {s:?}"
        );
        ensure!(
            ws.len_bytes() >= p.bwd_data.memory,
            "conv backward-data workspace {} < {} bytes",
            ws.len_bytes(),
            p.bwd_data.memory
        );
        let (alpha, beta) = (1f32, 0f32);
        if let Backend::Emulated(stream) = &self.backend {
            let (conv, s) = (p.conv_for(Pass::BackwardData), *s);
            let (xd, wd, yd, algo) = (p.x, p.w, p.y, p.bwd_data.algo);
            let (w, dy, ws, dx) = (buf(w), buf(dy), buf(ws), buf(dx));
            return stream.call(
                || format!("cuDNN conv backward data {s:?}"),
                move || {
                    // SAFETY: as in forward.
                    unsafe { emu::convolution_backward_data(alpha, &wd, w, &yd, dy, &conv, algo, ws, beta, &xd, dx) }
                        .map_err(|e| e.context(format!("conv backward data {s:?}")))
                },
            );
        }
        let (handle, r) = self.real(&p)?;
        let _held = self.calls.lock().map_err(|_| anyhow!("a cuDNN call panicked earlier"))?;
        // SAFETY: as in forward.
        unsafe {
            result::convolution_backward_data(
                handle,
                &alpha as *const f32 as *const c_void,
                r.w,
                w.addr() as *const c_void,
                r.y,
                dy.addr() as *const c_void,
                r.conv[1],
                p.bwd_data.algo,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                r.x,
                dx.addr() as *mut c_void,
            )
        }
        .map_err(|e| anyhow!("cuDNN conv backward data {s:?}: {e:?}"))
    }

    /// dw (+)= conv_backward_filter(x, dy): `accumulate` adds into dw (beta = 1) instead of overwriting.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_filter<T: Elem>(
        &self,
        s: &ConvShape,
        x: DevSlice,
        dy: DevSlice,
        dw: DevSlice,
        ws: DevSlice,
        accumulate: bool,
    ) -> Result<()> {
        let (xb, yb, wb) = Self::sizes::<T>(s)?;
        let p = self.plan(s)?;
        ensure!(
            x.len_bytes() >= xb && dy.len_bytes() >= yb && dw.len_bytes() >= wb,
            "conv backward-filter buffers too small for {s:?}"
        );
        ensure!(
            ws.len_bytes() >= p.bwd_filter.memory,
            "conv backward-filter workspace {} < {} bytes",
            ws.len_bytes(),
            p.bwd_filter.memory
        );
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        if let Backend::Emulated(stream) = &self.backend {
            let (conv, s) = (p.conv_for(Pass::BackwardFilter), *s);
            let (xd, wd, yd, algo) = (p.x, p.w, p.y, p.bwd_filter.algo);
            let (x, dy, ws, dw) = (buf(x), buf(dy), buf(ws), buf(dw));
            return stream.call(
                || format!("cuDNN conv backward filter {s:?}"),
                move || {
                    // SAFETY: as in forward.
                    unsafe { emu::convolution_backward_filter(alpha, &xd, x, &yd, dy, &conv, algo, ws, beta, &wd, dw) }
                        .map_err(|e| e.context(format!("conv backward filter {s:?}")))
                },
            );
        }
        let (handle, r) = self.real(&p)?;
        let _held = self.calls.lock().map_err(|_| anyhow!("a cuDNN call panicked earlier"))?;
        // SAFETY: as in forward.
        unsafe {
            result::convolution_backward_filter(
                handle,
                &alpha as *const f32 as *const c_void,
                r.x,
                x.addr() as *const c_void,
                r.y,
                dy.addr() as *const c_void,
                r.conv[2],
                p.bwd_filter.algo,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                r.w,
                dw.addr() as *mut c_void,
            )
        }
        .map_err(|e| anyhow!("cuDNN conv backward filter {s:?}: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::{self, ConvCfg, ConvGeom};
    use rand::RngExt;

    #[test]
    fn each_pass_runs_at_the_math_type_find_chose_for_it() {
        let gpu = Gpu::emulated().unwrap();
        let dnn = Dnn::new(&gpu).unwrap();
        let s = ConvShape { n: 2, c_in: 6, h: 7, w: 9, c_out: 4, k: 3, stride: 2, pad: 1, groups: 2, half: false };
        let (f, d, b) = dnn.chosen(&s).unwrap();
        // The emulated Find picks different math types for the passes, as the real one may.
        assert_eq!(f.math, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH);
        assert_eq!(d.math, sys::cudnnMathType_t::CUDNN_DEFAULT_MATH);
        assert_eq!(b.math, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH);
        let plan = dnn.plan(&s).unwrap();
        assert_eq!(plan.conv_for(Pass::BackwardData).math, d.math);
        assert_eq!(plan.conv_for(Pass::Forward), ConvDesc { math: f.math, ..plan.conv });

        // All three passes run (the emulated cuDNN refuses a pass whose math type is not its algorithm's) and
        // match the CPU reference; the filter gradient accumulates with beta = 1.
        let mut rng = crate::cuda::emu::test_rng("dnn on emu");
        let (ho, wo) = s.out_hw();
        let (nx, ny, nw) = (2 * 7 * 9 * 6, 2 * (ho * wo) as usize * 4, 4 * 9 * 3);
        let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w, dy) = (draw(nx), draw(nw), draw(ny));
        let (bx, bw, bdy) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&dy).unwrap());
        let (by, bdx, bdw) = (
            gpu.upload(&vec![f32::NAN; ny]).unwrap(),
            gpu.upload(&vec![f32::NAN; nx]).unwrap(),
            gpu.zeros(nw * 4).unwrap(),
        );
        let ws_bytes = [Pass::Forward, Pass::BackwardData, Pass::BackwardFilter]
            .map(|p| dnn.workspace_bytes(&s, p).unwrap())
            .into_iter()
            .max()
            .unwrap_or(0);
        let ws = gpu.zeros(ws_bytes.max(1)).unwrap();
        let v = DevSlice::of;
        dnn.forward::<f32>(&s, v(&bx), v(&bw), v(&by), v(&ws)).unwrap();
        dnn.backward_data::<f32>(&s, v(&bdy), v(&bw), v(&bdx), v(&ws)).unwrap();
        dnn.backward_filter::<f32>(&s, v(&bx), v(&bdy), v(&bdw), v(&ws), false).unwrap();
        dnn.backward_filter::<f32>(&s, v(&bx), v(&bdy), v(&bdw), v(&ws), true).unwrap();
        let geom = ConvGeom::new(&[2, 7, 9, 6], &[4, 3, 3, 3], ConvCfg { stride: 2, pad: 1, groups: 2 }).unwrap();
        let f = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<f64>>();
        let (mut wy, mut wdx, mut wdw) = (vec![0.0; ny], vec![0.0; nx], vec![0.0; nw]);
        conv::forward(&geom, &f(&x), &f(&w), None, &mut wy);
        conv::backward_data(&geom, &f(&dy), &f(&w), &mut wdx);
        conv::backward_weight(&geom, &f(&x), &f(&dy), &mut wdw);
        let wdw2: Vec<f64> = wdw.iter().map(|v| 2.0 * v).collect();
        // Per-element bound from the sums of |terms|: two TF32 input roundings per term plus f32 accumulation.
        let a = |v: &[f32]| v.iter().map(|&e| (e as f64).abs()).collect::<Vec<f64>>();
        let (mut ay, mut adx, mut adw) = (vec![0.0; ny], vec![0.0; nx], vec![0.0; nw]);
        conv::forward(&geom, &a(&x), &a(&w), None, &mut ay);
        conv::backward_data(&geom, &a(&dy), &a(&w), &mut adx);
        conv::backward_weight(&geom, &a(&x), &a(&dy), &mut adw);
        let adw2: Vec<f64> = adw.iter().map(|v| 2.0 * v).collect();
        for (name, got, want, abs) in [
            ("y", gpu.download::<f32>(&by, ny).unwrap(), wy, ay),
            ("dx", gpu.download::<f32>(&bdx, nx).unwrap(), wdx, adx),
            ("dw (accumulated twice)", gpu.download::<f32>(&bdw, nw).unwrap(), wdw2, adw2),
        ] {
            for (i, ((&g, &w), &b)) in got.iter().zip(&want).zip(&abs).enumerate() {
                let tol = (2.0 * 2f64.powi(-11) + 130.0 * 2f64.powi(-24)) * b + 1e-30;
                assert!((g as f64 - w).abs() <= tol, "{name}[{i}] {g} vs {w} (tol {tol})");
            }
        }
    }

    #[test]
    fn descriptor_mapping() {
        let s = ConvShape { n: 3, c_in: 8, h: 9, w: 7, c_out: 12, k: 5, stride: 2, pad: 2, groups: 4, half: true };
        let (x, y, w, c) = descriptors(&s).unwrap();
        assert_eq!(x.dims, [3, 8, 9, 7]);
        assert_eq!(y.dims, [3, 12, 5, 4]);
        assert_eq!(w.dims, [12, 2, 5, 5]);
        assert_eq!(w.format, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC);
        assert_eq!((c.pad, c.stride, c.dilation, c.groups), ([2, 2], [2, 2], [1, 1], 4));
        assert_eq!(c.mode, sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION);
        assert_eq!(x.dtype, sys::cudnnDataType_t::CUDNN_DATA_HALF);
        assert_eq!(emu::output_dims(&x, &w, &c).unwrap(), y.dims);
        assert!(descriptors(&ConvShape { groups: 3, ..s }).is_err());
    }
}
