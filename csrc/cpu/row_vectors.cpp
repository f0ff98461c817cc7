// The row-vector forward and grad_weight (see row_vectors.h): plane building, weight packing, register-block
// kernels and the transposing epilogue, for AVX-512 (float32) and AVX512-BF16 (bfloat16).
#include "row_vectors.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "convert.h"

#if defined(POINTINS_X86)
#include <immintrin.h>
#endif

// GCC 12's avx512fintrin.h starts its shuffles and masked operations from a self-initialised "undefined"
// vector, which -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593); no value of it is read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pointins_ops {
namespace cpu {
namespace {

constexpr int64_t kBandPixels = 256;  // output pixels per band (the tile holds 64 rows of them: 64 KiB)
constexpr int kMaxBlocks = 4;         // vectors of 16 rows per register block
constexpr int kMaxPixels = 14;        // pixels per register block (fewer with more row vectors, see kPixelsFor)
constexpr int kSlack = 16;            // zeroed values past the planes (a block never reads past its row; margin)
// The transposing epilogue's cost in multiply-add steps per output vector (an estimate: a 16 x 16 transpose is
// 64 shuffles for 16 output vectors, plus the tile's store and reload that the GEMM's epilogue does not have).
constexpr int64_t kEpilogueSteps = 6;

// The most pixels a block of `blocks` row vectors takes: blocks x pixels accumulators, at most 28, leaving
// registers for the row vectors and a broadcast.
constexpr int kPixelsFor[kMaxBlocks + 1] = {0, 14, 14, 9, 7};

}  // namespace

bool row_vectors_apply(Isa isa, at::ScalarType dtype, const ConvGeometry& g, int64_t gemm_positions) {
#if defined(POINTINS_X86)
  if (g.stride_h != 1 || g.stride_w != 1 || g.C_in_per_group < 2 || g.H_out <= 0 || g.W_out <= 0) return false;
  const bool pairs = dtype == at::kBFloat16;
  if (!(dtype == at::kFloat && isa >= Isa::kAvx512) && !(pairs && isa == Isa::kAvx512Bf16)) return false;
  const int64_t C = g.C_in_per_group, area = g.kernel_area(), K = C * area;
  // Steps per output vector: GEMM, K (float32) or K / 2 (bfloat16 pairs) per computed position; row vectors,
  // per channel pair and tap (an odd channel count pairs a zero) per blocked position (64-row blocks).
  const int64_t gemm_steps = pairs ? (K + 1) / 2 : K, row_steps = pairs ? (C + 1) / 2 * area : K;
  const int64_t chunks = (g.W_out + kPixelsFor[kMaxBlocks] - 1) / kPixelsFor[kMaxBlocks];
  const int64_t blocked = g.H_out * chunks * ((g.W_out + chunks - 1) / chunks), pixels = g.output_pixels();
  return blocked * row_steps + kEpilogueSteps * pixels < gemm_positions * gemm_steps;
#else
  (void)isa, (void)dtype, (void)g, (void)gemm_positions;
  return false;
#endif
}

int64_t row_vector_band(const ConvGeometry& g) {
  return std::clamp<int64_t>(kBandPixels / std::max<int64_t>(g.W_out, 1), 1, std::max<int64_t>(g.H_out, 1));
}

#if defined(POINTINS_X86)
namespace {

#define POINTINS_RV_TARGET POINTINS_AVX512_TARGET ",avx512bf16,prfchw"
#define POINTINS_RV_INLINE __attribute__((always_inline)) inline

// r[i] holds row i of a 16 x 16 block; afterwards r[j] holds its column j. Four rounds of shuffles: pairs of
// rows (unpack), quads (unpack of 64-bit halves), then the 128-bit lanes across the four groups of four rows.
__attribute__((target(POINTINS_RV_TARGET))) POINTINS_RV_INLINE void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 low01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), high01 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 low23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 high23 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_f32x4(low01, low23, 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(low01, low23, 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(high01, high23, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(high01, high23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

__attribute__((target(POINTINS_RV_TARGET))) POINTINS_RV_INLINE __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
}

// A register block's parts: acc[i][j] holds rows 16i .. 16i + 15 of column j (a pixel, or a reduction index).
template <int MB, int PB>
__attribute__((target(POINTINS_RV_TARGET))) POINTINS_RV_INLINE void zero_block(__m512 (&acc)[MB][PB]) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < PB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
}

// acc[i][j] += row[i] x `bits` broadcast: FMA of a float32, or VDPBF16PS of a pair of bfloat16.
template <bool kPairs, int MB, int PB>
__attribute__((target(POINTINS_RV_TARGET))) POINTINS_RV_INLINE void multiply_add(__m512 (&acc)[MB][PB], int j,
                                                                                 const __m512 (&row)[MB],
                                                                                 uint32_t bits) {
  if constexpr (kPairs) {
    const __m512bh value = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)row[i], value);
  } else {
    const __m512 value = _mm512_set1_ps(__builtin_bit_cast(float, bits));
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(row[i], value, acc[i][j]);
  }
}

// tile[j * kMaxRows + 16i] = acc[i][j].
template <int MB, int PB>
__attribute__((target(POINTINS_RV_TARGET))) POINTINS_RV_INLINE void store_block(const __m512 (&acc)[MB][PB],
                                                                                float* tile) {
  constexpr int64_t ld = RowVectorConv<float>::kMaxRows;
#pragma GCC unroll 16
  for (int j = 0; j < PB; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) _mm512_store_ps(tile + j * ld + 16 * i, acc[i][j]);
  }
}

// The register block: acc[i][j] (rows 16i .. 16i + 15 at pixel j) over `steps` reduction steps, each MB row
// vectors of `weights` times one broadcast per pixel from x + offsets[step] (FMA on float32 values, or
// VDPBF16PS on pairs of bfloat16 values); the sums go to tile[j * kMaxRows + 16i].
template <bool kPairs, int MB, int PB>
__attribute__((target(POINTINS_RV_TARGET), noinline)) void block(const uint32_t* __restrict__ weights,
                                                                 const uint32_t* __restrict__ x,
                                                                 const int64_t* __restrict__ offsets, int64_t steps,
                                                                 float* __restrict__ tile) {
  constexpr int64_t ld = RowVectorConv<float>::kMaxRows;
  __m512 acc[MB][PB];
  zero_block(acc);
  for (int64_t k = 0; k < steps; ++k) {
    const uint32_t* p = x + offsets[k];
    __m512 row[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) row[i] = _mm512_load_ps(weights + k * ld + 16 * i);
#pragma GCC unroll 16
    for (int j = 0; j < PB; ++j) multiply_add<kPairs>(acc, j, row, p[j]);
  }
  store_block(acc, tile);
}

using BlockFn = void (*)(const uint32_t*, const uint32_t*, const int64_t*, int64_t, float*);

template <typename scalar_t, int MB, int... P>
constexpr std::array<BlockFn, kMaxPixels> blocks_of(std::integer_sequence<int, P...>) {
  return {{&block<std::is_same_v<scalar_t, c10::BFloat16>, MB, P + 1>...}};
}

// The grad_weight block: acc[i][j] (rows 16i .. 16i + 15, reduction index k_j) summed over `steps` output pixels
// (float32) or pairs of neighbouring pixels (bfloat16), each MB row vectors of `grads` (grad_output, pixel-major)
// times one broadcast per k_j from planes + offsets[j] + positions[step] (bytes); the sums go to
// tile[j * kMaxRows + 16i].
template <bool kPairs, int MB, int PB>
__attribute__((target(POINTINS_RV_TARGET), noinline)) void reduce_block(const uint32_t* __restrict__ grads,
                                                                        const char* __restrict__ planes,
                                                                        const int64_t* __restrict__ offsets,
                                                                        const int64_t* __restrict__ positions,
                                                                        int64_t steps, float* __restrict__ tile) {
  constexpr int64_t ld = RowVectorConv<float>::kMaxRows;
  const char* base[PB];
#pragma GCC unroll 16
  for (int j = 0; j < PB; ++j) base[j] = planes + offsets[j];
  __m512 acc[MB][PB];
  zero_block(acc);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t at = positions[step];
    __m512 row[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) row[i] = _mm512_load_ps(grads + step * ld + 16 * i);
#pragma GCC unroll 16
    for (int j = 0; j < PB; ++j) {
      uint32_t bits;
      std::memcpy(&bits, base[j] + at, sizeof(bits));
      multiply_add<kPairs>(acc, j, row, bits);
    }
  }
  store_block(acc, tile);
}

using ReduceFn = void (*)(const uint32_t*, const char*, const int64_t*, const int64_t*, int64_t, float*);

// reductions[MB - 1]: kPixelsFor[MB] reduction indices per block.
template <typename scalar_t>
constexpr std::array<ReduceFn, kMaxBlocks> kReductions = {
    &reduce_block<std::is_same_v<scalar_t, c10::BFloat16>, 1, kPixelsFor[1]>,
    &reduce_block<std::is_same_v<scalar_t, c10::BFloat16>, 2, kPixelsFor[2]>,
    &reduce_block<std::is_same_v<scalar_t, c10::BFloat16>, 3, kPixelsFor[3]>,
    &reduce_block<std::is_same_v<scalar_t, c10::BFloat16>, 4, kPixelsFor[4]>,
};

// kernels[MB - 1][PB - 1], PB <= kPixelsFor[MB].
template <typename scalar_t>
constexpr std::array<std::array<BlockFn, kMaxPixels>, kMaxBlocks> kBlocks = {
    blocks_of<scalar_t, 1>(std::make_integer_sequence<int, kPixelsFor[1]>{}),
    blocks_of<scalar_t, 2>(std::make_integer_sequence<int, kPixelsFor[2]>{}),
    blocks_of<scalar_t, 3>(std::make_integer_sequence<int, kPixelsFor[3]>{}),
    blocks_of<scalar_t, 4>(std::make_integer_sequence<int, kPixelsFor[4]>{}),
};

// Planes: float32 bits, or bfloat16 pairs (channel 2c in the low half, 2c + 1 in the high half).
// Planes: float32 bits, or bfloat16 pairs (channel 2c in the low half, 2c + 1 in the high half), or with
// plain16 the bfloat16 values themselves (two per word, for the grad_weight reduction).
template <typename scalar_t>
__attribute__((target(POINTINS_RV_TARGET))) void build_planes(const scalar_t* channels, int64_t sc, int64_t sh,
                                                              int64_t sw, const ConvGeometry& g, int64_t first_row,
                                                              int64_t rows, int64_t pitch, bool plain16,
                                                              uint32_t* planes) {
  const bool pairs = std::is_same_v<scalar_t, c10::BFloat16> && !plain16;
  const int64_t C = g.C_in_per_group, planes_count = pairs ? (C + 1) / 2 : C, plane = rows * pitch;
  if (plain16) {  // uint16 planes of `pitch` values per row
    uint16_t* values = reinterpret_cast<uint16_t*>(planes);
    std::fill(values, values + C * plane + 2 * kSlack, uint16_t{0});
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t ih = first_row + r - g.pad_h;
        if (ih < 0 || ih >= g.H) continue;
        const uint16_t* src = reinterpret_cast<const uint16_t*>(channels + c * sc + ih * sh);
        uint16_t* dst = values + c * plane + r * pitch + g.pad_w;
        for (int64_t iw = 0; iw < g.W; ++iw) dst[iw] = src[iw * sw];
      }
    }
    return;
  }
  std::fill(planes, planes + planes_count * plane + kSlack, 0u);
  for (int64_t c = 0; c < planes_count; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t ih = first_row + r - g.pad_h;
      if (ih < 0 || ih >= g.H) continue;
      uint32_t* dst = planes + c * plane + r * pitch + g.pad_w;
      if constexpr (!std::is_same_v<scalar_t, c10::BFloat16>) {
        const float* src = channels + c * sc + ih * sh;
        if (sw == 1) {
          std::memcpy(dst, src, g.W * sizeof(float));
        } else {
          for (int64_t iw = 0; iw < g.W; ++iw) dst[iw] = __builtin_bit_cast(uint32_t, src[iw * sw]);
        }
      } else {
        const uint16_t* low = reinterpret_cast<const uint16_t*>(channels + 2 * c * sc + ih * sh);
        if (2 * c + 1 < C) {
          const uint16_t* high = reinterpret_cast<const uint16_t*>(channels + (2 * c + 1) * sc + ih * sh);
          for (int64_t iw = 0; iw < g.W; ++iw) {
            dst[iw] = uint32_t{low[iw * sw]} | (uint32_t{high[iw * sw]} << 16);
          }
        } else {
          for (int64_t iw = 0; iw < g.W; ++iw) dst[iw] = uint32_t{low[iw * sw]};
        }
      }
    }
  }
}

// out[step * kMaxRows + m] = step_rows[m][step] for m < 16 (zero for m >= rows): 16 x 16 transposes of 32-bit
// values (float32, or pairs of bfloat16).
__attribute__((target(POINTINS_RV_TARGET))) void transpose_steps(const uint32_t* const* step_rows, int64_t rows,
                                                                 int64_t steps, uint32_t* out) {
  constexpr int64_t ld = RowVectorConv<float>::kMaxRows;
  for (int64_t s0 = 0; s0 < steps; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, steps - s0);
    __m512 r[16];
    for (int m = 0; m < 16; ++m) {
      r[m] = m < rows ? _mm512_maskz_loadu_ps(first_lanes(n), step_rows[m] + s0) : _mm512_setzero_ps();
    }
    transpose16(r);
    for (int64_t ss = 0; ss < n; ++ss) _mm512_store_ps(out + (s0 + ss) * ld, r[ss]);
  }
}

// The reduction steps of one bfloat16 weight row as 32-bit pairs: words[c * area + t] = w[2c * area + t] in the
// low half, w[(2c + 1) * area + t] in the high half (zero past the last channel). With a 1 x 1 kernel the pairs
// are neighbours: the row's own words. Writes up to 15 words past the steps (the staging row has room).
__attribute__((target(POINTINS_RV_TARGET))) void pair_row(const uint16_t* row, int64_t C, int64_t area,
                                                          uint32_t* words) {
  if (area == 1) {
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const int64_t n = std::min<int64_t>(32, C - c0);
      const __mmask32 mask = n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1;
      _mm512_storeu_si512(words + c0 / 2, _mm512_maskz_loadu_epi16(mask, row + c0));
    }
    return;
  }
  for (int64_t c = 0; c < (C + 1) / 2; ++c) {
    for (int64_t t0 = 0; t0 < area; t0 += 16) {
      const __mmask16 mask = first_lanes(area - t0);
      const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row + 2 * c * area + t0));
      const __m512i high = 2 * c + 1 < C
                               ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row + (2 * c + 1) * area + t0))
                               : _mm512_setzero_si512();
      _mm512_storeu_si512(words + c * area + t0, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
  }
}

// weights[step * kMaxRows + m] for the `steps` reduction steps and rows m < 16 * blocks (zero past M): a step is
// one reduction index k (float32, the weight row itself) or the pair (2c, t), (2c + 1, t) of one tap t
// (bfloat16, staged by pair_row in `staging`, 16 rows of steps + 16 words). 16 x 16 transposes of rows x steps.
template <typename scalar_t>
__attribute__((target(POINTINS_RV_TARGET))) void pack_weights(const scalar_t* const* weight_rows, int64_t M,
                                                              int blocks, const ConvGeometry& g, int64_t steps,
                                                              uint32_t* staging, uint32_t* weights) {
  const int64_t stride = steps + 16;
  for (int i = 0; i < blocks; ++i) {
    const int64_t rows = std::clamp<int64_t>(M - 16 * i, 0, 16);
    const uint32_t* step_rows[16];
    for (int64_t m = 0; m < rows; ++m) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        step_rows[m] = reinterpret_cast<const uint32_t*>(weight_rows[16 * i + m]);
      } else {
        pair_row(reinterpret_cast<const uint16_t*>(weight_rows[16 * i + m]), g.C_in_per_group, g.kernel_area(),
                 staging + m * stride);
        step_rows[m] = staging + m * stride;
      }
    }
    transpose_steps(step_rows, rows, steps, weights + 16 * i);
  }
}

// out_rows[m][t] = tile[t * kMaxRows + m] + shifts[m] for t < pixels, m < M: 16 x 16 transposes.
template <typename scalar_t>
__attribute__((target(POINTINS_RV_TARGET))) void store_tile(const float* tile, int64_t pixels, int64_t M,
                                                            const float* shifts, scalar_t* const* out_rows,
                                                            int64_t out_offset) {
  constexpr int64_t ld = RowVectorConv<scalar_t>::kMaxRows;
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, M - m0);
    for (int64_t t0 = 0; t0 < pixels; t0 += 16) {
      const int64_t n = std::min<int64_t>(16, pixels - t0);
      const __mmask16 mask = first_lanes(n);
      __m512 r[16];
      for (int t = 0; t < 16; ++t) r[t] = t < n ? _mm512_load_ps(tile + (t0 + t) * ld + m0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t m = 0; m < rows; ++m) {
        const __m512 v = _mm512_add_ps(r[m], _mm512_set1_ps(shifts[m0 + m]));
        scalar_t* dst = out_rows[m0 + m] + out_offset + t0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          _mm512_mask_storeu_ps(dst, mask, v);
        } else {
          HalfBlock narrow;
          narrow_lanes((FloatBlock)v, narrow);
          _mm256_mask_storeu_epi16(dst, mask, (__m256i)narrow);
        }
      }
    }
  }
}

// Walks a list of byte ranges a few 64-byte lines at a time, prefetching each line: reads into L2
// (prefetcht1), writes into L1 in the exclusive state (prefetchw), so the stores that follow find their lines
// without waiting for a read for ownership.
struct LineWalk {
  const std::vector<std::pair<const char*, int64_t>>& ranges;  // (first byte, bytes)
  bool write;
  size_t range = 0;
  int64_t at = 0;  // bytes of the current range already covered

  int64_t lines() const {
    int64_t total = 0;
    for (const auto& [begin, bytes] : ranges) total += (bytes + 63) / 64 + 1;
    return total;
  }
  __attribute__((target(POINTINS_RV_TARGET))) void issue(int64_t count) {
    for (; count > 0 && range < ranges.size(); --count) {
      const char* line = ranges[range].first + at;
      if (write) {
        __builtin_prefetch(line, 1, 3);
      } else {
        __builtin_prefetch(line, 0, 2);
      }
      at += 64;
      if (at >= ranges[range].second + 63) {  // the range's last (partial) line is covered
        ++range;
        at = 0;
      }
    }
  }
};

}  // namespace

template <typename scalar_t>
void RowVectorConv<scalar_t>::load_planes(const scalar_t* channels, int64_t sc, int64_t sh, int64_t sw,
                                          const ConvGeometry& g, int64_t oh0, int64_t oh1) {
  constexpr bool pairs = std::is_same_v<scalar_t, c10::BFloat16>;
  g_ = &g;
  oh0_ = oh0;
  band_rows_ = oh1 - oh0;
  plane_rows_ = band_rows_ + (g.kH - 1) * g.dilation_h;
  pitch_ = g.W + 2 * g.pad_w;
  const int64_t area = g.kernel_area(), planes_count = pairs ? (g.C_in_per_group + 1) / 2 : g.C_in_per_group;
  const int64_t plane = plane_rows_ * pitch_;
  build_planes(channels, sc, sh, sw, g, oh0, plane_rows_, pitch_, false,
               planes_.resize(planes_count * plane + kSlack));
  steps_ = planes_count * area;
  offsets_.resize(steps_);
  for (int64_t c = 0, k = 0; c < planes_count; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw, ++k) {
        offsets_[k] = c * plane + kh * g.dilation_h * pitch_ + kw * g.dilation_w;
      }
    }
  }
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::compute(const scalar_t* const* weight_rows, int64_t M, const float* shifts,
                                      scalar_t* const* out_rows, const std::vector<Range>& ahead) {
  TORCH_CHECK(M > 0 && M <= kMaxRows, "row-vector forward: ", M, " rows, expected 1 to ", kMaxRows);
  const ConvGeometry& g = *g_;
  const int blocks = static_cast<int>((M + 15) / 16);
  const int64_t W_out = g.W_out, pixels = band_rows_ * W_out;
  // Each output row in `chunks` equal blocks of `width` pixels, the last moved back to end on the row.
  const int64_t chunks = (W_out + kPixelsFor[blocks] - 1) / kPixelsFor[blocks];
  const int64_t width = (W_out + chunks - 1) / chunks;
  const BlockFn block = kBlocks<scalar_t>[blocks - 1][width - 1];
  uint32_t* weights = weights_.resize(steps_ * kMaxRows);
  float* tile = tile_.resize(pixels * kMaxRows);
  pack_weights(weight_rows, M, blocks, g, steps_, staging_.resize(16 * (steps_ + 16)), weights);
  reads_.clear();
  writes_.clear();
  for (const Range& range : ahead) reads_.emplace_back(static_cast<const char*>(range.begin), range.bytes);
  for (int64_t m = 0; m < M; ++m) {
    writes_.emplace_back(reinterpret_cast<const char*>(out_rows[m] + oh0_ * W_out), pixels * sizeof(scalar_t));
  }
  // Spread over the blocks: a few lines after each.
  LineWalk reads{reads_, false}, writes{writes_, true};
  const int64_t calls = band_rows_ * chunks;
  const int64_t reads_per_call = (reads.lines() + calls - 1) / calls;
  const int64_t writes_per_call = (writes.lines() + calls - 1) / calls;
  for (int64_t r = 0; r < band_rows_; ++r) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t x0 = std::min(chunk * width, W_out - width);
      block(weights, planes_.data() + r * pitch_ + x0, offsets_.data(), steps_, tile + (r * W_out + x0) * kMaxRows);
      reads.issue(reads_per_call);
      writes.issue(writes_per_call);
    }
  }
  store_tile(tile, pixels, M, shifts, out_rows, oh0_ * W_out);
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::load_grad_weight_planes(const scalar_t* channels, int64_t sc, int64_t sh, int64_t sw,
                                                      const ConvGeometry& g) {
  constexpr bool pairs = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr int64_t bytes = sizeof(scalar_t);
  g_ = &g;
  oh0_ = 0;
  band_rows_ = g.H_out;
  plane_rows_ = g.H_out + (g.kH - 1) * g.dilation_h;
  pitch_ = g.W + 2 * g.pad_w;
  const int64_t C = g.C_in_per_group, plane = plane_rows_ * pitch_;
  build_planes(channels, sc, sh, sw, g, 0, plane_rows_, pitch_, pairs,
               planes_.resize((C * plane * bytes + 3) / 4 + kSlack));
  // Reduction index k = (c, kh, kw) reads the planes at byte offsets_[k] + positions_[step].
  offsets_.resize(C * g.kernel_area());
  for (int64_t c = 0, k = 0; c < C; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw, ++k) {
        offsets_[k] = (c * plane + kh * g.dilation_h * pitch_ + kw * g.dilation_w) * bytes;
      }
    }
  }
  const int64_t per_step = pairs ? 2 : 1;  // pixels per step: bfloat16 pairs neighbours of one output row
  steps_ = g.output_pixels() / per_step;
  positions_.resize(steps_);
  for (int64_t oh = 0, step = 0; oh < g.H_out; ++oh) {
    for (int64_t ow = 0; ow < g.W_out; ow += per_step, ++step) positions_[step] = (oh * pitch_ + ow) * bytes;
  }
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::grad_weight(const scalar_t* const* grad_rows, int64_t M, scalar_t* const* gw_rows) {
  TORCH_CHECK(M > 0 && M <= kMaxRows, "row-vector grad_weight: ", M, " rows, expected 1 to ", kMaxRows);
  const ConvGeometry& g = *g_;
  const int blocks = static_cast<int>((M + 15) / 16);
  const int64_t K = g.reduction_per_group(), width = kPixelsFor[blocks];
  const int64_t padded_K = (K + width - 1) / width * width;
  // grad_output pixel-major: 16 x 16 transposes of each row block (bfloat16: words of two neighbouring pixels).
  uint32_t* grads = weights_.resize(steps_ * kMaxRows);
  for (int i = 0; i < blocks; ++i) {
    const uint32_t* step_rows[16];
    const int64_t rows = std::min<int64_t>(16, M - 16 * i);
    for (int64_t m = 0; m < rows; ++m) step_rows[m] = reinterpret_cast<const uint32_t*>(grad_rows[16 * i + m]);
    transpose_steps(step_rows, rows, steps_, grads + 16 * i);
  }
  // Blocks of `width` reduction indices; the last block's missing indices repeat index 0 and are dropped.
  float* tile = tile_.resize(padded_K * kMaxRows);
  const ReduceFn reduce = kReductions<scalar_t>[blocks - 1];
  int64_t block_offsets[kMaxPixels];
  for (int64_t k0 = 0; k0 < K; k0 += width) {
    for (int64_t j = 0; j < width; ++j) block_offsets[j] = offsets_[k0 + j < K ? k0 + j : 0];
    reduce(grads, reinterpret_cast<const char*>(planes_.data()), block_offsets, positions_.data(), steps_,
           tile + k0 * kMaxRows);
  }
  const float zeros[kMaxRows] = {};
  store_tile(tile, K, M, zeros, gw_rows, 0);
}

#else  // not x86: row_vectors_apply is false and nothing calls these

template <typename scalar_t>
void RowVectorConv<scalar_t>::load_planes(const scalar_t*, int64_t, int64_t, int64_t, const ConvGeometry&, int64_t,
                                          int64_t) {
  TORCH_CHECK(false, "row-vector forward: needs an x86-64 build");
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::compute(const scalar_t* const*, int64_t, const float*, scalar_t* const*,
                                      const std::vector<Range>&) {
  TORCH_CHECK(false, "row-vector forward: needs an x86-64 build");
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::load_grad_weight_planes(const scalar_t*, int64_t, int64_t, int64_t, const ConvGeometry&) {
  TORCH_CHECK(false, "row-vector grad_weight: needs an x86-64 build");
}

template <typename scalar_t>
void RowVectorConv<scalar_t>::grad_weight(const scalar_t* const*, int64_t, scalar_t* const*) {
  TORCH_CHECK(false, "row-vector grad_weight: needs an x86-64 build");
}

#endif

template class RowVectorConv<float>;
template class RowVectorConv<c10::BFloat16>;

}  // namespace cpu
}  // namespace pointins_ops
