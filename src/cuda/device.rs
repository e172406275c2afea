//! An opened device: a CUDA GPU through cudarc, or the emulated device that runs the same kernels (kernels/*.cu
//! compiled for the host) on the CPU. Both sit behind one interface: the caching allocator, copies, and a
//! [`Stream`] that every kernel launch goes to.
//!
//! On the emulated device, device addresses are host addresses: memory is 256-byte aligned host allocations (as
//! cudaMalloc aligns) behind the same [`super::alloc::RawAlloc`] trait, copies are memcpy, and a launch runs to
//! completion on the calling thread, so streams are ordered by construction and `sync` has nothing to wait for.

use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
use std::sync::Arc;

use super::alloc::{Block, CachingAllocator, DriverAlloc, HostAlloc};
use super::emu::sys as emu_sys;
use super::kernels::Kernels;
use super::{GpuInfo, Selected};

/// Where kernel launches and copies go.
#[derive(Clone)]
pub enum Stream {
    /// A CUDA stream of a real device.
    Cuda(Arc<CudaStream>),
    /// The emulated device: every launch runs to completion when it is made.
    Emulated,
}

impl Stream {
    /// The CUDA stream, or an error naming `what` needed one.
    pub fn cuda(&self, what: &str) -> Result<&Arc<CudaStream>> {
        match self {
            Self::Cuda(s) => Ok(s),
            Self::Emulated => bail!("{what} needs a CUDA GPU; the emulated device has no CUDA stream"),
        }
    }
}

/// SMs the emulated device reports. Grid-stride launches size their grids from the SM count, so a small count
/// makes modest inputs wrap the grid several times (the loops' second and later passes get exercised) while a
/// launch stays cheap to emulate.
pub const EMULATED_SMS: u32 = 2;

/// Order of the emulated threads between sync points (and of the blocks of a grid), for `--schedule`. A race that
/// one order hides (a missing barrier, a read of a neighbour's value before it is written) shows under another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Thread 0 first, blocks in grid order.
    Forward,
    /// The last thread first, blocks in reverse order.
    Reverse,
    /// A fresh random order at every sync point, blocks shuffled (seeded, reproducible).
    Random,
    /// Warps in reverse order with lanes in order inside each warp, blocks in reverse order.
    WarpReverse,
}

impl Schedule {
    /// Every schedule.
    pub const ALL: [Schedule; 4] = [Schedule::Forward, Schedule::Reverse, Schedule::Random, Schedule::WarpReverse];

    /// The name `--schedule` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Reverse => "reverse",
            Self::Random => "random",
            Self::WarpReverse => "warp-reverse",
        }
    }

    fn emu(self, seed: u64) -> emu_sys::Schedule {
        use emu_sys::Order;
        let (threads, blocks) = match self {
            Self::Forward => (Order::Forward, Order::Forward),
            Self::Reverse => (Order::Reverse, Order::Reverse),
            Self::Random => (Order::Random, Order::Random),
            Self::WarpReverse => (Order::WarpReverse, Order::Reverse),
        };
        emu_sys::Schedule { threads, blocks, seed }
    }
}

/// An opened device. On a GPU, work goes to the legacy default stream, so the synchronous copies below are
/// ordered with the kernels without extra events.
pub struct Gpu {
    /// The device as probed (for the emulated device: a description of it).
    pub info: GpuInfo,
    /// The stream every launch uses.
    pub stream: Stream,
    /// The kernels: loaded images on a GPU, the linked host library on the emulated device.
    pub kernels: Kernels,
    /// Device memory.
    pub alloc: CachingAllocator,
}

impl Gpu {
    /// Opens the device [`super::select`] chose; an error for [`Selected::Cpu`].
    pub fn open(selected: &Selected) -> Result<Self> {
        let info = match selected {
            Selected::Cpu => return Err(anyhow!("Gpu::open called for the CPU backend")),
            Selected::Emulated => return Self::emulated(),
            Selected::Cuda(info) => info,
        };
        let ctx = CudaContext::new(info.ordinal)
            .map_err(|e| anyhow!("creating a context on cuda:{}: {e:?}", info.ordinal))?;
        let stream = ctx.default_stream();
        let kernels = Kernels::load(&ctx).with_context(|| format!("loading kernels on cuda:{}", info.ordinal))?;
        let alloc = CachingAllocator::new(Box::new(DriverAlloc::new(ctx.clone())));
        Ok(Self { info: info.clone(), stream: Stream::Cuda(stream), kernels, alloc })
    }

    /// The emulated device (`--device emu`): the kernels linked into this binary, run on the CPU.
    ///
    /// `DERMA_EMU_MEMORY` (bytes, or with a K/M/G suffix: `512M`) caps its memory, as on a smaller GPU.
    pub fn emulated() -> Result<Self> {
        match std::env::var("DERMA_EMU_MEMORY") {
            Ok(v) => Self::emulated_with_memory(Some(parse_bytes(&v).with_context(|| {
                format!("DERMA_EMU_MEMORY={v:?}: expected a byte count such as 1073741824, 512M or 2G")
            })?)),
            Err(_) => Self::emulated_with_memory(None),
        }
    }

    /// The emulated device with at most `capacity` bytes of memory (`None`: as much as the host gives).
    pub fn emulated_with_memory(capacity: Option<usize>) -> Result<Self> {
        let kernels = Kernels::emulated()?;
        let info = GpuInfo {
            ordinal: 0,
            name: format!("emulated CUDA device ({} build, {EMULATED_SMS} SMs reported)", emu_sys::flavour()),
            compute_capability: (0, 0),
            total_mem: 0,
            kernels_run: true,
        };
        let raw = capacity.map_or_else(HostAlloc::new, HostAlloc::with_capacity);
        Ok(Self { info, stream: Stream::Emulated, kernels, alloc: CachingAllocator::new(Box::new(raw)) })
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.stream, Stream::Emulated)
    }

    /// Sets the emulated thread and block order for launches made from the calling thread. An error on a GPU,
    /// whose scheduler cannot be chosen.
    pub fn set_schedule(&self, schedule: Schedule, seed: u64) -> Result<()> {
        ensure!(
            self.is_emulated(),
            "thread schedules (--schedule) apply to the emulated device only (--device emu); {} schedules its own \
             threads",
            self.info.name
        );
        emu_sys::set_schedule(schedule.emu(seed));
        Ok(())
    }

    /// Copies `host` into a new block.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Block> {
        let b = self.alloc.alloc(size_of_val(host).max(1))?;
        self.write(&b, 0, host)?;
        Ok(b)
    }

    /// Copies `host` into `block` at byte `offset`.
    pub fn write<T: DeviceRepr>(&self, block: &Block, offset: usize, host: &[T]) -> Result<()> {
        let bytes = size_of_val(host);
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= block.len_bytes()),
            "copy of {bytes} bytes to offset {offset} of a {}-byte block",
            block.len_bytes()
        );
        let dst = block.addr() + offset as u64;
        match &self.stream {
            Stream::Cuda(s) => {
                s.context().bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
                // SAFETY: the block holds offset + bytes bytes (checked above); the copy is ordered on the legacy
                // stream.
                unsafe { cudarc::driver::result::memcpy_htod_sync(dst, host) }
                    .map_err(|e| anyhow!("host-to-device copy: {e:?}"))
            }
            Stream::Emulated => {
                // SAFETY: emulated device addresses are host allocations; the block holds offset + bytes bytes
                // (checked above) and does not overlap `host`, which Rust owns separately.
                unsafe { std::ptr::copy_nonoverlapping(host.as_ptr().cast::<u8>(), dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// A block of `bytes` filled with zero bytes.
    pub fn zeros(&self, bytes: usize) -> Result<Block> {
        let b = self.alloc.alloc(bytes.max(1))?;
        match &self.stream {
            Stream::Cuda(s) => {
                s.context().bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
                // SAFETY: the block holds at least `bytes` bytes.
                unsafe { cudarc::driver::result::memset_d8_sync(b.addr(), 0, bytes.max(1)) }
                    .map_err(|e| anyhow!("memset: {e:?}"))?;
            }
            // SAFETY: the block is a host allocation of at least `bytes` bytes.
            Stream::Emulated => unsafe { std::ptr::write_bytes(b.addr() as *mut u8, 0, bytes.max(1)) },
        }
        Ok(b)
    }

    /// Sets `bytes` bytes of `block` from byte `offset` to `value`, on the device (no host buffer of that size):
    /// e.g. 0xFF, a NaN in f32 and f16, to poison memory so a read of something never written shows.
    pub fn fill(&self, block: &Block, offset: usize, bytes: usize, value: u8) -> Result<()> {
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= block.len_bytes()),
            "fill of {bytes} bytes at offset {offset} of a {}-byte block",
            block.len_bytes()
        );
        if bytes == 0 {
            return Ok(());
        }
        let dst = block.addr() + offset as u64;
        match &self.stream {
            Stream::Cuda(s) => {
                s.context().bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
                // SAFETY: the block holds offset + bytes bytes (checked above); the memset is ordered on the legacy
                // stream.
                unsafe { cudarc::driver::result::memset_d8_sync(dst, value, bytes) }
                    .map_err(|e| anyhow!("memset: {e:?}"))
            }
            Stream::Emulated => {
                // SAFETY: emulated device addresses are host allocations; the block holds offset + bytes bytes
                // (checked above).
                unsafe { std::ptr::write_bytes(dst as *mut u8, value, bytes) };
                Ok(())
            }
        }
    }

    /// Waits for queued work, then copies the first `n` values of `block` to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, block: &Block, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.read(block, 0, &mut out)?;
        Ok(out)
    }

    /// Waits for queued work, then fills `out` from `block` starting at byte `offset`.
    pub fn read<T: DeviceRepr>(&self, block: &Block, offset: usize, out: &mut [T]) -> Result<()> {
        let bytes = size_of_val(out);
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= block.len_bytes()),
            "copy of {bytes} bytes from offset {offset} of a {}-byte block",
            block.len_bytes()
        );
        self.sync()?;
        let src = block.addr() + offset as u64;
        match &self.stream {
            // SAFETY: the block holds offset + bytes bytes (checked above) and all work on it has finished.
            Stream::Cuda(_) => unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, src) }
                .map_err(|e| anyhow!("device-to-host copy: {e:?}")),
            Stream::Emulated => {
                // SAFETY: as in `write`, in the other direction; every launch has already run to completion.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr().cast::<u8>(), bytes) };
                Ok(())
            }
        }
    }

    /// Copies `bytes` from `src` to `dst` on the device (the ranges are distinct blocks, so they do not overlap).
    pub fn copy(&self, dst: &Block, src: &Block, bytes: usize) -> Result<()> {
        ensure!(
            bytes <= dst.len_bytes() && bytes <= src.len_bytes(),
            "device copy of {bytes} bytes between blocks of {} and {} bytes",
            src.len_bytes(),
            dst.len_bytes()
        );
        ensure!(dst.addr() != src.addr(), "device copy of a block onto itself");
        match &self.stream {
            Stream::Cuda(s) => {
                s.context().bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
                // SAFETY: both blocks hold `bytes` bytes (checked above) and, being distinct blocks, do not overlap.
                unsafe { cudarc::driver::result::memcpy_dtod_sync(dst.addr(), src.addr(), bytes) }
                    .map_err(|e| anyhow!("device-to-device copy: {e:?}"))
            }
            Stream::Emulated => {
                // SAFETY: as above; both are host allocations.
                unsafe { std::ptr::copy_nonoverlapping(src.addr() as *const u8, dst.addr() as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// Waits for every launch so far; surfaces asynchronous kernel errors. Nothing to wait for on the emulated
    /// device, where a launch returns its error when it is made.
    pub fn sync(&self) -> Result<()> {
        match &self.stream {
            Stream::Cuda(s) => s.synchronize().map_err(|e| anyhow!("CUDA error while running kernels: {e:?}")),
            Stream::Emulated => Ok(()),
        }
    }
}

/// `123`, `64K`, `512M`, `2G` (binary multiples) as bytes.
fn parse_bytes(s: &str) -> Option<usize> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last()? {
        (i, 'k' | 'K') => (&t[..i], 1usize << 10),
        (i, 'm' | 'M') => (&t[..i], 1 << 20),
        (i, 'g' | 'G') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn emulated_memory_sizes_parse() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes(" 64K"), Some(64 << 10));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("2 G"), Some(2 << 30));
        for bad in ["", "G", "1.5G", "-3", "12T"] {
            assert_eq!(parse_bytes(bad), None, "{bad:?}");
        }
    }
}
