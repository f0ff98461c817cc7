// The GEMM engine of the CPU kernels: C[M x N] (+)= A[M x K] * B[K x N], C row-major in the accumulation type.
//
// The convolution passes never hand the engine a matrix: they hand it pointers to the rows or the columns of
// its operands (weight rows, shifted rows of a template's channels, grad_output rows), which are scattered in
// memory, and the engine reads them where they lie whenever its micro-kernel can:
//   float32 / float64 on the vector kernels   A read in place (rows or columns), B rows read in place; only a
//                                             transposed B, a ragged last block and a ragged last panel are
//                                             packed (in 8 x 8 register transposes where it transposes)
//   bfloat16 / float16 on the vector kernels  both operands packed and widened to float32 once
//   bfloat16 on AMX                           A packed row-major, B packed with pairs of k interleaved
//   bfloat16 on AVX512-BF16                   A and B packed with pairs of k interleaved, not widened
//
// Micro-kernels, chosen per call from the CPU (and POINTINS_CPU_ISA, which may only lower the choice):
//   amx         bfloat16 only: Intel AMX tiles (TDPBF16PS, float32 accumulation), 32 x 32 blocks of C
//   avx512bf16  bfloat16 only: 8 x 32 register blocks, VDPBF16PS (pairs of k, float32 accumulation)
//   avx512      8 x 32 (float) / 8 x 16 (double) register blocks, FMA
//   avx2        6 x 16 / 6 x 8 register blocks, FMA
//   generic     4 x 8 / 4 x 4 register blocks, baseline x86-64 (or any CPU)
// Every element of C sums its K products in increasing k (AMX: in blocks of 32, AVX512-BF16: in pairs, in the
// order the hardware fixes), so results depend only on the shapes and the micro-kernel family, never on
// threads or tiling.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>

namespace pointins_ops {
namespace cpu {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The best micro-kernel family this CPU and OS can run, capped by the environment variable POINTINS_CPU_ISA
// (generic, avx2, avx512, avx512bf16 or amx; read on every call so tests can switch). AMX and AVX512-BF16 are
// only used for bfloat16: float32 and the others run the avx512 kernels under either.
Isa active_isa();
const char* isa_name(Isa isa);

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// A 64-byte aligned buffer that only grows; its contents are unspecified after resize.
template <typename T>
class Scratch {
 public:
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T* resize(int64_t count) {
    if (count > capacity_) {
      const int64_t bytes = round_up(std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T)), 64);
      data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(data_ != nullptr, "instance_aware_conv: out of memory allocating ", bytes, " bytes of scratch");
      capacity_ = bytes / static_cast<int64_t>(sizeof(T));
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

// One operand, as pointers into wherever it lies. For A (M x K): kRows gives M pointers to K contiguous values,
// kColumns K pointers to M contiguous values. For B (K x N): kRows gives K pointers to N contiguous values,
// kColumns N pointers to K contiguous values. `offset` is added to every pointer. `far` says the rows lie far
// apart in memory (a large template's channels): reading many of them in turn defeats the prefetchers, so the
// engine copies them into panels first, one sequential row at a time.
template <typename T>
struct Operand {
  enum Form { kRows, kColumns };
  Form form;
  const T* const* pointers;
  int64_t offset;
  bool far = false;
};

template <typename T>
Operand<T> rows_of(const T* const* pointers, int64_t offset = 0, bool far = false) {
  return {Operand<T>::kRows, pointers, offset, far};
}
template <typename T>
Operand<T> columns_of(const T* const* pointers, int64_t offset = 0) {
  return {Operand<T>::kColumns, pointers, offset, false};
}

// The packing buffers one thread's products reuse.
struct GemmScratch {
  Scratch<float> a32, b32;
  Scratch<double> a64, b64;
  Scratch<uint16_t> a16, b16;
};

// C = A * B (or C += A * B when accumulate), for scalar_t in {float, double, Half, BFloat16}; C has at least
// padded_m(isa, M) rows and a leading dimension ldc >= padded_n(isa, N): rows and columns beyond M and N receive
// values the caller ignores.
template <typename scalar_t>
void gemm(Isa isa, const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t M, int64_t N, int64_t K,
          at::opmath_type<scalar_t>* c, int64_t ldc, bool accumulate, GemmScratch& scratch);

int64_t padded_m(Isa isa, int64_t M);
template <typename scalar_t>
int64_t padded_n(Isa isa, int64_t N);

// Runs fn() compiled for the instruction set of `isa`: the wrappers inline (flatten) everything fn calls that
// can be inlined, so the convolution passes' own loops (epilogues, column tiles, direct kernels) vectorize for
// the CPU at hand while the library itself stays runnable on any x86-64.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define POINTINS_X86 1
#define POINTINS_AVX512_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt"
#define POINTINS_AVX2_TARGET "avx2,fma,f16c,bmi,bmi2,popcnt"
template <typename Fn>
__attribute__((target(POINTINS_AVX512_TARGET), flatten)) void call_avx512(Fn& fn) {
  fn();
}
template <typename Fn>
__attribute__((target(POINTINS_AVX2_TARGET), flatten)) void call_avx2(Fn& fn) {
  fn();
}
#endif
template <typename Fn>
__attribute__((flatten)) void call_generic(Fn& fn) {
  fn();
}

template <typename Fn>
void with_isa(Isa isa, Fn&& fn) {
#if defined(POINTINS_X86)
  if (isa >= Isa::kAvx512) return call_avx512(fn);
  if (isa == Isa::kAvx2) return call_avx2(fn);
#endif
  call_generic(fn);
}

}  // namespace cpu
}  // namespace pointins_ops
