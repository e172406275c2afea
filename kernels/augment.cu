// The training augmentation fused into two kernels: a batch of plan positions (each naming a cached u8 image and
// its drawn AugParams) becomes the normalized f32 or f16 NHWC batch. It is src/data/augment.rs's `apply` operation
// for operation, so the output equals the CPU applier's bit for bit:
//   - every multiply is __fmul_rn / d_mul, so nvcc cannot fuse it with the following add (a fused multiply-add
//     rounds once where the CPU rounds twice); divisions and square roots are IEEE (nvcc's defaults, no fast math);
//   - the resize weights are recomputed in f64 exactly as AxisWeights::new computes them;
//   - the contrast mean is a fixed-point (2^40) integer sum, exact in any order, so the block-parallel reduction
//     equals the CPU's sequential one;
//   - the noise uses the portable ln / sin / cos of augment.rs (IEEE operations only), not CUDA's logf / sinf.
//
// Two passes because contrast blends with the mean grey level of the whole image as it is just before contrast:
//   1. augment_mean_partial: grid (out_size rows, batch), one block per output row; geometry + the colour
//      operations before contrast, per-row fixed-point grey sums -> partials[batch][out_size] (u64).
//   2. augment_apply_{f32,f16}: same grid; each block sums its image's row partials (exact), recomputes geometry and
//      the colour operations, applies contrast and the rest, normalizes, adds noise, stores.
// Pass 2 recomputes pass 1's geometry instead of storing it: a stored f32 intermediate would cost 12 B/pixel of
// writes and reads, while the recompute reads the same u8 source bytes again, mostly from L2.
//
// Napkin math, 224->224, per image: 50,176 pixels x 3 channels. DRAM: the u8 source is read once (150 KB; pass 2
// finds it in L2 when a batch's sources fit, 256 images x 150 KB = 38 MB < the H200's 50 MB L2), the output written
// once: 301 KB (f16) or 602 KB (f32). So ~450 KB (f16) per image: 25,331 images move 11.4 GB, 2.4 ms at 4.8 TB/s.
// Compute per output pixel and pass: ~9 bilinear taps x (inverse rotation ~10 flops + 3 multiply-adds), ~40 f64
// flops for the two axes' weights, colour ~60 flops (hue's HSV round trip), noise ~2 x 40 flops (hash, ln, sin/cos)
// in pass 2 only: ~400 flops per pixel for both passes, 20 MFLOP per image, 0.5 TFLOP per ISIC epoch: ~10-20 ms on
// an H200 (67 TFLOP/s f32, 34 f64). Compute bound but far under a second per epoch; the target is met with a wide
// margin, so the kernel favours exactness over speed (no shared-memory tiling of the source).
#include "common.cuh"

using namespace derma;

// Mirror of AugParams in src/data/augment.rs (80 bytes, #[repr(C)]).
struct AugParams {
    uint64_t noise_seed;
    uint32_t flip;
    float angle_deg, cos_a, sin_a;
    uint32_t crop_top, crop_left, crop_h, crop_w;
    float brightness, contrast, saturation, hue;
    uint32_t order[4];
    float noise_std;
    uint32_t pad_;
};
static_assert(sizeof(AugParams) == 80, "AugParams is 80 bytes, as in src/data/augment.rs");

// Mirror of AugShape in src/cuda/augment.rs.
struct AugShape {
    int64_t position0;  // plan position of sample 0 (plus *step x batch when step is given)
    int64_t positions;  // plan entries: a position at or past it is not read
    int64_t slots;      // source images: a slot at or past it is not read
    int32_t batch;
    int32_t size;       // source side S
    int32_t out_size;   // output side
    int32_t pad_;
};

constexpr int kAugThreads = 128;

__device__ __forceinline__ double d_mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}

__device__ __forceinline__ float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

// One axis of the bilinear (PIL) resize for output index o: window start, taps read, normalizer.
struct Axis {
    double center, filterscale, total;
    int start, count;
};

__device__ __forceinline__ double tri_weight(const Axis& a, int x) {
    const double t = fabs((((double)x - a.center) + 0.5) / a.filterscale);
    return t < 1.0 ? 1.0 - t : 0.0;
}

__device__ Axis make_axis(int in_len, int out_len, int o) {
    Axis a;
    const double scale = (double)in_len / (double)out_len;
    a.filterscale = scale > 1.0 ? scale : 1.0;
    const double support = a.filterscale;
    const int taps = (int)ceil(support) * 2 + 1;
    a.center = d_mul((double)o + 0.5, scale);
    long long xmin = (long long)trunc((a.center - support) + 0.5);
    if (xmin < 0) xmin = 0;
    long long xmax = (long long)trunc((a.center + support) + 0.5);
    if (xmax > in_len) xmax = in_len;
    if (xmax < xmin) xmax = xmin;
    a.start = (int)xmin;
    a.total = 0.0;
    for (long long x = xmin; x < xmax; ++x) a.total += tri_weight(a, (int)x);
    const int len = (int)(xmax - xmin);
    a.count = len < taps ? len : taps;
    return a;
}

__device__ __forceinline__ float axis_weight(const Axis& a, int k) {
    const double w = tri_weight(a, a.start + k);
    return (float)(a.total > 0.0 ? w / a.total : w);
}

// Geometry of output pixel (oy, ox): RGB in [0, 1].
__device__ float3 geometry(const uint8_t* __restrict__ src, int S, const AugParams& p, const Axis& ay,
                           const Axis& ax) {
    float acc[3] = {0.0f, 0.0f, 0.0f};
    const float cx = __fmul_rn((float)S, 0.5f), cy = cx;
    for (int ky = 0; ky < ay.count; ++ky) {
        const float fy = axis_weight(ay, ky);
        if (fy == 0.0f) continue;
        const unsigned ry = p.crop_top + (unsigned)ay.start + (unsigned)ky;
        for (int kx = 0; kx < ax.count; ++kx) {
            const float fx = axis_weight(ax, kx);
            if (fx == 0.0f) continue;
            const unsigned rx = p.crop_left + (unsigned)ax.start + (unsigned)kx;
            // Inverse rotation about the centre (PIL), nearest source pixel, 0 outside; then undo the flip.
            const float dx = ((float)rx + 0.5f) - cx, dy = ((float)ry + 0.5f) - cy;
            const float xin = (__fmul_rn(p.cos_a, dx) - __fmul_rn(p.sin_a, dy)) + cx;
            const float yin = (__fmul_rn(p.sin_a, dx) + __fmul_rn(p.cos_a, dy)) + cy;
            if (!(xin >= 0.0f && yin >= 0.0f)) continue;
            const unsigned x = (unsigned)xin, y = (unsigned)yin;
            if (x >= (unsigned)S || y >= (unsigned)S) continue;
            const unsigned sx = p.flip ? (unsigned)S - 1u - x : x;
            const uint8_t* px = src + ((size_t)y * S + sx) * 3;
            const float fyx = __fmul_rn(fy, fx);
#pragma unroll
            for (int c = 0; c < 3; ++c) acc[c] = acc[c] + __fmul_rn(fyx, (float)px[c]);
        }
    }
    return make_float3(clamp01(acc[0] / 255.0f), clamp01(acc[1] / 255.0f), clamp01(acc[2] / 255.0f));
}

__device__ __forceinline__ float gray(float3 v) {
    return (__fmul_rn(0.299f, v.x) + __fmul_rn(0.587f, v.y)) + __fmul_rn(0.114f, v.z);
}

__device__ __forceinline__ float blend1(float a, float b, float f) { return clamp01(b + __fmul_rn(f, a - b)); }

__device__ __forceinline__ float3 blend(float3 a, float b, float f) {
    return make_float3(blend1(a.x, b, f), blend1(a.y, b, f), blend1(a.z, b, f));
}

__device__ __forceinline__ float floor_small(float x) {
    const float t = (float)(int)x;
    return t > x ? t - 1.0f : t;
}

// torchvision's tensor hue shift (RGB -> HSV, h += shift mod 1, HSV -> RGB), as augment.rs's adjust_hue.
__device__ float3 adjust_hue(float3 p, float shift) {
    const float r = p.x, g = p.y, b = p.z;
    const float maxc = fmaxf(fmaxf(r, g), b), minc = fminf(fminf(r, g), b);
    const float cr = maxc - minc;
    if (cr == 0.0f) return p;
    const float s = cr / maxc;
    const float inv = 1.0f / cr;
    const float rc = __fmul_rn(maxc - r, inv), gc = __fmul_rn(maxc - g, inv), bc = __fmul_rn(maxc - b, inv);
    float h;
    if (maxc == r) h = bc - gc;
    else if (maxc == g) h = (2.0f + rc) - bc;
    else h = (4.0f + gc) - rc;
    h = __fmul_rn(h, 1.0f / 6.0f);
    if (h < 0.0f) h += 1.0f;
    h = h + shift;
    h = h - floor_small(h);
    const float v = maxc;
    const float h6 = __fmul_rn(h, 6.0f);
    int i = (int)h6;
    if (i > 5) i = 5;
    const float f = h6 - (float)i;
    const float pp = clamp01(__fmul_rn(v, 1.0f - s));
    const float q = clamp01(__fmul_rn(v, 1.0f - __fmul_rn(s, f)));
    const float t = clamp01(__fmul_rn(v, 1.0f - __fmul_rn(s, 1.0f - f)));
    switch (i) {
        case 0: return make_float3(v, t, pp);
        case 1: return make_float3(q, v, pp);
        case 2: return make_float3(pp, v, t);
        case 3: return make_float3(pp, q, v);
        case 4: return make_float3(t, pp, v);
        default: return make_float3(v, pp, q);
    }
}

// The colour operations order[from..to) (0 brightness, 1 contrast with `mean`, 2 saturation, 3 hue).
__device__ float3 color_ops(float3 px, const AugParams& p, int from, int to, float mean) {
    for (int k = from; k < to; ++k) {
        switch (p.order[k]) {
            case 0: px = blend(px, 0.0f, p.brightness); break;
            case 1: px = blend(px, mean, p.contrast); break;
            case 2: px = blend(px, gray(px), p.saturation); break;
            default: px = adjust_hue(px, p.hue); break;
        }
    }
    return px;
}

__device__ __forceinline__ int contrast_at(const AugParams& p) {
    for (int k = 0; k < 4; ++k)
        if (p.order[k] == 1) return k;
    return 4;
}

// ---- the noise generator of augment.rs (noise_pair, portable_ln, portable_sin_cos) ----------------------------
__device__ __forceinline__ uint64_t split_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ float portable_ln(float x) {
    const unsigned bits = __float_as_uint(x);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > 1.41421356237309504880f) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = __fmul_rn(s, s);
    const float series = __fmul_rn(
        z, 0.33333334f +
               __fmul_rn(z, 0.2f + __fmul_rn(z, 0.14285715f + __fmul_rn(z, 0.11111111f + __fmul_rn(z, 0.09090909f)))));
    const float ln_m = __fmul_rn(s + __fmul_rn(s, series), 2.0f);
    return __fmul_rn((float)e, 0.693147180559945309417f) + ln_m;
}

__device__ float2 portable_sin_cos(unsigned k) {
    const unsigned shifted = (k & 0x00ffffffu) + (1u << 21);
    const unsigned quadrant = (shifted >> 22) & 3u;
    const int r = (int)(shifted & ((1u << 22) - 1u)) - (1 << 21);
    const float x = __fmul_rn((float)r, 6.28318530717958647692f / 16777216.0f);
    const float z = __fmul_rn(x, x);
    const float s =
        x + __fmul_rn(x, __fmul_rn(z, -0.16666667f +
                                          __fmul_rn(z, 0.008333334f +
                                                           __fmul_rn(z, -0.0001984127f + __fmul_rn(z, 2.7557319e-6f)))));
    const float c =
        1.0f + __fmul_rn(z, -0.5f + __fmul_rn(z, 0.041666668f +
                                                    __fmul_rn(z, -0.0013888889f + __fmul_rn(z, 2.4801587e-5f))));
    switch (quadrant) {
        case 0: return make_float2(s, c);
        case 1: return make_float2(c, -s);
        case 2: return make_float2(-s, -c);
        default: return make_float2(-c, s);
    }
}

__device__ float noise_at(uint64_t seed, uint64_t i) {
    const uint64_t h1 = split_mix(seed ^ split_mix(i >> 1));
    const uint64_t h2 = split_mix(h1 ^ 0xA0761D6478BD642Full);
    const float u1 = __fmul_rn((float)(h1 >> 40) + 1.0f, 1.0f / 16777216.0f);
    const float r = __fsqrt_rn(__fmul_rn(-2.0f, portable_ln(u1)));
    const float2 sc = portable_sin_cos((unsigned)(h2 >> 40));
    return (i & 1) == 0 ? __fmul_rn(r, sc.y) : __fmul_rn(r, sc.x);
}

// ---- the two passes -----------------------------------------------------------------------------------------
struct Sample {
    const uint8_t* src;
    const AugParams* p;
    int64_t slot;
    int b;
    bool valid;  // position and slot inside the plan and the source (a replayed step counter could run past)
};

__device__ __forceinline__ Sample sample_of(const uint8_t* images, const int32_t* table, const AugParams* params,
                                            const int64_t* step, const AugShape& sh) {
    Sample s;
    s.b = (int)blockIdx.y;
    const int64_t position = sh.position0 + (step ? *step * (int64_t)sh.batch : 0) + s.b;
    s.valid = position >= 0 && position < sh.positions;
    s.slot = !s.valid ? 0 : table ? (int64_t)table[position] : (int64_t)s.b;
    s.valid = s.valid && s.slot >= 0 && s.slot < sh.slots;
    s.src = images + (s.valid ? s.slot : 0) * ((int64_t)sh.size * sh.size * 3);
    s.p = params + (s.valid ? position : 0);
    return s;
}

// Pass 1: partials[b * out_size + oy] = sum over row oy of grey_fixed(grey after the pre-contrast operations).
extern "C" __global__ void __launch_bounds__(kAugThreads)
    augment_mean_partial(uint64_t* __restrict__ partials, const uint8_t* __restrict__ images,
                         const int32_t* __restrict__ table, const AugParams* __restrict__ params,
                         const int64_t* __restrict__ step, AugShape sh) {
    __shared__ unsigned long long sums[kAugThreads];
    const Sample s = sample_of(images, table, params, step, sh);
    if (!s.valid) return;  // block-uniform
    const AugParams p = *s.p;
    const int os = sh.out_size, oy = (int)blockIdx.x;
    const int k = contrast_at(p);
    const Axis ay = make_axis((int)p.crop_h, os, oy);
    unsigned long long sum = 0;
    for (int ox = threadIdx.x; ox < os; ox += blockDim.x) {
        const Axis ax = make_axis((int)p.crop_w, os, ox);
        const float3 v = color_ops(geometry(s.src, sh.size, p, ay, ax), p, 0, k, 0.0f);
        sum += (unsigned long long)d_mul((double)gray(v), 1099511627776.0);
    }
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kAugThreads / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[(int64_t)s.b * os + oy] = sums[0];
}

// Pass 2: the output row oy of sample b; labels_out[b] = labels[slot] when both are given.
template <typename T>
__device__ void augment_apply(T* __restrict__ out, int32_t* __restrict__ labels_out, const uint8_t* __restrict__ images,
                              const int32_t* __restrict__ labels, const int32_t* __restrict__ table,
                              const AugParams* __restrict__ params, const uint64_t* __restrict__ partials,
                              const int64_t* __restrict__ step, const AugShape& sh) {
    __shared__ unsigned long long sums[kAugThreads];
    const Sample s = sample_of(images, table, params, step, sh);
    const int os = sh.out_size, oy = (int)blockIdx.x;
    T* row = out + ((int64_t)s.b * os + oy) * os * 3;
    if (!s.valid) {  // block-uniform: the sample comes out as NaN, visibly wrong
        for (int i = threadIdx.x; i < os * 3; i += blockDim.x) row[i] = from_f<T>(__int_as_float(0x7fc00000));
        return;
    }
    const AugParams p = *s.p;
    // The image's grey sum: integer addition, so any grouping gives the CPU's value.
    unsigned long long sum = 0;
    for (int r = threadIdx.x; r < os; r += blockDim.x) sum += partials[(int64_t)s.b * os + r];
    sums[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kAugThreads / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
        __syncthreads();
    }
    const float mean = (float)((double)sums[0] / 1099511627776.0 / (double)((int64_t)os * os));
    if (labels_out && labels && oy == 0 && threadIdx.x == 0) labels_out[s.b] = labels[s.slot];

    const float kMean[3] = {0.485f, 0.456f, 0.406f};
    const float kStd[3] = {0.229f, 0.224f, 0.225f};
    const int k = contrast_at(p);
    const Axis ay = make_axis((int)p.crop_h, os, oy);
    for (int ox = threadIdx.x; ox < os; ox += blockDim.x) {
        const Axis ax = make_axis((int)p.crop_w, os, ox);
        float3 v = color_ops(geometry(s.src, sh.size, p, ay, ax), p, 0, k, 0.0f);
        v = color_ops(v, p, k, 4, mean);
        const float ch[3] = {v.x, v.y, v.z};
        const uint64_t e0 = ((uint64_t)oy * os + ox) * 3;
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            float o = (ch[c] - kMean[c]) / kStd[c];
            if (p.noise_std != 0.0f) o = o + __fmul_rn(p.noise_std, noise_at(p.noise_seed, e0 + c));
            row[ox * 3 + c] = from_f<T>(o);
        }
    }
}

#define AUGMENT_APPLY(T, SUFFIX)                                                                                     \
    extern "C" __global__ void __launch_bounds__(kAugThreads) augment_apply_##SUFFIX(                               \
        T* __restrict__ out, int32_t* __restrict__ labels_out, const uint8_t* __restrict__ images,                   \
        const int32_t* __restrict__ labels, const int32_t* __restrict__ table, const AugParams* __restrict__ params, \
        const uint64_t* __restrict__ partials, const int64_t* __restrict__ step, AugShape sh) {                      \
        augment_apply<T>(out, labels_out, images, labels, table, params, partials, step, sh);                        \
    }
AUGMENT_APPLY(float, f32)
AUGMENT_APPLY(__half, f16)
