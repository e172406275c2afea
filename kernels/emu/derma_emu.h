/* C ABI of the emulated kernel library: what the Rust side (src/cuda/emu/sys.rs) calls. */
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint32_t x, y, z;
} derma_dim3;

enum { DERMA_EMU_FORWARD = 0, DERMA_EMU_REVERSE = 1, DERMA_EMU_RANDOM = 2, DERMA_EMU_WARP_REVERSE = 3 };

/* Order of threads between sync points and order of blocks, for launches made from the calling OS thread. */
void derma_emu_set_schedule(int thread_order, int block_order, uint64_t seed);
/* 1 when the library has an entry point of that name (the extern "C" kernel name, e.g. "silu_fwd_f32"). */
int derma_emu_has_kernel(const char* name);
/* Runs one launch to completion on the calling OS thread. args[i] points at the i-th parameter's value, exactly
   as cuLaunchKernel's kernelParams. Returns 0, or nonzero with a NUL-terminated message in err. */
int derma_emu_launch(const char* name, derma_dim3 grid, derma_dim3 block, uint32_t dynamic_shared_bytes,
                     void** args, char* err, size_t err_len);
/* "plain" or "asan". */
const char* derma_emu_flavour(void);
/* ASan flavour: marks [addr, addr + len) as off limits (any kernel access is then reported as a bad access) or as
   usable again; no-ops in the plain flavour. For the emulated allocator: the slack between a tensor's bytes and
   the end of its cached block, so an overrun into it is caught although the host allocation is larger. */
void derma_emu_mark_inaccessible(const void* addr, size_t len);
void derma_emu_mark_accessible(const void* addr, size_t len);

#ifdef __cplusplus
}
#endif
