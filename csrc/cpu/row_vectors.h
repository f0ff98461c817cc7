// The row-vector forward of the CPU kernels: a stride-1 convolution of one template's channel group with up to
// 64 of its GEMM rows (instance x output channel) at a time, the rows in vectors and the output pixels
// broadcast, the way a direct convolution vectorises over output channels. grad_weight reuses its register
// blocks (RowVectorConv::grad_weight).
//
// Why a second forward beside the GEMM engine (gemm.h): the engine puts pixels in its vectors, and a stride-1
// convolution's pixels are positions of a padded plane, pitch = W + 2 * pad per output row. PointINS' 14 x 14
// map with a 3 x 3 kernel is 14 rows of 16 positions: 224 products computed for 196 outputs, one in eight
// thrown away. Here a register block is 16 x MB rows by PB consecutive pixels of one output row (MB x PB <= 28
// accumulators: 4 x 7, 3 x 9, 2 x 14, 1 x 14), and an output row is cut into equal blocks, the last one moved
// back to end on the row, so no product falls in the padding. Each step of the reduction loads MB vectors of
// packed weights and broadcasts PB plane values:
//   float32    FMA, one reduction index k = (channel, kh, kw) per step, summed in increasing k: the same sums
//              in the same order as the engine's avx512 kernel, so the same bits;
//   bfloat16   VDPBF16PS, two channels of one tap per step (2c, 2c + 1): the planes are built with the two
//              channels' 16-bit values side by side in one 32-bit word, the weights packed to match (an odd
//              channel count is padded with a zero channel).
// The block's sums go to a pixel-major tile, which 16 x 16 register transposes turn into output rows
// (plus bias, narrowed to bfloat16 in registers).
//
// Extra memory, per thread: the band's padded planes (C_in_per_group x rows x pitch, float32 or 32-bit
// pairs), the packed weights (64 x K float32), and a 64-row tile of the band's pixels (float32). Bands are
// output rows of at most kBandPixels pixels (one row at least).
#pragma once

#include <ATen/core/ScalarType.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "../instance_aware_conv.h"
#include "gemm.h"

namespace pointins_ops {
namespace cpu {

// Whether the row-vector forward serves this convolution: stride 1, more than one input channel per group,
// float32 on AVX-512 or bfloat16 on AVX512-BF16 without AMX, and cheaper than the GEMM forward by a count of
// vector multiply-add steps per output vector: the GEMM computes `gemm_positions` positions per template for
// the output's pixels (its gaps and ragged panels: 224 for 14 x 14 outputs, 3 x 3 or 1 x 1), the row vectors
// compute the pixels (and the overlap of each row's last block) but pay a transposing epilogue, about
// kEpilogueSteps steps per output vector. So 14 x 14 outputs take the row vectors; CondInst's, SOLOv2's and
// YOLACT's large 1 x 1 maps, which fill the GEMM's panels, stay on the GEMM.
bool row_vectors_apply(Isa isa, at::ScalarType dtype, const ConvGeometry& g, int64_t gemm_positions);

// Output rows per band: as many as fit kBandPixels pixels, at least one.
int64_t row_vector_band(const ConvGeometry& g);

template <typename scalar_t>
class RowVectorConv {
 public:
  static constexpr int64_t kMaxRows = 64;

  // The zero-padded planes of one template's channel group that output rows [oh0, oh1) read: `channels` is the
  // group's first channel, sc, sh, sw the template's channel, row and column strides.
  void load_planes(const scalar_t* channels, int64_t sc, int64_t sh, int64_t sw, const ConvGeometry& g, int64_t oh0,
                   int64_t oh1);

  // Memory the next calls will read: `bytes` from `begin`.
  struct Range {
    const void* begin;
    int64_t bytes;
  };

  // For rows m < M <= kMaxRows: out_rows[m][pixel] = shifts[m] + the convolution of weight_rows[m] (the row's
  // C_in_per_group x kH x kW weights, contiguous) with the planes, for the band's output pixels (out_rows[m]
  // is the row's first pixel, oh = 0). While its blocks run, the call prefetches the output lines it will
  // write at the end and the lines of `ahead` (the next call's weights and template, from main memory when the
  // inputs are cold), so those loads overlap the multiply-adds instead of waiting between them.
  void compute(const scalar_t* const* weight_rows, int64_t M, const float* shifts, scalar_t* const* out_rows,
               const std::vector<Range>& ahead);

  // grad_weight by the same register blocks, rows in vectors and reduction indices k = (c, kh, kw) broadcast, the
  // sum running over output pixels (float32) or pairs of neighbouring pixels (bfloat16, VDPBF16PS; W_out must
  // be even): the planes of one template's channel group over all output rows, as float32 or plain bfloat16.
  void load_grad_weight_planes(const scalar_t* channels, int64_t sc, int64_t sh, int64_t sw, const ConvGeometry& g);

  // For rows m < M <= kMaxRows: gw_rows[m][k] = the sum over output pixels of grad_rows[m][pixel] times the
  // planes' value for k at that pixel, in increasing pixel order (float32; bfloat16: pairs of pixels, the
  // instruction's own order within a pair).
  void grad_weight(const scalar_t* const* grad_rows, int64_t M, scalar_t* const* gw_rows);

 private:
  const ConvGeometry* g_ = nullptr;
  int64_t oh0_ = 0, band_rows_ = 0, plane_rows_ = 0, pitch_ = 0, steps_ = 0;
  std::vector<int64_t> offsets_;    // per reduction step (grad_weight: per k, in bytes): where it lies in the planes
  std::vector<int64_t> positions_;  // grad_weight: per step, the byte offset of its pixel(s) in a plane
  Scratch<uint32_t> planes_;      // float32 bits, or pairs of bfloat16
  Scratch<uint32_t> weights_;     // packed: step-major, kMaxRows values (float32 bits or pairs) per step
  Scratch<uint32_t> staging_;     // bfloat16: 16 weight rows as pairs, before their transpose
  Scratch<float> tile_;           // pixel-major sums, kMaxRows per pixel
  std::vector<std::pair<const char*, int64_t>> reads_, writes_;  // ranges to prefetch during one compute()
};

}  // namespace cpu
}  // namespace pointins_ops
