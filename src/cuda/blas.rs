//! cuBLASLt GEMM in row-major semantics: C[M, N] = op(A) · op(B) with op(A) [M, K] and op(B) [K, N], fp16 storage
//! with fp32 accumulation on tensor cores (or fp32 throughout). This is how NHWC 1×1 convolutions and the
//! classifier run: [N·H·W, Cin] × [Cin, Cout].
//!
//! UNVERIFIED on hardware: written against cudarc's cuBLASLt API and compiled, but not yet run on a GPU (the
//! machines that build derma have none). scripts/gpu-check.sh runs the CUDA tests that check it against the CPU.
//!
//! cuBLASLt is column-major; a row-major [R, C] matrix is the same memory as a column-major [C, R] one, so
//! C = A·B row-major is computed as Cᵀ = Bᵀ·Aᵀ column-major: the operands swap and no data moves.

use anyhow::{Result, ensure};
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::marker::PhantomData;
use std::sync::Arc;

use super::device::{Gpu, Stream};
use super::kernels::DevSlice;

/// A typed view of a [`DevSlice`] that cudarc's cuBLASLt API accepts. The caching allocator, not cudarc, owns the
/// memory, so there are no cudarc events to wait on: everything runs on one stream in order.
struct Operand<'a, T> {
    addr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _t: PhantomData<T>,
}

impl<T> DeviceSlice<T> for Operand<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DevicePtr<T> for Operand<'_, T> {
    fn device_ptr<'b>(&'b self, _stream: &'b CudaStream) -> (u64, SyncOnDrop<'b>) {
        (self.addr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for Operand<'_, T> {
    fn device_ptr_mut<'b>(&'b mut self, _stream: &'b CudaStream) -> (u64, SyncOnDrop<'b>) {
        (self.addr, SyncOnDrop::Sync(None))
    }
}

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

/// A cuBLASLt handle bound to a stream (cudarc allocates its workspace: 32 MiB on Hopper, 4 MiB otherwise).
pub struct Blas {
    lt: CudaBlasLT,
    stream: Arc<CudaStream>,
}

impl Blas {
    /// Creates the handle on `gpu`'s stream. On a GPU, call only after [`super::probe`] reported cuBLASLt present:
    /// cudarc panics when the library cannot be loaded.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let Stream::Cuda(stream) = &gpu.stream else {
            anyhow::bail!("cuBLASLt is not available on the emulated device yet")
        };
        let stream = stream.clone();
        let lt = CudaBlasLT::new(stream.clone()).map_err(|e| anyhow::anyhow!("creating the cuBLASLt handle: {e:?}"))?;
        Ok(Self { lt, stream })
    }

    /// C = alpha · op(A) · op(B) + beta · C, row-major, with T = f32 or f16 (fp32 accumulation either way).
    /// Lengths are checked against the shape.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T>(&self, g: &Gemm, alpha: f32, a: DevSlice, b: DevSlice, beta: f32, c: DevSlice) -> Result<()>
    where
        CudaBlasLT: Matmul<T>,
    {
        let es = size_of::<T>();
        let (m, n, k) = (g.m, g.n, g.k);
        ensure!(m > 0 && n > 0 && k > 0, "GEMM with an empty dimension: [{m}, {k}] x [{k}, {n}]");
        for (name, s, elems) in [("A", a, m * k), ("B", b, k * n), ("C", c, m * n)] {
            ensure!(
                s.len_bytes() >= elems * es,
                "GEMM operand {name}: {} bytes, the shape [{m}x{k}]x[{k}x{n}] needs {}",
                s.len_bytes(),
                elems * es
            );
        }
        let op = |s: DevSlice, len| Operand::<T> { addr: s.addr(), len, stream: &self.stream, _t: PhantomData };
        // Column-major view: C^T [N, M] = op(B)^T [N, K] · op(A)^T [K, M].
        let cfg = MatmulConfig {
            transa: g.trans_b,
            transb: g.trans_a,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha,
            lda: if g.trans_b { k } else { n } as i64,
            ldb: if g.trans_a { m } else { k } as i64,
            beta,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        let (first, second) = (op(b, k * n), op(a, m * k));
        let mut out = op(c, m * n);
        // SAFETY: every operand covers the elements the shape addresses (checked above); the memory stays alive
        // for the call because the caller borrows its blocks; work is ordered on self.stream.
        unsafe { self.lt.matmul(cfg, &first, &second, &mut out, None, None) }
            .map_err(|e| anyhow::anyhow!("cuBLASLt matmul [{m}x{k}]x[{k}x{n}] failed: {e:?}"))
    }
}
