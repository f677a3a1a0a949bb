// CPU kernels of multi-scale deformable attention for double, float, half and bfloat16 values,
// compiled once per CPU capability (see ms_deform_attn_cpu.h); half and bfloat16 accumulate in
// float.
//
// Each query-head (n, q, m) first computes the bilinear corners of its L * P samples a vector of
// samples at a time (a row of value and a coefficient per corner), then walks the corners once
// per block of channels with the block's accumulators in vector registers. Forward: the threads
// take chunks of query-heads in turn. Backward: one task per range of heads of one batch
// element, which owns that slice of grad_value and so accumulates without atomics.
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
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "ms_deform_attn_cpu.h"

namespace deformable_detr {
namespace ops {
namespace CPU_CAPABILITY {

// Internal linkage: the same code compiled for another capability must not be merged with this
// one by the linker (test_ms_deform_attn_cpu.py checks no AVX code leaks out of the kernels).
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

// Samples are processed in vectors of Vectorized<opmath_t>::size(); the per-sample arrays below
// are padded to a whole number of vectors.
template <typename opmath_t>
int64_t padded_samples(int64_t samples) {
  constexpr int64_t width = Vectorized<opmath_t>::size();
  return (samples + width - 1) / width * width;
}

// The level of each of a query-head's L * P samples (sample i = p + P * l), so that the geometry
// runs over the samples without an inner loop over levels.
template <typename opmath_t>
struct SampleLevels {
  using int_t = at::vec::int_same_size_t<opmath_t>;

  SampleLevels(const int64_t* spatial_shapes, const int64_t* level_start_index, const Sizes& s)
      : width(std::make_unique<opmath_t[]>(padded_samples<opmath_t>(s.L * s.P))),
        height(std::make_unique<opmath_t[]>(padded_samples<opmath_t>(s.L * s.P))),
        width_int(std::make_unique<int_t[]>(padded_samples<opmath_t>(s.L * s.P))),
        start(std::make_unique<int_t[]>(padded_samples<opmath_t>(s.L * s.P))) {
    for (int64_t i = 0; i < padded_samples<opmath_t>(s.L * s.P); ++i) {
      const int64_t l = i / s.P;
      // padding lanes get W = H = -1, which no location is inside
      const bool padding = l >= s.L;
      width[i] = padding ? -1 : spatial_shapes[2 * l + 1];
      height[i] = padding ? -1 : spatial_shapes[2 * l];
      width_int[i] = padding ? -1 : spatial_shapes[2 * l + 1];
      start[i] = padding ? 0 : level_start_index[l];
    }
  }

  std::unique_ptr<opmath_t[]> width, height;
  std::unique_ptr<int_t[]> width_int, start;
};

// The bilinear corners of one query-head's samples, as arrays indexed j = k * stride + i for
// corner k (top-left, top-right, bottom-left, bottom-right) of sample i: its position in S
// (`row`), whether it lies in the map (`valid`, 1 or 0) and its coefficient (attention weight
// times bilinear weight). Corners outside are zero padding and skipped: reading them instead
// would turn an infinite value into NaN.
template <typename opmath_t>
struct SampleGeometry {
  using int_t = at::vec::int_same_size_t<opmath_t>;

  explicit SampleGeometry(int64_t samples)
      : stride(padded_samples<opmath_t>(samples)),
        row(std::make_unique<int_t[]>(4 * stride)),
        valid(std::make_unique<opmath_t[]>(4 * stride)),
        coefficient(std::make_unique<opmath_t[]>(4 * stride)),
        lw(std::make_unique<opmath_t[]>(stride)),
        lh(std::make_unique<opmath_t[]>(stride)) {}

  int64_t stride;
  std::unique_ptr<int_t[]> row;
  std::unique_ptr<opmath_t[]> valid, coefficient;
  std::unique_ptr<opmath_t[]> lw, lh; // fractional part of x and y
};

// The geometry of bilinear_corners (bilinear.h, which the CUDA kernels use), a vector of samples
// at a time. loc: (samples, 2) (x, y); attn: (samples,).
template <typename opmath_t>
inline void compute_geometry(
    const opmath_t* loc,
    const opmath_t* attn,
    const SampleLevels<opmath_t>& levels,
    int64_t samples,
    SampleGeometry<opmath_t>& g) {
  using Vec = Vectorized<opmath_t>;
  using IVec = Vectorized<at::vec::int_same_size_t<opmath_t>>;
  constexpr int64_t width = Vec::size();
  const Vec zero(0), one(1), minus_one(-1), half(0.5);
  for (int64_t i = 0; i < samples; i += width) {
    // partial loads fill the padding lanes with zeros
    const int64_t coordinates = 2 * std::min(width, samples - i);
    const auto [loc_x, loc_y] = at::vec::deinterleave2(
        Vec::loadu(loc + 2 * i, std::min(width, coordinates)),
        Vec::loadu(loc + 2 * i + width, std::max<int64_t>(0, coordinates - width)));
    const Vec W = Vec::loadu(levels.width.get() + i);
    const Vec H = Vec::loadu(levels.height.get() + i);
    // pixel centers at integer coordinates (align_corners=False)
    const Vec x = loc_x * W - half;
    const Vec y = loc_y * H - half;
    // comparisons with NaN are false, so NaN locations are outside too
    const Vec inside = (x > minus_one) & (y > minus_one) & (x < W) & (y < H);
    // samples outside move to (0, 0), so the integer conversion below stays defined
    const Vec xs = Vec::blendv(zero, x, inside);
    const Vec ys = Vec::blendv(zero, y, inside);
    const Vec x_floor = xs.floor(), y_floor = ys.floor();
    const Vec lw = xs - x_floor, lh = ys - y_floor, hw = one - lw, hh = one - lh;
    const Vec in_x0 = x_floor >= zero, in_x1 = x_floor + one < W;
    const Vec in_y0 = inside & (y_floor >= zero), in_y1 = inside & (y_floor + one < H);
    (in_y0 & in_x0 & one).store(g.valid.get() + i);
    (in_y0 & in_x1 & one).store(g.valid.get() + g.stride + i);
    (in_y1 & in_x0 & one).store(g.valid.get() + 2 * g.stride + i);
    (in_y1 & in_x1 & one).store(g.valid.get() + 3 * g.stride + i);
    const Vec a = Vec::loadu(attn + i, std::min(width, samples - i));
    (a * hh * hw).store(g.coefficient.get() + i);
    (a * hh * lw).store(g.coefficient.get() + g.stride + i);
    (a * lh * hw).store(g.coefficient.get() + 2 * g.stride + i);
    (a * lh * lw).store(g.coefficient.get() + 3 * g.stride + i);
    lw.store(g.lw.get() + i);
    lh.store(g.lh.get() + i);
    const IVec W_int = IVec::loadu(levels.width_int.get() + i);
    const IVec row00 = IVec::loadu(levels.start.get() + i) +
        at::vec::convert_to_int_of_same_size(y_floor) * W_int +
        at::vec::convert_to_int_of_same_size(x_floor);
    const IVec row10 = row00 + W_int;
    row00.store(g.row.get() + i);
    (row00 + IVec(1)).store(g.row.get() + g.stride + i);
    row10.store(g.row.get() + 2 * g.stride + i);
    (row10 + IVec(1)).store(g.row.get() + 3 * g.stride + i);
  }
}

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
  const int64_t query_heads = s.N * s.Lq * s.M;
  // The threads take chunks of query-heads in turn rather than equal shares, so that a thread
  // slowed down by other processes on the machine does not hold up the others.
  const int64_t chunk = std::max<int64_t>(1, 32768 / (samples * s.D + 1));
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    SampleGeometry<opmath_t> g(samples);
    // the row each corner reads: its row of value, or zeros outside the map
    const auto rows = std::make_unique<const scalar_t*[]>(4 * g.stride);
    const auto zeros = std::make_unique<scalar_t[]>(s.D);
    for (int64_t begin = next_chunk.fetch_add(chunk); begin < query_heads;
         begin = next_chunk.fetch_add(chunk)) {
      for (int64_t qh = begin; qh < std::min(begin + chunk, query_heads); ++qh) {
        const int64_t m = qh % s.M;
        const int64_t n = qh / (s.Lq * s.M);
        compute_geometry(
            sampling_locations + qh * samples * 2, attention_weights + qh * samples, levels,
            samples, g);
        const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
        const int64_t corners = 4 * g.stride; // even: whole vectors of samples
        for (int64_t j = 0; j < corners; ++j) {
          rows[j] = g.valid[j] != 0 ? value_head + g.row[j] * row_stride : zeros.get();
        }
        const opmath_t* coefficients = g.coefficient.get();
        scalar_t* out = output + qh * s.D;
        const int64_t tail = for_each_channel_block<opmath_t>(s.D, [&](int64_t d, auto vectors) {
          constexpr int kVectors = decltype(vectors)::value;
          // two independent sums halve the chain of dependent multiply-adds
          Vec sum[2][kVectors];
          for (int v = 0; v < kVectors; ++v) {
            sum[0][v] = sum[1][v] = Vec(opmath_t(0));
          }
          for (int64_t j = 0; j < corners; j += 2) {
            for (int half = 0; half < 2; ++half) {
              const scalar_t* row = rows[j + half] + d;
              const Vec coefficient(coefficients[j + half]);
              for (int v = 0; v < kVectors; ++v) {
                sum[half][v] =
                    at::vec::fmadd(coefficient, load_opmath(row + v * Vec::size()), sum[half][v]);
              }
            }
          }
          for (int v = 0; v < kVectors; ++v) {
            store_from_opmath(out + d + v * Vec::size(), sum[0][v] + sum[1][v]);
          }
        });
        for (int64_t d = tail; d < s.D; ++d) {
          opmath_t sum = 0;
          for (int64_t j = 0; j < corners; ++j) {
            sum += coefficients[j] * static_cast<opmath_t>(rows[j][d]);
          }
          out[d] = static_cast<scalar_t>(sum);
        }
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
    const auto dots = std::make_unique<opmath_t[]>(4 * g.stride);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_batch;
      const int64_t first_head = (task % tasks_per_batch) * heads_per_task;
      for (int64_t q = 0; q < s.Lq; ++q) {
        for (int64_t m = first_head; m < first_head + heads_per_task; ++m) {
          const int64_t qh = (n * s.Lq + q) * s.M + m;
          const opmath_t* loc = sampling_locations + qh * samples * 2;
          const opmath_t* attn = attention_weights + qh * samples;
          compute_geometry(loc, attn, levels, samples, g);
          std::fill(dots.get(), dots.get() + 4 * g.stride, opmath_t(0));
          const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
          opmath_t* grad_value_head = grad_value + n * s.S * row_stride + m * s.D;
          const scalar_t* go = grad_output + qh * s.D;
          const int64_t tail = for_each_channel_block<opmath_t>(s.D, [&](int64_t d, auto vectors) {
            constexpr int kVectors = decltype(vectors)::value;
            Vec g_out[kVectors];
            for (int v = 0; v < kVectors; ++v) {
              g_out[v] = load_opmath(go + d + v * Vec::size());
            }
            for (int64_t j = 0; j < 4 * g.stride; ++j) {
              if (g.valid[j] == 0) {
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
            for (int64_t j = 0; j < 4 * g.stride; ++j) {
              if (g.valid[j] != 0) {
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
            const opmath_t d0 = dots[i], d1 = dots[g.stride + i];
            const opmath_t d2 = dots[2 * g.stride + i], d3 = dots[3 * g.stride + i];
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
