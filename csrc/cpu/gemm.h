// The GEMM engine of the CPU kernels: C[M x N] (+)= A[M x K] * B[K x N], with A and B packed into the layout
// of the micro-kernel that runs the product and C row-major in the accumulation type.
//
// The convolution passes never hand the engine a matrix: they hand it row pointers (weight rows, rows of a
// template or of its im2col tile, grad_output rows), and the packers gather, convert and lay out what the
// micro-kernel wants. So a template's columns are packed once for all of its instances, nothing is written
// to memory twice, and every pass is the same few calls.
//
// Micro-kernels, chosen per call from the CPU (and POINTINS_CPU_ISA, which may only lower the choice):
//   amx      bfloat16 only: Intel AMX tiles (TDPBF16PS, float32 accumulation), 32 x 32 blocks of C
//   avx512   8 x 32 (float) / 8 x 16 (double) register blocks, FMA
//   avx2     6 x 16 / 6 x 8 register blocks, FMA
//   generic  4 x 8 / 4 x 4 register blocks, baseline x86-64 (or any CPU)
// float16 and bfloat16 without AMX are widened to float32 by the packers. Every element of C sums its K
// products in increasing k (AMX: in blocks of 32, in the order the hardware fixes), so results depend only
// on the shapes and the micro-kernel, never on threads or on where a block sits.
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

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The best micro-kernel family this CPU and OS can run, capped by the environment variable POINTINS_CPU_ISA
// (generic, avx2, avx512 or amx; read on every call so tests can switch). AMX is only used for bfloat16.
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

// One GEMM engine per thread; it owns the packed operands. Usage: pack A, pack B (either order), run.
// The caller's C has at least padded_m(M) rows and a leading dimension of at least padded_n(N); rows and
// columns beyond M and N receive values the caller ignores.
template <typename scalar_t>
class Gemm {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit Gemm(Isa isa);

  int64_t padded_m(int64_t M) const { return round_up(M, m_step_); }
  int64_t padded_n(int64_t N) const { return round_up(N, n_step_); }

  // A[m][k] = rows[m][offset + k]                   (weight rows, grad_output rows)
  void pack_a_rows(const scalar_t* const* rows, int64_t offset, int64_t M, int64_t K);
  // A[m][k] = columns[k][offset + m]                (the transpose of K rows: weight rows for grad_templates)
  void pack_a_columns(const scalar_t* const* columns, int64_t offset, int64_t M, int64_t K);
  // B[k][n] = rows[k][offset + n]                   (template or im2col rows, grad_output rows)
  void pack_b_rows(const scalar_t* const* rows, int64_t offset, int64_t K, int64_t N);
  // B[k][n] = columns[n][offset + k]                (the transpose of N rows: im2col rows for grad_weight)
  void pack_b_columns(const scalar_t* const* columns, int64_t offset, int64_t K, int64_t N);

  // C = A * B, or C += A * B when accumulate. Needs both operands packed with the same K.
  void run(acc_t* c, int64_t ldc, bool accumulate);

  Isa isa() const { return isa_; }

 private:
  Isa isa_;
  int64_t m_step_, n_step_, k_step_;  // M and N padding; K padding (AMX: 32, vector kernels: 1)
  int64_t M_ = 0, N_ = 0, K_a_ = -1, K_b_ = -1;
  Scratch<acc_t> a_, b_;         // vector kernels: A in m_step-row blocks, B in n_step-column panels, k-major
  Scratch<c10::BFloat16> a16_, b16_;  // AMX: A row-major [Mp][Kp], B pair-interleaved [Kp / 2][Np][2]
};

// Runs fn() compiled for the instruction set of `isa`: the wrappers inline (flatten) everything fn calls that
// can be inlined, so the convolution passes' own loops (packing, epilogues, direct kernels) vectorize for the
// CPU at hand while the library itself stays runnable on any x86-64.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
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
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::kAvx512 || isa == Isa::kAmx) return call_avx512(fn);
  if (isa == Isa::kAvx2) return call_avx2(fn);
#endif
  call_generic(fn);
}

namespace detail {

template <typename T>
inline T to_acc(T value) {
  return value;
}
inline float to_acc(c10::Half value) { return static_cast<float>(value); }
inline float to_acc(c10::BFloat16 value) { return static_cast<float>(value); }

// Rows per register block (m_step) of the vector kernel of `isa`; columns are two vectors.
inline int64_t vector_rows(Isa isa) { return isa == Isa::kGeneric ? 4 : (isa == Isa::kAvx2 ? 6 : 8); }
inline int64_t vector_bytes(Isa isa) { return isa == Isa::kGeneric ? 16 : (isa == Isa::kAvx2 ? 32 : 64); }

// Only bfloat16 products run on AMX tiles (float16 would need AMX-FP16, which few CPUs have).
template <typename scalar_t>
constexpr bool kAmxCapable = std::is_same_v<scalar_t, c10::BFloat16>;

}  // namespace detail

template <typename scalar_t>
inline Gemm<scalar_t>::Gemm(Isa isa) : isa_(isa) {
  if (isa_ == Isa::kAmx && !std::is_same_v<scalar_t, c10::BFloat16>) isa_ = Isa::kAvx512;
  if (isa_ == Isa::kAmx) {
    m_step_ = 16;
    n_step_ = 32;
    k_step_ = 32;
  } else {
    m_step_ = detail::vector_rows(isa_);
    n_step_ = 2 * detail::vector_bytes(isa_) / static_cast<int64_t>(sizeof(acc_t));
    k_step_ = 1;
  }
}

template <typename scalar_t>
inline void Gemm<scalar_t>::pack_a_rows(const scalar_t* const* rows, int64_t offset, int64_t M, int64_t K) {
  M_ = M;
  K_a_ = K;
  const int64_t Mp = padded_m(M);
  if constexpr (detail::kAmxCapable<scalar_t>) if (isa_ == Isa::kAmx) {
    const int64_t Kp = round_up(K, k_step_);
    c10::BFloat16* dst = a16_.resize(Mp * Kp);
    for (int64_t m = 0; m < Mp; ++m, dst += Kp) {
      if (m < M) std::memcpy(dst, rows[m] + offset, K * sizeof(c10::BFloat16));
      std::memset(dst + (m < M ? K : 0), 0, (Kp - (m < M ? K : 0)) * sizeof(c10::BFloat16));
    }
    return;
  }
  const int64_t MR = m_step_;
  acc_t* packed = a_.resize(Mp * K);
  for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
    acc_t* block = packed + m0 * K;
    for (int64_t i = 0; i < MR; ++i) {
      if (m0 + i < M) {
        const scalar_t* src = rows[m0 + i] + offset;
        for (int64_t k = 0; k < K; ++k) block[k * MR + i] = detail::to_acc(src[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) block[k * MR + i] = acc_t(0);
      }
    }
  }
}

template <typename scalar_t>
inline void Gemm<scalar_t>::pack_a_columns(const scalar_t* const* columns, int64_t offset, int64_t M, int64_t K) {
  M_ = M;
  K_a_ = K;
  const int64_t Mp = padded_m(M);
  if constexpr (detail::kAmxCapable<scalar_t>) if (isa_ == Isa::kAmx) {
    const int64_t Kp = round_up(K, k_step_);
    c10::BFloat16* dst = a16_.resize(Mp * Kp);
    std::memset(dst, 0, Mp * Kp * sizeof(c10::BFloat16));
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = columns[k] + offset;
      for (int64_t m = 0; m < M; ++m) dst[m * Kp + k] = c10::BFloat16(static_cast<float>(src[m]));
    }
    return;
  }
  const int64_t MR = m_step_;
  acc_t* packed = a_.resize(Mp * K);
  for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
    acc_t* block = packed + m0 * K;
    const int64_t valid = std::min(MR, M - m0);
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = columns[k] + offset + m0;
      acc_t* dst = block + k * MR;
      for (int64_t i = 0; i < valid; ++i) dst[i] = detail::to_acc(src[i]);
      for (int64_t i = valid; i < MR; ++i) dst[i] = acc_t(0);
    }
  }
}

template <typename scalar_t>
inline void Gemm<scalar_t>::pack_b_rows(const scalar_t* const* rows, int64_t offset, int64_t K, int64_t N) {
  N_ = N;
  K_b_ = K;
  const int64_t Np = padded_n(N);
  if constexpr (detail::kAmxCapable<scalar_t>) if (isa_ == Isa::kAmx) {
    const int64_t Kp = round_up(K, k_step_);
    c10::BFloat16* dst = b16_.resize(Kp * Np);
    for (int64_t k = 0; k < Kp; k += 2, dst += 2 * Np) {
      const scalar_t* even = k < K ? rows[k] + offset : nullptr;
      const scalar_t* odd = k + 1 < K ? rows[k + 1] + offset : nullptr;
      for (int64_t n = 0; n < N; ++n) {
        dst[2 * n] = even ? c10::BFloat16(static_cast<float>(even[n])) : c10::BFloat16(0.f);
        dst[2 * n + 1] = odd ? c10::BFloat16(static_cast<float>(odd[n])) : c10::BFloat16(0.f);
      }
      std::memset(dst + 2 * N, 0, 2 * (Np - N) * sizeof(c10::BFloat16));
    }
    return;
  }
  const int64_t NR = n_step_;
  acc_t* packed = b_.resize(Np * K);
  for (int64_t n0 = 0; n0 < Np; n0 += NR) {
    acc_t* panel = packed + n0 * K;
    const int64_t valid = std::max<int64_t>(0, std::min(NR, N - n0));
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = rows[k] + offset + n0;
      acc_t* dst = panel + k * NR;
      for (int64_t j = 0; j < valid; ++j) dst[j] = detail::to_acc(src[j]);
      for (int64_t j = valid; j < NR; ++j) dst[j] = acc_t(0);
    }
  }
}

template <typename scalar_t>
inline void Gemm<scalar_t>::pack_b_columns(const scalar_t* const* columns, int64_t offset, int64_t K, int64_t N) {
  N_ = N;
  K_b_ = K;
  const int64_t Np = padded_n(N);
  if constexpr (detail::kAmxCapable<scalar_t>) if (isa_ == Isa::kAmx) {
    const int64_t Kp = round_up(K, k_step_);
    c10::BFloat16* dst = b16_.resize(Kp * Np);
    std::memset(dst, 0, Kp * Np * sizeof(c10::BFloat16));
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* src = columns[n] + offset;
      for (int64_t k = 0; k < K; ++k) dst[(k / 2) * 2 * Np + 2 * n + (k & 1)] = c10::BFloat16(static_cast<float>(src[k]));
    }
    return;
  }
  const int64_t NR = n_step_;
  acc_t* packed = b_.resize(Np * K);
  for (int64_t n0 = 0; n0 < Np; n0 += NR) {
    acc_t* panel = packed + n0 * K;
    const int64_t valid = std::max<int64_t>(0, std::min(NR, N - n0));
    for (int64_t j = 0; j < NR; ++j) {
      if (j < valid) {
        const scalar_t* src = columns[n0 + j] + offset;
        for (int64_t k = 0; k < K; ++k) panel[k * NR + j] = detail::to_acc(src[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) panel[k * NR + j] = acc_t(0);
      }
    }
  }
}

}  // namespace cpu
}  // namespace pointins_ops
