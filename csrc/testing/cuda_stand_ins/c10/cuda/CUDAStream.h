// Stand-in for c10/cuda/CUDAStream.h in the emulated CUDA build: one stream, on which every
// launch runs to completion.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const {
    return nullptr;
  }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) {
  return {};
}

} // namespace cuda
} // namespace c10
