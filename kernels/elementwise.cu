// Elementwise ops over flat buffers: silu, sigmoid, relu (forward and backward), add, scale, axpy, casts, fill.
//
// Napkin math (per element, fp32 storage; halve the bytes for fp16):
//   unary forward   y = f(x):          read 4 B, write 4 B,  ~1-20 flops -> 0.1-2.5 flop/B
//   unary backward  dx = g(x, dy):     read 8 B, write 4 B,  ~5-20 flops -> < 2 flop/B
//   add / axpy:                         read 8 B, write 4 B,  1-2 flops
//   fill            y = v:              write 4 B, no reads (the backward seed, zeroing a gradient buffer)
// An H100/H200 moves ~3-4.8 TB/s against ~60 TFLOP/s fp32, i.e. needs ~15 flop/B to be compute bound: every op
// here is memory bound. What matters is full 16-byte transactions (float4 / 8 halves per thread) and enough bytes
// in flight (grid-stride loop, 4+ waves of blocks); the exp in silu/sigmoid is hidden behind the loads.
// Vector path when every pointer is 16-byte aligned; the tail (n mod 4 or 8) and unaligned buffers go scalar.
#include "common.cuh"

using namespace derma;

template <typename T, typename F>
__device__ __forceinline__ void map1(T* __restrict__ y, const T* __restrict__ a, int64_t n, F f) {
    constexpr int N = Vec<T>::N;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(y) && aligned16(a)) {
        const int64_t nv = n / N;
        for (int64_t v = i0; v < nv; v += stride) {
            Vec<T> va = load16(a + v * N), vy;
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f<T>(f(to_f(va.v[k])));
            store16(y + v * N, vy);
        }
        done = nv * N;
    }
    for (int64_t i = done + i0; i < n; i += stride) y[i] = from_f<T>(f(to_f(a[i])));
}

template <typename T, typename F>
__device__ __forceinline__ void map2(T* __restrict__ y, const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                                     F f) {
    constexpr int N = Vec<T>::N;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(y) && aligned16(a) && aligned16(b)) {
        const int64_t nv = n / N;
        for (int64_t v = i0; v < nv; v += stride) {
            Vec<T> va = load16(a + v * N), vb = load16(b + v * N), vy;
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f<T>(f(to_f(va.v[k]), to_f(vb.v[k])));
            store16(y + v * N, vy);
        }
        done = nv * N;
    }
    for (int64_t i = done + i0; i < n; i += stride) y[i] = from_f<T>(f(to_f(a[i]), to_f(b[i])));
}

// y = f(y, b) in place. y carries no __restrict__: a restrict-qualified const view of y (map2(y, y, b)) would let
// the compiler read y through the read-only data cache while this kernel writes it, which is undefined.
template <typename T, typename F>
__device__ __forceinline__ void map2_inplace(T* y, const T* __restrict__ b, int64_t n, F f) {
    constexpr int N = Vec<T>::N;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(y) && aligned16(b)) {
        const int64_t nv = n / N;
        for (int64_t v = i0; v < nv; v += stride) {
            Vec<T> vy = load16(y + v * N), vb = load16(b + v * N);
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f<T>(f(to_f(vy.v[k]), to_f(vb.v[k])));
            store16(y + v * N, vy);
        }
        done = nv * N;
    }
    for (int64_t i = done + i0; i < n; i += stride) y[i] = from_f<T>(f(to_f(y[i]), to_f(b[i])));
}

struct SiluFwd {
    __device__ float operator()(float x) const { return x / (1.0f + expf(-x)); }
};
// d/dx x*s(x) = s + x*s*(1-s) = s*(1 + x*(1-s))
struct SiluBwd {
    __device__ float operator()(float x, float dy) const {
        float s = 1.0f / (1.0f + expf(-x));
        return dy * s * (1.0f + x * (1.0f - s));
    }
};
struct SigmoidFwd {
    __device__ float operator()(float x) const { return 1.0f / (1.0f + expf(-x)); }
};
// Takes the forward output y = s(x): dx = dy * y * (1 - y).
struct SigmoidBwd {
    __device__ float operator()(float y, float dy) const { return dy * y * (1.0f - y); }
};
struct ReluFwd {
    __device__ float operator()(float x) const { return x > 0.0f ? x : 0.0f; }
};
struct ReluBwd {
    __device__ float operator()(float x, float dy) const { return x > 0.0f ? dy : 0.0f; }
};
struct Add {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct Scale {
    float alpha;
    __device__ float operator()(float x) const { return alpha * x; }
};
// y = y + alpha * x, in place (map2_inplace).
struct Axpy {
    float alpha;
    __device__ float operator()(float y, float x) const { return y + alpha * x; }
};

#define DERMA_ELEMENTWISE(T, SFX)                                                                                    \
    extern "C" __global__ void silu_fwd_##SFX(T* y, const T* x, int64_t n) { map1(y, x, n, SiluFwd{}); }            \
    extern "C" __global__ void silu_bwd_##SFX(T* dx, const T* x, const T* dy, int64_t n) {                          \
        map2(dx, x, dy, n, SiluBwd{});                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void sigmoid_fwd_##SFX(T* y, const T* x, int64_t n) { map1(y, x, n, SigmoidFwd{}); }      \
    extern "C" __global__ void sigmoid_bwd_##SFX(T* dx, const T* y, const T* dy, int64_t n) {                       \
        map2(dx, y, dy, n, SigmoidBwd{});                                                                             \
    }                                                                                                                 \
    extern "C" __global__ void relu_fwd_##SFX(T* y, const T* x, int64_t n) { map1(y, x, n, ReluFwd{}); }            \
    extern "C" __global__ void relu_bwd_##SFX(T* dx, const T* x, const T* dy, int64_t n) {                          \
        map2(dx, x, dy, n, ReluBwd{});                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void add_##SFX(T* y, const T* a, const T* b, int64_t n) { map2(y, a, b, n, Add{}); }      \
    extern "C" __global__ void scale_##SFX(T* y, const T* x, float alpha, int64_t n) {                              \
        map1(y, x, n, Scale{alpha});                                                                                  \
    }                                                                                                                 \
    extern "C" __global__ void axpy_##SFX(T* y, const T* x, float alpha, int64_t n) {                               \
        map2_inplace(y, x, n, Axpy{alpha});                                                                           \
    }

DERMA_ELEMENTWISE(float, f32)
DERMA_ELEMENTWISE(__half, f16)

// Storage casts (fp32 master weights -> fp16 compute copies and back).
extern "C" __global__ void cast_f32_to_f16(__half* y, const float* x, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = __float2half_rn(x[i]);
}
extern "C" __global__ void cast_f16_to_f32(float* y, const __half* x, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = __half2float(x[i]);
}

// y = value (rounded to T once) over n elements: the backward seed and the zeroing of gradient buffers. Unlike
// scale with alpha 0, it never reads y, so NaN or garbage there is cleared.
template <typename T>
__device__ __forceinline__ void fill(T* __restrict__ y, float value, int64_t n) {
    constexpr int N = Vec<T>::N;
    const T v = from_f<T>(value);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t i0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(y)) {
        Vec<T> vv;
#pragma unroll
        for (int k = 0; k < N; ++k) vv.v[k] = v;
        const int64_t nv = n / N;
        for (int64_t j = i0; j < nv; j += stride) store16(y + j * N, vv);
        done = nv * N;
    }
    for (int64_t i = done + i0; i < n; i += stride) y[i] = v;
}

extern "C" __global__ void fill_f32(float* y, float value, int64_t n) { fill(y, value, n); }
extern "C" __global__ void fill_f16(__half* y, float value, int64_t n) { fill(y, value, n); }
