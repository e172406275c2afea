// Depthwise convolution, NHWC, k x k kernel, stride s, padding (k - 1) / 2, no bias: forward, backward data,
// backward weight, and the weight-layout transposes. Weights are stored [k, k, C] (channel fastest) so a warp reads
// consecutive channels.
//
// Napkin math (fp32, per output element, k = 3 / 5):
//   forward:       k^2 multiply-adds (9 / 25 -> 18 / 50 flops); reads k^2 inputs but neighbouring outputs share
//                  them through L1/L2, so DRAM sees ~1 read of x (4 B / s^2 per output) + 4 B written.
//                  ~2-6 flop/B -> memory bound on any recent GPU; the job is coalescing and 16-byte vectors.
//   backward data: the same gather on dy (each dx sums the k^2 / s^2 outputs it fed): one thread per dx element,
//                  no atomics.
//   backward weight: a reduction over N*Ho*Wo for each of k^2*C weights: reads dy and x (8 B per output per tap,
//                  mostly L2 hits); partial sums go to a [rows_split, k*k, C] workspace, then one thread per weight
//                  adds them in a fixed order (deterministic, no float atomics).
//   weight layout: the model keeps depthwise weights as [C, k*k] f32 masters (OHWI [C, k, k, 1]); these kernels
//                  take [k*k, C]. permute_f32_to_* makes the kernels' copy (with the cast to f16) and
//                  transpose_add_f32 turns their [k*k, C] gradient into the master layout inside the gradient slot.
//                  Weights are tiny (B0's largest: 1152 * 25 floats = 115 KB), one read and one write each; a
//                  32x32 shared-memory tile keeps both sides coalesced.
// Channels are the fastest index, so threads of a warp take consecutive channels; with C a multiple of 4 (fp32)
// or 8 (fp16) each thread handles one 16-byte vector of channels (forward and backward data).
#include "common.cuh"

using namespace derma;

// Mirrored in src/cuda/kernels.rs as DwParams.
struct DwParams {
    int32_t n, h, w, c;  // input
    int32_t ho, wo;      // output
    int32_t k, stride, pad;
    int32_t rows_split;  // gridDim.z of the weight-gradient kernel
};

template <typename T, int V>
__device__ __forceinline__ void load_v(const T* p, float* out) {
    if constexpr (V == Vec<T>::N) {
        Vec<T> v = load16(p);
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_f(v.v[j]);
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_f(p[j]);
    }
}
template <typename T, int V>
__device__ __forceinline__ void store_v(T* p, const float* in) {
    if constexpr (V == Vec<T>::N) {
        Vec<T> v;
#pragma unroll
        for (int j = 0; j < V; ++j) v.v[j] = from_f<T>(in[j]);
        store16(p, v);
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) p[j] = from_f<T>(in[j]);
    }
}

// One thread per (n, ho, wo, group of V channels). V = 16 B / sizeof(T) when C allows, else 1.
template <typename T, int V>
__device__ void forward(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ wt, DwParams p) {
    const int cg = p.c / V;
    const int64_t total = (int64_t)p.n * p.ho * p.wo * cg;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const int c = (int)(t % cg) * V;
        int64_t r = t / cg;
        const int wo = (int)(r % p.wo);
        r /= p.wo;
        const int ho = (int)(r % p.ho);
        const int n = (int)(r / p.ho);
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
        for (int kh = 0; kh < p.k; ++kh) {
            const int hi = ho * p.stride - p.pad + kh;
            if (hi < 0 || hi >= p.h) continue;
            for (int kw = 0; kw < p.k; ++kw) {
                const int wi = wo * p.stride - p.pad + kw;
                if (wi < 0 || wi >= p.w) continue;
                float xv[V], wv[V];
                load_v<T, V>(x + (((int64_t)n * p.h + hi) * p.w + wi) * p.c + c, xv);
                load_v<T, V>(wt + ((int64_t)kh * p.k + kw) * p.c + c, wv);
#pragma unroll
                for (int j = 0; j < V; ++j) acc[j] = fmaf(xv[j], wv[j], acc[j]);
            }
        }
        store_v<T, V>(y + (((int64_t)n * p.ho + ho) * p.wo + wo) * p.c + c, acc);
    }
}

// One thread per (n, h, w, group of V channels): dx = sum over the taps whose output window covers (h, w).
template <typename T, int V>
__device__ void backward_data(T* __restrict__ dx, const T* __restrict__ dy, const T* __restrict__ wt, DwParams p) {
    const int cg = p.c / V;
    const int64_t total = (int64_t)p.n * p.h * p.w * cg;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const int c = (int)(t % cg) * V;
        int64_t r = t / cg;
        const int wi = (int)(r % p.w);
        r /= p.w;
        const int hi = (int)(r % p.h);
        const int n = (int)(r / p.h);
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
        for (int kh = 0; kh < p.k; ++kh) {
            const int hs = hi + p.pad - kh;  // = ho * stride
            if (hs < 0 || hs % p.stride) continue;
            const int ho = hs / p.stride;
            if (ho >= p.ho) continue;
            for (int kw = 0; kw < p.k; ++kw) {
                const int ws = wi + p.pad - kw;
                if (ws < 0 || ws % p.stride) continue;
                const int wo = ws / p.stride;
                if (wo >= p.wo) continue;
                float gv[V], wv[V];
                load_v<T, V>(dy + (((int64_t)n * p.ho + ho) * p.wo + wo) * p.c + c, gv);
                load_v<T, V>(wt + ((int64_t)kh * p.k + kw) * p.c + c, wv);
#pragma unroll
                for (int j = 0; j < V; ++j) acc[j] = fmaf(gv[j], wv[j], acc[j]);
            }
        }
        store_v<T, V>(dx + (((int64_t)n * p.h + hi) * p.w + wi) * p.c + c, acc);
    }
}

// Block (32, 8); grid (ceil(C/32), k*k, rows_split). partial is [rows_split, k*k, C]: each block sums
// dy * x over a strided share of the N*Ho*Wo output positions for 32 channels and one tap.
template <typename T>
__device__ void backward_weight_partial(float* __restrict__ partial, const T* __restrict__ x,
                                        const T* __restrict__ dy, DwParams p) {
    __shared__ float red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int tap = blockIdx.y;
    const int kh = tap / p.k, kw = tap % p.k;
    const int64_t rows = (int64_t)p.n * p.ho * p.wo;
    float acc = 0.f;
    if (c < p.c) {
        for (int64_t r = (int64_t)blockIdx.z * 8 + threadIdx.y; r < rows; r += (int64_t)gridDim.z * 8) {
            const int wo = (int)(r % p.wo);
            const int64_t r2 = r / p.wo;
            const int ho = (int)(r2 % p.ho);
            const int n = (int)(r2 / p.ho);
            const int hi = ho * p.stride - p.pad + kh, wi = wo * p.stride - p.pad + kw;
            if (hi < 0 || hi >= p.h || wi < 0 || wi >= p.w) continue;
            acc = fmaf(to_f(dy[r * p.c + c]), to_f(x[(((int64_t)n * p.h + hi) * p.w + wi) * p.c + c]), acc);
        }
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += red[k][threadIdx.x];
        partial[((int64_t)blockIdx.z * p.k * p.k + tap) * p.c + c] = t;
    }
}

#define DERMA_DW(T, SFX)                                                                                             \
    extern "C" __global__ void dw_forward_##SFX(T* y, const T* x, const T* w, DwParams p) {                         \
        if (p.c % Vec<T>::N == 0 && aligned16(x) && aligned16(w) && aligned16(y))                                    \
            forward<T, Vec<T>::N>(y, x, w, p);                                                                        \
        else                                                                                                          \
            forward<T, 1>(y, x, w, p);                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void dw_backward_data_##SFX(T* dx, const T* dy, const T* w, DwParams p) {                 \
        if (p.c % Vec<T>::N == 0 && aligned16(dx) && aligned16(w) && aligned16(dy))                                  \
            backward_data<T, Vec<T>::N>(dx, dy, w, p);                                                                \
        else                                                                                                          \
            backward_data<T, 1>(dx, dy, w, p);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                                \
        dw_backward_weight_partial_##SFX(float* partial, const T* x, const T* dy, DwParams p) {                     \
        backward_weight_partial(partial, x, dy, p);                                                                   \
    }

DERMA_DW(float, f32)
DERMA_DW(__half, f16)

// One thread per column: out[j] (+)= sum_k partial[k, j] over `rows` rows, in order. Used for the depthwise
// weight gradient (cols = k*k*C). accumulate != 0 adds into out (gradient accumulation).
extern "C" __global__ void sum_rows_f32(float* out, const float* partial, int32_t rows, int64_t cols,
                                        int32_t accumulate) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (int k = 0; k < rows; ++k) s += partial[(int64_t)k * cols + j];
    out[j] = accumulate ? out[j] + s : s;
}

// Block (32, 8). y [cols, rows] (+)= x [rows, cols] transposed, through 32x32 tiles of shared memory (a column of
// 33 floats, so the transposed read hits 32 different banks); blocks take tiles in a grid-stride loop. accumulate
// != 0 adds to y (T = float only); 0 writes it without reading.
template <typename T>
__device__ void transpose_tiles(T* __restrict__ y, const float* __restrict__ x, int64_t rows, int64_t cols,
                                int32_t accumulate) {
    __shared__ float tile[32][33];
    const int64_t tiles_c = (cols + 31) / 32;
    const int64_t tiles = tiles_c * ((rows + 31) / 32);
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
        const int64_t r0 = (t / tiles_c) * 32, c0 = (t % tiles_c) * 32;
        // Read x[r0 + ty + j, c0 + tx]: lanes along a row of x.
#pragma unroll
        for (int j = 0; j < 32; j += 8) {
            const int64_t r = r0 + threadIdx.y + j, c = c0 + threadIdx.x;
            if (r < rows && c < cols) tile[threadIdx.y + j][threadIdx.x] = x[r * cols + c];
        }
        __syncthreads();
        // Write y[c0 + ty + j, r0 + tx]: lanes along a row of y.
#pragma unroll
        for (int j = 0; j < 32; j += 8) {
            const int64_t c = c0 + threadIdx.y + j, r = r0 + threadIdx.x;
            if (c < cols && r < rows) {
                const float v = tile[threadIdx.x][threadIdx.y + j];
                T* out = y + c * rows + r;
                *out = accumulate ? from_f<T>(to_f(*out) + v) : from_f<T>(v);
            }
        }
        __syncthreads();  // the next tile overwrites this one
    }
}

// The kernels' [k*k, C] weights (rows = C, cols = k*k) from the master [C, k*k] f32, cast to the storage type.
extern "C" __global__ void permute_f32_to_f32(float* y, const float* x, int64_t rows, int64_t cols) {
    transpose_tiles(y, x, rows, cols, 0);
}
extern "C" __global__ void permute_f32_to_f16(__half* y, const float* x, int64_t rows, int64_t cols) {
    transpose_tiles(y, x, rows, cols, 0);
}
// y[c, r] (+)= x[r, c]: the kernels' [k*k, C] weight gradient (rows = k*k, cols = C) into the master layout.
extern "C" __global__ void transpose_add_f32(float* y, const float* x, int64_t rows, int64_t cols,
                                             int32_t accumulate) {
    transpose_tiles(y, x, rows, cols, accumulate);
}
