//! The emulated CUDA device: kernels/*.cu compiled as host C++ against kernels/emu (the CUDA execution model as a
//! header, with each thread of a block a fiber that switches only at barriers, warp collectives and exit) and run
//! on the CPU behind the same launch code as the GPU. [`sys`] is the FFI to that library and its safe wrapper.
//!
//! What it checks: every entry point's arithmetic and indexing, barrier and shuffle semantics (a missing
//! `__syncthreads` shows under another thread order), deadlocks, divergent barriers, shuffles that name exited or
//! absent lanes, launch shapes CUDA refuses, and, in the ASan flavour, every out-of-bounds or misaligned access.
//! What it cannot see: data races inside one interleaving step (the GPU's memory model), real timing and
//! occupancy, ptxas, PTX and driver issues, and the fast-math intrinsics' GPU error (they are exact here).
//!
//! ASan flavour: `--features emu-asan` builds the kernels with `-fsanitize=address,undefined` and recovery off, so
//! the first out-of-bounds or misaligned access aborts the run with the sanitizer's report (kernel, source line)
//! and a line naming the launch, block and thread. The ASan runtime must be the first library the process loads,
//! so run the test binaries with it preloaded, through cargo's runner so that cargo and rustc are left alone:
//!
//! ```text
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$(g++ -print-file-name=libasan.so) \
//!     ASAN_OPTIONS=detect_leaks=0" cargo test --release --features emu-asan
//! ```
//!
//! (`detect_leaks=0`: this run is for bad accesses, not leaks.) A binary run directly needs the same `LD_PRELOAD`
//! and `ASAN_OPTIONS` in its environment.
//!
//! `DERMA_EMU_LIB=path/to/libderma_emu.so` loads a separately built kernel library at run time instead of the one
//! linked in (scripts/mutate-kernels.sh rebuilds only that library for each mutant).
//!
//! [`blaslt`] and [`cudnn`] are cuBLASLt's matmul and cuDNN's convolutions in plain loops over host memory, called
//! by src/cuda/blas.rs and src/cuda/dnn.rs with the descriptors the real libraries get.

pub mod blaslt;
pub mod cudnn;
pub mod graph;
pub mod sys;

/// Fresh random inputs for the emulator's tests: a seed from the clock (or `DERMA_TEST_SEED`), printed so a
/// failure can be replayed.
#[cfg(test)]
pub(crate) fn test_rng(what: &str) -> rand_pcg::Pcg64 {
    use rand::SeedableRng;
    let seed = std::env::var("DERMA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("{what}: DERMA_TEST_SEED={seed}");
    rand_pcg::Pcg64::seed_from_u64(seed)
}
