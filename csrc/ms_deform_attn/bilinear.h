// Bilinear sampling geometry of the CUDA kernels (the CPU kernels compute the same, vectorized).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace deformable_detr {
namespace ops {

// The four bilinear neighbours of one sampling location within one level. Corners outside the
// map (zero padding) have row -1 and weight 0, so the channel loops need no branches.
template <typename scalar_t>
struct Bilinear {
  int64_t row[4]; // position in S of each corner, -1 when outside
  scalar_t weight[4];
  scalar_t lw, lh; // fractional part of x and y
};

// Pixel centers sit at integer coordinates after the align_corners=False shift
// x = loc_x * W - 0.5; returns false when the location is too far out for any corner to count.
template <typename scalar_t>
C10_HOST_DEVICE inline bool bilinear_corners(
    scalar_t loc_x, scalar_t loc_y, int64_t H, int64_t W, int64_t start,
    Bilinear<scalar_t>& b) {
  const scalar_t x = loc_x * W - scalar_t(0.5);
  const scalar_t y = loc_y * H - scalar_t(0.5);
  // written so that NaN locations fail the test as well
  if (!(x > -1 && y > -1 && x < W && y < H)) {
    return false;
  }
  const int64_t x0 = static_cast<int64_t>(::floor(x));
  const int64_t y0 = static_cast<int64_t>(::floor(y));
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  b.lw = x - x0;
  b.lh = y - y0;
  const scalar_t hw = 1 - b.lw, hh = 1 - b.lh;
  const bool in_x0 = x0 >= 0, in_x1 = x1 < W, in_y0 = y0 >= 0, in_y1 = y1 < H;
  b.row[0] = in_y0 && in_x0 ? start + y0 * W + x0 : -1;
  b.row[1] = in_y0 && in_x1 ? start + y0 * W + x1 : -1;
  b.row[2] = in_y1 && in_x0 ? start + y1 * W + x0 : -1;
  b.row[3] = in_y1 && in_x1 ? start + y1 * W + x1 : -1;
  b.weight[0] = hh * hw;
  b.weight[1] = hh * b.lw;
  b.weight[2] = b.lh * hw;
  b.weight[3] = b.lh * b.lw;
  return true;
}

} // namespace ops
} // namespace deformable_detr
