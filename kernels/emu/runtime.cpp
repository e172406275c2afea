// The emulated device's runtime: launch validation, block and thread scheduling, barriers, warp collectives and
// the fiber context switch. See cuda_emu.h for the model and derma_emu.h for the C ABI.
//
// Napkin math: a context switch here is ~15 ns (6 pushes, 6 pops, two control-word stores and loads), against
// ~1 us for swapcontext, which makes a sigprocmask syscall each time. A 256-thread block with 10 sync points
// switches ~2 x 2560 times: ~80 us per block with the asm switch, ~5 ms with swapcontext.
#include "cuda_emu.h"
#include "derma_emu.h"

#include <stdarg.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__ELF__) && !defined(DERMA_EMU_FORCE_UCONTEXT)
#define DERMA_EMU_ASM_SWITCH 1
#else
#define DERMA_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#if defined(DERMA_EMU_ASAN)
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace derma_emu {

LaunchView g_view;
alignas(16) unsigned char g_dynamic_shared[kMaxSharedBytes];

}  // namespace derma_emu

// The generated entry table (build.rs): every extern "C" __global__ kernel of kernels/*.cu.
extern "C" const derma_emu::EntryPoint* derma_emu_entry_table(size_t* count);

namespace {

using derma_emu::g_view;

// ---- context switch ------------------------------------------------------------------------------------------------
#if DERMA_EMU_ASM_SWITCH
// Saves the callee-saved registers of the SysV ABI (rbx, rbp, r12-r15), the SSE control/status word and the x87
// control word on the current stack, stores rsp in *save, loads rsp from `load` and restores the same from there.
// Caller-saved registers need no saving: the switch is an ordinary function call to the compiler.
extern "C" void derma_emu_switch(void** save, void* load);
extern "C" void derma_emu_fiber_start();
asm(R"(
    .text
    .globl derma_emu_switch
    .hidden derma_emu_switch
    .type derma_emu_switch, @function
derma_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size derma_emu_switch, .-derma_emu_switch

    .globl derma_emu_fiber_start
    .hidden derma_emu_fiber_start
    .type derma_emu_fiber_start, @function
derma_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size derma_emu_fiber_start, .-derma_emu_fiber_start
)");
#endif

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
#if DERMA_EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    uint3 tid{};
    int linear = 0;
    State state = State::Ready;
    const char* file = "";
    int line = 0;
    // At a barrier.
    int barrier_kind = 0;
    int predicate = 0;
    // At a warp collective.
    int op = 0;
    unsigned mask = 0;
    uint64_t value = 0;
    int arg = 0;
    int width = 32;
    // What the barrier or collective hands back.
    uint64_t result = 0;
    unsigned char* stack = nullptr;
    size_t stack_size = 0;
    void* fake_stack = nullptr;  // ASan's fake stack of this fiber while it is switched out
};

// Fiber stacks: 64 KiB each (derma's kernels need < 2 KiB of frame; the headroom is for libm and printf), four
// times that under ASan, whose redzones and fake frames multiply stack use. A PROT_NONE guard page below each
// stack turns an overflow into a segfault instead of silent corruption of the neighbour.
#if defined(DERMA_EMU_ASAN)
constexpr size_t kStackBytes = 256 * 1024;
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif
constexpr size_t kGuardBytes = 4096;

struct Rng {
    uint64_t s;
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    uint32_t below(uint32_t n) { return (uint32_t)((next() >> 32) * n >> 32); }
};

struct Schedule {
    int threads = DERMA_EMU_FORWARD;
    int blocks = DERMA_EMU_FORWARD;
    Rng rng{0x5eed};
};
// Per calling OS thread, as the ABI promises: a test that sets reverse order on one thread does not change the
// order another thread's launches see.
thread_local Schedule tls_schedule;

// One launch at a time (see cuda_emu.h: `__shared__` is static storage). Everything below is guarded by it.
std::mutex g_launch_mutex;

struct Launch {
    const char* kernel = "";
    void (*run)(void**) = nullptr;
    void** args = nullptr;
    std::vector<Fiber> fibers;
    std::vector<int> order;
    int nthreads = 0;
    Fiber* current = nullptr;
    bool failed = false;
    std::string error;
#if DERMA_EMU_ASM_SWITCH
    void* scheduler_sp = nullptr;
#else
    ucontext_t scheduler_ctx;
#endif
    void* scheduler_fake_stack = nullptr;
    const void* scheduler_stack_bottom = nullptr;
    size_t scheduler_stack_size = 0;
};
Launch g_launch;
std::vector<unsigned char*> g_stacks;  // reused across launches; grows to the largest block seen

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string where_block() {
    return format("block (%u,%u,%u)", g_view.block_idx.x, g_view.block_idx.y, g_view.block_idx.z);
}
std::string where_thread(const Fiber& f) { return format("thread (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z); }

void fail(const std::string& what) {
    if (g_launch.failed) return;
    g_launch.failed = true;
    g_launch.error = format("kernel %s: ", g_launch.kernel) + what;
}

const char* op_name(int op) {
    switch (op) {
        case derma_emu::WARP_SHFL_IDX: return "__shfl_sync";
        case derma_emu::WARP_SHFL_UP: return "__shfl_up_sync";
        case derma_emu::WARP_SHFL_DOWN: return "__shfl_down_sync";
        case derma_emu::WARP_SHFL_XOR: return "__shfl_xor_sync";
        case derma_emu::WARP_ANY: return "__any_sync";
        case derma_emu::WARP_ALL: return "__all_sync";
        case derma_emu::WARP_BALLOT: return "__ballot_sync";
        default: return "__syncwarp";
    }
}
const char* barrier_name(int kind) {
    switch (kind) {
        case derma_emu::BARRIER_COUNT: return "__syncthreads_count";
        case derma_emu::BARRIER_AND: return "__syncthreads_and";
        case derma_emu::BARRIER_OR: return "__syncthreads_or";
        default: return "__syncthreads";
    }
}

// ---- switching -------------------------------------------------------------------------------------------------------
void fiber_main(void* arg);

#if DERMA_EMU_ASM_SWITCH
void fiber_init(Fiber& f) {
    // Initial frame, as derma_emu_switch pops it: control words, r15, r14, r13 (entry), r12 (its argument), rbx,
    // rbp, then the return address (derma_emu_fiber_start). After the `ret` rsp sits at a 16-byte boundary, so the
    // `call` in fiber_start enters fiber_main with the alignment the ABI requires.
    uintptr_t top = ((uintptr_t)(f.stack + f.stack_size)) & ~(uintptr_t)15;
    uint64_t* frame = (uint64_t*)(top - 64);
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    frame[0] = (uint64_t)mxcsr | ((uint64_t)fpucw << 32);
    frame[1] = 0;                               // r15
    frame[2] = 0;                               // r14
    frame[3] = (uint64_t)(uintptr_t)&fiber_main;  // r13
    frame[4] = (uint64_t)(uintptr_t)&f;         // r12
    frame[5] = 0;                               // rbx
    frame[6] = 0;                               // rbp
    frame[7] = (uint64_t)(uintptr_t)&derma_emu_fiber_start;
    f.sp = frame;
}
#else
Fiber* g_starting = nullptr;
void fiber_trampoline_uc() { fiber_main(g_starting); }
void fiber_init(Fiber& f) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stack_size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_trampoline_uc, 0);
}
#endif

// Scheduler -> fiber.
void resume(Fiber& f) {
#if defined(DERMA_EMU_ASAN)
    __sanitizer_start_switch_fiber(&g_launch.scheduler_fake_stack, f.stack, f.stack_size);
#endif
    g_launch.current = &f;
    g_view.thread_idx = &f.tid;
#if DERMA_EMU_ASM_SWITCH
    derma_emu_switch(&g_launch.scheduler_sp, f.sp);
#else
    g_starting = &f;
    swapcontext(&g_launch.scheduler_ctx, &f.ctx);
#endif
#if defined(DERMA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(g_launch.scheduler_fake_stack, nullptr, nullptr);
#endif
    g_launch.current = nullptr;
}

// Fiber -> scheduler. An exiting fiber never comes back, so ASan may drop its fake stack (nullptr).
void suspend(Fiber& f, bool exiting) {
#if defined(DERMA_EMU_ASAN)
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, g_launch.scheduler_stack_bottom,
                                   g_launch.scheduler_stack_size);
#else
    (void)exiting;
#endif
#if DERMA_EMU_ASM_SWITCH
    derma_emu_switch(&f.sp, g_launch.scheduler_sp);
#else
    swapcontext(&f.ctx, &g_launch.scheduler_ctx);
#endif
#if defined(DERMA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(f.fake_stack, &g_launch.scheduler_stack_bottom, &g_launch.scheduler_stack_size);
#endif
}

void fiber_main(void* arg) {
    Fiber& f = *static_cast<Fiber*>(arg);
#if defined(DERMA_EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &g_launch.scheduler_stack_bottom, &g_launch.scheduler_stack_size);
#endif
    g_launch.run(g_launch.args);
    f.state = State::Done;
    suspend(f, true);
    __builtin_trap();  // a finished fiber is never resumed
}

Fiber& running_fiber(const char* file, int line, const char* what) {
    if (!g_launch.current) {
        fprintf(stderr, "derma emu: %s called outside a kernel (%s:%d)\n", what, file, line);
        abort();
    }
    return *g_launch.current;
}

// ---- stacks ----------------------------------------------------------------------------------------------------------
bool ensure_stacks(int n, std::string& err) {
    while ((int)g_stacks.size() < n) {
        void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            err = format("cannot map a %zu KiB fiber stack", kStackBytes / 1024);
            return false;
        }
        mprotect(p, kGuardBytes, PROT_NONE);
        g_stacks.push_back(static_cast<unsigned char*>(p) + kGuardBytes);
    }
    return true;
}

// ---- thread order ------------------------------------------------------------------------------------------------------
void random_order(std::vector<int>& order, int n, Rng& rng) {
    order.resize(n);
    for (int i = 0; i < n; ++i) order[i] = i;
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below((uint32_t)i + 1)]);
}

// ---- warp collectives -------------------------------------------------------------------------------------------------
// Source lane of a shuffle, as PTX's shfl.sync defines it (CUDA's __shfl*_sync pass c = ((32 - width) << 8) |
// clamp, clamp 31 for idx/down/xor and 0 for up): lanes split into segments of `width`; idx reads lane
// (srcLane mod width) of the caller's segment; up/down read lane -/+ delta and keep their own value past the
// segment's start/end; xor reads lane ^ laneMask when that is not past the segment's end (it may read an earlier
// segment). Returns the caller's own lane when the value stays its own.
int shuffle_source(int op, int lane, int b, int width) {
    const int segmask = (32 - width) & 31;  // high lane bits that pick the segment
    const int bval = b & 31;
    const int min_lane = lane & segmask;
    const int clamp = op == derma_emu::WARP_SHFL_UP ? 0 : 31;
    const int max_lane = min_lane | (clamp & ~segmask);
    int j = lane;
    bool ok = true;
    switch (op) {
        case derma_emu::WARP_SHFL_UP:
            j = lane - bval;
            ok = j >= max_lane;
            break;
        case derma_emu::WARP_SHFL_DOWN:
            j = lane + bval;
            ok = j <= max_lane;
            break;
        case derma_emu::WARP_SHFL_XOR:
            j = lane ^ bval;
            ok = j <= max_lane;
            break;
        default:
            j = min_lane | (bval & ~segmask);
            ok = j <= max_lane;
    }
    return ok ? j : lane;
}

// Resolves every collective of the warp starting at thread `base` whose lanes have all arrived. Returns whether
// any was resolved (false too on an error, which fail() records).
bool resolve_warp(int base) {
    auto& fibers = g_launch.fibers;
    const int n = g_launch.nthreads;
    bool resolved = false;
    {
        const int present = n - base < 32 ? n - base : 32;
        for (int l = 0; l < present; ++l) {
            Fiber& f = fibers[base + l];
            if (f.state != State::AtWarp) continue;
            const unsigned mask = f.mask;
            // __syncwarp waits for the non-exited lanes of its mask (CUDA's wording); shuffles and votes need every
            // lane they name, since a value from an exited or absent lane is undefined on the GPU.
            const bool lenient = f.op == derma_emu::WARP_SYNC;
            unsigned members = 0;
            bool ready = true;
            for (int j = 0; j < 32 && ready; ++j) {
                if (!(mask >> j & 1u)) continue;
                if (j >= present) {
                    if (lenient) continue;
                    fail(format("%s at %s:%d in %s, %s (lane %d): its mask 0x%08x names lane %d, which does not "
                                "exist (the block has %d threads, so this warp has %d lanes)",
                                op_name(f.op), f.file, f.line, where_block().c_str(), where_thread(f).c_str(), l,
                                mask, j, n, present));
                    return false;
                }
                Fiber& g = fibers[base + j];
                if (g.state == State::Done) {
                    if (lenient) continue;
                    fail(format("%s at %s:%d in %s, %s (lane %d): its mask 0x%08x names lane %d, which has exited",
                                op_name(f.op), f.file, f.line, where_block().c_str(), where_thread(f).c_str(), l, mask,
                                j));
                    return false;
                }
                if (g.state != State::AtWarp) {
                    ready = false;
                    break;
                }
                if (g.op != f.op || g.mask != f.mask || g.width != f.width) {
                    fail(format("lanes of one warp disagree in %s: %s (lane %d) is at %s (mask 0x%08x, width %d) at "
                                "%s:%d, %s (lane %d) at %s (mask 0x%08x, width %d) at %s:%d",
                                where_block().c_str(), where_thread(f).c_str(), l, op_name(f.op), f.mask, f.width,
                                f.file, f.line, where_thread(g).c_str(), j, op_name(g.op), g.mask, g.width, g.file,
                                g.line));
                    return false;
                }
                members |= 1u << j;
            }
            if (!ready) continue;
            // Every lane of the mask is here: compute each lane's result.
            uint64_t ballot = 0;
            int count = 0, nmembers = 0;
            for (int j = 0; j < 32; ++j) {
                if (!(members >> j & 1u)) continue;
                ++nmembers;
                if (fibers[base + j].value) {
                    ballot |= 1ull << j;
                    ++count;
                }
            }
            for (int j = 0; j < 32; ++j) {
                if (!(members >> j & 1u)) continue;
                Fiber& g = fibers[base + j];
                switch (g.op) {
                    case derma_emu::WARP_ANY: g.result = count > 0; break;
                    case derma_emu::WARP_ALL: g.result = count == nmembers; break;
                    case derma_emu::WARP_BALLOT: g.result = ballot; break;
                    case derma_emu::WARP_SYNC: g.result = 0; break;
                    default: {
                        const int src = shuffle_source(g.op, j, g.arg, g.width);
                        if (src != j && !(mask >> src & 1u)) {
                            fail(format("%s at %s:%d in %s, %s (lane %d) reads lane %d, which is outside its mask "
                                        "0x%08x%s",
                                        op_name(g.op), g.file, g.line, where_block().c_str(), where_thread(g).c_str(), j,
                                        src, mask, src >= present ? " and does not exist" : ""));
                            return false;
                        }
                        g.result = fibers[base + src].value;
                    }
                }
            }
            for (int j = 0; j < 32; ++j)
                if (members >> j & 1u) fibers[base + j].state = State::Ready;
            resolved = true;
        }
    }
    return resolved;
}

bool resolve_warps() {
    bool resolved = false;
    for (int base = 0; base < g_launch.nthreads && !g_launch.failed; base += 32) resolved |= resolve_warp(base);
    return resolved && !g_launch.failed;
}

// Releases the block barrier when every live thread waits at it; reports a deadlock or a divergent barrier when
// it cannot be released. Returns whether the block can go on.
bool resolve_barrier() {
    auto& fibers = g_launch.fibers;
    const Fiber* waiter = nullptr;
    const Fiber* exited = nullptr;
    const Fiber* at_warp = nullptr;
    for (const Fiber& f : fibers) {
        if (f.state == State::AtBarrier && !waiter) waiter = &f;
        if (f.state == State::Done && !exited) exited = &f;
        if (f.state == State::AtWarp && !at_warp) at_warp = &f;
    }
    if (!waiter && !at_warp) return true;  // everyone has exited
    if (at_warp) {
        // A collective that resolve_warps could not complete: its lanes wait at a barrier the collective's lane
        // never reaches.
        const Fiber* other = waiter;
        if (other)
            fail(format("deadlock in %s: %s waits at %s (%s:%d) for lanes that wait at %s (%s:%d), e.g. %s",
                        where_block().c_str(), where_thread(*at_warp).c_str(), op_name(at_warp->op), at_warp->file,
                        at_warp->line, barrier_name(other->barrier_kind), other->file, other->line,
                        where_thread(*other).c_str()));
        else
            fail(format("deadlock in %s: %s waits at %s (%s:%d) and nothing can complete it", where_block().c_str(),
                        where_thread(*at_warp).c_str(), op_name(at_warp->op), at_warp->file, at_warp->line));
        return false;
    }
    if (exited) {
        fail(format("deadlock in %s: %s waits at %s (%s:%d), but %s has exited and will never arrive",
                    where_block().c_str(), where_thread(*waiter).c_str(), barrier_name(waiter->barrier_kind),
                    waiter->file, waiter->line, where_thread(*exited).c_str()));
        return false;
    }
    int count = 0;
    for (const Fiber& f : fibers) {
        if (f.line != waiter->line || strcmp(f.file, waiter->file) != 0 || f.barrier_kind != waiter->barrier_kind) {
            fail(format("divergent barrier in %s: %s waits at %s (%s:%d) while %s waits at %s (%s:%d)",
                        where_block().c_str(), where_thread(*waiter).c_str(), barrier_name(waiter->barrier_kind),
                        waiter->file, waiter->line, where_thread(f).c_str(), barrier_name(f.barrier_kind), f.file,
                        f.line));
            return false;
        }
        count += f.predicate;
    }
    const int n = (int)fibers.size();
    uint64_t result = 0;
    switch (waiter->barrier_kind) {
        case derma_emu::BARRIER_COUNT: result = (uint64_t)count; break;
        case derma_emu::BARRIER_AND: result = count == n; break;
        case derma_emu::BARRIER_OR: result = count > 0; break;
        default: result = 0;
    }
    for (Fiber& f : fibers) {
        f.result = result;
        f.state = State::Ready;
    }
    return true;
}

bool run_block(uint3 block, Schedule& sched) {
    g_view.block_idx = block;
    const dim3 bd = g_view.block_dim;
    auto& fibers = g_launch.fibers;
    const int n = g_launch.nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f = Fiber{};
        f.linear = i;
        f.tid = uint3{(unsigned)i % bd.x, (unsigned)i / bd.x % bd.y, (unsigned)i / (bd.x * bd.y)};
        f.stack = g_stacks[i];
        f.stack_size = kStackBytes;
#if defined(DERMA_EMU_ASAN)
        // A fiber abandoned by an earlier failed launch leaves its frames' redzones poisoned on this stack.
        __asan_unpoison_memory_region(f.stack, f.stack_size);
#endif
        fiber_init(f);
    }
    const int nwarps = (n + 31) / 32;
    for (;;) {
        if (sched.threads == DERMA_EMU_RANDOM) {
            // Finest interleaving: every ready thread runs to its next sync point in a fresh random order, and a
            // warp collective completes as soon as its last lane arrives.
            random_order(g_launch.order, n, sched.rng);
            for (int i : g_launch.order) {
                Fiber& f = fibers[i];
                if (f.state != State::Ready) continue;
                resume(f);
                if (g_launch.failed) return false;
                if (f.state == State::AtWarp) resolve_warp(i / 32 * 32);
                if (g_launch.failed) return false;
            }
        } else {
            // Warp at a time: a warp runs through its collectives until it waits at the block barrier or exits,
            // then the next warp runs. Warps are independent between block barriers on the GPU, so this is a
            // legal order, and the most adversarial one for shared memory: with warps in reverse, the last warp
            // gets through a whole phase (reading and overwriting shared data) before warp 0 starts it.
            const bool warps_reversed = sched.threads == DERMA_EMU_REVERSE || sched.threads == DERMA_EMU_WARP_REVERSE;
            const bool lanes_reversed = sched.threads == DERMA_EMU_REVERSE;
            for (int k = 0; k < nwarps; ++k) {
                const int base = (warps_reversed ? nwarps - 1 - k : k) * 32;
                const int present = n - base < 32 ? n - base : 32;
                do {
                    for (int l = 0; l < present; ++l) {
                        Fiber& f = fibers[base + (lanes_reversed ? present - 1 - l : l)];
                        if (f.state != State::Ready) continue;
                        resume(f);
                        if (g_launch.failed) return false;
                    }
                } while (resolve_warp(base));
                if (g_launch.failed) return false;
            }
        }
        bool all_done = true;
        for (const Fiber& f : fibers) all_done &= f.state == State::Done;
        if (all_done) return true;
        if (resolve_warps()) continue;
        if (g_launch.failed) return false;
        if (!resolve_barrier()) return false;
    }
}

bool check_shape(const char* name, derma_dim3 grid, derma_dim3 block, uint32_t shared, std::string& err) {
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
        threads > 1024) {
        err = format("kernel %s: block (%u,%u,%u) is a shape CUDA refuses: each of x, y at most 1024, z at most 64, "
                     "x*y*z between 1 and 1024",
                     name, block.x, block.y, block.z);
        return false;
    }
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        err = format("kernel %s: grid (%u,%u,%u) is a shape CUDA refuses: x in 1..2^31-1, y and z in 1..65535", name,
                     grid.x, grid.y, grid.z);
        return false;
    }
    if (shared > derma_emu::kMaxSharedBytes) {
        err = format("kernel %s: %u bytes of dynamic shared memory is more than the %u bytes CUDA lets a block "
                     "have without opting in",
                     name, shared, derma_emu::kMaxSharedBytes);
        return false;
    }
    return true;
}

void copy_error(const std::string& msg, char* err, size_t err_len) {
    if (!err || err_len == 0) return;
    size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
    memcpy(err, msg.data(), n);
    err[n] = 0;
}

#if defined(DERMA_EMU_ASAN)
// Runs when ASan or UBSan stops the process: says which launch, block and thread made the bad access (the
// sanitizer's own report names the kernel function and source line).
void report_launch_on_death() {
    if (!g_launch.current) return;
    const Fiber& f = *g_launch.current;
    fprintf(stderr, "derma emu: the access above was made by kernel %s, %s, %s\n", g_launch.kernel,
            where_block().c_str(), where_thread(f).c_str());
}
#endif

const derma_emu::EntryPoint* find_kernel(const char* name) {
    size_t count = 0;
    const derma_emu::EntryPoint* table = derma_emu_entry_table(&count);
    for (size_t i = 0; i < count; ++i)
        if (strcmp(table[i].name, name) == 0) return &table[i];
    return nullptr;
}

}  // namespace

namespace derma_emu {

int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
    Fiber& f = running_fiber(file, line, "__syncthreads");
    f.state = State::AtBarrier;
    f.barrier_kind = kind;
    f.predicate = predicate;
    f.file = file;
    f.line = line;
    suspend(f, false);
    return (int)f.result;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber& f = running_fiber(file, line, op_name(op));
    const int lane = f.linear & 31;
    if (!(mask >> lane & 1u))
        kernel_fault(file, line,
                     format("%s with mask 0x%08x called by lane %d, which is not in the mask", op_name(op), mask, lane)
                         .c_str());
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        kernel_fault(file, line, format("%s with width %d: the width must be a power of two from 1 to 32",
                                        op_name(op), width)
                                     .c_str());
    f.state = State::AtWarp;
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = width;
    f.file = file;
    f.line = line;
    suspend(f, false);
    return f.result;
}

void kernel_fault(const char* file, int line, const char* what) {
    Fiber& f = running_fiber(file, line, "a kernel fault");
    fail(format("%s at %s:%d in %s, %s", what, file, line, where_block().c_str(), where_thread(f).c_str()));
    // The scheduler stops the block on failure; this fiber is never resumed.
    f.state = State::AtBarrier;
    suspend(f, false);
    __builtin_trap();
}

}  // namespace derma_emu

extern "C" {

void derma_emu_set_schedule(int thread_order, int block_order, uint64_t seed) {
    tls_schedule.threads = thread_order;
    tls_schedule.blocks = block_order;
    tls_schedule.rng = Rng{seed};
}

void derma_emu_mark_inaccessible(const void* addr, size_t len) {
#if defined(DERMA_EMU_ASAN)
    if (addr && len) __asan_poison_memory_region(addr, len);
#else
    (void)addr;
    (void)len;
#endif
}

void derma_emu_mark_accessible(const void* addr, size_t len) {
#if defined(DERMA_EMU_ASAN)
    if (addr && len) __asan_unpoison_memory_region(addr, len);
#else
    (void)addr;
    (void)len;
#endif
}

int derma_emu_has_kernel(const char* name) { return name && find_kernel(name) ? 1 : 0; }

const char* derma_emu_flavour(void) {
#if defined(DERMA_EMU_ASAN)
    return "asan";
#else
    return "plain";
#endif
}

int derma_emu_launch(const char* name, derma_dim3 grid, derma_dim3 block, uint32_t dynamic_shared_bytes, void** args,
                     char* err, size_t err_len) {
    std::string msg;
    if (!name) {
        copy_error("no kernel name given", err, err_len);
        return 1;
    }
    const derma_emu::EntryPoint* entry = find_kernel(name);
    if (!entry) {
        copy_error(format("kernel %s: no such entry point in the emulated kernel library", name), err, err_len);
        return 1;
    }
    if (entry->params > 0 && !args) {
        copy_error(format("kernel %s: it takes %d parameters but the argument array is null", name, entry->params),
                   err, err_len);
        return 1;
    }
    if (!check_shape(name, grid, block, dynamic_shared_bytes, msg)) {
        copy_error(msg, err, err_len);
        return 1;
    }
    if ((uint64_t)block.x * block.y * block.z > (uint64_t)entry->max_threads) {
        copy_error(format("kernel %s: block (%u,%u,%u) has %u threads, more than its __launch_bounds__(%d) allows; "
                          "the GPU refuses such a launch",
                          name, block.x, block.y, block.z, block.x * block.y * block.z, entry->max_threads),
                   err, err_len);
        return 1;
    }
    std::lock_guard<std::mutex> lock(g_launch_mutex);
#if defined(DERMA_EMU_ASAN)
    static const bool death_callback_set = [] {
        __sanitizer_set_death_callback(report_launch_on_death);
        // GCC's UBSan runtime is a library of its own with its own copy of the callback.
        if (void* ubsan = dlopen("libubsan.so.1", RTLD_NOW | RTLD_NOLOAD)) {
            using SetCallback = void (*)(void (*)());
            if (auto set = reinterpret_cast<SetCallback>(dlsym(ubsan, "__sanitizer_set_death_callback")))
                set(report_launch_on_death);
        }
        return true;
    }();
    (void)death_callback_set;
#endif
    const int nthreads = (int)(block.x * block.y * block.z);
    if (!ensure_stacks(nthreads, msg)) {
        copy_error(format("kernel %s: ", name) + msg, err, err_len);
        return 1;
    }
    Schedule& sched = tls_schedule;
    g_launch.kernel = name;
    g_launch.run = entry->run;
    g_launch.args = args;
    g_launch.nthreads = nthreads;
    g_launch.fibers.resize(nthreads);
    g_launch.failed = false;
    g_launch.error.clear();
    g_view.block_dim = dim3(block.x, block.y, block.z);
    g_view.grid_dim = dim3(grid.x, grid.y, grid.z);
    g_view.dynamic_shared = derma_emu::g_dynamic_shared;
#if defined(DERMA_EMU_ASAN)
    // Bytes past the launch's dynamic shared size are off limits, as on the GPU.
    __asan_poison_memory_region(derma_emu::g_dynamic_shared + dynamic_shared_bytes,
                                derma_emu::kMaxSharedBytes - dynamic_shared_bytes);
#endif
    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    uint64_t shuffled_start = 0, stride = 1;
    if (sched.blocks == DERMA_EMU_RANDOM && nblocks > 1) {
        // A full-period walk over 0..nblocks-1 without a permutation array (grids can have 2^31 blocks): an odd
        // stride coprime with nblocks visits every block once.
        shuffled_start = sched.rng.next() % nblocks;
        do {
            stride = (sched.rng.next() % nblocks) | 1;
        } while (std::gcd(stride, nblocks) != 1);
    }
    bool ok = true;
    for (uint64_t k = 0; k < nblocks && ok; ++k) {
        uint64_t b = k;
        if (sched.blocks == DERMA_EMU_REVERSE || sched.blocks == DERMA_EMU_WARP_REVERSE) b = nblocks - 1 - k;
        if (sched.blocks == DERMA_EMU_RANDOM) b = (shuffled_start + k * stride) % nblocks;
        // Dynamic shared memory starts as garbage on the GPU: fill it with 0xff (NaN as float) per block so a read
        // before any write shows.
        memset(derma_emu::g_dynamic_shared, 0xff, dynamic_shared_bytes);
        const uint3 bi{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
        ok = run_block(bi, sched);
    }
#if defined(DERMA_EMU_ASAN)
    __asan_unpoison_memory_region(derma_emu::g_dynamic_shared, derma_emu::kMaxSharedBytes);
#endif
    g_view.thread_idx = nullptr;
    if (!ok) {
        copy_error(g_launch.error, err, err_len);
        return 1;
    }
    return 0;
}

}  // extern "C"
