//! The kernel images embedded at build time (one fatbin per `kernels/*.cu`), loaded into a CUDA context, and the
//! one launch path every typed wrapper uses. The wrappers themselves live with their op family (for example
//! `src/ops/batchnorm/cuda.rs` beside `kernels/batchnorm.cu`), as `impl Kernels` blocks.
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
use super::emu::graph::{KernelNode, Node};
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
pub(crate) struct Span {
    name: &'static str,
    addr: u64,
    bytes: usize,
}

impl Span {
    pub(crate) fn new(name: &'static str, addr: u64, bytes: usize) -> Self {
        Self { name, addr, bytes }
    }

    fn overlaps(&self, o: &Span) -> bool {
        self.addr != 0 && o.addr != 0 && self.addr < o.addr + o.bytes as u64 && o.addr < self.addr + self.bytes as u64
    }
}

/// The span of `elems` values of `T` at `addr`.
pub(crate) fn span<T>(name: &'static str, addr: u64, elems: usize) -> Span {
    Span::new(name, addr, elems * size_of::<T>())
}

/// Refuses a launch where an output overlaps another output or an input: the kernels declare their pointers
/// `__restrict__`, so the compiler may keep a value in a register across a store to memory that aliases it, and
/// an in-place call would read stale or half-updated data. The check is on the byte ranges the shape addresses.
pub(crate) fn no_alias(kernel: &str, outputs: &[Span], inputs: &[Span]) -> Result<()> {
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

pub(crate) fn opt_checked<T>(s: Option<DevSlice<'_>>, elems: usize, what: &str) -> Result<u64> {
    s.map(|s| s.checked::<T>(elems, what)).transpose().map(|a| a.unwrap_or(0))
}

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
    /// Bytes of each argument (the emulated device copies the pack when a capture records the launch).
    sizes: Vec<usize>,
    _values: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    /// A launch of `entry` with no arguments yet.
    pub fn new(entry: &'a Entry) -> Self {
        Self { entry, args: Vec::with_capacity(12), sizes: Vec::with_capacity(12), _values: PhantomData }
    }

    /// Appends the next parameter.
    pub fn arg<T: KernelArg>(mut self, value: &'a T) -> Self {
        // A recorded pack keeps each value at an 8-byte boundary; every kernel parameter type (C scalars, device
        // pointers, structs of them) is aligned to at most 8.
        const { assert!(align_of::<T>() <= 8, "kernel arguments are aligned to at most 8 bytes") };
        self.args.push((value as *const T).cast_mut().cast::<c_void>());
        self.sizes.push(size_of::<T>());
        self
    }

    /// Launches on `stream` with shape `cfg`: queued on a GPU, run to completion on the emulated device (where a
    /// deadlock, divergent barrier, bad shuffle or a shape CUDA would refuse comes back as the error). While a
    /// graph capture is open on the stream, the launch is captured instead of run: on a GPU by the driver's stream
    /// capture, on the emulated device by recording the entry point, the shape and a copy of the argument pack.
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
            (None, Stream::Emulated(e)) => {
                let shape3 = (cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes);
                // SAFETY: each argument pointer borrows a live value of its recorded size (pushed by `arg`).
                let make =
                    || unsafe { KernelNode::new(name, family, shape3, &self.args, &self.sizes) }.map(Node::Kernel);
                if e.record(make)? {
                    return Ok(());
                }
                // SAFETY: as above; on the emulated device the addresses are host memory the blocks own.
                unsafe { emu_sys::launch(name, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, &mut self.args) }
                    .with_context(|| format!("{name} ({family}.cu, {}) on the emulated device", shape()))
            }
            _ => bail!("kernel {name} was looked up on one device and launched on another's stream"),
        }
    }
}

pub(crate) const THREADS: u32 = 256;
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

    pub(crate) fn per_channel_cfg(c: i32) -> LaunchConfig {
        LaunchConfig { grid_dim: ((c as u32).div_ceil(THREADS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }
    /// Grid-stride launch shape for `work` independent items: up to 8 blocks per SM.
    pub(crate) fn flat_cfg(&self, work: usize) -> LaunchConfig {
        let blocks = work.div_ceil(THREADS as usize).clamp(1, (self.sms * 8) as usize) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_spans_are_refused() {
        let (a, b) = (span::<f32>("y", 0x1000, 4), span::<f32>("x", 0x100c, 4));
        let e = no_alias("k", &[a], &[b]).unwrap_err().to_string();
        assert!(e.contains("k: output y overlaps x"), "{e}");
        // Disjoint buffers, and absent (null) optional ones, pass.
        no_alias("k", &[span::<f32>("y", 0x1000, 4), span::<f32>("p", 0, 4)], &[span::<f32>("x", 0x1010, 4)]).unwrap();
    }

    #[test]
    fn rows_split_bounds() {
        assert_eq!(rows_split(1), 1);
        assert_eq!(rows_split(512 * 10), 10);
        assert_eq!(rows_split(1 << 40), MAX_ROWS_SPLIT as i32);
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
