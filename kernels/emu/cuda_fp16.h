// cuda_fp16.h for the emulated device: __half and __half2 as CUDA lays them out (2 and 4 bytes), with
// round-to-nearest-even conversions done by GCC's _Float16 (IEEE binary16: subnormals kept, ties to even,
// overflow to infinity, NaN kept a NaN), exactly what __float2half_rn does on the GPU. Found before any real
// CUDA header because kernels/emu comes first on the include path of the host build.
#pragma once

#include <stdint.h>
#include <string.h>

#if !defined(__FLT16_MANT_DIG__)
#error "the emulated device needs a host compiler with _Float16 (GCC 12+ or Clang 15+ on x86-64 or AArch64)"
#endif

struct __half_raw {
    unsigned short x;
};
struct __half2_raw {
    unsigned short x, y;
};

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    // Implicit conversions as CUDA's header provides them (unless __CUDA_NO_HALF_CONVERSIONS__).
    __half(float f) : __x(from_float(f)) {}
    __half(double d) : __x(from_float16((_Float16)d)) {}
    operator float() const { return to_float(__x); }
    operator __half_raw() const { return __half_raw{__x}; }

    static unsigned short from_float16(_Float16 h) {
        unsigned short b;
        memcpy(&b, &h, 2);
        return b;
    }
    // float -> binary16 rounds to nearest even in one step (GCC lowers it to __truncsfhf2 or vcvtps2ph).
    static unsigned short from_float(float f) { return from_float16((_Float16)f); }
    static float to_float(unsigned short b) {
        _Float16 h;
        memcpy(&h, &b, 2);
        return (float)h;  // exact: every binary16 value is a float
    }
};

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
    __half2() = default;
    __half2(__half a, __half b) : x(a), y(b) {}
    __half2(const __half2_raw& r) : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes, aligned 2 in CUDA");
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4, "__half2 is 4 bytes, aligned 4 in CUDA");

inline __half __float2half_rn(float f) { return __half(__half_raw{__half::from_float(f)}); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return __half::to_float(h.__x); }
inline __half __double2half(double d) { return __half(__half_raw{__half::from_float16((_Float16)d)}); }
inline __half2 __float2half2_rn(float f) { return __half2(__float2half_rn(f), __float2half_rn(f)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half_rn(a), __float2half_rn(b)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return __half(__half_raw{b}); }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __short_as_half(short b) { return __half(__half_raw{(unsigned short)b}); }
// Arithmetic: the exact result rounded once to binary16, as the GPU's fp16 units do. The intermediate is a
// double: + - * of two halves are exact in it, and for / double rounding through 53 bits is harmless
// (53 >= 2 * 11 + 2), so each result is the correctly rounded one.
inline __half __hadd(__half a, __half b) { return __double2half((double)__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __double2half((double)__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __double2half((double)__half2float(a) * __half2float(b)); }
inline __half __hdiv(__half a, __half b) { return __double2half((double)__half2float(a) / __half2float(b)); }
inline __half __hfma(__half a, __half b, __half c) {
    // a*b is exact in double; adding c is exact too unless their exponents are more than ~30 apart, where the
    // single rounding of a true fused multiply-add can differ in the last place.
    return __double2half((double)__half2float(a) * __half2float(b) + __half2float(c));
}
inline __half __hneg(__half a) { return __ushort_as_half((unsigned short)(a.__x ^ 0x8000u)); }
inline bool __hisnan(__half a) { return (a.__x & 0x7fffu) > 0x7c00u; }
inline bool __hisinf(__half a) { return (a.__x & 0x7fffu) == 0x7c00u; }
inline __half2 __hadd2(__half2 a, __half2 b) { return __half2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
inline __half2 __hmul2(__half2 a, __half2 b) { return __half2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }

// Operators as CUDA's header defines them for device code (unless __CUDA_NO_HALF_OPERATORS__): a kernel may
// write `h += x` with an __half accumulator, and must then get fp16 rounding at every step.
inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
inline __half& operator+=(__half& a, const __half& b) { return a = __hadd(a, b); }
inline __half& operator-=(__half& a, const __half& b) { return a = __hsub(a, b); }
inline __half& operator*=(__half& a, const __half& b) { return a = __hmul(a, b); }
inline __half& operator/=(__half& a, const __half& b) { return a = __hdiv(a, b); }
inline __half operator-(const __half& a) { return __hneg(a); }
inline __half operator+(const __half& a) { return a; }
inline bool operator==(const __half& a, const __half& b) { return __half2float(a) == __half2float(b); }
inline bool operator!=(const __half& a, const __half& b) { return __half2float(a) != __half2float(b); }
inline bool operator<(const __half& a, const __half& b) { return __half2float(a) < __half2float(b); }
inline bool operator>(const __half& a, const __half& b) { return __half2float(a) > __half2float(b); }
inline bool operator<=(const __half& a, const __half& b) { return __half2float(a) <= __half2float(b); }
inline bool operator>=(const __half& a, const __half& b) { return __half2float(a) >= __half2float(b); }
