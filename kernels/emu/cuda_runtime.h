// cuda_runtime.h for the emulated device: everything a kernel file needs is in cuda_emu.h (force-included).
#pragma once
#include "cuda_emu.h"
