// CPU emulation of the CUDA execution model, for running csrc/cuda/*.cu on a machine without a GPU (see
// emulate.py). The kernels are compiled as ordinary C++ with -DPOINTINS_EMULATION; this header supplies what
// nvcc would: thread/block indices, barriers, warp collectives, dynamic shared memory and kernel launches.
// csrc/cuda/primitives.cuh maps the warp-level instructions (mma.sync, ldmatrix, cp.async) to the functions
// declared here.
//
// Each block runs on one OS thread, its CUDA threads as user-level contexts (fibers) that switch only at
// __syncthreads and at warp collectives, so what the kernels do between two barriers happens in an order the
// scheduler chooses: a seeded random permutation of the threads after every barrier (POINTINS_EMU_SEED). The
// emulation is stricter than the hardware where that finds bugs:
//   - shared memory starts every block filled with 0xFF bytes (NaN in every float type);
//   - a cp.async writes 0xFF into its destination when issued and the data only when a cp.async.wait_group
//     retires its group (the hardware may land it any time in between);
//   - a barrier or warp collective reached by some threads while others have exited, or two different warp
//     collectives met by the lanes of one warp, is an error, as is a deadlock;
//   - ldmatrix and cp.async check their alignment, sizes, and that shared addresses lie in the block's
//     dynamic shared memory; launches check the grid, block and shared-memory limits of an sm_90 device
//     (and that more than 48 KiB of shared memory was opted into).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = int;
struct alignas(8) int2 {
  int x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }

namespace emu {

// --- limits of the emulated device (an H100/H200: sm_90) ---
constexpr int kMultiprocessors = 132;
constexpr std::size_t kMaxSharedOptin = 232448;  // 227 KiB per block after cudaFuncSetAttribute
constexpr std::size_t kDefaultSharedLimit = 48 * 1024;

// --- the running thread ---
dim3 thread_idx();
dim3 block_idx();
dim3 grid_dim();
dim3 block_dim();
unsigned char* dynamic_smem();
[[noreturn]] void fail(const std::string& message);

// --- barriers and warp collectives ---
void sync_block();
void sync_warp(unsigned mask);
// Every lane of the warp contributes `in` (in_bytes); the last lane to arrive runs `complete` on all 32 inputs
// (laid out lane by lane, kSlotBytes apart) and writes each lane's output the same way; each lane gets its own.
constexpr int kSlotBytes = 64;
using Complete = void (*)(const unsigned char* in, unsigned char* out, const void* context);
void collective(const char* op, const void* in, int in_bytes, void* out, int out_bytes, Complete complete,
                const void* context = nullptr);

unsigned ballot(unsigned mask, bool predicate);
unsigned match_any(unsigned mask, uint64_t value);
uint64_t shfl_bits(unsigned mask, uint64_t bits, int mode, int operand);  // mode 0: index, 1: xor, 2: down, 3: up

template <typename T>
T shfl(unsigned mask, T value, int mode, int operand) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shfl_bits(mask, bits, mode, operand);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// --- warp-level matrix instructions (semantics of PTX ldmatrix / mma.sync) ---
// ldmatrix.sync.aligned.m8n8.x{count}{.trans}.shared.b16: `row` is this lane's row address.
void ldmatrix(uint32_t* regs, int count, bool trans, const void* row);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (kind 0: bf16, 1: f16) and
// m16n8k8.row.col.f32.tf32.tf32.f32 (kind 2), d += a * b.
void mma(float* d, const uint32_t* a, const uint32_t* b, int kind);

// --- cp.async ---
void cp_async(void* smem, const void* global, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// --- launches ---
struct LaunchConfig {
  dim3 grid, block;
  std::size_t smem;
  const void* kernel;
};
void run_launch(const LaunchConfig& config, const std::function<void()>& body);
void set_max_dynamic_smem(const void* kernel, std::size_t bytes);
long launch_count();
// Record mode (benchmarks/estimate_cuda.py): launches are checked and recorded, their bodies not run, and every
// persistent grid is as large as its work (resident_blocks answers "unbounded"), so a record names the work
// units a GPU's persistent blocks would share. Each record: "<kernel offset in its library> <grid.x> <grid.y>
// <grid.z> <block.x> <shared bytes>", one line per launch; taking them clears the list.
void set_recording(bool on);
bool recording();
std::string take_records();

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  std::tuple<std::decay_t<P>...> values(std::forward<A>(args)...);
  run_launch({grid, block, smem, reinterpret_cast<const void*>(kernel)},
             [&values, kernel] { std::apply(kernel, values); });
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define gridDim (::emu::grid_dim())
#define blockDim (::emu::block_dim())

inline void __syncthreads() { ::emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::sync_warp(mask); }
inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::emu::ballot(mask, predicate != 0); }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return ::emu::match_any(mask, static_cast<uint64_t>(value));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int lane, int = 32) { return ::emu::shfl(mask, value, 0, lane); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int offset, int = 32) { return ::emu::shfl(mask, value, 1, offset); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned offset, int = 32) {
  return ::emu::shfl(mask, value, 2, static_cast<int>(offset));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned offset, int = 32) {
  return ::emu::shfl(mask, value, 3, static_cast<int>(offset));
}
// CUDA's integer min / max device functions.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
