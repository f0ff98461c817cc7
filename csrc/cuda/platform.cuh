// What the CUDA sources need from the CUDA runtime and from torch's CUDA support, in one place, so that the
// same sources compile with nvcc for the GPU and as plain C++ for the CPU emulation (-DPOINTINS_EMULATION,
// see emulation/prelude.h). Nothing else in csrc/cuda/ includes a CUDA header directly.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#ifdef POINTINS_EMULATION
#include "emulation/prelude.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

namespace pointins_ops::cuda {

#ifdef POINTINS_EMULATION

using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline int multiprocessor_count() { return emu::kMultiprocessors; }
inline int compute_capability() { return 90; }
inline std::size_t max_dynamic_smem() { return emu::kMaxSharedOptin; }
// Blocks of a kernel resident on one multiprocessor: the emulation runs blocks one after another, and a small
// number makes the persistent loops take several tiles per block, as they do on a large problem on the GPU.
// In record mode (estimate_cuda.py) "unbounded", so that a persistent grid counts its work units.
template <typename Kernel>
int resident_blocks(Kernel, int, std::size_t) {
  return emu::recording() ? (1 << 22) : 1;
}
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, std::size_t bytes) {
  emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, int threads, std::size_t smem, Stream, A&&... args) {
  emu::launch(kernel, grid, dim3(threads), smem, std::forward<A>(args)...);
}

#else

using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int compute_capability() {
  const cudaDeviceProp* p = at::cuda::getCurrentDeviceProperties();
  return 10 * p->major + p->minor;
}
inline std::size_t max_dynamic_smem() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
// Per-kernel answers of the runtime, asked once per device (and shared-memory size): the calls cost host time.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, std::size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, std::size_t>, int> known;  // (kernel, device, smem)
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), at::cuda::current_device(), smem);
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  blocks = blocks > 0 ? blocks : 1;
  known[key] = blocks;
  return blocks;
}
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, std::size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, std::size_t> allowed;  // (kernel, device) -> bytes
  const std::lock_guard<std::mutex> lock(mutex);
  std::size_t& current = allowed[{reinterpret_cast<const void*>(kernel), at::cuda::current_device()}];
  if (bytes <= current) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  current = bytes;
}
// Every kernel goes through here: launched on the caller's (current) stream, and checked.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, int threads, std::size_t smem, Stream stream, A&&... args) {
  kernel<<<grid, threads, smem, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace pointins_ops::cuda
