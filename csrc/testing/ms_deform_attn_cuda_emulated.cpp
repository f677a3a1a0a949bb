// The CUDA op, host file and kernels unchanged, built by a host compiler on the CUDA emulator:
// registered for CPU tensors as torch.ops.deformable_detr_cuda_emulated.* (the build defines
// deformable_detr=deformable_detr_cuda_emulated, so neither the C++ symbols nor the op library
// collide with deformable_detr._C). Built by tests/cuda_emulation.py.
#include "ms_deform_attn/ms_deform_attn.cpp"
#include "ms_deform_attn/cuda/ms_deform_attn_kernel.cu"

namespace {

void set_schedule_seed(int64_t seed) {
  cuda_emulator::set_schedule_seed(static_cast<uint64_t>(seed));
}

} // namespace

TORCH_LIBRARY_FRAGMENT(deformable_detr, m) {
  m.def("set_schedule_seed(int seed) -> ()", &set_schedule_seed);
}
