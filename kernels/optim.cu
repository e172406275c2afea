// Optimiser-side kernels over the flat trainable range: gradient unscaling with inf/NaN detection (dynamic loss
// scaling), AdamW with fp32 master weights and an optional fp16 copy-out, and the loss scaler's update.
//
// Napkin math (per parameter):
//   amp_unscale:  read g 4 B, write 4 B, 1 mul + isfinite                   -> bandwidth bound
//   adamw_apply:  read p, g, m, v (16 B) + the chunk's coefficients (cached), write p, m, v (12 B) + 2 B fp16
//                 copy, ~15 flops incl. sqrt and div -> ~0.5 flop/B: bandwidth bound; EfficientNet-B0's 5.3 M
//                 parameters are ~160 MB per step, ~35 us at an H200's 4.8 TB/s. One launch over the flat range
//                 instead of one per tensor (the multi-tensor trick).
//   adamw_prepare, scaler_update: one thread per parameter tensor (a few hundred) / one thread: launch latency.
// adamw_prepare and adamw_apply skip all work when the overflow flag is set (the step is skipped, as torch's
// GradScaler does).
#include <stddef.h>

#include "common.cuh"

using namespace derma;

// ---- The mixed-precision step on the device: amp_unscale -> adamw_prepare -> adamw_apply -> scaler_update ----------
//
// Four launches that make one GradScaler + AdamW step with no host value in them: the scale, the overflow flag, the
// learning rates and the step counts all live in device memory, so the sequence can sit inside a captured CUDA
// graph and replay across steps, scale changes and learning-rate decays.
//
// The trainable parameters are one flat f32 range (masters), with the gradients and both moments laid out alike;
// every parameter's region starts at a multiple of 64 elements, so a 64-element chunk belongs to at most one
// parameter and `chunk_param` (one int32 per chunk) says which (-1: no parameter, the chunk is skipped).
//
// Arithmetic: every f32 and f64 operation of the CPU reference (src/train/adamw/mod.rs `step_one`,
// src/train/scaler.rs) in its order, spelled with the _rn intrinsics on the GPU so nvcc cannot contract a
// multiply and an add into an FMA (its default, --fmad=true): the results are then the CPU's bit for bit. The only
// operation without an exact counterpart is f64 pow (CUDA's is within 2 ulp, glibc's within 1); its result is
// rounded to f32 once, which hides a 1-ulp f64 difference unless it sits on an f32 rounding boundary.

// Mirrored in src/train/adamw/cuda.rs as ScalerState (16 bytes): GradScaler's state, read and written only by
// kernels. found_inf is set by amp_unscale and cleared by scaler_update; skipped counts skipped steps.
struct ScalerState {
    float scale;
    int32_t growth_tracker;
    int32_t found_inf;
    int32_t skipped;
};

// Mirrored as AdamEntry (24 bytes): one trainable parameter's region of the flat range and its learning-rate group.
struct AdamEntry {
    int64_t offset;  // elements from the range start, a multiple of 64
    int64_t len;
    int32_t group;   // index into the learning rates
    int32_t pad_;
};

// Mirrored as AdamCoeffs (32 bytes): one parameter's step scalars, written by adamw_prepare, read by adamw_apply.
struct AdamCoeffs {
    float decay;            // 1 - lr * weight_decay
    float one_minus_beta1;  // 1 - beta1
    float beta2;
    float one_minus_beta2;  // 1 - beta2
    float bc2_sqrt;         // sqrt(1 - beta2^t)
    float neg_step_size;    // -lr / (1 - beta1^t)
    float eps;
    int32_t pad_;
};

// Mirrored as AdamHyper (32 bytes, a kernel parameter): the hyper-parameters shared by every parameter, in f64 as
// the CPU optimizer holds them.
struct AdamHyper {
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
};

// The Rust mirrors' layout tests pin the same numbers.
static_assert(sizeof(ScalerState) == 16 && offsetof(ScalerState, found_inf) == 8 && offsetof(ScalerState, skipped) == 12,
              "ScalerState layout");
static_assert(sizeof(AdamEntry) == 24 && offsetof(AdamEntry, len) == 8 && offsetof(AdamEntry, group) == 16,
              "AdamEntry layout");
static_assert(sizeof(AdamCoeffs) == 32 && offsetof(AdamCoeffs, bc2_sqrt) == 16 && offsetof(AdamCoeffs, eps) == 24,
              "AdamCoeffs layout");
static_assert(sizeof(AdamHyper) == 32 && offsetof(AdamHyper, weight_decay) == 24, "AdamHyper layout");

// f64 multiply and subtract that are never fused into an FMA (on the host build the compiler does not contract).
__device__ __forceinline__ double mul_f64_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
__device__ __forceinline__ double sub_f64_rn(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

// Napkin math (amp_unscale, per gradient element): read 4 B, write 4 B, 1 mul + isfinite -> bandwidth bound; 5.3 M
// gradients are 42 MB, ~15 us at 3 TB/s. The scale is read from the device (one f64 division per thread, nothing
// next to the memory traffic). In place: the gradients stay where the backward pass wrote them.
// grads[i] *= f32(1 / f64(scale)); any non-finite grads[i] (before unscaling) sets state->found_inf = 1 (every
// writer stores 1: a benign race). Every element is unscaled, overflow or not, as GradScaler does.
extern "C" __global__ void amp_unscale_f32(float* grads, ScalerState* state, int64_t n) {
    const float inv = (float)(1.0 / (double)state->scale);
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    bool bad = false;
    int64_t done = 0;
    if (aligned16(grads)) {
        const int64_t nv = n / 4;
        for (int64_t q = t0; q < nv; q += stride) {
            float4 g = reinterpret_cast<float4*>(grads)[q];
            bad |= !isfinite(g.x) || !isfinite(g.y) || !isfinite(g.z) || !isfinite(g.w);
            g.x = __fmul_rn(g.x, inv);
            g.y = __fmul_rn(g.y, inv);
            g.z = __fmul_rn(g.z, inv);
            g.w = __fmul_rn(g.w, inv);
            reinterpret_cast<float4*>(grads)[q] = g;
        }
        done = nv * 4;
    }
    for (int64_t i = done + t0; i < n; i += stride) {
        const float g = grads[i];
        bad |= !isfinite(g);
        grads[i] = __fmul_rn(g, inv);
    }
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) state->found_inf = 1;
}

// Napkin math (adamw_prepare, per parameter): read 24 B of entry + 8 B lr + 8 B step, write 8 B step + 32 B
// coefficients, two f64 pow, one sqrt, two divisions: ~200 parameters in EfficientNet-B0, one small launch whose
// cost is its launch latency (a few us), against the ~50 us of adamw_apply.
// Unless state->found_inf (state null: never skip): steps[i] += 1 and coeffs[i] from lrs[entries[i].group] and the
// new step, with step_one's f64 formulas rounded to f32 once. A group outside [0, groups) gives NaN coefficients
// (NaN weights: the loss check catches it) rather than an out-of-bounds read. On a skip nothing is written.
extern "C" __global__ void adamw_prepare(AdamCoeffs* __restrict__ coeffs, int64_t* __restrict__ steps,
                                         const AdamEntry* __restrict__ entries, const double* __restrict__ lrs,
                                         const ScalerState* state, AdamHyper h, int32_t groups, int32_t params) {
    if (state && state->found_inf) return;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < params; i += stride) {
        const int64_t step = steps[i] + 1;
        steps[i] = step;
        const double t = (double)step;
        const int32_t g = entries[i].group;
        const double lr = (g >= 0 && g < groups) ? lrs[g] : (double)NAN;
        AdamCoeffs c;
        c.decay = (float)sub_f64_rn(1.0, mul_f64_rn(lr, h.weight_decay));
        c.one_minus_beta1 = (float)(1.0 - h.beta1);
        c.beta2 = (float)h.beta2;
        c.one_minus_beta2 = (float)(1.0 - h.beta2);
        const double bias_correction1 = 1.0 - pow(h.beta1, t);
        c.bc2_sqrt = (float)sqrt(1.0 - pow(h.beta2, t));
        c.neg_step_size = (float)(-(lr / bias_correction1));
        c.eps = (float)h.eps;
        c.pad_ = 0;
        coeffs[i] = c;
    }
}

// step_one's element update, operation by operation (decoupled decay first, torch's lerp for m), unfused.
__device__ __forceinline__ void adamw_exact(float& p, float g, float& m, float& v, const AdamCoeffs& c) {
    p = __fmul_rn(p, c.decay);
    m = __fadd_rn(m, __fmul_rn(c.one_minus_beta1, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, c.beta2), __fmul_rn(__fmul_rn(c.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.bc2_sqrt), c.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step_size, m), denom));
}

// Napkin math (adamw_apply, per element): read p, g, m, v (16 B), write p, m, v (12 B) + 2 B f16 copy, plus one
// int32 chunk entry and a 32 B coefficient record per 64 elements (cached): ~30 B and ~12 flops (one sqrt, two
// divisions) per element -> bandwidth bound; 5.3 M parameters are ~160 MB, ~55 us at 3 TB/s. One launch over the
// whole trainable range however many parameters it holds (the multi-tensor trick, with a per-chunk table instead
// of per-tensor launches).
// Returns at once when state->found_inf. Element i uses coeffs[chunk_param[i / 64]]; a chunk marked -1 (or with an
// index outside [0, params)) is left untouched. Padding inside a parameter's last chunk is updated too: it holds
// zeros in p, g, m and v, and an AdamW step keeps zeros at +0. p16 (nullable) receives f16(p) rounded to nearest.
extern "C" __global__ void adamw_apply(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       float* __restrict__ v, __half* __restrict__ p16,
                                       const AdamCoeffs* __restrict__ coeffs, const int32_t* __restrict__ chunk_param,
                                       const ScalerState* state, int32_t params, int64_t n) {
    if (state && state->found_inf) return;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        // Quads of 4 elements: 16 per chunk, so a quad never straddles two parameters.
        const int64_t nq = n / 4;
        for (int64_t q = t0; q < nq; q += stride) {
            const int32_t k = chunk_param[q >> 4];
            if (k < 0 || k >= params) continue;
            const AdamCoeffs c = coeffs[k];
            float4 pp = reinterpret_cast<float4*>(p)[q];
            const float4 gg = reinterpret_cast<const float4*>(g)[q];
            float4 mm = reinterpret_cast<float4*>(m)[q], vv = reinterpret_cast<float4*>(v)[q];
            adamw_exact(pp.x, gg.x, mm.x, vv.x, c);
            adamw_exact(pp.y, gg.y, mm.y, vv.y, c);
            adamw_exact(pp.z, gg.z, mm.z, vv.z, c);
            adamw_exact(pp.w, gg.w, mm.w, vv.w, c);
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
        done = nq * 4;
    }
    for (int64_t i = done + t0; i < n; i += stride) {
        const int32_t k = chunk_param[i >> 6];
        if (k < 0 || k >= params) continue;
        const AdamCoeffs c = coeffs[k];
        float pi = p[i], mi = m[i], vi = v[i];
        adamw_exact(pi, g[i], mi, vi, c);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (p16) p16[i] = __float2half_rn(pi);
    }
}

// Napkin math (scaler_update): one thread reads and writes 16 B; its cost is the launch (a few us, or ~1 us as a
// graph node).
// GradScaler::update on the device state: overflow -> scale * backoff, tracker 0; else tracker + 1, and at
// growth_interval clean steps scale * growth when that stays finite, tracker 0. Then skipped += found_inf and
// found_inf = 0, ready for the next step's amp_unscale.
extern "C" __global__ void scaler_update(ScalerState* state, float growth_factor, float backoff_factor,
                                         int32_t growth_interval) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    ScalerState s = *state;
    const bool found_inf = s.found_inf != 0;
    if (found_inf) {
        s.scale = __fmul_rn(s.scale, backoff_factor);
        s.growth_tracker = 0;
    } else {
        const int32_t successful = s.growth_tracker + 1;
        if (successful == growth_interval) {
            const float grown = __fmul_rn(s.scale, growth_factor);
            if (isfinite(grown)) s.scale = grown;
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }
    s.skipped += found_inf ? 1 : 0;
    s.found_inf = 0;
    *state = s;
}
