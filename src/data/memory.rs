//! Up-front memory checks: a run whose model, batches or activations cannot fit is refused with what was asked,
//! what is available and which flag to lower, instead of aborting later in an allocation.
//!
//! The estimates are lower bounds (a run refused here could never have finished); they are compared with the
//! kernel's `MemAvailable` (`/proc/meminfo`), which counts reclaimable page cache. Where that is unknown (not
//! Linux) nothing is refused.

use super::human_bytes;
use anyhow::{Result, bail};

/// Stored activations of one training step per input pixel and image, EfficientNet-B0 on the CPU reference in
/// f32: measured about 1,490 bytes (peak RSS of `derma bench cpu` at 128×128, batch 8 minus batch 2, divided by
/// 6·128²); 1,000 keeps the estimate a lower bound.
const TRAIN_BYTES_PER_PIXEL: u64 = 1000;
/// Live activations of an inference pass per input pixel: the widest B0 tensor (96 channels at half
/// resolution, f32) alone is 96 bytes per input pixel.
const EVAL_BYTES_PER_PIXEL: u64 = 96;
/// Bytes per parameter in training: value, gradient and AdamW's two moments, f32 each.
const TRAIN_BYTES_PER_PARAM: u64 = 16;
/// Parameters of EfficientNet-B0 with the seed's head, rounded down (the model is built after this check).
const B0_SEED_PARAMS: u64 = 4_000_000;

/// What a run needs, in words and bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// What was asked, as the user wrote it (`--batch-size 32 at --image-size 224`).
    pub asked: String,
    /// Bytes needed at least.
    pub bytes: u64,
}

/// The kernel's estimate of memory available without swapping (`MemAvailable`), in bytes.
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses `need` when it exceeds the available memory, naming `flag` as what to lower.
pub fn check_fits(need: &Estimate, flag: &str) -> Result<()> {
    check_against(need, mem_available(), flag)
}

fn check_against(need: &Estimate, available: Option<u64>, flag: &str) -> Result<()> {
    if let Some(avail) = available
        && need.bytes > avail
    {
        bail!(
            "{} needs at least {} of memory ({} bytes) but {} is available (MemAvailable): lower {flag}",
            need.asked,
            human_bytes(need.bytes),
            need.bytes,
            human_bytes(avail)
        );
    }
    Ok(())
}

fn pixels(batch: usize, side: usize) -> u64 {
    (batch as u64).saturating_mul(side as u64).saturating_mul(side as u64)
}

/// A training run of EfficientNet-B0: stored activations, `workers` loader threads holding `prefetch + 1`
/// batches each, and the model with its gradient and optimizer state.
pub fn train_estimate(batch: usize, side: usize, workers: usize, prefetch: usize) -> Estimate {
    let px = pixels(batch, side);
    let batches = (workers.max(1) as u64).saturating_mul(prefetch as u64 + 1);
    let bytes = px
        .saturating_mul(TRAIN_BYTES_PER_PIXEL)
        .saturating_add(px.saturating_mul(12).saturating_mul(batches))
        .saturating_add(B0_SEED_PARAMS * TRAIN_BYTES_PER_PARAM);
    Estimate { asked: format!("training with --batch-size {batch} at --image-size {side}"), bytes }
}

/// Evaluation of a model of `params` parameters: live activations of one batch, the loader's batches and the
/// weights.
pub fn eval_estimate(batch: usize, side: usize, params: usize) -> Estimate {
    let px = pixels(batch, side);
    let bytes = px
        .saturating_mul(EVAL_BYTES_PER_PIXEL)
        .saturating_add(px.saturating_mul(12).saturating_mul(3))
        .saturating_add((params as u64).saturating_mul(4));
    Estimate { asked: format!("evaluating with --batch-size {batch} at {side}x{side}"), bytes }
}

/// The f32 weights of a model of `params` parameters.
pub fn model_estimate(params: u64, asked: String) -> Estimate {
    Estimate { asked, bytes: params.saturating_mul(4) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let m = mem_available().unwrap();
            assert!(m > 1 << 20, "{m}");
        }
    }

    #[test]
    fn refusal_names_what_was_asked_what_is_there_and_the_flag() {
        let e = train_estimate(32, 2048, 4, 2);
        // 32·2048² pixels at 1000 B each, 12 B each for 12 loader batches, 64 MB of model state.
        let px = 32 * 2048 * 2048u64;
        assert_eq!(e.bytes, px * 1000 + px * 12 * 12 + 64_000_000);
        let err = check_against(&e, Some(8 << 30), "--batch-size or --image-size").unwrap_err().to_string();
        assert!(err.contains("--batch-size 32 at --image-size 2048"), "{err}");
        assert!(err.contains("8.0 GiB is available") && err.contains("lower --batch-size or --image-size"), "{err}");
        assert!(check_against(&e, None, "x").is_ok());
        assert!(check_against(&train_estimate(32, 224, 4, 2), Some(8 << 30), "x").is_ok());
    }
}
