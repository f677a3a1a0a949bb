#pragma once

#include <ATen/ATen.h>

namespace deformable_detr {
namespace ops {

// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P);
// output and grad_output (N, Lq, M * D).

// Checks ranks, sizes, dtypes and devices (and, for CPU tensors, that the levels fit in S);
// every message names the argument and the expected shape. `grad_output` may be undefined.
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    bool value_may_be_reduced_precision);

} // namespace ops
} // namespace deformable_detr
