//! An opened device: a CUDA GPU through cudarc, or the emulated device that runs the same kernels (kernels/*.cu
//! compiled for the host) on the CPU. Both sit behind one interface: the caching allocator, copies, and a
//! [`Stream`] that every kernel launch goes to.
//!
//! On the emulated device, device addresses are host addresses: memory is 256-byte aligned host allocations (as
//! cudaMalloc aligns) behind the same [`super::alloc::RawAlloc`] trait, copies are memcpy, and a launch runs to
//! completion on the calling thread, so streams are ordered by construction and `sync` has nothing to wait for.
//!
//! On a GPU every launch, fill and copy goes to one non-default stream (stream capture, [`Gpu::capture`], is not
//! allowed on the legacy default stream). Fills and device-to-device copies are asynchronous on it, so a capture
//! records them; host-to-device and device-to-host copies are ordered on it and wait for it, so the host buffer is
//! free when they return.

use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr};
use std::sync::Arc;

use super::alloc::{Block, CachingAllocator, DriverAlloc, HostAlloc};
use super::emu::graph::EmuStream;
use super::emu::sys as emu_sys;
use super::kernels::Kernels;
use super::{GpuInfo, Selected};

/// Where kernel launches and copies go.
#[derive(Clone)]
pub enum Stream {
    /// A CUDA stream of a real device (a non-default one: see the module docs).
    Cuda(Arc<CudaStream>),
    /// The emulated device: every launch runs to completion when it is made, except while a capture is open on
    /// the stream, which records it instead.
    Emulated(Arc<EmuStream>),
}

impl Stream {
    /// The CUDA stream, or an error naming `what` needed one.
    pub fn cuda(&self, what: &str) -> Result<&Arc<CudaStream>> {
        match self {
            Self::Cuda(s) => Ok(s),
            Self::Emulated(_) => bail!("{what} needs a CUDA GPU; the emulated device has no CUDA stream"),
        }
    }

    /// Whether a graph capture is open on this stream (on a GPU: the driver's capture status, so a capture begun
    /// by other code counts too; an invalidated capture counts until it is ended).
    pub fn is_capturing(&self) -> bool {
        match self {
            Self::Cuda(s) => cuda_capturing(s),
            Self::Emulated(e) => e.is_capturing(),
        }
    }

    /// An error saying that `what` is not allowed during graph capture, and why, when a capture is open.
    pub(crate) fn refuse_in_capture(&self, what: &str, why: &str) -> Result<()> {
        ensure!(!self.is_capturing(), "{what} is {NOT_IN_CAPTURE}: {why}");
        Ok(())
    }
}

/// Whether a capture is open on the CUDA stream `s` (active, or invalidated and not yet ended).
pub(crate) fn cuda_capturing(s: &CudaStream) -> bool {
    s.capture_status().is_ok_and(|st| st != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// The words every refusal inside a capture uses (tests and callers can match on them).
pub const NOT_IN_CAPTURE: &str = "not allowed during graph capture";

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

/// An opened device. On a GPU, work goes to one non-default stream of its own; the copies below are ordered on
/// it, so they need no extra events.
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

/// A stopwatch of device work: two CUDA events around the work on a GPU (the device's own clock: no host sync in
/// between, launch gaps included), the host clock on the emulated device (whose launches run when issued).
pub enum DeviceTimer {
    Cuda(cudarc::driver::CudaEvent),
    Host(std::time::Instant),
}

impl DeviceTimer {
    /// Milliseconds from the start to the work issued up to now, waiting for that work to finish.
    pub fn stop_ms(self, gpu: &Gpu) -> Result<f64> {
        match (self, &gpu.stream) {
            (DeviceTimer::Cuda(start), Stream::Cuda(s)) => {
                let end = s
                    .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| anyhow!("recording a CUDA timing event: {e:?}"))?;
                let ms = start.elapsed_ms(&end).map_err(|e| anyhow!("reading CUDA timing events: {e:?}"))?;
                Ok(ms as f64)
            }
            (DeviceTimer::Host(t), Stream::Emulated(_)) => Ok(t.elapsed().as_secs_f64() * 1e3),
            _ => bail!("a timer started on one kind of device stopped on another"),
        }
    }
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
        // A stream of its own, not the legacy default stream, which cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating a stream on cuda:{}: {e:?}", info.ordinal))?;
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
        let stream = Stream::Emulated(Arc::new(EmuStream::new()));
        Ok(Self { info, stream, kernels, alloc: CachingAllocator::new(Box::new(raw)) })
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.stream, Stream::Emulated(_))
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

    /// Copies `host` into `block` at byte `offset`; returns when `host` may be reused (on a GPU, after the copy,
    /// which is ordered after the work queued before it). Not allowed during a graph capture.
    pub fn write<T: DeviceRepr>(&self, block: &Block, offset: usize, host: &[T]) -> Result<()> {
        self.stream.refuse_in_capture(
            "a host-to-device copy (Gpu::write or upload)",
            "the graph would bake in the host buffer's address and copy it at every replay; write inputs in place \
             before capturing, or between replays",
        )?;
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
                // SAFETY: the block holds offset + bytes bytes (checked above); the copy is ordered on the stream,
                // and `host` stays borrowed until the stream has finished it (the synchronize below).
                unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, s.cu_stream()) }
                    .map_err(|e| anyhow!("host-to-device copy: {e:?}"))?;
                s.synchronize().map_err(|e| anyhow!("host-to-device copy (waiting for the stream): {e:?}"))
            }
            Stream::Emulated(_) => {
                // SAFETY: emulated device addresses are host allocations; the block holds offset + bytes bytes
                // (checked above) and does not overlap `host`, which Rust owns separately.
                unsafe { std::ptr::copy_nonoverlapping(host.as_ptr().cast::<u8>(), dst as *mut u8, bytes) };
                Ok(())
            }
        }
    }

    /// A block of `bytes` filled with zero bytes (the fill is ordered on the stream).
    pub fn zeros(&self, bytes: usize) -> Result<Block> {
        let b = self.alloc.alloc(bytes.max(1))?;
        self.fill(&b, 0, bytes.max(1), 0)?;
        Ok(b)
    }

    /// Sets `bytes` bytes of `block` from byte `offset` to `value`, on the device (no host buffer of that size):
    /// e.g. 0xFF, a NaN in f32 and f16, to poison memory so a read of something never written shows. Ordered on
    /// the stream; a graph capture records it.
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
                // SAFETY: the block holds offset + bytes bytes (checked above); the memset is ordered on the
                // stream, behind the work that may still use the block.
                unsafe { cudarc::driver::result::memset_d8_async(dst, value, bytes, s.cu_stream()) }
                    .map_err(|e| anyhow!("memset: {e:?}"))
            }
            Stream::Emulated(e) => e.call(
                || format!("a fill of {bytes} bytes with {value:#04x} at {dst:#x}"),
                move || {
                    // SAFETY: emulated device addresses are host allocations; the block held offset + bytes bytes
                    // when the fill was issued (checked above), and a replayed fill addresses the same memory,
                    // which a live graph keeps allocated (it pins the allocator's cache).
                    unsafe { std::ptr::write_bytes(dst as *mut u8, value, bytes) };
                    Ok(())
                },
            ),
        }
    }

    /// Waits for queued work, then copies the first `n` values of `block` to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, block: &Block, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.read(block, 0, &mut out)?;
        Ok(out)
    }

    /// Waits for queued work, then fills `out` from `block` starting at byte `offset`. Not allowed during a graph
    /// capture.
    pub fn read<T: DeviceRepr>(&self, block: &Block, offset: usize, out: &mut [T]) -> Result<()> {
        self.stream.refuse_in_capture(
            "a device-to-host copy (Gpu::read or download)",
            "captured work does not run until the graph is replayed, and on CUDA the wait would break the capture; \
             read results after Graph::replay",
        )?;
        let bytes = size_of_val(out);
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= block.len_bytes()),
            "copy of {bytes} bytes from offset {offset} of a {}-byte block",
            block.len_bytes()
        );
        self.sync()?;
        let src = block.addr() + offset as u64;
        match &self.stream {
            Stream::Cuda(s) => {
                // SAFETY: the block holds offset + bytes bytes (checked above) and all work on it has finished;
                // `out` stays borrowed until the copy has (the synchronize below).
                unsafe { cudarc::driver::result::memcpy_dtoh_async(out, src, s.cu_stream()) }
                    .map_err(|e| anyhow!("device-to-host copy: {e:?}"))?;
                s.synchronize().map_err(|e| anyhow!("device-to-host copy (waiting for the stream): {e:?}"))
            }
            Stream::Emulated(_) => {
                // SAFETY: as in `write`, in the other direction; every launch has already run to completion.
                unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr().cast::<u8>(), bytes) };
                Ok(())
            }
        }
    }

    /// Copies `bytes` from `src` to `dst` on the device (the ranges are distinct blocks, so they do not overlap).
    /// Ordered on the stream; a graph capture records it.
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
                // SAFETY: both blocks hold `bytes` bytes (checked above) and, being distinct blocks, do not overlap;
                // the copy is ordered on the stream.
                unsafe { cudarc::driver::result::memcpy_dtod_async(dst.addr(), src.addr(), bytes, s.cu_stream()) }
                    .map_err(|e| anyhow!("device-to-device copy: {e:?}"))
            }
            Stream::Emulated(e) => {
                let (d, s) = (dst.addr(), src.addr());
                e.call(
                    || format!("a device copy of {bytes} bytes from {s:#x} to {d:#x}"),
                    move || {
                        // SAFETY: as above; both are host allocations, which a live graph keeps allocated when
                        // the copy is replayed (it pins the allocator's cache).
                        unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, bytes) };
                        Ok(())
                    },
                )
            }
        }
    }

    /// Waits for every launch so far; surfaces asynchronous kernel errors. Nothing to wait for on the emulated
    /// device, where a launch returns its error when it is made. Not allowed during a graph capture.
    pub fn sync(&self) -> Result<()> {
        self.stream.refuse_in_capture(
            "a stream sync (Gpu::sync)",
            "captured work does not run until the graph is replayed, and on CUDA a sync would break the capture; \
             sync after Graph::replay",
        )?;
        match &self.stream {
            Stream::Cuda(s) => s.synchronize().map_err(|e| anyhow!("CUDA error while running kernels: {e:?}")),
            Stream::Emulated(_) => Ok(()),
        }
    }

    /// Starts a stopwatch of the work issued on this device's stream from now on (see [`DeviceTimer`]).
    pub fn start_timer(&self) -> Result<DeviceTimer> {
        self.stream.refuse_in_capture("a timing event", "time a replay from outside the capture")?;
        Ok(match &self.stream {
            Stream::Cuda(s) => DeviceTimer::Cuda(
                s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| anyhow!("recording a CUDA timing event: {e:?}"))?,
            ),
            Stream::Emulated(_) => DeviceTimer::Host(std::time::Instant::now()),
        })
    }

    /// Device allocations made so far by this device's allocator: every successful alloc call, cache hits
    /// included (a replayed graph makes none).
    pub fn allocations(&self) -> u64 {
        let s = self.alloc.stats();
        s.raw_allocs + s.reuses
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
