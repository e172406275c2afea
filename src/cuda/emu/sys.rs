//! FFI to the emulated kernel library (kernels/emu/derma_emu.h) and its safe wrapper.
//!
//! The library is linked into the crate by build.rs; `DERMA_EMU_LIB` names a shared build of it to use instead
//! (loaded once, on first use, for the whole process).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};

/// Order of threads between sync points, or of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Thread 0 first (blocks: block 0 first).
    Forward,
    /// Last thread first.
    Reverse,
    /// A fresh random order at every sync point, from the schedule's seed.
    Random,
    /// Warps last to first, lanes in order inside a warp (for blocks: the same as `Reverse`).
    WarpReverse,
}

impl Order {
    fn code(self) -> c_int {
        match self {
            Self::Forward => 0,
            Self::Reverse => 1,
            Self::Random => 2,
            Self::WarpReverse => 3,
        }
    }
}

/// How the emulator orders threads and blocks for launches made from the calling OS thread.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub threads: Order,
    pub blocks: Order,
    pub seed: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

type SetScheduleFn = unsafe extern "C" fn(c_int, c_int, u64);
type HasKernelFn = unsafe extern "C" fn(*const c_char) -> c_int;
type LaunchFn = unsafe extern "C" fn(*const c_char, Dim3, Dim3, u32, *mut *mut c_void, *mut c_char, usize) -> c_int;
type FlavourFn = unsafe extern "C" fn() -> *const c_char;
type MarkFn = unsafe extern "C" fn(*const c_void, usize);

unsafe extern "C" {
    fn derma_emu_set_schedule(thread_order: c_int, block_order: c_int, seed: u64);
    fn derma_emu_has_kernel(name: *const c_char) -> c_int;
    fn derma_emu_launch(
        name: *const c_char,
        grid: Dim3,
        block: Dim3,
        dynamic_shared_bytes: u32,
        args: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn derma_emu_flavour() -> *const c_char;
    fn derma_emu_mark_inaccessible(addr: *const c_void, len: usize);
    fn derma_emu_mark_accessible(addr: *const c_void, len: usize);
}

struct Api {
    set_schedule: SetScheduleFn,
    has_kernel: HasKernelFn,
    launch: LaunchFn,
    flavour: FlavourFn,
    mark_inaccessible: MarkFn,
    mark_accessible: MarkFn,
    /// Keeps a `DERMA_EMU_LIB` library mapped for the life of the process.
    _lib: Option<libloading::Library>,
}

fn load_override(path: &str) -> std::result::Result<Api, String> {
    // SAFETY: loading a library runs its initialisers; DERMA_EMU_LIB must name a build of kernels/emu (the
    // mutation script's), whose initialisers only set up static tables.
    let lib =
        unsafe { libloading::Library::new(path) }.map_err(|e| format!("DERMA_EMU_LIB={path}: cannot load it: {e}"))?;
    // SAFETY: the symbols are looked up by the names and C signatures of kernels/emu/derma_emu.h.
    unsafe {
        let sym = |name: &[u8]| -> std::result::Result<*const c_void, String> {
            lib.get::<*const c_void>(name)
                .map(|s| *s)
                .map_err(|e| format!("DERMA_EMU_LIB={path}: {}: {e}", String::from_utf8_lossy(name)))
        };
        let set_schedule = std::mem::transmute::<*const c_void, SetScheduleFn>(sym(b"derma_emu_set_schedule")?);
        let has_kernel = std::mem::transmute::<*const c_void, HasKernelFn>(sym(b"derma_emu_has_kernel")?);
        let launch = std::mem::transmute::<*const c_void, LaunchFn>(sym(b"derma_emu_launch")?);
        let flavour = std::mem::transmute::<*const c_void, FlavourFn>(sym(b"derma_emu_flavour")?);
        let mark_inaccessible = std::mem::transmute::<*const c_void, MarkFn>(sym(b"derma_emu_mark_inaccessible")?);
        let mark_accessible = std::mem::transmute::<*const c_void, MarkFn>(sym(b"derma_emu_mark_accessible")?);
        Ok(Api { set_schedule, has_kernel, launch, flavour, mark_inaccessible, mark_accessible, _lib: Some(lib) })
    }
}

fn api() -> std::result::Result<&'static Api, &'static str> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| match std::env::var("DERMA_EMU_LIB") {
        Ok(path) if !path.is_empty() => load_override(&path),
        _ => Ok(Api {
            set_schedule: derma_emu_set_schedule,
            has_kernel: derma_emu_has_kernel,
            launch: derma_emu_launch,
            flavour: derma_emu_flavour,
            mark_inaccessible: derma_emu_mark_inaccessible,
            mark_accessible: derma_emu_mark_accessible,
            _lib: None,
        }),
    })
    .as_ref()
    .map_err(String::as_str)
}

/// Sets the thread and block order for launches made from the calling OS thread.
pub fn set_schedule(s: Schedule) {
    if let Ok(api) = api() {
        // SAFETY: plain integers; the library stores them in thread-local state.
        unsafe { (api.set_schedule)(s.threads.code(), s.blocks.code(), s.seed) }
    }
}

/// Whether the emulated library has an entry point named `name` (false too when `DERMA_EMU_LIB` fails to load;
/// [`launch`] then says why).
pub fn has_kernel(name: &str) -> bool {
    let (Ok(api), Ok(c)) = (api(), CString::new(name)) else { return false };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { (api.has_kernel)(c.as_ptr()) != 0 }
}

/// "plain" or "asan": how the emulated kernels were compiled ("unavailable" when `DERMA_EMU_LIB` fails to load).
pub fn flavour() -> &'static str {
    let Ok(api) = api() else { return "unavailable" };
    // SAFETY: the library returns a pointer to a static NUL-terminated string.
    let s = unsafe { CStr::from_ptr((api.flavour)()) };
    match s.to_str() {
        Ok("asan") => "asan",
        Ok("plain") => "plain",
        _ => "unknown",
    }
}

/// Runs one launch of kernel `name` to completion on the calling OS thread. `args[i]` points at the i-th
/// parameter's value, as cuLaunchKernel's `kernelParams`. Errors name the kernel and, for a fault inside it (a
/// deadlock, a divergent barrier, a bad shuffle), the file, line, block and thread.
///
/// # Safety
/// Every pointer in `args` points at a value of the kernel's parameter type, and every device pointer among those
/// values addresses host memory valid for what the kernel reads and writes.
pub unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    args: &mut [*mut c_void],
) -> Result<()> {
    let api = api().map_err(|e| anyhow!("emulated device: {e}"))?;
    let c = CString::new(name).map_err(|_| anyhow!("kernel name {name:?} contains a NUL byte"))?;
    let mut err = vec![0u8; 1024];
    // SAFETY: name and err are valid for the call; the caller guarantees args and the memory they address.
    let rc = unsafe {
        (api.launch)(
            c.as_ptr(),
            Dim3 { x: grid.0, y: grid.1, z: grid.2 },
            Dim3 { x: block.0, y: block.1, z: block.2 },
            shared_bytes,
            args.as_mut_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = CStr::from_bytes_until_nul(&err).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        bail!("emulated launch failed: {msg}");
    }
    Ok(())
}

/// ASan flavour: makes `[addr, addr + bytes)` off limits to kernels, so any access to it fails the run with the
/// sanitizer's report (a no-op in the plain flavour). Meant for the emulated allocator: the slack between a
/// tensor's bytes and the end of its cached block, which the host allocation (and so ASan) would otherwise allow.
///
/// # Safety
/// The range lies inside one live host allocation, and nothing (kernel or Rust code) touches it until
/// [`mark_accessible`] is called on it; in particular it must be made accessible again before it is freed or
/// handed out for other data.
pub unsafe fn mark_inaccessible(addr: u64, bytes: usize) {
    if let Ok(api) = api() {
        // SAFETY: the caller guarantees the range; the call only changes ASan's shadow memory.
        unsafe { (api.mark_inaccessible)(addr as *const c_void, bytes) }
    }
}

/// Undoes [`mark_inaccessible`] on `[addr, addr + bytes)`.
///
/// # Safety
/// The range lies inside one live host allocation.
pub unsafe fn mark_accessible(addr: u64, bytes: usize) {
    if let Ok(api) = api() {
        // SAFETY: the caller guarantees the range; the call only changes ASan's shadow memory.
        unsafe { (api.mark_accessible)(addr as *const c_void, bytes) }
    }
}
