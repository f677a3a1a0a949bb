// CPU kernels of multi-scale deformable attention for double, float, half and bfloat16 values,
// compiled once per CPU capability (see ms_deform_attn_cpu.h); half and bfloat16 accumulate in
// float.
//
// Each query-head (n, q, m) first turns its L * P sampling locations into a short list of
// in-map bilinear corners (a row of value and a coefficient), then walks that list once per
// block of channels with the block's accumulators in vector registers. Forward runs one task
// per range of query-heads. Backward runs one task per range of heads of one batch element,
// which owns that slice of grad_value and so accumulates without atomics.
#ifndef CPU_CAPABILITY // the plain build of this file (setup.py's source list) is the baseline
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "ms_deform_attn_cpu.h"

namespace deformable_detr {
namespace ops {
namespace CPU_CAPABILITY {

// Everything below has internal linkage: the same code compiled for a wider capability must not
// be merged by the linker with this one.
namespace {

using at::vec::Vectorized;

// The channel loops are unrolled over at most this many vectors, which stay in registers.
constexpr int kMaxVectorsPerBlock = 4;

template <typename scalar_t>
inline Vectorized<at::opmath_type<scalar_t>> load_opmath(const scalar_t* data) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return Vectorized<scalar_t>::loadu(data);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float(data, out);
    return out;
  }
}

template <typename scalar_t>
inline void store_from_opmath(scalar_t* data, const Vectorized<at::opmath_type<scalar_t>>& v) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    v.store(data);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(data, Vectorized<float>::size());
  }
}

// Calls block(d, vectors) over [0, D) in blocks of kMaxVectorsPerBlock vectors, then the last
// full vectors with a smaller compile-time count; returns where the scalar tail starts.
template <typename opmath_t, typename Block>
inline int64_t for_each_channel_block(int64_t D, const Block& block) {
  constexpr int64_t width = Vectorized<opmath_t>::size();
  int64_t d = 0;
  for (; d + kMaxVectorsPerBlock * width <= D; d += kMaxVectorsPerBlock * width) {
    block(d, std::integral_constant<int, kMaxVectorsPerBlock>{});
  }
  static_assert(kMaxVectorsPerBlock == 4, "the switch below covers 1..3 leftover vectors");
  switch ((D - d) / width) {
    case 3:
      block(d, std::integral_constant<int, 3>{});
      return d + 3 * width;
    case 2:
      block(d, std::integral_constant<int, 2>{});
      return d + 2 * width;
    case 1:
      block(d, std::integral_constant<int, 1>{});
      return d + width;
    default:
      return d;
  }
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return {value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
}

// The level of each of a query-head's L * P samples, so that the geometry loop runs over the
// samples without an inner loop over levels (and vectorizes).
template <typename opmath_t>
struct SampleLevels {
  SampleLevels(const int64_t* spatial_shapes, const int64_t* level_start_index, const Sizes& s)
      : width(std::make_unique<opmath_t[]>(s.L * s.P)),
        height(std::make_unique<opmath_t[]>(s.L * s.P)),
        width_int(std::make_unique<int32_t[]>(s.L * s.P)),
        height_int(std::make_unique<int32_t[]>(s.L * s.P)),
        start(std::make_unique<int32_t[]>(s.L * s.P)) {
    for (int64_t i = 0; i < s.L * s.P; ++i) {
      const int64_t l = i / s.P;
      width[i] = width_int[i] = static_cast<int32_t>(spatial_shapes[2 * l + 1]);
      height[i] = height_int[i] = static_cast<int32_t>(spatial_shapes[2 * l]);
      start[i] = static_cast<int32_t>(level_start_index[l]);
    }
  }
  std::unique_ptr<opmath_t[]> width, height;
  std::unique_ptr<int32_t[]> width_int, height_int, start;
};

// The bilinear corners of one query-head's samples, as arrays indexed j = k * samples + i for
// corner k of sample i: its position in S (`row`), whether it is in the map (`valid`) and its
// coefficient (attention weight times bilinear weight). Outside the map a corner has zero
// padding, so invalid corners are skipped (reading them would turn an infinite value into NaN).
template <typename opmath_t>
struct SampleGeometry {
  explicit SampleGeometry(int64_t samples)
      : row(std::make_unique<int32_t[]>(4 * samples)),
        valid(std::make_unique<int32_t[]>(4 * samples)),
        coefficient(std::make_unique<opmath_t[]>(4 * samples)),
        lw(std::make_unique<opmath_t[]>(samples)),
        lh(std::make_unique<opmath_t[]>(samples)) {}
  std::unique_ptr<int32_t[]> row, valid;
  std::unique_ptr<opmath_t[]> coefficient;
  std::unique_ptr<opmath_t[]> lw, lh; // fractional part of x and y
};

// Branch-free so that the compiler vectorizes it over the samples; the same geometry as
// bilinear_corners (bilinear.h), which the CUDA kernels use.
template <typename opmath_t>
inline void compute_geometry(
    const opmath_t* __restrict__ loc,
    const opmath_t* __restrict__ attn,
    const SampleLevels<opmath_t>& levels,
    int64_t samples,
    SampleGeometry<opmath_t>& g) {
  const opmath_t* __restrict__ width = levels.width.get();
  const opmath_t* __restrict__ height = levels.height.get();
  const int32_t* __restrict__ width_int = levels.width_int.get();
  const int32_t* __restrict__ height_int = levels.height_int.get();
  const int32_t* __restrict__ start = levels.start.get();
  int32_t* __restrict__ row = g.row.get();
  int32_t* __restrict__ valid = g.valid.get();
  opmath_t* __restrict__ coefficient = g.coefficient.get();
  opmath_t* __restrict__ lw_out = g.lw.get();
  opmath_t* __restrict__ lh_out = g.lh.get();
  for (int64_t i = 0; i < samples; ++i) {
    // pixel centers at integer coordinates (align_corners=False)
    const opmath_t x = loc[2 * i] * width[i] - opmath_t(0.5);
    const opmath_t y = loc[2 * i + 1] * height[i] - opmath_t(0.5);
    // written so that NaN locations fail as well
    const bool inside = x > -1 && y > -1 && x < width[i] && y < height[i];
    // samples outside move to (0, 0), so the integer conversion below stays defined
    const opmath_t xs = inside ? x : opmath_t(0);
    const opmath_t ys = inside ? y : opmath_t(0);
    const opmath_t x_floor = std::floor(xs), y_floor = std::floor(ys);
    const int32_t x0 = static_cast<int32_t>(x_floor), y0 = static_cast<int32_t>(y_floor);
    const opmath_t lw = xs - x_floor, lh = ys - y_floor, hw = 1 - lw, hh = 1 - lh;
    const opmath_t a = attn[i];
    const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < width_int[i];
    const bool in_y0 = inside && y0 >= 0, in_y1 = inside && y0 + 1 < height_int[i];
    const int32_t row00 = start[i] + y0 * width_int[i] + x0;
    row[i] = row00;
    row[samples + i] = row00 + 1;
    row[2 * samples + i] = row00 + width_int[i];
    row[3 * samples + i] = row00 + width_int[i] + 1;
    valid[i] = in_y0 && in_x0;
    valid[samples + i] = in_y0 && in_x1;
    valid[2 * samples + i] = in_y1 && in_x0;
    valid[3 * samples + i] = in_y1 && in_x1;
    coefficient[i] = a * hh * hw;
    coefficient[samples + i] = a * hh * lw;
    coefficient[2 * samples + i] = a * lh * hw;
    coefficient[3 * samples + i] = a * lh * lw;
    lw_out[i] = lw;
    lh_out[i] = lh;
  }
}

// One valid corner of the forward's list.
template <typename opmath_t>
struct Corner {
  int64_t offset; // of the corner's row from the head's first row
  opmath_t coefficient;
};

template <typename scalar_t>
void forward_kernel(
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const at::opmath_type<scalar_t>* sampling_locations,
    const at::opmath_type<scalar_t>* attention_weights,
    scalar_t* output,
    const Sizes& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const int64_t row_stride = s.M * s.D; // distance between consecutive positions in S
  const int64_t samples = s.L * s.P;
  const SampleLevels<opmath_t> levels(spatial_shapes, level_start_index, s);
  const int64_t grain = std::max<int64_t>(1, 2048 / (samples * s.D + 1));
  at::parallel_for(0, s.N * s.Lq * s.M, grain, [&](int64_t begin, int64_t end) {
    SampleGeometry<opmath_t> g(samples);
    const auto corners = std::make_unique<Corner<opmath_t>[]>(4 * samples);
    for (int64_t qh = begin; qh < end; ++qh) {
      const int64_t m = qh % s.M;
      const int64_t n = qh / (s.Lq * s.M);
      compute_geometry(
          sampling_locations + qh * samples * 2, attention_weights + qh * samples, levels,
          samples, g);
      int64_t count = 0;
      for (int64_t j = 0; j < 4 * samples; ++j) {
        corners[count] = {g.row[j] * row_stride, g.coefficient[j]};
        count += g.valid[j];
      }
      const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
      scalar_t* out = output + qh * s.D;
      const Corner<opmath_t>* first = corners.get();
      const int64_t tail = for_each_channel_block<opmath_t>(s.D, [&](int64_t d, auto vectors) {
        constexpr int kVectors = decltype(vectors)::value;
        // two independent sums halve the chain of dependent multiply-adds
        Vec sum[2][kVectors];
        for (int v = 0; v < kVectors; ++v) {
          sum[0][v] = sum[1][v] = Vec(opmath_t(0));
        }
        int64_t c = 0;
        for (; c + 1 < count; c += 2) {
          for (int half = 0; half < 2; ++half) {
            const scalar_t* row = value_head + first[c + half].offset + d;
            const Vec coefficient(first[c + half].coefficient);
            for (int v = 0; v < kVectors; ++v) {
              sum[half][v] =
                  at::vec::fmadd(coefficient, load_opmath(row + v * Vec::size()), sum[half][v]);
            }
          }
        }
        if (c < count) {
          const scalar_t* row = value_head + first[c].offset + d;
          const Vec coefficient(first[c].coefficient);
          for (int v = 0; v < kVectors; ++v) {
            sum[0][v] = at::vec::fmadd(coefficient, load_opmath(row + v * Vec::size()), sum[0][v]);
          }
        }
        for (int v = 0; v < kVectors; ++v) {
          store_from_opmath(out + d + v * Vec::size(), sum[0][v] + sum[1][v]);
        }
      });
      for (int64_t d = tail; d < s.D; ++d) {
        opmath_t sum = 0;
        for (int64_t c = 0; c < count; ++c) {
          sum += first[c].coefficient * static_cast<opmath_t>(value_head[first[c].offset + d]);
        }
        out[d] = static_cast<scalar_t>(sum);
      }
    }
  });
}

// The largest number of heads per backward task that still gives every thread a task.
int64_t heads_per_backward_task(int64_t N, int64_t M) {
  const int64_t threads = at::get_num_threads();
  for (int64_t heads = M; heads > 1; --heads) {
    if (M % heads == 0 && N * (M / heads) >= threads) {
      return heads;
    }
  }
  return 1;
}

template <typename scalar_t>
void backward_kernel(
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const at::opmath_type<scalar_t>* sampling_locations,
    const at::opmath_type<scalar_t>* attention_weights,
    const scalar_t* grad_output,
    at::opmath_type<scalar_t>* grad_value,
    at::opmath_type<scalar_t>* grad_sampling_locations,
    at::opmath_type<scalar_t>* grad_attention_weights,
    const Sizes& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const int64_t row_stride = s.M * s.D;
  const int64_t samples = s.L * s.P;
  const SampleLevels<opmath_t> levels(spatial_shapes, level_start_index, s);
  // Wide tasks (all heads of a query in turn) read the query-major inputs and the value rows
  // sequentially (1.35x faster than a task per head on the encoder shape); narrower tasks are
  // made only when threads would otherwise sit idle.
  const int64_t heads_per_task = heads_per_backward_task(s.N, s.M);
  const int64_t tasks_per_batch = s.M / heads_per_task;
  at::parallel_for(0, s.N * tasks_per_batch, 1, [&](int64_t begin, int64_t end) {
    SampleGeometry<opmath_t> g(samples);
    // dots[j]: grad_output . the value row of corner j (0 when invalid)
    const auto dots = std::make_unique<opmath_t[]>(4 * samples);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_batch;
      const int64_t first_head = (task % tasks_per_batch) * heads_per_task;
      for (int64_t q = 0; q < s.Lq; ++q) {
        for (int64_t m = first_head; m < first_head + heads_per_task; ++m) {
          const int64_t qh = (n * s.Lq + q) * s.M + m;
          const opmath_t* loc = sampling_locations + qh * samples * 2;
          const opmath_t* attn = attention_weights + qh * samples;
          compute_geometry(loc, attn, levels, samples, g);
          std::fill(dots.get(), dots.get() + 4 * samples, opmath_t(0));
          const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
          opmath_t* grad_value_head = grad_value + n * s.S * row_stride + m * s.D;
          const scalar_t* go = grad_output + qh * s.D;
          const int64_t tail = for_each_channel_block<opmath_t>(s.D, [&](int64_t d, auto vectors) {
            constexpr int kVectors = decltype(vectors)::value;
            Vec g_out[kVectors];
            for (int v = 0; v < kVectors; ++v) {
              g_out[v] = load_opmath(go + d + v * Vec::size());
            }
            for (int64_t j = 0; j < 4 * samples; ++j) {
              if (!g.valid[j]) {
                continue;
              }
              const int64_t offset = g.row[j] * row_stride + d;
              const scalar_t* row = value_head + offset;
              opmath_t* grad_row = grad_value_head + offset;
              const Vec coefficient(g.coefficient[j]);
              Vec dot = g_out[0] * load_opmath(row);
              for (int v = 1; v < kVectors; ++v) {
                dot = at::vec::fmadd(g_out[v], load_opmath(row + v * Vec::size()), dot);
              }
              for (int v = 0; v < kVectors; ++v) {
                opmath_t* grad = grad_row + v * Vec::size();
                at::vec::fmadd(coefficient, g_out[v], Vec::loadu(grad)).store(grad);
              }
              dots[j] += at::vec::vec_reduce_all<opmath_t>(std::plus<Vec>(), dot);
            }
          });
          for (int64_t d = tail; d < s.D; ++d) {
            const opmath_t go_d = go[d];
            for (int64_t j = 0; j < 4 * samples; ++j) {
              if (g.valid[j]) {
                const int64_t offset = g.row[j] * row_stride + d;
                dots[j] += go_d * static_cast<opmath_t>(value_head[offset]);
                grad_value_head[offset] += g.coefficient[j] * go_d;
              }
            }
          }
          // sample = sum_k weight[k] * v[k], and the weights are bilinear in (x, y); samples
          // outside the map have four zero dots and get zero gradients
          opmath_t* grad_loc = grad_sampling_locations + qh * samples * 2;
          opmath_t* grad_attn = grad_attention_weights + qh * samples;
          for (int64_t i = 0; i < samples; ++i) {
            const opmath_t d0 = dots[i], d1 = dots[samples + i];
            const opmath_t d2 = dots[2 * samples + i], d3 = dots[3 * samples + i];
            const opmath_t lw = g.lw[i], lh = g.lh[i], hw = 1 - lw, hh = 1 - lh;
            grad_attn[i] = hh * hw * d0 + hh * lw * d1 + lh * hw * d2 + lh * lw * d3;
            grad_loc[2 * i] = attn[i] * levels.width[i] * (hh * (d1 - d0) + lh * (d3 - d2));
            grad_loc[2 * i + 1] = attn[i] * levels.height[i] * (hw * (d2 - d0) + lw * (d3 - d1));
          }
        }
      }
    }
  });
}

} // namespace

void ms_deform_attn_forward_kernel(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    at::Tensor& output) {
  const Sizes s = sizes_of(value, sampling_locations);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<opmath_t>(),
            attention_weights.data_ptr<opmath_t>(), output.data_ptr<scalar_t>(), s);
      });
}

void ms_deform_attn_backward_kernel(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_sampling_locations,
    at::Tensor& grad_attention_weights) {
  const Sizes s = sizes_of(value, sampling_locations);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        backward_kernel<scalar_t>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<opmath_t>(),
            attention_weights.data_ptr<opmath_t>(), grad_output.data_ptr<scalar_t>(),
            grad_value.data_ptr<opmath_t>(), grad_sampling_locations.data_ptr<opmath_t>(),
            grad_attention_weights.data_ptr<opmath_t>(), s);
      });
}

} // namespace CPU_CAPABILITY
} // namespace ops
} // namespace deformable_detr
