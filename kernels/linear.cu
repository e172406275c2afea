// Linear-layer plumbing over a row-major [rows, cols] activation (rows = samples or N*H*W, cols = features):
// the bias add of the forward pass and the bias gradient (a column sum) of the backward pass. The bias and its
// gradient are always f32 (the master parameter and its gradient slot); activations are f32 or f16.
//
// Napkin math (per activation element, fp32 storage; halve the activation bytes for fp16):
//   bias_add  y[r, c] += b[c]:       read 4 B, write 4 B, 1 add; b (cols floats) stays in L1/L2
//                                     -> bandwidth bound; 16-byte vectors of y when cols allows
//   col_sum   out[c] (+)= sum_r x:   read 4 B, 1 add; out is cols floats
//                                     -> bandwidth bound, one pass over x
// In EfficientNet-B0 these run on the classifier ([batch, 9]) and the SE convolutions ([batch, C]): rows are the
// batch (2-256), so col_sum needs no cross-block reduction. One block of (32 columns, 8 row lanes) per 32-column
// tile sums its rows in a fixed order and adds the 8 lanes in a fixed order: deterministic, no atomics, and the
// same result for any batch split. Row reads are 128 B coalesced along the columns.
#include "common.cuh"

using namespace derma;

// y[r, c] += bias[c], grid-stride. y is read and written by the same thread, so it carries no __restrict__ (as in
// elementwise.cu's map2_inplace); bias is read-only.
template <typename T>
__device__ void bias_add(T* y, const float* __restrict__ bias, int64_t rows, int64_t cols) {
    constexpr int N = Vec<T>::N;
    const int64_t total = rows * cols;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    // A vector of N elements stays inside one row when cols is a multiple of N.
    if (cols % N == 0 && aligned16(y)) {
        const int64_t nv = total / N;
        for (int64_t v = t0; v < nv; v += stride) {
            const int64_t i = v * N;
            const int64_t c = i % cols;
            Vec<T> vy = load16(y + i);
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f<T>(to_f(vy.v[k]) + bias[c + k]);
            store16(y + i, vy);
        }
        done = nv * N;
    }
    for (int64_t i = done + t0; i < total; i += stride) y[i] = from_f<T>(to_f(y[i]) + bias[i % cols]);
}

// Block (32, 8), grid (ceil(cols / 32)). out[c] = sum over rows of x[r, c] (accumulate != 0: out[c] += it; 0: out
// is not read, so it may hold NaN).
template <typename T>
__device__ void col_sum(float* __restrict__ out, const T* __restrict__ x, int64_t rows, int64_t cols,
                        int32_t accumulate) {
    __shared__ float red[8][33];
    const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols) {
        for (int64_t r = threadIdx.y; r < rows; r += 8) s += to_f(x[r * cols + c]);
    }
    red[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        out[c] = accumulate ? out[c] + t : t;
    }
}

#define DERMA_LINEAR(T, SFX)                                                                                         \
    extern "C" __global__ void bias_add_##SFX(T* y, const float* bias, int64_t rows, int64_t cols) {                \
        bias_add(y, bias, rows, cols);                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                                \
        col_sum_##SFX(float* out, const T* x, int64_t rows, int64_t cols, int32_t accumulate) {                     \
        col_sum(out, x, rows, cols, accumulate);                                                                      \
    }

DERMA_LINEAR(float, f32)
DERMA_LINEAR(__half, f16)
