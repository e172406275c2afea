//! One opened CUDA device: context, stream, loaded kernels, caching allocator, and host↔device copies.

use anyhow::{Context, Result, anyhow, ensure};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
use std::sync::Arc;

use super::alloc::{Block, CachingAllocator, DriverAlloc};
use super::kernels::Kernels;
use super::{GpuInfo, Selected};

/// An opened device. Work goes to the legacy default stream, so the synchronous copies below are ordered with the
/// kernels without extra events.
pub struct Gpu {
    /// The device as probed.
    pub info: GpuInfo,
    /// Its primary context.
    pub ctx: Arc<CudaContext>,
    /// The stream every launch uses.
    pub stream: Arc<CudaStream>,
    /// The embedded kernels, loaded.
    pub kernels: Kernels,
    /// Device memory.
    pub alloc: CachingAllocator,
}

impl Gpu {
    /// Opens the device [`super::select`] chose; an error for [`Selected::Cpu`].
    pub fn open(selected: &Selected) -> Result<Self> {
        let Selected::Cuda(info) = selected else {
            return Err(anyhow!("Gpu::open called for the CPU backend"));
        };
        let ctx = CudaContext::new(info.ordinal)
            .map_err(|e| anyhow!("creating a context on cuda:{}: {e:?}", info.ordinal))?;
        let stream = ctx.default_stream();
        let kernels = Kernels::load(&ctx).with_context(|| format!("loading kernels on cuda:{}", info.ordinal))?;
        let alloc = CachingAllocator::new(Box::new(DriverAlloc::new(ctx.clone())));
        Ok(Self { info: info.clone(), ctx, stream, kernels, alloc })
    }

    /// Copies `host` into a new block.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Block> {
        let b = self.alloc.alloc(size_of_val(host).max(1))?;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        // SAFETY: the block holds at least size_of_val(host) bytes; the copy is ordered on the legacy stream.
        unsafe { cudarc::driver::result::memcpy_htod_sync(b.addr(), host) }
            .map_err(|e| anyhow!("host-to-device copy: {e:?}"))?;
        Ok(b)
    }

    /// A block of `bytes` filled with zero bytes.
    pub fn zeros(&self, bytes: usize) -> Result<Block> {
        let b = self.alloc.alloc(bytes.max(1))?;
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        // SAFETY: the block holds at least `bytes` bytes.
        unsafe { cudarc::driver::result::memset_d8_sync(b.addr(), 0, bytes.max(1)) }
            .map_err(|e| anyhow!("memset: {e:?}"))?;
        Ok(b)
    }

    /// Waits for queued work, then copies the first `n` values of `block` to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, block: &Block, n: usize) -> Result<Vec<T>> {
        ensure!(
            n * size_of::<T>() <= block.len_bytes(),
            "download of {n} values from a {}-byte block",
            block.len_bytes()
        );
        self.sync()?;
        let mut out = vec![T::default(); n];
        // SAFETY: the block holds n values of T (checked above) and all work on it has finished (sync above).
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut out, block.addr()) }
            .map_err(|e| anyhow!("device-to-host copy: {e:?}"))?;
        Ok(out)
    }

    /// Waits for every launch so far; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("CUDA error while running kernels: {e:?}"))
    }
}
