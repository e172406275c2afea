//! cuDNN convolutions on NHWC tensors (forward, backward data, backward filter) for the dense k×k convolutions
//! (the stem and any grouped conv the kernels do not cover). Weights are stored [Cout, kh, kw, Cin] (cuDNN's NHWC
//! filter layout). fp16 storage computes in fp32 with tensor-op math allowed.
//!
//! The algorithm for each shape is chosen once with cudnnFind* (which runs and times the candidates) and cached;
//! its workspace comes from the caller.
//!
//! UNVERIFIED on hardware: written against cuDNN 9's legacy convolution API through cudarc and compiled, but not
//! yet run on a GPU. scripts/gpu-check.sh runs the CUDA tests that check it against the CPU reference.

use anyhow::{Result, anyhow, ensure};
use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use super::device::{Gpu, Stream};
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

/// Descriptors and chosen algorithms for one shape.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: (sys::cudnnConvolutionFwdAlgo_t, usize),
    bwd_data: (sys::cudnnConvolutionBwdDataAlgo_t, usize),
    bwd_filter: (sys::cudnnConvolutionBwdFilterAlgo_t, usize),
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once, here.
        unsafe {
            let _ = result::destroy_tensor_descriptor(self.x);
            let _ = result::destroy_tensor_descriptor(self.y);
            let _ = result::destroy_filter_descriptor(self.w);
            let _ = result::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// A cuDNN handle on one stream with a per-shape plan cache.
pub struct Dnn {
    handle: sys::cudnnHandle_t,
    plans: Mutex<HashMap<ConvShape, Arc<Plan>>>,
    _stream: Arc<CudaStream>,
}

// SAFETY: the handle is used only through &self methods that cuDNN allows from any thread as long as calls on one
// handle do not overlap; the plan cache is behind a mutex and launches are ordered on one stream.
unsafe impl Send for Dnn {}
// SAFETY: see above.
unsafe impl Sync for Dnn {}
// SAFETY: a plan holds immutable descriptors after creation.
unsafe impl Send for Plan {}
// SAFETY: see above.
unsafe impl Sync for Plan {}

impl Drop for Dnn {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
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

impl Dnn {
    /// Creates a handle on `gpu`'s stream. On a GPU, call only after [`super::probe`] reported cuDNN present:
    /// cudarc panics when the library cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let Stream::Cuda(stream) = &gpu.stream else {
            anyhow::bail!("cuDNN is not available on the emulated device yet")
        };
        let stream = stream.clone();
        let handle = result::create_handle().map_err(|e| anyhow!("creating the cuDNN handle: {e:?}"))?;
        // SAFETY: handle is fresh; the stream outlives it (kept in the struct).
        unsafe { result::set_stream(handle, stream.cu_stream() as _) }
            .map_err(|e| anyhow!("binding cuDNN to the stream: {e:?}"))?;
        Ok(Self { handle, plans: Mutex::new(HashMap::new()), _stream: stream })
    }

    fn plan(&self, s: &ConvShape) -> Result<Arc<Plan>> {
        if let Ok(p) = self.plans.lock()
            && let Some(plan) = p.get(s)
        {
            return Ok(plan.clone());
        }
        ensure!(
            s.groups > 0 && s.c_in % s.groups == 0 && s.c_out % s.groups == 0,
            "conv groups {} do not divide channels",
            s.groups
        );
        let (ho, wo) = s.out_hw();
        ensure!(ho > 0 && wo > 0, "conv output would be empty for {s:?}");
        let dt = if s.half { sys::cudnnDataType_t::CUDNN_DATA_HALF } else { sys::cudnnDataType_t::CUDNN_DATA_FLOAT };
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let x = result::create_tensor_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        let y = result::create_tensor_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        let w = result::create_filter_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        let conv = result::create_convolution_descriptor().map_err(|e| anyhow!("cuDNN descriptor: {e:?}"))?;
        let mut plan = Plan {
            x,
            y,
            w,
            conv,
            fwd: (sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0),
            bwd_data: (sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, 0),
            bwd_filter: (sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, 0),
        };
        // SAFETY: descriptors are fresh and owned by `plan` (destroyed on drop, also on the error paths below).
        unsafe {
            result::set_tensor4d_descriptor(plan.x, nhwc, dt, [s.n, s.c_in, s.h, s.w])
                .map_err(|e| anyhow!("cuDNN x descriptor {s:?}: {e:?}"))?;
            result::set_tensor4d_descriptor(plan.y, nhwc, dt, [s.n, s.c_out, ho, wo])
                .map_err(|e| anyhow!("cuDNN y descriptor {s:?}: {e:?}"))?;
            result::set_filter4d_descriptor(plan.w, dt, nhwc, [s.c_out, s.c_in / s.groups, s.k, s.k])
                .map_err(|e| anyhow!("cuDNN filter descriptor {s:?}: {e:?}"))?;
            result::set_convolution2d_descriptor(
                plan.conv,
                s.pad,
                s.pad,
                s.stride,
                s.stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT, // accumulate in fp32 for fp16 storage too
            )
            .map_err(|e| anyhow!("cuDNN conv descriptor {s:?}: {e:?}"))?;
            result::set_convolution_math_type(plan.conv, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
                .map_err(|e| anyhow!("cuDNN math type: {e:?}"))?;
            if s.groups > 1 {
                result::set_convolution_group_count(plan.conv, s.groups)
                    .map_err(|e| anyhow!("cuDNN group count: {e:?}"))?;
            }

            // cudnnFind* runs every candidate on scratch memory it allocates itself and returns them fastest first.
            let mut count = 0;
            let mut fwd: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionForwardAlgorithm(
                    self.handle,
                    plan.x,
                    plan.w,
                    plan.conv,
                    plan.y,
                    8,
                    &mut count,
                    fwd.as_mut_ptr(),
                ),
                "find forward algorithm",
            )?;
            let best = fwd[..count.max(0) as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .ok_or_else(|| anyhow!("cuDNN has no forward algorithm for {s:?}"))?;
            plan.fwd = (best.algo, best.memory);

            let mut bd: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    self.handle,
                    plan.w,
                    plan.y,
                    plan.conv,
                    plan.x,
                    8,
                    &mut count,
                    bd.as_mut_ptr(),
                ),
                "find backward-data algorithm",
            )?;
            let best = bd[..count.max(0) as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .ok_or_else(|| anyhow!("cuDNN has no backward-data algorithm for {s:?}"))?;
            plan.bwd_data = (best.algo, best.memory);

            let mut bf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    self.handle,
                    plan.x,
                    plan.y,
                    plan.conv,
                    plan.w,
                    8,
                    &mut count,
                    bf.as_mut_ptr(),
                ),
                "find backward-filter algorithm",
            )?;
            let best = bf[..count.max(0) as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .ok_or_else(|| anyhow!("cuDNN has no backward-filter algorithm for {s:?}"))?;
            plan.bwd_filter = (best.algo, best.memory);
        }
        let plan = Arc::new(plan);
        if let Ok(mut p) = self.plans.lock() {
            p.insert(*s, plan.clone());
        }
        Ok(plan)
    }

    /// Workspace bytes the chosen algorithm of `pass` needs for shape `s` (plans the shape on first use).
    pub fn workspace_bytes(&self, s: &ConvShape, pass: Pass) -> Result<usize> {
        let p = self.plan(s)?;
        Ok(match pass {
            Pass::Forward => p.fwd.1,
            Pass::BackwardData => p.bwd_data.1,
            Pass::BackwardFilter => p.bwd_filter.1,
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

    /// y = conv(x, w) (beta = 0: y is overwritten).
    pub fn forward<T: Elem>(&self, s: &ConvShape, x: DevSlice, w: DevSlice, y: DevSlice, ws: DevSlice) -> Result<()> {
        let (xb, yb, wb) = Self::sizes::<T>(s)?;
        let p = self.plan(s)?;
        ensure!(
            x.len_bytes() >= xb && y.len_bytes() >= yb && w.len_bytes() >= wb,
            "conv forward buffers too small for {s:?}"
        );
        ensure!(ws.len_bytes() >= p.fwd.1, "conv forward workspace {} < {} bytes", ws.len_bytes(), p.fwd.1);
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: buffers cover the shapes (checked above); descriptors match them; ordered on the handle's stream.
        unsafe {
            result::convolution_forward(
                self.handle,
                &alpha as *const f32 as *const c_void,
                p.x,
                x.addr() as *const c_void,
                p.w,
                w.addr() as *const c_void,
                p.conv,
                p.fwd.0,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                p.y,
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
            ws.len_bytes() >= p.bwd_data.1,
            "conv backward-data workspace {} < {} bytes",
            ws.len_bytes(),
            p.bwd_data.1
        );
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: as in forward.
        unsafe {
            result::convolution_backward_data(
                self.handle,
                &alpha as *const f32 as *const c_void,
                p.w,
                w.addr() as *const c_void,
                p.y,
                dy.addr() as *const c_void,
                p.conv,
                p.bwd_data.0,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                p.x,
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
            ws.len_bytes() >= p.bwd_filter.1,
            "conv backward-filter workspace {} < {} bytes",
            ws.len_bytes(),
            p.bwd_filter.1
        );
        let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
        // SAFETY: as in forward.
        unsafe {
            result::convolution_backward_filter(
                self.handle,
                &alpha as *const f32 as *const c_void,
                p.x,
                x.addr() as *const c_void,
                p.y,
                dy.addr() as *const c_void,
                p.conv,
                p.bwd_filter.0,
                ws.addr() as *mut c_void,
                ws.len_bytes(),
                &beta as *const f32 as *const c_void,
                p.w,
                dw.addr() as *mut c_void,
            )
        }
        .map_err(|e| anyhow!("cuDNN conv backward filter {s:?}: {e:?}"))
    }
}
