// The GEMM engine's packers and micro-kernels (see gemm.h).
#include "gemm.h"

#include <c10/util/irange.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define POINTINS_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pointins_ops {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Which micro-kernels the CPU can run.

#if defined(POINTINS_X86)
bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  // Linux hands out the (large) AMX register state only to processes that ask for it once.
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}
#endif

Isa best_isa() {
  static const Isa best = [] {
#if defined(POINTINS_X86)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && cpu_has_amx_bf16()) return Isa::kAmx;
    if (avx512) return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  return best;
}

// ---------------------------------------------------------------------------------------------------------
// Vector micro-kernels: an MR x (2 vectors) block of C in registers, A broadcast one element at a time.

// C[MR x 2L] (+)= A[MR x K] * B[K x 2L]; a is k-major (MR values per k), b is k-major (2L values per k).
template <typename T, int VB, int MR>
__attribute__((always_inline)) inline void micro_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t K,
                                                        T* __restrict__ c, int64_t ldc, bool accumulate) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int L = VB / sizeof(T);
  V acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      std::memcpy(&acc0[i], c + i * ldc, VB);
      std::memcpy(&acc1[i], c + i * ldc + L, VB);
    } else {
      acc0[i] = V{};
      acc1[i] = V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b0, b1;
    std::memcpy(&b0, b + k * 2 * L, VB);
    std::memcpy(&b1, b + k * 2 * L + L, VB);
    const T* ak = a + k * MR;
    for (int i = 0; i < MR; ++i) {
      acc0[i] += ak[i] * b0;  // contracted to FMA (-ffp-contract=fast) where the ISA has it
      acc1[i] += ak[i] * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    std::memcpy(c + i * ldc, &acc0[i], VB);
    std::memcpy(c + i * ldc + L, &acc1[i], VB);
  }
}

template <typename T, int VB, int MR>
__attribute__((always_inline)) inline void run_blocks(const T* a, const T* b, int64_t Mp, int64_t Np, int64_t K,
                                                      T* c, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = 2 * VB / sizeof(T);
  for (int64_t n0 = 0; n0 < Np; n0 += NR) {
    const T* panel = b + n0 * K;
    for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
      micro_kernel<T, VB, MR>(a + m0 * K, panel, K, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

template <typename T>
using RunFn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, T*, int64_t, bool);

template <typename T>
void run_generic(const T* a, const T* b, int64_t Mp, int64_t Np, int64_t K, T* c, int64_t ldc, bool accumulate) {
  run_blocks<T, 16, 4>(a, b, Mp, Np, K, c, ldc, accumulate);
}

#if defined(POINTINS_X86)
template <typename T>
__attribute__((target(POINTINS_AVX2_TARGET))) void run_avx2(const T* a, const T* b, int64_t Mp, int64_t Np, int64_t K,
                                                          T* c, int64_t ldc, bool accumulate) {
  run_blocks<T, 32, 6>(a, b, Mp, Np, K, c, ldc, accumulate);
}

template <typename T>
__attribute__((target(POINTINS_AVX512_TARGET))) void run_avx512(const T* a, const T* b, int64_t Mp, int64_t Np, int64_t K,
                                                            T* c, int64_t ldc, bool accumulate) {
  run_blocks<T, 64, 8>(a, b, Mp, Np, K, c, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------------------------
// AMX: C[Mp x Np] (float32) (+)= A[Mp x Kp] (bfloat16, row-major) * B (bfloat16, pairs of k interleaved:
// [Kp / 2][Np][2]). Tiles 0-3 hold a 32 x 32 block of C (16 x 16 each), 4-5 two 16-row slices of A, 6-7 two
// 16-column slices of B; TDPBF16PS multiplies 32 values of k per instruction.

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) void run_amx(const c10::BFloat16* a, const c10::BFloat16* b,
                                                           int64_t Mp, int64_t Np, int64_t Kp, float* c, int64_t ldc,
                                                           bool accumulate) {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.bytes_per_row[tile] = 64;
    config.rows[tile] = 16;
  }
  _tile_loadconfig(&config);
  const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
  const int64_t a_stride = Kp * 2;  // bytes per row of A
  const int64_t b_stride = Np * 4;  // bytes per pair of k in B
  for (int64_t n0 = 0; n0 < Np; n0 += 32) {
    int64_t m0 = 0;
    for (; m0 + 32 <= Mp; m0 += 32) {
      float* c0 = c + m0 * ldc + n0;
      float* c1 = c0 + 16 * ldc;
      if (accumulate) {
        _tile_loadd(0, c0, c_stride);
        _tile_loadd(1, c0 + 16, c_stride);
        _tile_loadd(2, c1, c_stride);
        _tile_loadd(3, c1 + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
        _tile_loadd(4, a + m0 * Kp + k0, a_stride);
        _tile_loadd(5, a + (m0 + 16) * Kp + k0, a_stride);
        _tile_loadd(6, b + (k0 / 2) * Np * 2 + n0 * 2, b_stride);
        _tile_loadd(7, b + (k0 / 2) * Np * 2 + (n0 + 16) * 2, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c0, c_stride);
      _tile_stored(1, c0 + 16, c_stride);
      _tile_stored(2, c1, c_stride);
      _tile_stored(3, c1 + 16, c_stride);
    }
    if (m0 < Mp) {  // the last 16 rows
      float* c0 = c + m0 * ldc + n0;
      if (accumulate) {
        _tile_loadd(0, c0, c_stride);
        _tile_loadd(1, c0 + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
      }
      for (int64_t k0 = 0; k0 < Kp; k0 += 32) {
        _tile_loadd(4, a + m0 * Kp + k0, a_stride);
        _tile_loadd(6, b + (k0 / 2) * Np * 2 + n0 * 2, b_stride);
        _tile_loadd(7, b + (k0 / 2) * Np * 2 + (n0 + 16) * 2, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
      _tile_stored(0, c0, c_stride);
      _tile_stored(1, c0 + 16, c_stride);
    }
  }
  _tile_release();
}
#endif  // POINTINS_X86

template <typename T>
RunFn<T> vector_kernel(Isa isa) {
#if defined(POINTINS_X86)
  if (isa == Isa::kAvx512 || isa == Isa::kAmx) return &run_avx512<T>;
  if (isa == Isa::kAvx2) return &run_avx2<T>;
#endif
  (void)isa;
  return &run_generic<T>;
}

}  // namespace

Isa active_isa() {
  Isa isa = best_isa();
  if (const char* cap = std::getenv("POINTINS_CPU_ISA")) {
    const std::string name(cap);
    Isa wanted = isa;
    if (name == "generic") wanted = Isa::kGeneric;
    else if (name == "avx2") wanted = Isa::kAvx2;
    else if (name == "avx512") wanted = Isa::kAvx512;
    else if (name == "amx") wanted = Isa::kAmx;
    else if (!name.empty()) {
      TORCH_CHECK_VALUE(false, "instance_aware_conv: environment variable POINTINS_CPU_ISA must be one of generic, "
                        "avx2, avx512, amx (or unset); got '", name, "'");
    }
    isa = std::min(isa, wanted);
  }
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

template <typename scalar_t>
void Gemm<scalar_t>::run(acc_t* c, int64_t ldc, bool accumulate) {
  TORCH_CHECK(K_a_ == K_b_ && K_a_ >= 0, "instance_aware_conv: internal error: GEMM operands packed with K = ", K_a_,
              " and ", K_b_);
  const int64_t Mp = padded_m(M_), Np = padded_n(N_);
  if (Mp == 0 || Np == 0) return;
  if (K_a_ == 0) {  // an empty sum
    if (!accumulate) {
      for (int64_t m = 0; m < Mp; ++m) std::fill(c + m * ldc, c + m * ldc + Np, acc_t(0));
    }
    return;
  }
#if defined(POINTINS_X86)
  if constexpr (detail::kAmxCapable<scalar_t>) {
    if (isa_ == Isa::kAmx) {
      run_amx(a16_.data(), b16_.data(), Mp, Np, round_up(K_a_, k_step_), c, ldc, accumulate);
      return;
    }
  }
#endif
  vector_kernel<acc_t>(isa_)(a_.data(), b_.data(), Mp, Np, K_a_, c, ldc, accumulate);
}

template void Gemm<float>::run(float*, int64_t, bool);
template void Gemm<double>::run(double*, int64_t, bool);
template void Gemm<c10::Half>::run(float*, int64_t, bool);
template void Gemm<c10::BFloat16>::run(float*, int64_t, bool);

}  // namespace cpu
}  // namespace pointins_ops
