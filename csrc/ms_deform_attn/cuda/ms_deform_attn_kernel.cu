// CUDA kernels of multi-scale deformable attention for float, double, half and bfloat16 value.
//
// One warp per query-head (n, q, m); its lanes stride over the D channels, so value rows are
// read coalesced. Sums run in opmath_t (float for half/bfloat16), in which sampling locations
// and attention weights also come. In the backward pass each warp owns its query-head's
// location and weight gradients (warp-shuffle reductions, no atomics) while grad_value, shared
// by all queries, is accumulated with atomicAdd into an opmath_t buffer.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
// c10's stream header (at::cuda::getCurrentCUDAStream is an alias of it): ATen/cuda/CUDAContext.h
// would also pull in the cuBLAS/cuSPARSE headers, which a bare CUDA toolkit may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../bilinear.h"
#include "../ms_deform_attn.h"

namespace deformable_detr {
namespace ops {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// The Python side validates the levels; this guard keeps inconsistent inputs from reading
// outside value without a host sync to check them.
__device__ __forceinline__ bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H > 0 && W > 0 && start >= 0 && start <= S && H * W <= S - start;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffff, x, offset);
  }
  return x;
}

template <typename scalar_t, typename opmath_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const opmath_t* __restrict__ sampling_locations,
    const opmath_t* __restrict__ attention_weights,
    scalar_t* __restrict__ output,
    Sizes s) {
  const int64_t qh = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (qh >= s.N * s.Lq * s.M) {
    return;
  }
  const int64_t m = qh % s.M;
  const int64_t n = qh / (s.Lq * s.M);
  const int64_t row_stride = s.M * s.D;
  const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
  for (int64_t d = threadIdx.x; d < s.D; d += kWarp) {
    const opmath_t* loc = sampling_locations + qh * s.L * s.P * 2;
    const opmath_t* attn = attention_weights + qh * s.L * s.P;
    opmath_t acc = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
      const int64_t start = level_start_index[l];
      if (!level_fits(H, W, start, s.S)) {
        loc += 2 * s.P;
        attn += s.P;
        continue;
      }
      for (int64_t p = 0; p < s.P; ++p, loc += 2, ++attn) {
        Bilinear<opmath_t> b;
        if (!bilinear_corners(loc[0], loc[1], H, W, start, b)) {
          continue;
        }
        opmath_t sample = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (b.row[k] >= 0) {
            sample += b.weight[k] * static_cast<opmath_t>(value_head[b.row[k] * row_stride + d]);
          }
        }
        acc += *attn * sample;
      }
    }
    output[qh * s.D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const opmath_t* __restrict__ sampling_locations,
    const opmath_t* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    opmath_t* __restrict__ grad_value,
    opmath_t* __restrict__ grad_sampling_locations,
    opmath_t* __restrict__ grad_attention_weights,
    Sizes s) {
  const int64_t qh = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  // whole warps leave together, so the shuffles below always see all 32 lanes
  if (qh >= s.N * s.Lq * s.M) {
    return;
  }
  const int64_t m = qh % s.M;
  const int64_t n = qh / (s.Lq * s.M);
  const int64_t row_stride = s.M * s.D;
  const int64_t value_offset = n * s.S * row_stride + m * s.D;
  const scalar_t* go = grad_output + qh * s.D;
  const opmath_t* loc = sampling_locations + qh * s.L * s.P * 2;
  const opmath_t* attn = attention_weights + qh * s.L * s.P;
  opmath_t* grad_loc = grad_sampling_locations + qh * s.L * s.P * 2;
  opmath_t* grad_attn = grad_attention_weights + qh * s.L * s.P;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
    const int64_t start = level_start_index[l];
    const bool fits = level_fits(H, W, start, s.S);
    for (int64_t p = 0; p < s.P; ++p, loc += 2, grad_loc += 2, ++attn, ++grad_attn) {
      Bilinear<opmath_t> b;
      if (!fits || !bilinear_corners(loc[0], loc[1], H, W, start, b)) {
        continue; // the outputs were zero-initialized
      }
      const opmath_t a = *attn;
      const opmath_t hw = 1 - b.lw, hh = 1 - b.lh;
      opmath_t sum_attn = 0, sum_x = 0, sum_y = 0;
      for (int64_t d = threadIdx.x; d < s.D; d += kWarp) {
        const opmath_t g = static_cast<opmath_t>(go[d]);
        opmath_t v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t index = value_offset + b.row[k] * row_stride + d;
          v[k] = b.row[k] >= 0 ? static_cast<opmath_t>(value[index]) : opmath_t(0);
          if (b.row[k] >= 0) {
            atomicAdd(grad_value + index, a * b.weight[k] * g);
          }
        }
        sum_attn += g *
            (b.weight[0] * v[0] + b.weight[1] * v[1] + b.weight[2] * v[2] + b.weight[3] * v[3]);
        // derivatives of the bilinear sample along x and y
        sum_x += g * (hh * (v[1] - v[0]) + b.lh * (v[3] - v[2]));
        sum_y += g * (hw * (v[2] - v[0]) + b.lw * (v[3] - v[1]));
      }
      sum_attn = warp_sum(sum_attn);
      sum_x = warp_sum(sum_x);
      sum_y = warp_sum(sum_y);
      if (threadIdx.x == 0) {
        *grad_attn = sum_attn;
        grad_loc[0] = a * W * sum_x;
        grad_loc[1] = a * H * sum_y;
      }
    }
  }
}

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
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, {},
      /*value_may_be_reduced_precision=*/true);
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
        forward_kernel<scalar_t, opmath_t><<<grid_for(s), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(
            value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
            starts_c.data_ptr<int64_t>(), loc_c.data_ptr<opmath_t>(),
            attn_c.data_ptr<opmath_t>(), output.data_ptr<scalar_t>(), s);
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
      grad_output, /*value_may_be_reduced_precision=*/true);
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
          backward_kernel<scalar_t, opmath_t>
              <<<grid_for(s), dim3(kWarp, kWarpsPerBlock), 0, stream>>>(
                  value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(),
                  starts_c.data_ptr<int64_t>(), loc_c.data_ptr<opmath_t>(),
                  attn_c.data_ptr<opmath_t>(), grad_output_c.data_ptr<scalar_t>(),
                  grad_value.data_ptr<opmath_t>(), grad_locations.data_ptr<opmath_t>(),
                  grad_weights.data_ptr<opmath_t>(), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

} // namespace

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

} // namespace ops
} // namespace deformable_detr
