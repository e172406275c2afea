// Test-only kernel for the emulated device's own tests (tests/emu_runtime.rs): reports each thread's indices.
#include <stdint.h>

extern "C" __global__ void emu_test_indices(uint32_t* out) {
    const uint32_t block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const uint32_t thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const uint32_t i = block * blockDim.x * blockDim.y * blockDim.z + thread;
    out[4 * i] = block;
    out[4 * i + 1] = threadIdx.x;
    out[4 * i + 2] = threadIdx.y;
    out[4 * i + 3] = threadIdx.z;
}
