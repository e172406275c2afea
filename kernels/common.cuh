// Shared helpers for derma's kernels: fp32/fp16 loads and stores with fp32 arithmetic, 16-byte vectors,
// warp/block reductions and a counter-based RNG.
//
// Storage is fp32 (`float`) or fp16 (`__half`); every kernel computes in fp32. Entry points are `extern "C"`
// with a `_f32` / `_f16` suffix so the Rust side can name them without C++ mangling.
//
// Reduction kernels declare __launch_bounds__(256, 4): 256 threads, at least 4 blocks per SM, i.e. a 64-register
// budget. A bare __launch_bounds__(256) lets ptxas aim for full occupancy (32 registers) and spill, which the
// build rejects.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace derma {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// 16 bytes of T: 4 floats or 8 halves, loaded and stored as one uint4.
template <typename T> struct Vec {
    static constexpr int N = 16 / sizeof(T);
    union {
        uint4 raw;
        T v[N];
    };
};

template <typename T> __device__ __forceinline__ Vec<T> load16(const T* p) {
    Vec<T> r;
    r.raw = *reinterpret_cast<const uint4*>(p);
    return r;
}
template <typename T> __device__ __forceinline__ void store16(T* p, const Vec<T>& r) {
    *reinterpret_cast<uint4*>(p) = r.raw;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Counter-based RNG: a uniform in [0, 1) from (seed, index) alone, so a mask is reproducible and independent of
// the launch shape. Two rounds of a 64-bit mix (splitmix64's finaliser) over seed and counter.
__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform01(uint64_t seed, uint64_t counter) {
    uint64_t z = mix64(seed * 0x9e3779b97f4a7c15ull + mix64(counter + 0x632be59bd9b4e019ull));
    return (float)(z >> 40) * (1.0f / 16777216.0f);  // top 24 bits: exact in fp32
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

}  // namespace derma
