// CPU kernels of instance_aware_conv: forward, and one backward giving grad_templates, grad_weight, grad_bias.
//
// Instances are bucketed by template (a stable counting sort), so each template's columns (its im2col,
// built one tile of output pixels at a time, never for the whole template) serve every instance that uses
// it. Each work unit owns a disjoint piece of every output it writes and sums in a fixed order, so results
// are bitwise identical run to run and for any thread count. Accumulation is in at::opmath_type (float32
// for float16/bfloat16/float32, float64 for float64). Extra memory: per-thread tiles in the forward; in
// the backward also one unit's slice of grad_weight / grad_templates in the accumulation type.
#include "../instance_aware_conv.h"

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
// are output pixels [j0, j0 + tile). Calls visit(row, t, oh, ow_begin, ow_end, ih, iw_begin, ow_valid) for
// each row and each run of output pixels that lies in one output row; ow_valid is the sub-range whose input
// pixel is inside the template (ih valid and iw in bounds), the rest of the run reads padding.
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

// columns[row * tile + t] = template[c, ih, iw] (0 in the padding), in the accumulation type.
template <typename scalar_t, typename acc_t>
void build_column_tile(const scalar_t* tpl, at::IntArrayRef strides, const ConvGeometry& g, int64_t c_begin,
                       int64_t c_end, int64_t j0, int64_t tile, acc_t* columns) {
  const int64_t sc = strides[1], sh = strides[2], sw = strides[3];
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t ow_end, int64_t ih,
                          int64_t iw_offset, ValidRange valid) {
                        acc_t* out = columns + row * tile + t - ow_begin;
                        for (int64_t ow = ow_begin; ow < valid.begin; ++ow) out[ow] = acc_t(0);
                        if (valid.begin < valid.end) {
                          const scalar_t* in = tpl + c * sc + ih * sh;
                          for (int64_t ow = valid.begin; ow < valid.end; ++ow) {
                            out[ow] = static_cast<acc_t>(in[(ow * g.stride_w + iw_offset) * sw]);
                          }
                        }
                        for (int64_t ow = valid.end; ow < ow_end; ++ow) out[ow] = acc_t(0);
                      });
}

// The adjoint of build_column_tile: grad_tpl[c - c_begin, ih, iw] += grad_columns[row * tile + t].
template <typename acc_t>
void scatter_column_tile(const acc_t* grad_columns, const ConvGeometry& g, int64_t c_begin, int64_t c_end, int64_t j0,
                         int64_t tile, acc_t* grad_tpl) {
  for_each_column_run(g, c_begin, c_end, j0, tile,
                      [&](int64_t c, int64_t row, int64_t t, int64_t ow_begin, int64_t, int64_t ih, int64_t iw_offset,
                          ValidRange valid) {
                        if (valid.begin == valid.end) return;
                        const acc_t* in = grad_columns + row * tile + t - ow_begin;
                        acc_t* out = grad_tpl + ((c - c_begin) * g.H + ih) * g.W;
                        for (int64_t ow = valid.begin; ow < valid.end; ++ow) {
                          out[ow * g.stride_w + iw_offset] += in[ow];
                        }
                      });
}

// out[r, :tile] = bias[r] + sum_k weight[r, k] * columns[k, :tile] for `rows` rows, four at a time so that
// each column row is loaded once per four outputs. The k-sum runs in increasing k for every element.
template <typename scalar_t, typename acc_t>
void rows_times_columns(const scalar_t* weight, int64_t rows, int64_t K, const acc_t* columns, int64_t tile,
                        const scalar_t* bias, scalar_t* out, int64_t out_row_stride, acc_t* acc) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int64_t block = std::min<int64_t>(4, rows - r0);
    for (int64_t i = 0; i < block; ++i) {
      const acc_t init = bias ? static_cast<acc_t>(bias[r0 + i]) : acc_t(0);
      std::fill(acc + i * tile, acc + (i + 1) * tile, init);
    }
    if (block == 4) {
      acc_t* __restrict__ a0 = acc;
      acc_t* __restrict__ a1 = acc + tile;
      acc_t* __restrict__ a2 = acc + 2 * tile;
      acc_t* __restrict__ a3 = acc + 3 * tile;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t w0 = static_cast<acc_t>(weight[r0 * K + k]);
        const acc_t w1 = static_cast<acc_t>(weight[(r0 + 1) * K + k]);
        const acc_t w2 = static_cast<acc_t>(weight[(r0 + 2) * K + k]);
        const acc_t w3 = static_cast<acc_t>(weight[(r0 + 3) * K + k]);
        const acc_t* __restrict__ col = columns + k * tile;
        for (int64_t t = 0; t < tile; ++t) {
          a0[t] += w0 * col[t];
          a1[t] += w1 * col[t];
          a2[t] += w2 * col[t];
          a3[t] += w3 * col[t];
        }
      }
    } else {
      for (int64_t i = 0; i < block; ++i) {
        acc_t* __restrict__ a = acc + i * tile;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t w = static_cast<acc_t>(weight[(r0 + i) * K + k]);
          const acc_t* __restrict__ col = columns + k * tile;
          for (int64_t t = 0; t < tile; ++t) a[t] += w * col[t];
        }
      }
    }
    for (int64_t i = 0; i < block; ++i) {
      scalar_t* o = out + (r0 + i) * out_row_stride;
      const acc_t* a = acc + i * tile;
      for (int64_t t = 0; t < tile; ++t) o[t] = static_cast<scalar_t>(a[t]);
    }
  }
}

// A dot product with eight partial sums in a fixed pattern: vectorizable, and the same order every run.
template <typename acc_t>
acc_t dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  acc_t s[8] = {};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int i = 0; i < 8; ++i) s[i] += a[t + i] * b[t + i];
  }
  for (int i = 0; t < n; ++t, ++i) s[i] += a[t] * b[t];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename scalar_t, typename acc_t>
void convert_row(const scalar_t* in, int64_t n, acc_t* out) {
  for (int64_t t = 0; t < n; ++t) out[t] = static_cast<acc_t>(in[t]);
}

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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, templates.scalar_type(), "instance_aware_conv_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tpl = templates.const_data_ptr<scalar_t>();
    const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
    const scalar_t* b = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const int64_t units = static_cast<int64_t>(chunks.size()) * tiles;
    at::parallel_for(0, units, 1, [&](int64_t unit_begin, int64_t unit_end) {
      std::vector<acc_t> columns(std::max<int64_t>(K * max_tile, 1));
      std::vector<acc_t> acc(4 * max_tile);
      for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
        const InstanceChunk& chunk = chunks[unit / tiles];
        const int64_t j0 = (unit % tiles) * kPixelTile;
        const int64_t tile = std::min(kPixelTile, pixels - j0);
        const scalar_t* tpl_p = tpl + chunk.template_id * templates.stride(0);
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          build_column_tile(tpl_p, templates.strides(), g, gi * g.C_in_per_group, (gi + 1) * g.C_in_per_group, j0,
                            tile, columns.data());
          for (int64_t pos = chunk.begin; pos < chunk.end; ++pos) {
            const int64_t row0 = buckets.order[pos] * g.C_out + gi * g.C_out_per_group;
            rows_times_columns(w + row0 * K, g.C_out_per_group, K, columns.data(), tile, b ? b + row0 : nullptr,
                               out + row0 * pixels + j0, pixels, acc.data());
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

        // grad_bias[n, co]: one row sum per unit.
        scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, g.N * g.C_out, 16, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> row(pixels);
          const std::vector<acc_t> ones(pixels, acc_t(1));
          for (int64_t r = begin; r < end; ++r) {
            convert_row(go + r * pixels, pixels, row.data());
            gb[r] = static_cast<scalar_t>(dot(row.data(), ones.data(), pixels));
          }
        });

        // grad_weight[n, co, k] = sum_j grad_out[n, co, j] * columns_p[k, j]: one unit per instance chunk,
        // summing its tiles in order.
        scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> columns(std::max<int64_t>(K * max_tile, 1));
          std::vector<acc_t> go_row(max_tile);
          std::vector<acc_t> acc;
          for (int64_t c = begin; c < end; ++c) {
            const InstanceChunk& chunk = chunks[c];
            const int64_t count = chunk.end - chunk.begin;
            acc.assign(count * g.C_out * K, acc_t(0));
            const scalar_t* tpl_p = tpl + chunk.template_id * templates.stride(0);
            for (int64_t j0 = 0; j0 < pixels; j0 += kPixelTile) {
              const int64_t tile = std::min(kPixelTile, pixels - j0);
              for (int64_t gi = 0; gi < g.groups; ++gi) {
                build_column_tile(tpl_p, templates.strides(), g, gi * g.C_in_per_group, (gi + 1) * g.C_in_per_group,
                                  j0, tile, columns.data());
                for (int64_t i = 0; i < count; ++i) {
                  const int64_t n = buckets.order[chunk.begin + i];
                  for (int64_t co = gi * g.C_out_per_group; co < (gi + 1) * g.C_out_per_group; ++co) {
                    convert_row(go + (n * g.C_out + co) * pixels + j0, tile, go_row.data());
                    acc_t* a = acc.data() + (i * g.C_out + co) * K;
                    for (int64_t k = 0; k < K; ++k) a[k] += dot(go_row.data(), columns.data() + k * tile, tile);
                  }
                }
              }
            }
            for (int64_t i = 0; i < count; ++i) {
              scalar_t* dst = gw + buckets.order[chunk.begin + i] * g.C_out * K;
              const acc_t* src = acc.data() + i * g.C_out * K;
              for (int64_t k = 0; k < g.C_out * K; ++k) dst[k] = static_cast<scalar_t>(src[k]);
            }
          }
        });

        // grad_templates[p, c] = col2im(sum over p's instances n and their channels co of
        // weight[n, co, c] x grad_out[n, co]): one unit per (template, group, channel block), so each owns
        // its slice of grad_templates and needs no atomics.
        const int64_t channels_per_block = std::max<int64_t>(1, std::min(g.C_in_per_group, kGradColumnRows / area));
        const int64_t blocks_per_group = (g.C_in_per_group + channels_per_block - 1) / channels_per_block;
        std::vector<int64_t> used_templates;
        for (int64_t p = 0; p < g.P; ++p) {
          if (buckets.offsets[p + 1] > buckets.offsets[p]) used_templates.push_back(p);
        }
        const int64_t units_per_template = g.groups * blocks_per_group;
        scalar_t* gt = grad_templates.mutable_data_ptr<scalar_t>();
        at::parallel_for(
            0, static_cast<int64_t>(used_templates.size()) * units_per_template, 1, [&](int64_t begin, int64_t end) {
              std::vector<acc_t> grad_columns(std::max<int64_t>(channels_per_block * area * max_tile, 1));
              std::vector<acc_t> go_row(max_tile);
              std::vector<acc_t> grad_tpl;
              for (int64_t unit = begin; unit < end; ++unit) {
                const int64_t p = used_templates[unit / units_per_template];
                const int64_t gi = (unit % units_per_template) / blocks_per_group;
                const int64_t block = unit % blocks_per_group;
                const int64_t c_local = block * channels_per_block;  // first channel within the group
                const int64_t channels = std::min(channels_per_block, g.C_in_per_group - c_local);
                const int64_t c_begin = gi * g.C_in_per_group + c_local;
                const int64_t rows = channels * area;
                grad_tpl.assign(channels * g.H * g.W, acc_t(0));
                for (int64_t j0 = 0; j0 < pixels; j0 += kPixelTile) {
                  const int64_t tile = std::min(kPixelTile, pixels - j0);
                  std::fill(grad_columns.begin(), grad_columns.begin() + rows * tile, acc_t(0));
                  for (int64_t pos = buckets.offsets[p]; pos < buckets.offsets[p + 1]; ++pos) {
                    const int64_t n = buckets.order[pos];
                    for (int64_t co = gi * g.C_out_per_group; co < (gi + 1) * g.C_out_per_group; ++co) {
                      convert_row(go + (n * g.C_out + co) * pixels + j0, tile, go_row.data());
                      const scalar_t* w_row = w + (n * g.C_out + co) * K + c_local * area;
                      for (int64_t r = 0; r < rows; ++r) {
                        const acc_t wr = static_cast<acc_t>(w_row[r]);
                        acc_t* __restrict__ dst = grad_columns.data() + r * tile;
                        const acc_t* __restrict__ src = go_row.data();
                        for (int64_t t = 0; t < tile; ++t) dst[t] += wr * src[t];
                      }
                    }
                  }
                  scatter_column_tile(grad_columns.data(), g, c_begin, c_begin + channels, j0, tile, grad_tpl.data());
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
