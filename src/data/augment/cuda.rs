//! The fused training augmentation on the device (kernels/augment.cu): the launch wrapper and its `derma check`
//! family, which compares the kernel with the CPU applier [`crate::data::augment::apply`] pixel by pixel.
//!
//! The kernel repeats the CPU applier's arithmetic operation for operation, so on any IEEE device (and on the
//! emulated one) its f32 output equals the CPU's bit for bit and its f16 output is the CPU's value rounded once.
//! The check still judges with the tolerances (f32: 1e-5 absolute on normalized values; f16: half an f16
//! ulp of the reference plus that); the bit-for-bit claim is asserted by `tests/cuda_data.rs`.

use anyhow::{Context, Result, ensure};
use cudarc::driver::LaunchConfig;
use half::f16;

use crate::cuda::Gpu;
use crate::cuda::alloc::Block;
use crate::cuda::device::Stream;
use crate::cuda::kernels::{DevSlice, Elem, KernelArg, Kernels, Launch};
use crate::data::augment::{self, AugConfig, AugParams};
use crate::tools::check::{CANARY, CheckResult, Dtype, FENCE, Family};

/// Mirror of `AugShape` in kernels/augment.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AugShape {
    /// Plan position of the batch's sample 0 (the kernel adds `*step · batch` when a step counter is given).
    pub position0: i64,
    /// Entries in the plan (`params`, and `table` when given): positions at or past it are not read.
    pub positions: i64,
    /// Images in the source array: slots at or past it are not read.
    pub slots: i64,
    /// Samples in the batch.
    pub batch: i32,
    /// Side of the source images.
    pub size: i32,
    /// Side of the output images.
    pub out_size: i32,
    /// Padding to a multiple of 8 bytes.
    pub pad_: i32,
}

// SAFETY: #[repr(C)] of three int64 and four int32, laid out like the .cu struct (pinned by a test).
unsafe impl KernelArg for AugShape {}

/// Threads per block of both passes (`kAugThreads` in the kernel).
const THREADS: u32 = 128;

/// One batch to augment. Sample `b` of the batch is plan position `p = position0 + b` (+ `*step · batch`); it
/// reads image `table[p]` (or image `b` when there is no table: a streamed batch whose images were copied in
/// order) and parameters `params[p]`.
pub struct AugmentBatch<'a> {
    /// Output `[batch, out, out, 3]` of the element type.
    pub out: DevSlice<'a>,
    /// Labels of the batch's samples (`batch` i32), gathered from `labels`; both or neither.
    pub labels_out: Option<DevSlice<'a>>,
    /// Source images `[slots, size, size, 3]` u8.
    pub images: DevSlice<'a>,
    /// Labels of the source images (`slots` i32).
    pub labels: Option<DevSlice<'a>>,
    /// Image slot per plan position (`positions` i32), or `None` for image `b` per sample `b`.
    pub table: Option<DevSlice<'a>>,
    /// `AugParams` per plan position.
    pub params: DevSlice<'a>,
    /// A device i64 step counter for replayed graphs (`None`: position0 alone).
    pub step: Option<DevSlice<'a>>,
    /// Workspace of [`partials_bytes`].
    pub partials: DevSlice<'a>,
    /// Positions, slots and sizes.
    pub shape: AugShape,
}

/// Bytes of the fixed-point grey-sum workspace: one u64 per output row per sample.
pub fn partials_bytes(batch: usize, out_size: usize) -> usize {
    batch * out_size * 8
}

/// Runs both passes of the augmentation for one batch. Positions and slots are checked on the device against
/// `shape.positions` and `shape.slots` (a sample outside them comes out as NaN), everything else here.
pub fn augment<T: Elem>(k: &Kernels, s: &Stream, a: &AugmentBatch) -> Result<()> {
    let sh = a.shape;
    ensure!(sh.batch > 0 && sh.size > 0 && sh.out_size > 0, "augment: empty batch or image side in {sh:?}");
    ensure!(sh.batch <= 65_535, "augment: batch {} exceeds the grid's 65,535 samples", sh.batch);
    ensure!(sh.positions >= 0 && sh.slots >= 0 && sh.position0 >= 0, "augment: negative count in {sh:?}");
    if a.step.is_none() {
        ensure!(
            sh.position0 + i64::from(sh.batch) <= sh.positions,
            "augment: positions {}..{} run past the plan's {}",
            sh.position0,
            sh.position0 + i64::from(sh.batch),
            sh.positions
        );
    }
    if a.table.is_none() {
        ensure!(i64::from(sh.batch) <= sh.slots, "augment: {} samples but {} streamed images", sh.batch, sh.slots);
    }
    ensure!(a.labels.is_some() == a.labels_out.is_some(), "augment: give both labels and labels_out, or neither");
    let (b, os, side) = (sh.batch as usize, sh.out_size as usize, sh.size as usize);
    let out = a.out.checked::<T>(b * os * os * 3, "augment out")?;
    let images = a.images.checked::<u8>(sh.slots as usize * side * side * 3, "augment images")?;
    let labels_out = opt_addr::<i32>(a.labels_out, b, "augment labels_out")?;
    let labels = opt_addr::<i32>(a.labels, sh.slots as usize, "augment labels")?;
    let table = opt_addr::<i32>(a.table, sh.positions as usize, "augment table")?;
    let params = a.params.checked::<AugParams>(sh.positions as usize, "augment params")?;
    let step = opt_addr::<i64>(a.step, 1, "augment step")?;
    let partials = a.partials.checked::<u64>(b * os, "augment partials")?;
    let cfg = LaunchConfig {
        grid_dim: (sh.out_size as u32, sh.batch as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f1 = k.entry("augment", "augment_mean_partial")?;
    let f2 = k.entry("augment", &format!("augment_apply_{}", T::SUFFIX))?;
    // SAFETY: every buffer was checked above against the shape; positions and slots the host cannot see (a step
    // counter, table entries) are bounds-checked by the kernel against shape.positions and shape.slots.
    unsafe {
        Launch::new(&f1).arg(&partials).arg(&images).arg(&table).arg(&params).arg(&step).arg(&sh).run(s, cfg)?;
        Launch::new(&f2)
            .arg(&out)
            .arg(&labels_out)
            .arg(&images)
            .arg(&labels)
            .arg(&table)
            .arg(&params)
            .arg(&partials)
            .arg(&step)
            .arg(&sh)
            .run(s, cfg)?;
    }
    Ok(())
}

fn opt_addr<T>(s: Option<DevSlice<'_>>, elems: usize, what: &str) -> Result<u64> {
    s.map(|s| s.checked::<T>(elems, what)).transpose().map(|a| a.unwrap_or(0))
}

/// Largest |Δ| that f16 rounding of `v` can cause: half an f16 ulp at `v` (subnormal spacing below 2⁻¹⁴).
pub fn half_ulp_f16(v: f32) -> f32 {
    let a = v.abs().max(f32::MIN_POSITIVE);
    let e = a.log2().floor().max(-14.0);
    2f32.powf(e - 10.0) * 0.5
}

/// The tolerance of the f32 comparison: absolute, on normalized values.
pub const F32_ABS_TOL: f64 = 1e-5;

/// One check case: source side, output side, batch, and how strongly to augment.
struct Case {
    size: u32,
    out: u32,
    batch: usize,
    cfg: AugConfig,
    label: &'static str,
}

/// The `augment` family of `derma check`: the fused kernel against [`augment::apply`] per element, on odd sizes
/// (down- and up-scaling, a strong rotation and crop) and 224→224, resident (a shuffled table over more images
/// than the batch, at a nonzero plan offset) and streamed (no table), in f32 and f16.
pub fn check(gpu: &Gpu, seed: u64) -> Result<Vec<CheckResult>> {
    let strong = AugConfig { degrees: 40.0, scale: (0.3, 1.0), ..AugConfig::default() };
    let cases = [
        Case { size: 37, out: 29, batch: 3, cfg: AugConfig::default(), label: "seed pipeline" },
        Case { size: 23, out: 31, batch: 2, cfg: AugConfig::default(), label: "seed pipeline, upscale" },
        Case { size: 41, out: 17, batch: 3, cfg: strong, label: "rotation 40, crop 0.3-1" },
        Case { size: 224, out: 224, batch: 2, cfg: AugConfig::default(), label: "seed pipeline" },
    ];
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let case_seed = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for resident in [true, false] {
            rows.push(check_case::<f32>(gpu, case, case_seed, resident)?);
            // f16 at 224 once (batch 1 streamed would repeat the resident case's arithmetic).
            if case.size < 224 || resident {
                rows.push(check_case::<f16>(gpu, case, case_seed, resident)?);
            }
        }
    }
    Ok(rows)
}

/// Element types the check reads back.
trait Readback: Elem + Default + Clone {
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
}
impl Readback for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
}
impl Readback for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Pseudo-random bytes for the check's images (splitmix64 of seed and index).
fn image_bytes(seed: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| (crate::data::split_mix(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 56) as u8).collect()
}

fn check_case<T: Readback>(gpu: &Gpu, case: &Case, seed: u64, resident: bool) -> Result<CheckResult> {
    let (side, os, b) = (case.size as usize, case.out as usize, case.batch);
    let per_image = side * side * 3;
    // Resident: 2b+1 images, the batch at positions 1..=b of a plan of 2b+1 positions in shuffled order.
    let (slots, positions, position0) = if resident { (2 * b + 1, 2 * b + 1, 1) } else { (b, b, 0) };
    let host_images = image_bytes(seed, slots * per_image);
    let labels: Vec<i32> = (0..slots as i32).map(|i| (i * 7 + 3) % 9).collect();
    let table: Vec<i32> = (0..positions as i32).map(|p| (p * 5 + 2) % slots as i32).collect();
    let params: Vec<AugParams> =
        (0..positions as u64).map(|p| augment::draw(&case.cfg, seed, 3, p, case.size, case.size)).collect();

    let images_d = gpu.upload(&host_images)?;
    let labels_d = gpu.upload(&labels)?;
    let table_d = gpu.upload(&table)?;
    let params_d = gpu.upload(bytemuck::cast_slice::<AugParams, u8>(&params))?;
    let out_bytes = b * os * os * 3 * size_of::<T>();
    let out_d = fenced(gpu, &vec![0xFFu8; out_bytes])?;
    let labels_out_d = fenced(gpu, bytemuck::cast_slice(&vec![-1i32; b]))?;
    let partials_d: Block = gpu.zeros(partials_bytes(b, os))?;
    let batch = AugmentBatch {
        out: DevSlice::range(&out_d, FENCE, out_bytes)?,
        labels_out: Some(DevSlice::range(&labels_out_d, FENCE, b * size_of::<i32>())?),
        images: DevSlice::of(&images_d),
        labels: Some(DevSlice::of(&labels_d)),
        table: resident.then(|| DevSlice::of(&table_d)),
        params: DevSlice::of(&params_d),
        step: None,
        partials: DevSlice::of(&partials_d),
        shape: AugShape {
            position0: position0 as i64,
            positions: positions as i64,
            slots: slots as i64,
            batch: b as i32,
            size: case.size as i32,
            out_size: case.out as i32,
            pad_: 0,
        },
    };
    augment::<T>(&gpu.kernels, &gpu.stream, &batch).context("augment launch")?;
    let mut got = vec![T::default(); b * os * os * 3];
    gpu.read(&out_d, FENCE, &mut got)?;
    let got: Vec<f32> = got.into_iter().map(T::to_f32).collect();
    let mut got_labels = vec![0i32; b];
    gpu.read(&labels_out_d, FENCE, &mut got_labels)?;
    let outside = outside_writes(gpu, &out_d, out_bytes)? + outside_writes(gpu, &labels_out_d, b * size_of::<i32>())?;

    let mut want = vec![0f32; b * os * os * 3];
    let mut want_labels = Vec::with_capacity(b);
    for (k, chunk) in want.chunks_exact_mut(os * os * 3).enumerate() {
        let p = position0 + k;
        let slot = if resident { table[p] as usize } else { k };
        augment::apply(&host_images[slot * per_image..(slot + 1) * per_image], case.size, case.out, &params[p], chunk)?;
        want_labels.push(labels[slot]);
    }
    let shape = format!(
        "{}, S={} -> {}, batch {b}, {}",
        case.label,
        case.size,
        case.out,
        if resident { "resident, shuffled table" } else { "streamed" }
    );
    Ok(judge_augment(T::DTYPE, &shape, &got, &want, got_labels == want_labels, outside))
}

/// `init` between two runs of canary bytes ([`FENCE`] each side), as the other families' outputs are: the kernel
/// gets only the middle, so a write past either end changes a canary. The image output is initialised to all-ones
/// bytes (a NaN in f32 and f16), so an element the kernel does not write fails the comparison.
fn fenced(gpu: &Gpu, init: &[u8]) -> Result<Block> {
    let block = gpu.zeros(init.len() + 2 * FENCE)?;
    gpu.write(&block, 0, &[CANARY; FENCE])?;
    gpu.write(&block, FENCE, init)?;
    gpu.write(&block, FENCE + init.len(), &[CANARY; FENCE])?;
    Ok(block)
}

/// Canary bytes around a [`fenced`] buffer of `len` bytes that no longer hold [`CANARY`].
fn outside_writes(gpu: &Gpu, block: &Block, len: usize) -> Result<usize> {
    let (mut before, mut after) = ([0u8; FENCE], [0u8; FENCE]);
    gpu.read(block, 0, &mut before)?;
    gpu.read(block, FENCE + len, &mut after)?;
    Ok(before.iter().chain(&after).filter(|&&c| c != CANARY).count())
}

/// One result row. f32: pass when every |Δ| ≤ 1e-5; the row's `rel` is `max|Δ| / max|ref|` and `tol` the same
/// bound divided by `max|ref|`. f16: pass when every |Δ| ≤ half an f16 ulp of the reference + 1e-5; the row's
/// `rel` is the worst |Δ| in units of that bound, `tol` 1. Either fails on a NaN or a wrong label.
fn judge_augment(dtype: Dtype, shape: &str, got: &[f32], want: &[f32], labels_ok: bool, outside: usize) -> CheckResult {
    let mut max_abs = 0f64;
    let mut max_ref = 0f64;
    let mut worst_units = 0f64;
    let mut finite = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            finite = false;
            break;
        }
        let d = (f64::from(g) - f64::from(w)).abs();
        max_abs = max_abs.max(d);
        max_ref = max_ref.max(f64::from(w).abs());
        worst_units = worst_units.max(d / (f64::from(half_ulp_f16(w)) + F32_ABS_TOL));
    }
    let (op, rel, tol) = match dtype {
        Dtype::F32 => ("augment f32 (|d| <= 1e-5)", max_abs / max_ref.max(1e-30), F32_ABS_TOL / max_ref.max(1e-30)),
        _ => ("augment f16 (|d| in half-ulp+1e-5 units)", worst_units, 1.0),
    };
    let pass = finite && labels_ok && rel <= tol && outside == 0;
    CheckResult {
        family: Family::Augment,
        op: if labels_ok { op.to_string() } else { format!("{op}, LABELS WRONG") },
        dtype,
        shape: shape.to_string(),
        max_abs_err: if finite { max_abs } else { f64::INFINITY },
        rel_err: if finite { rel } else { f64::INFINITY },
        tol,
        // Both bounds above are per element already: the worst element in units of its bound.
        elem_err: if finite {
            match dtype {
                Dtype::F32 => max_abs / F32_ABS_TOL,
                _ => worst_units,
            }
        } else {
            f64::INFINITY
        },
        outside_writes: outside,
        pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_the_cu_layout() {
        assert_eq!(size_of::<AugShape>(), 40);
        assert_eq!(std::mem::offset_of!(AugShape, batch), 24);
        assert_eq!(std::mem::offset_of!(AugShape, out_size), 32);
    }

    #[test]
    fn half_ulp_matches_f16_spacing() {
        for v in [1.0f32, 1.5, 2.0, -2.5, 0.1, 1e-6, 65504.0] {
            let h = f16::from_f32(v);
            let next = f16::from_bits(h.to_bits() + 1).to_f32();
            let spacing = (next - h.to_f32()).abs();
            assert!((half_ulp_f16(h.to_f32()) - spacing / 2.0).abs() <= spacing * 1e-3, "{v}");
        }
    }

    #[test]
    fn judge_rejects_nan_offsets_and_wrong_labels() {
        let want = vec![0.5f32, -1.0, 2.0];
        assert!(judge_augment(Dtype::F32, "", &want, &want, true, 0).pass);
        let mut off = want.clone();
        off[2] += 2e-5;
        assert!(!judge_augment(Dtype::F32, "", &off, &want, true, 0).pass);
        off[2] = f32::NAN;
        assert!(!judge_augment(Dtype::F32, "", &off, &want, true, 0).pass);
        assert!(!judge_augment(Dtype::F32, "", &want, &want, false, 0).pass);
        assert!(!judge_augment(Dtype::F32, "", &want, &want, true, 1).pass, "a changed canary fails the row");
        let rounded: Vec<f32> = want.iter().map(|&v| f16::from_f32(v + 1e-4).to_f32()).collect();
        assert!(judge_augment(Dtype::F16, "", &rounded, &want, true, 0).pass);
        let far: Vec<f32> = want.iter().map(|&v| v + 0.01).collect();
        assert!(!judge_augment(Dtype::F16, "", &far, &want, true, 0).pass);
    }
}
