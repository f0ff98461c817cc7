// CPU kernels of instance_aware_conv: forward, and one backward giving grad_templates, grad_weight, grad_bias.
//
// Instances are bucketed by template (a stable counting sort), so one template's columns serve every
// instance that uses it: that sharing is what no per-instance formulation can do. Three families of kernels:
//
// * GEMM (every case with more than one input channel per group). Per template, group and tile of output
//   pixels, the columns are the template's own rows (1x1 kernel, stride 1, no padding: nothing is copied) or
//   its im2col tile, and every pass is one product on the GEMM engine (gemm.h), which packs its operands
//   straight from row pointers:
//     forward         out[rows, pixels]     = weight[rows, K]          x columns[K, pixels]   (+ bias)
//     grad_weight     grad_w[rows, K]      += grad_out[rows, pixels]   x columns[K, pixels]^T
//     grad_templates  grad_columns[K, px]   = weight[rows, K]^T        x grad_out[rows, pixels]
//                     then added back onto the template (col2im), or written directly in the 1x1 case.
//   "rows" are the (instance, output channel) pairs of one template's instances within one group.
// * Row vectors (the forward of a stride-1 convolution with a kernel larger than 1x1, float32 on AVX-512,
//   bfloat16 on AVX512-BF16; row_vectors.h): the same rows as the GEMM's, 16 to a vector, each output pixel
//   broadcast, so an output row is cut into register blocks with no position of the padded plane computed in
//   vain (the GEMM computes pitch - W_out such positions per output row: 224 for 196 outputs at 14 x 14).
// * Direct (depthwise: one input channel per group): per template and channel, a zero-padded copy of the
//   channel serves all of its instances; each output is a few shifted multiply-adds over that plane.
//
// Determinism: every work unit owns a disjoint piece of each output, and every sum runs in an order fixed by
// the shapes alone (grad_weight's long pixel reductions are split into chunks whose float32 partial sums
// are added in chunk order), so results are bitwise identical run to run and for any thread count, for a
// given micro-kernel family (gemm.h). Accumulation is in at::opmath_type (float32 for float16, bfloat16
// and float32; float64 for float64).
//
// Extra memory: per thread, the engine's packed operands and one tile of C (at most kRowBlock rows of
// kPixelTile pixels), an im2col tile, and for grad_templates one channel block of the template in the
// accumulation type; grad_weight's chunk partials add (chunks - 1) copies of grad_weight and grad_bias in the
// accumulation type when a template's pixels are split (more than kChunkPixels of them). The row-vector
// forward's per-thread buffers are bounded in row_vectors.h.
#include "../instance_aware_conv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "gemm.h"
#include "row_vectors.h"

namespace pointins_ops {
namespace {

using cpu::columns_of;
using cpu::from_acc;
using cpu::load_row;
using cpu::round_up;
using cpu::rows_of;
using cpu::Scratch;
using cpu::store_row;
using cpu::to_acc;

constexpr int64_t kRowBlock = 256;       // GEMM rows (instance x channel) per product
constexpr int64_t kPixelTile = 256;      // output pixels per column tile (fewer when K is long)
constexpr int64_t kChunkPixels = 1024;   // grad_weight reduces at most this many pixels per partial sum
constexpr int64_t kColumnRows = 256;     // rows of grad_columns (channels x taps) per grad_templates unit
constexpr int64_t kPlaneRows = 4;        // depthwise rows computed together from one padded plane
constexpr int64_t kTaskFlops = 1 << 17;  // least work (multiply-adds) worth handing to another thread
constexpr int64_t kLanes = 16;           // fixed-width partial sums for the reductions the GEMM does not do
constexpr int64_t kFarRows = 16384;      // template channels more elements apart than this are packed first ...
constexpr int64_t kFarPixelTile = 2048;  // ... and read in tiles of up to this many pixels

// The grain for at::parallel_for: small problems run on the calling thread instead of paying for a
// parallel region.
int64_t grain_for(int64_t flops_per_unit) {
  return std::max<int64_t>(1, kTaskFlops / std::max<int64_t>(flops_per_unit, 1));
}

// ---------------------------------------------------------------------------------------------------------
// Instances grouped by template: order[offsets[p] .. offsets[p + 1]) are template p's instances in
// increasing instance order; used lists the templates with at least one instance.

struct TemplateBuckets {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
  std::vector<int64_t> used;
  int64_t count(int64_t p) const { return offsets[p + 1] - offsets[p]; }
};

template <typename index_t>
void fill_buckets(const index_t* index, const ConvGeometry& g, TemplateBuckets& buckets) {
  std::vector<int64_t> counts(g.P + 1, 0);
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t p = static_cast<int64_t>(index[n]);
    TORCH_CHECK_INDEX(p >= 0 && p < g.P, "instance_aware_conv: index values must lie in [0, P) = [0, ", g.P, "); got ",
                      p, " at position ", n);
    ++counts[p + 1];
  }
  std::partial_sum(counts.begin(), counts.end(), counts.begin());
  buckets.offsets = counts;
  for (int64_t n = 0; n < g.N; ++n) buckets.order[counts[static_cast<int64_t>(index[n])]++] = n;
}

TemplateBuckets bucket_instances(const std::optional<at::Tensor>& index, const ConvGeometry& g) {
  TemplateBuckets buckets;
  buckets.order.resize(g.N);
  if (!index.has_value()) {
    buckets.offsets.resize(g.P + 1);
    std::iota(buckets.offsets.begin(), buckets.offsets.end(), int64_t{0});
    std::iota(buckets.order.begin(), buckets.order.end(), int64_t{0});
  } else {
    const at::Tensor contiguous = index->contiguous();
    if (contiguous.scalar_type() == at::kInt) {
      fill_buckets(contiguous.const_data_ptr<int32_t>(), g, buckets);
    } else {
      fill_buckets(contiguous.const_data_ptr<int64_t>(), g, buckets);
    }
  }
  for (int64_t p = 0; p < g.P; ++p) {
    if (buckets.count(p) > 0) buckets.used.push_back(p);
  }
  return buckets;
}

// The GEMM rows of one template's instances within group gi: row m is output channel
// gi * C_out_per_group + m % C_out_per_group of instance order[begin + m / C_out_per_group]. Its flat row in
// any (N * C_out, length) tensor is row(m).
struct BucketRows {
  const TemplateBuckets& buckets;
  const ConvGeometry& g;
  int64_t p, gi;

  int64_t count() const { return buckets.count(p) * g.C_out_per_group; }
  int64_t row(int64_t m) const {
    const int64_t n = buckets.order[buckets.offsets[p] + m / g.C_out_per_group];
    return n * g.C_out + gi * g.C_out_per_group + m % g.C_out_per_group;
  }
  // Pointers to rows [m0, m0 + M) of a row-major (N * C_out, length) array.
  template <typename T>
  void pointers(T* base, int64_t length, int64_t m0, int64_t M, std::vector<T*>& out) const {
    out.resize(M);
    for (int64_t m = 0; m < M; ++m) out[m] = base + row(m0 + m) * length;
  }
};

// ---------------------------------------------------------------------------------------------------------
// The GEMMs' pixel axis and their columns.
//
// With stride 1 the columns are shifted views of the template's channel planes (zero-padded copies when
// there is padding, the template itself otherwise): column row (c, kh, kw) at position q is
// plane_c[q + kh * dilation_h * pitch + kw * dilation_w], and output pixel (oh, ow) sits at q = oh * pitch + ow.
// Nothing like an im2col is built; the pitch - W_out positions past each output row ("gaps") are computed
// with the rest and dropped (grad_output is zero there). With a larger stride the columns are an im2col tile
// and q is the output pixel itself.

struct PixelSpace {
  bool planes;     // stride 1: columns are shifted plane rows
  bool padded;     // planes: the channels are copied into zero-padded planes (else the template serves)
  int64_t pitch;   // positions per output row (W_out for im2col)
  int64_t height;  // rows of a (padded) plane
  int64_t span;    // positions q in all
  int64_t W_out;

  PixelSpace(const ConvGeometry& g, const at::Tensor& templates) : W_out(g.W_out) {
    planes = g.stride_h == 1 && g.stride_w == 1;
    const bool pad = g.pad_h != 0 || g.pad_w != 0;
    padded = planes && (pad || (g.H * g.W > 1 && (templates.stride(3) != 1 || templates.stride(2) != g.W)));
    pitch = planes ? g.W + 2 * g.pad_w : g.W_out;
    height = planes ? g.H + 2 * g.pad_h : g.H_out;
    span = (g.H_out - 1) * pitch + g.W_out;
  }
  bool gaps() const { return pitch != W_out; }
  // The first output pixel at or after position q.
  int64_t pixel_at(int64_t q) const { return (q / pitch) * W_out + std::min(q % pitch, W_out); }
  // The runs of output pixels among positions [q0, q1): position q, its pixel, and the run's length.
  struct Run {
    int64_t q, pixel, length;
  };
  void runs(int64_t q0, int64_t q1, std::vector<Run>& out) const {
    out.clear();
    if (!gaps()) {  // positions are pixels: one run
      if (q1 > q0) out.push_back({q0, q0, q1 - q0});
      return;
    }
    for (int64_t q = q0; q < q1;) {
      const int64_t ow = q % pitch;
      if (ow >= W_out) {
        q += pitch - ow;
        continue;
      }
      const int64_t length = std::min(W_out - ow, q1 - q);
      out.push_back({q, (q / pitch) * W_out + ow, length});
      q += length;
    }
  }
};

// The runs of one output row, from a row of positions: dst[run.pixel + t] = src[run.q + t] (+ shift, narrowed)
// for t < run.length. A run shorter than a vector is written as a whole vector when the excess lands on the next
// run, which overwrites it, and stays inside the tile: rows of a 14-pixel-wide output still move in whole
// vectors. src must be readable a vector past every run but the last (a product's padded row is).
template <typename scalar_t, typename acc_t>
void store_runs(const acc_t* src, acc_t shift, const std::vector<PixelSpace::Run>& runs, scalar_t* dst) {
  const int64_t end = runs.empty() ? 0 : runs.back().pixel + runs.back().length;
  for (size_t r = 0; r < runs.size(); ++r) {
    const PixelSpace::Run& run = runs[r];
    if (run.length < kLanes && r + 1 < runs.size() && runs[r + 1].pixel == run.pixel + run.length &&
        run.pixel + kLanes <= end) {
      store_row(src + run.q, shift, kLanes, dst + run.pixel);
    } else {
      store_row(src + run.q, shift, run.length, dst + run.pixel);
    }
  }
}

// The adjoint, into positions [q0, q_end) whose gaps are zero: dst[run.q + t] = src[run.pixel + t] for the runs
// (dst zeroed beforehand; src a row of `pixels`). A whole-vector copy is used only when its excess ends inside
// the next run: the part in the gap is zeroed again, the next run's copy overwrites the rest.
template <typename scalar_t>
void copy_runs(const scalar_t* src, int64_t pixels, const std::vector<PixelSpace::Run>& runs, int64_t q_end,
               scalar_t* dst) {
  for (size_t r = 0; r < runs.size(); ++r) {
    const PixelSpace::Run& run = runs[r];
    if (run.length < kLanes && r + 1 < runs.size() && run.pixel + kLanes <= pixels && run.q + kLanes <= q_end &&
        run.q + kLanes <= runs[r + 1].q + runs[r + 1].length) {
      std::memcpy(dst + run.q, src + run.pixel, kLanes * sizeof(scalar_t));
      std::fill(dst + run.q + run.length, dst + std::min(run.q + kLanes, runs[r + 1].q), scalar_t(0));
    } else {
      std::copy(src + run.pixel, src + run.pixel + run.length, dst + run.q);
    }
  }
}

// Positions per column tile: at most kPixelTile, fewer for long reductions so a packed tile stays in L2; a
// span of at most 1.5 tiles is one tile. A multiple of 32 otherwise (the AMX kernel's block), so
// grad_weight's sums over positions group identically whatever the tile.
int64_t pixel_tile(const ConvGeometry& g, int64_t span, bool far) {
  // Channels far apart are read in longer runs (up to kFarPixelTile) so each run streams a few pages.
  const int64_t budget = far ? 262144 : 65536, cap = far ? kFarPixelTile : kPixelTile;
  const int64_t long_reduction = budget / std::max<int64_t>(g.reduction_per_group(), 1) / 32 * 32;
  const int64_t tile = std::max<int64_t>(32, std::min<int64_t>(cap, long_reduction));
  return span <= tile + tile / 2 ? span : tile;
}

// Output columns ow in [begin, end) read input columns iw = ow * stride + offset inside [0, size).
struct ValidRange {
  int64_t begin;
  int64_t end;
};

ValidRange valid_outputs(int64_t offset, int64_t stride, int64_t size, int64_t out_size) {
  const int64_t begin = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t last = size - 1 - offset;
  const int64_t end = last < 0 ? 0 : std::min(last / stride + 1, out_size);
  return {std::min(begin, end), end};
}

// The tiling of one template's im2col (strides above 1): rows are (channel, kh, kw) for channels
// [c_begin, c_end), columns are output pixels [j0, j0 + tile). Calls visit(c, row, t, ow_begin, ow_end, ih,
// iw_offset, valid) for each row and each run of output pixels [ow_begin, ow_end) of output row oh that starts
// at tile column t; input column iw = ow * stride_w + iw_offset, and `valid` is the sub-run whose input pixel
// lies inside the template (the rest reads padding).
template <typename Visit>
void for_each_column_run(const ConvGeometry& g, int64_t c_begin, int64_t c_end, int64_t j0, int64_t tile,
                         Visit&& visit) {
  int64_t row = 0;
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw, ++row) {
        const int64_t iw_offset = kw * g.dilation_w - g.pad_w;
        const ValidRange cols = valid_outputs(iw_offset, g.stride_w, g.W, g.W_out);
        for (int64_t t = 0; t < tile;) {
          const int64_t j = j0 + t;
          const int64_t oh = j / g.W_out;
          const int64_t ow_begin = j % g.W_out;
          const int64_t ow_end = std::min(g.W_out, ow_begin + (tile - t));
          const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dilation_h;
          ValidRange valid{ow_begin, ow_begin};
          if (ih >= 0 && ih < g.H) {
            valid.begin = std::clamp(cols.begin, ow_begin, ow_end);
            valid.end = std::clamp(cols.end, valid.begin, ow_end);
          }
          visit(c, row, t, ow_begin, ow_end, ih, iw_offset, valid);
          t += ow_end - ow_begin;
        }
      }
    }
  }
}

// columns[row * tile + t] = template[c, ih, iw] (0 in the padding) for channels [c_begin, c_end): one
// row-major tile of im2col, in the template's own type (the GEMM packers convert).
template <typename scalar_t>
void build_column_tile(const scalar_t* tpl, at::IntArrayRef strides, const ConvGeometry& g, int64_t c_begin,
                       int64_t c_end, int64_t j0, int64_t tile, scalar_t* columns) {
  const int64_t sc = strides[1], sh = strides[2], sw = strides[3];
  const int64_t input_step = g.stride_w * sw;
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t ow_end, int64_t ih,
                          int64_t iw_offset, ValidRange valid) {
                        scalar_t* out = columns + row * tile + (t - ow_begin);
                        std::fill(out + ow_begin, out + valid.begin, scalar_t(0));
                        const scalar_t* in = tpl + c * sc + ih * sh + iw_offset * sw;
                        for (int64_t ow = valid.begin; ow < valid.end; ++ow) out[ow] = in[ow * input_step];
                        std::fill(out + valid.end, out + ow_end, scalar_t(0));
                      });
}

// The adjoint of build_column_tile: grad_tpl[c - c_begin, ih, iw] += grad_columns[row * ld + t].
template <typename acc_t>
void scatter_column_tile(const acc_t* grad_columns, int64_t ld, const ConvGeometry& g, int64_t c_begin, int64_t c_end,
                         int64_t j0, int64_t tile, acc_t* grad_tpl) {
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t, int64_t ih, int64_t iw_offset,
                          ValidRange valid) {
                        if (valid.begin == valid.end) return;
                        const acc_t* in = grad_columns + row * ld + t - ow_begin;
                        acc_t* out = grad_tpl + ((c - c_begin) * g.H + ih) * g.W + iw_offset;
                        for (int64_t ow = valid.begin; ow < valid.end; ++ow) out[ow * g.stride_w] += in[ow];
                      });
}

// The column rows of template p, group gi, for positions [q0, q0 + T): pointers and the offset to add to them.
template <typename scalar_t>
struct ColumnTile {
  std::vector<const scalar_t*> rows;
  int64_t offset = 0;
  bool far = false;  // rows of a large template, far apart in memory (see cpu::Operand)
  Scratch<scalar_t> buffer;

  void build(const scalar_t* tpl_p, const at::Tensor& templates, const ConvGeometry& g, const PixelSpace& space,
             int64_t gi, int64_t q0, int64_t T) {
    const int64_t K = g.reduction_per_group(), area = g.kernel_area();
    const int64_t c_begin = gi * g.C_in_per_group;
    rows.resize(K);
    far = false;
    if (!space.planes) {
      scalar_t* data = buffer.resize(K * T);
      build_column_tile(tpl_p, templates.strides(), g, c_begin, c_begin + g.C_in_per_group, q0, T, data);
      for (int64_t k = 0; k < K; ++k) rows[k] = data + k * T;
      offset = 0;
      return;
    }
    const scalar_t* base = tpl_p + c_begin * templates.stride(1);
    int64_t channel_step = templates.stride(1);
    offset = q0;
    far = !space.padded && channel_step > kFarRows;
    if (space.padded) {  // the padded rows this tile reads, in its own buffer
      const int64_t first = q0 / space.pitch;
      const int64_t last = std::min(space.height, (q0 + T - 1) / space.pitch + (g.kH - 1) * g.dilation_h + 1);
      // Each channel's rows, then (kW - 1) * dilation_w zeros: a tile that ends in a row's gap reads that far
      // into the row after `last` (gap positions, whose products are dropped or multiplied by zero gradients).
      // Zeros, not the next channel's values or a previous call's stale ones, so a non-finite value there can
      // never turn a zero product into NaN.
      const int64_t plane = (last - first) * space.pitch + (g.kW - 1) * g.dilation_w;
      scalar_t* data = buffer.resize(g.C_in_per_group * plane);
      const int64_t sc = templates.stride(1), sh = templates.stride(2), sw = templates.stride(3);
      for (int64_t c = 0; c < g.C_in_per_group; ++c) {
        scalar_t* dst = data + c * plane;
        std::fill(dst, dst + plane, scalar_t(0));
        for (int64_t r = first; r < last; ++r) {
          const int64_t ih = r - g.pad_h;
          if (ih < 0 || ih >= g.H) continue;
          const scalar_t* src = base + c * sc + ih * sh;
          scalar_t* row = dst + (r - first) * space.pitch + g.pad_w;
          if (sw == 1) {
            std::memcpy(row, src, g.W * sizeof(scalar_t));
          } else {
            for (int64_t iw = 0; iw < g.W; ++iw) row[iw] = src[iw * sw];
          }
        }
      }
      base = data;
      channel_step = plane;
      offset = q0 - first * space.pitch;
    }
    for (int64_t c = 0, k = 0; c < g.C_in_per_group; ++c) {
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        for (int64_t kw = 0; kw < g.kW; ++kw, ++k) {
          rows[k] = base + c * channel_step + kh * g.dilation_h * space.pitch + kw * g.dilation_w;
        }
      }
    }
    (void)area;
  }
};

// grad_output rows [m0, m0 + M) of one template's instances in group gi over positions [q0, q0 + T): the rows
// themselves, or, where positions have gaps, copies with zeros in the gaps.
template <typename scalar_t>
struct GradTile {
  std::vector<const scalar_t*> rows;
  int64_t offset = 0;
  std::vector<const scalar_t*> sources;
  std::vector<PixelSpace::Run> runs;
  Scratch<scalar_t> buffer;

  void build(const scalar_t* go, const BucketRows& bucket_rows, int64_t pixels, const PixelSpace& space, int64_t m0,
             int64_t M, int64_t q0, int64_t T) {
    if (!space.gaps()) {
      bucket_rows.pointers(go, pixels, m0, M, rows);
      offset = q0;
      return;
    }
    bucket_rows.pointers(go, pixels, m0, M, sources);
    space.runs(q0, q0 + T, runs);
    scalar_t* data = buffer.resize(M * T);
    rows.resize(M);
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* dst = data + m * T;
      std::fill(dst, dst + T, scalar_t(0));
      const scalar_t* src = sources[m];
      copy_runs(src, pixels, runs, q0 + T, dst - q0);
      rows[m] = dst;
    }
    offset = 0;
  }
};

// kLanes accumulation-type values as one vector (a register or a few, whatever the instruction set), and its
// unaligned loads and stores.
template <typename acc_t>
struct LanesOf {
  typedef acc_t type __attribute__((vector_size(kLanes * sizeof(acc_t))));
};
template <typename acc_t>
using Lanes = typename LanesOf<acc_t>::type;

template <typename acc_t>
POINTINS_CONVERT_INLINE Lanes<acc_t> load_lanes(const acc_t* p) {
  Lanes<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
POINTINS_CONVERT_INLINE void store_lanes(acc_t* p, const Lanes<acc_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// A fixed tree over kLanes partial sums: level[i] + level[i + width] for width 8, 4, 2, 1, one shuffle and one
// add in registers per level (lanes at and past `width` are left over and never read again).
template <typename acc_t>
acc_t reduce_lanes(const acc_t* lanes) {
  static_assert(kLanes == 16, "the shuffles below are written for 16 lanes");
  Lanes<acc_t> level = load_lanes(lanes);
  level = level + __builtin_shufflevector(level, level, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
  level = level + __builtin_shufflevector(level, level, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
  level = level + __builtin_shufflevector(level, level, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  level = level + __builtin_shufflevector(level, level, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1);
  return level[0];
}

// The sum of x[t] over t in [begin, end): kLanes partial sums, x[t] going to lane t % kLanes, then the fixed tree
// of reduce_lanes. The order depends only on the indices, not on how a range is cut into tiles, nor on the
// instruction set. The lanes stay in registers; only a partial first and last block go through memory.
template <typename scalar_t>
at::opmath_type<scalar_t> sum_in_lanes(const scalar_t* x, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t edge[kLanes] = {};
  int64_t q = begin;
  for (; q < end && q % kLanes != 0; ++q) edge[q % kLanes] = to_acc(x[q]);
  Lanes<acc_t> sum{};
  sum += load_lanes(edge);
  for (; q + kLanes <= end; q += kLanes) {
    acc_t block[kLanes];
    load_row(x + q, kLanes, block);  // whole vectors for float32 and bfloat16
    sum += load_lanes(block);
  }
  std::fill(edge, edge + kLanes, acc_t(0));
  for (; q < end; ++q) edge[q % kLanes] = to_acc(x[q]);
  sum += load_lanes(edge);  // (+0 in the lanes without a term: a lane's sum is never -0)
  store_lanes(edge, sum);
  return reduce_lanes(edge);
}

// ---------------------------------------------------------------------------------------------------------
// GEMM kernels.

struct GemmPlan {
  PixelSpace space;
  int64_t K;       // reduction length per group: C_in_per_group * kH * kW
  int64_t pixels;  // H_out * W_out
  int64_t tile;    // positions per column tile
  int64_t tiles;
  cpu::Isa isa;

  GemmPlan(const ConvGeometry& g, const at::Tensor& templates)
      : space(g, templates),
        K(g.reduction_per_group()),
        pixels(g.output_pixels()),
        tile(pixel_tile(g, space.span, space.planes && !space.padded && templates.stride(1) > kFarRows)),
        tiles((space.span + tile - 1) / tile),
        isa(cpu::active_isa()) {}

  // Positions the forward's products compute per template and group: every tile's span (gaps included),
  // rounded up to the engine's panels of 32 columns.
  int64_t computed_positions() const {
    const int64_t last = space.span - (tiles - 1) * tile;
    return (tiles - 1) * round_up(tile, 32) + round_up(last, 32);
  }
};

template <typename scalar_t>
void forward_gemm(const at::Tensor& templates, const scalar_t* w, const scalar_t* b, scalar_t* out,
                  const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmPlan plan(g, templates);
  const PixelSpace& space = plan.space;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.groups * plan.tiles;
  const int64_t unit_flops =
      std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) * g.C_out_per_group * plan.K * plan.tile;
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    // Packing buffers are per thread and kept between calls (they grow to the largest tile seen).
    thread_local cpu::GemmScratch scratch;
    thread_local ColumnTile<scalar_t> columns;
    thread_local Scratch<acc_t> product;
    std::vector<const scalar_t*> weight_rows;
    std::vector<PixelSpace::Run> runs;
    cpu::with_isa(plan.isa, [&] {
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t p = buckets.used[unit / (g.groups * plan.tiles)];
        const int64_t gi = (unit / plan.tiles) % g.groups;
        const int64_t q0 = (unit % plan.tiles) * plan.tile;
        const int64_t T = std::min(plan.tile, space.span - q0);
        columns.build(tpl + p * templates.stride(0), templates, g, space, gi, q0, T);
        space.runs(q0, q0 + T, runs);
        const BucketRows rows{buckets, g, p, gi};
        const int64_t ldc = cpu::padded_n<scalar_t>(plan.isa, T);
        for (int64_t m0 = 0; m0 < rows.count(); m0 += kRowBlock) {
          const int64_t M = std::min(kRowBlock, rows.count() - m0);
          rows.pointers(w, plan.K, m0, M, weight_rows);
          acc_t* c = product.resize(cpu::padded_m(plan.isa, M) * ldc);
          cpu::gemm(plan.isa, rows_of(weight_rows.data()), rows_of(columns.rows.data(), columns.offset, columns.far), M,
                    T, plan.K, c, ldc, false, scratch);
          for (int64_t m = 0; m < M; ++m) {
            const int64_t row = rows.row(m0 + m);
            const acc_t shift = b ? to_acc(b[row]) : acc_t(0);
            const acc_t* src = c + m * ldc - q0;
            scalar_t* dst = out + row * plan.pixels;
            store_runs(src, shift, runs, dst);
          }
        }
      }
    });
  });
}

// The row-vector forward (row_vectors.h) where it applies: per template, group and band of output rows, the
// band's padded planes once, then the bucket's rows 64 at a time.
template <typename scalar_t>
void forward_row_vectors(const at::Tensor& templates, const scalar_t* w, const scalar_t* b, scalar_t* out,
                         const ConvGeometry& g, const TemplateBuckets& buckets) {
  using Conv = cpu::RowVectorConv<scalar_t>;
  const int64_t K = g.reduction_per_group(), pixels = g.output_pixels();
  const int64_t band = cpu::row_vector_band(g), bands = (g.H_out + band - 1) / band;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.groups * bands;
  const int64_t unit_flops = std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) *
                             g.C_out_per_group * K * band * g.W_out;
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    thread_local Conv conv;  // its buffers grow to the largest band seen and are kept between calls
    const scalar_t* weight_rows[Conv::kMaxRows];
    scalar_t* out_rows[Conv::kMaxRows];
    float shifts[Conv::kMaxRows];
    std::vector<typename Conv::Range> ahead;
    // Unit u: template p, group gi, output rows [oh0, oh1).
    const auto unit_of = [&](int64_t unit) {
      const int64_t oh0 = (unit % bands) * band;
      return std::make_tuple(buckets.used[unit / (g.groups * bands)], (unit / bands) % g.groups, oh0,
                             std::min(g.H_out, oh0 + band));
    };
    // The template rows a unit reads (the planes' rows inside the template), one range per channel.
    const auto add_template = [&](int64_t p, int64_t gi, int64_t oh0, int64_t oh1) {
      const int64_t first = std::max<int64_t>(0, oh0 - g.pad_h);
      const int64_t last = std::min<int64_t>(g.H, oh1 - 1 + (g.kH - 1) * g.dilation_h - g.pad_h + 1);
      if (first >= last) return;
      const int64_t span = (last - 1 - first) * templates.stride(2) + (g.W - 1) * templates.stride(3) + 1;
      for (int64_t c = 0; c < g.C_in_per_group; ++c) {
        ahead.push_back({tpl + p * templates.stride(0) + (gi * g.C_in_per_group + c) * templates.stride(1) +
                             first * templates.stride(2),
                         static_cast<int64_t>(span * sizeof(scalar_t))});
      }
    };
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const auto [p, gi, oh0, oh1] = unit_of(unit);
      conv.load_planes(tpl + p * templates.stride(0) + gi * g.C_in_per_group * templates.stride(1),
                       templates.stride(1), templates.stride(2), templates.stride(3), g, oh0, oh1);
      const BucketRows rows{buckets, g, p, gi};
      for (int64_t m0 = 0; m0 < rows.count(); m0 += Conv::kMaxRows) {
        const int64_t M = std::min(Conv::kMaxRows, rows.count() - m0);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = rows.row(m0 + m);
          weight_rows[m] = w + row * K;
          out_rows[m] = out + row * pixels;
          shifts[m] = b ? static_cast<float>(to_acc(b[row])) : 0.0f;
        }
        // What the next call reads: the next rows' weights, or the next unit's first rows and its template rows.
        ahead.clear();
        const auto add_weights = [&](const BucketRows& next, int64_t n0) {
          for (int64_t n = n0; n < std::min(next.count(), n0 + Conv::kMaxRows); ++n) {
            ahead.push_back({w + next.row(n) * K, static_cast<int64_t>(K * sizeof(scalar_t))});
          }
        };
        if (m0 + M < rows.count()) {
          add_weights(rows, m0 + M);
        } else if (unit + 1 < unit_end) {
          const auto [next_p, next_gi, next_oh0, next_oh1] = unit_of(unit + 1);
          add_weights(BucketRows{buckets, g, next_p, next_gi}, 0);
          add_template(next_p, next_gi, next_oh0, next_oh1);
        }
        conv.compute(weight_rows, M, shifts, out_rows, ahead);
      }
    }
  });
}

// The row-vector grad_weight (row_vectors.h) where it applies: the forward's cost rule picks the row vectors, the
// kernel is larger than 1x1 (a 1x1 grad_weight sums over pixels with no gaps), a template's output fits one
// tile, and for bfloat16 the output rows pair evenly. Per template and group: its planes once, the bucket's
// rows 64 at a time; grad_bias as the GEMM pass sums it.
constexpr int64_t kRowVectorReducePixels = 256;

bool row_vector_grad_weight_applies(const ConvGeometry& g, const at::Tensor& templates) {
  const at::ScalarType dtype = templates.scalar_type();
  return g.kernel_area() > 1 && g.output_pixels() <= kRowVectorReducePixels &&
         (dtype == at::kFloat || g.W_out % 2 == 0) &&
         cpu::row_vectors_apply(cpu::active_isa(), dtype, g, GemmPlan(g, templates).computed_positions());
}

template <typename scalar_t>
void grad_weight_row_vectors(const at::Tensor& templates, const scalar_t* go, scalar_t* gw, scalar_t* gb,
                             const ConvGeometry& g, const TemplateBuckets& buckets) {
  using Conv = cpu::RowVectorConv<scalar_t>;
  const int64_t K = g.reduction_per_group(), pixels = g.output_pixels();
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.groups;
  const int64_t unit_flops =
      std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) * g.C_out_per_group * K * pixels;
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    thread_local Conv conv;  // its buffers grow to the largest template seen and are kept between calls
    const scalar_t* grad_rows[Conv::kMaxRows];
    scalar_t* gw_rows[Conv::kMaxRows];
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t p = buckets.used[unit / g.groups], gi = unit % g.groups;
      conv.load_grad_weight_planes(tpl + p * templates.stride(0) + gi * g.C_in_per_group * templates.stride(1),
                                   templates.stride(1), templates.stride(2), templates.stride(3), g);
      const BucketRows rows{buckets, g, p, gi};
      for (int64_t m0 = 0; m0 < rows.count(); m0 += Conv::kMaxRows) {
        const int64_t M = std::min(Conv::kMaxRows, rows.count() - m0);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t row = rows.row(m0 + m);
          grad_rows[m] = go + row * pixels;
          gw_rows[m] = gw + row * K;
          if (gb) gb[row] = from_acc<scalar_t>(sum_in_lanes(go + row * pixels, 0, pixels));
        }
        conv.grad_weight(grad_rows, M, gw_rows);
      }
    }
  });
}

// Where grad_weight and grad_bias of one bucket's rows go when a unit has summed its chunk of positions: into
// the tensors (one chunk), or into that chunk's partial sums, which add_chunk_partials adds in chunk order. gb is
// null when grad_bias is not asked for: the row sums are then skipped.
template <typename scalar_t>
struct ChunkSums {
  using acc_t = at::opmath_type<scalar_t>;
  const ConvGeometry& g;
  const PixelSpace& space;
  const scalar_t* go;
  scalar_t* gw;
  scalar_t* gb;
  int64_t K, chunks, rows_total;
  std::vector<acc_t> partial_w, partial_b;

  ChunkSums(const ConvGeometry& g, const PixelSpace& space, const scalar_t* go, scalar_t* gw, scalar_t* gb, int64_t K,
            int64_t chunks)
      : g(g),
        space(space),
        go(go),
        gw(gw),
        gb(gb),
        K(K),
        chunks(chunks),
        rows_total(g.N * g.C_out),
        partial_w(chunks > 1 ? chunks * rows_total * K : 0),
        partial_b(chunks > 1 && gb != nullptr ? chunks * rows_total : 0) {}

  // Rows [m0, m0 + M) of `rows`: grad_weight from the product c (K columns; K rows when transposed), grad_bias
  // from grad_output over the output pixels of positions [q_begin, q_end), in lanes by pixel.
  void write(const BucketRows& rows, int64_t m0, int64_t M, int64_t chunk, int64_t q_begin, int64_t q_end,
             const acc_t* c, int64_t ldc, bool transposed) {
    const int64_t pixels = g.output_pixels();
    const int64_t pixel_begin = space.pixel_at(q_begin);
    const int64_t pixel_end = q_end >= space.span ? pixels : space.pixel_at(q_end);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = rows.row(m0 + m);
      acc_t* partial = chunks > 1 ? partial_w.data() + (chunk * rows_total + row) * K : nullptr;
      if (transposed) {
        if (partial) {
          for (int64_t k = 0; k < K; ++k) partial[k] = c[k * ldc + m];
        } else if (m < M / kLanes * kLanes) {  // blocks of kLanes rows: each k's kLanes values narrowed at once
          if (m % kLanes == 0) {
            scalar_t narrow[kLanes];
            for (int64_t k = 0; k < K; ++k) {
              store_row(c + k * ldc + m, acc_t(0), kLanes, narrow);
              for (int64_t i = 0; i < kLanes; ++i) gw[rows.row(m0 + m + i) * K + k] = narrow[i];
            }
          }
        } else {
          for (int64_t k = 0; k < K; ++k) gw[row * K + k] = from_acc<scalar_t>(c[k * ldc + m]);
        }
      } else if (partial) {
        std::copy(c + m * ldc, c + m * ldc + K, partial);
      } else {
        store_row(c + m * ldc, acc_t(0), K, gw + row * K);
      }
      if (gb == nullptr) continue;
      const acc_t bias_sum = sum_in_lanes(go + row * pixels, pixel_begin, pixel_end);
      if (chunks > 1) {
        partial_b[chunk * rows_total + row] = bias_sum;
      } else {
        gb[row] = from_acc<scalar_t>(bias_sum);
      }
    }
  }

  // With several chunks: grad_weight and grad_bias from the partial sums, added in chunk order.
  void finish() const {
    if (chunks == 1) return;
    at::parallel_for(0, rows_total, grain_for(chunks * K), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t k = 0; k < K; ++k) {
          acc_t sum = partial_w[row * K + k];
          for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial_w[(chunk * rows_total + row) * K + k];
          gw[row * K + k] = from_acc<scalar_t>(sum);
        }
        if (gb == nullptr) continue;
        acc_t sum = partial_b[row];
        for (int64_t chunk = 1; chunk < chunks; ++chunk) sum += partial_b[chunk * rows_total + row];
        gb[row] = from_acc<scalar_t>(sum);
      }
    });
  }
};

// grad_weight and grad_bias. Units are (template, group, block of rows, chunk of positions); a unit sums its
// chunk's tiles in position order in the accumulation type. A template with more than kChunkPixels positions
// has several chunks: their partial sums are kept and added in chunk order by a second pass.
template <typename scalar_t>
void grad_weight_gemm(const at::Tensor& templates, const scalar_t* go, scalar_t* gw, scalar_t* gb,
                      const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmPlan plan(g, templates);
  const PixelSpace& space = plan.space;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const int64_t K = plan.K;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, kChunkPixels / plan.tile);
  const int64_t chunks = (plan.tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  struct Block {  // rows [m0, m0 + M) of template p's instances in group gi
    int64_t p, gi, m0, M;
  };
  std::vector<Block> blocks;
  for (int64_t p : buckets.used) {
    for (int64_t gi = 0; gi < g.groups; ++gi) {
      const int64_t rows = buckets.count(p) * g.C_out_per_group;
      for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) blocks.push_back({p, gi, m0, std::min(kRowBlock, rows - m0)});
    }
  }
  ChunkSums<scalar_t> sums(g, space, go, gw, gb, K, chunks);
  const int64_t units = static_cast<int64_t>(blocks.size()) * chunks;
  const int64_t unit_flops = kRowBlock * K * std::min(space.span, kChunkPixels);
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    thread_local cpu::GemmScratch scratch;
    thread_local ColumnTile<scalar_t> columns;
    thread_local GradTile<scalar_t> grads;
    thread_local Scratch<acc_t> product;
    cpu::with_isa(plan.isa, [&] {
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const Block& block = blocks[unit / chunks];
        const int64_t chunk = unit % chunks;
        const BucketRows rows{buckets, g, block.p, block.gi};
        // C = grad_out x columns^T, or its transpose when the block has fewer rows than K: either way one operand
        // is read transposed, and the smaller one is.
        const bool transposed = block.M < K;
        const int64_t ldc = cpu::padded_n<scalar_t>(plan.isa, transposed ? block.M : K);
        acc_t* c = product.resize(cpu::padded_m(plan.isa, transposed ? K : block.M) * ldc);
        const int64_t first_tile = chunk * tiles_per_chunk;
        const int64_t last_tile = std::min(plan.tiles, first_tile + tiles_per_chunk);
        for (int64_t tile = first_tile; tile < last_tile; ++tile) {
          const int64_t q0 = tile * plan.tile;
          const int64_t T = std::min(plan.tile, space.span - q0);
          columns.build(tpl + block.p * templates.stride(0), templates, g, space, block.gi, q0, T);
          grads.build(go, rows, plan.pixels, space, block.m0, block.M, q0, T);
          if (transposed) {
            cpu::gemm(plan.isa, rows_of(columns.rows.data(), columns.offset),
                      columns_of(grads.rows.data(), grads.offset), K, block.M, T, c, ldc, tile > first_tile, scratch);
          } else {
            cpu::gemm(plan.isa, rows_of(grads.rows.data(), grads.offset),
                      columns_of(columns.rows.data(), columns.offset), block.M, K, T, c, ldc, tile > first_tile,
                      scratch);
          }
        }
        // grad_bias over the chunk's output pixels, then the rows of grad_weight (or the chunk's partial sums).
        sums.write(rows, block.m0, block.M, chunk, first_tile * plan.tile, last_tile * plan.tile, c, ldc, transposed);
      }
    });
  });
  sums.finish();
}

// grad_templates: units are (used template, group, block of channels[, tile of positions when the columns are
// the template's own 1x1 channels]); each sums over all of the template's instances, kRowBlock rows at a time,
// in order, then adds its grad_columns back onto the template's channels.
template <typename scalar_t>
void grad_templates_gemm(const at::Tensor& templates, const scalar_t* w, const scalar_t* go, scalar_t* gt,
                         const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmPlan plan(g, templates);
  const PixelSpace& space = plan.space;
  const int64_t area = g.kernel_area();
  const int64_t channels_per_block = std::max<int64_t>(1, std::min(g.C_in_per_group, kColumnRows / area));
  const int64_t blocks_per_group = (g.C_in_per_group + channels_per_block - 1) / channels_per_block;
  // A 1x1 kernel on unpadded planes gives grad_templates rows directly: no tile adds into another's pixels.
  const bool direct = space.planes && !space.padded && area == 1 && !space.gaps();
  const int64_t tile_units = direct ? plan.tiles : 1;
  const int64_t units_per_template = g.groups * blocks_per_group * tile_units;
  const int64_t plane = g.H * g.W, padded_plane = space.height * space.pitch;
  const int64_t unit_flops = std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) * g.C_out_per_group *
                             channels_per_block * area * space.span / tile_units;
  at::parallel_for(0, static_cast<int64_t>(buckets.used.size()) * units_per_template, grain_for(unit_flops),
                   [&](int64_t unit_begin, int64_t unit_end) {
                     cpu::GemmScratch scratch;
                     GradTile<scalar_t> grads;
                     Scratch<acc_t> product;
                     std::vector<acc_t> grad_tpl;
                     std::vector<const scalar_t*> weight_rows;
                     cpu::with_isa(plan.isa, [&] {
                       for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
                         const int64_t p = buckets.used[unit / units_per_template];
                         const int64_t within = unit % units_per_template;
                         const int64_t gi = within / (blocks_per_group * tile_units);
                         const int64_t c_local = ((within / tile_units) % blocks_per_group) * channels_per_block;
                         const int64_t channels = std::min(channels_per_block, g.C_in_per_group - c_local);
                         const int64_t c_begin = gi * g.C_in_per_group + c_local;
                         const int64_t M = channels * area;  // rows of grad_columns
                         const BucketRows rows{buckets, g, p, gi};
                         const int64_t first_tile = direct ? within % tile_units : 0;
                         const int64_t last_tile = direct ? first_tile + 1 : plan.tiles;
                         if (!direct) grad_tpl.assign(channels * (space.planes ? padded_plane : plane), acc_t(0));
                         for (int64_t tile = first_tile; tile < last_tile; ++tile) {
                           const int64_t q0 = tile * plan.tile;
                           const int64_t T = std::min(plan.tile, space.span - q0);
                           const int64_t ldc = cpu::padded_n<scalar_t>(plan.isa, T);
                           acc_t* c = product.resize(cpu::padded_m(plan.isa, M) * ldc);
                           for (int64_t r0 = 0; r0 < rows.count(); r0 += kRowBlock) {
                             const int64_t R = std::min(kRowBlock, rows.count() - r0);
                             rows.pointers(w, plan.K, r0, R, weight_rows);
                             grads.build(go, rows, plan.pixels, space, r0, R, q0, T);
                             cpu::gemm(plan.isa, columns_of(weight_rows.data(), c_local * area),
                                       rows_of(grads.rows.data(), grads.offset), M, T, R, c, ldc, r0 > 0, scratch);
                           }
                           if (direct) {
                             for (int64_t ci = 0; ci < channels; ++ci) {
                               store_row(c + ci * ldc, acc_t(0), T, gt + (p * g.C_in + c_begin + ci) * plane + q0);
                             }
                           } else if (space.planes) {  // column row (c, kh, kw) at q lands on plane position q + shift
                             for (int64_t ci = 0, k = 0; ci < channels; ++ci) {
                               for (int64_t kh = 0; kh < g.kH; ++kh) {
                                 for (int64_t kw = 0; kw < g.kW; ++kw, ++k) {
                                   acc_t* dst = grad_tpl.data() + ci * padded_plane + kh * g.dilation_h * space.pitch +
                                                kw * g.dilation_w + q0;
                                   const acc_t* src = c + k * ldc;
                                   for (int64_t t = 0; t < T; ++t) dst[t] += src[t];
                                 }
                               }
                             }
                           } else {
                             scatter_column_tile(c, ldc, g, c_begin, c_begin + channels, q0, T, grad_tpl.data());
                           }
                         }
                         if (direct) continue;
                         for (int64_t ci = 0; ci < channels; ++ci) {
                           scalar_t* dst = gt + (p * g.C_in + c_begin + ci) * plane;
                           const acc_t* src = grad_tpl.data() + ci * (space.planes ? padded_plane : plane);
                           if (space.planes) src += g.pad_h * space.pitch + g.pad_w;
                           const int64_t src_pitch = space.planes ? space.pitch : g.W;
                           for (int64_t ih = 0; ih < g.H; ++ih)
                             store_row(src + ih * src_pitch, acc_t(0), g.W, dst + ih * g.W);
                         }
                       }
                     });
                   });
}

// The whole backward in one pass, when every template's rows fit one product (kRowBlock) and every group's
// columns one grad_templates block (kColumnRows): each unit loads a tile of grad_output and of columns once and
// uses it for both products, so grad_output and the templates are read once, not twice. Units are (used
// template, group, chunk of positions); a template has several chunks only when its columns are its own 1x1
// channels (grad_templates rows are then written per tile; otherwise they accumulate over the whole template).
// Sums run in the same orders as the separate passes'.
template <typename scalar_t>
bool backward_fits_one_pass(const ConvGeometry& g, const TemplateBuckets& buckets) {
  int64_t rows = 0;
  for (int64_t p : buckets.used) rows = std::max(rows, buckets.count(p) * g.C_out_per_group);
  return rows <= kRowBlock && g.reduction_per_group() <= kColumnRows;
}

template <typename scalar_t>
void backward_gemm_fused(const at::Tensor& templates, const scalar_t* w, const scalar_t* go, scalar_t* gt, scalar_t* gw,
                         scalar_t* gb, const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmPlan plan(g, templates);
  const PixelSpace& space = plan.space;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const int64_t K = plan.K, area = g.kernel_area();
  const int64_t plane = g.H * g.W, padded_plane = space.height * space.pitch;
  const bool direct = space.planes && !space.padded && area == 1 && !space.gaps();
  const int64_t tiles_per_chunk = direct ? std::max<int64_t>(1, kChunkPixels / plan.tile) : plan.tiles;
  const int64_t chunks = (plan.tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  ChunkSums<scalar_t> sums(g, space, go, gw, gb, K, chunks);
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.groups * chunks;
  const int64_t unit_flops = 2 * std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) *
                             g.C_out_per_group * K * std::min(space.span, tiles_per_chunk * plan.tile);
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    thread_local cpu::GemmScratch scratch;
    thread_local ColumnTile<scalar_t> columns;
    thread_local GradTile<scalar_t> grads;
    thread_local Scratch<acc_t> weight_product, column_product;
    std::vector<acc_t> grad_tpl;
    std::vector<const scalar_t*> weight_rows;
    cpu::with_isa(plan.isa, [&] {
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t p = buckets.used[unit / (g.groups * chunks)];
        const int64_t gi = (unit / chunks) % g.groups;
        const int64_t chunk = unit % chunks;
        const BucketRows rows{buckets, g, p, gi};
        const int64_t R = rows.count();
        const int64_t c_begin = gi * g.C_in_per_group;
        rows.pointers(w, K, 0, R, weight_rows);
        // grad_weight as in grad_weight_gemm: transposed when the rows are fewer than K.
        const bool transposed = R < K;
        const int64_t ldw = cpu::padded_n<scalar_t>(plan.isa, transposed ? R : K);
        acc_t* cw = weight_product.resize(cpu::padded_m(plan.isa, transposed ? K : R) * ldw);
        if (!direct) grad_tpl.assign(g.C_in_per_group * (space.planes ? padded_plane : plane), acc_t(0));
        const int64_t first_tile = chunk * tiles_per_chunk;
        const int64_t last_tile = std::min(plan.tiles, first_tile + tiles_per_chunk);
        for (int64_t tile = first_tile; tile < last_tile; ++tile) {
          const int64_t q0 = tile * plan.tile;
          const int64_t T = std::min(plan.tile, space.span - q0);
          columns.build(tpl + p * templates.stride(0), templates, g, space, gi, q0, T);
          grads.build(go, rows, plan.pixels, space, 0, R, q0, T);
          if (transposed) {
            cpu::gemm(plan.isa, rows_of(columns.rows.data(), columns.offset),
                      columns_of(grads.rows.data(), grads.offset), K, R, T, cw, ldw, tile > first_tile, scratch);
          } else {
            cpu::gemm(plan.isa, rows_of(grads.rows.data(), grads.offset),
                      columns_of(columns.rows.data(), columns.offset), R, K, T, cw, ldw, tile > first_tile, scratch);
          }
          const int64_t ldc = cpu::padded_n<scalar_t>(plan.isa, T);
          acc_t* cc = column_product.resize(cpu::padded_m(plan.isa, K) * ldc);
          cpu::gemm(plan.isa, columns_of(weight_rows.data()), rows_of(grads.rows.data(), grads.offset), K, T, R, cc,
                    ldc, false, scratch);
          if (direct) {
            for (int64_t ci = 0; ci < g.C_in_per_group; ++ci) {
              store_row(cc + ci * ldc, acc_t(0), T, gt + (p * g.C_in + c_begin + ci) * plane + q0);
            }
          } else if (space.planes) {
            for (int64_t ci = 0, k = 0; ci < g.C_in_per_group; ++ci) {
              for (int64_t kh = 0; kh < g.kH; ++kh) {
                for (int64_t kw = 0; kw < g.kW; ++kw, ++k) {
                  acc_t* dst =
                      grad_tpl.data() + ci * padded_plane + kh * g.dilation_h * space.pitch + kw * g.dilation_w + q0;
                  const acc_t* src = cc + k * ldc;
                  for (int64_t t = 0; t < T; ++t) dst[t] += src[t];
                }
              }
            }
          } else {
            scatter_column_tile(cc, ldc, g, c_begin, c_begin + g.C_in_per_group, q0, T, grad_tpl.data());
          }
        }
        // grad_bias over the chunk's output pixels, then the rows of grad_weight (or the chunk's partial sums).
        sums.write(rows, 0, R, chunk, first_tile * plan.tile, last_tile * plan.tile, cw, ldw, transposed);
        if (direct) continue;
        for (int64_t ci = 0; ci < g.C_in_per_group; ++ci) {
          scalar_t* dst = gt + (p * g.C_in + c_begin + ci) * plane;
          const acc_t* src = grad_tpl.data() + ci * (space.planes ? padded_plane : plane);
          if (space.planes) src += g.pad_h * space.pitch + g.pad_w;
          const int64_t src_pitch = space.planes ? space.pitch : g.W;
          for (int64_t ih = 0; ih < g.H; ++ih) store_row(src + ih * src_pitch, acc_t(0), g.W, dst + ih * g.W);
        }
      }
    });
  });
  sums.finish();
}

// ---------------------------------------------------------------------------------------------------------
// Direct kernels for one input channel per group (depthwise and its channel multipliers).
//
// Per (used template, input channel): the channel zero-padded into a plane of pitch PW = W + 2 * pad_w; with
// stride 1 an output row oh, tap (kh, kw) reads that plane at oh * PW + ow + kh * dilation_h * PW + kw *
// dilation_w, so laying outputs out with the same pitch ("extended" rows, the last PW - W_out columns
// unused) turns every tap into one contiguous multiply-add over the span of extended outputs, shared by all of
// the template's instances. Buffers carry kLanes elements of zero slack so the loops run in whole vectors. The
// forward computes each output row's chunks of kLanes columns at their extended positions and stores them
// straight into the output, for up to kPlaneRows of the plane's rows at once, so each tap's vectors of the plane
// are loaded once for all of them (taps_to_rows); the backward works on whole extended spans.

struct PaddedPlane {
  int64_t PH, PW;  // padded height and width
  int64_t span;    // extended outputs: (H_out - 1) * PW + W_out with stride 1
  int64_t lanes;   // span rounded up to whole vectors
  bool extended;   // stride 1 in both directions

  explicit PaddedPlane(const ConvGeometry& g)
      : PH(g.H + 2 * g.pad_h),
        PW(g.W + 2 * g.pad_w),
        span((g.H_out - 1) * PW + g.W_out),
        lanes(round_up(span, kLanes)),
        extended(g.stride_h == 1 && g.stride_w == 1) {}

  int64_t size() const { return PH * PW + kLanes; }  // with slack: a shifted whole-vector read stays inside
  int64_t tap_offset(const ConvGeometry& g, int64_t kh, int64_t kw) const {
    return kh * g.dilation_h * PW + kw * g.dilation_w;
  }
  int64_t input_offset(const ConvGeometry& g, int64_t oh, int64_t ow) const {  // tap (0, 0) of output (oh, ow)
    return oh * g.stride_h * PW + ow * g.stride_w;
  }
  std::vector<int64_t> tap_offsets(const ConvGeometry& g) const {  // by tap kh * kW + kw, increasing
    std::vector<int64_t> offsets;
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw) offsets.push_back(tap_offset(g, kh, kw));
    }
    return offsets;
  }
};

// One past the last element of t's data (strides are never negative): whole-vector reads that end there stay
// inside the tensor.
template <typename scalar_t>
const scalar_t* data_end(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return t.const_data_ptr<scalar_t>() + (t.numel() == 0 ? 0 : last + 1);
}

// dst[t] = to_acc(src[t]) for t < n and 0 for t in [n, round_up(n, kLanes)), in whole vectors. The last vector
// reads up to kLanes - 1 elements past src[n - 1] when that stays before `end` (they are replaced by zeros), else
// element by element.
template <typename scalar_t, typename acc_t>
POINTINS_CONVERT_INLINE void widen_padded_row(const scalar_t* src, int64_t n, const scalar_t* end, acc_t* dst) {
  constexpr bool vectors = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
  int64_t t = 0;
  if constexpr (vectors) {
    const auto widen = [&](int64_t at) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        return load_lanes(src + at);
      } else {
        cpu::HalfBlock bits;
        std::memcpy(&bits, src + at, sizeof(bits));
        cpu::FloatBlock wide;
        cpu::widen_lanes(bits, wide);
        return wide;
      }
    };
    for (; t + kLanes <= n; t += kLanes) store_lanes(dst + t, widen(t));
    if (t < n && end - (src + t) >= kLanes) {
      const cpu::MaskBlock lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
      store_lanes(dst + t, lane < static_cast<int32_t>(n - t) ? widen(t) : Lanes<acc_t>{});
      return;
    }
  }
  for (; t < n; ++t) dst[t] = to_acc(src[t]);
  for (; t < round_up(n, kLanes); ++t) dst[t] = acc_t(0);
}

// The channel zero-padded into the plane; `end` bounds the whole-vector reads of widen_padded_row (rows are
// written in order, so a row's excess zeros land in the padding or where the next row is written after it).
template <typename scalar_t, typename acc_t>
void load_padded(const scalar_t* channel, int64_t sh, int64_t sw, const ConvGeometry& g, const PaddedPlane& plane,
                 const scalar_t* end, acc_t* dst) {
  std::fill(dst, dst + plane.size(), acc_t(0));
  for (int64_t ih = 0; ih < g.H; ++ih) {
    acc_t* row = dst + (ih + g.pad_h) * plane.PW + g.pad_w;
    if (sw == 1) {
      widen_padded_row(channel + ih * sh, g.W, end, row);
    } else {
      for (int64_t iw = 0; iw < g.W; ++iw) row[iw] = to_acc(channel[ih * sh + iw * sw]);
    }
  }
}

// The extended-row loops below run over whole vectors: per vector of positions, every tap's term is summed in
// registers and the result stored once (the planes, a few KiB, stay in L1). Each element still sees its taps
// in tap order, so the bits are those of a tap-by-tap loop.

// out[x] = init[x] + sum over taps t of weights[t] * src[x + direction * offsets[t]] for x in [begin, end) (whole
// vectors). Four vectors at a time, so four independent multiply-add chains hide the instruction's latency. out
// may be init.
template <typename acc_t>
void taps_multiply_add(const acc_t* src, const int64_t* offsets, int64_t direction, const acc_t* weights, int64_t area,
                       const acc_t* init, int64_t begin, int64_t end, acc_t* out) {
  int64_t x = begin;
  for (; x + 4 * kLanes <= end; x += 4 * kLanes) {
    Lanes<acc_t> s0 = load_lanes(init + x), s1 = load_lanes(init + x + kLanes), s2 = load_lanes(init + x + 2 * kLanes),
                 s3 = load_lanes(init + x + 3 * kLanes);
    for (int64_t t = 0; t < area; ++t) {
      const acc_t* from = src + x + direction * offsets[t];
      s0 += load_lanes(from) * weights[t];
      s1 += load_lanes(from + kLanes) * weights[t];
      s2 += load_lanes(from + 2 * kLanes) * weights[t];
      s3 += load_lanes(from + 3 * kLanes) * weights[t];
    }
    store_lanes(out + x, s0);
    store_lanes(out + x + kLanes, s1);
    store_lanes(out + x + 2 * kLanes, s2);
    store_lanes(out + x + 3 * kLanes, s3);
  }
  for (; x < end; x += kLanes) {
    Lanes<acc_t> sum = load_lanes(init + x);
    for (int64_t t = 0; t < area; ++t) sum += load_lanes(src + x + direction * offsets[t]) * weights[t];
    store_lanes(out + x, sum);
  }
}

// One output chunk narrowed into its place: dst[at + t] = v[t] for t < min(kLanes, pixels - at), written as a
// whole vector when it ends inside the plane (its excess lands where a later chunk of the row writes).
template <typename scalar_t, typename acc_t>
POINTINS_CONVERT_INLINE void put_chunk(Lanes<acc_t> v, int64_t at, int64_t pixels, scalar_t* dst) {
  const int64_t n = std::min<int64_t>(kLanes, pixels - at);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n == kLanes) return store_lanes(dst + at, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    cpu::HalfBlock bits;
    cpu::narrow_lanes(v, bits);
    if (n == kLanes) {  // a fixed-size copy (one store), not a call to memcpy
      std::memcpy(dst + at, &bits, sizeof(bits));
    } else {
      std::memcpy(dst + at, &bits, n * sizeof(scalar_t));
    }
    return;
  }
  acc_t buffer[kLanes];
  store_lanes(buffer, v);
  store_row(buffer, acc_t(0), n, dst + at);
}

// C chunks of R rows sharing one plane (R <= 4, C <= 2): row r's chunk j is shifts[r] + sum over taps t of
// weights[r * area + t] * src[from[j] + offsets[t]], taps in order. Each tap's C vectors of the plane are loaded
// once for all R rows, and the R * C sums are independent multiply-add chains that hide the instruction's
// latency. The sums are named vectors, not an array (which the compiler leaves on the stack), and 8 of them
// at most: with 16, GCC spilled some inside the loop.
template <int R, int C, typename scalar_t, typename acc_t>
POINTINS_CONVERT_INLINE void taps_block(const acc_t* const* from, const int64_t* offsets, const acc_t* weights,
                                        int64_t area, const acc_t* shifts, const int64_t* at, int64_t pixels,
                                        scalar_t* const* dst) {
  static_assert(R >= 1 && R <= kPlaneRows && (C == 1 || C == 2), "blocks of up to 4 rows and 2 chunks");
  using V = Lanes<acc_t>;
  V s00{}, s01{}, s10{}, s11{}, s20{}, s21{}, s30{}, s31{};
  const auto each_row = [&](const auto& visit) {  // visit(row r, its sums)
    visit(0, s00, s01);
    if constexpr (R > 1) visit(1, s10, s11);
    if constexpr (R > 2) visit(2, s20, s21);
    if constexpr (R > 3) visit(3, s30, s31);
  };
  each_row([&](int r, V& c0, V& c1) {
    c0 = V{} + shifts[r];
    if constexpr (C > 1) c1 = c0;
  });
  for (int64_t t = 0; t < area; ++t) {
    const int64_t o = offsets[t];
    const V x0 = load_lanes(from[0] + o), x1 = C > 1 ? load_lanes(from[1] + o) : V{};
    each_row([&](int r, V& c0, V& c1) {
      const acc_t weight = weights[r * area + t];
      c0 += x0 * weight;
      if constexpr (C > 1) c1 += x1 * weight;
    });
  }
  each_row([&](int r, V c0, V c1) {
    put_chunk<scalar_t, acc_t>(c0, at[0], pixels, dst[r]);
    if constexpr (C > 1) put_chunk<scalar_t, acc_t>(c1, at[1], pixels, dst[r]);
  });
}

// The forward's extended-row loop for R rows (instances or channel multipliers) of one padded plane, written
// straight into their output planes: dst[r][oh * W_out + ow] = narrowed (shifts[r] + sum over taps t of
// weights[r * area + t] * src[oh * PW + ow + offsets[t]]), taps in order, in chunks of kLanes output columns of
// one output row (a row's last chunk also computes positions past it, in the gap and the next row, whose results
// are dropped; the reads stay inside the padded plane and its slack). Two chunks at a time, then one. Each row's
// chunks are stored in increasing order (put_chunk). No extended buffer and no second pass over it; every
// element's sum is the same whatever R is.
template <int R, typename scalar_t, typename acc_t>
void taps_to_rows(const acc_t* src, const int64_t* offsets, const acc_t* weights, int64_t area, const acc_t* shifts,
                  int64_t PW, int64_t H_out, int64_t W_out, scalar_t* const* dst) {
  const int64_t per_row = (W_out + kLanes - 1) / kLanes, chunks = H_out * per_row, pixels = H_out * W_out;
  const acc_t* from[2];
  int64_t at[2];
  const auto locate = [&](int64_t k, int count) {
    for (int j = 0; j < count; ++j) {
      from[j] = src + (k + j) / per_row * PW + (k + j) % per_row * kLanes;
      at[j] = (k + j) / per_row * W_out + (k + j) % per_row * kLanes;
    }
  };
  int64_t k = 0;
  for (; k + 2 <= chunks; k += 2) {
    locate(k, 2);
    taps_block<R, 2>(from, offsets, weights, area, shifts, at, pixels, dst);
  }
  for (; k < chunks; ++k) {
    locate(k, 1);
    taps_block<R, 1>(from, offsets, weights, area, shifts, at, pixels, dst);
  }
}

// out[t] = sum over q < lanes of grad[q] * padded[q + offsets[t]] for Taps taps, in lanes by q (grad read once
// for all of them), then the fixed tree of reduce_lanes.
template <int64_t Taps, typename acc_t>
void tap_dots(const acc_t* grad, const acc_t* padded, const int64_t* offsets, int64_t lanes, acc_t* out) {
  Lanes<acc_t> sums[Taps] = {};
  for (int64_t q = 0; q < lanes; q += kLanes) {
    const Lanes<acc_t> x = load_lanes(grad + q);
    for (int64_t t = 0; t < Taps; ++t) sums[t] += x * load_lanes(padded + offsets[t] + q);
  }
  for (int64_t t = 0; t < Taps; ++t) {
    acc_t lanes_of_t[kLanes];
    store_lanes(lanes_of_t, sums[t]);
    out[t] = reduce_lanes(lanes_of_t);
  }
}

// grad_weight of one row: the taps in register blocks of 9 (a 3x3 kernel is one block), then one at a time.
template <typename acc_t>
void taps_grad_weight(const acc_t* grad, const acc_t* padded, const int64_t* offsets, int64_t area, int64_t lanes,
                      acc_t* out) {
  int64_t t = 0;
  for (; t + 9 <= area; t += 9) tap_dots<9>(grad, padded, offsets + t, lanes, out + t);
  for (; t < area; ++t) tap_dots<1>(grad, padded, offsets + t, lanes, out + t);
}

template <typename scalar_t>
void forward_direct(const at::Tensor& templates, const scalar_t* w, const scalar_t* b, scalar_t* out,
                    const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedPlane plane(g);
  const int64_t area = g.kernel_area(), pixels = g.output_pixels(), multiplier = g.C_out_per_group;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const scalar_t* tpl_end = data_end<scalar_t>(templates);
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.C_in;
  const int64_t unit_flops =
      std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) * multiplier * area * pixels;
  const std::vector<int64_t> offsets = plane.tap_offsets(g);
  const cpu::Isa isa = cpu::active_isa();
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    // The plane starts on a cache line: with a pitch of whole lines, every tap kw = 0 reads whole lines.
    std::vector<acc_t> storage(plane.size() + 64 / sizeof(acc_t)), acc(plane.extended ? 0 : pixels),
        tap_weights(kPlaneRows * area);
    const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(storage.data());
    acc_t* padded = reinterpret_cast<acc_t*>((first + 63) & ~std::uintptr_t{63});
    acc_t shifts[kPlaneRows];
    scalar_t* dsts[kPlaneRows];
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      const int64_t p = buckets.used[unit / g.C_in];
      const int64_t c = unit % g.C_in;
      cpu::with_isa(isa, [&] {
        load_padded(tpl + p * templates.stride(0) + c * templates.stride(1), templates.stride(2),
                    templates.stride(3), g, plane, tpl_end, padded);
      });
      // The plane's rows: output channel c * multiplier + m % multiplier of the bucket's instance m / multiplier.
      const int64_t count = (buckets.offsets[p + 1] - buckets.offsets[p]) * multiplier;
      const auto row_of = [&](int64_t m) {
        return buckets.order[buckets.offsets[p] + m / multiplier] * g.C_out + c * multiplier + m % multiplier;
      };
      if (!plane.extended) {
        cpu::with_isa(isa, [&] {
          for (int64_t m = 0; m < count; ++m) {
            const int64_t row = row_of(m);
            const scalar_t* taps = w + row * area;
            const acc_t shift = b ? to_acc(b[row]) : acc_t(0);
            for (int64_t oh = 0; oh < g.H_out; ++oh) {
              for (int64_t ow = 0; ow < g.W_out; ++ow) {
                acc_t sum = shift;
                const acc_t* src = padded + plane.input_offset(g, oh, ow);
                for (int64_t kh = 0; kh < g.kH; ++kh) {
                  for (int64_t kw = 0; kw < g.kW; ++kw) {
                    sum += to_acc(taps[kh * g.kW + kw]) * src[plane.tap_offset(g, kh, kw)];
                  }
                }
                acc[oh * g.W_out + ow] = sum;
              }
            }
            store_row(acc.data(), acc_t(0), pixels, out + row * pixels);
          }
        });
        continue;
      }
      // kPlaneRows rows at a time. Each block is its own call into the instruction set's code: a small function
      // whose multiply-add loop keeps its sums in registers (inside one function with the whole unit loop, the
      // compiler spilled them).
      for (int64_t m0 = 0; m0 < count; m0 += kPlaneRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kPlaneRows, count - m0));
        for (int r = 0; r < rows; ++r) {
          const int64_t row = row_of(m0 + r);
          for (int64_t t = 0; t < area; ++t) tap_weights[r * area + t] = to_acc(w[row * area + t]);
          shifts[r] = b ? to_acc(b[row]) : acc_t(0);
          dsts[r] = out + row * pixels;
        }
        cpu::with_isa(isa, [&] {
          const auto run = [&](auto rows_constant) {
            taps_to_rows<decltype(rows_constant)::value>(padded, offsets.data(), tap_weights.data(), area, shifts,
                                                         plane.PW, g.H_out, g.W_out, dsts);
          };
          switch (rows) {
            case 4: run(std::integral_constant<int, 4>{}); break;
            case 3: run(std::integral_constant<int, 3>{}); break;
            case 2: run(std::integral_constant<int, 2>{}); break;
            default: run(std::integral_constant<int, 1>{}); break;
          }
        });
      }
    }
  });
}

template <typename scalar_t>
void backward_direct(const at::Tensor& templates, const scalar_t* w, const scalar_t* go, scalar_t* gt, scalar_t* gw,
                     scalar_t* gb, const ConvGeometry& g, const TemplateBuckets& buckets) {
  using acc_t = at::opmath_type<scalar_t>;
  const PaddedPlane plane(g);
  const int64_t area = g.kernel_area(), pixels = g.output_pixels(), multiplier = g.C_out_per_group;
  const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
  const scalar_t* tpl_end = data_end<scalar_t>(templates);
  const scalar_t* go_end = go + g.N * g.C_out * pixels;  // grad_output is contiguous here
  const int64_t units = static_cast<int64_t>(buckets.used.size()) * g.C_in;
  const int64_t unit_flops =
      std::max<int64_t>(1, g.N / std::max<int64_t>(buckets.used.size(), 1)) * multiplier * area * pixels * 2;
  const std::vector<int64_t> offsets = plane.tap_offsets(g);
  const int64_t lead = offsets.empty() ? 0 : offsets.back();  // grad_output's rows start this far into their buffer
  const cpu::Isa isa = cpu::active_isa();
  at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
    std::vector<acc_t> padded(plane.size()), grad_padded(plane.size()), tap_weights(area);
    std::vector<acc_t> grad(plane.extended ? lead + plane.size() : 0), row_values(round_up(pixels, kLanes));
    const acc_t* values_end = row_values.data() + row_values.size();
    acc_t lanes[kLanes];
    cpu::with_isa(isa, [&] {
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const int64_t p = buckets.used[unit / g.C_in];
        const int64_t c = unit % g.C_in;
        load_padded(tpl + p * templates.stride(0) + c * templates.stride(1), templates.stride(2), templates.stride(3),
                    g, plane, tpl_end, padded.data());
        std::fill(grad_padded.begin(), grad_padded.end(), acc_t(0));
        for (int64_t i = buckets.offsets[p]; i < buckets.offsets[p + 1]; ++i) {
          for (int64_t j = 0; j < multiplier; ++j) {
            const int64_t row = buckets.order[i] * g.C_out + c * multiplier + j;
            const scalar_t* taps = w + row * area;
            // The row widened: straight into extended rows when it is only needed there, else first into
            // row_values, where grad_bias (when asked for) sums it in lanes by pixel (zeros past its end), then in
            // a fixed tree.
            const bool widened_in_place = plane.extended && gb == nullptr;
            if (!widened_in_place) {
              std::fill(row_values.begin() + pixels, row_values.end(), acc_t(0));
              load_row(go + row * pixels, pixels, row_values.data());
            }
            if (gb != nullptr) {
              gb[row] = from_acc<scalar_t>(sum_in_lanes(row_values.data(), 0, static_cast<int64_t>(row_values.size())));
            }
            if (plane.extended) {
              // grad_output in extended rows (gaps and slack zero): per tap one dot product (grad_weight) and one
              // multiply-add back onto the padded plane (grad_templates).
              // The rows go to the same places for every row of the bucket, so the gaps stay zero.
              for (int64_t oh = 0; oh < g.H_out; ++oh) {
                acc_t* to = grad.data() + lead + oh * plane.PW;
                // Whole vectors; a row's zeroed excess lands in its gap or on the next row, written after it.
                if (widened_in_place) {
                  widen_padded_row(go + row * pixels + oh * g.W_out, g.W_out, go_end, to);
                } else {
                  widen_padded_row(row_values.data() + oh * g.W_out, g.W_out, values_end, to);
                }
              }
              taps_grad_weight(grad.data() + lead, padded.data(), offsets.data(), area, plane.lanes,
                               tap_weights.data());
              for (int64_t t = 0; t < area; ++t) {
                gw[row * area + t] = from_acc<scalar_t>(tap_weights[t]);
                tap_weights[t] = to_acc(taps[t]);
              }
              // grad_templates, added into the padded plane's interior rows: grad_padded[x] += sum over taps t of
              // weights[t] * grad[lead + x - offsets[t]], every read inside the buffer (zeros around the rows).
              const int64_t begin = g.pad_h * plane.PW;
              taps_multiply_add<acc_t>(grad.data() + lead, offsets.data(), -1, tap_weights.data(), area,
                                       grad_padded.data(), begin, begin + round_up(g.H * plane.PW, kLanes),
                                       grad_padded.data());
            } else {
              for (int64_t kh = 0; kh < g.kH; ++kh) {
                for (int64_t kw = 0; kw < g.kW; ++kw) {
                  const int64_t shift = plane.tap_offset(g, kh, kw);
                  const acc_t weight = to_acc(taps[kh * g.kW + kw]);
                  std::fill(lanes, lanes + kLanes, acc_t(0));
                  for (int64_t oh = 0; oh < g.H_out; ++oh) {
                    for (int64_t ow = 0; ow < g.W_out; ++ow) {
                      const int64_t at = plane.input_offset(g, oh, ow) + shift;
                      const acc_t grad_value = row_values[oh * g.W_out + ow];
                      lanes[(oh * g.W_out + ow) % kLanes] += grad_value * padded[at];
                      grad_padded[at] += weight * grad_value;
                    }
                  }
                  gw[row * area + kh * g.kW + kw] = from_acc<scalar_t>(reduce_lanes(lanes));
                }
              }
            }
          }
        }
        // The plane's interior narrowed into grad_templates in whole vectors (put_chunk: a row's excess lands on
        // the next row, written after it; the plane's last vector is cut to fit).
        scalar_t* dst = gt + (p * g.C_in + c) * g.H * g.W;
        for (int64_t ih = 0; ih < g.H; ++ih) {
          const acc_t* from = grad_padded.data() + (ih + g.pad_h) * plane.PW + g.pad_w;
          for (int64_t iw = 0; iw < g.W; iw += kLanes) {
            put_chunk<scalar_t, acc_t>(load_lanes(from + iw), ih * g.W + iw, g.H * g.W, dst);
          }
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// The registered kernels.

bool is_direct_case(const ConvGeometry& g) { return g.C_in_per_group == 1; }

at::Tensor instance_aware_conv_cpu(const at::Tensor& templates, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, bias, index, stride, padding, dilation, groups);
  const TemplateBuckets buckets = bucket_instances(index, g);
  at::Tensor output = at::empty({g.N, g.C_out, g.H_out, g.W_out}, templates.options());
  if (output.numel() == 0) return output;
  if (g.C_in == 0) {  // empty reductions: the output is the bias
    return bias.has_value() ? output.copy_(bias->view({g.N, g.C_out, 1, 1}).expand_as(output)) : output.zero_();
  }
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_cpu", [&] {
    const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
    const scalar_t* b = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    if (is_direct_case(g)) {
      forward_direct(templates, w, b, out, g, buckets);
      return;
    }
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (cpu::row_vectors_apply(cpu::active_isa(), templates.scalar_type(), g,
                                 GemmPlan(g, templates).computed_positions())) {
        forward_row_vectors(templates, w, b, out, g, buckets);
        return;
      }
    }
    forward_gemm(templates, w, b, out, g, buckets);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& templates, const at::Tensor& weight,
    const std::optional<at::Tensor>& index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool compute_grad_bias) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, std::nullopt, index, stride, padding, dilation, groups);
  check_grad_output(grad_output, templates, g);
  const TemplateBuckets buckets = bucket_instances(index, g);
  at::Tensor grad_templates = at::empty({g.P, g.C_in, g.H, g.W}, templates.options());
  at::Tensor grad_weight = at::empty({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options());
  at::Tensor grad_bias = at::empty(grad_bias_shape(g, compute_grad_bias), weight.options());
  if (g.N == 0 || g.C_out == 0) return {grad_templates.zero_(), grad_weight, grad_bias};  // nothing flows back
  if (g.C_in == 0) {
    return {grad_templates, grad_weight, compute_grad_bias ? grad_bias.copy_(grad_output.sum({2, 3})) : grad_bias};
  }
  const at::Tensor grad_out = grad_output.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_backward_cpu",
                                  [&] {
                                    const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
                                    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
                                    scalar_t* gt = grad_templates.mutable_data_ptr<scalar_t>();
                                    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
                                    scalar_t* gb = compute_grad_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
                                    // Templates no instance uses get zeros; every other element is written exactly once
                                    // below.
                                    const int64_t template_size = g.C_in * g.H * g.W;
                                    for (int64_t p = 0; p < g.P; ++p) {
                                      if (buckets.count(p) == 0)
                                        std::fill(gt + p * template_size, gt + (p + 1) * template_size, scalar_t(0));
                                    }
                                    if (is_direct_case(g)) {
                                      backward_direct(templates, w, go, gt, gw, gb, g, buckets);
                                      return;
                                    }
                                    if constexpr (std::is_same_v<scalar_t, float> ||
                                                  std::is_same_v<scalar_t, c10::BFloat16>) {
                                      if (row_vector_grad_weight_applies(g, templates)) {
                                        grad_templates_gemm(templates, w, go, gt, g, buckets);
                                        grad_weight_row_vectors(templates, go, gw, gb, g, buckets);
                                        return;
                                      }
                                    }
                                    if (backward_fits_one_pass<scalar_t>(g, buckets)) {
                                      backward_gemm_fused(templates, w, go, gt, gw, gb, g, buckets);
                                    } else {
                                      grad_weight_gemm(templates, go, gw, gb, g, buckets);
                                      grad_templates_gemm(templates, w, go, gt, g, buckets);
                                    }
                                  });
  return {grad_templates, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pointins_ops, CPU, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cpu);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cpu);
}

}  // namespace pointins_ops
