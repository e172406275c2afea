//! Training augmentation with the seed's parameters and torchvision's (v1, PIL-input) semantics, split in two:
//!
//! - [`draw`]: the random part. It draws an [`AugParams`] (plain numbers, `#[repr(C)]`, `Pod`) for one sample
//!   from a PCG seeded by a hash of `(seed, epoch, position)`, so the parameters of a sample are a pure function
//!   of those three numbers: worker threads and resumed runs see identical values.
//! - [`apply`]: the deterministic part. One function from a u8 HWC image and an `AugParams` to a normalized f32
//!   HWC image. It is the CPU reference a fused GPU kernel is checked against, so it is written per output pixel:
//!
//!   1. geometry: output pixel → separable bilinear resize weights over the crop (PIL's filter, support scaled
//!      by the shrink factor) → crop offset → inverse rotation (nearest, about the image centre, fill 0) →
//!      horizontal flip → source pixel;
//!   2. colour: brightness, contrast, saturation, hue in the drawn order on values in [0, 1]. Contrast blends
//!      with the mean grey level of the whole image as it is just before contrast: the one reduction in the
//!      pipeline. So the colour work is split at contrast: the operations before it run per pixel while the
//!      mean is summed, contrast and the rest run in a second per-pixel pass (on a GPU: two kernels, or one
//!      with a grid-wide reduction);
//!   3. `(v − mean) / std` with ImageNet's statistics;
//!   4. Gaussian noise `noise_std · noise_at(noise_seed, i)` for element `i` of the output, from a
//!      counter-based generator ([`noise_at`]) so any element's noise can be recomputed independently.
//!
//! The fused GPU kernel (kernels/augment.cu) repeats this arithmetic operation for operation (same order, no
//! fused multiply-adds), which is why the mean grey level is summed in fixed point and the noise uses portable
//! `ln`/`sin`/`cos`: with those, the kernel's f32 output equals this function's bit for bit.
//!
//! Deliberate differences from PIL, none of which changes what an operation means: values stay in f32 between
//! operations (PIL rounds to u8 after the resize and after every colour operation), and the colour operations
//! follow torchvision's tensor formulas (clamp to [0, 1] after each blend). Grey is `0.299 R + 0.587 G + 0.114 B`.

use super::split_mix;
use anyhow::{Result, bail};
use bytemuck::{Pod, Zeroable};
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_pcg::Pcg64;

/// ImageNet channel means (RGB) used by `Normalize`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB) used by `Normalize`.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Colour operation codes used in [`AugParams::order`].
pub const OP_BRIGHTNESS: u32 = 0;
/// Contrast: blend with the image's mean grey level.
pub const OP_CONTRAST: u32 = 1;
/// Saturation: blend with the pixel's grey level.
pub const OP_SATURATION: u32 = 2;
/// Hue: shift H in HSV space.
pub const OP_HUE: u32 = 3;

/// Ranges the parameters are drawn from; [`Default`] is the seed notebook's pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct AugConfig {
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Rotation angle is uniform in `[-degrees, degrees]`.
    pub degrees: f64,
    /// RandomResizedCrop area fraction range.
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect ratio (w/h) range.
    pub ratio: (f64, f64),
    /// Brightness factor is uniform in `[1 − b, 1 + b]`.
    pub brightness: f64,
    /// Contrast factor is uniform in `[1 − c, 1 + c]`.
    pub contrast: f64,
    /// Saturation factor is uniform in `[1 − s, 1 + s]`.
    pub saturation: f64,
    /// Hue shift (fraction of a turn) is uniform in `[−h, h]`.
    pub hue: f64,
    /// Standard deviation of the Gaussian noise added after normalization.
    pub noise_std: f32,
}

impl Default for AugConfig {
    fn default() -> Self {
        AugConfig {
            flip_p: 0.3,
            degrees: 3.0,
            scale: (0.92, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            brightness: 0.05,
            contrast: 0.05,
            saturation: 0.05,
            hue: 0.05,
            noise_std: 0.02,
        }
    }
}

/// The drawn numbers of one sample's augmentation: everything [`apply`] needs, as plain data (80 bytes, no
/// implicit padding) so arrays of it can be copied to a GPU as they are.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct AugParams {
    /// Seed of the counter-based noise generator ([`noise_at`]).
    pub noise_seed: u64,
    /// 1 = flip horizontally (first), 0 = not.
    pub flip: u32,
    /// Rotation angle in degrees, counter-clockwise.
    pub angle_deg: f32,
    /// `cos(angle)`, computed once on the host so every implementation uses the same value.
    pub cos_a: f32,
    /// `sin(angle)`, likewise.
    pub sin_a: f32,
    /// Crop box in the rotated image: top row.
    pub crop_top: u32,
    /// Crop box: left column.
    pub crop_left: u32,
    /// Crop box: height.
    pub crop_h: u32,
    /// Crop box: width.
    pub crop_w: u32,
    /// Brightness factor (1 = unchanged).
    pub brightness: f32,
    /// Contrast factor (1 = unchanged).
    pub contrast: f32,
    /// Saturation factor (1 = unchanged).
    pub saturation: f32,
    /// Hue shift in turns (0 = unchanged).
    pub hue: f32,
    /// Colour operations in application order ([`OP_BRIGHTNESS`] …); a permutation of 0..4.
    pub order: [u32; 4],
    /// Standard deviation of the added noise (0 = none).
    pub noise_std: f32,
    /// Padding to a multiple of 8 bytes; always 0.
    pub _pad: u32,
}

impl AugParams {
    /// Parameters that change nothing for a `size`×`size` source: no flip, no rotation, the full crop, neutral
    /// colour factors, no noise. `apply` with these and `out_size == size` equals [`normalize_eval`].
    pub fn identity(size: u32) -> Self {
        AugParams {
            noise_seed: 0,
            flip: 0,
            angle_deg: 0.0,
            cos_a: 1.0,
            sin_a: 0.0,
            crop_top: 0,
            crop_left: 0,
            crop_h: size,
            crop_w: size,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
            order: [0, 1, 2, 3],
            noise_std: 0.0,
            _pad: 0,
        }
    }

    /// Sets the rotation angle together with its cosine and sine.
    pub fn set_angle(&mut self, degrees: f64) {
        self.angle_deg = degrees as f32;
        let r = degrees.to_radians();
        self.cos_a = r.cos() as f32;
        self.sin_a = r.sin() as f32;
    }
}

/// The generator for sample `position` of `epoch`: a PCG seeded from a hash of the three numbers.
pub fn sample_rng(seed: u64, epoch: u64, position: u64) -> Pcg64 {
    Pcg64::seed_from_u64(split_mix(split_mix(split_mix(seed) ^ epoch) ^ position))
}

/// Draws the augmentation of sample `position` in `epoch` for a `src_h`×`src_w` image: a pure function of its
/// arguments.
pub fn draw(cfg: &AugConfig, seed: u64, epoch: u64, position: u64, src_h: u32, src_w: u32) -> AugParams {
    draw_with(&mut sample_rng(seed, epoch, position), cfg, src_h, src_w)
}

fn uniform<R: Rng>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Draws parameters from `rng` (see [`draw`] for the reproducible entry point).
pub fn draw_with<R: Rng>(rng: &mut R, cfg: &AugConfig, src_h: u32, src_w: u32) -> AugParams {
    let mut p = AugParams::identity(0);
    p.flip = u32::from(rng.random::<f64>() < cfg.flip_p);
    p.set_angle(uniform(rng, -cfg.degrees, cfg.degrees));
    let (top, left, h, w) = random_resized_crop(rng, src_h, src_w, cfg.scale, cfg.ratio);
    (p.crop_top, p.crop_left, p.crop_h, p.crop_w) = (top, left, h, w);
    p.order.shuffle(rng);
    let factor = |rng: &mut R, a: f64| if a > 0.0 { uniform(rng, 1.0 - a, 1.0 + a) as f32 } else { 1.0 };
    p.brightness = factor(rng, cfg.brightness);
    p.contrast = factor(rng, cfg.contrast);
    p.saturation = factor(rng, cfg.saturation);
    p.hue = if cfg.hue > 0.0 { uniform(rng, -cfg.hue, cfg.hue) as f32 } else { 0.0 };
    p.noise_std = cfg.noise_std;
    p.noise_seed = rng.next_u64();
    p
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 attempts at a box with area fraction in `scale` and
/// aspect ratio (log-uniform) in `ratio`, else a centred box with the ratio clamped into range. Returns
/// `(top, left, h, w)`.
pub fn random_resized_crop<R: Rng>(
    rng: &mut R,
    height: u32,
    width: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> (u32, u32, u32, u32) {
    let area = f64::from(height) * f64::from(width);
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even();
        let h = (target / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio.0 {
        (width, (f64::from(width) / ratio.0).round_ties_even() as u32)
    } else if in_ratio > ratio.1 {
        ((f64::from(height) * ratio.1).round_ties_even() as u32, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Separable resampling weights for one axis: output index `o` reads inputs `start[o] .. start[o] + taps`
/// with weights `w[o·taps ..]` (trailing weights are 0).
///
/// PIL's bilinear `resample`: centre `(o + 0.5)·scale`, triangle filter with support `max(scale, 1)`,
/// weights normalized to sum 1, window clipped to the input.
#[derive(Clone, Debug)]
pub struct AxisWeights {
    /// First input index per output index.
    pub start: Vec<u32>,
    /// Weight slots per output index (the stride of `w`).
    pub taps: usize,
    /// Inputs actually read per output index (`≤ taps`).
    pub count: Vec<u32>,
    /// `out · taps` weights.
    pub w: Vec<f32>,
}

impl AxisWeights {
    /// Weights to resize `in_len` inputs to `out_len` outputs.
    pub fn new(in_len: usize, out_len: usize) -> Self {
        let scale = in_len as f64 / out_len as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale;
        let taps = (support.ceil() as usize) * 2 + 1;
        let mut start = Vec::with_capacity(out_len);
        let mut count = Vec::with_capacity(out_len);
        let mut w = vec![0f32; out_len * taps];
        for o in 0..out_len {
            let center = (o as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, as in PIL.
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_len as i64).max(xmin as i64) as usize;
            let mut ws: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = ws.iter().sum();
            if total > 0.0 {
                ws.iter_mut().for_each(|v| *v /= total);
            }
            for (k, v) in ws.iter().take(taps).enumerate() {
                w[o * taps + k] = *v as f32;
            }
            start.push(xmin as u32);
            count.push(ws.len().min(taps) as u32);
        }
        AxisWeights { start, taps, count, w }
    }
}

/// Grey level of an RGB value.
#[inline]
pub fn gray(p: [f32; 3]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// `clamp(b + f·(a − b), 0, 1)` per channel.
#[inline]
fn blend(a: [f32; 3], b: [f32; 3], f: f32) -> [f32; 3] {
    [0, 1, 2].map(|c| (b[c] + f * (a[c] - b[c])).clamp(0.0, 1.0))
}

/// Brightness: blend with black.
#[inline]
pub fn adjust_brightness(p: [f32; 3], f: f32) -> [f32; 3] {
    blend(p, [0.0; 3], f)
}

/// Contrast: blend with the image's mean grey level `mean`.
#[inline]
pub fn adjust_contrast(p: [f32; 3], f: f32, mean: f32) -> [f32; 3] {
    blend(p, [mean; 3], f)
}

/// Saturation: blend with the pixel's grey level.
#[inline]
pub fn adjust_saturation(p: [f32; 3], f: f32) -> [f32; 3] {
    blend(p, [gray(p); 3], f)
}

/// `floor(x)` for |x| < 2³¹ without a libm call (the baseline x86-64 target has no rounding instruction).
#[inline]
fn floor_small(x: f32) -> f32 {
    let t = x as i32 as f32;
    if t > x { t - 1.0 } else { t }
}

/// Hue: RGB → HSV, `h ← (h + shift) mod 1`, HSV → RGB (torchvision's tensor formulas).
pub fn adjust_hue(p: [f32; 3], shift: f32) -> [f32; 3] {
    let [r, g, b] = p;
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let cr = maxc - minc;
    if cr == 0.0 {
        return p; // grey: hue undefined, unchanged
    }
    let s = cr / maxc;
    let inv = 1.0 / cr;
    let (rc, gc, bc) = ((maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // torchvision: h = fmod(h/6 + 1, 1), then (h + shift) mod 1. h/6 is in [−1/6, 5/6), so one conditional add
    // and one floor do it without fmod.
    let mut h = h * (1.0 / 6.0);
    if h < 0.0 {
        h += 1.0;
    }
    let h = h + shift;
    let h = h - floor_small(h);
    let v = maxc;
    let h6 = h * 6.0;
    // h6 is in [0, 6]: truncation is the floor.
    let i = (h6 as i32).min(5);
    let f = h6 - i as f32;
    let pp = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => [v, t, pp],
        1 => [q, v, pp],
        2 => [pp, v, t],
        3 => [pp, q, v],
        4 => [t, pp, v],
        _ => [v, pp, q],
    }
}

/// Gaussian noise N(0, 1) for element `i` under `seed`: element pair `i/2` hashes (SplitMix64) to two 24-bit
/// uniforms, Box–Muller turns them into two normals, the even element takes the cosine one, the odd the sine
/// one. The logarithm, sine and cosine are [`portable_ln`] and [`portable_sin_cos`]: only correctly rounded
/// `+ − × ÷ √` in a fixed order, so the fused GPU kernel (kernels/augment.cu) reproduces every value bit for bit,
/// which libm's and CUDA's `logf`/`sinf` (different, not correctly rounded implementations) would not.
#[inline]
pub fn noise_at(seed: u64, i: u64) -> f32 {
    let (a, b) = noise_pair(seed, i >> 1);
    if i & 1 == 0 { a } else { b }
}

/// The two normals of element pair `pair` (elements `2·pair` and `2·pair + 1`), see [`noise_at`].
#[inline]
pub fn noise_pair(seed: u64, pair: u64) -> (f32, f32) {
    let h1 = split_mix(seed ^ split_mix(pair));
    let h2 = split_mix(h1 ^ 0xA076_1D64_78BD_642F);
    let u1 = ((h1 >> 40) as f32 + 1.0) * (1.0 / 16_777_216.0); // (0, 1]
    let r = (-2.0 * portable_ln(u1)).sqrt();
    // The angle is 2π·k/2²⁴ with k the top 24 bits of h2.
    let (sin, cos) = portable_sin_cos((h2 >> 40) as u32);
    (r * cos, r * sin)
}

/// Natural logarithm of a positive normal f32 from IEEE operations only (error a few ulp): `x = m·2^e` with
/// `m ∈ [√½, √2)`, then `ln m = 2·atanh(s)`, `s = (m − 1)/(m + 1)`, as an odd series in `s` to `s¹¹`.
#[inline]
pub fn portable_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5; // exact
        e += 1;
    }
    let f = m - 1.0; // exact (Sterbenz)
    let s = f / (2.0 + f);
    let z = s * s;
    let series = z * (0.333_333_34 + z * (0.2 + z * (0.142_857_15 + z * (0.111_111_11 + z * 0.090_909_09))));
    let ln_m = (s + s * series) * 2.0;
    e as f32 * std::f32::consts::LN_2 + ln_m
}

/// `(sin θ, cos θ)` for `θ = 2π·k/2²⁴` (`k < 2²⁴`) from IEEE operations only: the quadrant comes from `k`'s bits
/// (exact reduction), the rest `|x| ≤ π/4` goes through Taylor polynomials to `x⁹` and `x⁸`.
#[inline]
pub fn portable_sin_cos(k: u32) -> (f32, f32) {
    let shifted = (k & 0x00ff_ffff) + (1 << 21); // nearest quadrant
    let quadrant = (shifted >> 22) & 3;
    let r = (shifted & ((1 << 22) - 1)) as i32 - (1 << 21); // [−2²¹, 2²¹)
    let x = r as f32 * (std::f32::consts::TAU / 16_777_216.0);
    let z = x * x;
    let s = x + x * (z * (-0.166_666_67 + z * (0.008_333_334 + z * (-0.000_198_412_7 + z * 2.755_731_9e-6))));
    let c = 1.0 + z * (-0.5 + z * (0.041_666_668 + z * (-0.001_388_888_9 + z * 2.480_158_7e-5)));
    match quadrant {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// Fixed-point scale of the contrast mean's per-pixel grey levels: 2⁴⁰, so a sum over up to 2²³ pixels in
/// [0, 1] fits a u64 and integer addition makes the sum independent of the order (and grouping) of the pixels.
pub const GREY_FIXED_SCALE: f64 = 1_099_511_627_776.0;

/// A grey level in [0, 1] as the fixed-point integer the contrast mean sums (truncated).
#[inline]
pub fn grey_fixed(g: f32) -> u64 {
    (f64::from(g) * GREY_FIXED_SCALE) as u64
}

/// The contrast mean from the fixed-point sum of `pixels` grey levels.
#[inline]
pub fn grey_mean(sum: u64, pixels: u64) -> f32 {
    (sum as f64 / GREY_FIXED_SCALE / pixels as f64) as f32
}

/// Source pixel (row, column) read for rotated-image pixel `(ry, rx)`, or `None` where the rotation uncovers
/// the image (filled with 0). PIL's `rotate`: inverse-map the pixel centre about `(W/2, H/2)`, floor.
#[inline]
pub fn rotate_source(p: &AugParams, ry: u32, rx: u32, h: u32, w: u32) -> Option<(u32, u32)> {
    let (cx, cy) = (w as f32 * 0.5, h as f32 * 0.5);
    let (dx, dy) = (rx as f32 + 0.5 - cx, ry as f32 + 0.5 - cy);
    let xin = p.cos_a * dx - p.sin_a * dy + cx;
    let yin = p.sin_a * dx + p.cos_a * dy + cy;
    if !(xin >= 0.0 && yin >= 0.0) {
        return None;
    }
    let (x, y) = (xin as u32, yin as u32);
    if x >= w || y >= h {
        return None;
    }
    // The flip came first, so undo it last.
    Some((y, if p.flip != 0 { w - 1 - x } else { x }))
}

/// Normalizes a cached u8 HWC image into `out` (same length): `(v/255 − mean)/std` per channel.
pub fn normalize_eval(src: &[u8], out: &mut [f32]) -> Result<()> {
    if src.len() != out.len() || !src.len().is_multiple_of(3) {
        bail!(
            "normalize_eval: source has {} bytes, output {} floats (want equal, a multiple of 3)",
            src.len(),
            out.len()
        );
    }
    for (o, s) in out.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
        for c in 0..3 {
            o[c] = (f32::from(s[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Ok(())
}

/// Applies the colour operations `ops` (codes from [`AugParams::order`]) to one pixel; contrast uses `mean`.
#[inline]
fn color_ops(mut px: [f32; 3], ops: &[u32], p: &AugParams, mean: f32) -> [f32; 3] {
    for &op in ops {
        px = match op {
            OP_BRIGHTNESS => adjust_brightness(px, p.brightness),
            OP_CONTRAST => adjust_contrast(px, p.contrast, mean),
            OP_SATURATION => adjust_saturation(px, p.saturation),
            _ => adjust_hue(px, p.hue),
        };
    }
    px
}

/// The training augmentation of one image: `src` is u8 HWC RGB `size`×`size`, `out` receives
/// `out_size·out_size·3` normalized f32 values (HWC). See the module docs for the pipeline.
pub fn apply(src: &[u8], size: u32, out_size: u32, p: &AugParams, out: &mut [f32]) -> Result<()> {
    let (s, os) = (size as usize, out_size as usize);
    if src.len() != s * s * 3 || out.len() != os * os * 3 || os == 0 {
        bail!(
            "augment::apply: source has {} bytes for side {size}, output {} floats for side {out_size}",
            src.len(),
            out.len()
        );
    }
    let (top, left, ch, cw) = (p.crop_top, p.crop_left, p.crop_h, p.crop_w);
    if ch == 0 || cw == 0 || top + ch > size || left + cw > size || p.order.iter().any(|&o| o > 3) {
        bail!("augment::apply: crop {top},{left} {ch}x{cw} does not fit a {size}x{size} image, or bad op order");
    }
    let wy = AxisWeights::new(ch as usize, os);
    let wx = AxisWeights::new(cw as usize, os);

    // 1. Geometry, per output pixel; `out` holds RGB in [0, 1] until step 3.
    for oy in 0..os {
        for ox in 0..os {
            let mut acc = [0f32; 3];
            for ky in 0..wy.count[oy] as usize {
                let fy = wy.w[oy * wy.taps + ky];
                if fy == 0.0 {
                    continue;
                }
                let ry = top + wy.start[oy] + ky as u32;
                for kx in 0..wx.count[ox] as usize {
                    let fx = wx.w[ox * wx.taps + kx];
                    if fx == 0.0 {
                        continue;
                    }
                    let rx = left + wx.start[ox] + kx as u32;
                    if let Some((sy, sx)) = rotate_source(p, ry, rx, size, size) {
                        let i = (sy as usize * s + sx as usize) * 3;
                        for c in 0..3 {
                            acc[c] += fy * fx * f32::from(src[i + c]);
                        }
                    }
                }
            }
            let o = (oy * os + ox) * 3;
            for c in 0..3 {
                out[o + c] = (acc[c] / 255.0).clamp(0.0, 1.0);
            }
        }
    }

    // 2. The colour operations before contrast, in place, and the contrast mean: the grey level of the image
    //    after them.
    let k = p.order.iter().position(|&o| o == OP_CONTRAST).unwrap_or(4);
    //    Summed in fixed point ([`grey_fixed`]): exact integer addition, so a GPU's parallel reduction gives the
    //    same mean.
    let mut sum = 0u64;
    for px in out.chunks_exact_mut(3) {
        let v = color_ops([px[0], px[1], px[2]], &p.order[..k], p, 0.0);
        px.copy_from_slice(&v);
        sum = sum.wrapping_add(grey_fixed(gray(v)));
    }
    let mean = grey_mean(sum, (os * os) as u64);

    // 3. Contrast and the operations after it, then normalize.
    for px in out.chunks_exact_mut(3) {
        let v = color_ops([px[0], px[1], px[2]], &p.order[k..], p, mean);
        for c in 0..3 {
            px[c] = (v[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }

    // 4. Noise: element i gets noise_std · noise_at(noise_seed, i), computed two elements at a time.
    if p.noise_std != 0.0 {
        let mut pairs = out.chunks_exact_mut(2);
        for (k, pair) in (&mut pairs).enumerate() {
            let (a, b) = noise_pair(p.noise_seed, k as u64);
            pair[0] += p.noise_std * a;
            pair[1] += p.noise_std * b;
        }
        let n = out.len();
        if n % 2 == 1 {
            out[n - 1] += p.noise_std * noise_at(p.noise_seed, (n - 1) as u64);
        }
    }
    Ok(())
}

pub mod cuda;

#[cfg(test)]
mod tests;
