// The GEMM engine's operand access, packing and micro-kernels (see gemm.h).
#include "gemm.h"

#include <cstring>
#include <string>

#include "convert.h"

#if defined(POINTINS_X86)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pointins_ops {
namespace cpu {
namespace {

#define POINTINS_INLINE __attribute__((always_inline)) inline

// ---------------------------------------------------------------------------------------------------------
// Which micro-kernels the CPU can run.

#if defined(POINTINS_X86)
bool cpu_has_amx_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  // Linux hands out the (large) AMX register state only to processes that ask for it, once.
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

bool cpu_has_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1u;  // CPUID.(EAX=7, ECX=1):EAX[5], AVX512_BF16 (VDPBF16PS)
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
    if (avx512 && cpu_has_avx512_bf16()) return Isa::kAvx512Bf16;
    if (avx512) return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  return best;
}

// ---------------------------------------------------------------------------------------------------------
// Elements: widening to the accumulation type, and 8 x 8 transposes in registers.

template <typename T>
POINTINS_INLINE auto widen(T x) {
  if constexpr (std::is_integral_v<T>) {
    return x;  // raw bits (AMX packing)
  } else {
    return to_acc(x);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#define POINTINS_TRANSPOSE 1
template <typename T>
struct Lanes8 {
  typedef T V __attribute__((vector_size(8 * sizeof(T))));
  using I = std::conditional_t<sizeof(T) == 2, int16_t, std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>;
  typedef I Mask __attribute__((vector_size(8 * sizeof(T))));
};

// rows[i][j] <-> rows[j][i] for an 8 x 8 block: three stages, each swapping blocks of 4, 2, then 1 between
// pairs of rows.
template <typename T>
POINTINS_INLINE void transpose8(typename Lanes8<T>::V (&r)[8]) {
  using V = typename Lanes8<T>::V;
  using Mask = typename Lanes8<T>::Mask;
  const Mask lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  const Mask lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Mask lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
  V t[8];
  for (int i = 0; i < 4; ++i) {
    t[i] = __builtin_shuffle(r[i], r[i + 4], lo4);
    t[i + 4] = __builtin_shuffle(r[i], r[i + 4], hi4);
  }
  for (int i : {0, 1, 4, 5}) {
    r[i] = __builtin_shuffle(t[i], t[i + 2], lo2);
    r[i + 2] = __builtin_shuffle(t[i], t[i + 2], hi2);
  }
  for (int i : {0, 2, 4, 6}) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
#endif

// dst[k * ld + j] = widen(src[j][offset + k]) for j < columns (zeros for columns <= j < width <= 8), k < K: the
// transpose of up to 8 rows of K values into K rows of `width`, with 8 x 8 register transposes where the block
// is full.
template <typename S, typename T>
POINTINS_INLINE void transpose_columns(const S* const* src, int64_t offset, int64_t columns, int64_t width, int64_t K,
                                       T* dst, int64_t ld) {
  int64_t k = 0;
#if defined(POINTINS_TRANSPOSE)
  if (columns == 8 && width == 8) {
    using V = typename Lanes8<T>::V;
    for (; k + 8 <= K; k += 8) {
      V r[8];
      for (int j = 0; j < 8; ++j) {
        T lane[8];
        const S* s = src[j] + offset + k;
        for (int e = 0; e < 8; ++e) lane[e] = widen(s[e]);
        std::memcpy(&r[j], lane, sizeof(V));
      }
      transpose8<T>(r);
      for (int e = 0; e < 8; ++e) std::memcpy(dst + (k + e) * ld, &r[e], sizeof(V));
    }
  }
#endif
  for (; k < K; ++k) {
    for (int64_t j = 0; j < columns; ++j) dst[k * ld + j] = widen(src[j][offset + k]);
    for (int64_t j = columns; j < width; ++j) dst[k * ld + j] = T(0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Vector micro-kernels: an MR x 2L block of C in registers (L lanes per vector), A broadcast one element at a
// time, B loaded two vectors per k. A and B are read through accessors, so the same loop reads packed buffers
// or the operands in place.

template <typename T, int MR>
struct PackedA {  // k-major blocks: a[k * MR + i]
  const T* a;
  POINTINS_INLINE T get(int i, int64_t k) const { return a[k * MR + i]; }
};
template <typename T, int MR>
struct RowsA {  // row i of the block at rows[i]
  const T* rows[MR];
  POINTINS_INLINE T get(int i, int64_t k) const { return rows[i][k]; }
};
template <typename T>
struct ColumnsA {  // column k at columns[k] + offset
  const T* const* columns;
  int64_t offset;
  POINTINS_INLINE T get(int i, int64_t k) const { return columns[k][offset + i]; }
};
template <typename T, int NR>
struct PackedB {  // k-major panels: b[k * NR + j]
  const T* b;
  POINTINS_INLINE const T* row(int64_t k) const { return b + k * NR; }
};
template <typename T>
struct RowsB {  // row k at rows[k] + offset
  const T* const* rows;
  int64_t offset;
  POINTINS_INLINE const T* row(int64_t k) const { return rows[k] + offset; }
};

constexpr int64_t kKSlice = 64;  // reduction steps per slice of the vector engine (see vector_gemm)

template <typename T, int VB, int MR, typename A, typename B>
POINTINS_INLINE void micro_kernel(const A& a, const B& b, int64_t k_begin, int64_t k_end, T* __restrict__ c,
                                  int64_t ldc, bool accumulate) {
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
  for (int64_t k = k_begin; k < k_end; ++k) {
    const T* row = b.row(k);
    V b0, b1;
    std::memcpy(&b0, row, VB);
    std::memcpy(&b1, row + L, VB);
    for (int i = 0; i < MR; ++i) {
      const T value = a.get(i, k);
      acc0[i] += value * b0;  // contracted to FMA (-ffp-contract=fast) where the ISA has it
      acc1[i] += value * b1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    std::memcpy(c + i * ldc, &acc0[i], VB);
    std::memcpy(c + i * ldc + L, &acc1[i], VB);
  }
}

// The vector engine for one ISA (VB bytes per vector, MR rows per block).
template <typename scalar_t, int VB, int MR>
POINTINS_INLINE void vector_gemm(const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t M, int64_t N,
                                 int64_t K, at::opmath_type<scalar_t>* c, int64_t ldc, bool accumulate,
                                 GemmScratch& scratch) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<T, scalar_t>;  // float / double: no widening needed
  constexpr int L = VB / sizeof(T);
  constexpr int NR = 2 * L;
  const int64_t Mp = round_up(M, MR), Np = round_up(N, NR);
  Scratch<T>& a_buffer = [&]() -> Scratch<T>& {
    if constexpr (std::is_same_v<T, double>)
      return scratch.a64;
    else
      return scratch.a32;
  }();
  Scratch<T>& b_buffer = [&]() -> Scratch<T>& {
    if constexpr (std::is_same_v<T, double>)
      return scratch.b64;
    else
      return scratch.b32;
  }();

  // B: panels of NR columns. Rows of B read in place for every full panel (float, double); the rest packed.
  const int64_t direct_panels = (in_place && b.form == Operand<scalar_t>::kRows && !b.far) ? N / NR : 0;
  const int64_t packed_panels = Np / NR - direct_panels;
  T* b_packed = b_buffer.resize(std::max<int64_t>(packed_panels, 1) * K * NR);
  if (b.form == Operand<scalar_t>::kRows) {
    // Row by row, so each row of B is read once, front to back (what the prefetchers follow), into every panel.
    const int64_t n_begin = direct_panels * NR;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* src = b.pointers[k] + b.offset;
      if (k + 1 < K) __builtin_prefetch(b.pointers[k + 1] + b.offset + n_begin);
      for (int64_t p = 0; p < packed_panels; ++p) {
        const int64_t n0 = n_begin + p * NR;
        const int64_t valid = std::min<int64_t>(NR, N - n0);
        T* dst = b_packed + p * K * NR + k * NR;
        for (int64_t j = 0; j < valid; ++j) dst[j] = widen(src[n0 + j]);
        for (int64_t j = valid; j < NR; ++j) dst[j] = T(0);
      }
    }
  } else {
    for (int64_t p = 0; p < packed_panels; ++p) {
      const int64_t n0 = (direct_panels + p) * NR;
      const int64_t valid = std::min<int64_t>(NR, N - n0);
      T* panel = b_packed + p * K * NR;
      constexpr int64_t width = NR < 8 ? NR : 8;
      for (int64_t j0 = 0; j0 < NR; j0 += width) {
        const int64_t columns = std::max<int64_t>(0, std::min<int64_t>(width, valid - j0));
        transpose_columns(b.pointers + n0 + j0, b.offset, columns, width, K, panel + j0, NR);
      }
    }
  }

  // A: blocks of MR rows. Read in place (rows, or columns for every full block) for float and double; packed
  // k-major otherwise.
  const bool a_direct = in_place && (a.form == Operand<scalar_t>::kRows || M % MR == 0);
  const int64_t packed_blocks = a_direct ? 0 : (a.form == Operand<scalar_t>::kRows || !in_place ? Mp / MR : 1);
  const int64_t first_packed = Mp / MR - packed_blocks;
  T* a_packed = a_buffer.resize(std::max<int64_t>(packed_blocks, 1) * K * MR);
  for (int64_t blk = 0; blk < packed_blocks; ++blk) {
    const int64_t m0 = (first_packed + blk) * MR;
    const int64_t valid = std::min<int64_t>(MR, M - m0);
    T* block = a_packed + blk * K * MR;
    if (a.form == Operand<scalar_t>::kColumns) {
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = a.pointers[k] + a.offset + m0;
        for (int64_t i = 0; i < valid; ++i) block[k * MR + i] = widen(src[i]);
        for (int64_t i = valid; i < MR; ++i) block[k * MR + i] = T(0);
      }
    } else if (MR == 8) {
      transpose_columns(a.pointers + m0, a.offset, valid, 8, K, block, MR);
    } else {
      for (int64_t i = 0; i < MR; ++i) {
        for (int64_t k = 0; k < K; ++k) block[k * MR + i] = i < valid ? widen(a.pointers[m0 + i][a.offset + k]) : T(0);
      }
    }
  }

  // When A is columns (one pointer per k: grad_templates' weight rows), the reduction runs in slices of kKSlice
  // steps, each over every panel and block, so the slice's rows of B and of A stay in L1 while all the blocks
  // that need them run: a long K (pointins-1x1's 256 grad_output rows per template) would otherwise stream B's
  // panel from L2 once per block. Rows of A are long streams that slicing would break up (SOLOv2's grad_weight
  // was 25% slower sliced), so they run K in one go. A block's sums go through C between slices unchanged (it is
  // in the accumulation type): every element still sums its K products in increasing k, whatever the slicing.
  const int64_t slice = a.form == Operand<scalar_t>::kColumns ? kKSlice : std::max<int64_t>(K, 1);
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += slice) {  // once at least: K == 0 still writes C's zeros
    const int64_t k1 = std::min<int64_t>(K, k0 + slice);
    const bool sum_onto_c = accumulate || k0 > 0;
    for (int64_t n0 = 0, p = 0; n0 < Np; n0 += NR, ++p) {
      for (int64_t m0 = 0, blk = 0; m0 < Mp; m0 += MR, ++blk) {
        T* c_block = c + m0 * ldc + n0;
        // A ragged last block runs the smallest kernel that covers its rows.
        const int64_t rows = std::min<int64_t>(MR, M - m0);
        auto run = [&](auto rows_tag, const auto& a_access) {
          constexpr int R = decltype(rows_tag)::value;
          if (p < direct_panels) {
            if constexpr (in_place) {
              micro_kernel<T, VB, R>(a_access, RowsB<T>{b.pointers, b.offset + n0}, k0, k1, c_block, ldc, sum_onto_c);
            }
          } else {
            micro_kernel<T, VB, R>(a_access, PackedB<T, NR>{b_packed + (p - direct_panels) * K * NR}, k0, k1, c_block,
                                   ldc, sum_onto_c);
          }
        };
        auto with_a = [&](const auto& a_access) {
          if (rows > 4 || MR <= 4) {
            run(std::integral_constant<int, MR>{}, a_access);
          } else if (rows > 2) {
            run(std::integral_constant<int, 4>{}, a_access);
          } else if (rows > 1) {
            run(std::integral_constant<int, 2>{}, a_access);
          } else {
            run(std::integral_constant<int, 1>{}, a_access);
          }
        };
        if (blk >= first_packed) {
          with_a(PackedA<T, MR>{a_packed + (blk - first_packed) * K * MR});
        } else if constexpr (in_place) {
          if (a.form == Operand<scalar_t>::kRows) {
            RowsA<T, MR> access;
            for (int i = 0; i < MR; ++i) access.rows[i] = a.pointers[std::min<int64_t>(m0 + i, M - 1)] + a.offset;
            with_a(access);  // rows past M repeat the last row: C's padding rows, which the caller ignores
          } else {
            with_a(ColumnsA<T>{a.pointers, a.offset + m0});
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// AMX: C[Mp x Np] (float32) (+)= A[Mp x Kp] (bfloat16, row-major) * B (bfloat16, pairs of k interleaved:
// [Kp / 2][Np][2]). Tiles 0-3 hold a 32 x 32 block of C (16 x 16 each), 4-5 two 16-row slices of A, 6-7 two
// 16-column slices of B; TDPBF16PS multiplies 32 values of k per instruction.

#if defined(POINTINS_X86)
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) void amx_kernel(const uint16_t* a, const uint16_t* b, int64_t Mp,
                                                             int64_t Np, int64_t Kp, float* c, int64_t ldc,
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
#endif

POINTINS_INLINE uint16_t bits_of(c10::BFloat16 x) {
  uint16_t bits;
  std::memcpy(&bits, &x, 2);
  return bits;
}

// The word (x[k], x[k + 1]) of a row of bfloat16, x[k + 1] = 0 when k + 1 == K.
POINTINS_INLINE uint32_t pair_at(const c10::BFloat16* x, int64_t k, int64_t K) {
  uint32_t word;
  if (k + 1 < K) {
    std::memcpy(&word, x + k, 4);
  } else {
    uint16_t bits;
    std::memcpy(&bits, x + k, 2);
    word = bits;
  }
  return word;
}

// dst[kk * ld + j] = the word (x_j[2kk], x_j[2kk + 1]) of row x_j = src[j] + offset, for j < 8 and every pair of
// K values (a zero high half past K): 8 x 8 register transposes of words (rows of any alignment).
POINTINS_INLINE void transpose_pairs8(const c10::BFloat16* const* src, int64_t offset, int64_t K, uint32_t* dst,
                                      int64_t ld) {
  const int64_t pairs = (K + 1) / 2;
  int64_t kk = 0;
#if defined(POINTINS_TRANSPOSE)
  using V = Lanes8<uint32_t>::V;
  for (; 2 * (kk + 8) <= K; kk += 8) {
    V r[8];
    for (int j = 0; j < 8; ++j) std::memcpy(&r[j], src[j] + offset + 2 * kk, sizeof(V));
    transpose8<uint32_t>(r);
    for (int e = 0; e < 8; ++e) std::memcpy(dst + (kk + e) * ld, &r[e], sizeof(V));
  }
#endif
  for (; kk < pairs; ++kk) {
    for (int j = 0; j < 8; ++j) dst[kk * ld + j] = pair_at(src[j] + offset, 2 * kk, K);
  }
}

// Packs for AMX (bfloat16 bits), then runs the tiles.
POINTINS_INLINE void amx_gemm(const Operand<c10::BFloat16>& a, const Operand<c10::BFloat16>& b, int64_t M, int64_t N,
                              int64_t K, float* c, int64_t ldc, bool accumulate, GemmScratch& scratch) {
#if defined(POINTINS_X86)
  const int64_t Mp = round_up(M, 16), Np = round_up(N, 32), Kp = round_up(K, 32);
  uint16_t* a16 = scratch.a16.resize(Mp * Kp);
  if (a.form == Operand<c10::BFloat16>::kRows) {
    for (int64_t m = 0; m < Mp; ++m) {
      uint16_t* dst = a16 + m * Kp;
      const int64_t copied = m < M ? K : 0;
      if (copied) std::memcpy(dst, a.pointers[m] + a.offset, K * sizeof(uint16_t));
      std::memset(dst + copied, 0, (Kp - copied) * sizeof(uint16_t));
    }
  } else {  // A[m][k] = columns[k][m]: 16-bit transposes, 8 x 8 at a time
    std::memset(a16, 0, Mp * Kp * sizeof(uint16_t));
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      const int64_t columns = std::min<int64_t>(8, K - k0);
      const uint16_t* src[8];
      for (int64_t j = 0; j < columns; ++j) src[j] = reinterpret_cast<const uint16_t*>(a.pointers[k0 + j]);
      transpose_columns(src, a.offset, columns, columns, M, a16 + k0, Kp);
    }
  }
  // B: 32-bit words (k, k + 1) of column n at word [k / 2][n].
  uint32_t* b32 = reinterpret_cast<uint32_t*>(scratch.b16.resize(Kp * Np));
  if (b.form == Operand<c10::BFloat16>::kRows) {
    for (int64_t k = 0; k < Kp; k += 2) {
      uint32_t* dst = b32 + (k / 2) * Np;
      const uint16_t* even = k < K ? reinterpret_cast<const uint16_t*>(b.pointers[k] + b.offset) : nullptr;
      const uint16_t* odd = k + 1 < K ? reinterpret_cast<const uint16_t*>(b.pointers[k + 1] + b.offset) : nullptr;
      if (even && odd) {
        for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<uint32_t>(even[n]) | (static_cast<uint32_t>(odd[n]) << 16);
      } else if (even) {
        for (int64_t n = 0; n < N; ++n) dst[n] = even[n];
      } else {
        std::memset(dst, 0, N * sizeof(uint32_t));
      }
      std::memset(dst + N, 0, (Np - N) * sizeof(uint32_t));
    }
  } else {  // B[k][n] = columns[n][k]: a column's pairs are adjacent words, transposed 8 x 8 at a time
    std::memset(b32, 0, (Kp / 2) * Np * sizeof(uint32_t));
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) transpose_pairs8(b.pointers + n, b.offset, K, b32 + n, Np);
    for (; n < N; ++n) {
      for (int64_t kk = 0; kk < (K + 1) / 2; ++kk) b32[kk * Np + n] = pair_at(b.pointers[n] + b.offset, 2 * kk, K);
    }
  }
  amx_kernel(a16, reinterpret_cast<const uint16_t*>(b32), Mp, Np, Kp, c, ldc, accumulate);
#else
  (void)a, (void)b, (void)M, (void)N, (void)K, (void)c, (void)ldc, (void)accumulate, (void)scratch;
  TORCH_CHECK(false, "instance_aware_conv: internal error: AMX requested on a CPU without it");
#endif
}

// ---------------------------------------------------------------------------------------------------------
// AVX512-BF16 (without AMX): VDPBF16PS multiplies the pairs (k, k + 1) of two vectors of bfloat16 and adds
// both products to float32 lanes, twice the products per instruction of a float32 FMA and half the bytes per
// operand. A is packed in k-pair-major blocks of MR rows (word [kk][i] = A[m0 + i][2kk], A[m0 + i][2kk + 1]),
// B in k-pair-major panels of 32 columns (word [kk][j] = B[2kk][n0 + j], B[2kk + 1][n0 + j]); an odd K's last
// pair holds a zero in both. Register blocks R x 32 of C, R <= 8. The instruction fixes its own rounding: per
// lane, the odd product is added first, then the even one, and subnormal inputs and results read as zero.

#if defined(POINTINS_X86)
#define POINTINS_AVX512_BF16_TARGET POINTINS_AVX512_TARGET ",avx512bf16"

template <int R, int MR>
__attribute__((target(POINTINS_AVX512_BF16_TARGET))) POINTINS_INLINE void dpbf16_kernel(
    const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, int64_t pairs, float* __restrict__ c, int64_t ldc,
    bool accumulate) {
  __m512 acc0[R], acc1[R];
  for (int i = 0; i < R; ++i) {
    acc0[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    acc1[i] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kk * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kk * 32 + 16);
    for (int i = 0; i < R; ++i) {
      const __m512bh value = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[kk * MR + i]));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], value, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], value, b1);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_ps(c + i * ldc, acc0[i]);
    _mm512_storeu_ps(c + i * ldc + 16, acc1[i]);
  }
}

__attribute__((target(POINTINS_AVX512_BF16_TARGET), flatten)) void gemm_avx512_bf16(
    const Operand<c10::BFloat16>& a, const Operand<c10::BFloat16>& b, int64_t M, int64_t N, int64_t K, float* c,
    int64_t ldc, bool accumulate, GemmScratch& scratch) {
  constexpr int MR = 8, NR = 32;
  const int64_t pairs = (K + 1) / 2, Mp = round_up(M, MR), Np = round_up(N, NR);
  const auto bits = [](const c10::BFloat16* x) { return static_cast<uint32_t>(bits_of(*x)); };
  uint32_t* a32 = reinterpret_cast<uint32_t*>(scratch.a16.resize(2 * Mp * pairs));
  uint32_t* b32 = reinterpret_cast<uint32_t*>(scratch.b16.resize(2 * Np * pairs));

  // A: blocks of MR rows; rows past M are zeros.
  static_assert(MR == 8, "a block of A is one 16-byte load per column, one 8 x 8 transpose per row");
  for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
    uint32_t* block = a32 + m0 * pairs;
    if (a.form == Operand<c10::BFloat16>::kColumns && m0 + MR <= M) {
      // A[m0 .. m0 + 8)[k] lie together in column k: two columns' 8 values interleave into 8 words.
      const auto* columns = reinterpret_cast<const uint16_t* const*>(a.pointers);
      const int64_t at = a.offset + m0;
      for (int64_t kk = 0; kk < pairs; ++kk) {
        const __m128i even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(columns[2 * kk] + at));
        const __m128i odd = 2 * kk + 1 < K ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(columns[2 * kk + 1] + at))
                                           : _mm_setzero_si128();
        _mm_storeu_si128(reinterpret_cast<__m128i*>(block + kk * MR), _mm_unpacklo_epi16(even, odd));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(block + kk * MR + 4), _mm_unpackhi_epi16(even, odd));
      }
      continue;
    }
    if (a.form == Operand<c10::BFloat16>::kRows && m0 + MR <= M) {
      transpose_pairs8(a.pointers + m0, a.offset, K, block, MR);
      continue;
    }
    for (int64_t i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      if (m >= M) {
        for (int64_t kk = 0; kk < pairs; ++kk) block[kk * MR + i] = 0;
      } else if (a.form == Operand<c10::BFloat16>::kRows) {
        const c10::BFloat16* row = a.pointers[m] + a.offset;
        for (int64_t kk = 0; kk < pairs; ++kk) block[kk * MR + i] = pair_at(row, 2 * kk, K);
      } else {
        const int64_t at = a.offset + m;
        for (int64_t kk = 0; kk < pairs; ++kk) {
          const uint32_t even = bits(a.pointers[2 * kk] + at);
          const uint32_t odd = 2 * kk + 1 < K ? bits(a.pointers[2 * kk + 1] + at) : 0u;
          block[kk * MR + i] = even | (odd << 16);
        }
      }
    }
  }

  // B: panels of NR columns; columns past N are zeros.
  if (b.form == Operand<c10::BFloat16>::kRows) {
    // Two rows of B at a time, front to back, into every panel (the loops over j vectorize: zero-extend, shift,
    // or).
    const auto* words = reinterpret_cast<const uint16_t* const*>(b.pointers);
    for (int64_t kk = 0; kk < pairs; ++kk) {
      const uint16_t* even = words[2 * kk] + b.offset;
      const uint16_t* odd = 2 * kk + 1 < K ? words[2 * kk + 1] + b.offset : nullptr;
      for (int64_t n0 = 0; n0 < Np; n0 += NR) {
        uint32_t* dst = b32 + n0 * pairs + kk * NR;
        const int64_t valid = std::min<int64_t>(NR, N - n0);
        if (odd) {
          for (int64_t j = 0; j < valid; ++j) dst[j] = uint32_t{even[n0 + j]} | (uint32_t{odd[n0 + j]} << 16);
        } else {
          for (int64_t j = 0; j < valid; ++j) dst[j] = even[n0 + j];
        }
        for (int64_t j = valid; j < NR; ++j) dst[j] = 0;
      }
    }
  } else {  // B[k][n] = columns[n][k]: a column's pairs are adjacent words, transposed 8 x 8 at a time
    int64_t n = 0;
    for (; n + 8 <= N; n += 8) transpose_pairs8(b.pointers + n, b.offset, K, b32 + (n / NR) * pairs * NR + n % NR, NR);
    for (; n < Np; ++n) {
      uint32_t* dst = b32 + (n / NR) * pairs * NR + n % NR;
      if (n >= N) {
        for (int64_t kk = 0; kk < pairs; ++kk) dst[kk * NR] = 0;
      } else {
        const c10::BFloat16* column = b.pointers[n] + b.offset;
        for (int64_t kk = 0; kk < pairs; ++kk) dst[kk * NR] = pair_at(column, 2 * kk, K);
      }
    }
  }

  for (int64_t n0 = 0; n0 < Np; n0 += NR) {
    const uint32_t* panel = b32 + n0 * pairs;
    for (int64_t m0 = 0; m0 < Mp; m0 += MR) {
      const uint32_t* block = a32 + m0 * pairs;
      float* c_block = c + m0 * ldc + n0;
      // A ragged last block runs the smallest kernel that covers its rows.
      const int64_t rows = std::min<int64_t>(MR, M - m0);
      if (rows > 4) {
        dpbf16_kernel<MR, MR>(block, panel, pairs, c_block, ldc, accumulate);
      } else if (rows > 2) {
        dpbf16_kernel<4, MR>(block, panel, pairs, c_block, ldc, accumulate);
      } else if (rows > 1) {
        dpbf16_kernel<2, MR>(block, panel, pairs, c_block, ldc, accumulate);
      } else {
        dpbf16_kernel<1, MR>(block, panel, pairs, c_block, ldc, accumulate);
      }
    }
  }
}
#endif

// One compiled copy of the engine per instruction set.
template <typename scalar_t>
using GemmFn = void (*)(const Operand<scalar_t>&, const Operand<scalar_t>&, int64_t, int64_t, int64_t,
                        at::opmath_type<scalar_t>*, int64_t, bool, GemmScratch&);

template <typename scalar_t>
__attribute__((flatten)) void gemm_generic(const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t M, int64_t N,
                                           int64_t K, at::opmath_type<scalar_t>* c, int64_t ldc, bool accumulate,
                                           GemmScratch& scratch) {
  vector_gemm<scalar_t, 16, 4>(a, b, M, N, K, c, ldc, accumulate, scratch);
}

#if defined(POINTINS_X86)
template <typename scalar_t>
__attribute__((target(POINTINS_AVX2_TARGET),
               flatten)) void gemm_avx2(const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t M, int64_t N,
                                        int64_t K, at::opmath_type<scalar_t>* c, int64_t ldc, bool accumulate,
                                        GemmScratch& scratch) {
  vector_gemm<scalar_t, 32, 6>(a, b, M, N, K, c, ldc, accumulate, scratch);
}

template <typename scalar_t>
__attribute__((target(POINTINS_AVX512_TARGET), flatten)) void gemm_avx512(const Operand<scalar_t>& a,
                                                                          const Operand<scalar_t>& b, int64_t M,
                                                                          int64_t N, int64_t K,
                                                                          at::opmath_type<scalar_t>* c, int64_t ldc,
                                                                          bool accumulate, GemmScratch& scratch) {
  vector_gemm<scalar_t, 64, 8>(a, b, M, N, K, c, ldc, accumulate, scratch);
}

__attribute__((target(POINTINS_AVX512_TARGET), flatten)) void gemm_amx(const Operand<c10::BFloat16>& a,
                                                                       const Operand<c10::BFloat16>& b, int64_t M,
                                                                       int64_t N, int64_t K, float* c, int64_t ldc,
                                                                       bool accumulate, GemmScratch& scratch) {
  amx_gemm(a, b, M, N, K, c, ldc, accumulate, scratch);
}
#endif

template <typename scalar_t>
GemmFn<scalar_t> engine(Isa isa) {
#if defined(POINTINS_X86)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (isa == Isa::kAmx) return &gemm_amx;
    if (isa == Isa::kAvx512Bf16) return &gemm_avx512_bf16;
  }
  if (isa >= Isa::kAvx512) return &gemm_avx512<scalar_t>;
  if (isa == Isa::kAvx2) return &gemm_avx2<scalar_t>;
#endif
  (void)isa;
  return &gemm_generic<scalar_t>;
}

}  // namespace

Isa active_isa() {
  Isa isa = best_isa();
  if (const char* cap = std::getenv("POINTINS_CPU_ISA")) {
    const std::string name(cap);
    Isa wanted = isa;
    if (name == "generic") {
      wanted = Isa::kGeneric;
    } else if (name == "avx2") {
      wanted = Isa::kAvx2;
    } else if (name == "avx512") {
      wanted = Isa::kAvx512;
    } else if (name == "avx512bf16") {
      wanted = Isa::kAvx512Bf16;
    } else if (name == "amx") {
      wanted = Isa::kAmx;
    } else if (!name.empty()) {
      TORCH_CHECK_VALUE(false,
                        "instance_aware_conv: environment variable POINTINS_CPU_ISA must be one of generic, "
                        "avx2, avx512, avx512bf16, amx (or unset); got '",
                        name, "'");
    }
    isa = std::min(isa, wanted);
#if defined(POINTINS_X86)
    static const bool bf16_dot = cpu_has_avx512_bf16();
    if (isa == Isa::kAvx512Bf16 && !bf16_dot) isa = Isa::kAvx512;  // AMX asked down, on a CPU without VDPBF16PS
#endif
  }
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

int64_t padded_m(Isa isa, int64_t M) {
  return round_up(M, isa == Isa::kGeneric ? 4 : (isa == Isa::kAvx2 ? 6 : 8)) + 16;  // AMX blocks of 16 rows too
}

template <typename scalar_t>
int64_t padded_n(Isa isa, int64_t N) {
  const int64_t bytes = isa == Isa::kGeneric ? 16 : (isa == Isa::kAvx2 ? 32 : 64);
  const int64_t panel = 2 * bytes / static_cast<int64_t>(sizeof(at::opmath_type<scalar_t>));
  return round_up(N, std::max<int64_t>(panel, 32));
}

template <typename scalar_t>
void gemm(Isa isa, const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t M, int64_t N, int64_t K,
          at::opmath_type<scalar_t>* c, int64_t ldc, bool accumulate, GemmScratch& scratch) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum
    if (!accumulate) {
      for (int64_t m = 0; m < padded_m(isa, M); ++m)
        std::fill(c + m * ldc, c + m * ldc + padded_n<scalar_t>(isa, N), 0);
    }
    return;
  }
  engine<scalar_t>(isa)(a, b, M, N, K, c, ldc, accumulate, scratch);
}

#define POINTINS_INSTANTIATE(scalar_t)                                                                             \
  template void gemm<scalar_t>(Isa, const Operand<scalar_t>&, const Operand<scalar_t>&, int64_t, int64_t, int64_t, \
                               at::opmath_type<scalar_t>*, int64_t, bool, GemmScratch&);                           \
  template int64_t padded_n<scalar_t>(Isa, int64_t);
POINTINS_INSTANTIATE(float)
POINTINS_INSTANTIATE(double)
POINTINS_INSTANTIATE(c10::Half)
POINTINS_INSTANTIATE(c10::BFloat16)
#undef POINTINS_INSTANTIATE

}  // namespace cpu
}  // namespace pointins_ops
