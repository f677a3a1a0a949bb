// CUDA kernels of multi-scale deformable attention for float, double, half and bfloat16 value.
//
// One warp per query-head (n, q, m); its lanes stride over the D channels, so value rows are
// read coalesced. Sums run in opmath_t (float for half/bfloat16), in which sampling locations
// and attention weights also come. In the backward pass each warp owns its query-head's
// location and weight gradients (warp-shuffle reductions, no atomics) while grad_value, shared
// by all queries, is accumulated with atomicAdd into an opmath_t buffer.
//
// Device code only: the host side (guard, stream, dtype dispatch, launch) is in
// ms_deform_attn_kernel.cu. The tests also compile this header with a host compiler and run it
// on csrc/testing/cuda_emulator.h, so keep it plain C++ that such a compiler builds:
//   - no inline PTX, no cooperative groups, no textures; only the intrinsics the emulator
//     provides (__shfl_*_sync, __syncwarp, __syncthreads, atomicAdd on float/double/int);
//   - the warp size is kWarp, never a literal 32;
//   - include nothing host-specific (ATen, c10::cuda); bilinear.h is shared with the CPU.
// A new intrinsic is added to the emulator first, with a test of its semantics.
#pragma once

#include <cstdint>

#include "../bilinear.h"

namespace deformable_detr {
namespace ops {
namespace cuda_kernels {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
// channels per lane whose sums the forward keeps in registers, so the bilinear geometry of a
// point is computed once for up to kWarp * kChannelsPerLane channels
constexpr int kChannelsPerLane = 4;

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// The host does not read spatial_shapes / level_start_index (that would sync it), so this
// guard keeps inconsistent inputs from reading outside value.
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
  for (int64_t d0 = threadIdx.x; d0 < s.D; d0 += kWarp * kChannelsPerLane) {
    const opmath_t* loc = sampling_locations + qh * s.L * s.P * 2;
    const opmath_t* attn = attention_weights + qh * s.L * s.P;
    opmath_t acc[kChannelsPerLane] = {};
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
#pragma unroll
        for (int c = 0; c < kChannelsPerLane; ++c) {
          const int64_t d = d0 + c * kWarp;
          if (d >= s.D) {
            break;
          }
          opmath_t sample = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.row[k] >= 0) {
              sample +=
                  b.weight[k] * static_cast<opmath_t>(value_head[b.row[k] * row_stride + d]);
            }
          }
          acc[c] += *attn * sample;
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kChannelsPerLane; ++c) {
      const int64_t d = d0 + c * kWarp;
      if (d < s.D) {
        output[qh * s.D + d] = static_cast<scalar_t>(acc[c]);
      }
    }
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
  // whole warps leave together, so the shuffles below always see all kWarp lanes
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

} // namespace cuda_kernels
} // namespace ops
} // namespace deformable_detr
