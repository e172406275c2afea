//! Host-to-device copies on a stream of their own, ordered against the compute stream by events, so a copy of the
//! next batch runs while the current step computes.
//!
//! Three orderings make a double buffer safe, and each has its call:
//! - a copy into a device buffer starts after the compute work that last read it ([`Upstream::mark_compute`],
//!   then [`Upstream::after_compute`]);
//! - compute work that reads the buffer starts after the copy into it ([`Upstream::fence`], then
//!   [`Upstream::compute_waits`]);
//! - the host refills a host buffer only after the copy out of it has finished ([`Upstream::host_waits`]).
//!
//! On a GPU the copies go to a second stream and the orderings are CUDA events. The emulated device models the
//! copy engine as late as CUDA allows: a copy is only queued when it is issued and runs, reading the host buffer
//! then, when something waits for a fence recorded after it. So a missing compute wait reads the buffer's old
//! contents, and a host buffer refilled too early is copied with its new contents: both show as wrong data in the
//! emulated tests. (The first ordering cannot be seen there: emulated compute work has finished when it returns.)

use anyhow::{Result, anyhow, ensure};
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::alloc::Block;
use super::device::{Gpu, Stream};

/// A copy the emulated copy engine has queued: host address, device address, bytes.
struct QueuedCopy {
    seq: u64,
    src: usize,
    dst: u64,
    bytes: usize,
}

/// The emulated copy engine: copies queued in issue order, each numbered.
#[derive(Default)]
struct EmuCopies {
    queue: VecDeque<QueuedCopy>,
    issued: u64,
}

impl EmuCopies {
    /// Runs every queued copy numbered up to `seq`.
    fn run_through(&mut self, seq: u64) {
        while self.queue.front().is_some_and(|c| c.seq <= seq) {
            if let Some(c) = self.queue.pop_front() {
                // SAFETY: `Upstream::copy`'s caller vouched that the host range and the destination block stay
                // valid until a fence recorded after the copy is waited for (this is that wait), and the device
                // range was checked against its block when the copy was queued; emulated device addresses are host
                // allocations.
                unsafe { std::ptr::copy_nonoverlapping(c.src as *const u8, c.dst as *mut u8, c.bytes) };
            }
        }
    }
}

enum Kind {
    Cuda { copy: Arc<CudaStream>, compute: Arc<CudaStream> },
    Emulated(Mutex<EmuCopies>),
}

/// A point on the copy stream: the copies issued before it.
pub struct CopyFence(FenceKind);

enum FenceKind {
    Cuda(CudaEvent),
    Emulated(u64),
}

/// A point on the compute stream: the work issued before it (nothing to hold on the emulated device, whose work
/// has run when it returns).
pub struct ComputeMark(Option<CudaEvent>);

/// The copy stream of a [`Gpu`] (see the module docs).
pub struct Upstream {
    kind: Kind,
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e:?}")
}

impl Upstream {
    /// A copy stream beside `gpu`'s compute stream.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let kind = match &gpu.stream {
            Stream::Cuda(compute) => {
                let copy = compute.context().new_stream().map_err(cuda_err("creating the host-to-device stream"))?;
                // Blocks the caller hands in may come from the allocator's cache, which is safe to reuse only in
                // the order of the compute stream: the copies start after the compute work issued so far.
                copy.join(compute).map_err(cuda_err("ordering the copy stream after the compute stream"))?;
                Kind::Cuda { copy, compute: compute.clone() }
            }
            Stream::Emulated(_) => Kind::Emulated(Mutex::new(EmuCopies::default())),
        };
        Ok(Upstream { kind })
    }

    fn emu(m: &Mutex<EmuCopies>) -> Result<std::sync::MutexGuard<'_, EmuCopies>> {
        m.lock().map_err(|_| anyhow!("the emulated copy queue's lock is poisoned (a thread panicked)"))
    }

    /// Queues a copy of `bytes` bytes from `host` to `dst` at byte `offset`, behind the copies and waits issued
    /// on this stream before it.
    ///
    /// # Safety
    /// `host` points at `bytes` readable bytes that stay valid, and are not written, until a fence recorded after
    /// this copy has been waited for by the host ([`Upstream::host_waits`]) or the stream is finished; `dst` stays
    /// allocated (not returned to the allocator) until then too.
    pub unsafe fn copy(&self, dst: &Block, offset: usize, host: *const u8, bytes: usize) -> Result<()> {
        ensure!(
            offset.checked_add(bytes).is_some_and(|e| e <= dst.len_bytes()),
            "streamed copy of {bytes} bytes to offset {offset} of a {}-byte block",
            dst.len_bytes()
        );
        let to = dst.addr() + offset as u64;
        match &self.kind {
            Kind::Cuda { copy, .. } => {
                copy.context().bind_to_thread().map_err(cuda_err("binding the CUDA context"))?;
                // SAFETY: the destination holds the range (checked above); the caller keeps the host range valid
                // and unwritten until the copy has finished, which a host wait on a later fence proves.
                let host = unsafe { std::slice::from_raw_parts(host, bytes) };
                // SAFETY: as above; the copy is ordered on the copy stream.
                unsafe { cudarc::driver::result::memcpy_htod_async(to, host, copy.cu_stream()) }
                    .map_err(cuda_err("streamed host-to-device copy"))
            }
            Kind::Emulated(m) => {
                let mut q = Self::emu(m)?;
                q.issued += 1;
                let seq = q.issued;
                q.queue.push_back(QueuedCopy { seq, src: host as usize, dst: to, bytes });
                Ok(())
            }
        }
    }

    /// Records a fence after the copies issued so far.
    pub fn fence(&self) -> Result<CopyFence> {
        Ok(CopyFence(match &self.kind {
            Kind::Cuda { copy, .. } => {
                FenceKind::Cuda(copy.record_event(None).map_err(cuda_err("recording a copy fence"))?)
            }
            Kind::Emulated(m) => FenceKind::Emulated(Self::emu(m)?.issued),
        }))
    }

    /// Records a mark after the compute work issued so far (on the compute stream; not inside a graph capture).
    pub fn mark_compute(&self, gpu: &Gpu) -> Result<ComputeMark> {
        gpu.stream.refuse_in_capture("marking the compute stream for the copy stream", "mark after the replay")?;
        Ok(ComputeMark(match &self.kind {
            Kind::Cuda { compute, .. } => {
                Some(compute.record_event(None).map_err(cuda_err("recording a compute mark"))?)
            }
            Kind::Emulated(_) => None,
        }))
    }

    /// Makes the copies issued from now on wait for the compute work before `mark`.
    pub fn after_compute(&self, mark: &ComputeMark) -> Result<()> {
        match (&self.kind, &mark.0) {
            (Kind::Cuda { copy, .. }, Some(ev)) => copy.wait(ev).map_err(cuda_err("ordering a copy after compute")),
            (Kind::Emulated(_), None) => Ok(()),
            _ => Err(anyhow!("a compute mark of one kind of device used on another")),
        }
    }

    /// Makes the compute work issued from now on wait for the copies before `fence` (not inside a graph capture:
    /// wait before replaying).
    pub fn compute_waits(&self, gpu: &Gpu, fence: &CopyFence) -> Result<()> {
        gpu.stream.refuse_in_capture("waiting for a streamed copy", "wait before the replay")?;
        match (&self.kind, &fence.0) {
            (Kind::Cuda { compute, .. }, FenceKind::Cuda(ev)) => {
                compute.wait(ev).map_err(cuda_err("ordering compute after a copy"))
            }
            (Kind::Emulated(m), FenceKind::Emulated(seq)) => {
                Self::emu(m)?.run_through(*seq);
                Ok(())
            }
            _ => Err(anyhow!("a copy fence of one kind of device used on another")),
        }
    }

    /// Waits on the host until the copies before `fence` have finished (their host buffers may be refilled).
    pub fn host_waits(&self, fence: &CopyFence) -> Result<()> {
        match (&self.kind, &fence.0) {
            (Kind::Cuda { .. }, FenceKind::Cuda(ev)) => ev.synchronize().map_err(cuda_err("waiting for a copy")),
            (Kind::Emulated(m), FenceKind::Emulated(seq)) => {
                Self::emu(m)?.run_through(*seq);
                Ok(())
            }
            _ => Err(anyhow!("a copy fence of one kind of device used on another")),
        }
    }

    /// Waits on the host for every copy issued.
    pub fn finish(&self) -> Result<()> {
        match &self.kind {
            Kind::Cuda { copy, .. } => copy.synchronize().map_err(cuda_err("waiting for the copy stream")),
            Kind::Emulated(m) => {
                let mut q = Self::emu(m)?;
                let last = q.issued;
                q.run_through(last);
                Ok(())
            }
        }
    }
}

impl Drop for Upstream {
    /// Waits for the queued copies, so the host buffers they read may be freed after it (declare an `Upstream`
    /// after the buffers it copies from: locals and fields drop in opposite orders, so a struct waits in its own
    /// `Drop`).
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("warning: waiting for the host-to-device copies: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulated copy engine copies late: not at issue, at the wait, reading the host buffer then.
    #[test]
    fn emulated_copies_run_at_the_wait_with_the_host_buffer_of_then() {
        let gpu = Gpu::emulated().unwrap();
        let up = Upstream::new(&gpu).unwrap();
        let dst = gpu.zeros(8).unwrap();
        let mut host = [1u8; 8];
        // SAFETY: `host` outlives the waits below.
        unsafe { up.copy(&dst, 0, host.as_ptr(), 4) }.unwrap();
        let first = up.fence().unwrap();
        assert_eq!(gpu.download::<u8>(&dst, 8).unwrap(), vec![0; 8], "nothing copied before a wait");
        host[..4].fill(7);
        up.compute_waits(&gpu, &first).unwrap();
        assert_eq!(gpu.download::<u8>(&dst, 8).unwrap(), [7, 7, 7, 7, 0, 0, 0, 0]);
        // SAFETY: as above.
        unsafe { up.copy(&dst, 4, host.as_ptr(), 4) }.unwrap();
        let second = up.fence().unwrap();
        up.host_waits(&first).unwrap();
        assert_eq!(gpu.download::<u8>(&dst, 8).unwrap()[4..], [0; 4], "a wait runs only the copies before its fence");
        up.host_waits(&second).unwrap();
        assert_eq!(gpu.download::<u8>(&dst, 8).unwrap(), vec![7; 8]);
        // SAFETY: the block has 8 bytes; 4 at offset 6 do not fit, so nothing is queued.
        assert!(unsafe { up.copy(&dst, 6, host.as_ptr(), 4) }.is_err());
        up.finish().unwrap();
    }
}
