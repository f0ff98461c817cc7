// Forward of the conv path: output[n, co, pixel] = bias[n, co] + sum over (tap, c) of weight[n, co, c, tap] *
// template_p[c, pixel + tap], for all the instances n of template p at once.
//
// A unit of work is (row tile of a bucket, group, tile of output pixels). Its template band (the input pixels
// the tile's outputs read, all taps included) is staged channels-last, [slot][c], with one extra slot of
// zeros; a table gives, for each (tap, output pixel), the band slot it reads or the zero slot (padding). The
// weights of the tile's rows are staged as [row][tap][c]. Then each k-step (one tap, 16 channels) is an mma
// whose B rows come from the table: the im2col matrix is never formed, and a template element is loaded once
// per tile instead of once per tap. Both stagings are register-path gathers (the band is transposed from the
// template's layout, which may be strided); the input channels are staged whole when they fit (one stage per
// unit, and then the warps sweep any number of 32 x 32 items), else in chunks with one item per warp.
#include "paths.h"

namespace pointins_ops::cuda {
namespace {

template <typename Math>
__global__ void __launch_bounds__(kThreads)
    conv_forward_kernel(Tensors<typename Math::elem> t, Shape s, Buckets buckets, ConvForwardPlan plan) {
  using scalar_t = typename Math::elem;
  using acc_t = typename Math::acc;
  unsigned char* smem = dynamic_smem();
  auto* rows_s = reinterpret_cast<int64_t*>(smem + plan.off_rows);  // global row id, or -1
  auto* table = reinterpret_cast<int*>(smem + plan.off_table);      // [tap][pixel] -> band slot
  auto* pixel_s = reinterpret_cast<int*>(smem + plan.off_pixels);   // output pixel offset, or -1
  auto* a_s = reinterpret_cast<scalar_t*>(smem + plan.off_a);       // [row][tap][c]
  auto* b_s = reinterpret_cast<scalar_t*>(smem + plan.off_b);       // [slot][c]
  const int tid = static_cast<int>(threadIdx.x), warp = warp_id();
  const int spatial = plan.tiles_h * plan.tiles_w;
  const int per_tile = s.groups * spatial;
  const int64_t units = static_cast<int64_t>(buckets.tile_count()) * per_tile;

  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int tile_index = static_cast<int>(unit / per_tile);
    const int rest = static_cast<int>(unit % per_tile);
    const int group = rest / spatial, tile_h = (rest % spatial) / plan.tiles_w, tile_w = rest % plan.tiles_w;
    const TileInfo tile = buckets.tile(tile_index);
    const int rows = min(plan.tile_rows, buckets.rows(tile.p) - tile.first);
    const int oh0 = tile_h * plan.tile_h, ow0 = tile_w * plan.tile_w;
    const int oh_n = min(plan.tile_h, s.H_out - oh0), ow_n = min(plan.tile_w, s.W_out - ow0);
    const int pixels = oh_n * ow_n;
    // The input band of the tile, clipped to the template (taps that fall outside read the zero slot).
    const int ih_lo = max(0, oh0 * s.stride_h - s.pad_h);
    const int ih_hi = min(s.H, (oh0 + oh_n - 1) * s.stride_h - s.pad_h + (s.kH - 1) * s.dil_h + 1);
    const int iw_lo = max(0, ow0 * s.stride_w - s.pad_w);
    const int iw_hi = min(s.W, (ow0 + ow_n - 1) * s.stride_w - s.pad_w + (s.kW - 1) * s.dil_w + 1);
    const int band_h = max(0, ih_hi - ih_lo), band_w = max(0, iw_hi - iw_lo);
    const int slots = band_h * band_w;  // the zero slot

    __syncthreads();  // the previous unit's readers are done with the tables and stages
    for (int r = tid; r < plan.rows_pad; r += kThreads) {
      rows_s[r] = r < rows ? buckets.row_id(tile.p, tile.first + r, group, s.C_out) : -1;
    }
    for (int n = tid; n < plan.pixels_pad; n += kThreads) {
      int base_h = 0, base_w = 0;
      const bool real = n < pixels;
      if (real) {
        const int oh = oh0 + n / ow_n, ow = ow0 + n % ow_n;
        pixel_s[n] = oh * s.W_out + ow;
        base_h = oh * s.stride_h - s.pad_h - ih_lo;
        base_w = ow * s.stride_w - s.pad_w - iw_lo;
      } else {
        pixel_s[n] = -1;
      }
      int tap = 0;
      for (int kh = 0; kh < s.kH; ++kh) {
        const int ih = base_h + kh * s.dil_h;
        for (int kw = 0; kw < s.kW; ++kw, ++tap) {
          const int iw = base_w + kw * s.dil_w;
          const bool inside = real && ih >= 0 && ih < band_h && iw >= 0 && iw < band_w;
          table[tap * plan.pixels_pad + n] = inside ? ih * band_w + iw : slots;
        }
      }
    }
    __syncthreads();

    if (tile.p == s.P) {  // out-of-range index: the template is never read, the rows are NaN
      for (int e = tid; e < rows * pixels; e += kThreads) {
        t.output[rows_s[e / pixels] * s.out_pixels + pixel_s[e % pixels]] = quiet_nan<scalar_t>();
      }
      continue;
    }

    const scalar_t* tpl = t.templates + tile.p * t.t_p + static_cast<int64_t>(group) * s.Cig * t.t_c;
    const auto stage = [&](int c0) {
      stage_weight_rows(t.weight, s, rows_s, plan.rows_pad, plan.chunk, c0, plan.div_row, plan.div_taps,
                        [&](int r, int c, int tap, scalar_t v) { a_s[r * plan.pitch_a + tap * plan.chunk + c] = v; });
      stage_template_band(tpl, t, s, c0, plan.chunk, ih_lo, iw_lo, band_h, band_w, b_s, plan.pitch_b);
    };

    const int m_items = ceil_div(rows, kItemM), n_items = ceil_div(pixels, kItemN);
    const int items = m_items * n_items;
    const auto compute = [&](WarpItem<Math>& item, int im, int in) {
      const int m_tiles = min(2, ceil_div(rows - im * kItemM, 16));
      const int n_tiles = min(4, ceil_div(pixels - in * kItemN, 8));
      for (int tap = 0; tap < s.taps; ++tap) {
        const scalar_t* a_base = a_s + tap * plan.chunk;
        const int* tap_table = table + tap * plan.pixels_pad + in * kItemN;
        item.template run<Major::K, Major::K>(
            [&](int i) { return a_base + (im * kItemM + i) * plan.pitch_a; },
            [&](int i) { return b_s + tap_table[i] * plan.pitch_b; }, plan.chunk / Math::kK, m_tiles, n_tiles);
      }
    };
    const auto store = [&](const WarpItem<Math>& item, int im, int in) {
      const int m_tiles = min(2, ceil_div(rows - im * kItemM, 16));
      const int n_tiles = min(4, ceil_div(pixels - in * kItemN, 8));
      item_results<Math, Major::K, Major::K>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
        const int r = im * kItemM + m, px = in * kItemN + n;
        if (r < rows && px < pixels) {
          const int64_t row = rows_s[r];
          if (t.bias != nullptr) v += static_cast<acc_t>(t.bias[row]);
          t.output[row * s.out_pixels + pixel_s[px]] = static_cast<scalar_t>(v);
        }
      });
    };

    if (plan.chunks == 1) {
      stage(0);
      __syncthreads();
      for (int it = warp; it < items; it += kWarps) {
        WarpItem<Math> item;
        item.zero();
        compute(item, it / n_items, it % n_items);
        store(item, it / n_items, it % n_items);
      }
    } else {  // the plan keeps items <= kWarps: each warp accumulates its item over the chunks
      WarpItem<Math> item;
      item.zero();
      for (int chunk = 0; chunk < plan.chunks; ++chunk) {
        if (chunk > 0) __syncthreads();
        stage(chunk * plan.chunk);
        __syncthreads();
        if (warp < items) compute(item, warp / n_items, warp % n_items);
      }
      if (warp < items) store(item, warp / n_items, warp % n_items);
    }
  }
}

template <typename Math>
void launch_forward(const ConvForwardPlan& plan, const Shape& s, const PassTensors& pt, const DeviceBuckets& b) {
  const Tensors<typename Math::elem> t = kernel_tensors<typename Math::elem>(pt);
  auto* kernel = &conv_forward_kernel<Math>;
  allow_dynamic_smem(kernel, plan.smem);
  const int64_t units = b.tile_capacity * s.groups * plan.tiles_h * plan.tiles_w;
  const int blocks = persistent_blocks(kernel, plan.smem, units);
  launch(kernel, dim3(blocks), kThreads, plan.smem, current_stream(), t, s, b.view, plan);
}

}  // namespace

ConvForwardPlan plan_conv_forward(const Shape& s, std::size_t element_size, int k_step, int tile_rows) {
  const std::size_t budget = smem_budget();
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
    SmemLayout l;
    plan.off_rows = l.take(sizeof(int64_t) * rows_pad);
    plan.off_table = l.take(sizeof(int) * s.taps * plan.pixels_pad);
    plan.off_pixels = l.take(sizeof(int) * plan.pixels_pad);
    plan.off_a = l.take(element_size * rows_pad * plan.pitch_a);
    plan.off_b = l.take(element_size * (plan.band_h * plan.band_w + 1) * plan.pitch_b);
    plan.smem = l.bytes;
    smallest = std::min(smallest, plan.smem);
    plan.div_taps = FastDiv(static_cast<uint32_t>(s.taps));
    plan.div_row = FastDiv(static_cast<uint32_t>(chunk * s.taps));
    return plan.smem <= budget;
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
