// A CPU emulation of CUDA's execution model, to run CUDA kernels in tests on machines without a
// GPU. Header-only; force-include it (-include testing/cuda_emulator.h) when compiling CUDA
// sources with a host compiler, with testing/cuda_stand_ins/ first on the include path.
//
// Every CUDA thread is a fiber (ucontext). A launch runs its blocks one after another, in an
// order permuted by set_schedule_seed; within a block the fibers run in turn, each until it
// exits or reaches a synchronizing call:
//   - __syncthreads() releases once every thread of the block has arrived;
//   - __shfl_*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync complete only when every
//     lane named in the mask has arrived at the same call (same source line, mask and width),
//     and exchange values as the hardware does.
// Kernels that would hang or be undefined on a GPU raise cuda_emulator::Error from the launch
// instead: a shuffle waiting for a lane that exited or sits at another call or __syncthreads,
// lanes passing different masks, a lane reading from one outside the mask, __syncthreads after
// some threads exited, an invalid grid or block.
//
// What it cannot check: real concurrency and memory ordering (blocks never overlap, so races
// between blocks and missing __threadfence go unnoticed), __shared__ memory is static storage
// reused by every block, nvcc's code generation, speed. Not supported: dynamic shared memory,
// streams (work runs at launch), inline PTX, cooperative groups, textures.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMULATOR_ASAN 1
#endif

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};

struct uint3 {
  unsigned int x, y, z;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// blocks never overlap, so one static array serves every block in turn
#define __shared__ static

namespace cuda_emulator {

constexpr int kWarpSize = 32;

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

enum class Wait { kNone, kBarrier, kWarp, kExited };

// One lane's arrival at a warp-synchronous call.
struct WarpCall {
  const char* name;
  std::source_location site;
  unsigned int mask;
  int operand; // source lane, delta or xor mask; the predicate for votes
  int width;
  uint64_t bits; // the value offered by a shuffle
};

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  int rank; // linear index in the block: warp = rank / kWarpSize
  Wait wait = Wait::kNone;
  WarpCall call{};
  uint64_t result = 0;
  void* fake_stack = nullptr; // AddressSanitizer's bookkeeping of this stack
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx{};
  std::function<void()> body;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::exception_ptr failure;
  ucontext_t scheduler;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
};

#ifdef CUDA_EMULATOR_ASAN
constexpr size_t kStackSize = 512 * 1024; // instrumented frames are larger
#else
constexpr size_t kStackSize = 64 * 1024;
#endif

inline Launch*& active_launch() {
  static thread_local Launch* launch = nullptr;
  return launch;
}

inline uint64_t& schedule_seed() {
  static uint64_t seed = 0;
  return seed;
}

inline Launch& running(const char* what) {
  Launch* launch = active_launch();
  if (launch == nullptr || launch->current == nullptr) {
    std::fprintf(stderr, "cuda_emulator: %s called outside a kernel\n", what);
    std::abort();
  }
  return *launch;
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  message << "cuda_emulator: ";
  (message << ... << parts);
  throw Error(message.str());
}

inline std::string where(const Launch& launch, const Fiber& fiber) {
  std::ostringstream text;
  text << "block (" << launch.block_idx.x << "," << launch.block_idx.y << ","
       << launch.block_idx.z << ") thread (" << fiber.thread_idx.x << "," << fiber.thread_idx.y
       << "," << fiber.thread_idx.z << ") [warp " << fiber.rank / kWarpSize << " lane "
       << fiber.rank % kWarpSize << "]";
  return text.str();
}

inline std::string describe(const WarpCall& call) {
  std::ostringstream text;
  text << call.name << "(mask 0x" << std::hex << call.mask << std::dec << ") at "
       << call.site.file_name() << ":" << call.site.line();
  return text.str();
}

// Fiber side: hand control back to the scheduler until released.
inline void yield(Launch& launch, Fiber& fiber) {
#ifdef CUDA_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(
      &fiber.fake_stack, launch.scheduler_stack_bottom, launch.scheduler_stack_size);
#endif
  swapcontext(&fiber.context, &launch.scheduler);
#ifdef CUDA_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(
      fiber.fake_stack, &launch.scheduler_stack_bottom, &launch.scheduler_stack_size);
#endif
}

inline void fiber_main() {
  Launch& launch = *active_launch();
  Fiber& fiber = *launch.current;
#ifdef CUDA_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(
      nullptr, &launch.scheduler_stack_bottom, &launch.scheduler_stack_size);
#endif
  try {
    launch.body();
  } catch (...) {
    if (!launch.failure) {
      launch.failure = std::current_exception();
    }
  }
  fiber.wait = Wait::kExited;
#ifdef CUDA_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(
      nullptr, launch.scheduler_stack_bottom, launch.scheduler_stack_size);
#endif
  swapcontext(&fiber.context, &launch.scheduler); // never resumed
}

inline uint64_t warp_call(const WarpCall& call) {
  Launch& launch = running(call.name);
  Fiber& fiber = *launch.current;
  fiber.call = call;
  fiber.wait = Wait::kWarp;
  yield(launch, fiber);
  return fiber.result;
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(
      std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
      "the emulator shuffles trivially copyable types of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// The lane whose value `lane` receives, as the hardware computes it within width-wide segments.
inline int source_lane(const WarpCall& call, int lane) {
  const int segment = lane & ~(call.width - 1);
  const std::string_view name = call.name;
  if (name == "__shfl_sync") {
    return segment + (call.operand & (call.width - 1));
  }
  if (name == "__shfl_up_sync") {
    return (lane - segment) >= call.operand ? lane - call.operand : lane;
  }
  if (name == "__shfl_down_sync") {
    return (lane - segment) + call.operand < call.width ? lane + call.operand : lane;
  }
  const int source = lane ^ call.operand; // __shfl_xor_sync: later segments are out of reach
  return source < segment + call.width ? source : lane;
}

inline bool is_shuffle(const WarpCall& call) {
  return std::string_view(call.name).rfind("__shfl", 0) == 0;
}

// Completes the warp calls whose lanes have all arrived; raises on calls that cannot complete.
inline bool release_warp_calls(Launch& launch) {
  bool released = false;
  const int threads = static_cast<int>(launch.fibers.size());
  for (Fiber& fiber : launch.fibers) {
    if (fiber.wait != Wait::kWarp) {
      continue;
    }
    const WarpCall& call = fiber.call;
    const int base = fiber.rank - fiber.rank % kWarpSize;
    const int own_lane = fiber.rank % kWarpSize;
    if (!(call.mask >> own_lane & 1u)) {
      fail(where(launch, fiber), ": ", describe(call), " leaves the calling lane out of its mask");
    }
    if (call.width < 1 || call.width > kWarpSize || (call.width & (call.width - 1)) != 0) {
      fail(where(launch, fiber), ": ", describe(call), " has width ", call.width,
           ", not a power of 2 up to ", kWarpSize);
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(call.mask >> lane & 1u)) {
        continue;
      }
      if (base + lane >= threads) {
        fail(where(launch, fiber), ": ", describe(call), " names lane ", lane,
             ", which this block does not have");
      }
      const Fiber& other = launch.fibers[base + lane];
      if (other.wait == Wait::kExited) {
        fail(where(launch, fiber), ": ", describe(call), " waits for lane ", lane,
             ", which has exited");
      }
      if (other.wait == Wait::kBarrier) {
        fail(where(launch, fiber), ": ", describe(call), " waits for lane ", lane,
             ", which waits at __syncthreads()");
      }
      const WarpCall& theirs = other.call;
      if (std::string_view(theirs.name) != call.name ||
          theirs.site.line() != call.site.line() ||
          std::string_view(theirs.site.file_name()) != call.site.file_name()) {
        fail(where(launch, fiber), ": ", describe(call), " waits for lane ", lane,
             ", which is at another call: ", describe(theirs));
      }
      if (theirs.mask != call.mask || theirs.width != call.width) {
        fail(where(launch, fiber), ": ", describe(call), " width ", call.width, " but lane ",
             lane, " passes ", describe(theirs), " width ", theirs.width);
      }
    }
    // every lane of the mask is here: compute all results before releasing anyone
    uint32_t votes = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (call.mask >> lane & 1u && launch.fibers[base + lane].call.operand != 0) {
        votes |= 1u << lane;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(call.mask >> lane & 1u)) {
        continue;
      }
      Fiber& member = launch.fibers[base + lane];
      const std::string_view name = member.call.name;
      if (is_shuffle(member.call)) {
        const int source = source_lane(member.call, lane);
        if (!(call.mask >> source & 1u)) {
          fail(where(launch, member), ": ", describe(member.call), " reads lane ", source,
               ", which is outside the mask (undefined on a GPU)");
        }
        member.result = launch.fibers[base + source].call.bits;
      } else if (name == "__ballot_sync") {
        member.result = votes;
      } else if (name == "__any_sync") {
        member.result = votes != 0;
      } else if (name == "__all_sync") {
        member.result = votes == call.mask;
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (call.mask >> lane & 1u) {
        launch.fibers[base + lane].wait = Wait::kNone;
      }
    }
    released = true;
  }
  return released;
}

inline bool release_barrier(Launch& launch) {
  int waiting = 0, exited = 0;
  for (const Fiber& fiber : launch.fibers) {
    waiting += fiber.wait == Wait::kBarrier;
    exited += fiber.wait == Wait::kExited;
  }
  if (waiting == 0) {
    return false;
  }
  if (waiting + exited != static_cast<int>(launch.fibers.size())) {
    return false;
  }
  if (exited > 0) {
    fail("block (", launch.block_idx.x, ",", launch.block_idx.y, ",", launch.block_idx.z,
         "): __syncthreads() reached by ", waiting, " threads while ", exited,
         " have exited (undefined on a GPU)");
  }
  for (Fiber& fiber : launch.fibers) {
    fiber.wait = Wait::kNone;
  }
  return true;
}

inline void check_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const char* problem = nullptr;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    problem = "a zero dimension";
  } else if (block.x > 1024 || block.y > 1024 || block.z > 64) {
    problem = "block dimensions above (1024, 1024, 64)";
  } else if (threads > 1024) {
    problem = "more than 1024 threads per block";
  } else if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    problem = "grid dimensions above (2^31 - 1, 65535, 65535)";
  }
  if (problem != nullptr) {
    fail("invalid launch configuration: grid (", grid.x, ",", grid.y, ",", grid.z, "), block (",
         block.x, ",", block.y, ",", block.z, ") has ", problem);
  }
}

inline void run_block(Launch& launch, char* stacks, const std::vector<int>& order) {
  const dim3 block = launch.block;
  for (Fiber& fiber : launch.fibers) {
    const int rank = fiber.rank;
    fiber.thread_idx = {rank % block.x, rank / block.x % block.y, rank / (block.x * block.y)};
    fiber.wait = Wait::kNone;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stacks + rank * kStackSize;
    fiber.context.uc_stack.ss_size = kStackSize;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_main, 0);
  }
  for (;;) {
    bool all_exited = true;
    for (const int rank : order) {
      Fiber& fiber = launch.fibers[rank];
      if (fiber.wait == Wait::kNone) {
        launch.current = &fiber;
#ifdef CUDA_EMULATOR_ASAN
        __sanitizer_start_switch_fiber(
            &launch.scheduler_fake_stack, fiber.context.uc_stack.ss_sp, kStackSize);
#endif
        swapcontext(&launch.scheduler, &fiber.context);
#ifdef CUDA_EMULATOR_ASAN
        __sanitizer_finish_switch_fiber(launch.scheduler_fake_stack, nullptr, nullptr);
#endif
        launch.current = nullptr;
        if (launch.failure) {
          std::rethrow_exception(launch.failure);
        }
      }
      all_exited = all_exited && fiber.wait == Wait::kExited;
    }
    if (all_exited) {
      return;
    }
    if (!release_warp_calls(launch) && !release_barrier(launch)) {
      fail("block (", launch.block_idx.x, ",", launch.block_idx.y, ",", launch.block_idx.z,
           "): deadlock, no thread can proceed");
    }
  }
}

// Clears the active launch even when a block raises.
struct ActiveLaunch {
  explicit ActiveLaunch(Launch* launch) {
    if (active_launch() != nullptr) {
      fail("a kernel launched another kernel, which the emulator does not support");
    }
    active_launch() = launch;
  }
  ~ActiveLaunch() {
    active_launch() = nullptr;
  }
};

inline void run(dim3 grid, dim3 block, std::function<void()> body) {
  check_configuration(grid, block);
  Launch launch;
  launch.grid = grid;
  launch.block = block;
  launch.body = std::move(body);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  launch.fibers.resize(threads);
  for (int rank = 0; rank < threads; ++rank) {
    launch.fibers[rank].rank = rank;
  }
  std::unique_ptr<char[]> stacks(new char[threads * kStackSize]);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t(0));
  std::vector<int> thread_order(threads);
  std::iota(thread_order.begin(), thread_order.end(), 0);
  std::mt19937_64 random(schedule_seed());
  if (schedule_seed() != 0) {
    std::shuffle(block_order.begin(), block_order.end(), random);
  }
  const ActiveLaunch active(&launch);
  for (const uint64_t index : block_order) {
    launch.block_idx = {
        static_cast<unsigned int>(index % grid.x),
        static_cast<unsigned int>(index / grid.x % grid.y),
        static_cast<unsigned int>(index / (uint64_t(grid.x) * grid.y))};
    if (schedule_seed() != 0) {
      std::shuffle(thread_order.begin(), thread_order.end(), random);
    }
    run_block(launch, stacks.get(), thread_order);
  }
}

} // namespace detail

// 0 (the default) runs blocks and threads in index order; any other seed permutes both, so a
// test can check that a kernel's result does not depend on the schedule.
inline void set_schedule_seed(uint64_t seed) {
  detail::schedule_seed() = seed;
}

// kernel<<<grid, block, 0, stream>>>(args...), run to completion before returning.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args&&... args) {
  // CUDA copies the arguments once; each thread then gets its own copy of the parameters
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::run(grid, block, [&] { std::apply(kernel, params); });
}

} // namespace cuda_emulator

#define threadIdx (::cuda_emulator::detail::running("threadIdx").current->thread_idx)
#define blockIdx (::cuda_emulator::detail::running("blockIdx").block_idx)
#define blockDim (::cuda_emulator::detail::running("blockDim").block)
#define gridDim (::cuda_emulator::detail::running("gridDim").grid)
#define warpSize (::cuda_emulator::kWarpSize)

inline void __syncthreads() {
  auto& launch = ::cuda_emulator::detail::running("__syncthreads");
  launch.current->wait = ::cuda_emulator::detail::Wait::kBarrier;
  ::cuda_emulator::detail::yield(launch, *launch.current);
}

inline void __syncwarp(
    unsigned int mask = 0xffffffffu,
    std::source_location site = std::source_location::current()) {
  ::cuda_emulator::detail::warp_call({"__syncwarp", site, mask, 0, ::cuda_emulator::kWarpSize, 0});
}

#define CUDA_EMULATOR_SHUFFLE(name)                                                           \
  template <typename T>                                                                       \
  T name(                                                                                     \
      unsigned int mask, T var, int operand, int width = ::cuda_emulator::kWarpSize,          \
      std::source_location site = std::source_location::current()) {                         \
    namespace detail = ::cuda_emulator::detail;                                               \
    return detail::from_bits<T>(                                                              \
        detail::warp_call({#name, site, mask, operand, width, detail::to_bits(var)}));        \
  }
CUDA_EMULATOR_SHUFFLE(__shfl_sync)
CUDA_EMULATOR_SHUFFLE(__shfl_up_sync)
CUDA_EMULATOR_SHUFFLE(__shfl_down_sync)
CUDA_EMULATOR_SHUFFLE(__shfl_xor_sync)
#undef CUDA_EMULATOR_SHUFFLE

#define CUDA_EMULATOR_VOTE(name, result_type)                                                  \
  inline result_type name(                                                                     \
      unsigned int mask, int predicate,                                                        \
      std::source_location site = std::source_location::current()) {                          \
    return static_cast<result_type>(::cuda_emulator::detail::warp_call(                        \
        {#name, site, mask, predicate != 0, ::cuda_emulator::kWarpSize, 0}));                   \
  }
CUDA_EMULATOR_VOTE(__ballot_sync, unsigned int)
CUDA_EMULATOR_VOTE(__any_sync, int)
CUDA_EMULATOR_VOTE(__all_sync, int)
#undef CUDA_EMULATOR_VOTE

// Blocks and threads never run at the same time, so a read-modify-write is atomic.
#define CUDA_EMULATOR_ATOMIC_ADD(type)        \
  inline type atomicAdd(type* address, type value) { \
    const type old = *address;                \
    *address = old + value;                   \
    return old;                               \
  }
CUDA_EMULATOR_ATOMIC_ADD(float)
CUDA_EMULATOR_ATOMIC_ADD(double)
CUDA_EMULATOR_ATOMIC_ADD(int)
CUDA_EMULATOR_ATOMIC_ADD(unsigned int)
CUDA_EMULATOR_ATOMIC_ADD(unsigned long long)
#undef CUDA_EMULATOR_ATOMIC_ADD
