// Softmax cross-entropy over logits [B, K] with optional class weights, and the focal loss of the seed pipeline,
// forward (mean loss, optional probabilities) and backward (dlogits) in one launch.
//
//   weighted CE (torch CrossEntropyLoss(weight=alpha), mean): loss = sum_i alpha[y_i] * ce_i / sum_i alpha[y_i],
//       ce_i = -log softmax(z_i)[y_i];  dz_ij = alpha[y_i] * (p_ij - [j = y_i]) / sum_i alpha[y_i]
//   focal (seed): ce_i = -alpha[y_i] * log softmax(z_i)[y_i]; pt_i = exp(-ce_i); loss = mean_i (1 - pt_i)^g * ce_i
//       dL_i/dce_i = (1 - pt)^g + g * (1 - pt)^(g-1) * pt * ce;  dz_ij = dL_i/dce_i * alpha[y_i] * (p_ij - [j = y_i]) / B
//
// Napkin math: B*K is tiny (B <= a few thousand, K = 8 or 9 for ISIC): reading B*K logits and writing B*K
// gradients is a few tens of KB, so one block does the whole batch and the cost is the launch (~5 us). Doing it in
// one block makes the batch-wide denominators and the final sum deterministic without a second launch.
#include "common.cuh"

using namespace derma;

// Mirrored in src/cuda/kernels.rs as LossParams.
struct LossParams {
    int32_t b, k;
    int32_t focal;     // 0: weighted CE, 1: focal
    float gamma;       // focal exponent
    float grad_scale;  // multiplies dlogits (e.g. the loss scale); 0 skips writing the gradient
    int32_t pad_;
};

// Log-softmax pieces of row i: max and log-sum-exp.
template <typename T>
__device__ __forceinline__ float row_lse(const T* z, int k) {
    float m = -INFINITY;
    for (int j = 0; j < k; ++j) m = fmaxf(m, to_f(z[j]));
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += expf(to_f(z[j]) - m);
    return m + logf(s);
}

// One block of 256 threads; thread t handles rows t, t + 256, ... . loss_out: 1 float. probs may be null.
// alpha may be null (all ones). Targets outside [0, K) contribute nothing; *bad_target receives the 1-based index
// of the first such row, or 0 when every target is valid. Several threads may find bad rows: they meet in a shared
// atomicMin and thread 0 stores the result once, so bad_target needs no initial value.
// grad_scale_dev, when not null, multiplies the gradient scale by a device value (the loss scale of a replayed
// mixed-precision step, which changes between replays and so cannot be a launch argument).
template <typename T>
__device__ void softmax_loss(float* __restrict__ loss_out, T* __restrict__ dlogits, float* __restrict__ probs,
                             int32_t* __restrict__ bad_target, const T* __restrict__ logits,
                             const int32_t* __restrict__ targets, const float* __restrict__ alpha,
                             const float* __restrict__ grad_scale_dev, LossParams p) {
    if (grad_scale_dev && p.grad_scale != 0.f) p.grad_scale *= *grad_scale_dev;
    __shared__ float scratch[32];
    constexpr int kNone = 0x7fffffff;
    __shared__ int first_bad;  // 0-based row, kNone while none
    if (threadIdx.x == 0) first_bad = kNone;
    float wsum = 0.f;
    for (int i = threadIdx.x; i < p.b; i += blockDim.x) {
        const int y = targets[i];
        if (y >= 0 && y < p.k) wsum += alpha ? alpha[y] : 1.f;
    }
    wsum = block_sum(wsum, scratch);  // its barriers also publish first_bad's initial value
    const float denom = p.focal ? (float)p.b : wsum;
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    float lsum = 0.f;
    for (int i = threadIdx.x; i < p.b; i += blockDim.x) {
        const T* z = logits + (int64_t)i * p.k;
        const int y = targets[i];
        const float lse = row_lse(z, p.k);
        if (probs)
            for (int j = 0; j < p.k; ++j) probs[(int64_t)i * p.k + j] = expf(to_f(z[j]) - lse);
        if (y < 0 || y >= p.k) {
            atomicMin(&first_bad, i);
            if (p.grad_scale != 0.f)
                for (int j = 0; j < p.k; ++j) dlogits[(int64_t)i * p.k + j] = from_f<T>(0.f);
            continue;
        }
        const float a = alpha ? alpha[y] : 1.f;
        const float nll = lse - to_f(z[y]);  // -log softmax[y]
        float coef;                           // dL/d(log-softmax term) per row, before the batch normaliser
        if (p.focal) {
            const float ce = a * nll;
            const float pt = expf(-ce);
            const float one_m = fmaxf(1.f - pt, 0.f);
            const float w = powf(one_m, p.gamma);
            lsum += w * ce;
            const float extra = one_m > 0.f ? p.gamma * powf(one_m, p.gamma - 1.f) * pt * ce : 0.f;
            coef = (w + extra) * a;
        } else {
            lsum += a * nll;
            coef = a;
        }
        if (p.grad_scale != 0.f) {
            const float g = coef * inv * p.grad_scale;
            for (int j = 0; j < p.k; ++j) {
                const float pj = expf(to_f(z[j]) - lse);
                dlogits[(int64_t)i * p.k + j] = from_f<T>(g * (pj - (j == y ? 1.f : 0.f)));
            }
        }
    }
    lsum = block_sum(lsum, scratch);  // its barriers make every atomicMin visible to thread 0
    if (threadIdx.x == 0) {
        *loss_out = lsum * inv;
        *bad_target = first_bad == kNone ? 0 : first_bad + 1;
    }
}

// Running sums of a training epoch on the device, so the host reads them once per epoch instead of once per step:
// sums[0] += loss * B when the loss is finite (else sums[3] += 1), sums[1] += rows whose argmax (the first
// maximum, as the host's) is the target, sums[2] += B. One block; B*K is tiny (see the napkin math above); f64
// keeps the counts exact and the loss sum independent of the epoch's length.
template <typename T>
__device__ void train_metrics(double* __restrict__ sums, const float* __restrict__ loss, const T* __restrict__ logits,
                              const int32_t* __restrict__ targets, int32_t b, int32_t k) {
    __shared__ float scratch[32];
    float correct = 0.f;
    for (int i = threadIdx.x; i < b; i += blockDim.x) {
        const T* z = logits + (int64_t)i * k;
        int best = 0;
        for (int j = 1; j < k; ++j)
            if (to_f(z[j]) > to_f(z[best])) best = j;
        correct += best == targets[i] ? 1.f : 0.f;
    }
    correct = block_sum(correct, scratch);  // exact: integers below 2^24
    if (threadIdx.x == 0) {
        const float l = *loss;
        if (isfinite(l)) {
            sums[0] += (double)l * (double)b;
        } else {
            sums[3] += 1.0;
        }
        sums[1] += (double)correct;
        sums[2] += (double)b;
    }
}

#define DERMA_LOSS(T, SFX)                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                                \
        softmax_loss_##SFX(float* loss_out, T* dlogits, float* probs, int32_t* bad_target, const T* logits,          \
                           const int32_t* targets, const float* alpha, const float* grad_scale_dev,                  \
                           LossParams p) {                                                                           \
        softmax_loss(loss_out, dlogits, probs, bad_target, logits, targets, alpha, grad_scale_dev, p);               \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, 4) train_metrics_##SFX(                                        \
        double* sums, const float* loss, const T* logits, const int32_t* targets, int32_t b, int32_t k) {            \
        train_metrics(sums, loss, logits, targets, b, k);                                                            \
    }

DERMA_LOSS(float, f32)
DERMA_LOSS(__half, f16)
