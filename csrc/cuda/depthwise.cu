// The depthwise path: one input channel per group (C_in / groups == 1), any channel multiplier, on templates whose
// planes fit in shared memory. No GEMM is worth forming here (a channel's reduction has kH * kW terms), so the
// kernels are direct FMA loops in float32 (float64 for float64) over whole planes:
//
//   a unit is (template, chunk of channels); its template planes are copied in once (cp.async where aligned)
//   and widened into zero-padded float planes; then, instance by instance of the template's bucket, the
//   forward writes each output plane, and the backward reads each grad_output plane to finish that
//   instance's grad_weight / grad_bias and to add its share of grad_templates, kept in shared memory.
//
// A thread owns one column of a plane and slides a window down it, so for the common 3x3, stride-1, dilation-1
// kernel each output costs 3 shared loads and 9 FMAs; other kernels take a per-tap loop. Every sum has one owner
// and a fixed order (columns' partial sums of grad_weight are added in column order): no atomics.
#include "paths.h"
#include "staging.cuh"

#include <ATen/OpMathType.h>

namespace pointins_ops::cuda {
namespace {

constexpr int kDwThreads = 128;

template <typename scalar_t>
using Wide = at::opmath_type<scalar_t>;

// The unit's planes, widened: channel c's plane at planes + c * plane_size, element (ih, iw) of the template at
// (ih + pad_top) * pitch + iw + pad_left, zeros around.
struct DwGeometry {
  int pad_top, pad_left, rows, pitch, plane_size;
};

PI_DEVICE DwGeometry template_geometry(const Shape& s) {
  DwGeometry d;
  d.pad_top = s.pad_h, d.pad_left = s.pad_w;
  d.rows = max(s.H + s.pad_h, (s.H_out - 1) * s.stride_h + (s.kH - 1) * s.dil_h + 1);
  d.pitch = max(s.W + s.pad_w, (s.W_out - 1) * s.stride_w + (s.kW - 1) * s.dil_w + 1);
  d.plane_size = d.rows * d.pitch;
  return d;
}

// Widens `count` raw planes (element (c, h, w) at layout.element(c, h, w)) of height x width into zero-padded
// planes of geometry d, shifted by (top, left).
template <typename scalar_t, typename wide_t>
PI_DEVICE void widen_planes(const scalar_t* raw, const RegionLayout& layout, int count, int height, int width,
                            const DwGeometry& d, int top, int left, wide_t* planes) {
  const int total = count * d.plane_size;
  const FastDiv div_plane(static_cast<uint32_t>(d.plane_size)), div_pitch(static_cast<uint32_t>(d.pitch));
  for (int e = static_cast<int>(threadIdx.x); e < total; e += kDwThreads) {
    uint32_t c, rest, y, x;
    div_plane.divmod(static_cast<uint32_t>(e), c, rest);
    div_pitch.divmod(rest, y, x);
    const int h = static_cast<int>(y) - top, w = static_cast<int>(x) - left;
    wide_t v = wide_t(0);
    if (h >= 0 && h < height && w >= 0 && w < width) v = static_cast<wide_t>(raw[layout.element(c, h, w)]);
    planes[e] = v;
  }
}

// Three consecutive columns of three consecutive rows of a padded plane, slid down one row at a time: the
// 3x3 stride-1 fast path loads 3 values per step instead of 9.
template <typename wide_t>
struct Window3 {
  wide_t v[3][3];
  // Rows 0 and 1 from `top` (row 0, first column); row 2 comes with each load().
  PI_DEVICE Window3(const wide_t* top, int pitch) {
#pragma unroll
    for (int i = 0; i < 3; ++i) v[0][i] = top[i], v[1][i] = top[pitch + i];
  }
  PI_DEVICE void load(const wide_t* row) {
#pragma unroll
    for (int i = 0; i < 3; ++i) v[2][i] = row[i];
  }
  PI_DEVICE void slide() {
#pragma unroll
    for (int i = 0; i < 3; ++i) v[0][i] = v[1][i], v[1][i] = v[2][i];
  }
  // sum over the window of k[3 r + c] * v[r][c]
  PI_DEVICE wide_t dot(const wide_t (&k)[9]) const {
    wide_t sum = wide_t(0);
#pragma unroll
    for (int i = 0; i < 3; ++i) sum += k[i] * v[0][i] + k[3 + i] * v[1][i] + k[6 + i] * v[2][i];
    return sum;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kDwThreads, 1)
    depthwise_forward_kernel(Tensors<scalar_t> t, Shape s, Buckets buckets, DepthwisePlan plan) {
  using wide_t = Wide<scalar_t>;
  unsigned char* smem = dynamic_smem();
  auto* planes = reinterpret_cast<wide_t*>(smem + plan.off_planes);
  auto* weights = reinterpret_cast<wide_t*>(smem + plan.off_weights);  // [instance][c * Cog + j][tap]
  auto* raw = reinterpret_cast<scalar_t*>(smem + plan.off_raw);
  const int tid = static_cast<int>(threadIdx.x);
  const DwGeometry d = template_geometry(s);
  const int taps = s.taps;
  const bool fast = s.kH == 3 && s.kW == 3 && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1;
  const int units = (s.P + 1) * plan.chunks;

  for (int unit = static_cast<int>(blockIdx.x); unit < units; unit += static_cast<int>(gridDim.x)) {
    const int p = unit / plan.chunks, c0 = (unit % plan.chunks) * plan.channels;
    const int channels = min(plan.channels, s.C_in - c0);
    const int per_instance = channels * s.Cog;  // output planes of one instance in the unit
    const int count = buckets.count(p);
    __syncthreads();  // the previous unit is done with the planes
    if (p < s.P && count > 0) {
      const RegionLayout layout =
          copy_template_region(t.templates + p * t.t_p + static_cast<int64_t>(c0) * t.t_c, t, s, channels, 0, 0, s.H,
                               s.W, raw);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      widen_planes(raw, layout, channels, s.H, s.W, d, d.pad_top, d.pad_left, planes);
    }
    for (int first = 0; first < count; first += plan.instances) {
      const int n_count = min(plan.instances, count - first);
      __syncthreads();  // the planes are complete; the previous instances' weights are no longer read
      // Weights of the instances: W[n][c * Cog + j][0][tap] for the unit's channels, contiguous per instance.
      for (int e = tid; e < n_count * per_instance * taps; e += kDwThreads) {
        const int i = e / (per_instance * taps), rest = e % (per_instance * taps);
        const int64_t n = buckets.instance(p, first + i);
        weights[e] = static_cast<wide_t>(t.weight[(n * s.C_out + static_cast<int64_t>(c0) * s.Cog) * taps + rest]);
      }
      __syncthreads();
      const int out_planes = n_count * per_instance;
      if (p == s.P) {  // out-of-range index: NaN rows, the template is never read
        for (int e = tid; e < out_planes * static_cast<int>(s.out_pixels); e += kDwThreads) {
          const int plane = e / static_cast<int>(s.out_pixels);
          const int64_t n = buckets.instance(p, first + plane / per_instance);
          const int64_t row = n * s.C_out + static_cast<int64_t>(c0) * s.Cog + plane % per_instance;
          t.output[row * s.out_pixels + e % static_cast<int>(s.out_pixels)] = quiet_nan<scalar_t>();
        }
        continue;
      }
      // One thread per (output plane, output column), sliding down the rows.
      for (int e = tid; e < out_planes * s.W_out; e += kDwThreads) {
        const int plane = e / s.W_out, ow = e % s.W_out;
        const int c = (plane % per_instance) / s.Cog;
        const int64_t n = buckets.instance(p, first + plane / per_instance);
        const int64_t row = n * s.C_out + static_cast<int64_t>(c0) * s.Cog + plane % per_instance;
        const wide_t* w = weights + plane * taps;
        const wide_t* src = planes + c * d.plane_size;
        scalar_t* out = t.output + row * s.out_pixels + ow;
        const wide_t bias = t.bias != nullptr ? static_cast<wide_t>(t.bias[row]) : wide_t(0);
        if (fast) {
          wide_t k[9];
#pragma unroll
          for (int i = 0; i < 9; ++i) k[i] = w[i];
          Window3<wide_t> x(src + ow, d.pitch);
          for (int oh = 0; oh < s.H_out; ++oh) {
            x.load(src + (oh + 2) * d.pitch + ow);
            out[oh * s.W_out] = static_cast<scalar_t>(bias + x.dot(k));
            x.slide();
          }
        } else {
          for (int oh = 0; oh < s.H_out; ++oh) {
            wide_t acc = bias;
            int tap = 0;
            for (int kh = 0; kh < s.kH; ++kh) {
              const wide_t* line = src + (oh * s.stride_h + kh * s.dil_h) * d.pitch + ow * s.stride_w;
              for (int kw = 0; kw < s.kW; ++kw, ++tap) acc += w[tap] * line[kw * s.dil_w];
            }
            out[oh * s.W_out] = static_cast<scalar_t>(acc);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kDwThreads, 1)
    depthwise_backward_kernel(Tensors<scalar_t> t, Shape s, Buckets buckets, DepthwisePlan plan) {
  using wide_t = Wide<scalar_t>;
  unsigned char* smem = dynamic_smem();
  auto* planes = reinterpret_cast<wide_t*>(smem + plan.off_planes);      // the template planes, padded
  auto* grads = reinterpret_cast<wide_t*>(smem + plan.off_grads);        // one instance's grad_output planes
  auto* weights = reinterpret_cast<wide_t*>(smem + plan.off_weights);    // its weights [c * Cog + j][tap]
  auto* gt = reinterpret_cast<wide_t*>(smem + plan.off_accumulators);    // grad_templates [c][H][W]
  auto* partial = reinterpret_cast<wide_t*>(smem + plan.off_partial);    // [plane][column][tap + 1]
  auto* raw = reinterpret_cast<scalar_t*>(smem + plan.off_raw);
  const int tid = static_cast<int>(threadIdx.x);
  const DwGeometry d = template_geometry(s);
  // grad_output planes padded so that grad_templates reads them like the forward reads templates: element (oh, ow)
  // at (oh + top) * pitch + ow + left, with a border wide enough for every tap.
  DwGeometry g;
  g.pad_top = (s.kH - 1) * s.dil_h, g.pad_left = (s.kW - 1) * s.dil_w;
  g.rows = max(s.H_out + g.pad_top, s.H + s.pad_h) + 1, g.pitch = max(s.W_out + g.pad_left, s.W + s.pad_w) + 1;
  g.plane_size = g.rows * g.pitch;
  const int taps = s.taps, width = taps + 1;
  const bool fast = s.kH == 3 && s.kW == 3 && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1;
  const int units = (s.P + 1) * plan.chunks;

  for (int unit = static_cast<int>(blockIdx.x); unit < units; unit += static_cast<int>(gridDim.x)) {
    const int p = unit / plan.chunks, c0 = (unit % plan.chunks) * plan.channels;
    const int channels = min(plan.channels, s.C_in - c0);
    const int count = buckets.count(p);
    const bool has_template = p < s.P;
    __syncthreads();  // the previous unit is done with the shared memory
    if (has_template) {
      if (count > 0) {
        const RegionLayout layout =
            copy_template_region(t.templates + p * t.t_p + static_cast<int64_t>(c0) * t.t_c, t, s, channels, 0, 0,
                                 s.H, s.W, raw);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        widen_planes(raw, layout, channels, s.H, s.W, d, d.pad_top, d.pad_left, planes);
      }
      for (int e = tid; e < channels * static_cast<int>(s.in_pixels); e += kDwThreads) gt[e] = wide_t(0);
    }
    for (int i = 0; i < count; ++i) {
      const int64_t n = buckets.instance(p, i);
      const int64_t row0 = n * s.C_out + static_cast<int64_t>(c0) * s.Cog;  // the instance's first row in the unit
      const int rows = channels * s.Cog;
      __syncthreads();  // the previous instance's planes and weights are no longer read
      const scalar_t* go = t.grad_output + row0 * s.out_pixels;
      copy_runs(raw, 0, 1, rows * static_cast<int>(s.out_pixels), granule_of(reinterpret_cast<uintptr_t>(go)),
                [&](int) { return go; }, t.weight);
      cp_async_commit();
      for (int e = tid; e < rows * taps; e += kDwThreads) weights[e] = static_cast<wide_t>(t.weight[row0 * taps + e]);
      cp_async_wait<0>();
      __syncthreads();
      RegionLayout rows_layout;  // the instance's grad_output rows: one contiguous run
      rows_layout.planes = true, rows_layout.pitch = static_cast<int>(s.out_pixels), rows_layout.plane_width = s.W_out;
      widen_planes(raw, rows_layout, rows, s.H_out, s.W_out, g, g.pad_top, g.pad_left, grads);
      __syncthreads();

      // grad_weight and grad_bias: each thread sums one column of one plane over all taps, then the columns are
      // added in order.
      for (int e = tid; e < rows * s.W_out; e += kDwThreads) {
        const int plane = e / s.W_out, ow = e % s.W_out;
        const wide_t* src = planes + (plane / s.Cog) * d.plane_size;
        const wide_t* gr = grads + plane * g.plane_size + g.pad_top * g.pitch + g.pad_left + ow;
        wide_t* out = partial + (plane * s.W_out + ow) * width;
        if (fast) {
          wide_t acc[10] = {};
          Window3<wide_t> x(src + ow, d.pitch);
          for (int oh = 0; oh < s.H_out; ++oh) {
            x.load(src + (oh + 2) * d.pitch + ow);
            const wide_t v = gr[oh * g.pitch];
#pragma unroll
            for (int r = 0; r < 3; ++r) {
#pragma unroll
              for (int c = 0; c < 3; ++c) acc[3 * r + c] += v * x.v[r][c];
            }
            acc[9] += v;
            x.slide();
          }
#pragma unroll
          for (int k = 0; k < 10; ++k) out[k] = acc[k];
        } else {
          for (int tap = 0; tap <= taps; ++tap) {
            const int kh = tap / s.kW, kw = tap % s.kW;
            wide_t acc = wide_t(0);
            for (int oh = 0; oh < s.H_out; ++oh) {
              const wide_t v = gr[oh * g.pitch];
              acc += tap == taps ? v
                                 : v * src[(oh * s.stride_h + kh * s.dil_h) * d.pitch + ow * s.stride_w + kw * s.dil_w];
            }
            out[tap] = acc;
          }
        }
      }
      __syncthreads();
      for (int e = tid; e < rows * width; e += kDwThreads) {
        const int plane = e / width, tap = e % width;
        wide_t sum = wide_t(0);
        for (int ow = 0; ow < s.W_out; ++ow) sum += partial[(plane * s.W_out + ow) * width + tap];
        if (tap == taps) {
          if (t.grad_bias != nullptr) t.grad_bias[row0 + plane] = static_cast<scalar_t>(sum);
        } else {
          t.grad_weight[(row0 + plane) * taps + tap] = has_template ? static_cast<scalar_t>(sum) : quiet_nan<scalar_t>();
        }
      }

      // grad_templates: each thread owns one column of one channel and adds this instance's contribution.
      if (has_template) {
        for (int e = tid; e < channels * s.W; e += kDwThreads) {
          const int c = e / s.W, iw = e % s.W;
          wide_t* acc_col = gt + c * static_cast<int>(s.in_pixels) + iw;
          for (int j = 0; j < s.Cog; ++j) {
            const int plane = c * s.Cog + j;
            const wide_t* w = weights + plane * taps;
            const wide_t* gr = grads + plane * g.plane_size;
            if (fast) {
              // out(ih, iw) reads grad_output (ih + 1 - kh, iw + 1 - kw); padded rows start g.pad_top earlier.
              wide_t k[9];
#pragma unroll
              for (int q = 0; q < 9; ++q) k[q] = w[8 - q];  // the flipped kernel
              const wide_t* base = gr + iw + g.pad_left - 2 + s.pad_w;
              Window3<wide_t> y(base + (g.pad_top - 2 + s.pad_h) * g.pitch, g.pitch);
              for (int ih = 0; ih < s.H; ++ih) {
                y.load(base + (ih + g.pad_top + s.pad_h) * g.pitch);
                acc_col[ih * s.W] += y.dot(k);
                y.slide();
              }
            } else {
              for (int ih = 0; ih < s.H; ++ih) {
                wide_t add = wide_t(0);
                int tap = 0;
                for (int kh = 0; kh < s.kH; ++kh) {
                  const int num_h = ih + s.pad_h - kh * s.dil_h;
                  for (int kw = 0; kw < s.kW; ++kw, ++tap) {
                    const int num_w = iw + s.pad_w - kw * s.dil_w;
                    if (num_h < 0 || num_w < 0 || num_h % s.stride_h != 0 || num_w % s.stride_w != 0) continue;
                    const int oh = num_h / s.stride_h, ow = num_w / s.stride_w;
                    if (oh >= s.H_out || ow >= s.W_out) continue;
                    add += w[tap] * gr[(oh + g.pad_top) * g.pitch + ow + g.pad_left];
                  }
                }
                acc_col[ih * s.W] += add;
              }
            }
          }
        }
      }
    }
    if (has_template) {
      __syncthreads();
      scalar_t* out = t.grad_templates + (static_cast<int64_t>(p) * s.C_in + c0) * s.in_pixels;
      for (int e = tid; e < channels * static_cast<int>(s.in_pixels); e += kDwThreads) {
        out[e] = static_cast<scalar_t>(gt[e]);
      }
    }
  }
}

template <typename scalar_t>
void launch_depthwise(const DepthwisePlan& plan, const Shape& s, const PassTensors& pt, const DeviceBuckets& b,
                      bool backward) {
  const Tensors<scalar_t> t = kernel_tensors<scalar_t>(pt);
  auto* kernel = backward ? &depthwise_backward_kernel<scalar_t> : &depthwise_forward_kernel<scalar_t>;
  allow_dynamic_smem(kernel, plan.smem);
  const int64_t units = static_cast<int64_t>(s.P + 1) * plan.chunks;
  const int64_t resident = static_cast<int64_t>(resident_blocks(kernel, kDwThreads, plan.smem)) * multiprocessor_count();
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(units, resident)));
  launch(kernel, dim3(blocks), kDwThreads, plan.smem, current_stream(), t, s, b.view, plan);
}

}  // namespace

DepthwisePlan plan_depthwise(const Shape& s, std::size_t element_size, bool backward) {
  DepthwisePlan plan;
  if (s.Cig != 1) return plan;
  const std::size_t wide = element_size == 8 ? 8 : 4;
  const int rows_t = std::max(s.H + s.pad_h, (s.H_out - 1) * s.stride_h + (s.kH - 1) * s.dil_h + 1);
  const int pitch_t = std::max(s.W + s.pad_w, (s.W_out - 1) * s.stride_w + (s.kW - 1) * s.dil_w + 1);
  const int rows_g = std::max(s.H_out + (s.kH - 1) * s.dil_h, s.H + s.pad_h) + 1;
  const int pitch_g = std::max(s.W_out + (s.kW - 1) * s.dil_w, s.W + s.pad_w) + 1;
  const std::size_t budget = std::min<std::size_t>(smem_budget(), 64 * 1024);  // several blocks per multiprocessor
  for (int channels = std::min(16, s.C_in); channels >= 1; channels /= 2) {
    plan.channels = channels;
    plan.chunks = ceil_div(s.C_in, channels);
    plan.instances = 4;
    const int per_instance = channels * s.Cog;
    const int64_t raw_t = template_raw_elements(s, channels, s.H, s.W, static_cast<int>(element_size));
    SmemLayout l;
    plan.off_planes = l.take(wide * channels * rows_t * pitch_t);
    if (backward) {
      plan.off_grads = l.take(wide * per_instance * rows_g * pitch_g);
      plan.off_weights = l.take(wide * per_instance * s.taps);
      plan.off_accumulators = l.take(wide * channels * s.in_pixels);
      plan.off_partial = l.take(wide * per_instance * s.W_out * (s.taps + 1));
      plan.off_raw = l.take(element_size * std::max<int64_t>(raw_t, static_cast<int64_t>(per_instance) * s.out_pixels));
    } else {
      plan.off_weights = l.take(wide * plan.instances * per_instance * s.taps);
      plan.off_raw = l.take(element_size * raw_t);
    }
    plan.smem = l.bytes;
    if (plan.smem <= budget) {
      plan.applies = true;
      return plan;
    }
  }
  return plan;
}

void run_depthwise(const DepthwisePlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                   bool backward) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.templates.scalar_type(), "instance_aware_conv_depthwise",
                                  [&] { launch_depthwise<scalar_t>(plan, s, t, b, backward); });
}

}  // namespace pointins_ops::cuda
