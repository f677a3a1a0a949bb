#pragma once

#include <ATen/ATen.h>

namespace deformable_detr {
namespace ops {

// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P);
// output and grad_output (N, Lq, M * D).

// Checks ranks, sizes, dtypes and devices and, with `check_levels`, that spatial_shapes are
// positive, level_start_index is their exclusive cumsum and they sum to S (this reads them, so
// they must be on the CPU; the CUDA kernels skip it and guard each level instead). Raises
// ValueError naming the argument and the expected shape. `grad_output` may be undefined.
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    bool value_may_be_reduced_precision,
    bool check_levels = true);

} // namespace ops
} // namespace deformable_detr
