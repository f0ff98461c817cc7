// A small register-blocked GEMM for the CPU kernels: C[M x N] (+)= A[M x R] * B[R x N] in float or double.
//
// A is packed in blocks of kTileRows rows, each stored reduction-major (pack_rows / pack_transposed), so the inner loop broadcasts
// kTileRows consecutive values; B and C are row-major with N a multiple of tile_columns<T>(). Every element
// of C sums over r in increasing order: the result does not depend on threads or tiling elsewhere.
//
// On x86-64 with GCC or Clang the kernel is compiled three times (AVX-512, AVX2+FMA, baseline) and the
// loader picks the best one the CPU supports, so one wheel is both portable and fast.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace pointins_ops {
namespace cpu {

constexpr int64_t kTileRows = 8;

template <typename T>
struct Vector64 {};
template <>
struct Vector64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vector64<double> {
  typedef double type __attribute__((vector_size(64)));
};

// Columns of C per register block: one 64-byte vector (16 floats or 8 doubles).
template <typename T>
constexpr int64_t tile_columns() {
  return 64 / sizeof(T);
}

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define POINTINS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define POINTINS_CPU_CLONES
#endif

// C[M x N] (+)= A[M x R] * B[R x N]: A packed by pack_rows or pack_transposed (row_blocks blocks of kTileRows rows), B and C
// row-major with leading dimensions ldb and ldc. N is arbitrary: the last partial vector of columns goes
// through a zero-padded copy. accumulate: C += A * B, else C = A * B.
template <typename T>
POINTINS_CPU_CLONES void tile_gemm(const T* __restrict__ packed_a, const T* __restrict__ b, T* __restrict__ c,
                                   int64_t row_blocks, int64_t N, int64_t R, int64_t ldb, int64_t ldc,
                                   bool accumulate) {
  using V = typename Vector64<T>::type;
  constexpr int64_t L = tile_columns<T>();
  const int64_t full = N / L * L;
  std::vector<T> b_tail;
  if (full < N) {  // the last N - full columns of B, zero-padded to one vector per row
    b_tail.assign(R * L, T(0));
    for (int64_t r = 0; r < R; ++r) std::memcpy(&b_tail[r * L], b + r * ldb + full, (N - full) * sizeof(T));
  }
  for (int64_t n0 = 0; n0 < N; n0 += L) {
    const int64_t width = std::min(L, N - n0);
    const T* b_panel = n0 < full ? b + n0 : b_tail.data();
    const int64_t b_step = n0 < full ? ldb : L;
    for (int64_t block = 0; block < row_blocks; ++block) {
      const T* a = packed_a + block * R * kTileRows;
      T* c_block = c + block * kTileRows * ldc + n0;
      V acc[kTileRows];
      for (int64_t i = 0; i < kTileRows; ++i) {
        acc[i] = V{};
        if (accumulate) std::memcpy(&acc[i], c_block + i * ldc, width * sizeof(T));
      }
      for (int64_t r = 0; r < R; ++r) {
        V b_row;
        std::memcpy(&b_row, b_panel + r * b_step, sizeof(V));
        const T* a_r = a + r * kTileRows;
        for (int64_t i = 0; i < kTileRows; ++i) acc[i] += a_r[i] * b_row;
      }
      for (int64_t i = 0; i < kTileRows; ++i) std::memcpy(c_block + i * ldc, &acc[i], width * sizeof(T));
    }
  }
}

// Packs A[m, r] = rows[m][r] for m < M (zero rows up to the next multiple of kTileRows).
template <typename T, typename S>
void pack_rows(const S* const* rows, int64_t M, int64_t R, T* packed) {
  for (int64_t block = 0; block * kTileRows < M; ++block) {
    const S* src[kTileRows];
    const int64_t valid = std::min(kTileRows, M - block * kTileRows);
    for (int64_t i = 0; i < valid; ++i) src[i] = rows[block * kTileRows + i];
    T* dst = packed + block * R * kTileRows;
    for (int64_t r = 0; r < R; ++r, dst += kTileRows) {
      for (int64_t i = 0; i < kTileRows; ++i) dst[i] = i < valid ? static_cast<T>(src[i][r]) : T(0);
    }
  }
}

// Packs A[m, r] = columns[r][m] for m < M: A is the transpose of R rows of length M.
template <typename T, typename S>
void pack_transposed(const S* const* columns, int64_t M, int64_t R, T* packed) {
  for (int64_t block = 0; block * kTileRows < M; ++block) {
    const int64_t m0 = block * kTileRows;
    const int64_t valid = std::min(kTileRows, M - m0);
    T* dst = packed + block * R * kTileRows;
    for (int64_t r = 0; r < R; ++r, dst += kTileRows) {
      const S* src = columns[r] + m0;
      for (int64_t i = 0; i < kTileRows; ++i) dst[i] = i < valid ? static_cast<T>(src[i]) : T(0);
    }
  }
}

}  // namespace cpu
}  // namespace pointins_ops
