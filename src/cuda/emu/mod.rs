//! The emulated CUDA device: cuBLASLt and cuDNN in plain loops over host memory.

pub mod blaslt;
pub mod cudnn;

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
