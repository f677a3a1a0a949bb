// CPU kernels of multi-scale deformable attention, compiled once per CPU capability.
//
// As in ATen's DispatchStub scheme, ms_deform_attn_kernel.cpp is compiled several times, each
// time with the instruction-set flags of one capability and CPU_CAPABILITY naming a namespace
// (setup.py), so at::vec::Vectorized widens with the capability; ms_deform_attn_cpu.cpp picks
// the widest one this CPU runs. Non-x86-64 builds compile DEFAULT only.
#pragma once

#include <ATen/ATen.h>

namespace deformable_detr {
namespace ops {

// Inputs are checked and contiguous; outputs are allocated and (for backward) zeroed.
// `grad_value` is in the accumulation dtype (float for half and bfloat16 values).
#define DEFORMABLE_DETR_DECLARE_CPU_KERNELS(capability)                                        \
  namespace capability {                                                                    \
  void ms_deform_attn_forward_kernel(                                                       \
      const at::Tensor& value, const at::Tensor& spatial_shapes,                            \
      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,            \
      const at::Tensor& attention_weights, at::Tensor& output);                             \
  void ms_deform_attn_backward_kernel(                                                      \
      const at::Tensor& value, const at::Tensor& spatial_shapes,                            \
      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,            \
      const at::Tensor& attention_weights, const at::Tensor& grad_output,                   \
      at::Tensor& grad_value, at::Tensor& grad_sampling_locations,                          \
      at::Tensor& grad_attention_weights);                                                  \
  }

DEFORMABLE_DETR_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef DEFORMABLE_DETR_HAVE_AVX2
DEFORMABLE_DETR_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef DEFORMABLE_DETR_HAVE_AVX512
DEFORMABLE_DETR_DECLARE_CPU_KERNELS(AVX512)
#endif

#undef DEFORMABLE_DETR_DECLARE_CPU_KERNELS

} // namespace ops
} // namespace deformable_detr
