// Batch norm over NHWC activations viewed as [M = N*H*W, C]: per-channel statistics, normalize + affine with an
// optional fused SiLU, and the backward pass (dgamma, dbeta, dx), also with the SiLU fused.
//
// Napkin math (fp32 storage, per element; fp16 halves the bytes):
//   stats (training):   read x 4 B, ~4 flops                    -> pass 1 of forward
//   normalize (+SiLU):  read x 4 B, write y 4 B, ~4 (+~15) flops -> pass 2 of forward
//   backward reduce:    read x, dy 8 B, ~8 (+~20 with SiLU)      -> pass 1 of backward
//   backward dx:        read x, dy 8 B, write dx 4 B, ~10 (+20)  -> pass 2 of backward
// All far below the ~15 flop/B where an H100-class GPU turns compute bound: bandwidth bound. Forward training
// moves 12 B/elem, backward 20 B/elem, the minimum for a two-pass scheme that does not keep x in registers.
// Reductions are deterministic: each block writes its partial sums to a [rows_split, C] workspace and one thread
// per channel adds them in a fixed order (no float atomics). Sums are taken around a per-channel shift (the first
// row's value) so E[x^2] - E[x]^2 does not cancel catastrophically when |mean| >> std.
// The reduction reads 32 consecutive channels per warp (coalesced 128 B rows); the elementwise passes use 16-byte
// vectors when C is a multiple of 4 (fp32) or 8 (fp16).
#include "common.cuh"

using namespace derma;

// Mirrored in src/cuda/kernels.rs as BnParams.
struct BnParams {
    int64_t m;       // rows: N*H*W
    int32_t c;       // channels
    int32_t act;     // 0: none, 1: SiLU after the affine
    float eps;
    float momentum;  // running = (1 - momentum) * running + momentum * batch (torch convention)
    int32_t training;  // backward: 1 uses batch statistics (full BN gradient), 0 treats mean/invstd as constants
    int32_t rows_split;  // gridDim.y of the reduction kernels = rows of the partials workspace
};

// Block (32, 8), grid (ceil(C/32), rows_split). partial is [rows_split, C] float2: (sum(x - s), sum((x - s)^2)).
template <typename T>
__device__ void stats_partial(const T* __restrict__ x, float2* __restrict__ partial, BnParams p) {
    __shared__ float2 red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s1 = 0.f, s2 = 0.f;
    if (c < p.c) {
        const float shift = to_f(x[c]);
        for (int64_t r = (int64_t)blockIdx.y * 8 + threadIdx.y; r < p.m; r += (int64_t)gridDim.y * 8) {
            float d = to_f(x[r * p.c + c]) - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    red[threadIdx.y][threadIdx.x] = make_float2(s1, s2);
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float2 t = make_float2(0.f, 0.f);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            t.x += red[k][threadIdx.x].x;
            t.y += red[k][threadIdx.x].y;
        }
        partial[(int64_t)blockIdx.y * p.c + c] = t;
    }
}

// One thread per channel: batch mean and 1/sqrt(var + eps) (biased var, as torch normalises with), and the
// running statistics updated with the unbiased variance. running_* may be null.
template <typename T>
__device__ void stats_finalize(const T* __restrict__ x, const float2* __restrict__ partial, float* __restrict__ mean,
                               float* __restrict__ invstd, float* running_mean, float* running_var, BnParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.c) return;
    double s1 = 0.0, s2 = 0.0;  // rows_split terms at most: double costs nothing here and keeps the sum exact-ish
    for (int k = 0; k < p.rows_split; ++k) {
        float2 t = partial[(int64_t)k * p.c + c];
        s1 += t.x;
        s2 += t.y;
    }
    const double m = (double)p.m;
    const double dmean = s1 / m;
    double var = s2 / m - dmean * dmean;
    if (var < 0.0) var = 0.0;
    const float mu = (float)(dmean + (double)to_f(x[c]));
    mean[c] = mu;
    invstd[c] = rsqrtf((float)var + p.eps);
    if (running_mean) running_mean[c] = (1.f - p.momentum) * running_mean[c] + p.momentum * mu;
    if (running_var) {
        const float unbiased = p.m > 1 ? (float)(var * m / (m - 1.0)) : (float)var;
        running_var[c] = (1.f - p.momentum) * running_var[c] + p.momentum * unbiased;
    }
}

__device__ __forceinline__ float silu(float z) { return z / (1.f + expf(-z)); }
__device__ __forceinline__ float silu_grad(float z) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
}

// y = act(gamma * (x - mean) * invstd + beta). Grid-stride over elements (vectors of 16 B when C allows).
template <typename T>
__device__ void normalize(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ mean,
                          const float* __restrict__ invstd, const float* __restrict__ gamma,
                          const float* __restrict__ beta, BnParams p) {
    constexpr int N = Vec<T>::N;
    const int64_t total = p.m * p.c;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (p.c % N == 0 && aligned16(x) && aligned16(y)) {
        for (int64_t v = t0; v < total / N; v += stride) {
            const int c0 = (int)((v * N) % p.c);
            Vec<T> vx = load16(x + v * N), vy;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const int c = c0 + k;
                float z = gamma[c] * (to_f(vx.v[k]) - mean[c]) * invstd[c] + beta[c];
                vy.v[k] = from_f<T>(p.act ? silu(z) : z);
            }
            store16(y + v * N, vy);
        }
    } else {
        for (int64_t i = t0; i < total; i += stride) {
            const int c = (int)(i % p.c);
            float z = gamma[c] * (to_f(x[i]) - mean[c]) * invstd[c] + beta[c];
            y[i] = from_f<T>(p.act ? silu(z) : z);
        }
    }
}

// Backward pass 1: partial (sum dz, sum dz * xhat) per channel, dz = dy * act'(z). Same grid as stats_partial.
template <typename T>
__device__ void backward_partial(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean,
                                 const float* __restrict__ invstd, const float* __restrict__ gamma,
                                 const float* __restrict__ beta, float2* __restrict__ partial, BnParams p) {
    __shared__ float2 red[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float sdz = 0.f, sdzx = 0.f;
    if (c < p.c) {
        const float mu = mean[c], is = invstd[c], g = gamma[c], b = beta[c];
        for (int64_t r = (int64_t)blockIdx.y * 8 + threadIdx.y; r < p.m; r += (int64_t)gridDim.y * 8) {
            const int64_t i = r * p.c + c;
            const float xh = (to_f(x[i]) - mu) * is;
            float dz = to_f(dy[i]);
            if (p.act) dz *= silu_grad(g * xh + b);
            sdz += dz;
            sdzx += dz * xh;
        }
    }
    red[threadIdx.y][threadIdx.x] = make_float2(sdz, sdzx);
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float2 t = make_float2(0.f, 0.f);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            t.x += red[k][threadIdx.x].x;
            t.y += red[k][threadIdx.x].y;
        }
        partial[(int64_t)blockIdx.y * p.c + c] = t;
    }
}

// One thread per channel: dbeta = sum dz, dgamma = sum dz * xhat (written, not accumulated; null to skip).
__device__ void backward_finalize(const float2* __restrict__ partial, float* __restrict__ dgamma,
                                  float* __restrict__ dbeta, float* __restrict__ sums, BnParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.c) return;
    float a = 0.f, b = 0.f;
    for (int k = 0; k < p.rows_split; ++k) {
        float2 t = partial[(int64_t)k * p.c + c];
        a += t.x;
        b += t.y;
    }
    if (dbeta) dbeta[c] = a;
    if (dgamma) dgamma[c] = b;
    sums[2 * c] = a;
    sums[2 * c + 1] = b;
}

// Backward pass 2: dx = gamma * invstd * (dz - (sum dz + xhat * sum dz*xhat) / M) in training,
// dx = gamma * invstd * dz when the statistics are constants (eval / frozen BN). sums = [C] (sum dz, sum dz*xhat).
template <typename T>
__device__ void backward_dx(T* __restrict__ dx, const T* __restrict__ x, const T* __restrict__ dy,
                            const float* __restrict__ mean, const float* __restrict__ invstd,
                            const float* __restrict__ gamma, const float* __restrict__ beta,
                            const float* __restrict__ sums, BnParams p) {
    const int64_t total = p.m * p.c;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const float inv_m = 1.f / (float)p.m;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int c = (int)(i % p.c);
        const float xh = (to_f(x[i]) - mean[c]) * invstd[c];
        float dz = to_f(dy[i]);
        if (p.act) dz *= silu_grad(gamma[c] * xh + beta[c]);
        float g = dz;
        if (p.training) g -= (sums[2 * c] + xh * sums[2 * c + 1]) * inv_m;
        dx[i] = from_f<T>(gamma[c] * invstd[c] * g);
    }
}

#define DERMA_BN(T, SFX)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 4) bn_stats_partial_##SFX(const T* x, float2* partial,           \
                                                                               BnParams p) {                         \
        stats_partial(x, partial, p);                                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void bn_stats_finalize_##SFX(const T* x, const float2* partial, float* mean, float* invstd, \
                                                       float* running_mean, float* running_var, BnParams p) {       \
        stats_finalize(x, partial, mean, invstd, running_mean, running_var, p);                                      \
    }                                                                                                                 \
    extern "C" __global__ void bn_forward_##SFX(T* y, const T* x, const float* mean, const float* invstd,            \
                                                const float* gamma, const float* beta, BnParams p) {                 \
        normalize(y, x, mean, invstd, gamma, beta, p);                                                                \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                                \
        bn_backward_partial_##SFX(const T* x, const T* dy, const float* mean, const float* invstd,                   \
                                  const float* gamma, const float* beta, float2* partial, BnParams p) {              \
        backward_partial(x, dy, mean, invstd, gamma, beta, partial, p);                                              \
    }                                                                                                                 \
    extern "C" __global__ void bn_backward_dx_##SFX(T* dx, const T* x, const T* dy, const float* mean,               \
                                                    const float* invstd, const float* gamma, const float* beta,      \
                                                    const float* sums, BnParams p) {                                 \
        backward_dx(dx, x, dy, mean, invstd, gamma, beta, sums, p);                                                   \
    }

DERMA_BN(float, f32)
DERMA_BN(__half, f16)

extern "C" __global__ void bn_backward_finalize(const float2* partial, float* dgamma, float* dbeta, float* sums,
                                                BnParams p) {
    backward_finalize(partial, dgamma, dbeta, sums, p);
}

// Eval mode: mean = running_mean, invstd = 1/sqrt(running_var + eps), so bn_forward serves both modes.
extern "C" __global__ void bn_eval_stats(const float* running_mean, const float* running_var, float* mean,
                                         float* invstd, BnParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.c) return;
    mean[c] = running_mean[c];
    invstd[c] = rsqrtf(running_var[c] + p.eps);
}
