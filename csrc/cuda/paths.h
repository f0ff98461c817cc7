// The decomposition of the op by shape: which kernels run, planned on the host from shapes only (never from
// index values, so nothing waits for the device and every choice, the summation orders included, is the
// same for the same shapes on any GPU).
//
//   conv      (conv_forward.cu, conv_backward.cu): any shape. Implicit GEMM over a channels-last band of the
//             template (and of grad_output) staged in shared memory; a slot table replaces im2col.
//   pointwise (pointwise.cu): 1x1 kernels, stride 1, no padding, large maps: grouped GEMMs on contiguous rows,
//             fed by a ring of cp.async stages.
//   depthwise (depthwise.cu): one input channel per group: direct FMA kernels on whole planes.
#pragma once

#include "buckets.cuh"
#include "conv_common.cuh"

namespace pointins_ops::cuda {

// The tensors of a call: the op's arguments and the results to fill (undefined where a pass has none).
struct PassTensors {
  at::Tensor templates, weight, bias, grad_output;
  at::Tensor output, grad_templates, grad_weight, grad_bias;
};

// Whether float32 runs on TF32 tensor cores: torch's setting for cuDNN convolutions, what F.conv2d follows.
bool conv_allows_tf32();

template <typename Math>
struct MathTag {
  using type = Math;
};

// Calls f(MathTag<Math>{}) with the math policy (tiles.cuh) the dtype runs on: Float32 for float32 without
// TF32; float64 only when kDouble (kernels without a float64 version are never instantiated for it).
template <typename Float32 = MathF32, bool kDouble = true, typename F>
void with_math(at::ScalarType dtype, bool tf32, F&& f) {
  switch (dtype) {
    case at::kBFloat16:
      return f(MathTag<MathBF16>{});
    case at::kHalf:
      return f(MathTag<MathF16>{});
    case at::kFloat:
      return tf32 ? f(MathTag<MathTF32>{}) : f(MathTag<Float32>{});
    case at::kDouble:
      if constexpr (kDouble) return f(MathTag<MathF64>{});
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "instance_aware_conv (CUDA): no kernels of this path for ", dtype);
  }
}

// The kernels' view of a call's tensors (undefined ones become null pointers).
template <typename scalar_t>
Tensors<scalar_t> kernel_tensors(const PassTensors& pt) {
  const auto in = [](const at::Tensor& x) { return x.defined() ? x.const_data_ptr<scalar_t>() : nullptr; };
  const auto out = [](const at::Tensor& x) { return x.defined() ? x.mutable_data_ptr<scalar_t>() : nullptr; };
  Tensors<scalar_t> t;
  t.templates = in(pt.templates);
  t.t_p = pt.templates.stride(0), t.t_c = pt.templates.stride(1);
  t.t_h = pt.templates.stride(2), t.t_w = pt.templates.stride(3);
  t.weight = in(pt.weight);
  t.bias = in(pt.bias);
  t.grad_output = in(pt.grad_output);
  t.output = out(pt.output);
  t.grad_templates = out(pt.grad_templates);
  t.grad_weight = out(pt.grad_weight);
  t.grad_bias = out(pt.grad_bias);
  return t;
}

// --- conv path, forward ---
struct ConvForwardPlan {
  int tile_rows = 16;               // rows of a bucket per tile (BM)
  int rows_pad = 32;                // BM rounded up to whole 32-row items
  int tile_h = 1, tile_w = 1;       // output pixels per tile
  int tiles_h = 1, tiles_w = 1;     // tiles per template
  int chunk = 16, chunks = 1;       // input channels staged at a time, stages per tile
  int pixels_pad = 32;              // tile_h * tile_w rounded up to whole items
  int band_h = 1, band_w = 1;       // largest input band of a tile
  int pitch_a = 0, pitch_b = 0;     // shared-memory row pitches (elements) of the staged operands
  int raw_w_pitch = 0;              // and of the raw weight rows
  std::size_t off_offsets = 0, off_rows = 0, off_table = 0, off_pixels = 0, off_a = 0, off_b = 0, off_raw_w = 0,
              off_raw_t = 0, smem = 0;
};
ConvForwardPlan plan_conv_forward(const Shape& s, std::size_t element_size, int k_step, int tile_rows);
void run_conv_forward(const ConvForwardPlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                      bool tf32);

// --- conv path, backward ---
struct ConvBackwardPlan {
  bool fused = true;                  // one launch for both gradients (the whole template in one tile)
  int tile_rows = 32, rows_pad = 32;  // bucket rows staged at a time (and row tiles of the grad_weight launch)
  int c_tile = 16, c_tiles = 1;       // input channels per unit
  int c_pad = 16;                     // c_tile padded: 16 or 32
  int tile_h = 1, tile_w = 1;         // input pixels of a spatial tile
  int tiles_h = 1, tiles_w = 1;
  int in_pad = 32, own_pad = 32;      // input pixels of a tile, output pixels it owns: padded to whole items
  int pitch_g = 0, pitch_t = 0, pitch_w = 0;  // shared-memory row pitches (elements) of the staged operands
  int raw_g_pitch = 0, raw_g_row_pitch = 0, raw_w_pitch = 0;  // and of the raw copies
  std::size_t off_offsets = 0, off_rows = 0, off_tbl_g = 0, off_in_off = 0, off_own = 0, off_tbl_t = 0, off_go = 0, off_t = 0,
              off_w = 0, off_raw_g = 0, off_raw_w = 0, off_raw_t = 0, smem = 0;
  // grad_templates items a warp keeps in registers across the rows of a bucket
  static constexpr int persistent_items(std::size_t accumulator_bytes) { return accumulator_bytes == 8 ? 1 : 2; }
};
ConvBackwardPlan plan_conv_backward(const Shape& s, std::size_t element_size, int k_step, int avg_rows);
void run_conv_backward(const ConvBackwardPlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                       bool tf32);

// --- pointwise path (1x1, stride 1, no padding, large templates) ---
enum PointwisePass : int { kPointwiseForward = 0, kPointwiseWeight = 1, kPointwiseTemplates = 2 };
struct PointwisePlan {
  int pass = kPointwiseForward;
  int tile_rows = 128;                          // bucket rows per row tile (forward, grad_weight)
  int block_m = 128, block_n = 128, block_k = 32;
  int warps_m = 2, warps_n = 4, k_split = 1;    // warps_m * warps_n * k_split == 8 warps
  int m_tiles = 1, n_tiles = 1;                 // tiles along channels (grad_templates) and along n
  int splits = 1, split_length = 0;             // grad_weight: pixel ranges
  int pitch_a = 0, pitch_b = 0, stage_a = 0, stage_b = 0;  // ring-stage rows and sizes (elements)
  std::size_t off_rows = 0, off_stages = 0, smem = 0;
};
bool pointwise_applies(const Shape& s, const at::Tensor& templates);
PointwisePlan plan_pointwise(int pass, const Shape& s, std::size_t element_size, bool identity);
void run_pointwise(const PointwisePlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b, bool tf32);

// --- depthwise path (one input channel per group, planes that fit in shared memory) ---
struct DepthwisePlan {
  bool applies = false;
  int channels = 1, chunks = 1;  // input channels (groups) per unit, units per template
  int instances = 4;             // instances whose weights the forward stages at a time
  std::size_t off_planes = 0, off_grads = 0, off_weights = 0, off_accumulators = 0, off_partial = 0, off_raw = 0,
              smem = 0;
};
DepthwisePlan plan_depthwise(const Shape& s, std::size_t element_size, bool backward);
void run_depthwise(const DepthwisePlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                   bool backward);

}  // namespace pointins_ops::cuda
