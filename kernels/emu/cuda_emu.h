// The CUDA execution model as host C++: kernels/*.cu compile unchanged with g++ -std=c++20 against this header
// (force-included with -include) and run on the CPU, one block after another, each thread of a block a cooperative
// fiber that switches only at barriers, warp collectives and exit (kernels/emu/runtime.cpp). Used only for the
// emulated device; the GPU build (nvcc) never sees it.
//
// Why fibers switch only at sync points: between two sync points CUDA promises nothing about the order in which
// threads run, so running each thread alone up to its next sync point is one legal interleaving. Choosing the
// order picks different legal interleavings, which is what exposes a missing barrier: forward, reverse and
// warp-reverse run one warp at a time through its warp collectives up to the next block barrier (warps 0..W-1;
// W-1..0 with lanes reversed too; W-1..0 with lanes in order), random runs every ready thread to its next sync
// point in a fresh random order each time. What this cannot show: races inside one interleaving step (the memory model), lockstep warp
// timing, and anything of PTX, ptxas or the driver.
//
// Shared memory: `__shared__` is `static` storage. Blocks run one after another, so one copy per kernel serves
// every block, and launches are serialised by one mutex in the runtime because of it. Static (not thread_local)
// storage is deliberate: AddressSanitizer puts redzones around static arrays but not around thread_local ones, so
// only static storage lets the ASan flavour catch a shared-memory overrun.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>
#include <utility>

// ---- qualifiers ------------------------------------------------------------------------------------------------
#ifdef DERMA_EMU_SCAN
// build.rs preprocesses each kernel file with DERMA_EMU_SCAN to find its entry points: a kernel reads
// `extern "C" derma_emu_global_mark void name(` after expansion, whatever macros stamped it out.
#define __global__ derma_emu_global_mark
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#ifdef DERMA_EMU_SCAN
// The scan reads the bound too: a launch with more threads per block than a kernel's __launch_bounds__ fails on
// the GPU ("too many resources requested"), so the emulator refuses it as well.
#define __launch_bounds__(...) derma_emu_launch_bounds_mark(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __shared__ static
#define __managed__
// __restrict__ is a GCC keyword already.

// ---- vector types (CUDA's sizes and alignments: float2 8/8, float4 16/16, uint4 16/16, ...) --------------------
#define DERMA_EMU_VEC2(T, NAME, ALIGN) \
    struct __attribute__((aligned(ALIGN))) NAME { T x, y; };
#define DERMA_EMU_VEC3(T, NAME) \
    struct NAME { T x, y, z; };
#define DERMA_EMU_VEC4(T, NAME, ALIGN) \
    struct __attribute__((aligned(ALIGN))) NAME { T x, y, z, w; };
DERMA_EMU_VEC2(char, char2, 2)
DERMA_EMU_VEC2(unsigned char, uchar2, 2)
DERMA_EMU_VEC4(char, char4, 4)
DERMA_EMU_VEC4(unsigned char, uchar4, 4)
DERMA_EMU_VEC2(short, short2, 4)
DERMA_EMU_VEC2(unsigned short, ushort2, 4)
DERMA_EMU_VEC4(short, short4, 8)
DERMA_EMU_VEC4(unsigned short, ushort4, 8)
DERMA_EMU_VEC2(int, int2, 8)
DERMA_EMU_VEC2(unsigned int, uint2, 8)
DERMA_EMU_VEC3(int, int3)
DERMA_EMU_VEC3(unsigned int, uint3)
DERMA_EMU_VEC4(int, int4, 16)
DERMA_EMU_VEC4(unsigned int, uint4, 16)
DERMA_EMU_VEC2(float, float2, 8)
DERMA_EMU_VEC3(float, float3)
DERMA_EMU_VEC4(float, float4, 16)
DERMA_EMU_VEC2(long long, longlong2, 16)
DERMA_EMU_VEC2(unsigned long long, ulonglong2, 16)
DERMA_EMU_VEC2(double, double2, 16)
#undef DERMA_EMU_VEC2
#undef DERMA_EMU_VEC3
#undef DERMA_EMU_VEC4

static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 is 8 bytes, aligned 8 in CUDA");
static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 is 16 bytes, aligned 16 in CUDA");
static_assert(sizeof(uint4) == 16 && alignof(uint4) == 16, "uint4 is 16 bytes, aligned 16 in CUDA");
static_assert(sizeof(int2) == 8 && alignof(int2) == 8, "int2 is 8 bytes, aligned 8 in CUDA");
static_assert(sizeof(float3) == 12 && alignof(float3) == 4, "float3 is 12 bytes, aligned 4 in CUDA");
static_assert(sizeof(double2) == 16 && alignof(double2) == 16, "double2 is 16 bytes, aligned 16 in CUDA");

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- the runtime's view of the running block and thread (kernels/emu/runtime.cpp) ------------------------------
namespace derma_emu {

// Everything a kernel can ask about the launch. One launch runs at a time (the runtime's mutex), so one instance
// serves; `thread` points at the running fiber's index and is updated at every switch.
struct LaunchView {
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    const uint3* thread_idx;
    unsigned char* dynamic_shared;
};
extern LaunchView g_view;

// Dynamic shared memory (`extern __shared__ T name[]`): one buffer of the most a block may have without opting in.
constexpr unsigned kMaxSharedBytes = 48 * 1024;
extern unsigned char g_dynamic_shared[kMaxSharedBytes];

// Block-wide barrier kinds: __syncthreads and its reducing variants.
enum BarrierKind : int { BARRIER_PLAIN = 0, BARRIER_COUNT = 1, BARRIER_AND = 2, BARRIER_OR = 3 };
// Warp collectives. Value-carrying shuffles move up to 8 bytes.
enum WarpOp : int {
    WARP_SHFL_IDX = 0,
    WARP_SHFL_UP = 1,
    WARP_SHFL_DOWN = 2,
    WARP_SHFL_XOR = 3,
    WARP_ANY = 4,
    WARP_ALL = 5,
    WARP_BALLOT = 6,
    WARP_SYNC = 7,
};

// Blocks the calling fiber until every live thread of the block arrives; returns the reduced predicate.
int block_barrier(BarrierKind kind, int predicate, const char* file, int line);
// Blocks the calling fiber until every lane of `mask` arrives; returns the lane's result (raw bits).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
// Stops the block with an error message (reported by the launch).
[[noreturn]] void kernel_fault(const char* file, int line, const char* what);

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

template <typename T>
inline T shfl(WarpOp op, unsigned mask, T var, int arg, int width, const char* file, int line) {
    return from_bits<T>(warp_collective(op, mask, to_bits(var), arg, width, file, line));
}

}  // namespace derma_emu

#define threadIdx (*::derma_emu::g_view.thread_idx)
#define blockIdx (::derma_emu::g_view.block_idx)
#define blockDim (::derma_emu::g_view.block_dim)
#define gridDim (::derma_emu::g_view.grid_dim)
#define warpSize 32

// ---- barriers and collectives (macros so the report names the kernel's file and line) ---------------------------
#define __syncthreads() ((void)::derma_emu::block_barrier(::derma_emu::BARRIER_PLAIN, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) \
    (::derma_emu::block_barrier(::derma_emu::BARRIER_COUNT, (p) != 0, __FILE__, __LINE__))
#define __syncthreads_and(p) (::derma_emu::block_barrier(::derma_emu::BARRIER_AND, (p) != 0, __FILE__, __LINE__))
#define __syncthreads_or(p) (::derma_emu::block_barrier(::derma_emu::BARRIER_OR, (p) != 0, __FILE__, __LINE__))
#define __syncwarp(...) \
    ((void)::derma_emu::warp_collective(::derma_emu::WARP_SYNC, ::derma_emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32, \
                                        __FILE__, __LINE__))
#define __any_sync(mask, p) \
    ((int)::derma_emu::warp_collective(::derma_emu::WARP_ANY, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __all_sync(mask, p) \
    ((int)::derma_emu::warp_collective(::derma_emu::WARP_ALL, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __ballot_sync(mask, p) \
    ((unsigned)::derma_emu::warp_collective(::derma_emu::WARP_BALLOT, (mask), (p) != 0, 0, 32, __FILE__, __LINE__))
#define __shfl_sync(mask, var, lane, ...) \
    (::derma_emu::shfl(::derma_emu::WARP_SHFL_IDX, (mask), (var), (lane), ::derma_emu::shfl_width(__VA_ARGS__), \
                       __FILE__, __LINE__))
#define __shfl_up_sync(mask, var, delta, ...) \
    (::derma_emu::shfl(::derma_emu::WARP_SHFL_UP, (mask), (var), (int)(delta), \
                       ::derma_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__))
#define __shfl_down_sync(mask, var, delta, ...) \
    (::derma_emu::shfl(::derma_emu::WARP_SHFL_DOWN, (mask), (var), (int)(delta), \
                       ::derma_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__))
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
    (::derma_emu::shfl(::derma_emu::WARP_SHFL_XOR, (mask), (var), (lane_mask), \
                       ::derma_emu::shfl_width(__VA_ARGS__), __FILE__, __LINE__))

namespace derma_emu {
// The optional last argument of __syncwarp (mask, default all lanes) and of the shuffles (width, default 32).
constexpr unsigned syncwarp_mask() { return 0xffffffffu; }
constexpr unsigned syncwarp_mask(unsigned m) { return m; }
constexpr int shfl_width() { return 32; }
constexpr int shfl_width(int w) { return w; }
}  // namespace derma_emu

// A fence orders this thread's memory operations; with fibers that switch only at sync points every access is
// already visible in program order, so fences are no-ops here.
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)
#define __threadfence_system() ((void)0)

// ---- atomics (fibers do not preempt each other, so a plain read-modify-write is atomic) -------------------------
template <typename T> inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <typename T> inline T atomicSub(T* p, T v) {
    T old = *p;
    *p = old - v;
    return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
    T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T> inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = v > old ? v : old;
    return old;
}
template <typename T> inline T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <typename T> inline T atomicCAS(T* p, T compare, T v) {
    T old = *p;
    if (old == compare) *p = v;
    return old;
}
template <typename T> inline T atomicAnd(T* p, T v) {
    T old = *p;
    *p = old & v;
    return old;
}
template <typename T> inline T atomicOr(T* p, T v) {
    T old = *p;
    *p = old | v;
    return old;
}
template <typename T> inline T atomicXor(T* p, T v) {
    T old = *p;
    *p = old ^ v;
    return old;
}
// CUDA's atomicInc: ((old >= limit) ? 0 : old + 1).
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    unsigned old = *p;
    *p = old >= limit ? 0u : old + 1u;
    return old;
}

// ---- loads through the read-only cache ---------------------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }

// ---- fast-math and conversion intrinsics ---------------------------------------------------------------------------
// The GPU's fast versions are approximations (__expf: 2 + 1.16 * |x| ulp; rsqrtf: 2 ulp); here they are the
// correctly rounded libm results, so the emulator is at least as accurate as the GPU and a check's tolerance must
// cover the GPU's error, not the emulator's.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
// Clamps to [0, 1]; NaN becomes 0 as on the GPU.
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
inline float __int_as_float(int v) { return derma_emu::from_bits<float>((uint32_t)v); }
inline int __float_as_int(float v) { return (int)(uint32_t)derma_emu::to_bits(v); }
inline float __uint_as_float(unsigned v) { return derma_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return (unsigned)derma_emu::to_bits(v); }
inline double __longlong_as_double(long long v) { return derma_emu::from_bits<double>((uint64_t)v); }
inline long long __double_as_longlong(double v) { return (long long)derma_emu::to_bits(v); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return a * b; }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// CUDA's integer min/max overloads (device code may call them unqualified on any arithmetic type).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- the C++ glue between the generated entry table and the kernels ------------------------------------------------
namespace derma_emu {

// Calls a kernel with its parameters unpacked from a cuLaunchKernel-style `void** args`: args[i] points at the
// i-th parameter's value. The parameter types come from the kernel's own signature, so the generated table needs
// nothing but the kernel's name.
template <typename... P, size_t... I>
inline void call_unpacked(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
template <auto Kernel> void trampoline(void** args) {
    using Fn = decltype(Kernel);
    [&]<typename... P>(void (*)(P...)) {
        call_unpacked(Kernel, args, std::index_sequence_for<P...>{});
    }(static_cast<Fn>(nullptr));
}

struct EntryPoint {
    const char* name;
    void (*run)(void** args);
    int params;
    // __launch_bounds__'s maxThreadsPerBlock, or 1024 when the kernel has none.
    int max_threads;
};
template <typename... P> constexpr int param_count(void (*)(P...)) { return (int)sizeof...(P); }

}  // namespace derma_emu
