// CPU kernels of instance_aware_conv: forward, and one backward giving grad_templates, grad_weight, grad_bias.
//
// Instances are bucketed by template (a stable counting sort), so each template's columns (its im2col,
// built one tile of output pixels at a time, never for the whole template) serve every instance that uses
// it, and every pass is a small GEMM on those tiles (tile_gemm.h):
//   forward         out[instances' rows, pixels]   = weight[rows, K]            x columns[K, pixels]
//   grad_weight     grad_w[rows, K]               += grad_out[rows, pixels]     x columns[K, pixels]^T
//   grad_templates  grad_columns[K, pixels]        = weight[rows, K]^T          x grad_out[rows, pixels]
//                   then scattered back onto the template (col2im).
// Each work unit owns a disjoint piece of every output it writes and sums in a fixed order, so results
// are bitwise identical run to run and for any thread count. Accumulation is in at::opmath_type (float32
// for float16/bfloat16/float32, float64 for float64). Extra memory: per-thread tiles in the forward; in
// the backward also one unit's slice of grad_weight / grad_templates in the accumulation type.
#include "../instance_aware_conv.h"
#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace pointins_ops {
namespace {

constexpr int64_t kPixelTile = 256;         // output pixels per column tile
constexpr int64_t kInstancesPerChunk = 8;   // instances of one template handled by one work unit
constexpr int64_t kGradColumnRows = 72;     // rows (channel x kernel tap) of one grad_templates work unit
constexpr int64_t kReductionRows = 256;     // grad_output rows gathered at once for grad_templates
constexpr int64_t kTaskFlops = 1 << 18;     // least work (multiply-adds) worth handing to another thread

// The grain for at::parallel_for: small problems run on the calling thread instead of paying for a
// parallel region (whose barrier costs more than the work when the other cores are busy).
int64_t grain_for(int64_t flops_per_unit) { return std::max<int64_t>(1, kTaskFlops / std::max<int64_t>(flops_per_unit, 1)); }

// Instances grouped by template: order[offsets[p] .. offsets[p + 1]) are template p's instances in
// increasing instance order.
struct TemplateBuckets {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

template <typename index_t>
void fill_buckets(const index_t* index, const ConvGeometry& g, TemplateBuckets& buckets) {
  std::vector<int64_t> counts(g.P + 1, 0);
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t p = static_cast<int64_t>(index[n]);
    TORCH_CHECK_INDEX(p >= 0 && p < g.P, "instance_aware_conv: index values must lie in [0, P) = [0, ", g.P,
                      "); got ", p, " at position ", n);
    ++counts[p + 1];
  }
  std::partial_sum(counts.begin(), counts.end(), counts.begin());
  buckets.offsets = counts;
  for (int64_t n = 0; n < g.N; ++n) {
    buckets.order[counts[static_cast<int64_t>(index[n])]++] = n;
  }
}

TemplateBuckets bucket_instances(const std::optional<at::Tensor>& index, const ConvGeometry& g) {
  TemplateBuckets buckets;
  buckets.order.resize(g.N);
  if (!index.has_value()) {
    buckets.offsets.resize(g.P + 1);
    std::iota(buckets.offsets.begin(), buckets.offsets.end(), int64_t{0});
    std::iota(buckets.order.begin(), buckets.order.end(), int64_t{0});
    return buckets;
  }
  const at::Tensor contiguous = index->contiguous();
  if (contiguous.scalar_type() == at::kInt) {
    fill_buckets(contiguous.data_ptr<int32_t>(), g, buckets);
  } else {
    fill_buckets(contiguous.data_ptr<int64_t>(), g, buckets);
  }
  return buckets;
}

// A run of at most kInstancesPerChunk instances that share one template: positions [begin, end) of order.
struct InstanceChunk {
  int64_t template_id;
  int64_t begin;
  int64_t end;
};

std::vector<InstanceChunk> chunk_instances(const TemplateBuckets& buckets, int64_t P) {
  std::vector<InstanceChunk> chunks;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t begin = buckets.offsets[p]; begin < buckets.offsets[p + 1]; begin += kInstancesPerChunk) {
      chunks.push_back({p, begin, std::min(begin + kInstancesPerChunk, buckets.offsets[p + 1])});
    }
  }
  return chunks;
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

// The tiling of one template's im2col: rows are (channel, kh, kw) for channels [c_begin, c_end), columns
// are output pixels [j0, j0 + tile). Calls visit(c, row, t, ow_begin, ow_end, ih, iw_offset, valid) for each
// row and each run of output pixels [ow_begin, ow_end) of output row oh that starts at tile column t; input
// column iw = ow * stride_w + iw_offset, and `valid` is the sub-run whose input pixel lies inside the
// template (the rest reads padding).
template <typename Visit>
void for_each_column_run(const ConvGeometry& g, int64_t c_begin, int64_t c_end, int64_t j0, int64_t tile,
                         Visit&& visit) {
  int64_t row = 0;
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t kh = 0; kh < g.kH; ++kh) {
      for (int64_t kw = 0; kw < g.kW; ++kw, ++row) {
        const ValidRange cols = valid_outputs(kw * g.dilation_w - g.pad_w, g.stride_w, g.W, g.W_out);
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
          visit(c, row, t, ow_begin, ow_end, ih, kw * g.dilation_w - g.pad_w, valid);
          t += ow_end - ow_begin;
        }
      }
    }
  }
}


// columns[row * row_step + t * column_step] = template[c, ih, iw] (0 in the padding) for t < tile: the tile
// of im2col, stored row-major (column_step 1) or transposed (row_step 1).
template <typename scalar_t, typename acc_t>
void build_column_tile(const scalar_t* tpl, at::IntArrayRef strides, const ConvGeometry& g, int64_t c_begin,
                       int64_t c_end, int64_t j0, int64_t tile, int64_t row_step, int64_t column_step, acc_t* columns) {
  const int64_t sc = strides[1], sh = strides[2], sw = strides[3];
  const int64_t input_step = g.stride_w * sw;
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t ow_end, int64_t ih,
                          int64_t iw_offset, ValidRange valid) {
                        acc_t* out = columns + row * row_step + (t - ow_begin) * column_step;
                        for (int64_t ow = ow_begin; ow < valid.begin; ++ow) out[ow * column_step] = acc_t(0);
                        if (valid.begin < valid.end) {
                          const scalar_t* in = tpl + c * sc + ih * sh + iw_offset * sw;
                          if (column_step == 1 && input_step == 1) {  // the common case, vectorized
                            for (int64_t ow = valid.begin; ow < valid.end; ++ow) out[ow] = static_cast<acc_t>(in[ow]);
                          } else {
                            for (int64_t ow = valid.begin; ow < valid.end; ++ow) {
                              out[ow * column_step] = static_cast<acc_t>(in[ow * input_step]);
                            }
                          }
                        }
                        for (int64_t ow = valid.end; ow < ow_end; ++ow) out[ow * column_step] = acc_t(0);
                      });
}

// The adjoint of build_column_tile (row-major): grad_tpl[c - c_begin, ih, iw] += grad_columns[row * ld + t].
template <typename acc_t>
void scatter_column_tile(const acc_t* grad_columns, const ConvGeometry& g, int64_t c_begin, int64_t c_end, int64_t j0,
                         int64_t tile, int64_t ld, acc_t* grad_tpl) {
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t, int64_t ih, int64_t iw_offset,
                          ValidRange valid) {
                        if (valid.begin == valid.end) return;
                        const acc_t* in = grad_columns + row * ld + t - ow_begin;
                        acc_t* out = grad_tpl + ((c - c_begin) * g.H + ih) * g.W + iw_offset;
                        for (int64_t ow = valid.begin; ow < valid.end; ++ow) out[ow * g.stride_w] += in[ow];
                      });
}

// The GEMM rows of some instances of one template: row m is output channel first_channel + m % channels of
// instance order[begin + m / channels]. row_pointers() gives, for each m, that row of a (N * C_out, length)
// tensor, so the packers never divide.
struct InstanceRows {
  const int64_t* order;
  int64_t begin;
  int64_t count;
  int64_t first_channel;
  int64_t channels;
  int64_t C_out;

  int64_t rows() const { return count * channels; }
  int64_t tensor_row(int64_t m) const { return order[begin + m / channels] * C_out + first_channel + m % channels; }

  template <typename T>
  void row_pointers(const T* base, int64_t length, int64_t offset, std::vector<const T*>& out) const {
    out.resize(rows());
    int64_t m = 0;
    for (int64_t i = 0; i < count; ++i) {
      const T* first = base + (order[begin + i] * C_out + first_channel) * length + offset;
      for (int64_t co = 0; co < channels; ++co) out[m++] = first + co * length;
    }
  }
};

int64_t row_blocks(int64_t rows) { return cpu::round_up(rows, cpu::kTileRows) / cpu::kTileRows; }

at::Tensor instance_aware_conv_cpu(const at::Tensor& templates, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, bias, index, stride, padding, dilation, groups);
  const TemplateBuckets buckets = bucket_instances(index, g);
  at::Tensor output = at::empty({g.N, g.C_out, g.H_out, g.W_out}, templates.options());
  if (output.numel() == 0) return output;

  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const std::vector<InstanceChunk> chunks = chunk_instances(buckets, g.P);
  const int64_t pixels = g.output_pixels();
  const int64_t tiles = (pixels + kPixelTile - 1) / kPixelTile;
  const int64_t max_tile = std::min(pixels, kPixelTile);
  const int64_t K = g.reduction_per_group();
  const int64_t max_rows = cpu::round_up(kInstancesPerChunk * g.C_out_per_group, cpu::kTileRows);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
    const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
    const scalar_t* b = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const int64_t units = static_cast<int64_t>(chunks.size()) * tiles;
    const int64_t unit_flops = kInstancesPerChunk * g.C_out * K * max_tile;
    at::parallel_for(0, units, grain_for(unit_flops), [&](int64_t unit_begin, int64_t unit_end) {
      std::vector<acc_t> columns(K * max_tile), packed(max_rows * K), product(max_rows * max_tile);
      std::vector<const scalar_t*> weight_rows;
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const InstanceChunk& chunk = chunks[unit / tiles];
        const int64_t j0 = (unit % tiles) * kPixelTile;
        const int64_t tile = std::min(kPixelTile, pixels - j0);
        const scalar_t* tpl_p = tpl + chunk.template_id * templates.stride(0);
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          const InstanceRows rows{buckets.order.data(), chunk.begin,        chunk.end - chunk.begin,
                                  gi * g.C_out_per_group, g.C_out_per_group, g.C_out};
          build_column_tile(tpl_p, templates.strides(), g, gi * g.C_in_per_group, (gi + 1) * g.C_in_per_group, j0,
                            tile, tile, 1, columns.data());
          rows.row_pointers(w, K, 0, weight_rows);
          cpu::pack_rows(weight_rows.data(), rows.rows(), K, packed.data());
          cpu::tile_gemm(packed.data(), columns.data(), product.data(), row_blocks(rows.rows()), tile, K, tile, tile,
                         false);
          for (int64_t m = 0; m < rows.rows(); ++m) {
            const int64_t row = rows.tensor_row(m);
            const acc_t shift = b ? static_cast<acc_t>(b[row]) : acc_t(0);
            const acc_t* src = product.data() + m * tile;
            scalar_t* dst = out + row * pixels + j0;
            for (int64_t t = 0; t < tile; ++t) dst[t] = static_cast<scalar_t>(src[t] + shift);
          }
        }
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_aware_conv_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& templates, const at::Tensor& weight,
    const std::optional<at::Tensor>& index, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const ConvGeometry g =
      check_instance_aware_conv_inputs(templates, weight, std::nullopt, index, stride, padding, dilation, groups);
  check_grad_output(grad_output, templates, g);
  const TemplateBuckets buckets = bucket_instances(index, g);
  at::Tensor grad_templates = at::zeros({g.P, g.C_in, g.H, g.W}, templates.options());
  at::Tensor grad_weight = at::zeros({g.N, g.C_out, g.C_in_per_group, g.kH, g.kW}, weight.options());
  at::Tensor grad_bias = at::zeros({g.N, g.C_out}, weight.options());
  if (g.N == 0 || g.C_out == 0) return {grad_templates, grad_weight, grad_bias};

  const at::Tensor grad_out = grad_output.contiguous();
  const at::Tensor weight_c = weight.contiguous();
  const std::vector<InstanceChunk> chunks = chunk_instances(buckets, g.P);
  const int64_t pixels = g.output_pixels();
  const int64_t max_tile = std::min(pixels, kPixelTile);
  const int64_t K = g.reduction_per_group();
  const int64_t area = g.kernel_area();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
        const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
        const scalar_t* go = grad_out.const_data_ptr<scalar_t>();

        // grad_bias[n, co]: one row sum each, with eight partial sums in a fixed pattern.
        scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, g.N * g.C_out, grain_for(pixels), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            acc_t partial[8] = {};
            const scalar_t* row = go + r * pixels;
            int64_t t = 0;
            for (; t + 8 <= pixels; t += 8) {
              for (int64_t i = 0; i < 8; ++i) partial[i] += static_cast<acc_t>(row[t + i]);
            }
            for (int64_t i = 0; t < pixels; ++t, ++i) partial[i] += static_cast<acc_t>(row[t]);
            gb[r] = static_cast<scalar_t>(((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                                          ((partial[4] + partial[5]) + (partial[6] + partial[7])));
          }
        });

        // grad_weight[rows, K] += grad_out[rows, tile] x columns[K, tile]^T: one unit per instance chunk, its
        // tiles added into one accumulator in order. The column tile is built transposed (tile x K), so the
        // GEMM is the same kernel as the forward's.
        scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
        const int64_t K_ld = cpu::round_up(K, cpu::tile_columns<acc_t>());
        const int64_t max_rows = cpu::round_up(kInstancesPerChunk * g.C_out_per_group, cpu::kTileRows);
        const int64_t chunk_flops = kInstancesPerChunk * g.C_out * K * pixels;
        at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain_for(chunk_flops), [&](int64_t begin, int64_t end) {
          // Columns K..K_ld of the transposed tile are never written: they stay zero.
          std::vector<acc_t> columns_t(max_tile * K_ld, acc_t(0)), packed(max_rows * max_tile);
          std::vector<acc_t> acc(g.groups * max_rows * K_ld);
          std::vector<const scalar_t*> grad_rows;
          for (int64_t c = begin; c < end; ++c) {
            const InstanceChunk& chunk = chunks[c];
            std::fill(acc.begin(), acc.end(), acc_t(0));
            const scalar_t* tpl_p = tpl + chunk.template_id * templates.stride(0);
            for (int64_t j0 = 0; j0 < pixels; j0 += kPixelTile) {
              const int64_t tile = std::min(kPixelTile, pixels - j0);
              for (int64_t gi = 0; gi < g.groups; ++gi) {
                const InstanceRows rows{buckets.order.data(), chunk.begin,        chunk.end - chunk.begin,
                                        gi * g.C_out_per_group, g.C_out_per_group, g.C_out};
                build_column_tile(tpl_p, templates.strides(), g, gi * g.C_in_per_group, (gi + 1) * g.C_in_per_group,
                                  j0, tile, 1, K_ld, columns_t.data());
                rows.row_pointers(go, pixels, j0, grad_rows);
                cpu::pack_rows(grad_rows.data(), rows.rows(), tile, packed.data());
                cpu::tile_gemm(packed.data(), columns_t.data(), acc.data() + gi * max_rows * K_ld,
                               row_blocks(rows.rows()), K_ld, tile, K_ld, K_ld, true);
              }
            }
            for (int64_t gi = 0; gi < g.groups; ++gi) {
              const InstanceRows rows{buckets.order.data(), chunk.begin,        chunk.end - chunk.begin,
                                      gi * g.C_out_per_group, g.C_out_per_group, g.C_out};
              for (int64_t m = 0; m < rows.rows(); ++m) {
                const acc_t* src = acc.data() + (gi * max_rows + m) * K_ld;
                scalar_t* dst = gw + rows.tensor_row(m) * K;
                for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<scalar_t>(src[k]);
              }
            }
          }
        });

        // grad_columns[K_block, tile] = weight[rows, K_block]^T x grad_out[rows, tile], scattered onto the
        // template: one unit per (used template, group, block of channels), so each owns its slice of
        // grad_templates and no two units ever add into the same element.
        const int64_t channels_per_block = std::max<int64_t>(1, std::min(g.C_in_per_group, kGradColumnRows / area));
        const int64_t blocks_per_group = (g.C_in_per_group + channels_per_block - 1) / channels_per_block;
        std::vector<int64_t> used_templates;
        int64_t max_instances = 0;
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t count = buckets.offsets[p + 1] - buckets.offsets[p];
          if (count > 0) used_templates.push_back(p);
          max_instances = std::max(max_instances, count);
        }
        const int64_t units_per_template = g.groups * blocks_per_group;
        const int64_t block_rows = cpu::round_up(channels_per_block * area, cpu::kTileRows);
        // The reduction (every channel of every instance of p) runs in pieces of kReductionRows rows, so a
        // thread's scratch stays small however many instances share a template; the accumulator carries over
        // between pieces, so the order of the sum is the same as in one pass.
        const int64_t max_piece = std::min(max_instances * g.C_out_per_group, kReductionRows);
        scalar_t* gt = grad_templates.mutable_data_ptr<scalar_t>();
        const int64_t unit_flops = std::max<int64_t>(1, g.N / std::max<int64_t>(used_templates.size(), 1)) *
                                   g.C_out_per_group * channels_per_block * area * pixels;
        at::parallel_for(
            0, static_cast<int64_t>(used_templates.size()) * units_per_template, grain_for(unit_flops),
            [&](int64_t begin, int64_t end) {
              std::vector<acc_t> packed(block_rows * max_piece), grad_rows(max_piece * max_tile);
              std::vector<acc_t> grad_columns(block_rows * max_tile), grad_tpl;
              std::vector<const scalar_t*> weight_rows, grad_output_rows;
              for (int64_t unit = begin; unit < end; ++unit) {
                const int64_t p = used_templates[unit / units_per_template];
                const int64_t gi = (unit % units_per_template) / blocks_per_group;
                const int64_t c_local = (unit % blocks_per_group) * channels_per_block;  // first channel in group
                const int64_t channels = std::min(channels_per_block, g.C_in_per_group - c_local);
                const int64_t c_begin = gi * g.C_in_per_group + c_local;
                const InstanceRows rows{buckets.order.data(),   buckets.offsets[p],
                                        buckets.offsets[p + 1] - buckets.offsets[p], gi * g.C_out_per_group,
                                        g.C_out_per_group,      g.C_out};
                const int64_t M = channels * area;
                rows.row_pointers(w, K, c_local * area, weight_rows);
                grad_tpl.assign(channels * g.H * g.W, acc_t(0));
                for (int64_t j0 = 0; j0 < pixels; j0 += kPixelTile) {
                  const int64_t tile = std::min(kPixelTile, pixels - j0);
                  rows.row_pointers(go, pixels, j0, grad_output_rows);
                  for (int64_t r0 = 0; r0 < rows.rows(); r0 += kReductionRows) {
                    const int64_t piece = std::min(kReductionRows, rows.rows() - r0);
                    cpu::pack_transposed(weight_rows.data() + r0, M, piece, packed.data());
                    // grad_output rows of the piece, gathered (and widened) into one contiguous operand.
                    for (int64_t r = 0; r < piece; ++r) {
                      const scalar_t* src = grad_output_rows[r0 + r];
                      acc_t* dst = grad_rows.data() + r * tile;
                      for (int64_t t = 0; t < tile; ++t) dst[t] = static_cast<acc_t>(src[t]);
                    }
                    cpu::tile_gemm(packed.data(), grad_rows.data(), grad_columns.data(), row_blocks(M), tile, piece,
                                   tile, tile, r0 > 0);
                  }
                  scatter_column_tile(grad_columns.data(), g, c_begin, c_begin + channels, j0, tile, tile,
                                      grad_tpl.data());
                }
                scalar_t* dst = gt + (p * g.C_in + c_begin) * g.H * g.W;
                for (int64_t i = 0; i < channels * g.H * g.W; ++i) dst[i] = static_cast<scalar_t>(grad_tpl[i]);
              }
            });
      });
  return {grad_templates, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pointins_ops, CPU, m) {
  m.impl("instance_aware_conv", &instance_aware_conv_cpu);
  m.impl("instance_aware_conv_backward", &instance_aware_conv_backward_cpu);
}

}  // namespace pointins_ops
