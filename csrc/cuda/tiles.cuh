// Math policies and the warp-level tile engines every GEMM-shaped kernel here is built from.
//
// A warp computes one 32 x 32 "item" of an output tile, C[m][n] += sum_k A[m][k] * B[k][n], from operands
// already staged in shared memory. Each operand tile is either K-major (k contiguous: a row per m, or per n)
// or MN-major (m, or n, contiguous: a row per k), and the kernel describes it by a functor that returns row
// addresses, which may be gathered (the im2col of a convolution is a table of rows):
//   K-major:  row(i)     -> address of element (i, k = 0) of this k-range; k steps along the row.
//   MN-major: row(k, i)  -> address of element (i, k); the next 8 elements along i (aligned groups of 8)
//                           are contiguous.
// Rows must be 16-byte aligned at k = 0 (K-major) or at i multiple of 8 (MN-major); every index in the
// item's padded range must address valid shared memory, zeros where the product must vanish.
//
// Tensor-core maths (bfloat16, float16: mma.m16n8k16; float32 in TF32: mma.m16n8k8) load fragments with
// ldmatrix (.trans for MN-major 16-bit operands; TF32 MN-major operands with scalar loads, since ldmatrix
// transposes 16-bit elements only). FFMA maths (float32, float64) give each lane an 8 x 4 block of the item and
// load 16-byte vectors. Accumulators are float32 (float64 for float64).
#pragma once

#include "primitives.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace pointins_ops::cuda {

enum class Major { K, MN };

constexpr int kItemM = 32;  // rows of a warp item
constexpr int kItemN = 32;  // columns of a warp item

template <typename Elem, int kKind>
struct TensorCoreMath {
  using elem = Elem;
  using acc = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kKind_ = kKind;
  static constexpr int kK = kKind == 2 ? 8 : 16;  // reduction depth of one mma
};

template <typename T>
struct FfmaMath {
  using elem = T;
  using acc = T;
  static constexpr bool kTensorCores = false;
  static constexpr int kK = 16 / static_cast<int>(sizeof(T)) / (sizeof(T) == 8 ? 2 : 1);  // 16 (8 for float64) bytes
};

// FFMA reading one element of k at a time (the pointwise GEMMs: K-major operands in 64-row warp tiles).
template <typename T>
struct ScalarFfmaMath {
  using elem = T;
  using acc = T;
  static constexpr bool kTensorCores = false;
  static constexpr int kK = 1;
};

using MathBF16 = TensorCoreMath<at::BFloat16, 0>;
using MathF16 = TensorCoreMath<at::Half, 1>;
using MathTF32 = TensorCoreMath<float, 2>;
using MathF32 = FfmaMath<float>;
using MathF64 = FfmaMath<double>;

// The math a tensor type uses: tf32 chooses TF32 tensor cores for float32.
template <typename scalar_t, bool kTF32>
struct MathFor;
template <bool kTF32>
struct MathFor<at::BFloat16, kTF32> {
  using type = MathBF16;
};
template <bool kTF32>
struct MathFor<at::Half, kTF32> {
  using type = MathF16;
};
template <>
struct MathFor<float, true> {
  using type = MathTF32;
};
template <>
struct MathFor<float, false> {
  using type = MathF32;
};
template <bool kTF32>
struct MathFor<double, kTF32> {
  using type = MathF64;
};

// Pairs of 16-bit ones, for a B fragment whose column 0 is all ones (row sums through the tensor cores).
template <typename Elem>
PI_DEVICE uint32_t ones_pair() {
  if constexpr (std::is_same_v<Elem, at::BFloat16>) {
    return 0x3F803F80u;
  } else if constexpr (std::is_same_v<Elem, at::Half>) {
    return 0x3C003C00u;
  } else {
    return 0x3F800000u;  // tf32 1.0
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core warp item: WM x WN tiles of m16 x n8 (32 x 32 by default; 16 x 64 for 16-row operands).
template <typename Math, int WM = 2, int WN = 4>
struct MmaItem {
  static_assert(WN % 2 == 0, "B fragments are loaded in pairs of n8 tiles");
  using elem = typename Math::elem;
  static constexpr int kWM = WM, kWN = WN;
  static constexpr int kK = Math::kK;
  static constexpr bool kTensorCores = true;
  static constexpr bool kTF32 = Math::kKind_ == 2;
  static constexpr int kStepBytes = kK * static_cast<int>(sizeof(elem));  // one k-step along a K-major row
  static constexpr int kHalfBytes = 16;                                   // the second 8x8 matrix along k

  float acc[WM][WN][4];
  float sums[WM][4];  // row sums (the column of ones), when asked for

  PI_DEVICE void zero() {
#pragma unroll
    for (int i = 0; i < WM; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[i][e] = 0.0f;
#pragma unroll
      for (int j = 0; j < WN; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
      }
    }
  }

  // k_steps steps of kK over operands addressed by row_a / row_b (see the file comment). m_tiles (1..WM) and
  // n_tiles (1..WN) say how many m16 / n8 tiles of the item hold output: the others are skipped (the
  // functors must still address valid memory for n tiles up to the next even count). Full items take a path
  // without those checks. Where kMaySum, `sums` also accumulates the row sums of A over the same k, and
  // `products` false skips the products (B is never read). Both are the same for the whole warp.
  template <Major kMA, Major kMB, bool kMaySum = false, typename RowA, typename RowB>
  PI_DEVICE void run(const RowA& row_a, const RowB& row_b, int k_steps, int m_tiles, int n_tiles, bool sums = false,
                     bool products = true) {
    if (m_tiles == WM && n_tiles == WN) {
      steps<kMA, kMB, kMaySum, true>(row_a, row_b, k_steps, WM, WN, sums, products);
    } else {
      steps<kMA, kMB, kMaySum, false>(row_a, row_b, k_steps, m_tiles, n_tiles, sums, products);
    }
  }

  template <Major kMA, Major kMB, bool kMaySum, bool kFull, typename RowA, typename RowB>
  PI_DEVICE void steps(const RowA& row_a, const RowB& row_b, int k_steps, int m_tiles, int n_tiles, bool do_sums,
                       bool products) {
    const bool kSums = kMaySum && do_sums;
    const int lane = lane_id();
    const int g = lane / 4, t = lane % 4, q = lane / 8;
    // K-major rows are fixed for the whole call: each lane's row address once, then constant offsets.
    SmemAddr a_row[WM], b_row[WN / 2] = {};
    if constexpr (kMA == Major::K) {
#pragma unroll
      for (int i = 0; i < WM; ++i) a_row[i] = smem_addr(row_a(16 * i + lane % 16)) + kHalfBytes * (lane / 16);
    }
    if constexpr (kMB == Major::K) {
      if (products) {
#pragma unroll
        for (int j = 0; j < WN / 2; ++j) {
          b_row[j] = smem_addr(row_b(16 * j + lane % 8 + 8 * (lane / 16))) + kHalfBytes * (q % 2);
        }
      }
    }
    uint32_t ones[2];
    if (kSums) ones[0] = ones[1] = g == 0 ? ones_pair<elem>() : 0u;

#pragma unroll 2
    for (int s = 0; s < k_steps; ++s) {
      uint32_t a[WM][4];
#pragma unroll
      for (int i = 0; i < WM; ++i) {
        if (!kFull && i >= m_tiles) break;
        if constexpr (kMA == Major::K) {
          ldsm_x4(a[i], a_row[i] + s * kStepBytes);
        } else if constexpr (!kTF32) {
          ldsm_x4_trans(a[i], smem_addr(row_a(s * kK + lane % 8 + 8 * (q / 2), 16 * i + 8 * (q % 2))));
        } else {
          const float* lo = reinterpret_cast<const float*>(row_a(s * kK + t, 16 * i));
          const float* hi = reinterpret_cast<const float*>(row_a(s * kK + t + 4, 16 * i));
          a[i][0] = __float_as_uint(lo[g]);
          a[i][1] = __float_as_uint(lo[g + 8]);
          a[i][2] = __float_as_uint(hi[g]);
          a[i][3] = __float_as_uint(hi[g + 8]);
        }
        if constexpr (kTF32) {
          // Row sums stay float32 (grad_bias is a plain sum, as in torch); only the products use TF32.
          if (kSums) {
            sums[i][0] += __uint_as_float(a[i][0]) + __uint_as_float(a[i][2]);
            sums[i][2] += __uint_as_float(a[i][1]) + __uint_as_float(a[i][3]);
          }
#pragma unroll
          for (int r = 0; r < 4; ++r) a[i][r] = to_tf32(a[i][r]);
        }
      }
      if (kSums && !kTF32) {
#pragma unroll
        for (int i = 0; i < WM; ++i) {
          if (!kFull && i >= m_tiles) break;
          mma<Math::kKind_>(sums[i], a[i], ones);
        }
      }
      if (products) {
#pragma unroll
        for (int j = 0; j < WN / 2; ++j) {
          if (!kFull && 2 * j >= n_tiles) break;
          uint32_t b[2][2];
          uint32_t r[4];
          if constexpr (kMB == Major::K) {
            ldsm_x4(r, b_row[j] + s * kStepBytes);
          } else if constexpr (!kTF32) {
            ldsm_x4_trans(r, smem_addr(row_b(s * kK + lane % 8 + 8 * (q % 2), 16 * j + 8 * (q / 2))));
          } else {
            const float* lo = reinterpret_cast<const float*>(row_b(s * kK + t, 16 * j));
            const float* hi = reinterpret_cast<const float*>(row_b(s * kK + t + 4, 16 * j));
            r[0] = __float_as_uint(lo[g]), r[1] = __float_as_uint(hi[g]);
            r[2] = __float_as_uint(lo[g + 8]), r[3] = __float_as_uint(hi[g + 8]);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if constexpr (kTF32) r[e] = to_tf32(r[e]);
            b[e / 2][e % 2] = r[e];
          }
#pragma unroll
          for (int i = 0; i < WM; ++i) {
            if (!kFull && i >= m_tiles) break;
            mma<Math::kKind_>(acc[i][2 * j], a[i], b[0]);
            if (kFull || 2 * j + 1 < n_tiles) mma<Math::kKind_>(acc[i][2 * j + 1], a[i], b[1]);
          }
        }
      }
    }
  }

  // f(m, n, value) for every accumulator of the item's valid tiles; (m, n) relative to the item.
  template <typename F>
  PI_DEVICE void for_each(int m_tiles, int n_tiles, const F& f) const {
    const int lane = lane_id();
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < WM; ++i) {
      if (i >= m_tiles) break;
#pragma unroll
      for (int j = 0; j < WN; ++j) {
        if (j >= n_tiles) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) f(16 * i + g + 8 * (e / 2), 8 * j + 2 * t + e % 2, acc[i][j][e]);
      }
    }
  }

  // f(m, sum) for each row of the item's valid m tiles, called by one lane per row. Every lane of the warp
  // must call it (TF32 sums are spread over the 4 lanes of a quad, added here in a fixed order).
  template <typename F>
  PI_DEVICE void for_each_sum(int m_tiles, const F& f) const {
    const int lane = lane_id();
    float total[WM][2];
#pragma unroll
    for (int i = 0; i < WM; ++i) {
      total[i][0] = sums[i][0];
      total[i][1] = sums[i][2];
      if constexpr (kTF32) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          total[i][h] += __shfl_xor_sync(0xffffffffu, total[i][h], 1);
          total[i][h] += __shfl_xor_sync(0xffffffffu, total[i][h], 2);
        }
      }
    }
    if (lane % 4 != 0) return;
#pragma unroll
    for (int i = 0; i < WM; ++i) {
      if (i >= m_tiles) break;
      f(16 * i + lane / 4, total[i][0]);
      f(16 * i + lane / 4 + 8, total[i][1]);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// FFMA warp item of the same (16 WM) x (8 WN) shape: lanes as 4 (ly) x 8 (lx); each lane holds 4 WM rows x WN
// columns. Rows are ly + 4i when A is K-major (consecutive lanes then read rows 4 apart: distinct bank groups
// with an odd pitch) and 4 WM ly + i when A is MN-major (one contiguous vector); likewise columns lx + 8j
// (B K-major) or WN lx + j.
template <typename Math, int WM = 2, int WN = 4>
struct FfmaItem {
  using elem = typename Math::elem;
  using acc_t = typename Math::acc;
  static constexpr int kWM = WM, kWN = WN;
  static constexpr bool kTensorCores = false;
  static constexpr int kTM = 4 * WM, kTN = WN;
  static constexpr int kK = Math::kK;

  acc_t acc[kTM][kTN];
  acc_t sums[kTM];

  template <Major kMA>
  PI_DEVICE static int row(int i) {
    const int ly = lane_id() / 8;
    return kMA == Major::K ? ly + 4 * i : kTM * ly + i;
  }
  template <Major kMB>
  PI_DEVICE static int col(int j) {
    const int lx = lane_id() % 8;
    return kMB == Major::K ? lx + 8 * j : kTN * lx + j;
  }

  PI_DEVICE void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      sums[i] = acc_t(0);
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
    }
  }

  // As MmaItem::run. With A K-major, rows past 16 m_tiles are neither read nor computed (so a tile of 16 rows
  // needs only 16 rows of memory); otherwise the whole item is computed and the caller masks.
  template <Major kMA, Major kMB, bool kMaySum = false, typename RowA, typename RowB>
  PI_DEVICE void run(const RowA& row_a, const RowB& row_b, int k_steps, int m_tiles, int, bool do_sums = false,
                     bool products = true) {
    const bool kSums = kMaySum && do_sums;
    const elem* a_row[kTM];
    const elem* b_row[kTN];
    const int rows = kMA == Major::K ? 4 * m_tiles : kTM;  // i < rows: row ly + 4i below 16 m_tiles
    if constexpr (kMA == Major::K) {
#pragma unroll
      for (int i = 0; i < kTM; ++i) a_row[i] = i < rows ? row_a(row<kMA>(i)) : nullptr;
    }
    if constexpr (kMB == Major::K) {
      if (products) {
#pragma unroll
        for (int j = 0; j < kTN; ++j) b_row[j] = row_b(col<kMB>(j));
      }
    }
    for (int s = 0; s < k_steps; ++s) {
      elem a[kTM][kK];
      elem b[kTN][kK];
      if constexpr (kMA == Major::K) {
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          if (i < rows) {
            load_vector(a[i], a_row[i] + s * kK);
          } else {
#pragma unroll
            for (int kk = 0; kk < kK; ++kk) a[i][kk] = elem(0);
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kK; ++kk) {
          elem v[kTM];
          load_vector(v, row_a(s * kK + kk, row<kMA>(0)));
#pragma unroll
          for (int i = 0; i < kTM; ++i) a[i][kk] = v[i];
        }
      }
      if (products) {
        if constexpr (kMB == Major::K) {
#pragma unroll
          for (int j = 0; j < kTN; ++j) load_vector(b[j], b_row[j] + s * kK);
        } else {
#pragma unroll
          for (int kk = 0; kk < kK; ++kk) {
            elem v[kTN];
            load_vector(v, row_b(s * kK + kk, col<kMB>(0)));
#pragma unroll
            for (int j = 0; j < kTN; ++j) b[j][kk] = v[j];
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          if (kSums) sums[i] += a[i][kk];
          if (products) {
#pragma unroll
            for (int j = 0; j < kTN; ++j) acc[i][j] += a[i][kk] * b[j][kk];
          }
        }
      }
    }
  }

  template <Major kMA, Major kMB, typename F>
  PI_DEVICE void for_each(const F& f) const {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
#pragma unroll
      for (int j = 0; j < kTN; ++j) f(row<kMA>(i), col<kMB>(j), acc[i][j]);
    }
  }

  template <Major kMA, typename F>
  PI_DEVICE void for_each_sum(const F& f) const {
    if (lane_id() % 8 != 0) return;
#pragma unroll
    for (int i = 0; i < kTM; ++i) f(row<kMA>(i), sums[i]);
  }
};

template <typename Math, int WM = 2, int WN = 4>
using WarpItem = std::conditional_t<Math::kTensorCores, MmaItem<Math, WM, WN>, FfmaItem<Math, WM, WN>>;

// The engine-independent view of a warp item's results: f(m, n, value) over the item's accumulators (only
// valid tiles on tensor cores; every element of the item on FFMA, the caller masks), and f(m, sum) over rows
// (every lane must call it).
template <Major kMA, Major kMB, typename Item, typename F>
PI_DEVICE void item_results(const Item& item, int m_tiles, int n_tiles, const F& f) {
  if constexpr (Item::kTensorCores) {
    item.for_each(m_tiles, n_tiles, f);
  } else {
    item.template for_each<kMA, kMB>(f);
  }
}

template <Major kMA, typename Item, typename F>
PI_DEVICE void item_sums(const Item& item, int m_tiles, const F& f) {
  if constexpr (Item::kTensorCores) {
    item.for_each_sum(m_tiles, f);
  } else {
    item.template for_each_sum<kMA>(f);
  }
}

}  // namespace pointins_ops::cuda
