// Squeeze-and-excitation plumbing, NHWC: global average pooling [N, H*W, C] -> [N, C] and its backward, and the
// per-(sample, channel) scaling y = x * s[n, c] with its backward (dx and ds in one pass).
//
// Napkin math (fp32, per activation element):
//   pool:             read 4 B, 1 add                   -> bandwidth bound, one pass over x
//   pool backward:    write 4 B (read dpool from cache)  -> bandwidth bound
//   scale:            read 4 B, write 4 B, 1 mul         -> bandwidth bound (16-byte vectors when C allows)
//   scale backward:   read x, dy 8 B, write dx 4 B, 2 flops; ds is a reduction over H*W fused in the same pass
// The reductions use block (32 channels, 8 rows) per (sample, 32-channel tile): coalesced 128 B row reads and a
// deterministic shared-memory tree, no atomics; one block per (n, tile) is enough parallelism since N*C/32 is
// in the hundreds to thousands for EfficientNet-B0 at batch 32+.
#include "common.cuh"

using namespace derma;

// Block (32, 8), grid (ceil(C/32), N). out[n, c] = mean over hw of x[n, hw, c].
template <typename T>
__device__ void pool(T* __restrict__ out, const T* __restrict__ x, int hw, int c_total) {
    __shared__ float red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x, n = blockIdx.y;
    float s = 0.f;
    if (c < c_total) {
        const T* xs = x + (int64_t)n * hw * c_total + c;
        for (int r = threadIdx.y; r < hw; r += 8) s += to_f(xs[(int64_t)r * c_total]);
    }
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < c_total) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        out[(int64_t)n * c_total + c] = from_f<T>(t / (float)hw);
    }
}

// dx[n, hw, c] = dout[n, c] / hw, grid-stride.
template <typename T>
__device__ void pool_backward(T* __restrict__ dx, const T* __restrict__ dout, int n_total, int hw, int c_total) {
    const int64_t total = (int64_t)n_total * hw * c_total;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const float inv = 1.f / (float)hw;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int c = (int)(i % c_total);
        const int64_t n = i / ((int64_t)hw * c_total);
        dx[i] = from_f<T>(to_f(dout[n * c_total + c]) * inv);
    }
}

// y[n, hw, c] = x[n, hw, c] * s[n, c]; 16-byte vectors when C allows.
template <typename T>
__device__ void scale(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ s, int n_total, int hw,
                      int c_total) {
    constexpr int N = Vec<T>::N;
    const int64_t total = (int64_t)n_total * hw * c_total;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t plane = (int64_t)hw * c_total;
    if (c_total % N == 0 && aligned16(x) && aligned16(y)) {
        for (int64_t v = t0; v < total / N; v += stride) {
            const int64_t i = v * N;
            const int c0 = (int)(i % c_total);
            const T* sn = s + (i / plane) * c_total + c0;
            Vec<T> vx = load16(x + i), vy;
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f<T>(to_f(vx.v[k]) * to_f(sn[k]));
            store16(y + i, vy);
        }
    } else {
        for (int64_t i = t0; i < total; i += stride) {
            const int c = (int)(i % c_total);
            y[i] = from_f<T>(to_f(x[i]) * to_f(s[(i / plane) * c_total + c]));
        }
    }
}

// Block (32, 8), grid (ceil(C/32), N): dx = dy * s[n, c] for the block's tile, and ds[n, c] = sum_hw dy * x.
template <typename T>
__device__ void scale_backward(T* __restrict__ dx, T* __restrict__ ds, const T* __restrict__ x,
                               const T* __restrict__ s, const T* __restrict__ dy, int hw, int c_total) {
    __shared__ float red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x, n = blockIdx.y;
    float acc = 0.f;
    if (c < c_total) {
        const float sv = to_f(s[(int64_t)n * c_total + c]);
        const int64_t base = (int64_t)n * hw * c_total + c;
        for (int r = threadIdx.y; r < hw; r += 8) {
            const int64_t i = base + (int64_t)r * c_total;
            const float g = to_f(dy[i]);
            acc = fmaf(g, to_f(x[i]), acc);
            if (dx) dx[i] = from_f<T>(g * sv);
        }
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < c_total) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        ds[(int64_t)n * c_total + c] = from_f<T>(t);
    }
}

#define DERMA_SE(T, SFX)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 4) se_pool_##SFX(T* out, const T* x, int32_t hw, int32_t c) {    \
        pool(out, x, hw, c);                                                                                          \
    }                                                                                                                 \
    extern "C" __global__ void se_pool_backward_##SFX(T* dx, const T* dout, int32_t n, int32_t hw, int32_t c) {     \
        pool_backward(dx, dout, n, hw, c);                                                                            \
    }                                                                                                                 \
    extern "C" __global__ void se_scale_##SFX(T* y, const T* x, const T* s, int32_t n, int32_t hw, int32_t c) {     \
        scale(y, x, s, n, hw, c);                                                                                     \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                                \
        se_scale_backward_##SFX(T* dx, T* ds, const T* x, const T* s, const T* dy, int32_t hw, int32_t c) {         \
        scale_backward(dx, ds, x, s, dy, hw, c);                                                                      \
    }

DERMA_SE(float, f32)
DERMA_SE(__half, f16)
