// CUDA kernels of instance_aware_conv: forward, grad_weight, grad_templates and grad_bias.
//
// Every pass is an implicit GEMM on one 64 x 64 output tile per thread block, with the template's im2col
// (or, for grad_templates, the grad_output's transposed-convolution gather) built on the fly in shared
// memory, one 32-deep slice of the reduction at a time:
//
//   pass            rows                                  columns          reduction
//   forward         (instance, c_out) of one template     output pixels    (c_in, kh, kw)
//   grad_weight     (instance, c_out) of one template     (c_in, kh, kw)   output pixels (split when few tiles)
//   grad_templates  c_in of one template                  input pixels     (instance, c_out, kh, kw)
//
// Instances are bucketed by template on the device (a stable sort of the index, offsets by binary search),
// so a tile's rows span several instances of the same template and the template is read once for all of
// them. Nothing here reads device data on the host: the whole op can be captured in a CUDA graph. Launch
// grids are sized by an upper bound on the number of row tiles, and surplus blocks exit.
//
// Each output element is written by exactly one block, which sums its reduction in a fixed order: no
// atomics, and results are bitwise identical run to run. float16 / bfloat16 multiply on tensor cores
// (WMMA, sm_80 and newer; FFMA elsewhere), float32 and float64 on FFMA; accumulation is in
// at::opmath_type (float32, or float64 for float64).
//
// An index value outside [0, P) is never dereferenced: such instances are sorted into an extra bucket P
// whose output rows (forward) and grad_weight rows are filled with NaN, and which grad_templates ignores.
#include "../instance_aware_conv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

// WMMA with bfloat16 needs sm_80; older targets (and the host pass) use the FFMA main loop.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define POINTINS_USE_WMMA 1
#else
#define POINTINS_USE_WMMA 0
#endif

namespace pointins_ops {
namespace {

constexpr int kTileM = 64;     // rows of a block's output tile
constexpr int kTileN = 64;     // columns of a block's output tile
constexpr int kTileK = 32;     // reduction slice staged in shared memory per step
constexpr int kThreads = 256;  // 8 warps: 16 x 16 threads of 4 x 4 outputs (FFMA), or 4 x 2 warps (WMMA)
constexpr int kMaxGridY = 65535;
// Two resident blocks per SM cap the GEMM kernels at 128 registers a thread.
constexpr int kMinBlocksPerSm = 2;

// Marks a column whose output pixel lies past the end: every input coordinate derived from it is negative.
constexpr int kOutsideColumn = std::numeric_limits<int>::min() / 4;

template <typename scalar_t>
constexpr bool kIs16Bit = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

template <typename scalar_t>
__device__ __forceinline__ scalar_t zero() {
  return static_cast<scalar_t>(0.0f);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t quiet_nan() {
  return static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

// q = a / b, r = a % b for a >= 0, b > 0, in 32-bit arithmetic whenever both fit (64-bit division is slow).
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (a <= UINT32_MAX && b <= UINT32_MAX) {
    q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  } else {
    q = a / b;
  }
  r = a - q * b;
}

// The bucket whose row tiles contain `slot`: the largest p in [0, last] with tile_start[p] <= slot.
__device__ __forceinline__ int64_t find_bucket(const int64_t* __restrict__ tile_start, int64_t last, int64_t slot) {
  int64_t lo = 0, hi = last;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= slot) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename scalar_t>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// One block's kTileM x kTileN GEMM tile: tile[r][c] = sum_k A(r, k) * B(k, c) for k in [0, reduction), in
// increasing k. The caller supplies the operands element-wise (load_a(r, kk, k), load_b(kk, k, c), with
// kk = k % kTileK the slot in the current slice, called only for k < reduction), a prepare(k0) hook that
// fills per-slice lookup tables before each slice is loaded, and store(r, c, value) for the result.
template <typename scalar_t>
struct TileGemm {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kTensorCores = kIs16Bit<scalar_t>;
  // Tensor cores read the operands in their own type; FFMA reads them converted once on staging.
  using smem_t = std::conditional_t<kTensorCores, scalar_t, acc_t>;
  // Row pitches: WMMA needs multiples of 16 bytes; FFMA pads by one element against bank conflicts.
  static constexpr int kPitchA = kTileK + (kTensorCores ? 8 : 1);
  static constexpr int kPitchB = kTileN + (kTensorCores ? 8 : 1);
  static constexpr int kPitchC = kTileN + 4;

  struct Shared {
    alignas(128) smem_t a[kTileM][kPitchA];
    alignas(128) smem_t b[kTileK][kPitchB];
    // Staging of the tensor-core accumulators for the element-wise epilogue.
    alignas(128) float c[kTensorCores ? kTileM : 1][kTensorCores ? kPitchC : 1];
  };

  // kBReductionFast: consecutive threads load consecutive k of B (when B is contiguous along k).
  template <bool kBReductionFast, typename Prepare, typename LoadA, typename LoadB, typename Store>
  static __device__ __forceinline__ void run(Shared& s, int64_t reduction, const Prepare& prepare,
                                             const LoadA& load_a, const LoadB& load_b, const Store& store) {
    const int tid = threadIdx.x;
#if POINTINS_USE_WMMA
    if constexpr (kTensorCores) {
      using namespace nvcuda;
      using frag_t = typename WmmaType<scalar_t>::type;
      const int warp = tid / 32;
      const int warp_row = (warp % 4) * 16;  // 4 x 2 warps, each 16 rows x 32 columns
      const int warp_col = (warp / 4) * 32;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
      wmma::fill_fragment(acc[0], 0.0f);
      wmma::fill_fragment(acc[1], 0.0f);
      for (int64_t k0 = 0; k0 < reduction; k0 += kTileK) {
        stage<kBReductionFast>(s, reduction, k0, prepare, load_a, load_b);
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, frag_t, wmma::row_major> a;
          wmma::load_matrix_sync(a, reinterpret_cast<const frag_t*>(&s.a[warp_row][kk]), kPitchA);
#pragma unroll
          for (int f = 0; f < 2; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, frag_t, wmma::row_major> b;
            wmma::load_matrix_sync(b, reinterpret_cast<const frag_t*>(&s.b[kk][warp_col + 16 * f]), kPitchB);
            wmma::mma_sync(acc[f], a, b, acc[f]);
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::store_matrix_sync(&s.c[warp_row][warp_col + 16 * f], acc[f], kPitchC, wmma::mem_row_major);
      }
      __syncthreads();
      for (int e = tid; e < kTileM * kTileN; e += kThreads) {
        store(e / kTileN, e % kTileN, s.c[e / kTileN][e % kTileN]);
      }
      __syncthreads();
      return;
    }
#endif
    const int tx = tid % 16;
    const int ty = tid / 16;
    acc_t acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < reduction; k0 += kTileK) {
      stage<kBReductionFast>(s, reduction, k0, prepare, load_a, load_b);
#pragma unroll 8
      for (int kk = 0; kk < kTileK; ++kk) {
        acc_t a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = static_cast<acc_t>(s.a[ty + 16 * i][kk]);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = static_cast<acc_t>(s.b[kk][tx + 16 * j]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) store(ty + 16 * i, tx + 16 * j, acc[i][j]);
    }
    // The caller's next tile rewrites the lookup tables the stores above read.
    __syncthreads();
  }

  // Fills s.a and s.b with the slice [k0, k0 + kTileK) (zeros past the end); ends with a barrier.
  template <bool kBReductionFast, typename Prepare, typename LoadA, typename LoadB>
  static __device__ __forceinline__ void stage(Shared& s, int64_t reduction, int64_t k0, const Prepare& prepare,
                                               const LoadA& load_a, const LoadB& load_b) {
    const int tid = threadIdx.x;
    prepare(k0);
    __syncthreads();
    for (int e = tid; e < kTileM * kTileK; e += kThreads) {
      const int r = e / kTileK;
      const int kk = e % kTileK;
      const int64_t k = k0 + kk;
      s.a[r][kk] = static_cast<smem_t>(k < reduction ? load_a(r, kk, k) : zero<scalar_t>());
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = kBReductionFast ? e % kTileK : e / kTileN;
      const int c = kBReductionFast ? e / kTileK : e % kTileN;
      const int64_t k = k0 + kk;
      s.b[kk][c] = static_cast<smem_t>(k < reduction ? load_b(kk, k, c) : zero<scalar_t>());
    }
    __syncthreads();
  }
};

// Strides of the templates tensor, used as they are (channels_last and strided views need no copy).
struct TemplateStrides {
  int64_t p, c, h, w;
};

// Instances grouped by template, on the device: order[offsets[p] .. offsets[p + 1]) are template p's
// instances in increasing instance order, for p in [0, P]; bucket P holds instances whose index is out of
// range. Row tiles (kTileM rows of (instance, c_out in a group)) of bucket p are tile_start[p] ..
// tile_start[p + 1] - 1.
struct BucketPointers {
  const int64_t* order;
  const int64_t* offsets;
  const int64_t* tile_start;
};

// ---------------------------------------------------------------------------------------------------------
// Forward: output[n, co, j] = bias[n, co] + sum_k weight[n, co, k] * columns_p[k, j].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_kernel(const scalar_t* __restrict__ templates, TemplateStrides ts, const scalar_t* __restrict__ weight,
                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ output, BucketPointers buckets,
                   ConvGeometry g) {
  using Gemm = TileGemm<scalar_t>;
  using acc_t = typename Gemm::acc_t;
  __shared__ typename Gemm::Shared shared;
  __shared__ int64_t row_instance_channel[kTileM];  // n * C_out + co, or -1 past the bucket's rows
  __shared__ int column_ih[kTileN], column_iw[kTileN];  // input coordinates of kernel tap (0, 0)
  __shared__ int64_t slice_channel[kTileK];             // c * stride_c of the slice's reduction indices
  __shared__ int slice_dh[kTileK], slice_dw[kTileK];    // kh * dilation_h, kw * dilation_w

  const int64_t slot = blockIdx.x;
  if (slot >= buckets.tile_start[g.P + 1]) return;  // surplus block of the upper-bound grid
  const int64_t p = find_bucket(buckets.tile_start, g.P, slot);
  const int64_t bucket_begin = buckets.offsets[p];
  const int64_t bucket_rows = (buckets.offsets[p + 1] - bucket_begin) * g.C_out_per_group;
  const int64_t first_row = (slot - buckets.tile_start[p]) * kTileM;

  const int tid = threadIdx.x;
  const int64_t area = g.kH * g.kW;
  const int64_t K = g.C_in_per_group * area;
  const int64_t pixels = g.H_out * g.W_out;
  const int64_t column_tiles = (pixels + kTileN - 1) / kTileN;
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);

  for (int64_t t = blockIdx.y; t < g.groups * column_tiles; t += gridDim.y) {
    const int64_t group = t / column_tiles;
    const int64_t j0 = (t % column_tiles) * kTileN;
    if (tid < kTileM) {
      const int64_t q = first_row + tid;
      int64_t instance_slot, co;
      divmod(q, g.C_out_per_group, instance_slot, co);
      row_instance_channel[tid] =
          q < bucket_rows ? buckets.order[bucket_begin + instance_slot] * g.C_out + group * g.C_out_per_group + co
                          : -1;
    }
    if (tid < kTileN) {
      const int64_t j = j0 + tid;
      int64_t oh, ow;
      divmod(j, g.W_out, oh, ow);
      column_ih[tid] = j < pixels ? static_cast<int>(oh * g.stride_h - g.pad_h) : kOutsideColumn;
      column_iw[tid] = j < pixels ? static_cast<int>(ow * g.stride_w - g.pad_w) : kOutsideColumn;
    }
    __syncthreads();

    if (p == g.P) {  // out-of-range index: never read a template, mark the output
      for (int e = tid; e < kTileM * kTileN; e += kThreads) {
        const int64_t row = row_instance_channel[e / kTileN];
        const int64_t j = j0 + e % kTileN;
        if (row >= 0 && j < pixels) output[row * pixels + j] = quiet_nan<scalar_t>();
      }
      __syncthreads();
      continue;
    }

    const scalar_t* tpl = templates + p * ts.p + group * g.C_in_per_group * ts.c;
    const auto prepare = [&](int64_t k0) {
      const int64_t k = k0 + tid;
      if (tid < kTileK && k < K) {
        int64_t c, tap, kh, kw;
        divmod(k, area, c, tap);
        divmod(tap, g.kW, kh, kw);
        slice_channel[tid] = c * ts.c;
        slice_dh[tid] = static_cast<int>(kh * g.dilation_h);
        slice_dw[tid] = static_cast<int>(kw * g.dilation_w);
      }
    };
    const auto load_a = [&](int r, int, int64_t k) {
      const int64_t row = row_instance_channel[r];
      return row >= 0 ? weight[row * K + k] : zero<scalar_t>();
    };
    const auto load_b = [&](int kk, int64_t, int c) {
      const int ih = column_ih[c] + slice_dh[kk];
      const int iw = column_iw[c] + slice_dw[kk];
      return (ih >= 0 && ih < H && iw >= 0 && iw < W) ? tpl[slice_channel[kk] + ih * ts.h + iw * ts.w]
                                                      : zero<scalar_t>();
    };
    const auto store = [&](int r, int c, acc_t value) {
      const int64_t row = row_instance_channel[r];
      const int64_t j = j0 + c;
      if (row >= 0 && j < pixels) {
        if (bias != nullptr) value += static_cast<acc_t>(bias[row]);
        output[row * pixels + j] = static_cast<scalar_t>(value);
      }
    };
    Gemm::template run<false>(shared, K, prepare, load_a, load_b, store);
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_weight[n, co, k] = sum_j grad_output[n, co, j] * columns_p[k, j].
//
// When the tiles are too few to fill the GPU (few instances, large maps), the pixels are split into
// gridDim.z ranges of split_length: block z writes its partial sums to partial[z] (in acc_t), and
// sum_splits_kernel adds the splits in order. The split count depends on the shapes only, so results stay
// bitwise reproducible. With one split (partial == nullptr) the block writes grad_weight directly.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    grad_weight_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ templates,
                       TemplateStrides ts, scalar_t* __restrict__ grad_weight,
                       at::opmath_type<scalar_t>* __restrict__ partial, int64_t split_length, BucketPointers buckets,
                       ConvGeometry g) {
  using Gemm = TileGemm<scalar_t>;
  using acc_t = typename Gemm::acc_t;
  __shared__ typename Gemm::Shared shared;
  __shared__ int64_t row_instance_channel[kTileM];   // n * C_out + co, or -1 past the bucket's rows
  __shared__ int64_t column_channel[kTileN];         // c * stride_c of the column's reduction index, or -1
  __shared__ int column_dh[kTileN], column_dw[kTileN];
  __shared__ int slice_ih[kTileK], slice_iw[kTileK];  // input coordinates of tap (0, 0) for the slice's pixels

  const int64_t slot = blockIdx.x;
  if (slot >= buckets.tile_start[g.P + 1]) return;
  const int64_t p = find_bucket(buckets.tile_start, g.P, slot);
  const int64_t bucket_begin = buckets.offsets[p];
  const int64_t bucket_rows = (buckets.offsets[p + 1] - bucket_begin) * g.C_out_per_group;
  const int64_t first_row = (slot - buckets.tile_start[p]) * kTileM;

  const int tid = threadIdx.x;
  const int64_t area = g.kH * g.kW;
  const int64_t K = g.C_in_per_group * area;
  const int64_t pixels = g.H_out * g.W_out;
  const int64_t column_tiles = (K + kTileN - 1) / kTileN;
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);
  const int64_t j_begin = blockIdx.z * split_length;  // this block's pixels: [j_begin, j_begin + j_count)
  const int64_t j_count = std::min(split_length, pixels - j_begin);
  // Where (row, k) of grad_weight goes: the gradient itself, or this split's partial sums.
  acc_t* const split_partial = partial != nullptr ? partial + blockIdx.z * (g.N * g.C_out * K) : nullptr;
  const auto write = [&](int64_t offset, acc_t value) {
    if (split_partial != nullptr) {
      split_partial[offset] = value;
    } else {
      grad_weight[offset] = static_cast<scalar_t>(value);
    }
  };

  for (int64_t t = blockIdx.y; t < g.groups * column_tiles; t += gridDim.y) {
    const int64_t group = t / column_tiles;
    const int64_t k_begin = (t % column_tiles) * kTileN;
    if (tid < kTileM) {
      const int64_t q = first_row + tid;
      int64_t instance_slot, co;
      divmod(q, g.C_out_per_group, instance_slot, co);
      row_instance_channel[tid] =
          q < bucket_rows ? buckets.order[bucket_begin + instance_slot] * g.C_out + group * g.C_out_per_group + co
                          : -1;
    }
    if (tid < kTileN) {
      const int64_t k = k_begin + tid;
      int64_t c, tap, kh, kw;
      divmod(k, area, c, tap);
      divmod(tap, g.kW, kh, kw);
      column_channel[tid] = k < K ? c * ts.c : -1;
      column_dh[tid] = static_cast<int>(kh * g.dilation_h);
      column_dw[tid] = static_cast<int>(kw * g.dilation_w);
    }
    __syncthreads();

    if (p == g.P) {  // out-of-range index: never read a template, mark the gradient
      for (int e = tid; e < kTileM * kTileN; e += kThreads) {
        const int64_t row = row_instance_channel[e / kTileN];
        const int64_t k = k_begin + e % kTileN;
        if (row >= 0 && k < K) write(row * K + k, std::numeric_limits<acc_t>::quiet_NaN());
      }
      __syncthreads();
      continue;
    }

    const scalar_t* tpl = templates + p * ts.p + group * g.C_in_per_group * ts.c;
    const auto prepare = [&](int64_t j0) {
      const int64_t j = j_begin + j0 + tid;
      if (tid < kTileK && j < pixels) {
        int64_t oh, ow;
        divmod(j, g.W_out, oh, ow);
        slice_ih[tid] = static_cast<int>(oh * g.stride_h - g.pad_h);
        slice_iw[tid] = static_cast<int>(ow * g.stride_w - g.pad_w);
      }
    };
    const auto load_a = [&](int r, int, int64_t j) {
      const int64_t row = row_instance_channel[r];
      return row >= 0 ? grad_output[row * pixels + j_begin + j] : zero<scalar_t>();
    };
    const auto load_b = [&](int kk, int64_t, int c) {
      const int64_t channel = column_channel[c];
      const int ih = slice_ih[kk] + column_dh[c];
      const int iw = slice_iw[kk] + column_dw[c];
      return (channel >= 0 && ih >= 0 && ih < H && iw >= 0 && iw < W) ? tpl[channel + ih * ts.h + iw * ts.w]
                                                                      : zero<scalar_t>();
    };
    const auto store = [&](int r, int c, acc_t value) {
      const int64_t row = row_instance_channel[r];
      const int64_t k = k_begin + c;
      if (row >= 0 && k < K) write(row * K + k, value);
    };
    Gemm::template run<true>(shared, j_count, prepare, load_a, load_b, store);
  }
}

// out[i] = sum over z in increasing order of partial[z * count + i].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ out,
                      int64_t count, int64_t splits) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    acc_t sum = partial[i];
    for (int64_t z = 1; z < splits; ++z) sum += partial[z * count + i];
    out[i] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_templates[p, c, ih, iw] = sum over p's instances n, their channels co in c's group and the taps
// (kh, kw) that reach (ih, iw) from an output pixel (oh, ow) of weight[n, co, c, kh, kw] * grad_output[n, co,
// oh, ow]. One block owns a (channels x input pixels) tile of one template: no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    grad_templates_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ weight,
                          scalar_t* __restrict__ grad_templates, const int64_t* __restrict__ order,
                          const int64_t* __restrict__ offsets, ConvGeometry g) {
  using Gemm = TileGemm<scalar_t>;
  using acc_t = typename Gemm::acc_t;
  __shared__ typename Gemm::Shared shared;
  __shared__ int64_t row_channel[kTileM];  // channel within the group, or -1
  __shared__ int column_ih[kTileN], column_iw[kTileN];
  __shared__ int64_t slice_grad_row[kTileK];    // (n * C_out + co) * pixels
  __shared__ int64_t slice_weight[kTileK];      // (n * C_out + co) * K + kh * kW + kw
  __shared__ int slice_th[kTileK], slice_tw[kTileK];  // pad - k * dilation: oh * stride = ih + slice_th

  const int tid = threadIdx.x;
  const int64_t area = g.kH * g.kW;
  const int64_t K = g.C_in_per_group * area;
  const int64_t pixels = g.H_out * g.W_out;
  const int64_t input_pixels = g.H * g.W;
  const int64_t row_tiles = (g.C_in_per_group + kTileM - 1) / kTileM;
  const int64_t column_tiles = (input_pixels + kTileN - 1) / kTileN;
  const int64_t units = g.P * g.groups * row_tiles * column_tiles;
  const int stride_h = static_cast<int>(g.stride_h), stride_w = static_cast<int>(g.stride_w);
  const int H_out = static_cast<int>(g.H_out), W_out = static_cast<int>(g.W_out);

  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t column_tile = unit % column_tiles;
    int64_t rest = unit / column_tiles;
    const int64_t row_tile = rest % row_tiles;
    rest /= row_tiles;
    const int64_t group = rest % g.groups;
    const int64_t p = rest / g.groups;
    const int64_t bucket_begin = offsets[p];
    const int64_t reduction = (offsets[p + 1] - bucket_begin) * g.C_out_per_group * area;

    if (tid < kTileM) {
      const int64_t c = row_tile * kTileM + tid;
      row_channel[tid] = c < g.C_in_per_group ? c : -1;
    }
    if (tid < kTileN) {
      const int64_t q = column_tile * kTileN + tid;
      int64_t ih, iw;
      divmod(q, g.W, ih, iw);
      column_ih[tid] = q < input_pixels ? static_cast<int>(ih) : kOutsideColumn;
      column_iw[tid] = q < input_pixels ? static_cast<int>(iw) : kOutsideColumn;
    }
    __syncthreads();

    const auto prepare = [&](int64_t k0) {
      const int64_t k = k0 + tid;
      if (tid < kTileK && k < reduction) {
        int64_t rest_k, kw, kh, instance_slot, co;
        divmod(k, g.kW, rest_k, kw);
        divmod(rest_k, g.kH, rest_k, kh);
        divmod(rest_k, g.C_out_per_group, instance_slot, co);
        const int64_t row = order[bucket_begin + instance_slot] * g.C_out + group * g.C_out_per_group + co;
        slice_grad_row[tid] = row * pixels;
        slice_weight[tid] = row * K + kh * g.kW + kw;
        slice_th[tid] = static_cast<int>(g.pad_h - kh * g.dilation_h);
        slice_tw[tid] = static_cast<int>(g.pad_w - kw * g.dilation_w);
      }
    };
    const auto load_a = [&](int r, int kk, int64_t) {
      const int64_t c = row_channel[r];
      return c >= 0 ? weight[slice_weight[kk] + c * area] : zero<scalar_t>();
    };
    const auto load_b = [&](int kk, int64_t, int c) {
      int th = column_ih[c] + slice_th[kk];
      int tw = column_iw[c] + slice_tw[kk];
      if (th < 0 || tw < 0) return zero<scalar_t>();
      if (stride_h != 1) {
        if (th % stride_h != 0) return zero<scalar_t>();
        th /= stride_h;
      }
      if (stride_w != 1) {
        if (tw % stride_w != 0) return zero<scalar_t>();
        tw /= stride_w;
      }
      if (th >= H_out || tw >= W_out) return zero<scalar_t>();
      return grad_output[slice_grad_row[kk] + static_cast<int64_t>(th) * W_out + tw];
    };
    const auto store = [&](int r, int c, acc_t value) {
      const int64_t channel = row_channel[r];
      const int64_t q = column_tile * kTileN + c;
      if (channel >= 0 && q < input_pixels) {
        grad_templates[(p * g.C_in + group * g.C_in_per_group + channel) * input_pixels + q] =
            static_cast<scalar_t>(value);
      }
    };
    // An unused template has an empty reduction: the tile is written with zeros.
    Gemm::template run<false>(shared, reduction, prepare, load_a, load_b, store);
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_bias[r] = sum_j grad_output[r, j]: one warp per row, lanes summing strided elements then a fixed
// butterfly, so the order is the same every run.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_bias_kernel(const scalar_t* __restrict__ grad_output, scalar_t* __restrict__ grad_bias, int64_t rows,
                     int64_t pixels) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    acc_t sum = acc_t(0);
    for (int64_t j = lane; j < pixels; j += 32) sum += static_cast<acc_t>(grad_output[row * pixels + j]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) grad_bias[row] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// Spatial coordinates are computed in 32-bit arithmetic (flat offsets are always 64-bit).
void check_spatial_sizes(const ConvGeometry& g) {
  constexpr int64_t kLimit = int64_t{1} << 29;
  for (const int64_t size : {g.H, g.W, g.H_out, g.W_out, g.pad_h + g.dilation_h * (g.kH - 1),
                             g.pad_w + g.dilation_w * (g.kW - 1), g.stride_h * g.H_out, g.stride_w * g.W_out}) {
    TORCH_CHECK_VALUE(size < kLimit, "instance_aware_conv (CUDA): spatial sizes, padding, stride and dilated kernel "
                      "extents must stay below 2^29; got H = ", g.H, ", W = ", g.W, ", kernel = (", g.kH, ", ", g.kW,
                      "), stride = (", g.stride_h, ", ", g.stride_w, "), padding = (", g.pad_h, ", ", g.pad_w,
                      "), dilation = (", g.dilation_h, ", ", g.dilation_w, ")");
  }
}

struct DeviceBuckets {
  at::Tensor order;       // (N,) int64
  at::Tensor offsets;     // (P + 2,) int64: bucket p is [offsets[p], offsets[p + 1]); bucket P: index out of range
  at::Tensor tile_start;  // (P + 2,) int64: first row tile of each bucket (for kTileM-row tiles)
};

// Stable sort of the index on the current stream: no host synchronization.
DeviceBuckets bucket_instances(const std::optional<at::Tensor>& index, const ConvGeometry& g,
                               const at::TensorOptions& options) {
  const at::TensorOptions long_options = options.dtype(at::kLong);
  DeviceBuckets buckets;
  if (!index.has_value()) {  // N == P, instance n uses template n
    buckets.order = at::arange(g.N, long_options);
    buckets.offsets = at::arange(g.P + 2, long_options).clamp_max_(g.N);
  } else {
    at::Tensor keys = index->to(at::kLong);
    keys = keys.masked_fill(keys.lt(0).logical_or_(keys.ge(g.P)), g.P);
    auto [sorted_keys, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    buckets.order = order;
    buckets.offsets = at::searchsorted(sorted_keys, at::arange(g.P + 2, long_options));
  }
  const at::Tensor rows = (buckets.offsets.slice(0, 1) - buckets.offsets.slice(0, 0, g.P + 1)) * g.C_out_per_group;
  const at::Tensor tiles = at::div(rows + (kTileM - 1), kTileM, "floor");
  buckets.tile_start = at::cat({at::zeros({1}, long_options), tiles.cumsum(0)});
  return buckets;
}

BucketPointers pointers(const DeviceBuckets& buckets) {
  return {buckets.order.const_data_ptr<int64_t>(), buckets.offsets.const_data_ptr<int64_t>(),
          buckets.tile_start.const_data_ptr<int64_t>()};
}

// Row tiles of all buckets together: sum_p ceil(rows_p / kTileM) <= ceil(N * C_out_per_group / kTileM) + one
// per non-empty bucket. The grid has this many blocks; those past the true count exit at once.
int64_t row_tile_bound(const ConvGeometry& g) {
  const int64_t bound = (g.N * g.C_out_per_group + kTileM - 1) / kTileM + std::min(g.N, g.P + 1);
  TORCH_CHECK(bound <= std::numeric_limits<int32_t>::max(), "instance_aware_conv (CUDA): too many row tiles (",
              bound, "); N * C_out / groups must stay below 2^37");
  return bound;
}

// Pixels per grad_weight split: all of them, unless the (upper bound of the) tile count leaves the GPU
// mostly idle; then enough splits for about two blocks per SM, each at least kMinSplitPixels long, with the
// partial sums capped at kMaxSplitBytes. A whole number of reduction slices, and a function of the shapes
// and the device only (never of index values), so the summation order is fixed.
int64_t pixel_split_length(int64_t tiles, int64_t pixels, int64_t bytes_per_split) {
  constexpr int64_t kMinSplitPixels = 512;
  constexpr int64_t kMaxSplits = 64;
  constexpr int64_t kMaxSplitBytes = int64_t{256} << 20;
  const int64_t target = 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  int64_t splits = tiles >= target ? 1 : (target + tiles - 1) / tiles;
  splits = std::min({splits, kMaxSplits, std::max<int64_t>(1, pixels / kMinSplitPixels),
                     std::max<int64_t>(1, kMaxSplitBytes / std::max<int64_t>(1, bytes_per_split))});
  const int64_t length = (pixels + splits - 1) / splits;
  return (length + kTileK - 1) / kTileK * kTileK;
}

TemplateStrides template_strides(const at::Tensor& templates) {
  return {templates.stride(0), templates.stride(1), templates.stride(2), templates.stride(3)};
}

at::Tensor instance_aware_conv_cuda(const at::Tensor& templates, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, bias, index, stride, padding, dilation, groups);
  check_spatial_sizes(g);
  const c10::cuda::CUDAGuard device_guard(templates.device());
  at::Tensor output = at::empty({g.N, g.C_out, g.H_out, g.W_out}, templates.options());
  if (output.numel() == 0) return output;

  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DeviceBuckets buckets = bucket_instances(index, g, templates.options());
  const int64_t column_tiles = (g.output_pixels() + kTileN - 1) / kTileN;
  const dim3 grid(static_cast<unsigned>(row_tile_bound(g)),
                  static_cast<unsigned>(std::min<int64_t>(g.groups * column_tiles, kMaxGridY)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_cuda", [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        templates.const_data_ptr<scalar_t>(), template_strides(templates), weight_c.const_data_ptr<scalar_t>(),
        bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr, output.mutable_data_ptr<scalar_t>(),
        pointers(buckets), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& templates, const at::Tensor& weight,
    const std::optional<at::Tensor>& index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, std::nullopt, index, stride, padding, dilation, groups);
  check_grad_output(grad_output, templates, g);
  check_spatial_sizes(g);
  const c10::cuda::CUDAGuard device_guard(templates.device());
  if (g.N == 0 || g.C_out == 0) {
    return {at::zeros({g.P, g.C_in, g.H, g.W}, templates.options()),
            at::zeros({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options()),
            at::zeros({g.N, g.C_out}, weight.options())};
  }
  // Every element of the three gradients is written by exactly one block.
  at::Tensor grad_templates = at::empty({g.P, g.C_in, g.H, g.W}, templates.options());
  at::Tensor grad_weight = at::empty({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options());
  at::Tensor grad_bias = at::empty({g.N, g.C_out}, weight.options());

  const at::Tensor grad_out = grad_output.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const DeviceBuckets buckets = bucket_instances(index, g, templates.options());
  const int64_t K = g.reduction_per_group();
  const int64_t pixels = g.output_pixels();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_backward_cuda", [&] {
        const scalar_t* go = grad_out.const_data_ptr<scalar_t>();

        const int64_t rows = g.N * g.C_out;
        const int64_t bias_blocks = std::min<int64_t>((rows + kThreads / 32 - 1) / (kThreads / 32), 1 << 20);
        grad_bias_kernel<scalar_t><<<static_cast<unsigned>(bias_blocks), kThreads, 0, stream>>>(
            go, grad_bias.mutable_data_ptr<scalar_t>(), rows, pixels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();

        if (grad_weight.numel() > 0) {
          using acc_t = at::opmath_type<scalar_t>;
          const int64_t column_tiles = (K + kTileN - 1) / kTileN;
          const int64_t row_tiles = row_tile_bound(g);
          const int64_t split_length = pixel_split_length(row_tiles * g.groups * column_tiles, pixels,
                                                          grad_weight.numel() * int64_t{sizeof(acc_t)});
          const int64_t splits = (pixels + split_length - 1) / split_length;
          at::Tensor partial;
          if (splits > 1) {
            partial = at::empty({splits, grad_weight.numel()},
                                weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
          }
          const dim3 grid(static_cast<unsigned>(row_tiles),
                          static_cast<unsigned>(std::min<int64_t>(g.groups * column_tiles, kMaxGridY)),
                          static_cast<unsigned>(splits));
          grad_weight_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
              go, templates.const_data_ptr<scalar_t>(), template_strides(templates),
              grad_weight.mutable_data_ptr<scalar_t>(), splits > 1 ? partial.mutable_data_ptr<acc_t>() : nullptr,
              split_length, pointers(buckets), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (splits > 1) {
            const int64_t count = grad_weight.numel();
            const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 1 << 20);
            sum_splits_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), count, splits);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }

        if (grad_templates.numel() > 0) {
          const int64_t units = g.P * g.groups * ((g.C_in_per_group + kTileM - 1) / kTileM) *
                                ((g.H * g.W + kTileN - 1) / kTileN);
          grad_templates_kernel<scalar_t>
              <<<static_cast<unsigned>(std::min<int64_t>(units, int64_t{1} << 30)), kThreads, 0, stream>>>(
                  go, weight_c.const_data_ptr<scalar_t>(), grad_templates.mutable_data_ptr<scalar_t>(),
                  buckets.order.const_data_ptr<int64_t>(), buckets.offsets.const_data_ptr<int64_t>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_templates, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pointins_ops, CUDA, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cuda);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cuda);
}

}  // namespace pointins_ops
