//! cuBLASLt GEMM in row-major semantics: C[M, N] = alpha · op(A) · op(B) + beta · C with op(A) [M, K] and op(B)
//! [K, N], fp16 storage with fp32 accumulation, or fp32 storage. This is how NHWC 1×1 convolutions and the
//! classifier run: [N·H·W, Cin] × [Cin, Cout].
//!
//! cuBLASLt is column-major; a row-major [R, C] matrix is the same memory as a column-major [C, R] one, so
//! C = A·B row-major is computed as Cᵀ = Bᵀ·Aᵀ column-major: the operands swap and no data moves. [`lt_call`]
//! makes that mapping once, into the descriptor values both devices get: the real library on a GPU, the loops of
//! [`super::emu::blaslt`] on the emulated device.
//!
//! Types: A and B share one storage type, C and D another ([`Blas::gemm_into`]): f32·f32 → f32, f16·f16 → f16,
//! and f16·f16 → f32 (the weight gradient of an f16 layer written, or with beta = 1 added, straight into its f32
//! gradient slot). Those are the combinations cuBLASLt supports with f32 accumulation; f32 inputs with an f16
//! output are refused here, as the library has no algorithm for them.
//!
//! Compute type: always strict `CUBLAS_COMPUTE_32F` (f32 products and accumulation; an f16 output is rounded
//! once). Not `CUBLAS_COMPUTE_32F_FAST_TF32` for f32 storage: TF32 keeps 10 mantissa bits of each input, a
//! relative error near 1e-3 per product, and the f32 path is held to the CPU reference at 1e-5 (the f16 path
//! exists for speed). The emulated device computes exactly that, so `derma check` judges f32 GEMM as an f32
//! reduction (1e-4), not as tensor-op math.
//!
//! Alignment: cuBLASLt assumes 256-byte aligned pointers unless told otherwise, and a [`DevSlice::range`] view can
//! start anywhere. Every call sets `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES` from the actual pointers
//! (their largest power-of-two divisor, capped at 256), so the heuristic only picks algorithms those pointers
//! satisfy; a view not aligned to its element size is an error here. The emulated device enforces the same
//! contract: an algorithm chosen for more alignment than a pointer has fails.
//!
//! Graph capture: the workspace is allocated once, in [`Blas::new`], and every call gets all of it, so a captured
//! call and its replays use the same workspace address and size; the descriptors and the heuristic query are host
//! work (alpha and beta are read at the call and baked into the launch). On the emulated device a call made while
//! a capture is open is recorded (same descriptors, algorithm and addresses) and runs at replay.
//!
//! UNVERIFIED on hardware: the real path is written against cuBLASLt's documented API and compiled, but has not run
//! on a GPU; scripts/gpu-check.sh runs `derma check` there.

use anyhow::{Result, anyhow, ensure};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaStream;
use std::ffi::c_void;
use std::sync::Arc;

use super::alloc::Block;
use super::device::{Gpu, Stream};
use super::emu::blaslt::{self as emu, Call, Layout, MatmulDesc, Preference, alignment_of};
use super::emu::graph::EmuStream;
use super::kernels::{DevSlice, Elem};

/// Shape and options of one GEMM, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The shared dimension.
    pub k: usize,
    /// A is stored [K, M] and used transposed.
    pub trans_a: bool,
    /// B is stored [N, K] and used transposed.
    pub trans_b: bool,
}

/// cuBLASLt's element type for a storage type.
fn data_type<T: Elem>() -> sys::cudaDataType {
    if T::SUFFIX == "f16" { sys::cudaDataType::CUDA_R_16F } else { sys::cudaDataType::CUDA_R_32F }
}

/// The column-major descriptors of a row-major GEMM with inputs (A, B) of `A` and output (C, D) of `C` (see the
/// module docs): cuBLASLt's A is our B and its B our A, its m our n. Strict f32 compute for every combination.
pub fn lt_call<A: Elem, C: Elem>(g: &Gemm) -> Call {
    let (in_type, out_type) = (data_type::<A>(), data_type::<C>());
    // Strict f32, never FAST_TF32: the f32 path must match the CPU reference to 1e-5 (see the module docs).
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    // Row-major B [K, N] (or [N, K] stored for trans_b) is column-major [N, K] (or [K, N]), leading dim its row length.
    let a = if g.trans_b {
        Layout { dtype: in_type, rows: k, cols: n, ld: k as i64 }
    } else {
        Layout { dtype: in_type, rows: n, cols: k, ld: n as i64 }
    };
    let b = if g.trans_a {
        Layout { dtype: in_type, rows: m, cols: k, ld: m as i64 }
    } else {
        Layout { dtype: in_type, rows: k, cols: m, ld: k as i64 }
    };
    let c = Layout { dtype: out_type, rows: n, cols: m, ld: n as i64 };
    Call {
        desc: MatmulDesc { compute, scale: sys::cudaDataType::CUDA_R_32F, trans_a: g.trans_b, trans_b: g.trans_a },
        a,
        b,
        c,
        d: c,
    }
}

/// A cuBLASLt handle, its workspace and stream (GPU), or the emulated library.
enum Backend {
    Cuda {
        handle: sys::cublasLtHandle_t,
        stream: Arc<CudaStream>,
        workspace: Block,
    },
    /// The emulated library, on the emulated device's stream (which records calls while a capture is open).
    Emulated(Arc<EmuStream>),
}

/// cuBLASLt on one device.
pub struct Blas {
    backend: Backend,
}

// SAFETY: the cuBLASLt handle may be used from any thread; calls that share the workspace are ordered on one
// stream, so they never run at once on the device.
unsafe impl Send for Blas {}
// SAFETY: see above.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if let Backend::Cuda { handle, .. } = &self.backend {
            // SAFETY: the handle was created in `new` and is destroyed once, here.
            let _ = unsafe { result::destroy_handle(*handle) };
        }
    }
}

/// Destroys cuBLASLt descriptors when a call ends, also on its error paths.
struct Descriptors {
    layouts: Vec<sys::cublasLtMatrixLayout_t>,
    desc: Option<sys::cublasLtMatmulDesc_t>,
    pref: Option<sys::cublasLtMatmulPreference_t>,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this call and is destroyed once, here.
        unsafe {
            for &l in &self.layouts {
                let _ = result::destroy_matrix_layout(l);
            }
            if let Some(d) = self.desc {
                let _ = result::destroy_matmul_desc(d);
            }
            if let Some(p) = self.pref {
                let _ = result::destroy_matmul_pref(p);
            }
        }
    }
}

fn lt_err(what: &str) -> impl Fn(result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what} failed: {e:?}")
}

impl Blas {
    /// Creates the handle on `gpu` and a workspace from its allocator (32 MiB on Hopper and later, 4 MiB before,
    /// as NVIDIA recommends). On a GPU, call only after [`super::probe`] reported cuBLASLt present: cudarc panics
    /// when the library cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let stream = match &gpu.stream {
            Stream::Cuda(s) => s,
            Stream::Emulated(e) => return Ok(Self { backend: Backend::Emulated(e.clone()) }),
        };
        let bytes = if gpu.info.compute_capability.0 >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = gpu.alloc.alloc(bytes)?;
        let handle = result::create_handle().map_err(lt_err("creating the handle"))?;
        Ok(Self { backend: Backend::Cuda { handle, stream: stream.clone(), workspace } })
    }

    /// C = alpha · op(A) · op(B) + beta · C, row-major, with A, B and C all of `T` = f32 or f16 (f32 accumulation
    /// either way; C is not read when beta is 0). Lengths are checked against the shape, and each pointer's
    /// alignment goes to the heuristic.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: Elem>(&self, g: &Gemm, alpha: f32, a: DevSlice, b: DevSlice, beta: f32, c: DevSlice) -> Result<()> {
        self.gemm_into::<T, T>(g, alpha, a, b, beta, c)
    }

    /// C = alpha · op(A) · op(B) + beta · C, row-major, with A and B of `A` and C of `C`: f32 → f32, f16 → f16, or
    /// f16 → f32 (f32 accumulation always; beta = 1 adds into what C holds, beta = 0 never reads it, so it may
    /// hold NaN). f32 inputs with an f16 output are refused (cuBLASLt has no algorithm for them). Lengths are
    /// checked against the shape, and each pointer's alignment goes to the heuristic.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_into<A: Elem, C: Elem>(
        &self,
        g: &Gemm,
        alpha: f32,
        a: DevSlice,
        b: DevSlice,
        beta: f32,
        c: DevSlice,
    ) -> Result<()> {
        let (ea, ec) = (size_of::<A>(), size_of::<C>());
        let (m, n, k) = (g.m, g.n, g.k);
        ensure!(
            !(A::SUFFIX == "f32" && C::SUFFIX == "f16"),
            "GEMM with f32 inputs and an f16 output: cuBLASLt has none; write f32 and cast, or give f16 inputs"
        );
        ensure!(m > 0 && n > 0 && k > 0, "GEMM with an empty dimension: [{m}, {k}] x [{k}, {n}]");
        for (name, s, elems, es) in [("A", a, m * k, ea), ("B", b, k * n, ea), ("C", c, m * n, ec)] {
            ensure!(
                s.len_bytes() >= elems * es,
                "GEMM operand {name}: {} bytes, the shape [{m}x{k}]x[{k}x{n}] needs {}",
                s.len_bytes(),
                elems * es
            );
            ensure!(
                s.addr().is_multiple_of(es as u64),
                "GEMM operand {name} at {:#x} is not aligned to its {es}-byte elements: take views at whole elements",
                s.addr()
            );
        }
        let call = lt_call::<A, C>(g);
        // cuBLASLt's (A, B, C, D) are our (B, A, C, C).
        let ptrs = [b.addr(), a.addr(), c.addr(), c.addr()];
        let shape = if A::SUFFIX == C::SUFFIX {
            format!("[{m}x{k}]x[{k}x{n}] {}", A::SUFFIX)
        } else {
            format!("[{m}x{k}]x[{k}x{n}] {} -> {}", A::SUFFIX, C::SUFFIX)
        };
        match &self.backend {
            Backend::Emulated(stream) => {
                let pref = Preference { max_workspace: 0, min_alignment: ptrs.map(alignment_of) };
                let algo = emu::heuristic(&call, &pref).map_err(|e| e.context(format!("GEMM {shape}")))?;
                let p =
                    emu::Pointers { a: ptrs[0], b: ptrs[1], c: ptrs[2], d: ptrs[3], workspace: 0, workspace_bytes: 0 };
                let what = shape.clone();
                stream.call(
                    || format!("cuBLASLt GEMM {what}"),
                    move || {
                        // SAFETY: on the emulated device, device addresses are host addresses of blocks the caller
                        // borrows; every operand covers its layout (checked above: the layouts are packed, extent
                        // m·k, k·n and m·n). A replay addresses the same memory, which a live graph keeps
                        // allocated (it pins the allocator's cache).
                        unsafe { emu::matmul(&call, &algo, alpha, beta, p) }
                            .map_err(|e| e.context(format!("GEMM {shape}")))
                    },
                )
            }
            Backend::Cuda { handle, stream, workspace } => {
                let ws = DevSlice::of(workspace);
                // SAFETY: the operands cover their layouts (checked above) and stay alive for the call (the caller
                // borrows their blocks); work is ordered on `stream`, which also orders uses of the workspace.
                unsafe { real_matmul(*handle, stream, &call, alpha, beta, ptrs, ws) }
                    .map_err(|e| e.context(format!("GEMM {shape}")))
            }
        }
    }
}

/// The real cuBLASLt call for `call`, with the alignment preferences taken from `ptrs` (A, B, C, D).
///
/// # Safety
/// Each pointer addresses device memory covering its layout; `ws` is device memory no other work uses while this
/// call's work runs on `stream`.
unsafe fn real_matmul(
    handle: sys::cublasLtHandle_t,
    stream: &Arc<CudaStream>,
    call: &Call,
    alpha: f32,
    beta: f32,
    ptrs: [u64; 4],
    ws: DevSlice,
) -> Result<()> {
    let mut d = Descriptors { layouts: Vec::with_capacity(4), desc: None, pref: None };
    for l in [&call.a, &call.b, &call.c, &call.d] {
        d.layouts.push(result::create_matrix_layout(l.dtype, l.rows, l.cols, l.ld).map_err(lt_err("layout"))?);
    }
    let desc = result::create_matmul_desc(call.desc.compute, call.desc.scale).map_err(lt_err("matmul descriptor"))?;
    d.desc = Some(desc);
    // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
    let op = |t: bool| if t { 1i32 } else { 0i32 };
    let pref = result::create_matmul_pref().map_err(lt_err("preference"))?;
    d.pref = Some(pref);
    let ws_bytes = ws.len_bytes();
    let align = ptrs.map(alignment_of);
    use sys::cublasLtMatmulDescAttributes_t as D;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    // SAFETY: the descriptors are live (owned by `d`); each attribute gets a pointer to a value of the type and size
    // cuBLASLt documents for it (int32 for the transposes, uint64 workspace bytes, uint32 alignments).
    unsafe {
        for (attr, t) in
            [(D::CUBLASLT_MATMUL_DESC_TRANSA, call.desc.trans_a), (D::CUBLASLT_MATMUL_DESC_TRANSB, call.desc.trans_b)]
        {
            let v = op(t);
            result::set_matmul_desc_attribute(desc, attr, (&v as *const i32).cast(), size_of::<i32>())
                .map_err(lt_err("transpose attribute"))?;
        }
        let ws64 = ws_bytes as u64;
        result::set_matmul_pref_attribute(
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws64 as *const u64).cast(),
            8,
        )
        .map_err(lt_err("workspace preference"))?;
        let attrs = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ];
        for (attr, a) in attrs.into_iter().zip(align) {
            result::set_matmul_pref_attribute(pref, attr, (&a as *const u32).cast(), size_of::<u32>())
                .map_err(lt_err("alignment preference"))?;
        }
        let (la, lb, lc, ld) = (d.layouts[0], d.layouts[1], d.layouts[2], d.layouts[3]);
        let heuristic = result::get_matmul_algo_heuristic(handle, desc, la, lb, lc, ld, pref).map_err(|e| {
            anyhow!("cuBLASLt has no algorithm for pointers aligned to {align:?} bytes (A, B, C, D): {e:?}")
        })?;
        result::matmul(
            handle,
            desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            ptrs[0] as *const c_void,
            la,
            ptrs[1] as *const c_void,
            lb,
            ptrs[2] as *const c_void,
            lc,
            ptrs[3] as *mut c_void,
            ld,
            &heuristic.algo,
            ws.addr() as *mut c_void,
            ws_bytes,
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(lt_err("matmul"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::gemm;
    use half::f16;
    use rand::RngExt;

    #[test]
    fn row_major_mapping_matches_the_cpu_gemm_on_the_emulated_device() {
        let gpu = Gpu::emulated().unwrap();
        let blas = Blas::new(&gpu).unwrap();
        let mut rng = crate::cuda::emu::test_rng("blas on emu");
        for (m, k, n) in [(37, 24, 40), (13, 40, 9), (1, 7, 5), (8, 1, 3)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 2.0)] {
                    let spec = Gemm { m, n, k, trans_a: ta, trans_b: tb };
                    let mut draw = |len: usize| -> Vec<f64> {
                        (0..len).map(|_| f16::from_f64(rng.random_range(-1.0..1.0)).to_f64()).collect()
                    };
                    let (a, b, c0) = (draw(m * k), draw(k * n), draw(m * n));
                    let mut want = c0.clone();
                    gemm(m, k, n, alpha as f64, &a, ta, &b, tb, beta as f64, &mut want);
                    // Per-element error bound: (k + 2) f32 roundings of the sum of |terms|.
                    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
                    let mut bound = abs(&c0);
                    gemm(m, k, n, alpha.abs() as f64, &abs(&a), ta, &abs(&b), tb, beta.abs() as f64, &mut bound);
                    // f16 values are exact in f16 and f32, and products of two are exact in f32: every storage
                    // combination sees the same inputs, and C starts from the same (f16-exact) values.
                    let h = |v: &[f64]| v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<f16>>();
                    let s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                    let (ba, bb) = (gpu.upload(&s(&a)).unwrap(), gpu.upload(&s(&b)).unwrap());
                    let bc = gpu.upload(&s(&c0)).unwrap();
                    blas.gemm::<f32>(&spec, alpha, DevSlice::of(&ba), DevSlice::of(&bb), beta, DevSlice::of(&bc))
                        .unwrap();
                    let got: Vec<f32> = gpu.download(&bc, m * n).unwrap();
                    let (ha, hb) = (gpu.upload(&h(&a)).unwrap(), gpu.upload(&h(&b)).unwrap());
                    let hc = gpu.upload(&h(&c0)).unwrap();
                    blas.gemm::<f16>(&spec, alpha, DevSlice::of(&ha), DevSlice::of(&hb), beta, DevSlice::of(&hc))
                        .unwrap();
                    let got16: Vec<f16> = gpu.download(&hc, m * n).unwrap();
                    // f16 inputs, f32 output: the weight-gradient-into-its-slot case (beta = 1 accumulates).
                    let mc = gpu.upload(&s(&c0)).unwrap();
                    blas.gemm_into::<f16, f32>(
                        &spec,
                        alpha,
                        DevSlice::of(&ha),
                        DevSlice::of(&hb),
                        beta,
                        DevSlice::of(&mc),
                    )
                    .unwrap();
                    let mixed: Vec<f32> = gpu.download(&mc, m * n).unwrap();
                    for i in 0..m * n {
                        let tol32 = (k as f64 + 2.0) * 2f64.powi(-24) * bound[i];
                        assert!(
                            (got[i] as f64 - want[i]).abs() <= tol32,
                            "f32 [{i}] {} vs {} ({m},{k},{n},{ta},{tb})",
                            got[i],
                            want[i]
                        );
                        assert!(
                            (mixed[i] as f64 - want[i]).abs() <= tol32,
                            "f16->f32 [{i}] {} vs {} ({m},{k},{n},{ta},{tb})",
                            mixed[i],
                            want[i]
                        );
                        // f16 rounding: relative 2^-11, or absolute 2^-25 below its normal range (subnormals).
                        let tol16 = tol32 + 2f64.powi(-11) * want[i].abs() + 2f64.powi(-25);
                        assert!((got16[i].to_f64() - want[i]).abs() <= tol16, "f16 [{i}] {} vs {}", got16[i], want[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn descriptors_carry_each_operands_type_and_strict_f32_compute() {
        let g = Gemm { m: 5, n: 3, k: 7, trans_a: false, trans_b: true };
        let strict = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let (f16t, f32t) = (sys::cudaDataType::CUDA_R_16F, sys::cudaDataType::CUDA_R_32F);
        for (call, ab, cd) in [
            (lt_call::<f32, f32>(&g), f32t, f32t),
            (lt_call::<f16, f16>(&g), f16t, f16t),
            (lt_call::<f16, f32>(&g), f16t, f32t),
        ] {
            assert_eq!(call.desc.compute, strict, "FAST_TF32 would miss the f32 path's tolerance");
            assert_eq!((call.a.dtype, call.b.dtype, call.c.dtype, call.d.dtype), (ab, ab, cd, cd));
            assert_eq!(call.dims().unwrap(), (3, 5, 7), "cuBLASLt's m is our n");
        }
    }

    #[test]
    fn accumulating_into_an_f32_slot_adds_and_f32_to_f16_is_refused() {
        let gpu = Gpu::emulated().unwrap();
        let blas = Blas::new(&gpu).unwrap();
        // dW [K_in=3, N_out=2] += xᵀ · dy with x [M=4, 3], dy [4, 2], in f16, into an f32 slot holding 0.25.
        let x: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32 * 0.5 - 2.0)).collect();
        let dy: Vec<f16> = (0..8).map(|i| f16::from_f32(1.0 - i as f32 * 0.25)).collect();
        let spec = Gemm { m: 3, n: 2, k: 4, trans_a: true, trans_b: false };
        let (bx, bdy) = (gpu.upload(&x).unwrap(), gpu.upload(&dy).unwrap());
        let slot = gpu.upload(&[0.25f32; 6]).unwrap();
        for round in 1..=2 {
            blas.gemm_into::<f16, f32>(&spec, 1.0, DevSlice::of(&bx), DevSlice::of(&bdy), 1.0, DevSlice::of(&slot))
                .unwrap();
            let got: Vec<f32> = gpu.download(&slot, 6).unwrap();
            for i in 0..3 {
                for j in 0..2 {
                    let dot: f32 = (0..4).map(|r| x[r * 3 + i].to_f32() * dy[r * 2 + j].to_f32()).sum();
                    // Small integers and halves: exact in f32, so equality holds.
                    assert_eq!(got[i * 2 + j], 0.25 + round as f32 * dot, "round {round} [{i},{j}]");
                }
            }
        }
        let f32_in = gpu.upload(&[1.0f32; 12]).unwrap();
        let h_out = gpu.upload(&[f16::ZERO; 6]).unwrap();
        let e = blas
            .gemm_into::<f32, f16>(&spec, 1.0, DevSlice::of(&f32_in), DevSlice::of(&f32_in), 0.0, DevSlice::of(&h_out))
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32 inputs and an f16 output"), "{e}");
        // The mixed call checks C's length at C's element size: 6 f16 (12 bytes) are too few for 6 f32.
        let short = DevSlice::range(&h_out, 0, 12).unwrap();
        let e = blas
            .gemm_into::<f16, f32>(&spec, 1.0, DevSlice::of(&bx), DevSlice::of(&bdy), 0.0, short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("operand C") && e.contains("needs 24"), "{e}");
    }

    fn view(blk: &Block, elems: usize) -> DevSlice<'_> {
        DevSlice::range(blk, 4, elems * 4).unwrap()
    }

    #[test]
    fn misaligned_views_work_and_odd_byte_views_are_refused() {
        let gpu = Gpu::emulated().unwrap();
        let blas = Blas::new(&gpu).unwrap();
        let (m, k, n) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k + 1).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b: Vec<f32> = (0..k * n + 1).map(|i| 1.0 - i as f32 * 0.125).collect();
        let (ba, bb, bc) =
            (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&vec![f32::NAN; m * n + 1]).unwrap());
        // Views one element in: 4-byte aligned, below cuBLASLt's default 256.
        let spec = Gemm { m, n, k, trans_a: false, trans_b: false };
        blas.gemm::<f32>(&spec, 1.0, view(&ba, m * k), view(&bb, k * n), 0.0, view(&bc, m * n)).unwrap();
        let got: Vec<f32> = gpu.download(&bc, m * n + 1).unwrap();
        assert!(got[0].is_nan(), "the element before the output view was written");
        let mut want = vec![0.0f64; m * n];
        let f = |v: &[f32]| v[1..].iter().map(|&x| x as f64).collect::<Vec<f64>>();
        gemm(m, k, n, 1.0, &f(&a), false, &f(&b), false, 0.0, &mut want);
        for i in 0..m * n {
            assert!((got[i + 1] as f64 - want[i]).abs() < 1e-2, "{i}: {} vs {}", got[i + 1], want[i]);
        }
        let odd = DevSlice::range(&ba, 2, m * k * 4).unwrap();
        let e = blas.gemm::<f32>(&spec, 1.0, odd, view(&bb, k * n), 0.0, view(&bc, m * n)).unwrap_err().to_string();
        assert!(e.contains("operand A") && e.contains("not aligned to its 4-byte elements"), "{e}");
    }
}
