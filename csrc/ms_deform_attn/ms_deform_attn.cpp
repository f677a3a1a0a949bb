#include "ms_deform_attn.h"

#include <torch/library.h>

#include <vector>

namespace deformable_detr {
namespace ops {

void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    bool value_may_be_reduced_precision,
    bool check_levels) {
  TORCH_CHECK_VALUE(
      value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  TORCH_CHECK_VALUE(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.size(0) > 0,
      "ms_deform_attn: spatial_shapes must be (L, 2) with L > 0, got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(
      level_start_index.dim() == 1 && level_start_index.size(0) == L,
      "ms_deform_attn: level_start_index must be (L,) = (", L, ",), got ",
      level_start_index.sizes());
  TORCH_CHECK_VALUE(
      sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
          sampling_locations.size(2) == M && sampling_locations.size(3) == L &&
          sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) = (", N, ", Lq, ", M, ", ",
      L, ", P, 2), got ", sampling_locations.sizes());
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK_VALUE(
      attention_weights.sizes() == at::IntArrayRef({N, Lq, M, L, P}),
      "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", N, ", ", Lq, ", ", M,
      ", ", L, ", ", P, "), got ", attention_weights.sizes());
  if (grad_output.defined()) {
    TORCH_CHECK_VALUE(
        grad_output.sizes() == at::IntArrayRef({N, Lq, M * D}),
        "ms_deform_attn: grad_output must be (N, Lq, M * D) = (", N, ", ", Lq, ", ", M * D,
        "), got ", grad_output.sizes());
    TORCH_CHECK_VALUE(
        grad_output.scalar_type() == value.scalar_type(),
        "ms_deform_attn: grad_output must have value's dtype ", value.scalar_type(), ", got ",
        grad_output.scalar_type());
  }

  TORCH_CHECK_VALUE(
      spatial_shapes.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK_VALUE(
      level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: level_start_index must be int64, got ", level_start_index.scalar_type());
  const auto value_type = value.scalar_type();
  const bool reduced = value_type == at::kHalf || value_type == at::kBFloat16;
  TORCH_CHECK_VALUE(
      value_type == at::kFloat || value_type == at::kDouble ||
          (reduced && value_may_be_reduced_precision),
      "ms_deform_attn: unsupported value dtype ", value_type, " on ", value.device().type());
  // locations and weights come in the accumulation dtype: float for half/bfloat16/float
  const auto opmath_type = reduced ? at::kFloat : value_type;
  TORCH_CHECK_VALUE(
      sampling_locations.scalar_type() == opmath_type,
      "ms_deform_attn: sampling_locations must be ", opmath_type, " for value of dtype ",
      value_type, ", got ", sampling_locations.scalar_type());
  TORCH_CHECK_VALUE(
      attention_weights.scalar_type() == opmath_type,
      "ms_deform_attn: attention_weights must be ", opmath_type, " for value of dtype ",
      value_type, ", got ", attention_weights.scalar_type());

  const std::pair<const char*, const at::Tensor*> others[] = {
      {"spatial_shapes", &spatial_shapes},
      {"level_start_index", &level_start_index},
      {"sampling_locations", &sampling_locations},
      {"attention_weights", &attention_weights},
      {"grad_output", &grad_output}};
  for (const auto& named : others) {
    if (named.second->defined()) {
      TORCH_CHECK_VALUE(
          named.second->device() == value.device(), "ms_deform_attn: ", named.first, " is on ",
          named.second->device(), " but value is on ", value.device());
    }
  }

  if (!check_levels) {
    return;
  }
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* shape = shapes.const_data_ptr<int64_t>();
  std::vector<int64_t> expected_starts(L);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shape[2 * l], W = shape[2 * l + 1];
    TORCH_CHECK_VALUE(
        H > 0 && W > 0, "ms_deform_attn: spatial_shapes must hold positive (H, W), got (", H,
        ", ", W, ") at level ", l);
    expected_starts[l] = total;
    total += H * W;
  }
  const at::IntArrayRef got_starts(starts.const_data_ptr<int64_t>(), L);
  TORCH_CHECK_VALUE(
      got_starts == at::IntArrayRef(expected_starts),
      "ms_deform_attn: level_start_index must be the exclusive cumsum of H*W = ",
      at::IntArrayRef(expected_starts), ", got ", got_starts);
  TORCH_CHECK_VALUE(
      S == total, "ms_deform_attn: value has S=", S,
      " positions but spatial_shapes sum to sum(H*W)=", total);
}

TORCH_LIBRARY(deformable_detr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

} // namespace ops
} // namespace deformable_detr
