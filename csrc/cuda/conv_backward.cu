// Backward of the conv path: grad_weight (with grad_bias) and grad_templates.
//
//   grad_weight[row, c, tap] = sum over output pixels o of grad_output[row, o] * template_p[c, in(o, tap)]
//   grad_bias[row]           = sum over o of grad_output[row, o]
//   grad_templates[p, c, i]  = sum over p's rows and taps of weight[row, c, tap] * grad_output[row, out(i, tap)]
//
// Both read grad_output, the largest tensor, so for templates that fit whole in shared memory one kernel
// computes both ("fused"): a unit is (template, group, channel tile), it stages the template once and then
// walks the bucket's rows in chunks, staging each chunk's grad_output channels-last ([pixel][row]) and its
// weights ([c][tap][row]); per chunk the warps first finish that chunk's grad_weight rows (reduction over all
// output pixels) and then add the chunk's share to grad_templates, kept in registers across chunks. Larger
// templates are cut into spatial tiles of input pixels and use two launches: grad_templates per (template,
// group, channel tile, spatial tile) over all rows, and grad_weight per (row tile, group, channel tile) over
// all spatial tiles, each output pixel owned by exactly one tile. No atomics and no partial sums: every result
// is summed by one warp in a fixed order. grad_bias is the row sum of grad_output, taken by the grad_weight
// items of the first column tile from the same staged tiles (a column of ones on the tensor cores).
//
// As in the forward, tables map (tap, pixel) to staged slots, with one slot of zeros for padding, stride
// holes and rows past the end, so the inner loops are ldmatrix + mma (or vector loads + FFMA) only.
#include "paths.h"
#include "staging.cuh"

namespace pointins_ops::cuda {
namespace {

enum Mode : int { kFused = 0, kTemplatesOnly = 1, kWeightOnly = 2 };

PI_DEVICE int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
PI_DEVICE int ceil_div_signed(int a, int b) { return -floor_div(-a, b); }

// The rows of grad_output and of the template one spatial tile (input rows [lo, hi) along one axis) uses.
struct AxisRegions {
  int own_lo, own_hi;  // output positions whose grad_weight terms this tile owns (a partition over tiles)
  int go_lo, go_hi;    // grad_output positions staged
  int t_lo, t_hi;      // template positions staged
};

PI_DEVICE AxisRegions axis_regions(int lo, int hi, int size, int size_out, int stride, int pad, int dil, int k,
                                   int mode) {
  AxisRegions r;
  r.own_lo = lo == 0 ? 0 : min(size_out, max(0, ceil_div_signed(lo + pad, stride)));
  r.own_hi = hi == size ? size_out : min(size_out, max(0, ceil_div_signed(hi + pad, stride)));
  const int need_lo = max(0, ceil_div_signed(lo + pad - (k - 1) * dil, stride));
  const int need_hi = min(size_out, floor_div(hi - 1 + pad, stride) + 1);  // exclusive
  if (mode == kTemplatesOnly) {
    r.go_lo = need_lo, r.go_hi = max(need_lo, need_hi);
  } else if (mode == kWeightOnly) {
    r.go_lo = r.own_lo, r.go_hi = r.own_hi;
  } else {
    r.go_lo = min(need_lo, r.own_lo), r.go_hi = max(need_hi, r.own_hi);
  }
  if (r.own_hi > r.own_lo) {
    r.t_lo = max(0, r.own_lo * stride - pad);
    r.t_hi = min(size, (r.own_hi - 1) * stride - pad + (k - 1) * dil + 1);
    r.t_hi = max(r.t_lo, r.t_hi);
  } else {
    r.t_lo = r.t_hi = 0;
  }
  return r;
}

// The regions of one spatial tile of input pixels, and their sizes.
struct Regions {
  AxisRegions h, w;
  int go_w, go_slots, t_w, t_slots, own_w, own_count, in_h0, in_w0, in_tile_w, in_count;
};

PI_DEVICE Regions regions_of(int sp, int mode, const Shape& s, const ConvBackwardPlan& plan) {
  Regions r;
  const int th = sp / plan.tiles_w, tw = sp % plan.tiles_w;
  r.in_h0 = th * plan.tile_h, r.in_w0 = tw * plan.tile_w;
  const int in_h1 = min(s.H, r.in_h0 + plan.tile_h), in_w1 = min(s.W, r.in_w0 + plan.tile_w);
  r.in_tile_w = in_w1 - r.in_w0;
  r.in_count = (in_h1 - r.in_h0) * r.in_tile_w;
  r.h = axis_regions(r.in_h0, in_h1, s.H, s.H_out, s.stride_h, s.pad_h, s.dil_h, s.kH, mode);
  r.w = axis_regions(r.in_w0, in_w1, s.W, s.W_out, s.stride_w, s.pad_w, s.dil_w, s.kW, mode);
  r.go_w = r.w.go_hi - r.w.go_lo;
  r.go_slots = (r.h.go_hi - r.h.go_lo) * r.go_w;
  r.t_w = r.w.t_hi - r.w.t_lo;
  r.t_slots = (r.h.t_hi - r.h.t_lo) * r.t_w;
  r.own_w = r.w.own_hi - r.w.own_lo;
  r.own_count = (r.h.own_hi - r.h.own_lo) * r.own_w;
  return r;
}

// One unit of work: (template, group, channel tile, spatial tile) for the fused and grad_templates modes, (row
// tile, group, channel tile) for the grad_weight mode; its stages ("subs": chunks of rows, or spatial tiles)
// repeat for each group of items when the unit has more items than the warps keep.
struct BackwardUnit {
  int p, group, c0, c_count, sp;
  int first, rows;  // grad_weight mode: the row tile; else the bucket's rows are [0, rows)
  bool has_template;
  int subs, item_groups;
};

PI_DEVICE BackwardUnit backward_unit(int unit, int mode, const Shape& s, const Buckets& buckets,
                                     const ConvBackwardPlan& plan, int persist) {
  BackwardUnit u;
  const int spatial = plan.tiles_h * plan.tiles_w;
  if (mode != kWeightOnly) {
    u.sp = unit % spatial;
    int rest = unit / spatial;
    const int ct = rest % plan.c_tiles;
    rest /= plan.c_tiles;
    u.group = rest % s.groups;
    u.p = rest / s.groups;
    u.c0 = ct * plan.c_tile;
    u.first = 0;
    u.rows = buckets.rows(u.p);
    u.has_template = u.p < s.P;
    u.subs = max(1, ceil_div(u.rows, plan.tile_rows));
    const int th = u.sp / plan.tiles_w, tw = u.sp % plan.tiles_w;
    const int in_count = (min(s.H, (th + 1) * plan.tile_h) - th * plan.tile_h) *
                         (min(s.W, (tw + 1) * plan.tile_w) - tw * plan.tile_w);
    u.c_count = min(plan.c_tile, s.Cig - u.c0);
    const int items = u.has_template ? ceil_div(u.c_count, 16) * ceil_div(in_count, 64) : 0;
    u.item_groups = mode == kFused ? 1 : max(1, ceil_div(items, kWarps * persist));
  } else {
    const int ct = unit % plan.c_tiles;
    const int rest = unit / plan.c_tiles;
    u.group = rest % s.groups;
    const TileInfo tile = buckets.tile(rest / s.groups);
    u.p = tile.p;
    u.first = tile.first;
    u.rows = min(plan.tile_rows, buckets.rows(tile.p) - tile.first);
    u.c0 = ct * plan.c_tile;
    u.c_count = min(plan.c_tile, s.Cig - u.c0);
    u.has_template = u.p < s.P;
    u.sp = 0;
    u.subs = spatial;
    const int items = ceil_div(u.rows, kItemM) * ceil_div(s.taps * plan.c_pad, kItemN);
    u.item_groups = max(1, ceil_div(items, kWarps * persist));
  }
  return u;
}

template <typename Math>
__global__ void __launch_bounds__(kThreads, 1)
    conv_backward_kernel(Tensors<typename Math::elem> t, Shape s, Buckets buckets, ConvBackwardPlan plan, int mode) {
  using scalar_t = typename Math::elem;
  using acc_t = typename Math::acc;
  using Item = WarpItem<Math>;              // grad_weight: 32 rows x 32 (tap, channel) columns
  using TemplateItem = WarpItem<Math, 1, 8>;  // grad_templates: 16 channels x 64 input pixels
  constexpr int kTM = 16, kTN = 64;
  constexpr int kPersist = ConvBackwardPlan::persistent_items(sizeof(acc_t));
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  unsigned char* smem = dynamic_smem();
  auto* rows_s = reinterpret_cast<int64_t*>(smem + plan.off_rows);
  auto* tbl_g = reinterpret_cast<int16_t*>(smem + plan.off_tbl_g);   // [tap][input pixel] -> grad_output slot
  auto* in_off = reinterpret_cast<int*>(smem + plan.off_in_off);     // input pixel offset, or -1
  auto* own_slot = reinterpret_cast<int16_t*>(smem + plan.off_own);  // owned output pixel k -> grad_output slot
  auto* tbl_t = reinterpret_cast<int16_t*>(smem + plan.off_tbl_t);   // [tap][owned output pixel] -> template slot
  auto* go_s = reinterpret_cast<scalar_t*>(smem + plan.off_go);      // [slot][row]
  auto* t_s = reinterpret_cast<scalar_t*>(smem + plan.off_t);        // [slot][c]
  auto* w_s = reinterpret_cast<scalar_t*>(smem + plan.off_w);        // [c][tap][row]
  auto* raw_g = reinterpret_cast<scalar_t*>(smem + plan.off_raw_g);  // grad_output rows as in global memory
  auto* raw_w = reinterpret_cast<scalar_t*>(smem + plan.off_raw_w);  // weight rows as in global memory
  auto* raw_t = reinterpret_cast<scalar_t*>(smem + plan.off_raw_t);  // the template region
  auto* weight_offsets = reinterpret_cast<int*>(smem + plan.off_offsets);  // raw (c, tap) -> c * pitch_w + tap * rows_pad
  const int tid = static_cast<int>(threadIdx.x), warp = warp_id();
  const int c_shift = plan.c_pad == 16 ? 4 : 5;
  const int gw_cols = s.taps * plan.c_pad;
  // < 2^31 (host check)
  const int units = mode == kWeightOnly ? buckets.tile_count() * s.groups * plan.c_tiles
                                        : (mode == kFused ? s.P + 1 : s.P) * s.groups * plan.c_tiles * plan.tiles_h *
                                              plan.tiles_w;

  // The staged rows of a stage: [first, first + count) of the bucket.
  const auto stage_rows = [&](const BackwardUnit& u, int sub, int& first, int& count) {
    if (mode == kWeightOnly) {
      first = u.first, count = u.rows;
    } else {
      first = sub * plan.tile_rows, count = max(0, min(plan.tile_rows, u.rows - first));
    }
  };
  const auto stage_regions = [&](const BackwardUnit& u, int sub) {
    return regions_of(mode == kWeightOnly ? sub : u.sp, mode, s, plan);
  };
  const auto grad_output_whole = [&](const Regions& r) { return r.go_w == s.W_out; };
  const auto stages_template = [&](int ig, int sub) { return mode == kWeightOnly || (mode == kFused && ig == 0 && sub == 0); };

  // --- the raw copies of one stage (one cp.async group) ---
  const auto issue = [&](const BackwardUnit& u, int ig, int sub) {
    int first, count;
    stage_rows(u, sub, first, count);
    const Regions r = stage_regions(u, sub);
    const int go_h = r.h.go_hi - r.h.go_lo;
    if (count > 0 && r.go_slots > 0) {
      const scalar_t* g0 = t.grad_output + static_cast<int64_t>(r.h.go_lo) * s.W_out + r.w.go_lo;
      const auto row_of = [&](int i) { return buckets.row_id(u.p, first + i, u.group, s.C_out); };
      if (grad_output_whole(r)) {
        copy_runs(raw_g, plan.raw_g_pitch, count, r.go_slots,
                  common_granule(reinterpret_cast<uintptr_t>(g0), s.out_pixels * kElem),
                  [&](int i) { return g0 + row_of(i) * s.out_pixels; }, t.weight);
      } else {
        const FastDiv div_h(static_cast<uint32_t>(go_h));
        copy_runs(raw_g, plan.raw_g_row_pitch, count * go_h, r.go_w,
                  min(common_granule(reinterpret_cast<uintptr_t>(g0), s.out_pixels * kElem),
                      granule_of(static_cast<uint64_t>(s.W_out) * kElem)),
                  [&](int run) {
                    uint32_t i, oh;
                    div_h.divmod(static_cast<uint32_t>(run), i, oh);
                    return g0 + row_of(static_cast<int>(i)) * s.out_pixels + static_cast<int64_t>(oh) * s.W_out;
                  },
                  t.weight);
      }
    }
    if (mode != kWeightOnly && count > 0 && u.has_template) {
      const scalar_t* w0 = t.weight + static_cast<int64_t>(u.c0) * s.taps;
      copy_runs(raw_w, plan.raw_w_pitch, count, u.c_count * s.taps,
                common_granule(reinterpret_cast<uintptr_t>(w0), s.K * kElem),
                [&](int i) { return w0 + buckets.row_id(u.p, first + i, u.group, s.C_out) * s.K; }, t.weight);
    }
    if (stages_template(ig, sub) && u.has_template && r.t_slots > 0) {
      const scalar_t* tpl = t.templates + u.p * t.t_p + static_cast<int64_t>(u.group * s.Cig + u.c0) * t.t_c;
      copy_template_region(tpl, t, s, u.c_count, r.h.t_lo, r.w.t_lo, r.h.t_hi - r.h.t_lo, r.t_w, raw_t);
    }
    cp_async_commit();
  };

  // --- the raw copies rearranged: grad_output [slot][row], weights [c][tap][row], template [slot][c] ---
  const auto transpose = [&](const BackwardUnit& u, int ig, int sub, const Regions& r) {
    int first, count;
    stage_rows(u, sub, first, count);
    const int go_h = r.h.go_hi - r.h.go_lo;
    if (grad_output_whole(r)) {  // one raw row per staged row; consecutive threads take consecutive rows
      scatter_rows(raw_g, plan.raw_g_pitch, plan.rows_pad, count, r.go_slots, r.go_slots, go_s, [](int row) { return row; },
                   [&](int j) { return j * plan.pitch_g; });
    } else {  // one raw row per (staged row, output row)
      const FastDiv div_h(static_cast<uint32_t>(max(go_h, 1)));
      scatter_rows(raw_g, plan.raw_g_row_pitch, plan.rows_pad * go_h, count * go_h, r.go_w, r.go_w, go_s,
                   [&](int i) {
                     uint32_t row, oh;
                     div_h.divmod(static_cast<uint32_t>(i), row, oh);
                     return static_cast<int>(oh) * r.go_w * plan.pitch_g + static_cast<int>(row);
                   },
                   [&](int j) { return j * plan.pitch_g; });
    }
    for (int row = tid; row < plan.rows_pad; row += kThreads) go_s[r.go_slots * plan.pitch_g + row] = scalar_t(0);
    if (mode != kWeightOnly) {
      scatter_rows(raw_w, plan.raw_w_pitch, plan.rows_pad, u.has_template ? count : 0, u.c_count * s.taps,
                   plan.c_pad * s.taps, w_s, [](int row) { return row; }, [&](int j) { return weight_offsets[j]; });
    }
    if (stages_template(ig, sub) && u.has_template) {
      const int t_h = r.h.t_hi - r.h.t_lo;
      template_to_channels_last(raw_t, template_region_layout(t, s, u.c_count, t_h, r.t_w), plan.c_pad, t_h, r.t_w,
                                t_s, plan.pitch_t);
    }
    for (int i = tid; i < plan.rows_pad; i += kThreads) {
      rows_s[i] = i < count ? buckets.row_id(u.p, first + i, u.group, s.C_out) : -1;
    }
  };

  // --- tables ---
  // grad_templates: for each input pixel of the tile and tap, the grad_output slot it reads.
  const auto build_in_tables = [&](const Regions& r) {
    for (int n = tid; n < plan.in_pad; n += kThreads) {
      const bool real = n < r.in_count;
      const int ih = r.in_h0 + (real ? n / r.in_tile_w : 0), iw = r.in_w0 + (real ? n % r.in_tile_w : 0);
      in_off[n] = real ? ih * s.W + iw : -1;
      int tap = 0;
      for (int kh = 0; kh < s.kH; ++kh) {
        const int num_h = ih + s.pad_h - kh * s.dil_h;  // = oh * stride_h when a tap reaches (ih, iw)
        const int oh = num_h >= 0 ? num_h / s.stride_h : -1;
        const bool ok_h = num_h >= 0 && oh * s.stride_h == num_h && oh >= r.h.go_lo && oh < r.h.go_hi;
        for (int kw = 0; kw < s.kW; ++kw, ++tap) {
          const int num_w = iw + s.pad_w - kw * s.dil_w;
          const int ow = num_w >= 0 ? num_w / s.stride_w : -1;
          const bool ok = real && ok_h && num_w >= 0 && ow * s.stride_w == num_w && ow >= r.w.go_lo && ow < r.w.go_hi;
          tbl_g[tap * plan.in_pad + n] = static_cast<int16_t>(ok ? (oh - r.h.go_lo) * r.go_w + (ow - r.w.go_lo)
                                                                 : r.go_slots);
        }
      }
    }
  };
  // grad_weight: the owned output pixels, their grad_output slots and, per tap, their template slots.
  const auto build_own_tables = [&](const Regions& r) {
    for (int k = tid; k < plan.own_pad; k += kThreads) {
      const bool real = k < r.own_count;
      const int oh = r.h.own_lo + (real ? k / r.own_w : 0), ow = r.w.own_lo + (real ? k % r.own_w : 0);
      own_slot[k] = static_cast<int16_t>(real ? (oh - r.h.go_lo) * r.go_w + (ow - r.w.go_lo) : r.go_slots);
      int tap = 0;
      for (int kh = 0; kh < s.kH; ++kh) {
        const int ih = oh * s.stride_h - s.pad_h + kh * s.dil_h - r.h.t_lo;
        for (int kw = 0; kw < s.kW; ++kw, ++tap) {
          const int iw = ow * s.stride_w - s.pad_w + kw * s.dil_w - r.w.t_lo;
          const bool ok = real && ih >= 0 && ih < r.h.t_hi - r.h.t_lo && iw >= 0 && iw < r.t_w;
          tbl_t[tap * plan.own_pad + k] = static_cast<int16_t>(ok ? ih * r.t_w + iw : r.t_slots);
        }
      }
    }
  };

  // --- grad_weight items: rows 32 im.. x columns 32 in.. of (tap, c), over the owned output pixels ---
  const auto weight_item = [&](Item& item, int im, int in, int rows, bool products, bool sums) {
    const int m_tiles = min(2, ceil_div(rows - im * kItemM, 16));
    const int n_tiles = min(4, (gw_cols - in * kItemN) / 8);
    const auto row_a = [&](int k, int m) { return go_s + own_slot[k] * plan.pitch_g + im * kItemM + m; };
    const auto row_b = [&](int k, int n) {
      const int col = in * kItemN + n;
      const int tap = min(col >> c_shift, s.taps - 1);  // FFMA reads whole items: columns past the end are dropped
      return t_s + tbl_t[tap * plan.own_pad + k] * plan.pitch_t + (col & (plan.c_pad - 1));
    };
    if (products || sums) {
      item.template run<Major::MN, Major::MN, true>(row_a, row_b, plan.own_pad / Math::kK, m_tiles, n_tiles, sums,
                                                    products);
    }
  };
  const auto store_weight_item = [&](const Item& item, int im, int in, int rows, int c0, int c_count, bool nan,
                                     bool sums) {
    const int m_tiles = min(2, ceil_div(rows - im * kItemM, 16));
    const int n_tiles = min(4, (gw_cols - in * kItemN) / 8);
    item_results<Major::MN, Major::MN>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
      const int r = im * kItemM + m, col = in * kItemN + n;
      const int c = col & (plan.c_pad - 1), tap = col >> c_shift;
      if (r < rows && col < gw_cols && c < c_count) {
        t.grad_weight[rows_s[r] * s.K + static_cast<int64_t>(c0 + c) * s.taps + tap] =
            nan ? quiet_nan<scalar_t>() : static_cast<scalar_t>(v);
      }
    });
    if (sums) {
      item_sums<Major::MN>(item, m_tiles, [&](int m, acc_t v) {
        const int r = im * kItemM + m;
        if (r < rows) t.grad_bias[rows_s[r]] = static_cast<scalar_t>(v);
      });
    }
  };
  // --- grad_templates items: channels 16 im.. x input pixels 64 in.., over the staged rows and all taps ---
  const auto template_item = [&](TemplateItem& item, int im, int in, int in_count) {
    const int n_tiles = min(8, ceil_div(in_count - in * kTN, 8));
    for (int tap = 0; tap < s.taps; ++tap) {
      const scalar_t* a_base = w_s + tap * plan.rows_pad + im * kTM * plan.pitch_w;
      const int16_t* tap_table = tbl_g + tap * plan.in_pad + in * kTN;
      item.template run<Major::K, Major::K>([&](int i) { return a_base + i * plan.pitch_w; },
                                            [&](int i) { return go_s + tap_table[i] * plan.pitch_g; },
                                            plan.rows_pad / Math::kK, 1, n_tiles);
    }
  };
  const auto store_template_item = [&](const TemplateItem& item, int im, int in, int c_count, int in_count,
                                       int64_t base) {
    const int n_tiles = min(8, ceil_div(in_count - in * kTN, 8));
    item_results<Major::K, Major::K>(item, 1, n_tiles, [&](int m, int n, acc_t v) {
      const int c = im * kTM + m, px = in * kTN + n;
      if (c < c_count && px < in_count) t.grad_templates[base + c * s.in_pixels + in_off[px]] = static_cast<scalar_t>(v);
    });
  };

  for (int j = tid; j < plan.c_pad * s.taps; j += kThreads) {
    weight_offsets[j] = (j / s.taps) * plan.pitch_w + (j % s.taps) * plan.rows_pad;
  }
  // --- the block's stages: (unit, item group, sub) in order, each one's copies issued one stage ahead ---
  const auto pipeline = [&](const auto& body) {
    int unit = static_cast<int>(blockIdx.x);
    int ig = 0, sub = 0;
    if (unit < units) issue(backward_unit(unit, mode, s, buckets, plan, kPersist), 0, 0);
    while (unit < units) {
      const BackwardUnit u = backward_unit(unit, mode, s, buckets, plan, kPersist);
      const Regions r = stage_regions(u, sub);
      int next_unit = unit;  // the stage after this one
      int next_ig = ig, next_sub = sub + 1;
      if (next_sub == u.subs) {
        next_sub = 0;
        if (++next_ig == u.item_groups) next_ig = 0, next_unit += static_cast<int>(gridDim.x);
      }
      cp_async_wait<0>();
      __syncthreads();  // this stage's copies landed everywhere; the previous stage's readers are done
      if (mode != kWeightOnly && ig == 0 && sub == 0) {
        build_in_tables(r);
        if (mode == kFused) build_own_tables(r);
      }
      if (mode == kWeightOnly) build_own_tables(r);
      transpose(u, ig, sub, r);
      __syncthreads();
      if (next_unit < units) issue(backward_unit(next_unit, mode, s, buckets, plan, kPersist), next_ig, next_sub);
      body(u, r, ig, sub);
      unit = next_unit, ig = next_ig, sub = next_sub;
    }
  };

  if (mode == kWeightOnly) {
    Item gw_acc[kPersist];  // grad_weight items kept across the spatial tiles
    pipeline([&](const BackwardUnit& u, const Regions&, int ig, int sub) {
      const int w_n = ceil_div(gw_cols, kItemN);
      const int items = ceil_div(u.rows, kItemM) * w_n;
#pragma unroll
      for (int j = 0; j < kPersist; ++j) {
        const int it = (ig * kPersist + j) * kWarps + warp;
        if (it >= items) continue;
        const bool sums = u.c0 == 0 && it % w_n == 0 && t.grad_bias != nullptr;
        if (sub == 0) gw_acc[j].zero();
        weight_item(gw_acc[j], it / w_n, it % w_n, u.rows, u.has_template, sums);
        if (sub + 1 == u.subs) store_weight_item(gw_acc[j], it / w_n, it % w_n, u.rows, u.c0, u.c_count, !u.has_template, sums);
      }
    });
  } else {
    TemplateItem gt_acc[kPersist];  // grad_templates items kept across the bucket's rows
    pipeline([&](const BackwardUnit& u, const Regions& r, int ig, int sub) {
      int first, count;
      stage_rows(u, sub, first, count);
      const int n_items = ceil_div(r.in_count, kTN);
      const int gt_items = u.has_template ? ceil_div(u.c_count, kTM) * n_items : 0;
      if (mode == kFused && count > 0) {  // this chunk's grad_weight rows, complete (the tile holds every pixel)
        const int w_m = ceil_div(count, kItemM), w_n = ceil_div(gw_cols, kItemN);
        for (int it = warp; it < w_m * w_n; it += kWarps) {
          const int im = it / w_n, in = it % w_n;
          const bool sums = u.c0 == 0 && in == 0 && t.grad_bias != nullptr;
          Item item;
          item.zero();
          weight_item(item, im, in, count, u.has_template, sums);
          store_weight_item(item, im, in, count, u.c0, u.c_count, !u.has_template, sums);
        }
      }
      const int64_t base = (static_cast<int64_t>(u.p) * s.C_in + u.group * s.Cig + u.c0) * s.in_pixels;
#pragma unroll
      for (int j = 0; j < kPersist; ++j) {
        const int it = (ig * kPersist + j) * kWarps + warp;
        if (it >= gt_items) continue;
        if (sub == 0) gt_acc[j].zero();
        if (count > 0) template_item(gt_acc[j], it / n_items, it % n_items, r.in_count);
        if (sub + 1 == u.subs) store_template_item(gt_acc[j], it / n_items, it % n_items, u.c_count, r.in_count, base);
      }
    });
  }
  cp_async_wait<0>();
}

template <typename Math>
void launch_backward(const ConvBackwardPlan& plan, const Shape& s, const PassTensors& pt, const DeviceBuckets& b) {
  const Tensors<typename Math::elem> t = kernel_tensors<typename Math::elem>(pt);
  auto* kernel = &conv_backward_kernel<Math>;
  allow_dynamic_smem(kernel, plan.smem);
  const int64_t spatial = static_cast<int64_t>(plan.tiles_h) * plan.tiles_w;
  const Stream stream = current_stream();
  TORCH_CHECK(std::max((s.P + 1) * s.groups * plan.c_tiles * spatial, b.tile_capacity * s.groups * plan.c_tiles) <
                  std::numeric_limits<int32_t>::max(),
              "instance_aware_conv (CUDA): too many tiles for the backward");
  if (plan.fused) {
    const int64_t units = (s.P + 1) * s.groups * plan.c_tiles * spatial;
    launch(kernel, dim3(persistent_blocks(kernel, plan.smem, units)), kThreads, plan.smem, stream, t, s, b.view, plan,
           static_cast<int>(kFused));
    return;
  }
  const int64_t template_units = static_cast<int64_t>(s.P) * s.groups * plan.c_tiles * spatial;
  if (template_units > 0) {
    launch(kernel, dim3(persistent_blocks(kernel, plan.smem, template_units)), kThreads, plan.smem, stream, t, s,
           b.view, plan, static_cast<int>(kTemplatesOnly));
  }
  const int64_t weight_units = b.tile_capacity * s.groups * plan.c_tiles;
  launch(kernel, dim3(persistent_blocks(kernel, plan.smem, weight_units)), kThreads, plan.smem, stream, t, s, b.view,
         plan, static_cast<int>(kWeightOnly));
}

}  // namespace

ConvBackwardPlan plan_conv_backward(const Shape& s, std::size_t element_size, int k_step, int avg_rows) {
  const std::size_t budget = smem_budget();
  const auto pitch = [&](int width) { return row_pitch(width, element_size); };
  const int persist = ConvBackwardPlan::persistent_items(element_size == 8 ? 8 : 4);
  const int max_items = kWarps * persist;
  ConvBackwardPlan plan;
  std::size_t smallest = std::numeric_limits<std::size_t>::max();
  // Largest axis extent of a region over the tiles of one axis (computed as the kernel does).
  const auto axis_max = [&](int size, int size_out, int stride, int pad, int dil, int k, int tile, int mode, int& go,
                            int& tt, int& own) {
    go = tt = own = 0;
    const auto fdiv = [](int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); };
    const auto cdiv = [&](int a, int b) { return -fdiv(-a, b); };
    for (int lo = 0; lo < size; lo += tile) {
      const int hi = std::min(size, lo + tile);
      const int own_lo = lo == 0 ? 0 : std::min(size_out, std::max(0, cdiv(lo + pad, stride)));
      const int own_hi = hi == size ? size_out : std::min(size_out, std::max(0, cdiv(hi + pad, stride)));
      const int need_lo = std::max(0, cdiv(lo + pad - (k - 1) * dil, stride));
      const int need_hi = std::min(size_out, fdiv(hi - 1 + pad, stride) + 1);
      int go_lo, go_hi;
      if (mode == kTemplatesOnly) {
        go_lo = need_lo, go_hi = std::max(need_lo, need_hi);
      } else if (mode == kWeightOnly) {
        go_lo = own_lo, go_hi = own_hi;
      } else {
        go_lo = std::min(need_lo, own_lo), go_hi = std::max(need_hi, own_hi);
      }
      go = std::max(go, go_hi - go_lo);
      own = std::max(own, own_hi - own_lo);
      if (own_hi > own_lo) {
        const int t_lo = std::max(0, own_lo * stride - pad);
        const int t_hi = std::min(size, (own_hi - 1) * stride - pad + (k - 1) * dil + 1);
        tt = std::max(tt, std::max(0, t_hi - t_lo));
      }
    }
  };
  const auto layout = [&](bool fused, int rows_pad, int c_pad, int tile_h, int tile_w) {
    plan.fused = fused;
    plan.tile_rows = rows_pad;
    plan.rows_pad = rows_pad;
    plan.c_pad = c_pad;
    plan.c_tile = std::min(c_pad, s.Cig);
    plan.c_tiles = ceil_div(s.Cig, plan.c_tile);
    plan.tile_h = tile_h, plan.tile_w = tile_w;
    plan.tiles_h = ceil_div(s.H, tile_h), plan.tiles_w = ceil_div(s.W, tile_w);
    int go_h = 0, go_w = 0, t_h = 0, t_w = 0, own_h = 0, own_w = 0, go2_h = 0, go2_w = 0, t2_h, t2_w, own2_h, own2_w;
    axis_max(s.H, s.H_out, s.stride_h, s.pad_h, s.dil_h, s.kH, tile_h, fused ? kFused : kTemplatesOnly, go_h, t_h, own_h);
    axis_max(s.W, s.W_out, s.stride_w, s.pad_w, s.dil_w, s.kW, tile_w, fused ? kFused : kTemplatesOnly, go_w, t_w, own_w);
    if (!fused) {  // the grad_weight launch stages its own (owned) regions
      axis_max(s.H, s.H_out, s.stride_h, s.pad_h, s.dil_h, s.kH, tile_h, kWeightOnly, go2_h, t2_h, own2_h);
      axis_max(s.W, s.W_out, s.stride_w, s.pad_w, s.dil_w, s.kW, tile_w, kWeightOnly, go2_w, t2_w, own2_w);
      go_h = std::max(go_h, go2_h), go_w = std::max(go_w, go2_w);
    }
    const int go_slots = go_h * go_w, t_slots = t_h * t_w, own = own_h * own_w;
    const int esize = static_cast<int>(element_size);
    plan.in_pad = round_up(std::min(s.H, tile_h) * std::min(s.W, tile_w), 64);  // whole grad_templates items
    plan.own_pad = round_up(std::max(own, 1), kItemN);
    plan.pitch_g = pitch(std::max(rows_pad, kItemM));  // FFMA reads whole 32-row items
    plan.pitch_t = pitch(c_pad);
    plan.pitch_w = pitch(s.taps * rows_pad);
    // Raw copies: a grad_output row's region as one run (whole width) or one run per output row.
    plan.raw_g_pitch = raw_pitch(go_slots, esize);
    plan.raw_g_row_pitch = raw_pitch(go_w, esize);
    plan.raw_w_pitch = raw_pitch(c_pad * s.taps, esize);
    const int64_t raw_g = static_cast<int64_t>(rows_pad) * std::max(plan.raw_g_pitch, go_h * plan.raw_g_row_pitch);
    const int64_t raw_t = template_raw_elements(s, c_pad, t_h, t_w, esize);
    SmemLayout l;
    plan.off_offsets = l.take(sizeof(int) * c_pad * s.taps);
    plan.off_rows = l.take(sizeof(int64_t) * rows_pad);
    plan.off_tbl_g = l.take(sizeof(int16_t) * s.taps * plan.in_pad);
    plan.off_in_off = l.take(sizeof(int) * plan.in_pad);
    plan.off_own = l.take(sizeof(int16_t) * plan.own_pad);
    plan.off_tbl_t = l.take(sizeof(int16_t) * s.taps * plan.own_pad);
    plan.off_go = l.take(element_size * (go_slots + 1) * plan.pitch_g);
    plan.off_t = l.take(element_size * (t_slots + 1) * plan.pitch_t);
    plan.off_w = l.take(element_size * c_pad * plan.pitch_w);
    plan.off_raw_g = l.take(element_size * raw_g);
    plan.off_raw_w = l.take(element_size * rows_pad * plan.raw_w_pitch);
    plan.off_raw_t = l.take(element_size * raw_t);
    plan.smem = l.bytes;
    smallest = std::min(smallest, plan.smem);
    const int gt_items = ceil_div(plan.c_tile, 16) * (plan.in_pad / 64);
    return plan.smem <= budget && (!fused || gt_items <= max_items) && go_slots < 32767 && t_slots < 32767;
  };
  // Rows per chunk: about a bucket's worth (whole items), fewer when the taps are many; at least one k-step.
  const int rows_pad = std::min(64, round_up(std::max(avg_rows, 1), kItemM));
  const int min_rows = std::max(k_step, 8);
  const int c_pad = s.Cig > 16 ? 32 : 16;
  // Fused: the whole template in one tile.
  for (int rows = rows_pad; rows >= kItemM; rows /= 2) {
    if (layout(true, rows, c_pad, s.H, s.W)) return plan;
    if (c_pad == 32 && layout(true, rows, 16, s.H, s.W)) return plan;
  }
  // Two launches: spatial tiles of input rows (whole width), then narrower ones; fewer rows per chunk last.
  for (int rows = kItemM; rows >= min_rows; rows /= 2) {
    for (int tile_h = s.H;; tile_h = ceil_div(tile_h, 2)) {
      if (layout(false, rows, 16, tile_h, s.W)) return plan;
      if (tile_h == 1) break;
    }
    for (int tile_w = ceil_div(s.W, 2); tile_w >= 8; tile_w = ceil_div(tile_w, 2)) {
      if (layout(false, rows, 16, 1, tile_w)) return plan;
    }
  }
  TORCH_CHECK(false, "instance_aware_conv (CUDA): no tiling of this shape fits in shared memory for the backward "
              "(smallest tiling: ", smallest, " bytes; budget ", budget, ")");
}

void run_conv_backward(const ConvBackwardPlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                       bool tf32) {
  with_math(t.templates.scalar_type(), tf32,
            [&](auto math) { launch_backward<typename decltype(math)::type>(plan, s, t, b); });
}

}  // namespace pointins_ops::cuda
