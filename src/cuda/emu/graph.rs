//! Stream capture on the emulated device: while a capture is open, the emulated stream records what would have
//! run (a kernel launch as its entry point, launch shape and a copy of its argument pack; a cuBLASLt or cuDNN call,
//! a device fill or a device copy as a closure over the same addresses and descriptors) instead of running it, as
//! CUDA's stream capture does. Replaying the recording runs each node in order, exactly as the eager call would
//! have with the same arguments.

use anyhow::{Context, Result, anyhow, bail};
use std::ffi::c_void;
use std::sync::Mutex;

use super::sys;

/// One recorded kernel launch: what `cuLaunchKernel` would have been given, with the argument values copied.
pub struct KernelNode {
    /// The `extern "C"` entry point, e.g. `silu_fwd_f32`.
    name: String,
    /// The .cu family, for errors.
    family: &'static str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    /// The argument values, each starting at a word boundary (8-byte aligned: every kernel parameter type is).
    words: Vec<u64>,
    /// Word offset of each argument in `words`, in parameter order.
    offsets: Vec<usize>,
}

impl KernelNode {
    /// Copies the argument pack of a launch: `args[i]` points at a value of `sizes[i]` bytes with alignment at most
    /// 8.
    ///
    /// # Safety
    /// Each `args[i]` points at `sizes[i]` readable bytes.
    pub unsafe fn new(
        name: &str,
        family: &'static str,
        shape: ((u32, u32, u32), (u32, u32, u32), u32),
        args: &[*mut c_void],
        sizes: &[usize],
    ) -> Result<Self> {
        anyhow::ensure!(args.len() == sizes.len(), "kernel {name}: {} arguments but {} sizes", args.len(), sizes.len());
        let mut offsets = Vec::with_capacity(args.len());
        let mut total = 0;
        for &s in sizes {
            offsets.push(total);
            total += s.div_ceil(8);
        }
        let mut words = vec![0u64; total];
        for ((&p, &s), &o) in args.iter().zip(sizes).zip(&offsets) {
            // SAFETY: the caller vouches for `s` readable bytes at `p`; `words` has s.div_ceil(8) words from `o`,
            // and the two do not overlap (`words` is a fresh allocation).
            unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), words.as_mut_ptr().add(o).cast::<u8>(), s) };
        }
        let (grid, block, shared_bytes) = shape;
        Ok(Self { name: name.to_string(), family, grid, block, shared_bytes, words, offsets })
    }

    /// Runs the launch now, on the calling thread, with a fresh copy of the recorded arguments.
    ///
    /// # Safety
    /// The device addresses among the arguments still address host memory valid for what the kernel reads and
    /// writes at this shape (as at capture).
    unsafe fn run(&self) -> Result<()> {
        let mut words = self.words.clone();
        let base = words.as_mut_ptr();
        // SAFETY: every offset lies inside `words` (built in `new`).
        let mut args: Vec<*mut c_void> = self.offsets.iter().map(|&o| unsafe { base.add(o) }.cast()).collect();
        // SAFETY: the argument values are the ones the eager launch had (copied bit for bit, each at an 8-byte
        // aligned address); the caller vouches for the memory they address.
        unsafe { sys::launch(&self.name, self.grid, self.block, self.shared_bytes, &mut args) }.with_context(|| {
            format!(
                "replaying {} ({}.cu, grid {:?} block {:?} shared {} B) on the emulated device",
                self.name, self.family, self.grid, self.block, self.shared_bytes
            )
        })
    }
}

/// A recorded library call, fill or copy: runs the same call again on the same addresses.
pub type Call = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// One node of a recording.
pub enum Node {
    /// A kernel launch.
    Kernel(KernelNode),
    /// A cuBLASLt or cuDNN call, a device fill or a device-to-device copy, named for errors.
    Call { what: String, run: Call },
}

impl Node {
    /// Runs the node now.
    ///
    /// # Safety
    /// The device memory the node addresses is still valid host memory of the emulated device, as at capture.
    pub unsafe fn run(&self) -> Result<()> {
        match self {
            // SAFETY: the caller vouches for the memory.
            Self::Kernel(k) => unsafe { k.run() },
            Self::Call { what, run } => run().with_context(|| format!("replaying {what} on the emulated device")),
        }
    }
}

/// The emulated device's stream: launches run when they are made, except while a capture is open.
#[derive(Default)]
pub struct EmuStream {
    /// The open capture's nodes so far; `None` when not capturing.
    recording: Mutex<Option<Vec<Node>>>,
}

impl EmuStream {
    /// A stream with no capture open.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<Node>>>> {
        self.recording.lock().map_err(|_| anyhow!("the emulated stream's capture lock is poisoned (a thread panicked)"))
    }

    /// Whether a capture is open.
    pub fn is_capturing(&self) -> bool {
        self.recording.lock().map(|r| r.is_some()).unwrap_or(false)
    }

    /// Opens a capture; an error when one is already open (captures do not nest, as on CUDA).
    pub fn begin_capture(&self) -> Result<()> {
        let mut r = self.lock()?;
        if r.is_some() {
            bail!(
                "a graph capture is already open on this stream: captures do not nest (capture the inner work as \
                 part of the outer one, or end the outer capture first)"
            );
        }
        *r = Some(Vec::new());
        Ok(())
    }

    /// Closes the open capture and returns its nodes (none when no capture was open).
    pub fn end_capture(&self) -> Vec<Node> {
        match self.recording.lock() {
            Ok(mut r) => r.take().unwrap_or_default(),
            // A poisoned lock: a thread panicked while recording; clear the capture so the stream runs again.
            Err(p) => p.into_inner().take().unwrap_or_default(),
        }
    }

    /// Records the node `make` builds when a capture is open (and returns true); returns false, building nothing,
    /// when none is.
    pub fn record(&self, make: impl FnOnce() -> Result<Node>) -> Result<bool> {
        let mut r = self.lock()?;
        match r.as_mut() {
            Some(nodes) => {
                nodes.push(make()?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Runs `run` now, or records it as a node named `what` when a capture is open.
    pub fn call(
        &self,
        what: impl FnOnce() -> String,
        run: impl Fn() -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let mut r = self.lock()?;
        match r.as_mut() {
            Some(nodes) => {
                nodes.push(Node::Call { what: what(), run: Box::new(run) });
                Ok(())
            }
            None => {
                drop(r);
                run()
            }
        }
    }
}
