// Dropout and stochastic depth with counter-based masks: element i (or sample n) is kept when
// uniform01(seed, i) >= p, and kept values are scaled by 1 / (1 - p). The mask is a pure function of
// (seed, index), so backward recomputes it instead of storing it, and the CPU reproduces it bit for bit
// (src/cuda/mod.rs: uniform01).
//
// In a replayed training step the seed cannot be a launch argument (it changes every step while the captured
// arguments do not): `key` then points at the layer's key in a device table that `mask_keys` fills at the start of
// each step from the step counter (`StepValues`), with the host rule `mask_key(seed, epoch, step, layer)`
// (src/backend/mod.rs). `step_advance`, the last launch of a step, moves the counter on.
//
// Napkin math (fp32, per element): read 4 B, write 4 B, ~15 integer ops for the hash -> bandwidth bound on
// any recent GPU (integer multiply throughput is far above 1 per byte moved). Stochastic depth hashes once per
// element too (cheap, avoids a separate mask buffer) and optionally fuses the residual add: y = res + mask * x.
#include "common.cuh"

using namespace derma;

template <typename T>
__device__ void dropout(T* __restrict__ y, const T* __restrict__ x, float p, uint64_t seed, const uint64_t* key,
                        int64_t n) {
    if (key) seed = *key;
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
                                 uint64_t seed, const uint64_t* key, int64_t n, int64_t per_sample) {
    if (key) seed = *key;
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
    extern "C" __global__ void dropout_##SFX(T* y, const T* x, float p, uint64_t seed, const uint64_t* key,         \
                                             int64_t n) {                                                            \
        dropout(y, x, p, seed, key, n);                                                                               \
    }                                                                                                                 \
    extern "C" __global__ void stochastic_depth_##SFX(T* y, const T* x, const T* residual, float p, uint64_t seed,   \
                                                      const uint64_t* key, int64_t n, int64_t per_sample) {          \
        stochastic_depth(y, x, residual, p, seed, key, n, per_sample);                                               \
    }

// Backward of both is the forward applied to dy with the same seed (and no residual: the residual's gradient is
// dy itself).
DERMA_DROPOUT(float, f32)
DERMA_DROPOUT(__half, f16)

// The per-step values a replayed training step reads from the device. Mirrored in src/ops/dropout/cuda.rs as
// StepValues; `step` comes first so the augmentation kernel can read it as a plain int64 counter.
struct StepValues {
    int64_t step;   // batch index within the epoch
    uint64_t seed;  // the run's seed
    uint64_t epoch;
    int64_t pad_;
};

// keys[l] = mask_key(seed, epoch, step, l) for l < layers (src/backend/mod.rs). Napkin math: a few dozen layers,
// ~10 integer ops each: the cost is the launch.
extern "C" __global__ void mask_keys(uint64_t* __restrict__ keys, const StepValues* __restrict__ v, int64_t layers) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t l = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; l < layers; l += stride) {
        uint64_t z = v->seed;
        const uint64_t parts[3] = {v->epoch, (uint64_t)v->step, (uint64_t)l};
        for (int i = 0; i < 3; ++i) z = mix64(z ^ mix64(parts[i] + 0x9e3779b97f4a7c15ull));
        keys[l] = z;
    }
}

// The last launch of a training step: the next replay sees the next batch and the next masks. One thread.
extern "C" __global__ void step_advance(StepValues* v) {
    if (blockIdx.x == 0 && threadIdx.x == 0) v->step += 1;
}
