// Forward of the conv path: output[n, co, pixel] = bias[n, co] + sum over (tap, c) of weight[n, co, c, tap] *
// template_p[c, pixel + tap], for all the instances n of template p at once.
//
// A unit of work is (row tile of a bucket, group, tile of output pixels). Its template band (the input pixels
// the tile's outputs read, all taps included) is staged channels-last, [slot][c], with one extra slot of
// zeros; a table gives, for each (tap, output pixel), the band slot it reads or the zero slot (padding). The
// weights of the tile's rows are staged as [row][tap][c]. Then each k-step (one tap, 16 channels) is an mma
// whose B rows come from the table: the im2col matrix is never formed, and a template element is loaded once
// per tile instead of once per tap.
//
// Staging is a two-step pipeline: the tile's weight rows and template band are copied raw (their global
// layout) into shared memory with cp.async (staging.cuh), one stage ahead, so the next unit's copies are in
// flight while this one computes; then the block transposes them into the layouts above. The input channels
// are staged whole when they fit (one stage per unit, and the warps sweep any number of 32 x 32 items), else
// in chunks with one item per warp.
#include "paths.h"
#include "staging.cuh"

namespace pointins_ops::cuda {
namespace {

// Everything about one unit of work the kernel derives from its index.
struct ForwardUnit {
  TileInfo tile;
  int rows, group;
  int oh0, ow0, oh_n, ow_n, pixels;
  int ih_lo, iw_lo, band_h, band_w;
};

PI_DEVICE ForwardUnit forward_unit(int unit, const Shape& s, const Buckets& buckets, const ConvForwardPlan& plan) {
  const int spatial = plan.tiles_h * plan.tiles_w;
  const int per_tile = s.groups * spatial;
  ForwardUnit u;
  const int rest = unit % per_tile;
  u.tile = buckets.tile(unit / per_tile);
  u.group = rest / spatial;
  const int tile_h = (rest % spatial) / plan.tiles_w, tile_w = rest % plan.tiles_w;
  u.rows = min(plan.tile_rows, buckets.rows(u.tile.p) - u.tile.first);
  u.oh0 = tile_h * plan.tile_h, u.ow0 = tile_w * plan.tile_w;
  u.oh_n = min(plan.tile_h, s.H_out - u.oh0), u.ow_n = min(plan.tile_w, s.W_out - u.ow0);
  u.pixels = u.oh_n * u.ow_n;
  // The input band of the tile, clipped to the template (taps that fall outside read the zero slot).
  u.ih_lo = max(0, u.oh0 * s.stride_h - s.pad_h);
  const int ih_hi = min(s.H, (u.oh0 + u.oh_n - 1) * s.stride_h - s.pad_h + (s.kH - 1) * s.dil_h + 1);
  u.iw_lo = max(0, u.ow0 * s.stride_w - s.pad_w);
  const int iw_hi = min(s.W, (u.ow0 + u.ow_n - 1) * s.stride_w - s.pad_w + (s.kW - 1) * s.dil_w + 1);
  u.band_h = max(0, ih_hi - u.ih_lo), u.band_w = max(0, iw_hi - u.iw_lo);
  return u;
}

template <typename Math>
__global__ void __launch_bounds__(kThreads, 1)
    conv_forward_kernel(Tensors<typename Math::elem> t, Shape s, Buckets buckets, ConvForwardPlan plan) {
  using scalar_t = typename Math::elem;
  using acc_t = typename Math::acc;
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  unsigned char* smem = dynamic_smem();
  auto* rows_s = reinterpret_cast<int64_t*>(smem + plan.off_rows);  // global row id, or -1
  auto* table = reinterpret_cast<int16_t*>(smem + plan.off_table);  // [tap][pixel] -> band slot
  auto* pixel_s = reinterpret_cast<int*>(smem + plan.off_pixels);   // output pixel offset, or -1
  auto* a_s = reinterpret_cast<scalar_t*>(smem + plan.off_a);       // [row][tap][c]
  auto* b_s = reinterpret_cast<scalar_t*>(smem + plan.off_b);       // [slot][c]
  auto* raw_w = reinterpret_cast<scalar_t*>(smem + plan.off_raw_w);  // [row][c][tap] as in global memory
  auto* raw_t = reinterpret_cast<scalar_t*>(smem + plan.off_raw_t);  // the band, see copy_template_region
  auto* weight_offsets = reinterpret_cast<int*>(smem + plan.off_offsets);  // raw (c, tap) -> tap * chunk + c
  const int tid = static_cast<int>(threadIdx.x), warp = warp_id();
  const int units = buckets.tile_count() * s.groups * plan.tiles_h * plan.tiles_w;  // < 2^31 (host check)

  // The raw copies of (unit, chunk), committed as one cp.async group.
  const auto issue = [&](int unit, int chunk) {
    const ForwardUnit u = forward_unit(unit, s, buckets, plan);
    if (u.tile.p < s.P) {
      const int c0 = chunk * plan.chunk, c_count = min(plan.chunk, s.Cig - c0);
      const scalar_t* w0 = t.weight + static_cast<int64_t>(c0) * s.taps;
      copy_runs(raw_w, plan.raw_w_pitch, u.rows, c_count * s.taps,
                common_granule(reinterpret_cast<uintptr_t>(w0), s.K * kElem),
                [&](int r) { return w0 + buckets.row_id(u.tile.p, u.tile.first + r, u.group, s.C_out) * s.K; },
                t.weight);
      const scalar_t* tpl = t.templates + u.tile.p * t.t_p + static_cast<int64_t>(u.group * s.Cig + c0) * t.t_c;
      copy_template_region(tpl, t, s, c_count, u.ih_lo, u.iw_lo, u.band_h, u.band_w, raw_t);
    }
    cp_async_commit();
  };

  // The raw copies of (unit, chunk) rearranged into a_s and b_s, with zeros past the channels and the rows.
  const auto transpose = [&](const ForwardUnit& u, int chunk) {
    const int c_count = min(plan.chunk, s.Cig - chunk * plan.chunk);
    scatter_rows(raw_w, plan.raw_w_pitch, plan.rows_pad, u.rows, c_count * s.taps, plan.chunk * s.taps, a_s,
                 [&](int r) { return r * plan.pitch_a; }, [&](int j) { return weight_offsets[j]; });
    template_to_channels_last(raw_t, template_region_layout(t, s, c_count, u.band_h, u.band_w), plan.chunk,
                              u.band_h, u.band_w, b_s, plan.pitch_b);
  };

  // Row ids, output pixel offsets and the (tap, pixel) -> slot table of a unit.
  const auto build_tables = [&](const ForwardUnit& u) {
    for (int r = tid; r < plan.rows_pad; r += kThreads) {
      rows_s[r] = r < u.rows ? buckets.row_id(u.tile.p, u.tile.first + r, u.group, s.C_out) : -1;
    }
    const int slots = u.band_h * u.band_w;
    for (int n = tid; n < plan.pixels_pad; n += kThreads) {
      int base_h = 0, base_w = 0;
      const bool real = n < u.pixels;
      if (real) {
        const int oh = u.oh0 + n / u.ow_n, ow = u.ow0 + n % u.ow_n;
        pixel_s[n] = oh * s.W_out + ow;
        base_h = oh * s.stride_h - s.pad_h - u.ih_lo;
        base_w = ow * s.stride_w - s.pad_w - u.iw_lo;
      } else {
        pixel_s[n] = -1;
      }
      int tap = 0;
      for (int kh = 0; kh < s.kH; ++kh) {
        const int ih = base_h + kh * s.dil_h;
        for (int kw = 0; kw < s.kW; ++kw, ++tap) {
          const int iw = base_w + kw * s.dil_w;
          const bool inside = real && ih >= 0 && ih < u.band_h && iw >= 0 && iw < u.band_w;
          table[tap * plan.pixels_pad + n] = static_cast<int16_t>(inside ? ih * u.band_w + iw : slots);
        }
      }
    }
  };

  const auto compute = [&](WarpItem<Math>& item, const ForwardUnit& u, int im, int in) {
    const int m_tiles = min(2, ceil_div(u.rows - im * kItemM, 16));
    const int n_tiles = min(4, ceil_div(u.pixels - in * kItemN, 8));
    for (int tap = 0; tap < s.taps; ++tap) {
      const scalar_t* a_base = a_s + tap * plan.chunk + im * kItemM * plan.pitch_a;
      const int16_t* tap_table = table + tap * plan.pixels_pad + in * kItemN;
      item.template run<Major::K, Major::K>([&](int i) { return a_base + i * plan.pitch_a; },
                                            [&](int i) { return b_s + tap_table[i] * plan.pitch_b; },
                                            plan.chunk / Math::kK, m_tiles, n_tiles);
    }
  };
  const auto store = [&](const WarpItem<Math>& item, const ForwardUnit& u, int im, int in) {
    const int m_tiles = min(2, ceil_div(u.rows - im * kItemM, 16));
    const int n_tiles = min(4, ceil_div(u.pixels - in * kItemN, 8));
    item_results<Major::K, Major::K>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
      const int r = im * kItemM + m, px = in * kItemN + n;
      if (r < u.rows && px < u.pixels) {
        const int64_t row = rows_s[r];
        if (t.bias != nullptr) v += static_cast<acc_t>(t.bias[row]);
        t.output[row * s.out_pixels + pixel_s[px]] = static_cast<scalar_t>(v);
      }
    });
  };

  for (int j = tid; j < plan.chunk * s.taps; j += kThreads) {
    weight_offsets[j] = (j % s.taps) * plan.chunk + j / s.taps;
  }
  // The block's stages, (unit, chunk) in order, each one's copies issued one stage ahead; body(u, chunk) computes.
  const auto pipeline = [&](const auto& body) {
    int unit = static_cast<int>(blockIdx.x);
    if (unit < units) issue(unit, 0);
    for (; unit < units; unit += static_cast<int>(gridDim.x)) {
      const ForwardUnit u = forward_unit(unit, s, buckets, plan);
      for (int chunk = 0; chunk < plan.chunks; ++chunk) {
        cp_async_wait<0>();
        __syncthreads();  // this stage's copies landed everywhere; the previous stage's readers are done
        if (chunk == 0) build_tables(u);
        if (u.tile.p < s.P) transpose(u, chunk);
        __syncthreads();
        // The next stage's copies fly while this one computes.
        if (chunk + 1 < plan.chunks) {
          issue(unit, chunk + 1);
        } else if (unit + static_cast<int>(gridDim.x) < units) {
          issue(unit + static_cast<int>(gridDim.x), 0);
        }
        if (u.tile.p == s.P) {  // out-of-range index: the template is never read, the rows are NaN
          if (chunk == 0) {
            for (int e = tid; e < u.rows * u.pixels; e += kThreads) {
              t.output[rows_s[e / u.pixels] * s.out_pixels + pixel_s[e % u.pixels]] = quiet_nan<scalar_t>();
            }
          }
          continue;
        }
        body(u, chunk);
      }
    }
  };

  if (plan.chunks == 1) {  // whole channels: the warps sweep the unit's items
    pipeline([&](const ForwardUnit& u, int) {
      const int n_items = ceil_div(u.pixels, kItemN);
      const int items = ceil_div(u.rows, kItemM) * n_items;
      for (int it = warp; it < items; it += kWarps) {
        WarpItem<Math> item;
        item.zero();
        compute(item, u, it / n_items, it % n_items);
        store(item, u, it / n_items, it % n_items);
      }
    });
  } else {  // channels in chunks: each warp accumulates one item over them (the plan keeps items <= kWarps)
    WarpItem<Math> carried;
    pipeline([&](const ForwardUnit& u, int chunk) {
      const int n_items = ceil_div(u.pixels, kItemN);
      if (warp >= ceil_div(u.rows, kItemM) * n_items) return;
      if (chunk == 0) carried.zero();
      compute(carried, u, warp / n_items, warp % n_items);
      if (chunk + 1 == plan.chunks) store(carried, u, warp / n_items, warp % n_items);
    });
  }
  cp_async_wait<0>();
}

template <typename Math>
void launch_forward(const ConvForwardPlan& plan, const Shape& s, const PassTensors& pt, const DeviceBuckets& b) {
  const Tensors<typename Math::elem> t = kernel_tensors<typename Math::elem>(pt);
  auto* kernel = &conv_forward_kernel<Math>;
  allow_dynamic_smem(kernel, plan.smem);
  const int64_t units = b.tile_capacity * s.groups * plan.tiles_h * plan.tiles_w;
  TORCH_CHECK(units < std::numeric_limits<int32_t>::max(), "instance_aware_conv (CUDA): too many tiles (", units, ")");
  const int blocks = persistent_blocks(kernel, plan.smem, units);
  launch(kernel, dim3(blocks), kThreads, plan.smem, current_stream(), t, s, b.view, plan);
}

}  // namespace

ConvForwardPlan plan_conv_forward(const Shape& s, std::size_t element_size, int k_step, int tile_rows) {
  const std::size_t budget = smem_budget();
  const int esize = static_cast<int>(element_size);
  const auto pitch = [&](int width) { return row_pitch(width, element_size); };
  const int cig_pad = round_up(s.Cig, k_step);
  ConvForwardPlan plan;
  std::size_t smallest = std::numeric_limits<std::size_t>::max();
  const auto layout = [&](int rows_pad, int th, int tw, int chunk) {
    plan.tile_rows = std::min(tile_rows, rows_pad);
    plan.rows_pad = rows_pad;
    plan.tile_h = th, plan.tile_w = tw;
    plan.tiles_h = ceil_div(s.H_out, th), plan.tiles_w = ceil_div(s.W_out, tw);
    plan.chunk = chunk, plan.chunks = ceil_div(cig_pad, chunk);
    plan.pixels_pad = round_up(th * tw, kItemN);
    plan.band_h = std::min(s.H, (th - 1) * s.stride_h + (s.kH - 1) * s.dil_h + 1);
    plan.band_w = std::min(s.W, (tw - 1) * s.stride_w + (s.kW - 1) * s.dil_w + 1);
    plan.pitch_a = pitch(s.taps * chunk);
    plan.pitch_b = pitch(chunk);
    plan.raw_w_pitch = raw_pitch(chunk * s.taps, esize);
    const int64_t band_slots = static_cast<int64_t>(plan.band_h) * plan.band_w;
    const int64_t raw_t = template_raw_elements(s, chunk, plan.band_h, plan.band_w, esize);
    SmemLayout l;
    plan.off_offsets = l.take(sizeof(int) * chunk * s.taps);
    plan.off_rows = l.take(sizeof(int64_t) * rows_pad);
    plan.off_table = l.take(sizeof(int16_t) * s.taps * plan.pixels_pad);
    plan.off_pixels = l.take(sizeof(int) * plan.pixels_pad);
    plan.off_a = l.take(element_size * rows_pad * plan.pitch_a);
    plan.off_b = l.take(element_size * (band_slots + 1) * plan.pitch_b);
    plan.off_raw_w = l.take(element_size * rows_pad * plan.raw_w_pitch);
    plan.off_raw_t = l.take(element_size * raw_t);
    plan.smem = l.bytes;
    smallest = std::min(smallest, plan.smem);
    return plan.smem <= budget && band_slots < 32767;
  };
  const int rows_pad = round_up(std::max(tile_rows, 1), kItemM);
  // Spatial tiles in order of preference: bands of whole output rows, the whole template first, then parts of
  // one row; at most max_pixels outputs.
  const auto try_tiles = [&](int rows, int chunk, int max_pixels) {
    for (int th = s.H_out;; th = ceil_div(th, 2)) {
      const int tw = std::min(s.W_out, max_pixels);
      const int h = std::max(1, std::min(th, max_pixels / tw));
      if (layout(rows, h, tw, chunk)) return true;
      if (th == 1) break;
    }
    for (int tw = ceil_div(std::min(s.W_out, max_pixels), 2); tw >= 8; tw = ceil_div(tw, 2)) {
      if (layout(rows, 1, tw, chunk)) return true;
    }
    return false;
  };
  // Whole input channels: one stage per unit, and the warps sweep any number of items.
  if (try_tiles(rows_pad, cig_pad, 1 << 30)) return plan;
  // Channels in chunks: each warp keeps one 32 x 32 item across the chunks, so a unit holds at most 4 items.
  for (int chunk = round_up(std::min(cig_pad, 64), k_step);; chunk = round_up(chunk / 2, k_step)) {
    for (int rows = std::min(rows_pad, 2 * kItemM); rows >= kItemM; rows -= kItemM) {
      if (try_tiles(rows, chunk, kWarps * kItemM * kItemN / rows)) return plan;
    }
    if (chunk == k_step) break;
  }
  TORCH_CHECK(false, "instance_aware_conv (CUDA): no tiling of this shape fits in shared memory (kernel ", s.kH, " x ",
              s.kW, ", dilation ", s.dil_h, " x ", s.dil_w, "; smallest tiling: ", smallest, " bytes; budget ", budget,
              ")");
}

void run_conv_forward(const ConvForwardPlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                      bool tf32) {
  with_math(t.templates.scalar_type(), tf32,
            [&](auto math) { launch_forward<typename decltype(math)::type>(plan, s, t, b); });
}

}  // namespace pointins_ops::cuda
