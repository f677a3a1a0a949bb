// CPU entry points of multi-scale deformable attention: input checks, allocation and the choice
// of the kernels' CPU capability. Compiled for the baseline only.
#include "ms_deform_attn_cpu.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

#include "../ms_deform_attn.h"

namespace deformable_detr {
namespace ops {

namespace {

// Ordered from narrowest to widest, as ATen's CPUCapability.
enum class CpuCapability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
constexpr const char* kCapabilityNames[] = {"default", "avx2", "avx512"};
constexpr const char* kCapabilityEnvVar = "DEFORMABLE_DETR_CPU_CAPABILITY";

const char* name_of(CpuCapability capability) {
  return kCapabilityNames[static_cast<int>(capability)];
}

CpuCapability widest_built() {
#if defined(DEFORMABLE_DETR_HAVE_AVX512)
  return CpuCapability::AVX512;
#elif defined(DEFORMABLE_DETR_HAVE_AVX2)
  return CpuCapability::AVX2;
#else
  return CpuCapability::DEFAULT;
#endif
}

// What ATen itself runs: the CPU's widest (by cpuid and the OS's register support), lowered by
// ATEN_CPU_CAPABILITY; "VSX", "SVE256"... of other architectures count as the baseline.
CpuCapability widest_supported() {
  static const CpuCapability aten = [] {
    const std::string name = at::get_cpu_capability();
    if (name == "AVX512") {
      return CpuCapability::AVX512;
    }
    return name == "AVX2" ? CpuCapability::AVX2 : CpuCapability::DEFAULT;
  }();
  return std::min(aten, widest_built());
}

// The widest capability, or DEFORMABLE_DETR_CPU_CAPABILITY when set (read on every call, so
// tests can switch it); it may only lower the capability.
CpuCapability active_cpu_capability() {
  const CpuCapability widest = widest_supported();
  const char* requested = std::getenv(kCapabilityEnvVar);
  if (requested == nullptr || *requested == '\0') {
    return widest;
  }
  std::string name(requested);
  for (char& c : name) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  for (int i = 0; i <= static_cast<int>(CpuCapability::AVX512); ++i) {
    if (name != kCapabilityNames[i]) {
      continue;
    }
    const auto capability = static_cast<CpuCapability>(i);
    TORCH_CHECK(
        capability <= widest_built(), kCapabilityEnvVar, "=", requested,
        ": this build of deformable_detr._C has kernels up to ", name_of(widest_built()),
        " only (", name_of(capability), " kernels are built on x86-64)");
    TORCH_CHECK(
        capability <= widest, kCapabilityEnvVar, "=", requested, ": this CPU runs at most ",
        name_of(widest), " (as ATen detects it, ATEN_CPU_CAPABILITY included); the variable "
        "can only lower the capability");
    return capability;
  }
  TORCH_CHECK(
      false, kCapabilityEnvVar, "=", requested, " is invalid; expected one of default, avx2, "
      "avx512 (or unset for the widest this CPU runs)");
}

std::string cpu_capability() {
  return name_of(active_cpu_capability());
}

#if defined(DEFORMABLE_DETR_HAVE_AVX512) && !defined(DEFORMABLE_DETR_HAVE_AVX2)
#error "the kernel table below is indexed by CpuCapability: an AVX-512 build needs AVX2 too"
#endif

// The kernels of each built capability, indexed by CpuCapability.
struct CpuKernels {
  decltype(&DEFAULT::ms_deform_attn_forward_kernel) forward;
  decltype(&DEFAULT::ms_deform_attn_backward_kernel) backward;
};

const CpuKernels& active_kernels() {
  static const CpuKernels kernels[] = {
      {DEFAULT::ms_deform_attn_forward_kernel, DEFAULT::ms_deform_attn_backward_kernel},
#ifdef DEFORMABLE_DETR_HAVE_AVX2
      {AVX2::ms_deform_attn_forward_kernel, AVX2::ms_deform_attn_backward_kernel},
#endif
#ifdef DEFORMABLE_DETR_HAVE_AVX512
      {AVX512::ms_deform_attn_forward_kernel, AVX512::ms_deform_attn_backward_kernel},
#endif
  };
  return kernels[static_cast<int>(active_cpu_capability())];
}

// The kernels index positions in S with 32-bit integers.
void check_positions_fit_int32(const at::Tensor& value) {
  TORCH_CHECK(
      value.size(1) <= std::numeric_limits<int32_t>::max(),
      "ms_deform_attn: the CPU kernels support up to 2^31 - 1 positions in S, got ",
      value.size(1));
}

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, {},
      /*value_may_be_reduced_precision=*/true);
  check_positions_fit_int32(value);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  auto output = at::empty(
      {value.size(0), sampling_locations.size(1), value.size(2) * value.size(3)},
      value.options());
  if (output.numel() == 0) {
    return output;
  }
  active_kernels().forward(value_c, shapes_c, starts_c, loc_c, attn_c, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output, /*value_may_be_reduced_precision=*/true);
  check_positions_fit_int32(value);
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto loc_c = sampling_locations.contiguous();
  const auto attn_c = attention_weights.contiguous();
  const auto grad_output_c = grad_output.contiguous();
  // half and bfloat16 accumulate grad_value in float, rounded once at the end
  auto grad_value = at::zeros_like(value_c, value_c.options().dtype(loc_c.scalar_type()));
  auto grad_locations = at::zeros_like(loc_c);
  auto grad_weights = at::zeros_like(attn_c);
  if (grad_output_c.numel() > 0) {
    active_kernels().backward(
        value_c, shapes_c, starts_c, loc_c, attn_c, grad_output_c, grad_value, grad_locations,
        grad_weights);
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(deformable_detr, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

} // namespace ops
} // namespace deformable_detr
