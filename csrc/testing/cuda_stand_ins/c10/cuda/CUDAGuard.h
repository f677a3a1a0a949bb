// Stand-in for c10/cuda/CUDAGuard.h in the emulated CUDA build: the emulated device is the CPU.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "the emulated CUDA op takes CPU tensors, got ", device);
  }
};

} // namespace cuda
} // namespace c10
