//! Row-major GEMM on slices through `matrixmultiply` (packed, SIMD, threaded).

use crate::tensor::Float;

/// `C[m,n] = α·op(A)·op(B) + β·C`, all row-major. `op(A)` is `[m,k]`: A is stored `[m,k]`, or `[k,m]` when
/// `trans_a`; likewise `op(B)` is `[k,n]`, stored `[k,n]` or `[n,k]` when `trans_b`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    beta: T,
    c: &mut [T],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: buffers smaller than the dims");
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above guarantee each buffer covers the strided matrix; C is uniquely borrowed.
    unsafe {
        T::gemm_raw(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_transposes_match_naive() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64).sin()).collect();
        let naive = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f64>();
        let at: Vec<f64> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let bt: Vec<f64> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![1.0; m * n];
            let aa = if ta { &at } else { &a };
            let bb = if tb { &bt } else { &b };
            gemm(m, k, n, 2.0, aa, ta, bb, tb, 0.5, &mut c);
            for i in 0..m {
                for j in 0..n {
                    assert!((c[i * n + j] - (2.0 * naive(i, j) + 0.5)).abs() < 1e-12);
                }
            }
        }
    }
}
