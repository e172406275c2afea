//! Graph capture and replay: [`Gpu::capture`] records what a closure issues on the device's stream (kernel
//! launches, cuBLASLt and cuDNN calls, device fills and device-to-device copies) into a [`Graph`] without running
//! it, and [`Graph::replay`] runs it again, as often as wanted, on the same addresses. A training step whose
//! buffers sit at fixed addresses (the recorded program's arena) is captured once and replayed each step, which
//! saves every launch's host overhead on a GPU.
//!
//! On a GPU this is CUDA stream capture on the device's own (non-default) stream, in thread-local mode: the graph
//! is instantiated once, at the end of the capture, and a replay is one `cuGraphLaunch`, asynchronous like any
//! launch. On the emulated device the stream records each node (a kernel's entry point, shape and a copy of its
//! argument pack; a library call, fill or copy as a closure over the same addresses and descriptors) and a replay
//! runs the nodes in order, exactly as the eager calls would have.
//!
//! What a graph bakes in: every device address and every argument value, read when the work is issued. So inside
//! the closure, device allocations, host↔device copies and stream syncs are errors (they would bake a fresh
//! address or a host buffer into the graph, or, on CUDA, invalidate the capture); inputs change between replays by
//! writing new contents to the same buffers ([`Gpu::write`]), which a replay then reads. The caller keeps every
//! buffer the graph uses alive while it replays it; a live graph pins the allocator's cache (memory is never given
//! back to the driver or the host while one exists), so a replay always touches this device's memory.
//!
//! UNVERIFIED on hardware: the CUDA path is written against cudarc 0.19's stream-capture API and compiled, but has
//! not run on a GPU; tests/cuda_graph.rs runs it when one is present.

use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaGraph, CudaStream};
use std::sync::{Arc, Mutex};

use super::alloc::CachePin;
use super::device::{Gpu, Stream};
use super::emu::graph::{EmuStream, Node};

/// A CUDA graph, instantiated, with the stream it was captured on.
struct CudaExec {
    /// `None` when the capture recorded nothing (a replay then does nothing).
    graph: Option<CudaGraph>,
    stream: Arc<CudaStream>,
}

// SAFETY: CUDA graph and graph-exec objects may be used from any thread as long as calls on one object never run
// at once (the driver's graph thread-safety rules); the only calls made on them after capture, the launch and the
// destruction, happen under the `Mutex` around this struct or with exclusive access (drop).
unsafe impl Send for CudaExec {}

enum Captured {
    Cuda(Mutex<CudaExec>),
    Emulated { stream: Arc<EmuStream>, nodes: Vec<Node> },
}

/// Work captured by [`Gpu::capture`], replayable on the device it was captured on.
pub struct Graph {
    captured: Captured,
    len: usize,
    /// Keeps the allocator's memory in place while the graph may replay on it.
    _pin: CachePin,
}

impl Graph {
    /// Runs the captured work on `gpu.stream`: on a GPU, one asynchronous graph launch (sync or read to wait for
    /// it); on the emulated device, each recorded node in order, exactly as the eager call would have run with the
    /// same arguments and addresses (values are read from memory when the replay runs). `gpu` must be the device
    /// the graph was captured on, with no capture open.
    pub fn replay(&self, gpu: &Gpu) -> Result<()> {
        ensure!(
            !gpu.stream.is_capturing(),
            "replaying a graph is {}: capture the work itself instead",
            super::device::NOT_IN_CAPTURE
        );
        match (&self.captured, &gpu.stream) {
            (Captured::Cuda(exec), Stream::Cuda(s)) => {
                let exec = exec.lock().map_err(|_| anyhow!("a replay of this graph panicked earlier"))?;
                ensure!(
                    Arc::ptr_eq(&exec.stream, s),
                    "this graph was captured on another device's stream: replay it on the device that captured it"
                );
                match &exec.graph {
                    Some(g) => {
                        g.launch().map_err(|e| anyhow!("launching the captured graph on {}: {e:?}", gpu.info.name))
                    }
                    None => Ok(()),
                }
            }
            (Captured::Emulated { stream, nodes }, Stream::Emulated(e)) => {
                ensure!(
                    Arc::ptr_eq(stream, e),
                    "this graph was captured on another emulated device: replay it on the device that captured it"
                );
                for (i, n) in nodes.iter().enumerate() {
                    // SAFETY: the nodes address memory of the device that captured them (checked above), which
                    // `_pin` keeps allocated; the caller keeps the graph's buffers alive, as on CUDA.
                    unsafe { n.run() }.with_context(|| format!("node {i} of {} of the graph", nodes.len()))?;
                }
                Ok(())
            }
            _ => bail!("this graph was captured on another kind of device: replay it on the device that captured it"),
        }
    }

    /// Nodes captured. On the emulated device: one per kernel launch, library call, fill and copy. On a GPU: the
    /// nodes the driver recorded, where one cuBLASLt or cuDNN call may be several kernels.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Ends the capture state of the allocator and the stream on every path out of [`Gpu::capture`], a panic in the
/// closure included.
struct Open<'a> {
    gpu: &'a Gpu,
    ended: bool,
}

impl Open<'_> {
    /// Closes the capture: the emulated stream's nodes, or the driver's instantiated graph.
    fn end(&mut self) -> Result<Ended> {
        self.ended = true;
        self.gpu.alloc.end_capture();
        match &self.gpu.stream {
            Stream::Emulated(e) => Ok(Ended::Emulated(e.end_capture())),
            Stream::Cuda(s) => {
                s.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).map(Ended::Cuda).map_err(|e| {
                    anyhow!(
                        "ending the graph capture on {} failed: {e:?} (something inside the capture was not \
                         capturable: a synchronous copy, a sync, or an allocation made outside derma's device layer)",
                        self.gpu.info.name
                    )
                })
            }
        }
    }
}

enum Ended {
    Emulated(Vec<Node>),
    Cuda(Option<CudaGraph>),
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.end();
        }
    }
}

/// Nodes of an instantiated CUDA graph.
fn node_count(g: &CudaGraph) -> Result<usize> {
    let mut n = 0usize;
    // SAFETY: the graph is live (owned by `g`); with a null node array cuGraphGetNodes only writes the count.
    unsafe { cudarc::driver::sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(|e| anyhow!("counting the captured graph's nodes: {e:?}"))?;
    Ok(n)
}

impl Gpu {
    /// Captures everything `f` issues on `self.stream` (kernel launches, cuBLASLt and cuDNN calls, device fills
    /// and device-to-device copies) into a graph, without running it. Inside `f`, host↔device copies, stream and
    /// device syncs and device allocations are errors that say they are not allowed during capture (on CUDA they
    /// would break the capture or bake in an address), as are a nested capture and a cuDNN algorithm search (run
    /// one eager step first). An error from `f` ends the capture and is returned; nothing is kept.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<Graph> {
        ensure!(
            !self.stream.is_capturing(),
            "a graph capture is already open on {}: captures do not nest (capture the inner work as part of the \
             outer one)",
            self.info.name
        );
        match &self.stream {
            Stream::Emulated(e) => e.begin_capture()?,
            Stream::Cuda(s) => {
                // Thread-local mode: unsafe calls (allocations, synchronous copies) from this thread fail the
                // capture; other threads of the process are unaffected.
                s.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(|e| anyhow!("beginning a graph capture on {}: {e:?}", self.info.name))?;
            }
        }
        self.alloc.begin_capture();
        let mut open = Open { gpu: self, ended: false };
        let ran = f();
        let ended = open.end();
        ran.context("while capturing a graph (nothing was kept)")?;
        let pin = self.alloc.pin();
        match ended? {
            Ended::Emulated(nodes) => {
                let Stream::Emulated(stream) = &self.stream else { bail!("the device changed kind during capture") };
                Ok(Graph {
                    len: nodes.len(),
                    captured: Captured::Emulated { stream: stream.clone(), nodes },
                    _pin: pin,
                })
            }
            Ended::Cuda(graph) => {
                let Stream::Cuda(stream) = &self.stream else { bail!("the device changed kind during capture") };
                let len = graph.as_ref().map(node_count).transpose()?.unwrap_or(0);
                let exec = CudaExec { graph, stream: stream.clone() };
                Ok(Graph { len, captured: Captured::Cuda(Mutex::new(exec)), _pin: pin })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_are_send_and_sync() {
        fn both<T: Send + Sync>() {}
        both::<Graph>();
    }

    #[test]
    fn a_capture_pins_the_cache_and_refuses_allocations() {
        let gpu = Gpu::emulated().unwrap();
        let b = gpu.alloc.alloc(4096).unwrap();
        let addr = b.addr();
        let g = gpu
            .capture(|| {
                let e = gpu.alloc.alloc(100).err().map(|e| e.to_string()).unwrap_or_default();
                assert!(e.contains("not allowed during graph capture"), "{e}");
                // Only the capturing thread is refused: another thread's allocation is not part of the capture.
                std::thread::scope(|s| s.spawn(|| drop(gpu.alloc.alloc(100).unwrap())).join().unwrap());
                gpu.fill(&b, 0, 4096, 7)
            })
            .unwrap();
        assert_eq!(g.len(), 1);
        drop(b);
        // While the graph lives, the cache keeps the block's memory: releasing does nothing.
        let cached = gpu.alloc.stats().cached;
        assert_eq!(cached, 4096 + 512, "the block and the other thread's");
        gpu.alloc.release_cached();
        assert_eq!(gpu.alloc.stats().cached, cached);
        g.replay(&gpu).unwrap();
        let again = gpu.alloc.alloc(4096).unwrap();
        assert_eq!(again.addr(), addr);
        assert_eq!(gpu.download::<u8>(&again, 4096).unwrap(), vec![7u8; 4096]);
        drop((g, again));
        gpu.alloc.release_cached();
        assert_eq!(gpu.alloc.stats().cached, 0);
    }

    #[test]
    fn a_failed_capture_leaves_the_device_eager() {
        let gpu = Gpu::emulated().unwrap();
        let b = gpu.zeros(64).unwrap();
        let e = gpu.capture(|| gpu.fill(&b, 0, 64, 1).and_then(|()| gpu.sync())).err().unwrap();
        assert!(format!("{e:#}").contains("a stream sync (Gpu::sync) is not allowed during graph capture"), "{e:#}");
        assert!(!gpu.stream.is_capturing());
        // The fill recorded before the error was dropped with the capture; fills run again.
        assert_eq!(gpu.download::<u8>(&b, 64).unwrap(), vec![0u8; 64]);
        gpu.fill(&b, 0, 64, 2).unwrap();
        assert_eq!(gpu.download::<u8>(&b, 64).unwrap(), vec![2u8; 64]);
        gpu.alloc.alloc(10).unwrap();
    }
}
