// CPU emulation of the CUDA execution model, for checking csrc/cuda/instance_aware_conv.cu without a GPU (see
// emulate.py): one std::thread per CUDA thread, a std::barrier per block for __syncthreads and one per warp for
// shuffles; blocks run one after another, so __shared__ variables can be function statics. Tensor cores are not
// emulated: without __CUDA_ARCH__ the kernels take their FFMA main loop.
#pragma once
#include <ATen/ATen.h>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>
#include <cstdint>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __half {};
struct __nv_bfloat16 {};
using cudaStream_t = int;

namespace emu {
inline thread_local dim3 thread_index, block_index;
inline dim3 grid_dim, block_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline double shuffle_buffer[1024];
inline long launches = 0;

template <typename T>
T shfl_xor(T value, int offset) {
  const int t = thread_index.x, warp = t / 32, lane = t % 32;
  shuffle_buffer[t] = static_cast<double>(value);
  warp_barriers[warp]->arrive_and_wait();
  const T other = static_cast<T>(shuffle_buffer[warp * 32 + (lane ^ offset)]);
  warp_barriers[warp]->arrive_and_wait();
  return other;
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, int threads, A... args) {
  ++launches;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535, "bad grid");
  grid_dim = grid;
  block_dim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        block_barrier = &bar;
        warp_barriers.clear();
        for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_index = dim3(t);
            block_index = dim3(x, y, z);
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
}
}  // namespace emu

#define threadIdx emu::thread_index
#define blockIdx emu::block_index
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define __syncthreads() emu::block_barrier->arrive_and_wait()
#define __shfl_xor_sync(mask, value, offset) emu::shfl_xor(value, offset)
#define __global__
#define __device__
#define __forceinline__
#define __shared__ static
#define __launch_bounds__(...)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
struct EmuGuard { explicit EmuGuard(c10::Device) {} };
