//! The element trait of the CPU reference backend: `f32` for training, `f64` for gradient checks.

use num_traits::Float as NumFloat;

/// A float the reference backend computes in.
pub trait Float:
    NumFloat
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + std::iter::Sum
    + 'static
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
{
    fn of_f64(v: f64) -> Self;
    fn as_f64(self) -> f64;
    /// `eˣ` for the activations. f64 keeps the exact libm `exp` (gradient checks compare against finite
    /// differences); f32 uses [`exp_f32`], which the compiler can vectorize (libm's `expf` is a call per element).
    fn exp_act(self) -> Self;
    /// `C ← α·op(A)·op(B) + β·C` with explicit row/column strides (matrixmultiply's contract).
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping (for C) matrices of the given sizes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Float for f32 {
    fn of_f64(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_act(self) -> Self {
        exp_f32(self)
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded contract of this function.
        unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

impl Float for f64 {
    fn of_f64(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_act(self) -> Self {
        self.exp()
    }
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded contract of this function.
        unsafe { matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

/// `eˣ` in f32 within about 1 ulp, branch-free so loops over it vectorize.
///
/// `x = n·ln 2 + r` with `n` an integer and `|r| ≤ ln 2 / 2`; `eʳ` is its Taylor polynomial to degree 7 (truncation
/// below 1e-8 relative) and `2ⁿ` is built in the exponent bits. Inputs are clamped to [-87, 88], where `eˣ` stays a
/// normal f32 (the activations saturate long before); NaN passes through.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    // ln 2 split in two so that n·LN2_HI is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = k - SHIFTER;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    let er = (p * r) * r + r + 1.0;
    // The bits of k are those of SHIFTER plus n; n + 127 shifted into the exponent field is 2ⁿ.
    let two_n = f32::from_bits(k.to_bits().wrapping_sub(SHIFTER.to_bits() - 127) << 23);
    er * two_n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_libm_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            let ulps = a.to_bits().abs_diff(b.to_bits());
            assert!(ulps <= 2, "exp({x}): {a} vs libm {b} ({ulps} ulp)");
            worst = worst.max(ulps);
            x += 0.000_731;
        }
        assert!(worst >= 1, "the loop really compared values");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), (-87.0f32).exp_act());
        assert_eq!(exp_f32(1000.0), 88.0f32.exp_act());
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
