// Dropout and stochastic depth with counter-based masks: element i (or sample n) is kept when
// uniform01(seed, i) >= p, and kept values are scaled by 1 / (1 - p). The mask is a pure function of
// (seed, index), so backward recomputes it instead of storing it, and the CPU reproduces it bit for bit
// (src/cuda/mod.rs: uniform01).
//
// Napkin math (fp32, per element): read 4 B, write 4 B, ~15 integer ops for the hash -> bandwidth bound on
// any recent GPU (integer multiply throughput is far above 1 per byte moved). Stochastic depth hashes once per
// element too (cheap, avoids a separate mask buffer) and optionally fuses the residual add: y = res + mask * x.
#include "common.cuh"

using namespace derma;

template <typename T>
__device__ void dropout(T* __restrict__ y, const T* __restrict__ x, float p, uint64_t seed, int64_t n) {
    const float keep_scale = p < 1.f ? 1.f / (1.f - p) : 0.f;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool keep = uniform01(seed, (uint64_t)i) >= p;
        y[i] = from_f<T>(keep ? to_f(x[i]) * keep_scale : 0.f);
    }
}

// per_sample = elements per sample (H*W*C); the sample index n = i / per_sample picks the coin.
// residual may be null.
template <typename T>
__device__ void stochastic_depth(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ residual, float p,
                                 uint64_t seed, int64_t n, int64_t per_sample) {
    const float keep_scale = p < 1.f ? 1.f / (1.f - p) : 0.f;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool keep = uniform01(seed, (uint64_t)(i / per_sample)) >= p;
        float v = keep ? to_f(x[i]) * keep_scale : 0.f;
        if (residual) v += to_f(residual[i]);
        y[i] = from_f<T>(v);
    }
}

#define DERMA_DROPOUT(T, SFX)                                                                                        \
    extern "C" __global__ void dropout_##SFX(T* y, const T* x, float p, uint64_t seed, int64_t n) {                 \
        dropout(y, x, p, seed, n);                                                                                    \
    }                                                                                                                 \
    extern "C" __global__ void stochastic_depth_##SFX(T* y, const T* x, const T* residual, float p, uint64_t seed,   \
                                                      int64_t n, int64_t per_sample) {                               \
        stochastic_depth(y, x, residual, p, seed, n, per_sample);                                                    \
    }

// Backward of both is the forward applied to dy with the same seed (and no residual: the residual's gradient is
// dy itself).
DERMA_DROPOUT(float, f32)
DERMA_DROPOUT(__half, f16)
