//! A caching device allocator: blocks are rounded up to size classes and, when dropped, go back to a free list
//! of their class instead of to the driver. After the first training step every request finds a cached block, so a
//! steady-state step makes no cuMemAlloc/cuMemFree (each of which synchronises the device).
//!
//! All blocks are meant for one stream: a block dropped while a kernel on that stream still uses it can be handed
//! out again at once, because the next user's work is queued behind it on the same stream.
//!
//! The raw allocator is a trait ([`RawAlloc`]): the driver on a GPU, host memory on the emulated device
//! ([`HostAlloc`]), a fake in the caching logic's tests.
//!
//! Graph capture: while a capture is open ([`super::Gpu::capture`]), an allocation from the capturing thread is an
//! error (a graph bakes in every address it uses, so its buffers must exist before capture), and while any graph
//! is alive ([`CachePin`]) the cache keeps its memory instead of giving it back to the raw allocator, so the
//! addresses a graph replays stay this device's memory.

use anyhow::{Result, bail};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// Where blocks come from: the driver on a GPU, the host on the emulated device, a fake in tests.
pub trait RawAlloc: Send + Sync {
    /// Allocates `bytes` of device memory; `Err` when the device is out of memory.
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, String>;
    /// Frees a pointer returned by `alloc`.
    fn free(&self, ptr: u64);
    /// Bytes the device could still hand out, when it can tell.
    fn free_bytes(&self) -> Option<usize> {
        None
    }
}

/// cuMemAlloc / cuMemFree on one CUDA context.
pub struct DriverAlloc {
    ctx: Arc<cudarc::driver::CudaContext>,
}

impl DriverAlloc {
    /// Allocates on `ctx`.
    pub fn new(ctx: Arc<cudarc::driver::CudaContext>) -> Self {
        Self { ctx }
    }
}

impl RawAlloc for DriverAlloc {
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, String> {
        self.ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        // SAFETY: the context is current on this thread; cuMemAlloc returns a fresh pointer or an error.
        unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| format!("{e:?}"))
    }

    fn free_bytes(&self) -> Option<usize> {
        self.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok().map(|(free, _total)| free)
    }

    fn free(&self, ptr: u64) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from malloc_sync on this context and is freed once (the pool forgets it here).
            let _ = unsafe { cudarc::driver::result::free_sync(ptr) };
        }
    }
}

/// Memory of the emulated device: host allocations aligned to 256 bytes, as cudaMalloc aligns device memory, so
/// the vector paths and cuBLASLt's alignment rules see the same addresses modulo 256 as on a GPU. Fresh memory is
/// filled with 0xFF bytes (NaN in f32 and f16), so a kernel that reads memory nobody wrote computes NaNs.
///
/// An optional capacity makes the emulated device run out of memory like a small GPU (to exercise the paths that
/// depend on free memory, e.g. the resident dataset's fallback to streaming).
#[derive(Default)]
pub struct HostAlloc {
    live: Mutex<std::collections::HashMap<u64, std::alloc::Layout>>,
    capacity: Option<usize>,
}

/// Alignment of emulated device allocations (cudaMalloc's).
pub const EMULATED_ALIGN: usize = 256;

impl HostAlloc {
    /// An empty emulated device memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// An emulated device memory of at most `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { live: Mutex::default(), capacity: Some(capacity) }
    }

    fn used(live: &std::collections::HashMap<u64, std::alloc::Layout>) -> usize {
        live.values().map(|l| l.size()).sum()
    }
}

impl RawAlloc for HostAlloc {
    fn alloc(&self, bytes: usize) -> std::result::Result<u64, String> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), EMULATED_ALIGN)
            .map_err(|_| format!("{bytes} bytes cannot be allocated on the host"))?;
        if let Some(cap) = self.capacity {
            let live = self.live.lock().map_err(|_| "the emulated device memory lock is poisoned".to_string())?;
            if Self::used(&live) + layout.size() > cap {
                return Err(format!("the emulated device's {cap}-byte memory is full"));
            }
        }
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(format!("the host could not allocate {bytes} bytes for the emulated device"));
        }
        // SAFETY: p points at layout.size() freshly allocated bytes.
        unsafe { std::ptr::write_bytes(p, 0xFF, layout.size()) };
        let mut live = self.live.lock().map_err(|_| "the emulated device memory lock is poisoned".to_string())?;
        live.insert(p as u64, layout);
        Ok(p as u64)
    }

    fn free_bytes(&self) -> Option<usize> {
        self.free_bytes_now()
    }

    fn free(&self, ptr: u64) {
        let Ok(mut live) = self.live.lock() else { return };
        if let Some(layout) = live.remove(&ptr) {
            // SAFETY: ptr came from std::alloc::alloc with this layout and is freed once (removed from `live`).
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }
}

impl HostAlloc {
    fn free_bytes_now(&self) -> Option<usize> {
        let cap = self.capacity?;
        let live = self.live.lock().ok()?;
        Some(cap.saturating_sub(Self::used(&live)))
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        let Ok(live) = self.live.get_mut() else { return };
        for (ptr, layout) in live.drain() {
            // SAFETY: as in `free`; the allocator is going away, so nothing uses these blocks any more.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }
}

/// Allocation statistics, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes (rounded to size classes) held by live blocks.
    pub in_use: usize,
    /// Bytes sitting in free lists, ready for reuse.
    pub cached: usize,
    /// The highest `in_use` seen.
    pub peak_in_use: usize,
    /// Calls that went to the raw allocator.
    pub raw_allocs: u64,
    /// Calls served from a free list.
    pub reuses: u64,
}

struct Inner {
    raw: Box<dyn RawAlloc>,
    free: BTreeMap<usize, Vec<u64>>,
    stats: AllocStats,
    context: String,
    /// The thread with a graph capture open on this device, if any: its allocations are refused.
    capturing: Option<std::thread::ThreadId>,
    /// Live graphs: while nonzero, cached blocks are never freed.
    pins: usize,
}

/// The caching allocator. Cheap to clone (shared state).
#[derive(Clone)]
pub struct CachingAllocator {
    inner: Arc<Mutex<Inner>>,
}

/// A device block; returns to its allocator's free list when dropped.
pub struct Block {
    ptr: u64,
    class: usize,
    requested: usize,
    pool: Arc<Mutex<Inner>>,
}

/// A typed device pointer for kernel arguments (the address of a `T` array in device memory).
#[repr(transparent)]
#[derive(Debug)]
pub struct DevPtr<T>(pub u64, PhantomData<T>);

impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}

impl<T> DevPtr<T> {
    /// Wraps a raw device address.
    pub fn new(addr: u64) -> Self {
        Self(addr, PhantomData)
    }
}

// SAFETY: DevPtr is a transparent u64, exactly what a `T*` kernel parameter is on a 64-bit device.
unsafe impl<T> cudarc::driver::DeviceRepr for DevPtr<T> {}

impl Block {
    /// The device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }
    /// Bytes asked for.
    pub fn len_bytes(&self) -> usize {
        self.requested
    }
    /// Bytes actually reserved (the size class).
    pub fn class_bytes(&self) -> usize {
        self.class
    }
    /// The block as a typed pointer (the caller keeps the block alive while kernels use it).
    pub fn ptr<T>(&self) -> DevPtr<T> {
        DevPtr::new(self.ptr)
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Ok(mut g) = self.pool.lock() {
            g.stats.in_use -= self.class;
            g.stats.cached += self.class;
            g.free.entry(self.class).or_default().push(self.ptr);
        }
    }
}

/// Rounds a request up to its size class: 512 B minimum, then four classes per power of two (at most 25% waste).
pub fn size_class(bytes: usize) -> usize {
    let b = bytes.max(512);
    let p = usize::BITS - 1 - b.leading_zeros(); // 2^p <= b < 2^(p+1)
    let step = 1usize << (p - 2);
    b.div_ceil(step) * step
}

fn human(b: usize) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b} B") } else { format!("{v:.2} {}", U[i]) }
}

impl CachingAllocator {
    /// A caching allocator over `raw`.
    pub fn new(raw: Box<dyn RawAlloc>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                raw,
                free: BTreeMap::new(),
                stats: AllocStats::default(),
                context: String::new(),
                capturing: None,
                pins: 0,
            })),
        }
    }

    /// Sets what an out-of-memory error reports as the cause, e.g. "batch size 64".
    pub fn set_context(&self, context: impl Into<String>) {
        if let Ok(mut g) = self.inner.lock() {
            g.context = context.into();
        }
    }

    /// A block of at least `bytes`, from the cache when one of its class is free.
    pub fn alloc(&self, bytes: usize) -> Result<Block> {
        let class = size_class(bytes);
        let Ok(mut g) = self.inner.lock() else { bail!("the device allocator's lock is poisoned (a thread panicked)") };
        if g.capturing == Some(std::thread::current().id()) {
            bail!(
                "a device allocation of {} is {}: the graph would bake in its address; allocate every buffer \
                 before capturing (run one eager step first, so caches and workspaces exist)",
                human(bytes),
                super::device::NOT_IN_CAPTURE
            );
        }
        let ptr = if let Some(p) = g.free.get_mut(&class).and_then(|v| v.pop()) {
            g.stats.cached -= class;
            g.stats.reuses += 1;
            p
        } else {
            let first = g.raw.alloc(class);
            let p = match first {
                Ok(p) => p,
                Err(_) => {
                    // Give the cache back to the driver and try once more before failing.
                    Self::release_locked(&mut g);
                    match g.raw.alloc(class) {
                        Ok(p) => p,
                        Err(e) => {
                            let ctx = if g.context.is_empty() { String::new() } else { format!(" at {}", g.context) };
                            let pinned = if g.pins > 0 {
                                format!(", {} cached by live graphs", human(g.stats.cached))
                            } else {
                                String::new()
                            };
                            bail!(
                                "CUDA out of memory{ctx}: asked for {} while {} is in use (peak {}{pinned}); lower \
                                 the batch size or use fp16 ({e})",
                                human(bytes),
                                human(g.stats.in_use),
                                human(g.stats.peak_in_use)
                            );
                        }
                    }
                }
            };
            g.stats.raw_allocs += 1;
            p
        };
        g.stats.in_use += class;
        g.stats.peak_in_use = g.stats.peak_in_use.max(g.stats.in_use);
        Ok(Block { ptr, class, requested: bytes, pool: self.inner.clone() })
    }

    /// Frees the cached blocks, unless a live graph pins them (it may replay work on their addresses).
    fn release_locked(g: &mut Inner) {
        if g.pins > 0 {
            return;
        }
        let free = std::mem::take(&mut g.free);
        for (_, ptrs) in free {
            for p in ptrs {
                g.raw.free(p);
            }
        }
        g.stats.cached = 0;
    }

    /// Frees every cached block back to the driver (live blocks are untouched); does nothing while a captured
    /// graph is alive.
    pub fn release_cached(&self) {
        if let Ok(mut g) = self.inner.lock() {
            Self::release_locked(&mut g);
        }
    }

    /// Bytes that allocations could still get: what the device reports free plus this cache's free lists;
    /// `None` when the device cannot tell (an emulated device without a capacity).
    pub fn free_bytes(&self) -> Option<usize> {
        let g = self.inner.lock().ok()?;
        g.raw.free_bytes().map(|f| f + g.stats.cached)
    }

    /// Current statistics.
    pub fn stats(&self) -> AllocStats {
        self.inner.lock().map(|g| g.stats).unwrap_or_default()
    }

    /// Refuses allocations from the calling thread until [`CachingAllocator::end_capture`] (a graph capture is
    /// open on it).
    pub(crate) fn begin_capture(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.capturing = Some(std::thread::current().id());
        }
    }

    /// Ends what [`CachingAllocator::begin_capture`] began.
    pub(crate) fn end_capture(&self) {
        match self.inner.lock() {
            Ok(mut g) => g.capturing = None,
            Err(p) => p.into_inner().capturing = None,
        }
    }

    /// Keeps the cache's memory allocated (never given back to the raw allocator) while the pin lives; a captured
    /// graph holds one. The pin also keeps the allocator, and so the device memory, alive.
    pub fn pin(&self) -> CachePin {
        if let Ok(mut g) = self.inner.lock() {
            g.pins += 1;
        }
        CachePin { pool: self.inner.clone() }
    }
}

/// Holds an allocator's cached memory in place: see [`CachingAllocator::pin`].
pub struct CachePin {
    pool: Arc<Mutex<Inner>>,
}

impl Drop for CachePin {
    fn drop(&mut self) {
        if let Ok(mut g) = self.pool.lock() {
            g.pins = g.pins.saturating_sub(1);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Nothing can pin an allocator that is going away (a pin holds it), so this frees.
        self.pins = 0;
        CachingAllocator::release_locked(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// A fake device with a capacity; counts calls.
    struct Fake {
        next: AtomicU64,
        used: AtomicUsize,
        cap: usize,
        sizes: Mutex<std::collections::HashMap<u64, usize>>,
        allocs: Arc<AtomicUsize>,
        frees: Arc<AtomicUsize>,
    }

    impl RawAlloc for Fake {
        fn alloc(&self, bytes: usize) -> std::result::Result<u64, String> {
            if self.used.load(Ordering::SeqCst) + bytes > self.cap {
                return Err("CUDA_ERROR_OUT_OF_MEMORY".into());
            }
            self.used.fetch_add(bytes, Ordering::SeqCst);
            self.allocs.fetch_add(1, Ordering::SeqCst);
            let p = self.next.fetch_add(bytes as u64, Ordering::SeqCst);
            self.sizes.lock().unwrap().insert(p, bytes);
            Ok(p)
        }
        fn free(&self, ptr: u64) {
            let b = self.sizes.lock().unwrap().remove(&ptr).expect("double free or unknown pointer");
            self.used.fetch_sub(b, Ordering::SeqCst);
            self.frees.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn fake(cap: usize) -> (CachingAllocator, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let allocs = Arc::new(AtomicUsize::new(0));
        let frees = Arc::new(AtomicUsize::new(0));
        let raw = Fake {
            next: AtomicU64::new(1 << 20),
            used: AtomicUsize::new(0),
            cap,
            sizes: Mutex::new(Default::default()),
            allocs: allocs.clone(),
            frees: frees.clone(),
        };
        (CachingAllocator::new(Box::new(raw)), allocs, frees)
    }

    #[test]
    fn size_classes_bound_waste() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 640);
        assert_eq!(size_class(1000), 1024);
        assert_eq!(size_class(1025), 1280);
        for b in (1..5_000_000).step_by(997) {
            let c = size_class(b);
            assert!(c >= b && (c <= 512 || c as f64 <= b as f64 * 1.25 + 1.0), "{b} -> {c}");
        }
    }

    #[test]
    fn steady_state_makes_no_raw_calls() {
        let (a, allocs, frees) = fake(1 << 30);
        let sizes = [4096usize, 100, 1 << 20, 3_000_000, 4096, 77];
        for _step in 0..5 {
            let blocks: Vec<Block> = sizes.iter().map(|&s| a.alloc(s).unwrap()).collect();
            // Live blocks never share an address.
            let mut addrs: Vec<u64> = blocks.iter().map(|b| b.addr()).collect();
            addrs.sort_unstable();
            addrs.dedup();
            assert_eq!(addrs.len(), sizes.len());
        }
        assert_eq!(allocs.load(Ordering::SeqCst), sizes.len(), "only the first step allocates");
        assert_eq!(frees.load(Ordering::SeqCst), 0);
        let s = a.stats();
        assert_eq!(s.in_use, 0);
        assert_eq!(s.cached, sizes.iter().map(|&b| size_class(b)).sum::<usize>());
        assert_eq!(s.peak_in_use, s.cached);
        assert_eq!(s.reuses, 4 * sizes.len() as u64);
        a.release_cached();
        assert_eq!(frees.load(Ordering::SeqCst), sizes.len());
        assert_eq!(a.stats().cached, 0);
    }

    #[test]
    fn oom_releases_cache_then_reports_context() {
        let (a, _allocs, frees) = fake(10 << 20);
        drop(a.alloc(6 << 20).unwrap()); // cached, 6 MiB
        let b = a.alloc(8 << 20).unwrap(); // needs the cache released first
        assert_eq!(frees.load(Ordering::SeqCst), 1);
        a.set_context("batch size 64");
        let e = a.alloc(4 << 20).err().unwrap().to_string();
        assert!(e.contains("batch size 64"), "{e}");
        assert!(e.contains("asked for 4.00 MiB"), "{e}");
        assert!(e.contains("8.00 MiB is in use"), "{e}");
        drop(b);
    }

    #[test]
    fn host_alloc_is_aligned_poisoned_and_freed() {
        let raw = HostAlloc::new();
        let ptrs: Vec<u64> = [1usize, 512, 640, 4096, 100_000].iter().map(|&b| raw.alloc(b).unwrap()).collect();
        for &p in &ptrs {
            assert_eq!(p % EMULATED_ALIGN as u64, 0, "{p:#x}");
        }
        // SAFETY: the 512-byte block was just allocated and filled.
        let bytes = unsafe { std::slice::from_raw_parts(ptrs[1] as *const u8, 512) };
        assert!(bytes.iter().all(|&b| b == 0xFF), "fresh emulated memory reads as NaN");
        assert!(f32::from_bits(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).is_nan());
        for p in ptrs {
            raw.free(p);
        }
        assert!(raw.live.lock().unwrap().is_empty());
        // Freeing an unknown pointer is ignored, not a crash.
        raw.free(0x1000);
        let e = raw.alloc(1 << 50).unwrap_err();
        assert!(e.contains("emulated device"), "{e}");
    }

    #[test]
    fn caching_allocator_runs_on_host_memory() {
        let a = CachingAllocator::new(Box::new(HostAlloc::new()));
        for _ in 0..3 {
            let b = a.alloc(1000).unwrap();
            assert_eq!(b.addr() % 256, 0);
            assert_eq!((b.len_bytes(), b.class_bytes()), (1000, 1024));
        }
        let s = a.stats();
        assert_eq!((s.raw_allocs, s.reuses, s.in_use, s.cached), (1, 2, 0, 1024));
    }
}
