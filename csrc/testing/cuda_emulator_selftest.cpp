// Kernels that pin down the CUDA emulator's semantics, one per command-line case; run by
// tests/test_cuda_emulator.py. Prints the case's results on one line, or the emulator's error
// on stderr with exit status 3. Built with the emulator force-included, like the op.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ms_deform_attn/cuda/ms_deform_attn_kernels.cuh"

namespace {

constexpr unsigned int kFullMask = 0xffffffffu;

int lane_id() {
  return static_cast<int>(threadIdx.x) % warpSize;
}

// Each lane's results of the four shuffles with a sub-warp width, 4 per thread.
__global__ void shuffles(int* out) {
  const int lane = lane_id();
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[4 * t + 0] = __shfl_down_sync(kFullMask, lane, 3, 8);
  out[4 * t + 1] = __shfl_up_sync(kFullMask, lane, 2, 16);
  out[4 * t + 2] = __shfl_xor_sync(kFullMask, lane, 5);
  out[4 * t + 3] = __shfl_sync(kFullMask, lane, 7, 4);
}

// Ballot, any and all of lane % 3 == 0 per warp, then of lane < 40 (all lanes of warp 0 only).
__global__ void votes(unsigned int* out) {
  const int lane = lane_id();
  const int warp = threadIdx.x / warpSize;
  const unsigned int ballot = __ballot_sync(kFullMask, lane % 3 == 0);
  const int any = __any_sync(kFullMask, lane == 31);
  const int all = __all_sync(kFullMask, static_cast<int>(threadIdx.x) < 40);
  __syncwarp();
  if (lane == 0) {
    out[3 * warp + 0] = ballot;
    out[3 * warp + 1] = any;
    out[3 * warp + 2] = all;
  }
}

// Every thread reads what the mirrored thread wrote before the barrier.
__global__ void barrier(int* out) {
  __shared__ int values[64];
  const int t = threadIdx.x;
  values[t] = 100 * blockIdx.x + t;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = values[blockDim.x - 1 - t];
}

// The order in which blocks start.
__global__ void block_order(int* counter, int* out) {
  if (threadIdx.x == 0) {
    out[atomicAdd(counter, 1)] = blockIdx.x;
  }
}

__global__ void lane_exits_before_shuffle(float* out) {
  if (lane_id() >= 16) {
    return;
  }
  out[threadIdx.x] = deformable_detr::ops::cuda_kernels::warp_sum(1.0f);
}

__global__ void lanes_at_different_shuffles(int* out) {
  const int lane = lane_id();
  if (lane % 2 == 0) {
    out[lane] = __shfl_xor_sync(kFullMask, lane, 1);
  } else {
    out[lane] = __shfl_xor_sync(kFullMask, lane, 1);
  }
}

__global__ void mismatched_masks(int* out) {
  const int lane = lane_id();
  out[lane] = __shfl_xor_sync(lane == 0 ? 0xffffu : kFullMask, lane, 1);
}

__global__ void read_outside_mask(int* out) {
  const int lane = lane_id();
  if (lane < 16) {
    out[lane] = __shfl_down_sync(0xffffu, lane, 8);
  }
}

__global__ void syncthreads_after_exit(int* out) {
  if (threadIdx.x >= 32) {
    return;
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

template <typename T>
void print(const std::vector<T>& values) {
  for (const T& value : values) {
    std::printf("%lld ", static_cast<long long>(value));
  }
  std::printf("\n");
}

// The backward kernel on one query-head with D = 4 channels, so lanes 4..31 have no channel.
void ms_deform_attn_backward() {
  using deformable_detr::ops::cuda_kernels::backward_kernel;
  using deformable_detr::ops::cuda_kernels::Sizes;
  const Sizes s{1, 6, 1, 4, 1, 1, 2}; // N, S, M, D, Lq, L, P
  std::vector<float> value(6 * 4), grad_output(4, 1.0f);
  for (size_t i = 0; i < value.size(); ++i) {
    value[i] = static_cast<float>(i);
  }
  const std::vector<int64_t> shapes{2, 3}, starts{0};
  const std::vector<float> locations{0.4f, 0.3f, 0.7f, 0.8f}, weights{0.25f, 0.75f};
  std::vector<float> grad_value(value.size()), grad_locations(4), grad_weights(2);
  cuda_emulator::launch(
      backward_kernel<float, float>, dim3(1), dim3(32, 8), nullptr, value.data(), shapes.data(),
      starts.data(), locations.data(), weights.data(), grad_output.data(), grad_value.data(),
      grad_locations.data(), grad_weights.data(), s);
  for (const float g : grad_locations) {
    std::printf("%.6f ", g);
  }
  for (const float g : grad_weights) {
    std::printf("%.6f ", g);
  }
  std::printf("\n");
}

} // namespace

int main(int argc, char** argv) {
  const std::string name = argc > 1 ? argv[1] : "";
  if (argc > 2) {
    cuda_emulator::set_schedule_seed(std::stoull(argv[2]));
  }
  try {
    if (name == "shuffles") {
      std::vector<int> out(4 * 64);
      cuda_emulator::launch(shuffles, dim3(1), dim3(64), nullptr, out.data());
      print(out);
    } else if (name == "votes") {
      std::vector<unsigned int> out(6);
      cuda_emulator::launch(votes, dim3(1), dim3(64), nullptr, out.data());
      print(out);
    } else if (name == "barrier") {
      std::vector<int> out(2 * 64);
      cuda_emulator::launch(barrier, dim3(2), dim3(64), nullptr, out.data());
      print(out);
    } else if (name == "block_order") {
      int counter = 0;
      std::vector<int> out(16);
      cuda_emulator::launch(block_order, dim3(16), dim3(8), nullptr, &counter, out.data());
      print(out);
    } else if (name == "lane_exits_before_shuffle") {
      std::vector<float> out(32);
      cuda_emulator::launch(lane_exits_before_shuffle, dim3(1), dim3(32), nullptr, out.data());
    } else if (name == "lanes_at_different_shuffles") {
      std::vector<int> out(32);
      cuda_emulator::launch(lanes_at_different_shuffles, dim3(1), dim3(32), nullptr, out.data());
    } else if (name == "mismatched_masks") {
      std::vector<int> out(32);
      cuda_emulator::launch(mismatched_masks, dim3(1), dim3(32), nullptr, out.data());
    } else if (name == "read_outside_mask") {
      std::vector<int> out(32);
      cuda_emulator::launch(read_outside_mask, dim3(1), dim3(32), nullptr, out.data());
    } else if (name == "syncthreads_after_exit") {
      std::vector<int> out(64);
      cuda_emulator::launch(syncthreads_after_exit, dim3(1), dim3(64), nullptr, out.data());
    } else if (name == "too_many_threads") {
      std::vector<int> out(4 * 32 * 33);
      cuda_emulator::launch(shuffles, dim3(1), dim3(32, 33), nullptr, out.data());
    } else if (name == "empty_grid") {
      std::vector<int> out(4 * 64);
      cuda_emulator::launch(shuffles, dim3(0), dim3(64), nullptr, out.data());
    } else if (name == "ms_deform_attn_backward") {
      ms_deform_attn_backward();
    } else {
      std::fprintf(stderr, "unknown case %s\n", name.c_str());
      return 2;
    }
  } catch (const cuda_emulator::Error& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 3;
  }
  return 0;
}
