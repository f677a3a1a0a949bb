// The one place where kernels are launched, so the same host code runs them on a GPU (nvcc)
// and on the CPU emulation of the tests (a host compiler with csrc/testing/cuda_emulator.h
// force-included), without rewriting any launch.
#pragma once

#include <utility>

namespace deformable_detr {
namespace ops {

// kernel<<<grid, block, 0, stream>>>(args...); launch errors are left for
// C10_CUDA_KERNEL_LAUNCH_CHECK (the emulator raises them at once).
template <typename... Params, typename... Args>
void launch_kernel(
    void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#ifdef __CUDACC__
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#else
  ::cuda_emulator::launch(kernel, grid, block, stream, std::forward<Args>(args)...);
#endif
}

} // namespace ops
} // namespace deformable_detr
