// Optimiser-side kernels over flat parameter buffers: gradient unscaling with inf/NaN detection (dynamic loss
// scaling) and AdamW with fp32 master weights and an optional fp16 copy-out.
//
// Napkin math (per parameter):
//   unscale:  read g (2 or 4 B), write 4 B, 1 mul + isfinite            -> bandwidth bound
//   AdamW:    read p, g, m, v (16 B), write p, m, v (12 B) + 2 B fp16 copy, ~15 flops incl. sqrt and div
//             -> ~0.5 flop/B: bandwidth bound; EfficientNet-B0's 5.3 M parameters are ~150 MB per step, ~50 us
//             at 3 TB/s. One launch over the flat buffer instead of one per tensor (the multi-tensor trick).
// Both skip all work when *found_inf is set (the step is skipped, as torch's GradScaler does).
#include "common.cuh"

using namespace derma;

// out[i] = in[i] * inv_scale; any non-finite in[i] sets *found_inf = 1 (a benign race: every writer stores 1).
// out and in may alias (fp32 in place).
template <typename T>
__device__ void unscale(float* out, const T* in, float inv_scale, int32_t* found_inf, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    bool bad = false;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f(in[i]);
        bad |= !isfinite(g);
        out[i] = g * inv_scale;
    }
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) *found_inf = 1;
}

extern "C" __global__ void unscale_f32(float* out, const float* in, float inv_scale, int32_t* found_inf, int64_t n) {
    unscale(out, in, inv_scale, found_inf, n);
}
extern "C" __global__ void unscale_f16(float* out, const __half* in, float inv_scale, int32_t* found_inf, int64_t n) {
    unscale(out, in, inv_scale, found_inf, n);
}

// Mirrored in src/cuda/kernels.rs as AdamParams. Every scalar is computed on the host in f64 and rounded to f32
// once, as the CPU reference (src/train/adamw.rs) and torch do: in f32, 1 - 0.999f is 0.000999987 and would put
// every exp_avg_sq 1.3e-5 (relative) off.
struct AdamParams {
    int64_t n;
    float decay;            // 1 - lr * weight_decay
    float one_minus_beta1;  // 1 - beta1
    float beta2;
    float one_minus_beta2;  // 1 - beta2
    float bc2_sqrt;         // sqrt(1 - beta2^t)
    float neg_step_size;    // -lr / (1 - beta1^t)
    float eps;
    int32_t pad_;           // to 40 bytes, a multiple of the int64's alignment
};

// The CPU reference's operations in its order: decoupled decay first, torch's lerp for m.
__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, const AdamParams& a) {
    p *= a.decay;
    m += a.one_minus_beta1 * (g - m);
    v = v * a.beta2 + a.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / a.bc2_sqrt + a.eps;
    p += a.neg_step_size * m / denom;
}

// p, m, v fp32 master state; g fp32 (unscaled) gradients; p16 (nullable) receives fp16 copies of the new p.
extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, __half* __restrict__ p16, const int32_t* found_inf,
                                     AdamParams a) {
    if (found_inf && *found_inf) return;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        const int64_t nv = a.n / 4;
        for (int64_t q = t0; q < nv; q += stride) {
            float4 pp = reinterpret_cast<float4*>(p)[q], gg = reinterpret_cast<const float4*>(g)[q];
            float4 mm = reinterpret_cast<float4*>(m)[q], vv = reinterpret_cast<float4*>(v)[q];
            adamw_one(pp.x, gg.x, mm.x, vv.x, a);
            adamw_one(pp.y, gg.y, mm.y, vv.y, a);
            adamw_one(pp.z, gg.z, mm.z, vv.z, a);
            adamw_one(pp.w, gg.w, mm.w, vv.w, a);
            reinterpret_cast<float4*>(p)[q] = pp;
            reinterpret_cast<float4*>(m)[q] = mm;
            reinterpret_cast<float4*>(v)[q] = vv;
            if (p16) {
                p16[4 * q] = __float2half_rn(pp.x);
                p16[4 * q + 1] = __float2half_rn(pp.y);
                p16[4 * q + 2] = __float2half_rn(pp.z);
                p16[4 * q + 3] = __float2half_rn(pp.w);
            }
        }
        done = nv * 4;
    }
    for (int64_t i = done + t0; i < a.n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_one(pi, g[i], mi, vi, a);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p16) p16[i] = __float2half_rn(pi);
    }
}
