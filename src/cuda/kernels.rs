//! The kernel images embedded at build time (one fatbin per `kernels/*.cu`), loaded into a CUDA context, and typed
//! launch wrappers for every kernel.
//!
//! Wrappers take [`DevSlice`]s (device address + length in bytes) and check every length against the shape before
//! launching, so a wrong size is an error, not an out-of-bounds access on the device. Parameter structs are
//! `#[repr(C)]` mirrors of the structs in the .cu files (same field order and types).
//!
//! Every wrapper launches through one path, [`Launch`]: the entry point, the launch shape and the argument pack
//! (pointers to `#[repr(C)]` values, exactly cuLaunchKernel's `kernelParams`) go either to the CUDA driver or,
//! on the emulated device, to the same kernels compiled for the host, with the same argument array. So the code
//! that runs on a GPU is the code CI runs.
//!
//! All launches go to the stream given; nothing here synchronises.

use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DeviceRepr, LaunchConfig};
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use super::alloc::Block;
use super::build_info;
use super::device::{EMULATED_SMS, Stream};
use super::emu::sys as emu_sys;

/// Storage element types the kernels are instantiated for.
pub trait Elem: DeviceRepr + Copy + 'static {
    /// Suffix of the kernel entry points for this type.
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// A borrowed range of device memory: address and length in bytes. Borrowing the [`Block`] keeps it alive.
#[derive(Clone, Copy, Debug)]
pub struct DevSlice<'a> {
    addr: u64,
    bytes: usize,
    _block: PhantomData<&'a Block>,
}

impl<'a> DevSlice<'a> {
    /// The whole block.
    pub fn of(block: &'a Block) -> Self {
        Self { addr: block.addr(), bytes: block.len_bytes(), _block: PhantomData }
    }

    /// A sub-range `[offset, offset + bytes)` of the block; an error when it does not fit.
    pub fn range(block: &'a Block, offset: usize, bytes: usize) -> Result<Self> {
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= block.len_bytes()),
            "device range {offset}+{bytes} bytes is outside its {}-byte block",
            block.len_bytes()
        );
        Ok(Self { addr: block.addr() + offset as u64, bytes, _block: PhantomData })
    }

    /// A sub-range `[offset, offset + bytes)` of this slice; an error when it does not fit.
    pub fn sub(&self, offset: usize, bytes: usize) -> Result<Self> {
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= self.bytes),
            "device range {offset}+{bytes} bytes is outside its {}-byte slice",
            self.bytes
        );
        Ok(Self { addr: self.addr + offset as u64, bytes, _block: PhantomData })
    }

    /// The device address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The address after checking that the slice holds at least `elems` values of `T`.
    pub(crate) fn checked<T>(&self, elems: usize, what: &str) -> Result<u64> {
        let need = elems.checked_mul(size_of::<T>()).context("size overflow")?;
        ensure!(
            self.bytes >= need,
            "{what}: device buffer has {} bytes but the shape needs {elems} x {} bytes = {need}",
            self.bytes,
            size_of::<T>()
        );
        Ok(self.addr)
    }
}

/// A byte range of device memory one launch touches (address 0: an absent optional buffer).
#[derive(Clone, Copy, Debug)]
struct Span {
    name: &'static str,
    addr: u64,
    bytes: usize,
}

impl Span {
    fn new(name: &'static str, addr: u64, bytes: usize) -> Self {
        Self { name, addr, bytes }
    }

    fn overlaps(&self, o: &Span) -> bool {
        self.addr != 0 && o.addr != 0 && self.addr < o.addr + o.bytes as u64 && o.addr < self.addr + self.bytes as u64
    }
}

/// The span of `elems` values of `T` at `addr`.
fn span<T>(name: &'static str, addr: u64, elems: usize) -> Span {
    Span::new(name, addr, elems * size_of::<T>())
}

/// Refuses a launch where an output overlaps another output or an input: the kernels declare their pointers
/// `__restrict__`, so the compiler may keep a value in a register across a store to memory that aliases it, and
/// an in-place call would read stale or half-updated data. The check is on the byte ranges the shape addresses.
fn no_alias(kernel: &str, outputs: &[Span], inputs: &[Span]) -> Result<()> {
    for (i, o) in outputs.iter().enumerate() {
        for other in outputs[i + 1..].iter().chain(inputs) {
            ensure!(
                !o.overlaps(other),
                "{kernel}: output {} overlaps {} (the kernel's pointers are __restrict__, so it cannot run in place): \
                 give it a separate buffer",
                o.name,
                other.name
            );
        }
    }
    Ok(())
}

fn opt_checked<T>(s: Option<DevSlice<'_>>, elems: usize, what: &str) -> Result<u64> {
    s.map(|s| s.checked::<T>(elems, what)).transpose().map(|a| a.unwrap_or(0))
}

/// Mirror of `BnParams` in kernels/batchnorm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BnParams {
    /// Rows N*H*W.
    pub m: i64,
    /// Channels.
    pub c: i32,
    /// 0: none, 1: SiLU after the affine.
    pub act: i32,
    /// Added to the variance.
    pub eps: f32,
    /// Running-statistics momentum (torch convention).
    pub momentum: f32,
    /// Backward: 1 uses batch statistics, 0 treats mean/invstd as constants.
    pub training: i32,
    /// Rows of the reduction workspace (gridDim.y of the reduction kernels).
    pub rows_split: i32,
}

/// Mirror of `DwParams` in kernels/depthwise.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DwParams {
    /// Batch.
    pub n: i32,
    /// Input height.
    pub h: i32,
    /// Input width.
    pub w: i32,
    /// Channels.
    pub c: i32,
    /// Output height.
    pub ho: i32,
    /// Output width.
    pub wo: i32,
    /// Kernel size.
    pub k: i32,
    /// Stride.
    pub stride: i32,
    /// Padding, (k - 1) / 2.
    pub pad: i32,
    /// gridDim.z of the weight-gradient kernel (rows of its workspace).
    pub rows_split: i32,
}

/// Mirror of `LossParams` in kernels/loss.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LossParams {
    /// Batch.
    pub b: i32,
    /// Classes.
    pub k: i32,
    /// 0: weighted cross-entropy, 1: focal.
    pub focal: i32,
    /// Focal exponent.
    pub gamma: f32,
    /// Multiplies dlogits (e.g. the loss scale); 0 skips the gradient.
    pub grad_scale: f32,
    /// Padding to a multiple of 8 bytes.
    pub pad_: i32,
}

/// Mirror of `AdamParams` in kernels/optim.cu: the step's scalars, computed in f64 and rounded to f32 once (see
/// [`AdamParams::for_step`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamParams {
    /// Elements.
    pub n: i64,
    /// 1 − lr·weight_decay.
    pub decay: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    /// −lr / (1 − β1^t).
    pub neg_step_size: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Padding to 40 bytes (a multiple of the i64's alignment), as in C.
    pub pad_: i32,
}

// SAFETY: plain #[repr(C)] structs of integers and floats, laid out exactly like their .cu mirrors.
unsafe impl DeviceRepr for BnParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for DwParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for LossParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamParams {}

/// A value a kernel takes as one parameter, passed by address as cuLaunchKernel's `kernelParams` are.
///
/// # Safety
/// Implementors are plain data with a C layout identical to the kernel-side parameter type (device addresses are
/// `u64`, a `T*` on a 64-bit device).
pub unsafe trait KernelArg: Copy {}
// SAFETY: C's int32_t, int64_t, uint32_t, uint64_t (also device pointers) and float.
unsafe impl KernelArg for i32 {}
// SAFETY: as above.
unsafe impl KernelArg for i64 {}
// SAFETY: as above.
unsafe impl KernelArg for u32 {}
// SAFETY: as above.
unsafe impl KernelArg for u64 {}
// SAFETY: as above.
unsafe impl KernelArg for f32 {}
// SAFETY: #[repr(C)] mirrors of the .cu structs (layouts pinned by `param_structs_match_the_cu_layouts`).
unsafe impl KernelArg for BnParams {}
// SAFETY: as above.
unsafe impl KernelArg for DwParams {}
// SAFETY: as above.
unsafe impl KernelArg for LossParams {}
// SAFETY: as above.
unsafe impl KernelArg for AdamParams {}

/// A kernel entry point of one device, looked up once by [`Kernels::entry`].
pub struct Entry {
    family: &'static str,
    name: String,
    /// The loaded function on a GPU; `None` on the emulated device, which finds kernels by name.
    function: Option<CudaFunction>,
}

impl Entry {
    /// The `extern "C"` name, e.g. `silu_fwd_f32`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One launch being assembled: the entry point and its argument pack, in parameter order. The pack borrows the
/// values it points at, so they outlive the launch.
pub struct Launch<'a> {
    entry: &'a Entry,
    args: Vec<*mut c_void>,
    _values: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    /// A launch of `entry` with no arguments yet.
    pub fn new(entry: &'a Entry) -> Self {
        Self { entry, args: Vec::with_capacity(12), _values: PhantomData }
    }

    /// Appends the next parameter.
    pub fn arg<T: KernelArg>(mut self, value: &'a T) -> Self {
        self.args.push((value as *const T).cast_mut().cast::<c_void>());
        self
    }

    /// Launches on `stream` with shape `cfg`: queued on a GPU, run to completion on the emulated device (where a
    /// deadlock, divergent barrier, bad shuffle or a shape CUDA would refuse comes back as the error).
    ///
    /// # Safety
    /// The arguments match the kernel's parameters in number, order and type, and every device address among them
    /// covers what the kernel reads and writes for this shape.
    pub unsafe fn run(mut self, stream: &Stream, cfg: LaunchConfig) -> Result<()> {
        let (family, name) = (self.entry.family, &self.entry.name);
        let shape = || format!("grid {:?} block {:?} shared {} B", cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes);
        match (&self.entry.function, stream) {
            (Some(f), Stream::Cuda(s)) => {
                s.context().bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
                // SAFETY: the caller guarantees the pack matches the kernel; every pointer in it borrows a value
                // that lives for 'a, past this call (the driver copies the parameters at launch).
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        cfg.grid_dim,
                        cfg.block_dim,
                        cfg.shared_mem_bytes,
                        s.cu_stream(),
                        &mut self.args,
                    )
                }
                .map_err(|e| anyhow!("launching {name} ({family}.cu, {}): {e:?}", shape()))
            }
            // SAFETY: as above; on the emulated device the addresses are host memory the blocks own.
            (None, Stream::Emulated) => {
                unsafe { emu_sys::launch(name, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, &mut self.args) }
                    .with_context(|| format!("{name} ({family}.cu, {}) on the emulated device", shape()))
            }
            _ => bail!("kernel {name} was looked up on one device and launched on another's stream"),
        }
    }
}

/// Activation for [`Kernels::unary`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    /// x * sigmoid(x)
    Silu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// max(x, 0)
    Relu,
}

impl Unary {
    fn name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Sigmoid => "sigmoid",
            Self::Relu => "relu",
        }
    }
}

const THREADS: u32 = 256;
/// Rows of the deterministic reduction workspaces (batch norm, depthwise weight gradient), at most.
const MAX_ROWS_SPLIT: i64 = 256;

/// Where the kernels come from.
enum Images {
    /// The embedded fatbins, loaded into one CUDA context.
    Cuda { modules: HashMap<&'static str, Arc<CudaModule>>, functions: Mutex<HashMap<String, CudaFunction>> },
    /// kernels/*.cu compiled for the host and linked into this binary.
    Emulated,
}

/// The kernels of one device.
pub struct Kernels {
    images: Images,
    sms: u32,
}

/// Rows of a reduction workspace for `rows` input rows: enough blocks to fill the GPU, few enough that the final
/// per-channel pass stays short.
pub fn rows_split(rows: i64) -> i32 {
    (rows / 512).clamp(1, MAX_ROWS_SPLIT) as i32
}

/// Bytes of the batch-norm reduction workspace for [M, C] (float2 per row split and channel).
pub fn bn_workspace_bytes(m: i64, c: i32) -> usize {
    rows_split(m) as usize * c as usize * 8
}

/// Bytes of the depthwise weight-gradient workspace.
pub fn dw_weight_workspace_bytes(p: &DwParams) -> usize {
    let rows = p.n as i64 * p.ho as i64 * p.wo as i64;
    rows_split(rows) as usize * (p.k * p.k) as usize * p.c as usize * 4
}

impl Kernels {
    /// Loads every embedded image into `ctx`. Fails with the build's reason when the kernels were not built.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        if !build_info::KERNELS_BUILT {
            bail!(
                "this derma binary has no GPU kernels ({}); rebuild on a machine where nvcc is found or can be \
                 installed",
                build_info::KERNELS_ABSENT_REASON
            );
        }
        let mut modules = HashMap::new();
        for (name, image) in build_info::IMAGES {
            let m = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec())).map_err(|e| {
                let oldest = build_info::ARCHS.first().copied().unwrap_or(0);
                anyhow::anyhow!(
                    "loading kernel image {name}.cu failed: {e:?} (the kernels need an NVIDIA driver of the \
                         580 series or newer and a GPU of compute capability {}.{} or newer)",
                    oldest / 10,
                    oldest % 10
                )
            })?;
            modules.insert(*name, m);
        }
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow::anyhow!("querying the SM count failed: {e:?}"))? as u32;
        Ok(Self { images: Images::Cuda { modules, functions: Mutex::new(HashMap::new()) }, sms: sms.max(1) })
    }

    /// The kernels of the emulated device; an error when this binary's emulated kernel library lacks them.
    pub fn emulated() -> Result<Self> {
        ensure!(
            emu_sys::has_kernel("silu_fwd_f32"),
            "the emulated kernel library linked into this binary has no kernels (rebuild derma)"
        );
        Ok(Self { images: Images::Emulated, sms: EMULATED_SMS })
    }

    /// SMs of the device (sets the grid of grid-stride launches).
    pub fn sms(&self) -> u32 {
        self.sms
    }

    /// Threads a grid-stride launch runs at most: inputs larger than this (times the vector width) make every
    /// thread loop.
    pub fn grid_stride_threads(&self) -> usize {
        (self.sms * 8 * THREADS) as usize
    }

    /// A kernel by family (the .cu file stem) and entry-point name; on a GPU the function is cached after the
    /// first lookup.
    pub fn entry(&self, family: &'static str, name: &str) -> Result<Entry> {
        let (modules, functions) = match &self.images {
            Images::Emulated => {
                ensure!(emu_sys::has_kernel(name), "kernel {name} ({family}.cu) is not in the emulated kernel library");
                return Ok(Entry { family, name: name.to_string(), function: None });
            }
            Images::Cuda { modules, functions } => (modules, functions),
        };
        let key = format!("{family}/{name}");
        if let Ok(cache) = functions.lock()
            && let Some(f) = cache.get(&key)
        {
            return Ok(Entry { family, name: name.to_string(), function: Some(f.clone()) });
        }
        let module = modules.get(family).with_context(|| format!("no kernel image {family}.cu in this binary"))?;
        let f = module.load_function(name).map_err(|e| anyhow!("kernel {name} not found in {family}.cu: {e:?}"))?;
        if let Ok(mut cache) = functions.lock() {
            cache.insert(key, f.clone());
        }
        Ok(Entry { family, name: name.to_string(), function: Some(f) })
    }

    /// Grid-stride launch shape for `work` independent items: up to 8 blocks per SM.
    fn flat_cfg(&self, work: usize) -> LaunchConfig {
        let blocks = work.div_ceil(THREADS as usize).clamp(1, (self.sms * 8) as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// y = op(x) over `n` elements.
    pub fn unary<T: Elem>(&self, s: &Stream, op: Unary, y: DevSlice, x: DevSlice, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("{}_fwd_{}", op.name(), T::SUFFIX))?;
        let (y, x) = (y.checked::<T>(n, "unary y")?, x.checked::<T>(n, "unary x")?);
        let n = n as i64;
        no_alias("unary", &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: y and x hold n elements of T (checked above); the kernel reads x[0..n) and writes y[0..n).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// dx = dy * op'(saved), where `saved` is x for SiLU and ReLU and the forward output y for sigmoid.
    pub fn unary_backward<T: Elem>(
        &self,
        s: &Stream,
        op: Unary,
        dx: DevSlice,
        saved: DevSlice,
        dy: DevSlice,
        n: usize,
    ) -> Result<()> {
        let f = self.entry("elementwise", &format!("{}_bwd_{}", op.name(), T::SUFFIX))?;
        let dx = dx.checked::<T>(n, "unary backward dx")?;
        let saved = saved.checked::<T>(n, "unary backward saved")?;
        let dy = dy.checked::<T>(n, "unary backward dy")?;
        let n = n as i64;
        let n_ = n as usize;
        no_alias(
            "unary backward",
            &[span::<T>("dx", dx, n_)],
            &[span::<T>("saved", saved, n_), span::<T>("dy", dy, n_)],
        )?;
        // SAFETY: all three buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&dx).arg(&saved).arg(&dy).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y = a + b.
    pub fn add<T: Elem>(&self, s: &Stream, y: DevSlice, a: DevSlice, b: DevSlice, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("add_{}", T::SUFFIX))?;
        let (y, a, b) = (y.checked::<T>(n, "add y")?, a.checked::<T>(n, "add a")?, b.checked::<T>(n, "add b")?);
        let n = n as i64;
        let n_ = n as usize;
        no_alias("add", &[span::<T>("y", y, n_)], &[span::<T>("a", a, n_), span::<T>("b", b, n_)])?;
        // SAFETY: all three buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&a).arg(&b).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y = alpha * x (`axpy = false`) or y += alpha * x (`axpy = true`).
    pub fn scale<T: Elem>(&self, s: &Stream, y: DevSlice, x: DevSlice, alpha: f32, n: usize, axpy: bool) -> Result<()> {
        let name = if axpy { "axpy" } else { "scale" };
        let f = self.entry("elementwise", &format!("{name}_{}", T::SUFFIX))?;
        let (y, x) = (y.checked::<T>(n, "scale y")?, x.checked::<T>(n, "scale x")?);
        let n = n as i64;
        no_alias(name, &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: both buffers hold n elements of T (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&alpha).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// fp32 -> fp16 (`to_half = true`) or fp16 -> fp32 copy of `n` elements.
    pub fn cast(&self, s: &Stream, y: DevSlice, x: DevSlice, n: usize, to_half: bool) -> Result<()> {
        let (name, y, x) = if to_half {
            ("cast_f32_to_f16", y.checked::<half::f16>(n, "cast y")?, x.checked::<f32>(n, "cast x")?)
        } else {
            ("cast_f16_to_f32", y.checked::<f32>(n, "cast y")?, x.checked::<half::f16>(n, "cast x")?)
        };
        let f = self.entry("elementwise", name)?;
        let n = n as i64;
        let (es_y, es_x) = if to_half { (2, 4) } else { (4, 2) };
        no_alias(name, &[Span::new("y", y, n as usize * es_y)], &[Span::new("x", x, n as usize * es_x)])?;
        // SAFETY: x and y hold n elements of their types (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y = value (rounded to T) over `n` elements, without reading y: the backward seed, or zeroing a gradient
    /// buffer that may hold NaN (which `scale` with alpha 0 would keep).
    pub fn fill<T: Elem>(&self, s: &Stream, y: DevSlice, value: f32, n: usize) -> Result<()> {
        let f = self.entry("elementwise", &format!("fill_{}", T::SUFFIX))?;
        let y = y.checked::<T>(n, "fill y")?;
        let n = n as i64;
        // SAFETY: y holds n elements of T (checked above); the kernel writes y[0..n) only.
        unsafe { Launch::new(&f).arg(&y).arg(&value).arg(&n).run(s, self.flat_cfg(n as usize)) }
    }

    /// y[r, c] += bias[c] over a row-major [rows, cols] matrix of T, with an f32 bias of `cols` (the master
    /// parameter), in place.
    pub fn bias_add<T: Elem>(&self, s: &Stream, y: DevSlice, bias: DevSlice, rows: usize, cols: usize) -> Result<()> {
        let total = rows.checked_mul(cols).context("bias add: size overflow")?;
        let y = y.checked::<T>(total, "bias add y")?;
        let b = bias.checked::<f32>(cols, "bias add bias")?;
        let f = self.entry("linear", &format!("bias_add_{}", T::SUFFIX))?;
        no_alias("bias_add", &[span::<T>("y", y, total)], &[span::<f32>("bias", b, cols)])?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: y holds rows*cols elements of T and bias cols floats (checked above), and they do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&b).arg(&r).arg(&c).run(s, self.flat_cfg(total)) }
    }

    /// out[c] = sum over rows of x[r, c] (`accumulate`: out[c] += it) for a row-major [rows, cols] x of T, in f32
    /// and in a fixed order (deterministic): the bias gradient of a linear layer, written or added into its f32
    /// gradient slot. Without `accumulate` out is not read.
    pub fn col_sum<T: Elem>(
        &self,
        s: &Stream,
        out: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(cols > 0, "column sum of a matrix with no columns");
        let total = rows.checked_mul(cols).context("column sum: size overflow")?;
        let out = out.checked::<f32>(cols, "column sum out")?;
        let x = x.checked::<T>(total, "column sum x")?;
        let f = self.entry("linear", &format!("col_sum_{}", T::SUFFIX))?;
        no_alias("col_sum", &[span::<f32>("out", out, cols)], &[span::<T>("x", x, total)])?;
        let blocks = u32::try_from(cols.div_ceil(32)).context("column sum: too many columns for one grid")?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let (r, c, acc) = (rows as i64, cols as i64, accumulate as i32);
        // SAFETY: out holds cols floats and x rows*cols elements of T (checked above); the grid covers the columns.
        unsafe { Launch::new(&f).arg(&out).arg(&x).arg(&r).arg(&c).arg(&acc).run(s, cfg) }
    }

    /// Launch shape of the 32x32-tile transposes: blocks of (32, 8) taking tiles in a grid-stride loop.
    fn tile_cfg(&self, rows: usize, cols: usize) -> LaunchConfig {
        let tiles = rows.div_ceil(32) * cols.div_ceil(32);
        let blocks = tiles.clamp(1, (self.sms * 8) as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
    }

    /// y [cols, rows] of T = the transpose of a row-major [rows, cols] f32 x, cast to T: the depthwise kernels'
    /// [k*k, C] weights from the model's [C, k*k] master (rows = C, cols = k*k).
    pub fn permute_from_f32<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let total = rows.checked_mul(cols).context("permute: size overflow")?;
        let y = y.checked::<T>(total, "permute y")?;
        let x = x.checked::<f32>(total, "permute x")?;
        let f = self.entry("depthwise", &format!("permute_f32_to_{}", T::SUFFIX))?;
        no_alias("permute", &[span::<T>("y", y, total)], &[span::<f32>("x", x, total)])?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: x and y hold rows*cols elements of their types (checked above) and do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&r).arg(&c).run(s, self.tile_cfg(rows, cols)) }
    }

    /// y[c, r] = x[r, c] (`accumulate`: y[c, r] += x[r, c]) for a row-major [rows, cols] f32 x and [cols, rows]
    /// f32 y: the depthwise kernels' [k*k, C] weight gradient (rows = k*k, cols = C) into the model's [C, k*k]
    /// gradient slot. Without `accumulate` y is not read.
    pub fn transpose_add(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) -> Result<()> {
        let total = rows.checked_mul(cols).context("transpose add: size overflow")?;
        let y = y.checked::<f32>(total, "transpose add y")?;
        let x = x.checked::<f32>(total, "transpose add x")?;
        let f = self.entry("depthwise", "transpose_add_f32")?;
        no_alias("transpose_add", &[span::<f32>("y", y, total)], &[span::<f32>("x", x, total)])?;
        let (r, c, acc) = (rows as i64, cols as i64, accumulate as i32);
        // SAFETY: x and y hold rows*cols floats (checked above) and do not overlap.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&r).arg(&c).arg(&acc).run(s, self.tile_cfg(rows, cols)) }
    }

    fn bn_reduce_cfg(p: &BnParams) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((p.c as u32).div_ceil(32), p.rows_split as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_channel_cfg(c: i32) -> LaunchConfig {
        LaunchConfig { grid_dim: ((c as u32).div_ceil(THREADS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// Batch-norm statistics of x [M, C] (training): mean and invstd [C] f32, running stats updated in place
    /// (either may be `None`). `workspace` holds [`bn_workspace_bytes`].
    #[allow(clippy::too_many_arguments)]
    pub fn bn_stats<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        x: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        running_mean: Option<DevSlice>,
        running_var: Option<DevSlice>,
        workspace: DevSlice,
    ) -> Result<()> {
        let mut p = *p;
        p.rows_split = rows_split(p.m);
        let (m, c) = (p.m as usize, p.c as usize);
        ensure!(p.m > 0 && p.c > 0, "batch norm on an empty tensor [{}, {}]", p.m, p.c);
        let x = x.checked::<T>(m * c, "bn x")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let rm = opt_checked::<f32>(running_mean, c, "bn running_mean")?;
        let rv = opt_checked::<f32>(running_var, c, "bn running_var")?;
        let ws = workspace.checked::<[f32; 2]>(p.rows_split as usize * c, "bn workspace")?;
        let f1 = self.entry("batchnorm", &format!("bn_stats_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("batchnorm", &format!("bn_stats_finalize_{}", T::SUFFIX))?;
        no_alias(
            "bn_stats",
            &[
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("running_mean", rm, c),
                span::<f32>("running_var", rv, c),
                span::<[f32; 2]>("workspace", ws, p.rows_split as usize * c),
            ],
            &[span::<T>("x", x, m * c)],
        )?;
        // SAFETY: x holds M*C elements, the workspace rows_split*C float2, mean/invstd/running C floats (checked
        // above); a null running pointer is skipped by the kernel.
        unsafe {
            Launch::new(&f1).arg(&x).arg(&ws).arg(&p).run(s, Self::bn_reduce_cfg(&p))?;
            Launch::new(&f2)
                .arg(&x)
                .arg(&ws)
                .arg(&mean)
                .arg(&invstd)
                .arg(&rm)
                .arg(&rv)
                .arg(&p)
                .run(s, Self::per_channel_cfg(p.c))?;
        }
        Ok(())
    }

    /// Eval-mode statistics: mean = running_mean, invstd = 1 / sqrt(running_var + eps).
    pub fn bn_eval_stats(
        &self,
        s: &Stream,
        p: &BnParams,
        running_mean: DevSlice,
        running_var: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
    ) -> Result<()> {
        let c = p.c as usize;
        let rm = running_mean.checked::<f32>(c, "bn running_mean")?;
        let rv = running_var.checked::<f32>(c, "bn running_var")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let f = self.entry("batchnorm", "bn_eval_stats")?;
        // SAFETY: four buffers of C floats (checked above).
        unsafe {
            Launch::new(&f).arg(&rm).arg(&rv).arg(&mean).arg(&invstd).arg(p).run(s, Self::per_channel_cfg(p.c))?;
        }
        Ok(())
    }

    /// y = act(gamma * (x - mean) * invstd + beta) over [M, C]; act from `p.act`.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_forward<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        y: DevSlice,
        x: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        gamma: DevSlice,
        beta: DevSlice,
    ) -> Result<()> {
        let (m, c) = (p.m as usize, p.c as usize);
        let y = y.checked::<T>(m * c, "bn y")?;
        let x = x.checked::<T>(m * c, "bn x")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let gamma = gamma.checked::<f32>(c, "bn gamma")?;
        let beta = beta.checked::<f32>(c, "bn beta")?;
        let f = self.entry("batchnorm", &format!("bn_forward_{}", T::SUFFIX))?;
        no_alias(
            "bn_forward",
            &[span::<T>("y", y, m * c)],
            &[
                span::<T>("x", x, m * c),
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("gamma", gamma, c),
                span::<f32>("beta", beta, c),
            ],
        )?;
        // SAFETY: x, y hold M*C elements; the per-channel buffers C floats (checked above).
        unsafe {
            Launch::new(&f)
                .arg(&y)
                .arg(&x)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(p)
                .run(s, self.flat_cfg(m * c / 4))?;
        }
        Ok(())
    }

    /// Batch-norm backward (with the SiLU of `p.act` fused): writes dgamma, dbeta (when given) and dx.
    /// `workspace` holds [`bn_workspace_bytes`]; `sums` holds 2*C floats.
    #[allow(clippy::too_many_arguments)]
    pub fn bn_backward<T: Elem>(
        &self,
        s: &Stream,
        p: &BnParams,
        dx: DevSlice,
        x: DevSlice,
        dy: DevSlice,
        mean: DevSlice,
        invstd: DevSlice,
        gamma: DevSlice,
        beta: DevSlice,
        dgamma: Option<DevSlice>,
        dbeta: Option<DevSlice>,
        workspace: DevSlice,
        sums: DevSlice,
    ) -> Result<()> {
        let mut p = *p;
        p.rows_split = rows_split(p.m);
        let (m, c) = (p.m as usize, p.c as usize);
        let dx = dx.checked::<T>(m * c, "bn dx")?;
        let x = x.checked::<T>(m * c, "bn x")?;
        let dy = dy.checked::<T>(m * c, "bn dy")?;
        let mean = mean.checked::<f32>(c, "bn mean")?;
        let invstd = invstd.checked::<f32>(c, "bn invstd")?;
        let gamma = gamma.checked::<f32>(c, "bn gamma")?;
        let beta = beta.checked::<f32>(c, "bn beta")?;
        let dgamma = opt_checked::<f32>(dgamma, c, "bn dgamma")?;
        let dbeta = opt_checked::<f32>(dbeta, c, "bn dbeta")?;
        let ws = workspace.checked::<[f32; 2]>(p.rows_split as usize * c, "bn workspace")?;
        let sums = sums.checked::<f32>(2 * c, "bn sums")?;
        let f1 = self.entry("batchnorm", &format!("bn_backward_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("batchnorm", "bn_backward_finalize")?;
        let f3 = self.entry("batchnorm", &format!("bn_backward_dx_{}", T::SUFFIX))?;
        no_alias(
            "bn_backward",
            &[
                span::<T>("dx", dx, m * c),
                span::<f32>("dgamma", dgamma, c),
                span::<f32>("dbeta", dbeta, c),
                span::<[f32; 2]>("workspace", ws, p.rows_split as usize * c),
                span::<f32>("sums", sums, 2 * c),
            ],
            &[
                span::<T>("x", x, m * c),
                span::<T>("dy", dy, m * c),
                span::<f32>("mean", mean, c),
                span::<f32>("invstd", invstd, c),
                span::<f32>("gamma", gamma, c),
                span::<f32>("beta", beta, c),
            ],
        )?;
        // SAFETY: every buffer was checked against M, C and rows_split above; null dgamma/dbeta are skipped.
        unsafe {
            Launch::new(&f1)
                .arg(&x)
                .arg(&dy)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(&ws)
                .arg(&p)
                .run(s, Self::bn_reduce_cfg(&p))?;
            Launch::new(&f2).arg(&ws).arg(&dgamma).arg(&dbeta).arg(&sums).arg(&p).run(s, Self::per_channel_cfg(p.c))?;
            Launch::new(&f3)
                .arg(&dx)
                .arg(&x)
                .arg(&dy)
                .arg(&mean)
                .arg(&invstd)
                .arg(&gamma)
                .arg(&beta)
                .arg(&sums)
                .arg(&p)
                .run(s, self.flat_cfg(m * c))?;
        }
        Ok(())
    }

    fn dw_check(p: &DwParams) -> Result<()> {
        ensure!(p.k > 0 && p.k % 2 == 1, "depthwise kernel size {} must be odd", p.k);
        ensure!(p.pad == (p.k - 1) / 2, "depthwise padding {} must be (k-1)/2 = {}", p.pad, (p.k - 1) / 2);
        ensure!(p.stride > 0, "depthwise stride must be positive");
        let ho = (p.h + 2 * p.pad - p.k) / p.stride + 1;
        let wo = (p.w + 2 * p.pad - p.k) / p.stride + 1;
        ensure!(p.ho == ho && p.wo == wo, "depthwise output {}x{} should be {ho}x{wo}", p.ho, p.wo);
        Ok(())
    }

    /// Depthwise conv forward: y [N,Ho,Wo,C] from x [N,H,W,C] and w [k,k,C].
    pub fn dw_forward<T: Elem>(&self, s: &Stream, p: &DwParams, y: DevSlice, x: DevSlice, w: DevSlice) -> Result<()> {
        Self::dw_check(p)?;
        let (n, c) = (p.n as usize, p.c as usize);
        let out_elems = n * p.ho as usize * p.wo as usize * c;
        let y = y.checked::<T>(out_elems, "depthwise y")?;
        let x = x.checked::<T>(n * p.h as usize * p.w as usize * c, "depthwise x")?;
        let w = w.checked::<T>((p.k * p.k) as usize * c, "depthwise w")?;
        let f = self.entry("depthwise", &format!("dw_forward_{}", T::SUFFIX))?;
        let in_elems = n * p.h as usize * p.w as usize * c;
        no_alias(
            "dw_forward",
            &[span::<T>("y", y, out_elems)],
            &[span::<T>("x", x, in_elems), span::<T>("w", w, (p.k * p.k) as usize * c)],
        )?;
        // SAFETY: shapes checked above; the kernel indexes only inside them.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&w).arg(p).run(s, self.flat_cfg(out_elems))? };
        Ok(())
    }

    /// Depthwise conv backward data: dx [N,H,W,C] from dy [N,Ho,Wo,C] and w [k,k,C].
    pub fn dw_backward_data<T: Elem>(
        &self,
        s: &Stream,
        p: &DwParams,
        dx: DevSlice,
        dy: DevSlice,
        w: DevSlice,
    ) -> Result<()> {
        Self::dw_check(p)?;
        let (n, c) = (p.n as usize, p.c as usize);
        let in_elems = n * p.h as usize * p.w as usize * c;
        let dx = dx.checked::<T>(in_elems, "depthwise dx")?;
        let dy = dy.checked::<T>(n * p.ho as usize * p.wo as usize * c, "depthwise dy")?;
        let w = w.checked::<T>((p.k * p.k) as usize * c, "depthwise w")?;
        let f = self.entry("depthwise", &format!("dw_backward_data_{}", T::SUFFIX))?;
        let out_elems = n * p.ho as usize * p.wo as usize * c;
        no_alias(
            "dw_backward_data",
            &[span::<T>("dx", dx, in_elems)],
            &[span::<T>("dy", dy, out_elems), span::<T>("w", w, (p.k * p.k) as usize * c)],
        )?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&dx).arg(&dy).arg(&w).arg(p).run(s, self.flat_cfg(in_elems))? };
        Ok(())
    }

    /// Depthwise conv backward weight: dw [k,k,C] f32 (written, or added to when `accumulate`).
    /// `workspace` holds [`dw_weight_workspace_bytes`].
    #[allow(clippy::too_many_arguments)]
    pub fn dw_backward_weight<T: Elem>(
        &self,
        s: &Stream,
        p: &DwParams,
        dw: DevSlice,
        x: DevSlice,
        dy: DevSlice,
        workspace: DevSlice,
        accumulate: bool,
    ) -> Result<()> {
        Self::dw_check(p)?;
        let mut p = *p;
        p.rows_split = rows_split(p.n as i64 * p.ho as i64 * p.wo as i64);
        let (n, c, kk) = (p.n as usize, p.c as usize, (p.k * p.k) as usize);
        let dw = dw.checked::<f32>(kk * c, "depthwise dw")?;
        let x = x.checked::<T>(n * p.h as usize * p.w as usize * c, "depthwise x")?;
        let dy = dy.checked::<T>(n * p.ho as usize * p.wo as usize * c, "depthwise dy")?;
        let ws = workspace.checked::<f32>(p.rows_split as usize * kk * c, "depthwise workspace")?;
        let f1 = self.entry("depthwise", &format!("dw_backward_weight_partial_{}", T::SUFFIX))?;
        let f2 = self.entry("depthwise", "sum_rows_f32")?;
        let cfg = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(32), kk as u32, p.rows_split as u32),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols, acc) = (p.rows_split, (kk * c) as i64, accumulate as i32);
        no_alias(
            "dw_backward_weight",
            &[span::<f32>("dw", dw, kk * c), span::<f32>("workspace", ws, p.rows_split as usize * kk * c)],
            &[
                span::<T>("x", x, n * p.h as usize * p.w as usize * c),
                span::<T>("dy", dy, n * p.ho as usize * p.wo as usize * c),
            ],
        )?;
        // SAFETY: shapes and the workspace size checked above.
        unsafe {
            Launch::new(&f1).arg(&ws).arg(&x).arg(&dy).arg(&p).run(s, cfg)?;
            Launch::new(&f2)
                .arg(&dw)
                .arg(&ws)
                .arg(&rows)
                .arg(&cols)
                .arg(&acc)
                .run(s, Self::per_channel_cfg((kk * c) as i32))?;
        }
        Ok(())
    }

    fn se_reduce_cfg(n: i32, c: i32) -> LaunchConfig {
        LaunchConfig { grid_dim: ((c as u32).div_ceil(32), n as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
    }

    /// Global average pool [N, HW, C] -> [N, C].
    pub fn se_pool<T: Elem>(&self, s: &Stream, out: DevSlice, x: DevSlice, n: i32, hw: i32, c: i32) -> Result<()> {
        let out = out.checked::<T>((n * c) as usize, "se pool out")?;
        let x = x.checked::<T>(n as usize * hw as usize * c as usize, "se pool x")?;
        let f = self.entry("se", &format!("se_pool_{}", T::SUFFIX))?;
        let (nc, total) = ((n * c) as usize, n as usize * hw as usize * c as usize);
        no_alias("se_pool", &[span::<T>("out", out, nc)], &[span::<T>("x", x, total)])?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&out).arg(&x).arg(&hw).arg(&c).run(s, Self::se_reduce_cfg(n, c))? };
        Ok(())
    }

    /// Pool backward: dx[n, hw, c] = dout[n, c] / HW.
    #[allow(clippy::too_many_arguments)]
    pub fn se_pool_backward<T: Elem>(
        &self,
        s: &Stream,
        dx: DevSlice,
        dout: DevSlice,
        n: i32,
        hw: i32,
        c: i32,
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let dx = dx.checked::<T>(total, "se pool dx")?;
        let dout = dout.checked::<T>((n * c) as usize, "se pool dout")?;
        let f = self.entry("se", &format!("se_pool_backward_{}", T::SUFFIX))?;
        no_alias("se_pool_backward", &[span::<T>("dx", dx, total)], &[span::<T>("dout", dout, (n * c) as usize)])?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&dx).arg(&dout).arg(&n).arg(&hw).arg(&c).run(s, self.flat_cfg(total))? };
        Ok(())
    }

    /// Channel scaling y[n, hw, c] = x[n, hw, c] * scale[n, c].
    #[allow(clippy::too_many_arguments)]
    pub fn se_scale<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        scale: DevSlice,
        n: i32,
        hw: i32,
        c: i32,
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let y = y.checked::<T>(total, "se scale y")?;
        let x = x.checked::<T>(total, "se scale x")?;
        let sc = scale.checked::<T>((n * c) as usize, "se scale s")?;
        let f = self.entry("se", &format!("se_scale_{}", T::SUFFIX))?;
        no_alias(
            "se_scale",
            &[span::<T>("y", y, total)],
            &[span::<T>("x", x, total), span::<T>("scale", sc, (n * c) as usize)],
        )?;
        // SAFETY: shapes checked above.
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&sc).arg(&n).arg(&hw).arg(&c).run(s, self.flat_cfg(total / 4))? };
        Ok(())
    }

    /// Channel scaling backward: dx = dy * scale (skipped when `dx` is `None`) and dscale[n, c] = sum_hw dy * x.
    #[allow(clippy::too_many_arguments)]
    pub fn se_scale_backward<T: Elem>(
        &self,
        s: &Stream,
        dx: Option<DevSlice>,
        dscale: DevSlice,
        x: DevSlice,
        scale: DevSlice,
        dy: DevSlice,
        (n, hw, c): (i32, i32, i32),
    ) -> Result<()> {
        let total = n as usize * hw as usize * c as usize;
        let dx = opt_checked::<T>(dx, total, "se scale dx")?;
        let ds = dscale.checked::<T>((n * c) as usize, "se scale dscale")?;
        let x = x.checked::<T>(total, "se scale x")?;
        let sc = scale.checked::<T>((n * c) as usize, "se scale s")?;
        let dy = dy.checked::<T>(total, "se scale dy")?;
        let f = self.entry("se", &format!("se_scale_backward_{}", T::SUFFIX))?;
        no_alias(
            "se_scale_backward",
            &[span::<T>("dx", dx, total), span::<T>("dscale", ds, (n * c) as usize)],
            &[span::<T>("x", x, total), span::<T>("scale", sc, (n * c) as usize), span::<T>("dy", dy, total)],
        )?;
        // SAFETY: shapes checked above; a null dx is skipped by the kernel.
        unsafe {
            Launch::new(&f)
                .arg(&dx)
                .arg(&ds)
                .arg(&x)
                .arg(&sc)
                .arg(&dy)
                .arg(&hw)
                .arg(&c)
                .run(s, Self::se_reduce_cfg(n, c))?
        };
        Ok(())
    }

    /// Dropout with the counter-based mask of `seed` (backward: the same call on dy with the same seed).
    pub fn dropout<T: Elem>(&self, s: &Stream, y: DevSlice, x: DevSlice, p: f32, seed: u64, n: usize) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "dropout probability {p} must be in [0, 1)");
        let (y, x) = (y.checked::<T>(n, "dropout y")?, x.checked::<T>(n, "dropout x")?);
        let f = self.entry("dropout", &format!("dropout_{}", T::SUFFIX))?;
        let n = n as i64;
        no_alias("dropout", &[span::<T>("y", y, n as usize)], &[span::<T>("x", x, n as usize)])?;
        // SAFETY: both buffers hold n elements (checked above).
        unsafe { Launch::new(&f).arg(&y).arg(&x).arg(&p).arg(&seed).arg(&n).run(s, self.flat_cfg(n as usize))? };
        Ok(())
    }

    /// Stochastic depth ("row" mode): y = residual + keep_n / (1 - p) * x with one coin per sample of
    /// `per_sample` elements (backward: the same call on dy, no residual).
    #[allow(clippy::too_many_arguments)]
    pub fn stochastic_depth<T: Elem>(
        &self,
        s: &Stream,
        y: DevSlice,
        x: DevSlice,
        residual: Option<DevSlice>,
        p: f32,
        seed: u64,
        (n, per_sample): (usize, usize),
    ) -> Result<()> {
        ensure!((0.0..1.0).contains(&p), "stochastic depth probability {p} must be in [0, 1)");
        ensure!(
            per_sample > 0 && n % per_sample == 0,
            "stochastic depth: {n} elements are not whole samples of {per_sample}"
        );
        let y = y.checked::<T>(n, "stochastic depth y")?;
        let x = x.checked::<T>(n, "stochastic depth x")?;
        let r = opt_checked::<T>(residual, n, "stochastic depth residual")?;
        let f = self.entry("dropout", &format!("stochastic_depth_{}", T::SUFFIX))?;
        let (n, per) = (n as i64, per_sample as i64);
        no_alias(
            "stochastic_depth",
            &[span::<T>("y", y, n as usize)],
            &[span::<T>("x", x, n as usize), span::<T>("residual", r, n as usize)],
        )?;
        // SAFETY: buffers hold n elements (checked above); a null residual is skipped.
        unsafe {
            Launch::new(&f)
                .arg(&y)
                .arg(&x)
                .arg(&r)
                .arg(&p)
                .arg(&seed)
                .arg(&n)
                .arg(&per)
                .run(s, self.flat_cfg(n as usize))?
        };
        Ok(())
    }

    /// Softmax + weighted CE or focal loss over logits [B, K] with i32 targets: writes the mean loss (1 f32),
    /// dlogits (unless `p.grad_scale == 0`), probabilities (when given), and `bad_target` (1 i32: 0, or the
    /// 1-based row of the first target outside [0, K); written once by the kernel, so it needs no initial value).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_loss<T: Elem>(
        &self,
        s: &Stream,
        p: &LossParams,
        loss: DevSlice,
        dlogits: DevSlice,
        probs: Option<DevSlice>,
        bad_target: DevSlice,
        logits: DevSlice,
        targets: DevSlice,
        alpha: Option<DevSlice>,
    ) -> Result<()> {
        let (b, k) = (p.b as usize, p.k as usize);
        let loss = loss.checked::<f32>(1, "loss out")?;
        let dl = dlogits.checked::<T>(b * k, "dlogits")?;
        let probs = opt_checked::<f32>(probs, b * k, "probs")?;
        let bad = bad_target.checked::<i32>(1, "bad_target")?;
        let logits = logits.checked::<T>(b * k, "logits")?;
        let targets = targets.checked::<i32>(b, "targets")?;
        let alpha = opt_checked::<f32>(alpha, k, "class weights")?;
        let f = self.entry("loss", &format!("softmax_loss_{}", T::SUFFIX))?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        no_alias(
            "softmax_loss",
            &[
                span::<f32>("loss", loss, 1),
                span::<T>("dlogits", dl, b * k),
                span::<f32>("probs", probs, b * k),
                span::<i32>("bad_target", bad, 1),
            ],
            &[
                span::<T>("logits", logits, b * k),
                span::<i32>("targets", targets, b),
                span::<f32>("class weights", alpha, k),
            ],
        )?;
        // SAFETY: shapes checked above; null probs / alpha are handled by the kernel.
        unsafe {
            Launch::new(&f)
                .arg(&loss)
                .arg(&dl)
                .arg(&probs)
                .arg(&bad)
                .arg(&logits)
                .arg(&targets)
                .arg(&alpha)
                .arg(p)
                .run(s, cfg)?
        };
        Ok(())
    }

    /// out = grads * inv_scale (f32), setting found_inf (1 i32, zeroed by the caller) on any inf/NaN.
    /// `out` may be the same buffer as `grads` for f32.
    pub fn unscale<T: Elem>(
        &self,
        s: &Stream,
        out: DevSlice,
        grads: DevSlice,
        inv_scale: f32,
        found_inf: DevSlice,
        n: usize,
    ) -> Result<()> {
        let out = out.checked::<f32>(n, "unscale out")?;
        let g = grads.checked::<T>(n, "unscale grads")?;
        let fi = found_inf.checked::<i32>(1, "found_inf")?;
        let f = self.entry("optim", &format!("unscale_{}", T::SUFFIX))?;
        let n = n as i64;
        // SAFETY: shapes checked above.
        unsafe {
            Launch::new(&f).arg(&out).arg(&g).arg(&inv_scale).arg(&fi).arg(&n).run(s, self.flat_cfg(n as usize))?
        };
        Ok(())
    }

    /// One AdamW step over flat fp32 buffers (p, g, m, v of `a.n` elements), copying the new weights to fp16
    /// when `p16` is given; skipped on the device when `found_inf` holds a nonzero value.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        s: &Stream,
        a: &AdamParams,
        p: DevSlice,
        g: DevSlice,
        m: DevSlice,
        v: DevSlice,
        p16: Option<DevSlice>,
        found_inf: Option<DevSlice>,
    ) -> Result<()> {
        let n = a.n as usize;
        let (p, g) = (p.checked::<f32>(n, "adamw params")?, g.checked::<f32>(n, "adamw grads")?);
        let (m, v) = (m.checked::<f32>(n, "adamw m")?, v.checked::<f32>(n, "adamw v")?);
        let p16 = opt_checked::<half::f16>(p16, n, "adamw fp16 copy")?;
        let fi = opt_checked::<i32>(found_inf, 1, "found_inf")?;
        let f = self.entry("optim", "adamw_f32")?;
        no_alias(
            "adamw",
            &[
                span::<f32>("params", p, n),
                span::<f32>("m", m, n),
                span::<f32>("v", v, n),
                span::<half::f16>("fp16 copy", p16, n),
            ],
            &[span::<f32>("grads", g, n), span::<i32>("found_inf", fi, 1)],
        )?;
        // SAFETY: all buffers hold n elements (checked above); null p16 / found_inf are skipped.
        unsafe {
            Launch::new(&f).arg(&p).arg(&g).arg(&m).arg(&v).arg(&p16).arg(&fi).arg(a).run(s, self.flat_cfg(n / 4))?
        };
        Ok(())
    }
}

impl AdamParams {
    /// Parameters for step `t` (1-based) at learning rate `lr`, with the scalars computed exactly as the CPU
    /// optimizer ([`crate::train::adamw::AdamW::step_one`]) computes them: in f64, rounded to f32 once.
    pub fn for_step(n: usize, t: u64, lr: f64, cfg: &crate::train::adamw::AdamWConfig) -> Self {
        let t = t.max(1) as f64;
        Self {
            n: n as i64,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bc2_sqrt: (1.0 - cfg.beta2.powf(t)).sqrt() as f32,
            neg_step_size: (-(lr / (1.0 - cfg.beta1.powf(t)))) as f32,
            eps: cfg.eps as f32,
            pad_: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_structs_match_the_cu_layouts() {
        // Sizes of the C structs: int64 first, then 4-byte fields, padded to 8.
        assert_eq!(size_of::<BnParams>(), 32);
        assert_eq!(size_of::<DwParams>(), 40);
        assert_eq!(size_of::<LossParams>(), 24);
        assert_eq!(size_of::<AdamParams>(), 40);
        assert_eq!(std::mem::offset_of!(BnParams, eps), 16);
        assert_eq!(std::mem::offset_of!(AdamParams, decay), 8);
        assert_eq!(std::mem::offset_of!(AdamParams, eps), 32);
        assert_eq!(std::mem::offset_of!(AdamParams, pad_), 36);
        assert_eq!(std::mem::align_of::<AdamParams>(), 8);
    }

    #[test]
    fn adam_scalars_are_computed_in_f64() {
        let cfg = crate::train::adamw::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let a = AdamParams::for_step(10, 1, 1e-3, &cfg);
        // 1 − β2 from the f64 0.999 is 0.001 to f32 precision; from 0.999f32 it would be 0.000999987.
        assert_eq!(a.one_minus_beta2, 0.001f32);
        assert_ne!(a.one_minus_beta2, 1.0 - 0.999f32);
        assert_eq!(a.one_minus_beta1, 0.1f32);
        assert_eq!(a.bc2_sqrt, (0.001f64).sqrt() as f32);
        assert_eq!(a.neg_step_size, -0.01f32);
        assert_eq!(a.decay, (1.0 - 1e-5f64) as f32);
        let a = AdamParams::for_step(10, 3, 2e-3, &cfg);
        assert_eq!(a.neg_step_size, (-(2e-3 / (1.0 - 0.9f64.powi(3)))) as f32);
        assert_eq!(a.bc2_sqrt, (1.0 - 0.999f64.powi(3)).sqrt() as f32);
        // Step 0 is treated as step 1 (no division by a zero bias correction).
        assert_eq!(AdamParams::for_step(10, 0, 1e-3, &cfg), AdamParams::for_step(10, 1, 1e-3, &cfg));
    }

    #[test]
    fn restrict_kernels_refuse_in_place_calls() {
        let (a, b) = (span::<f32>("y", 0x1000, 4), span::<f32>("x", 0x100c, 4));
        let e = no_alias("k", &[a], &[b]).unwrap_err().to_string();
        assert!(e.contains("k: output y overlaps x"), "{e}");
        // Disjoint buffers, and absent (null) optional ones, pass.
        no_alias("k", &[span::<f32>("y", 0x1000, 4), span::<f32>("p", 0, 4)], &[span::<f32>("x", 0x1010, 4)]).unwrap();
        // On the emulated device the wrappers refuse before launching.
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let blk = gpu.upload(&[1.0f32; 64]).unwrap();
        let whole = DevSlice::of(&blk);
        let e = gpu.kernels.unary::<f32>(&gpu.stream, Unary::Silu, whole, whole, 64).unwrap_err().to_string();
        assert!(e.contains("unary: output y overlaps x") && e.contains("__restrict__"), "{e}");
        let shifted = DevSlice::range(&blk, 16, 128).unwrap();
        let e = gpu.kernels.add::<f32>(&gpu.stream, shifted, whole, whole, 32).unwrap_err().to_string();
        assert!(e.contains("add: output y overlaps a"), "{e}");
        let e = gpu.kernels.scale::<f32>(&gpu.stream, shifted, whole, 2.0, 32, true).unwrap_err().to_string();
        assert!(e.contains("axpy: output y overlaps x"), "{e}");
        // Separate buffers run.
        let other = gpu.upload(&[0.0f32; 64]).unwrap();
        gpu.kernels.unary::<f32>(&gpu.stream, Unary::Relu, DevSlice::of(&other), whole, 64).unwrap();
        assert_eq!(gpu.download::<f32>(&other, 64).unwrap(), vec![1.0f32; 64]);
    }

    #[test]
    fn linear_and_layout_wrappers_refuse_short_or_overlapping_buffers() {
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let (k, st) = (&gpu.kernels, &gpu.stream);
        let big = gpu.upload(&[1.0f32; 256]).unwrap();
        let other = gpu.upload(&[0.0f32; 256]).unwrap();
        let (whole, out) = (DevSlice::of(&big), DevSlice::of(&other));
        let short = DevSlice::range(&big, 0, 4 * 11).unwrap();
        let e = k.bias_add::<f32>(st, short, out, 3, 4).unwrap_err().to_string();
        assert!(e.contains("bias add y") && e.contains("needs 12 x 4 bytes"), "{e}");
        let e = k.bias_add::<f32>(st, out, short, 1, 12).unwrap_err().to_string();
        assert!(e.contains("bias add bias"), "{e}");
        let e = k.bias_add::<f32>(st, whole, DevSlice::range(&big, 16, 16).unwrap(), 4, 4).unwrap_err().to_string();
        assert!(e.contains("bias_add: output y overlaps bias"), "{e}");
        let e = k.col_sum::<f32>(st, whole, whole, 4, 4, false).unwrap_err().to_string();
        assert!(e.contains("col_sum: output out overlaps x"), "{e}");
        let e = k.col_sum::<half::f16>(st, out, short, 2, 12, true).unwrap_err().to_string();
        assert!(e.contains("column sum x") && e.contains("needs 24 x 2 bytes"), "{e}");
        let e = k.permute_from_f32::<half::f16>(st, out, short, 3, 4).unwrap_err().to_string();
        assert!(e.contains("permute x"), "{e}");
        let e = k.transpose_add(st, whole, whole, 8, 8, true).unwrap_err().to_string();
        assert!(e.contains("transpose_add: output y overlaps x"), "{e}");
        let e = k.fill::<f32>(st, short, 0.0, 12).unwrap_err().to_string();
        assert!(e.contains("fill y"), "{e}");
        // Nothing was launched by the refused calls.
        assert_eq!(gpu.download::<f32>(&other, 256).unwrap(), vec![0.0f32; 256]);
        assert_eq!(gpu.download::<f32>(&big, 256).unwrap(), vec![1.0f32; 256]);
    }

    #[test]
    fn col_sum_adds_in_its_fixed_order_bit_for_bit() {
        // Eight row lanes each sum rows lane, lane + 8, ... in order; then lanes 0..8 are added in order. Values
        // spanning many magnitudes make any other order round differently.
        let gpu = crate::cuda::Gpu::emulated().unwrap();
        let (rows, cols) = (203usize, 37usize);
        let x: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 2654435761usize) % 1000) as f32 * 10f32.powi((i % 7) as i32 - 3)).collect();
        let bx = gpu.upload(&x).unwrap();
        let out = gpu.upload(&vec![0.5f32; cols]).unwrap();
        gpu.kernels.col_sum::<f32>(&gpu.stream, DevSlice::of(&out), DevSlice::of(&bx), rows, cols, true).unwrap();
        let got: Vec<f32> = gpu.download(&out, cols).unwrap();
        for (c, &g) in got.iter().enumerate() {
            let mut total = 0f32;
            for lane in 0..8 {
                let mut s = 0f32;
                for r in (lane..rows).step_by(8) {
                    s += x[r * cols + c];
                }
                total += s;
            }
            assert_eq!(g.to_bits(), (0.5 + total).to_bits(), "column {c}");
        }
    }

    #[test]
    fn rows_split_bounds() {
        assert_eq!(rows_split(1), 1);
        assert_eq!(rows_split(512 * 10), 10);
        assert_eq!(rows_split(1 << 40), MAX_ROWS_SPLIT as i32);
        assert_eq!(bn_workspace_bytes(512 * 10, 3), 10 * 3 * 8);
    }

    #[test]
    fn build_info_is_consistent() {
        if build_info::KERNELS_BUILT {
            assert!(!build_info::IMAGES.is_empty());
            assert!(build_info::KERNELS_ABSENT_REASON.is_empty());
            for family in ["elementwise", "batchnorm", "depthwise", "se", "dropout", "loss", "optim", "linear"] {
                assert!(build_info::IMAGES.iter().any(|(n, img)| *n == family && !img.is_empty()), "{family}");
                assert!(build_info::RESOURCES.lines().any(|l| l.starts_with(family)), "{family} resources");
            }
            // No kernel spills (the build would have failed), and every line parses.
            for line in build_info::RESOURCES.lines().filter(|l| !l.starts_with('#')) {
                let f: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(f.len(), 8, "{line}");
                assert_eq!((f[6], f[7]), ("0", "0"), "{line}");
            }
        } else {
            assert!(build_info::IMAGES.is_empty());
            assert!(!build_info::KERNELS_ABSENT_REASON.is_empty());
        }
    }
}
