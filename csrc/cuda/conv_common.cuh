// Shapes, tensors and launch plumbing shared by the kernels of csrc/cuda/.
#pragma once

#include "buckets.cuh"
#include "tiles.cuh"

#include <algorithm>
#include <cstdlib>
#include <limits>

namespace pointins_ops::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;  // the GEMM-shaped kernels: 4 warps, one 32 x 32 item each at a time

// The convolution's sizes in 32-bit integers (the host checks they fit), with 64-bit products precomputed.
struct Shape {
  int P, N, C_in, C_out, Cig, Cog, groups;
  int H, W, H_out, W_out;
  int kH, kW, taps;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t K;            // Cig * taps: one instance-channel's weights
  int64_t in_pixels;    // H * W
  int64_t out_pixels;   // H_out * W_out
};

inline Shape make_shape(const ConvGeometry& g) {
  constexpr int64_t kSpatialLimit = int64_t{1} << 29;
  for (const int64_t size : {g.H, g.W, g.H_out, g.W_out, g.pad_h + g.dilation_h * (g.kH - 1),
                             g.pad_w + g.dilation_w * (g.kW - 1), g.stride_h * g.H_out, g.stride_w * g.W_out}) {
    TORCH_CHECK_VALUE(size < kSpatialLimit, "instance_aware_conv (CUDA): spatial sizes, padding, stride and dilated "
                      "kernel extents must stay below 2^29; got H = ", g.H, ", W = ", g.W, ", kernel = (", g.kH, ", ",
                      g.kW, "), stride = (", g.stride_h, ", ", g.stride_w, "), padding = (", g.pad_h, ", ", g.pad_w,
                      "), dilation = (", g.dilation_h, ", ", g.dilation_w, ")");
  }
  TORCH_CHECK_VALUE(g.C_in < (int64_t{1} << 30) && g.C_out < (int64_t{1} << 30) && g.kH * g.kW < (int64_t{1} << 20) &&
                        g.H_out * g.W_out < (int64_t{1} << 31) && g.H * g.W < (int64_t{1} << 31),
                    "instance_aware_conv (CUDA): channel counts, kernel area and pixel counts must stay below 2^30, "
                    "2^20 and 2^31");
  Shape s;
  s.P = static_cast<int>(g.P), s.N = static_cast<int>(g.N), s.C_in = static_cast<int>(g.C_in);
  s.C_out = static_cast<int>(g.C_out), s.Cig = static_cast<int>(g.C_in_per_group);
  s.Cog = static_cast<int>(g.C_out_per_group), s.groups = static_cast<int>(g.groups);
  s.H = static_cast<int>(g.H), s.W = static_cast<int>(g.W), s.H_out = static_cast<int>(g.H_out);
  s.W_out = static_cast<int>(g.W_out), s.kH = static_cast<int>(g.kH), s.kW = static_cast<int>(g.kW);
  s.taps = s.kH * s.kW;
  s.stride_h = static_cast<int>(g.stride_h), s.stride_w = static_cast<int>(g.stride_w);
  s.pad_h = static_cast<int>(g.pad_h), s.pad_w = static_cast<int>(g.pad_w);
  s.dil_h = static_cast<int>(g.dilation_h), s.dil_w = static_cast<int>(g.dilation_w);
  s.K = g.C_in_per_group * g.kH * g.kW;
  s.in_pixels = g.H * g.W;
  s.out_pixels = g.H_out * g.W_out;
  return s;
}

// Every tensor a pass touches. Templates keep their strides (channels_last and strided views need no copy);
// the others are contiguous.
template <typename scalar_t>
struct Tensors {
  const scalar_t* templates = nullptr;
  int64_t t_p = 0, t_c = 0, t_h = 0, t_w = 0;
  const scalar_t* weight = nullptr;       // (N, C_out, Cig, kH, kW)
  const scalar_t* bias = nullptr;         // (N, C_out) or null
  const scalar_t* grad_output = nullptr;  // (N, C_out, H_out, W_out)
  scalar_t* output = nullptr;
  scalar_t* grad_templates = nullptr;  // (P, C_in, H, W)
  scalar_t* grad_weight = nullptr;
  scalar_t* grad_bias = nullptr;
};

template <typename scalar_t>
PI_DEVICE scalar_t quiet_nan() {
  return static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

template <typename T>
__host__ __device__ constexpr T round_up(T value, T multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Shared-memory row pitch (in elements) for rows of `width` elements: a whole number of 16-byte units, odd, so
// that the 8 rows one ldmatrix (or one quarter-warp of 16-byte loads) touches fall in distinct bank groups.
inline int row_pitch(int width, std::size_t element_size) {
  const int per16 = 16 / static_cast<int>(element_size);
  int units = (width + per16 - 1) / per16;
  if (units % 2 == 0) ++units;
  return units * per16;
}

// A carve-out of dynamic shared memory, 16-byte aligned pieces in order.
struct SmemLayout {
  std::size_t bytes = 0;
  std::size_t take(std::size_t size) {
    const std::size_t at = bytes;
    bytes += round_up<std::size_t>(size, 16);
    return at;
  }
};

// Shared memory a plan may use per block: enough for two blocks per multiprocessor on sm_90 (one on sm_80), or
// less when POINTINS_CUDA_SMEM_BUDGET (bytes) says so: tests use it to reach the tilings of large shapes with
// small ones.
inline std::size_t smem_budget() {
  std::size_t budget = std::min<std::size_t>(max_dynamic_smem(), 110 * 1024);
  if (const char* text = std::getenv("POINTINS_CUDA_SMEM_BUDGET")) {
    budget = std::min<std::size_t>(budget, static_cast<std::size_t>(std::strtoull(text, nullptr, 10)));
  }
  return budget;
}

// Persistent grids: as many blocks as fit on the device at once, at most one per unit of work. The result of
// every unit is the same whichever block computes it, so this does not affect the bits of the output.
template <typename Kernel>
int persistent_blocks(Kernel kernel, std::size_t smem, int64_t units) {
  const int64_t resident = static_cast<int64_t>(resident_blocks(kernel, kThreads, smem)) * multiprocessor_count();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, resident)));
}

// Register-path staging shared by the conv kernels (every thread of the block takes part; no barrier inside).

// The weights of the staged rows (rows_s: global row ids, -1 for none) for input channels [c0, c0 + chunk):
// store(r, c, tap, value) for every r < rows_pad, c < chunk, tap, with zeros past C_in / groups. Consecutive
// threads read consecutive weights (one row's (c, tap) range is contiguous).
template <typename scalar_t, typename Store>
PI_DEVICE void stage_weight_rows(const scalar_t* weight, const Shape& s, const int64_t* rows_s, int rows_pad,
                                 int chunk, int c0, const FastDiv& div_row, const FastDiv& div_taps,
                                 const Store& store) {
  const int per_row = chunk * s.taps;
  for (int e = static_cast<int>(threadIdx.x); e < rows_pad * per_row; e += kThreads) {
    uint32_t r, rem, c, tap;
    div_row.divmod(static_cast<uint32_t>(e), r, rem);
    div_taps.divmod(rem, c, tap);
    const int64_t row = rows_s[r];
    scalar_t v = scalar_t(0);
    if (row >= 0 && c0 + static_cast<int>(c) < s.Cig) v = weight[row * s.K + static_cast<int64_t>(c0) * s.taps + rem];
    store(static_cast<int>(r), static_cast<int>(c), static_cast<int>(tap), v);
  }
}

// A region of one template (rows [h0, h0 + height) x columns [w0, w0 + width), channels c0 + [0, chunk) of the
// group's channels starting at `tpl`) transposed to channels-last slots, dst[slot * pitch + c], slot = row *
// width + column, followed by one slot of zeros. Channels past C_in / groups are zeros.
template <typename scalar_t>
PI_DEVICE void stage_template_band(const scalar_t* tpl, const Tensors<scalar_t>& t, const Shape& s, int c0, int chunk,
                                   int h0, int w0, int height, int width, scalar_t* dst, int pitch) {
  const int slots = height * width;
  const FastDiv div_slots(static_cast<uint32_t>(max(slots, 1))), div_width(static_cast<uint32_t>(max(width, 1)));
  for (int e = static_cast<int>(threadIdx.x); e < chunk * slots; e += kThreads) {
    uint32_t c, slot, h, w;
    div_slots.divmod(static_cast<uint32_t>(e), c, slot);
    div_width.divmod(slot, h, w);
    scalar_t v = scalar_t(0);
    if (c0 + static_cast<int>(c) < s.Cig) {
      v = tpl[static_cast<int64_t>(c0 + static_cast<int>(c)) * t.t_c + (h0 + static_cast<int>(h)) * t.t_h +
              (w0 + static_cast<int>(w)) * t.t_w];
    }
    dst[slot * pitch + c] = v;
  }
  for (int c = static_cast<int>(threadIdx.x); c < chunk; c += kThreads) dst[slots * pitch + c] = scalar_t(0);
}

}  // namespace pointins_ops::cuda
