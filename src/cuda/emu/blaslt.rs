//! cuBLASLt's `cublasLtMatmul` on the emulated device: D = alpha · op(A) · op(B) + beta · C over column-major
//! matrices, in plain loops, taking the same descriptor values the real call gets (cuBLASLt's own enums, layouts
//! of rows / columns / leading dimension, transposes, alpha and beta as f32 host scalars, alignment preferences).
//!
//! Semantics emulated, as cuBLASLt documents them:
//! - Layouts are column-major (`CUBLASLT_ORDER_COL`): element (i, j) of a layout sits at `i + j·ld`, and
//!   `ld >= rows`. op(A) is m×k, op(B) k×n, C and D m×n; a transposed operand's layout is the stored k×m (n×k).
//! - `beta == 0` means C is not read (it may hold NaN). C and D may be the same memory (in place) but A and B must
//!   not overlap D.
//! - Type combinations: A, B, C, D all `CUDA_R_32F` with `CUBLAS_COMPUTE_32F` or `CUBLAS_COMPUTE_32F_FAST_TF32`;
//!   A, B `CUDA_R_16F` with C, D `CUDA_R_16F` or `CUDA_R_32F` and `CUBLAS_COMPUTE_32F`. Anything else is refused, as
//!   the real heuristic returns no algorithm for it. The scale type (alpha, beta) is always `CUDA_R_32F`.
//! - Products are accumulated in f32 in order of k, then `alpha·acc + beta·C` in f32 is rounded (to nearest even)
//!   to D's type. Under `CUBLAS_COMPUTE_32F_FAST_TF32` every A and B element is first rounded to TF32 (10 mantissa
//!   bits, nearest with ties away from zero, as PTX's `cvt.rna.tf32.f32`): the library *may* use TF32 tensor cores
//!   there, and the emulator models the worst case it allows, so a check tolerance that passes here covers the
//!   real rounding. The real kernels' accumulation order (tiles, split-k) is not modelled.
//! - Alignment: [`heuristic`] returns an algorithm that needs each pointer aligned to the preference's
//!   `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES` (default 256, as cuBLASLt assumes when the preference is unset),
//!   the most a real heuristic is allowed to pick; [`matmul`] fails when a pointer is less aligned than its
//!   algorithm needs, where the real library would fault or refuse. Alignment below the element size is never
//!   allowed.

use anyhow::{Result, bail, ensure};
use cudarc::cublaslt::sys::{cublasComputeType_t as Compute, cudaDataType as DataType};
use half::f16;

/// The alignment cuBLASLt assumes for every pointer when the preference does not say otherwise.
pub const DEFAULT_ALIGNMENT: u32 = 256;

/// One matrix layout as `cublasLtMatrixLayoutCreate(type, rows, cols, ld)` describes it (column-major, no batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Element type.
    pub dtype: DataType,
    /// Rows.
    pub rows: u64,
    /// Columns.
    pub cols: u64,
    /// Leading dimension (elements between the starts of two columns).
    pub ld: i64,
}

impl Layout {
    /// Elements from the first to one past the last addressed element: `(cols − 1)·ld + rows`.
    pub fn extent(&self) -> usize {
        ((self.cols as usize).saturating_sub(1)) * self.ld as usize + self.rows as usize
    }

    fn check(&self, name: &str) -> Result<()> {
        ensure!(self.rows > 0 && self.cols > 0, "cuBLASLt layout {name}: empty {}x{} matrix", self.rows, self.cols);
        ensure!(
            self.ld >= self.rows as i64,
            "cuBLASLt layout {name}: leading dimension {} is below its {} rows (column-major needs ld >= rows)",
            self.ld,
            self.rows
        );
        Ok(())
    }
}

/// The matmul descriptor: `cublasLtMatmulDescCreate(compute, CUDA_R_32F)` plus the TRANSA / TRANSB attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDesc {
    /// Compute type.
    pub compute: Compute,
    /// Type of alpha and beta.
    pub scale: DataType,
    /// op(A) = Aᵀ.
    pub trans_a: bool,
    /// op(B) = Bᵀ.
    pub trans_b: bool,
}

/// The heuristic's search preferences (`cublasLtMatmulPreferenceSetAttribute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preference {
    /// `CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES`.
    pub max_workspace: usize,
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES`.
    pub min_alignment: [u32; 4],
}

impl Default for Preference {
    fn default() -> Self {
        Self { max_workspace: 0, min_alignment: [DEFAULT_ALIGNMENT; 4] }
    }
}

/// An algorithm the emulated heuristic chose: what it needs from the pointers and the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Algo {
    /// Alignment in bytes each of A, B, C, D must have.
    pub alignment: [u32; 4],
    /// Workspace bytes it needs.
    pub workspace: usize,
}

/// The alignment of `addr` in bytes: its largest power-of-two divisor, capped at 256 (what the preferences take).
pub fn alignment_of(addr: u64) -> u32 {
    if addr == 0 { DEFAULT_ALIGNMENT } else { (1u64 << addr.trailing_zeros().min(8)) as u32 }
}

fn elem_bytes(t: DataType) -> Result<usize> {
    match t {
        DataType::CUDA_R_32F => Ok(4),
        DataType::CUDA_R_16F => Ok(2),
        other => {
            bail!("cuBLASLt emulation: data type {other:?} is not emulated (derma uses CUDA_R_32F and CUDA_R_16F)")
        }
    }
}

/// The full set of descriptors of one call, validated as `cublasLtMatmulAlgoGetHeuristic` would: shapes agree,
/// leading dimensions fit, the type combination is one cuBLASLt supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// The matmul descriptor.
    pub desc: MatmulDesc,
    /// A's layout (k×m when transposed, else m×k).
    pub a: Layout,
    /// B's layout (n×k when transposed, else k×n).
    pub b: Layout,
    /// C's layout (m×n).
    pub c: Layout,
    /// D's layout (m×n).
    pub d: Layout,
}

impl Call {
    /// (m, n, k) after checking that the layouts fit together.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        for (name, l) in [("A", &self.a), ("B", &self.b), ("C", &self.c), ("D", &self.d)] {
            l.check(name)?;
        }
        let (m, k) = if self.desc.trans_a { (self.a.cols, self.a.rows) } else { (self.a.rows, self.a.cols) };
        let (kb, n) = if self.desc.trans_b { (self.b.cols, self.b.rows) } else { (self.b.rows, self.b.cols) };
        ensure!(k == kb, "cuBLASLt: op(A) is {m}x{k} but op(B) is {kb}x{n}: the shared dimension differs");
        for (name, l) in [("C", &self.c), ("D", &self.d)] {
            ensure!(l.rows == m && l.cols == n, "cuBLASLt: {name} is {}x{} but op(A)·op(B) is {m}x{n}", l.rows, l.cols);
        }
        ensure!(
            self.desc.scale == DataType::CUDA_R_32F,
            "cuBLASLt emulation: scale type {:?} is not emulated (alpha and beta are f32)",
            self.desc.scale
        );
        ensure!(
            self.a.dtype == self.b.dtype && self.c.dtype == self.d.dtype,
            "cuBLASLt: A and B ({:?}, {:?}) and C and D ({:?}, {:?}) must have the same types",
            self.a.dtype,
            self.b.dtype,
            self.c.dtype,
            self.d.dtype
        );
        let supported = matches!(
            (self.a.dtype, self.c.dtype, self.desc.compute),
            (DataType::CUDA_R_32F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F)
                | (DataType::CUDA_R_32F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F_FAST_TF32)
                | (DataType::CUDA_R_16F, DataType::CUDA_R_16F, Compute::CUBLAS_COMPUTE_32F)
                | (DataType::CUDA_R_16F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F)
        );
        ensure!(
            supported,
            "cuBLASLt: no algorithm for A/B {:?}, C/D {:?} with compute type {:?}",
            self.a.dtype,
            self.c.dtype,
            self.desc.compute
        );
        Ok((m as usize, n as usize, k as usize))
    }
}

/// `cublasLtMatmulAlgoGetHeuristic`: the algorithm for `call` under `pref`, or the error the real heuristic gives
/// when none fits (CUBLAS_STATUS_NOT_SUPPORTED).
pub fn heuristic(call: &Call, pref: &Preference) -> Result<Algo> {
    call.dims()?;
    let types = [call.a.dtype, call.b.dtype, call.c.dtype, call.d.dtype];
    for ((name, &align), t) in ["A", "B", "C", "D"].iter().zip(&pref.min_alignment).zip(types) {
        let es = elem_bytes(t)? as u32;
        ensure!(
            align.is_power_of_two() && align >= es,
            "cuBLASLt: no algorithm for {name} aligned to {align} bytes (at least its {es}-byte element size, a \
             power of two)"
        );
    }
    // The emulated algorithms need no workspace, and assume exactly the alignment they were allowed to.
    Ok(Algo { alignment: pref.min_alignment.map(|a| a.min(DEFAULT_ALIGNMENT)), workspace: 0 })
}

/// TF32 rounding of an f32: 10 explicit mantissa bits, to nearest with ties away from zero (PTX cvt.rna.tf32.f32).
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
}

/// A read-only operand in host memory.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl Src<'_> {
    fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::CUDA_R_32F,
            Self::F16(_) => DataType::CUDA_R_16F,
        }
    }
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }
    fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
        }
    }
}

/// The output D in host memory.
#[derive(Debug)]
pub enum Dst<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

impl Dst<'_> {
    fn dtype(&self) -> DataType {
        match self {
            Self::F32(_) => DataType::CUDA_R_32F,
            Self::F16(_) => DataType::CUDA_R_16F,
        }
    }
    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }
    fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => v[i].to_f32(),
        }
    }
    fn set(&mut self, i: usize, x: f32) {
        match self {
            Self::F32(v) => v[i] = x,
            Self::F16(v) => v[i] = f16::from_f32(x),
        }
    }
}

/// Where C comes from: its own memory, or D's (in place, C == D).
#[derive(Clone, Copy, Debug)]
pub enum CSource<'a> {
    /// C is separate memory.
    Separate(Src<'a>),
    /// C is D.
    InPlace,
}

/// The matmul itself over host slices (each covering its layout's [`Layout::extent`]). Pure: what
/// [`matmul`] runs after checking pointers, and what the unit tests call.
pub fn matmul_host(call: &Call, alpha: f32, a: Src, b: Src, beta: f32, c: CSource, d: &mut Dst) -> Result<()> {
    let (m, n, k) = call.dims()?;
    let operands = [("A", a.dtype(), a.len(), &call.a), ("B", b.dtype(), b.len(), &call.b)];
    for (name, t, len, l) in operands {
        ensure!(t == l.dtype, "cuBLASLt: {name} holds {t:?} but its layout says {:?}", l.dtype);
        ensure!(len >= l.extent(), "cuBLASLt: {name} has {len} elements, its layout addresses {}", l.extent());
    }
    ensure!(d.dtype() == call.d.dtype, "cuBLASLt: D holds {:?} but its layout says {:?}", d.dtype(), call.d.dtype);
    ensure!(
        d.len() >= call.d.extent(),
        "cuBLASLt: D has {} elements, its layout addresses {}",
        d.len(),
        call.d.extent()
    );
    let c_src = match c {
        CSource::Separate(s) => {
            ensure!(
                s.dtype() == call.c.dtype,
                "cuBLASLt: C holds {:?} but its layout says {:?}",
                s.dtype(),
                call.c.dtype
            );
            ensure!(
                s.len() >= call.c.extent(),
                "cuBLASLt: C has {} elements, its layout addresses {}",
                s.len(),
                call.c.extent()
            );
            Some(s)
        }
        CSource::InPlace => {
            ensure!(call.c == call.d, "cuBLASLt: in place (C == D) needs identical C and D layouts");
            None
        }
    };
    let tf32 = call.desc.compute == Compute::CUBLAS_COMPUTE_32F_FAST_TF32;
    let load = |s: &Src, i: usize| if tf32 { round_tf32(s.get(i)) } else { s.get(i) };
    let a_at =
        |i: usize, p: usize| if call.desc.trans_a { p + i * call.a.ld as usize } else { i + p * call.a.ld as usize };
    let b_at =
        |p: usize, j: usize| if call.desc.trans_b { j + p * call.b.ld as usize } else { p + j * call.b.ld as usize };
    for j in 0..n {
        for i in 0..m {
            let mut acc = 0f32;
            for p in 0..k {
                acc += load(&a, a_at(i, p)) * load(&b, b_at(p, j));
            }
            let mut v = alpha * acc;
            // beta == 0: C is not read, so NaN or garbage there cannot leak into D.
            if beta != 0.0 {
                let prior = match c_src {
                    Some(s) => s.get(i + j * call.c.ld as usize),
                    None => d.get(i + j * call.d.ld as usize),
                };
                v += beta * prior;
            }
            d.set(i + j * call.d.ld as usize, v);
        }
    }
    Ok(())
}

/// Device pointers of one call (device addresses are host addresses on the emulated device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointers {
    /// A.
    pub a: u64,
    /// B.
    pub b: u64,
    /// C.
    pub c: u64,
    /// D.
    pub d: u64,
    /// Workspace (0 when none).
    pub workspace: u64,
    /// Workspace bytes.
    pub workspace_bytes: usize,
}

/// `cublasLtMatmul` on the emulated device.
///
/// # Safety
/// Each of `ptr.a`, `ptr.b`, `ptr.c` (when `beta != 0` and C is not D) addresses host memory readable for its
/// layout's extent of its element type, `ptr.d` host memory writable for D's extent, and nothing else accesses
/// that memory during the call.
pub unsafe fn matmul(call: &Call, algo: &Algo, alpha: f32, beta: f32, ptr: Pointers) -> Result<()> {
    call.dims()?;
    let layouts = [&call.a, &call.b, &call.c, &call.d];
    let addrs = [ptr.a, ptr.b, ptr.c, ptr.d];
    let mut spans = [(0u64, 0u64); 4];
    for (idx, name) in ["A", "B", "C", "D"].into_iter().enumerate() {
        let (addr, need) = (addrs[idx], algo.alignment[idx]);
        ensure!(addr != 0, "cuBLASLt: {name} is a null pointer");
        let have = alignment_of(addr);
        ensure!(
            have >= need,
            "cuBLASLt: {name} at {addr:#x} is {have}-byte aligned, but the algorithm was chosen for {need}-byte \
             alignment (set CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{name}_BYTES from the real pointer)"
        );
        let bytes = layouts[idx].extent() as u64 * elem_bytes(layouts[idx].dtype)? as u64;
        spans[idx] = (addr, addr + bytes);
    }
    ensure!(
        ptr.workspace_bytes >= algo.workspace,
        "cuBLASLt: workspace of {} bytes, the algorithm needs {}",
        ptr.workspace_bytes,
        algo.workspace
    );
    let overlaps = |x: (u64, u64), y: (u64, u64)| x.0 < y.1 && y.0 < x.1;
    for (idx, name) in [(0, "A"), (1, "B")] {
        ensure!(!overlaps(spans[idx], spans[3]), "cuBLASLt: {name} overlaps the output D (only C may be D)");
    }
    let in_place = ptr.c == ptr.d;
    ensure!(
        in_place || !overlaps(spans[2], spans[3]),
        "cuBLASLt: C partly overlaps D (C must be D exactly or separate)"
    );
    // SAFETY: the caller guarantees each pointer covers its layout's extent of its type; alignment to the element
    // size was checked above (the algorithm's alignment is at least the element size); A and B do not overlap D.
    unsafe {
        let src = |addr: u64, l: &Layout| -> Src<'_> {
            match l.dtype {
                DataType::CUDA_R_16F => Src::F16(std::slice::from_raw_parts(addr as *const f16, l.extent())),
                _ => Src::F32(std::slice::from_raw_parts(addr as *const f32, l.extent())),
            }
        };
        let (a, b) = (src(ptr.a, &call.a), src(ptr.b, &call.b));
        let c = if in_place || beta == 0.0 { CSource::InPlace } else { CSource::Separate(src(ptr.c, &call.c)) };
        let mut d = match call.d.dtype {
            DataType::CUDA_R_16F => Dst::F16(std::slice::from_raw_parts_mut(ptr.d as *mut f16, call.d.extent())),
            _ => Dst::F32(std::slice::from_raw_parts_mut(ptr.d as *mut f32, call.d.extent())),
        };
        // With beta == 0 C is never read, so standing in D's layout for it is harmless.
        let call = if matches!(c, CSource::InPlace) { Call { c: call.d, ..*call } } else { *call };
        matmul_host(&call, alpha, a, b, beta, c, &mut d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::gemm;
    use rand::RngExt;

    const U32: f64 = 1.0 / (1u64 << 24) as f64;
    const U_TF32: f64 = 1.0 / (1u64 << 11) as f64;
    const U16: f64 = 1.0 / (1u64 << 11) as f64;

    /// A logical m×k matrix (row-major values) stored column-major, transposed or not, with `pad` spare rows per
    /// column: (storage, layout rows, layout cols, ld).
    fn store(vals: &[f64], rows: usize, cols: usize, trans: bool, pad: usize) -> (Vec<f64>, u64, u64, i64) {
        let (lr, lc) = if trans { (cols, rows) } else { (rows, cols) };
        let ld = lr + pad;
        let mut out = vec![f64::NAN; ld * lc];
        for i in 0..rows {
            for j in 0..cols {
                let (r, c) = if trans { (j, i) } else { (i, j) };
                out[r + c * ld] = vals[i * cols + j];
            }
        }
        (out, lr as u64, lc as u64, ld as i64)
    }

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        pad: usize,
        alpha: f32,
        beta: f32,
    }

    /// Runs one case in f32 or f16 (with f16 or f32 output) and checks every element of D against ops::gemm in
    /// f64 on the same (rounded) inputs, with a per-element bound from the sum of |terms|.
    fn run(rng: &mut rand_pcg::Pcg64, cs: &Case, ab: DataType, cd: DataType, compute: Compute) {
        let Case { m, n, k, ta, tb, pad, alpha, beta } = *cs;
        let round =
            |t: DataType, v: f64| if t == DataType::CUDA_R_16F { f16::from_f64(v).to_f64() } else { v as f32 as f64 };
        let a: Vec<f64> = (0..m * k).map(|_| round(ab, rng.random_range(-1.0..1.0))).collect();
        let b: Vec<f64> = (0..k * n).map(|_| round(ab, rng.random_range(-1.0..1.0))).collect();
        let c: Vec<f64> = (0..m * n).map(|_| round(cd, rng.random_range(-1.0..1.0))).collect();
        let (sa, ar, ac, lda) = store(&a, m, k, ta, pad);
        let (sb, br, bc, ldb) = store(&b, k, n, tb, pad + 1);
        let (sc, cr, cc, ldc) = store(&c, m, n, false, pad);
        let call = Call {
            desc: MatmulDesc { compute, scale: DataType::CUDA_R_32F, trans_a: ta, trans_b: tb },
            a: Layout { dtype: ab, rows: ar, cols: ac, ld: lda },
            b: Layout { dtype: ab, rows: br, cols: bc, ld: ldb },
            c: Layout { dtype: cd, rows: cr, cols: cc, ld: ldc },
            d: Layout { dtype: cd, rows: cr, cols: cc, ld: ldc },
        };
        let tf32 = compute == Compute::CUBLAS_COMPUTE_32F_FAST_TF32;
        // Reference on what the math sees: TF32-rounded inputs under FAST_TF32.
        let seen =
            |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| if tf32 { round_tf32(x as f32) as f64 } else { x }).collect() };
        let mut want = c.clone();
        gemm(m, k, n, alpha as f64, &seen(&a), false, &seen(&b), false, beta as f64, &mut want);
        let mut exact = c.clone();
        gemm(m, k, n, alpha as f64, &a, false, &b, false, beta as f64, &mut exact);
        let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
        let mut bound = abs(&c);
        gemm(m, k, n, alpha.abs() as f64, &abs(&a), false, &abs(&b), false, beta.abs() as f64, &mut bound);
        let f32v = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let f16v = |v: &[f64]| v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<f16>>();
        let (a32, b32, a16, b16) = (f32v(&sa), f32v(&sb), f16v(&sa), f16v(&sb));
        let (sa_, sb_) = if ab == DataType::CUDA_R_16F {
            (Src::F16(&a16), Src::F16(&b16))
        } else {
            (Src::F32(&a32), Src::F32(&b32))
        };
        // D starts as NaN: every element must be written.
        let (mut d32, mut d16) = (vec![f32::NAN; sc.len()], vec![f16::NAN; sc.len()]);
        let (c32, c16) = (f32v(&sc), f16v(&sc));
        let csrc = if cd == DataType::CUDA_R_16F { Src::F16(&c16) } else { Src::F32(&c32) };
        let mut d = if cd == DataType::CUDA_R_16F { Dst::F16(&mut d16) } else { Dst::F32(&mut d32) };
        matmul_host(&call, alpha, sa_, sb_, beta, CSource::Separate(csrc), &mut d).unwrap();
        let got = |i: usize| if cd == DataType::CUDA_R_16F { d16[i].to_f64() } else { d32[i] as f64 };
        let out_u = if cd == DataType::CUDA_R_16F { U16 } else { U32 };
        // Below f16's normal range (6.1e-5) rounding to it is absolute: up to half its subnormal step, 2^-25.
        let out_subnormal = if cd == DataType::CUDA_R_16F { 2f64.powi(-25) } else { 0.0 };
        let mut tf32_moved = false;
        for i in 0..m {
            for j in 0..n {
                let g = got(i + j * ldc as usize);
                let (w, e, bnd) = (want[i * n + j], exact[i * n + j], bound[i * n + j]);
                let tol = (k as f64 + 2.0) * U32 * bnd + out_u * w.abs() + out_subnormal + 1e-30;
                assert!(
                    (g - w).abs() <= tol,
                    "D[{i},{j}] = {g}, reference {w} (|err| {} > {tol}) m={m} n={n} k={k} ta={ta} tb={tb} {ab:?}->{cd:?}",
                    (g - w).abs()
                );
                if tf32 {
                    // Against the exact product, TF32 may cost up to two input roundings per term.
                    assert!((g - e).abs() <= tol + 2.0 * U_TF32 * bnd, "D[{i},{j}] = {g} vs exact {e}");
                    tf32_moved |= (w - e).abs() > tol;
                }
            }
        }
        if tf32 && k >= 8 {
            assert!(tf32_moved, "TF32 rounding left every element of a k={k} product unchanged");
        }
        // Padding rows of D were not written.
        for j in 0..n {
            for i in m..ldc as usize {
                assert!(got(i + j * ldc as usize).is_nan(), "D padding row {i} of column {j} was written");
            }
        }
    }

    fn cases() -> Vec<Case> {
        let mut v = Vec::new();
        for (m, n, k) in [(7, 5, 13), (1, 9, 3), (33, 17, 40), (16, 8, 1)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                v.push(Case { m, n, k, ta, tb, pad: (m + k) % 3, alpha: 1.0, beta: 0.0 });
            }
        }
        v.push(Case { m: 9, n: 11, k: 21, ta: true, tb: false, pad: 2, alpha: -0.75, beta: 1.0 });
        v.push(Case { m: 13, n: 6, k: 10, ta: false, tb: true, pad: 0, alpha: 2.0, beta: -0.5 });
        v
    }

    #[test]
    fn f32_matches_the_cpu_gemm_every_element() {
        let mut rng = crate::cuda::emu::test_rng("blaslt f32");
        for cs in cases() {
            run(&mut rng, &cs, DataType::CUDA_R_32F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F);
        }
    }

    #[test]
    fn fast_tf32_rounds_the_inputs_and_stays_within_its_bound() {
        let mut rng = crate::cuda::emu::test_rng("blaslt tf32");
        for cs in cases() {
            run(&mut rng, &cs, DataType::CUDA_R_32F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F_FAST_TF32);
        }
    }

    #[test]
    fn f16_inputs_accumulate_in_f32_to_f16_or_f32_outputs() {
        let mut rng = crate::cuda::emu::test_rng("blaslt f16");
        for cs in cases() {
            run(&mut rng, &cs, DataType::CUDA_R_16F, DataType::CUDA_R_16F, Compute::CUBLAS_COMPUTE_32F);
            run(&mut rng, &cs, DataType::CUDA_R_16F, DataType::CUDA_R_32F, Compute::CUBLAS_COMPUTE_32F);
        }
    }

    #[test]
    fn tf32_rounding_is_nearest_ties_away() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties go away from zero.
        assert_eq!(round_tf32(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10));
        assert_eq!(round_tf32(-(1.0 + 2f32.powi(-11))), -(1.0 + 2f32.powi(-10)));
        assert_eq!(round_tf32(1.0 + 2f32.powi(-12)), 1.0);
        assert_eq!(round_tf32(1.0 + 3.0 * 2f32.powi(-12)), 1.0 + 2f32.powi(-10));
        assert!(round_tf32(f32::NAN).is_nan());
        assert_eq!(round_tf32(f32::INFINITY), f32::INFINITY);
    }

    fn small_call(dtype: DataType) -> Call {
        let l = |r, c| Layout { dtype, rows: r, cols: c, ld: r as i64 };
        Call {
            desc: MatmulDesc {
                compute: Compute::CUBLAS_COMPUTE_32F,
                scale: DataType::CUDA_R_32F,
                trans_a: false,
                trans_b: false,
            },
            a: l(3, 2),
            b: l(2, 4),
            c: l(3, 4),
            d: l(3, 4),
        }
    }

    #[test]
    fn beta_zero_does_not_read_c_and_in_place_blends() {
        let call = small_call(DataType::CUDA_R_32F);
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [1f32, 0., 0., 1., 1., 1., 2., -1.];
        let nan_c = [f32::NAN; 12];
        let mut d = [0f32; 12];
        matmul_host(
            &call,
            1.0,
            Src::F32(&a),
            Src::F32(&b),
            0.0,
            CSource::Separate(Src::F32(&nan_c)),
            &mut Dst::F32(&mut d),
        )
        .unwrap();
        // Column j of D = A · B[:, j]; A's columns are (1,2,3) and (4,5,6).
        assert_eq!(d, [1., 2., 3., 4., 5., 6., 5., 7., 9., -2., -1., 0.]);
        let mut dd = d;
        matmul_host(&call, 2.0, Src::F32(&a), Src::F32(&b), 1.0, CSource::InPlace, &mut Dst::F32(&mut dd)).unwrap();
        for i in 0..12 {
            assert_eq!(dd[i], 3.0 * d[i]);
        }
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let mut call = small_call(DataType::CUDA_R_32F);
        call.a.ld = 2;
        assert!(call.dims().unwrap_err().to_string().contains("leading dimension"));
        let mut call = small_call(DataType::CUDA_R_32F);
        (call.b.rows, call.b.ld) = (3, 3);
        assert!(call.dims().unwrap_err().to_string().contains("shared dimension"));
        let mut call = small_call(DataType::CUDA_R_16F);
        call.desc.compute = Compute::CUBLAS_COMPUTE_32F_FAST_TF32;
        assert!(call.dims().unwrap_err().to_string().contains("no algorithm"));
        // f32 inputs with an f16 output: cuBLASLt lists no such combination under f32 compute.
        let mut call = small_call(DataType::CUDA_R_32F);
        (call.c.dtype, call.d.dtype) = (DataType::CUDA_R_16F, DataType::CUDA_R_16F);
        assert!(call.dims().unwrap_err().to_string().contains("no algorithm"));
        // The mixed combination derma uses for weight gradients is accepted.
        let mut call = small_call(DataType::CUDA_R_16F);
        (call.c.dtype, call.d.dtype) = (DataType::CUDA_R_32F, DataType::CUDA_R_32F);
        assert_eq!(call.dims().unwrap(), (3, 4, 2));
        let call = small_call(DataType::CUDA_R_32F);
        let pref = Preference { min_alignment: [2, 4, 4, 4], ..Preference::default() };
        assert!(heuristic(&call, &pref).unwrap_err().to_string().contains("element size"));
    }

    /// A host buffer of f32 whose element `at` sits at a 256-byte boundary.
    fn aligned(len: usize) -> (Vec<f32>, usize) {
        let v = vec![0f32; len + 64];
        let at = (v.as_ptr() as usize).next_multiple_of(256) - v.as_ptr() as usize;
        (v, at / 4)
    }

    #[test]
    fn an_algorithm_chosen_for_256_byte_alignment_refuses_a_misaligned_pointer() {
        let call = small_call(DataType::CUDA_R_32F);
        let (mut a, ia) = aligned(8);
        let (mut b, ib) = aligned(9);
        let (mut d, id) = aligned(13);
        a[ia..ia + 6].copy_from_slice(&[1., 2., 3., 4., 5., 6.]);
        b[ib + 1..ib + 9].copy_from_slice(&[1., 0., 0., 1., 1., 1., 2., -1.]);
        let ptr = |v: &mut Vec<f32>, i: usize| v.as_mut_ptr().wrapping_add(i) as u64;
        let (pa, pb_off, pd) = (ptr(&mut a, ia), ptr(&mut b, ib + 1), ptr(&mut d, id));
        let defaults = heuristic(&call, &Preference::default()).unwrap();
        assert_eq!(defaults.alignment, [256; 4]);
        let p = Pointers { a: pa, b: pb_off, c: pd, d: pd, workspace: 0, workspace_bytes: 0 };
        // SAFETY: every pointer covers its layout in a live Vec; D is not aliased by A or B.
        let e = unsafe { matmul(&call, &defaults, 1.0, 0.0, p) }.unwrap_err().to_string();
        assert!(e.contains("B at") && e.contains("4-byte aligned") && e.contains("256-byte"), "{e}");
        // The preferences taken from the real pointers choose an algorithm that accepts them.
        let pref = Preference { max_workspace: 0, min_alignment: [pa, pb_off, pd, pd].map(alignment_of) };
        let algo = heuristic(&call, &pref).unwrap();
        assert_eq!(algo.alignment[1], 4);
        // SAFETY: as above.
        unsafe { matmul(&call, &algo, 1.0, 0.0, p) }.unwrap();
        assert_eq!(&d[id..id + 12], &[1., 2., 3., 4., 5., 6., 5., 7., 9., -2., -1., 0.]);
        // An input overlapping D is refused.
        let q = Pointers { a: pd, ..p };
        // SAFETY: as above (the call refuses before touching memory).
        let e = unsafe { matmul(&call, &algo, 1.0, 0.0, q) }.unwrap_err().to_string();
        assert!(e.contains("A overlaps the output D"), "{e}");
    }

    #[test]
    fn alignment_of_addresses() {
        assert_eq!(alignment_of(0x1000), 256);
        assert_eq!(alignment_of(0x1004), 4);
        assert_eq!(alignment_of(0x1010), 16);
        assert_eq!(alignment_of(0x1002), 2);
    }
}
