// Test-only kernels for the emulated device's own tests (tests/emu_runtime.rs). Each exercises one piece of the
// execution model; the ones marked `// MARK:name` fail on purpose and the tests find their line by that marker.
#include <cuda_fp16.h>
#include <stdint.h>

// Shuffle ops by number, as the tests pass them: 0 idx, 1 up, 2 down, 3 xor.
template <typename T> __device__ T shuffle(int op, unsigned mask, T v, int arg, int width) {
    switch (op) {
        case 0: return __shfl_sync(mask, v, arg, width);
        case 1: return __shfl_up_sync(mask, v, (unsigned)arg, width);
        case 2: return __shfl_down_sync(mask, v, (unsigned)arg, width);
        default: return __shfl_xor_sync(mask, v, arg, width);
    }
}

// out[t] = shuffle of in[t] across the block's warps; lanes outside `mask` do not take part and write -1.
extern "C" __global__ void emu_test_shfl_i32(int32_t* out, const int32_t* in, int32_t op, uint32_t mask, int32_t arg,
                                             int32_t width) {
    const int t = threadIdx.x;
    if (!(mask >> (t & 31) & 1u)) {
        out[t] = -1;
        return;
    }
    out[t] = shuffle(op, mask, in[t], arg, width);
}

// The same with an 8-byte value (shuffles move doubles as two 32-bit halves on the GPU).
extern "C" __global__ void emu_test_shfl_f64(double* out, const double* in, int32_t op, int32_t arg, int32_t width) {
    out[threadIdx.x] = shuffle(op, 0xffffffffu, in[threadIdx.x], arg, width);
}

// out[3t..3t+3] = (ballot, any, all) of pred[t] over `mask`; lanes outside the mask write nothing.
extern "C" __global__ void emu_test_vote(uint32_t* out, const int32_t* pred, uint32_t mask) {
    const int t = threadIdx.x;
    if (!(mask >> (t & 31) & 1u)) return;
    const int p = pred[t];
    out[3 * t] = __ballot_sync(mask, p);
    out[3 * t + 1] = (uint32_t)__any_sync(mask, p);
    out[3 * t + 2] = (uint32_t)__all_sync(mask, p);
}

// out[3t..3t+3] = (__syncthreads_count, _and, _or) of pred over the block; any block shape.
extern "C" __global__ void emu_test_syncthreads_reduce(int32_t* out, const int32_t* pred) {
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const int p = pred[t];
    out[3 * t] = __syncthreads_count(p);
    out[3 * t + 1] = __syncthreads_and(p);
    out[3 * t + 2] = __syncthreads_or(p);
}

// Each thread publishes in[t] in shared memory and reads the value of the thread one warp below (its own in warp
// 0). With `barrier` = 0 the barrier between the write and the read is missing: forward order hides it (warp 0
// finishes before warp 1 starts), warp-reverse order shows it.
extern "C" __global__ void emu_test_missing_barrier(float* out, const float* in, int32_t barrier) {
    __shared__ float s[1024];
    const int t = threadIdx.x;
    s[t] = in[blockIdx.x * blockDim.x + t];
    if (barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + t] = s[t >= 32 ? t - 32 : t];
}

// Block sum with a shared-memory tree (barriers in a loop), one result per block.
extern "C" __global__ void emu_test_block_sum(float* out, const float* in, int64_t n) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    float acc = 0.f;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + t; i < n; i += (int64_t)gridDim.x * blockDim.x) acc += in[i];
    s[t] = acc;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Atomics on the types derma uses: counters[0] += 1 per thread, [1] min of in, [2] max of in, [3] a CAS-built
// sum of in, [4] the last exchanged value's count; fsum[0] += in as float.
extern "C" __global__ void emu_test_atomics(int32_t* counters, float* fsum, unsigned long long* u64, const int32_t* in,
                                            int64_t n) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int v = in[i];
    atomicAdd(&counters[0], 1);
    atomicMin(&counters[1], v);
    atomicMax(&counters[2], v);
    int old = counters[3], assumed;
    do {
        assumed = old;
        old = atomicCAS(&counters[3], assumed, assumed + v);
    } while (old != assumed);
    atomicExch(&counters[4], 7);
    atomicAdd(&fsum[0], (float)v);
    atomicAdd(&u64[0], (unsigned long long)(v & 0xff));
    atomicOr(&counters[5], 1 << (v & 31));
    atomicAnd(&counters[6], ~(1 << (v & 31)));
}

// Dynamic shared memory: each block reverses its slice through `extern __shared__` storage (two declarations,
// which alias the same bytes as in CUDA).
extern "C" __global__ void emu_test_dynamic_shared(float* out, const float* in) {
    extern __shared__ float dyn[];
    extern __shared__ __align__(16) unsigned char dyn_bytes[];
    const int t = threadIdx.x, n = blockDim.x;
    dyn[t] = in[blockIdx.x * n + t];
    __syncthreads();
    out[blockIdx.x * n + t] = reinterpret_cast<const float*>(dyn_bytes)[n - 1 - t];
}

// Reads one element past `n` floats of dynamic shared memory (an overrun the ASan flavour must catch).
extern "C" __global__ void emu_test_dynamic_shared_overrun(float* out, int32_t n) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = 1.f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = dyn[n];
}

// Reads in[n]: one element past the end of a buffer of n floats (the ASan flavour must catch it).
extern "C" __global__ void emu_test_read_past_end(float* out, const float* in, int32_t n) {
    if (threadIdx.x == 0) out[0] = in[n];
}

// A 16-byte vector load from p + 1 float: misaligned (UBSan's alignment check in the ASan flavour must catch it).
extern "C" __global__ void emu_test_misaligned_vector(float4* out, const float* p) {
    if (threadIdx.x == 0) out[0] = *reinterpret_cast<const float4*>(p + 1);
}

// fp16 conversions: bits[i] = __float2half_rn(in[i]); back[i] = __half2float(bits as half), both element-wise.
extern "C" __global__ void emu_test_f16(uint16_t* bits, float* back, const float* in, const uint16_t* h, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        bits[i] = __half_as_ushort(__float2half_rn(in[i]));
        back[i] = __half2float(__ushort_as_half(h[i]));
    }
}

// sizeof and alignof of CUDA's vector types, in a fixed order the test knows.
extern "C" __global__ void emu_test_type_layout(uint32_t* out) {
    if (threadIdx.x != 0) return;
    int k = 0;
#define DERMA_LAYOUT(T)         \
    out[k++] = sizeof(T);       \
    out[k++] = alignof(T);
    DERMA_LAYOUT(float2)
    DERMA_LAYOUT(float3)
    DERMA_LAYOUT(float4)
    DERMA_LAYOUT(int2)
    DERMA_LAYOUT(int4)
    DERMA_LAYOUT(uint2)
    DERMA_LAYOUT(uint4)
    DERMA_LAYOUT(double2)
    DERMA_LAYOUT(__half)
    DERMA_LAYOUT(__half2)
    DERMA_LAYOUT(dim3)
    DERMA_LAYOUT(uint3)
#undef DERMA_LAYOUT
}

// Fast-math and conversion intrinsics, one result each (the test compares with closed forms).
extern "C" __global__ void emu_test_intrinsics(float* out, const float* in) {
    if (threadIdx.x != 0) return;
    const float x = in[0], y = in[1];
    out[0] = __expf(x);
    out[1] = __fdividef(x, y);
    out[2] = rsqrtf(y);
    out[3] = __saturatef(x);
    out[4] = __saturatef(-x);
    out[5] = __saturatef(NAN);
    out[6] = __logf(y);
    out[7] = __powf(y, x);
    out[8] = (float)__float2int_rn(2.5f);
    out[9] = (float)__popc(0xf0f0u);
    out[10] = __int_as_float(__float_as_int(x));
    out[11] = __ldg(&in[1]);
}

// Failure cases, one per report. Each stops at the line marked for the test.
extern "C" __global__ void emu_test_deadlock(float* out) {
    if (threadIdx.x >= 5) return;
    __syncthreads();  // MARK:deadlock
    out[threadIdx.x] = 1.f;
}

extern "C" __global__ void emu_test_divergent_barrier(float* out) {
    if (threadIdx.x & 1) {
        __syncthreads();  // MARK:divergent-odd
    } else {
        __syncthreads();  // MARK:divergent-even
    }
    out[threadIdx.x] = 1.f;
}

extern "C" __global__ void emu_test_shfl_exited_lane(float* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (float)threadIdx.x, 0);  // MARK:shfl-exited
}

// Launched with a block of 48 threads: the second warp has 16 lanes, but the mask names all 32.
extern "C" __global__ void emu_test_shfl_absent_lane(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);  // MARK:shfl-absent
}

// Lanes 0-15 shuffle among themselves, but xor 16 reads lanes 16-31, outside the mask.
extern "C" __global__ void emu_test_shfl_outside_mask(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, (float)threadIdx.x, 16);  // MARK:shfl-outside
}

// A lane calls a collective with a mask that leaves itself out.
extern "C" __global__ void emu_test_shfl_caller_not_in_mask(float* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (float)threadIdx.x, 0);  // MARK:shfl-caller
}

// One lane waits at a warp shuffle while the others wait at the block barrier.
extern "C" __global__ void emu_test_warp_vs_barrier(float* out) {
    if (threadIdx.x == 0) {
        out[0] = __shfl_sync(0xffffffffu, 1.f, 0);  // MARK:warp-vs-barrier
    } else {
        __syncthreads();
    }
}

// __syncwarp waits only for the lanes of its mask that have not exited (CUDA's rule), so this is valid.
extern "C" __global__ void emu_test_syncwarp_after_exit(int32_t* out) {
    if (threadIdx.x % 3 == 0) return;
    __syncwarp();
    out[threadIdx.x] = 1;
}

// Launch bounds, as a literal and as an expression of the file's own constants.
constexpr int kBoundedThreads = 32;
extern "C" __global__ void __launch_bounds__(64) emu_test_bounded_literal(uint32_t* out) { out[threadIdx.x] = 1; }
extern "C" __global__ void __launch_bounds__(kBoundedThreads * 3, 2) emu_test_bounded_expr(uint32_t* out) {
    out[threadIdx.x] = 1;
}

// An __half accumulator (CUDA's operators): every += rounds to fp16. out[0] = the sum's bits, out[1] = a*b-c.
extern "C" __global__ void emu_test_half_arith(uint16_t* out, const float* in, int32_t n) {
    if (threadIdx.x != 0) return;
    __half s = 0.f;
    for (int i = 0; i < n; ++i) s += __float2half_rn(in[i]);
    out[0] = __half_as_ushort(s);
    const __half a = __float2half_rn(in[0]), b = __float2half_rn(in[1]), c = __float2half_rn(in[2]);
    out[1] = __half_as_ushort(a * b - c);
    out[2] = (uint16_t)(a < b);
}
