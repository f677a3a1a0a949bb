// Host side of the CUDA op: input checks, device guard, stream, dtype dispatch and launch of the
// kernels in ms_deform_attn_kernels.cuh. The tests compile this file unchanged with a host
// compiler against csrc/testing/ (the CUDA emulator and stand-ins for the c10/cuda headers).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
// c10's stream header (at::cuda::getCurrentCUDAStream is an alias of it): ATen/cuda/CUDAContext.h
// would also pull in the cuBLAS/cuSPARSE headers, which a bare CUDA toolkit may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"
#include "launch.cuh"
#include "ms_deform_attn_kernels.cuh"

// The emulated build registers these kernels for CPU tensors instead.
#ifndef MS_DEFORM_ATTN_CUDA_DISPATCH_KEY
#define MS_DEFORM_ATTN_CUDA_DISPATCH_KEY CUDA
#endif

namespace deformable_detr {
namespace ops {

namespace {

using cuda_kernels::kWarp;
using cuda_kernels::kWarpsPerBlock;
using cuda_kernels::Sizes;

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

dim3 grid_for(const Sizes& s) {
  return dim3(static_cast<unsigned int>((s.N * s.Lq * s.M + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

void check_grid(const Sizes& s) {
  TORCH_CHECK(
      (s.N * s.Lq * s.M + kWarpsPerBlock - 1) / kWarpsPerBlock <= 0x7fffffff,
      "ms_deform_attn: N * Lq * M = ", s.N * s.Lq * s.M, " query-heads exceed the CUDA grid");
}

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  // levels are not read here (a host sync); the kernels guard each level instead
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, {},
      /*value_may_be_reduced_precision=*/true, /*check_levels=*/false);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  const Sizes s = sizes_of(value_c, loc_c);
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  check_grid(s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        launch_kernel(
            cuda_kernels::forward_kernel<scalar_t, opmath_t>, grid_for(s),
            dim3(kWarp, kWarpsPerBlock), stream, value_c.const_data_ptr<scalar_t>(),
            shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
            loc_c.const_data_ptr<opmath_t>(), attn_c.const_data_ptr<opmath_t>(),
            output.mutable_data_ptr<scalar_t>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output, /*value_may_be_reduced_precision=*/true, /*check_levels=*/false);
  // grad_value sums with atomicAdd in whatever order the threads run
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  const auto grad_output_c = grad_output.contiguous();
  const Sizes s = sizes_of(value_c, loc_c);
  // atomics on half/bfloat16 would round every partial sum: accumulate in opmath_t instead
  auto grad_value = at::zeros(value_c.sizes(), loc_c.options());
  auto grad_locations = at::zeros_like(loc_c);
  auto grad_weights = at::zeros_like(attn_c);
  if (grad_output_c.numel() > 0) {
    check_grid(s);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          launch_kernel(
              cuda_kernels::backward_kernel<scalar_t, opmath_t>, grid_for(s),
              dim3(kWarp, kWarpsPerBlock), stream, value_c.const_data_ptr<scalar_t>(),
              shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
              loc_c.const_data_ptr<opmath_t>(), attn_c.const_data_ptr<opmath_t>(),
              grad_output_c.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<opmath_t>(),
              grad_locations.mutable_data_ptr<opmath_t>(),
              grad_weights.mutable_data_ptr<opmath_t>(), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

} // namespace

TORCH_LIBRARY_IMPL(deformable_detr, MS_DEFORM_ATTN_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

} // namespace ops
} // namespace deformable_detr
