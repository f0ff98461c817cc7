// The pointwise path: 1x1 kernels with stride 1 and no padding on large templates (CondInst, SOLOv2 and YOLACT
// heads). An output pixel is then an input pixel and every operand is a set of contiguous rows, so each pass is a
// grouped GEMM per (template, group), with the bucket's rows gathered:
//
//   forward         output[rows][px]  = weight[rows][c]   . template[c][px]       (+ bias)
//   grad_weight     gW[rows][c]       = grad_output[rows][px] . template[c][px]^T  (+ grad_bias: row sums)
//   grad_templates  gT[c][px]         = weight[rows][c]^T . grad_output[rows][px]
//
// A block (8 warps) owns a block_m x block_n output tile; the reduction streams through a ring of kStages
// shared-memory stages filled by cp.async in the operands' own layouts (16-byte copies where rows are aligned),
// one barrier per stage, and the warps multiply 64 x 32 warp tiles with ldmatrix (.trans for the operands that
// are contiguous along m or n) and mma.sync, or FFMA. When the tile is narrow (few channels), the warps that
// share a warp tile take alternate stages and their sums are added at the end in a fixed order. grad_weight's
// reduction over pixels is split into a number of ranges fixed by the shapes, each written as float32 partial
// sums and added in order by a second kernel: no atomics, the same bits on any GPU.
#include "paths.h"
#include "staging.cuh"

namespace pointins_ops::cuda {
namespace {

constexpr int kPwWarps = 8;
constexpr int kPwThreads = 32 * kPwWarps;
constexpr int kWarpM = 64, kWarpN = 32;  // the warp tile: MmaItem<Math, 4, 4> / FfmaItem<Math, 4, 4>
constexpr int kStages = 3;

template <int kPass>
struct Majors;
template <>
struct Majors<kPointwiseForward> {
  static constexpr Major A = Major::K, B = Major::MN;
};
template <>
struct Majors<kPointwiseWeight> {
  static constexpr Major A = Major::K, B = Major::K;
};
template <>
struct Majors<kPointwiseTemplates> {
  static constexpr Major A = Major::MN, B = Major::MN;
};

// The GEMM one unit of work multiplies.
struct PointwiseUnit {
  int p, group;
  int first, rows;  // forward, grad_weight: the row tile of bucket p
  int m0, n0;       // channel offset (grad_templates: m; grad_weight: n) or pixel offset (n)
  int m_valid, n_valid;
  int64_t k0;       // first element of the reduction (grad_weight: a pixel)
  int k_len;
  int split;        // grad_weight: the pixel range
};

template <int kPass>
PI_DEVICE PointwiseUnit pointwise_unit(int unit, const Shape& s, const Buckets& buckets, const PointwisePlan& plan) {
  PointwiseUnit u{};
  const int hw = static_cast<int>(s.in_pixels);
  if constexpr (kPass == kPointwiseTemplates) {
    const int nt = unit % plan.n_tiles;
    int rest = unit / plan.n_tiles;
    const int mt = rest % plan.m_tiles;
    rest /= plan.m_tiles;
    u.group = rest % s.groups;
    u.p = rest / s.groups;
    u.m0 = mt * plan.block_m, u.n0 = nt * plan.block_n;
    u.m_valid = min(plan.block_m, s.Cig - u.m0), u.n_valid = min(plan.block_n, hw - u.n0);
    u.k0 = 0, u.k_len = buckets.rows(u.p);
    u.first = 0, u.rows = u.k_len;
  } else {
    int rest = unit;
    if constexpr (kPass == kPointwiseWeight) {
      u.split = rest % plan.splits;
      rest /= plan.splits;
    }
    const int nt = rest % plan.n_tiles;
    rest /= plan.n_tiles;
    u.group = rest % s.groups;
    const TileInfo tile = buckets.tile(rest / s.groups);
    u.p = tile.p, u.first = tile.first;
    u.rows = min(plan.tile_rows, buckets.rows(tile.p) - tile.first);
    u.m0 = 0, u.m_valid = u.rows;
    u.n0 = nt * plan.block_n;
    if constexpr (kPass == kPointwiseForward) {
      u.n_valid = min(plan.block_n, hw - u.n0);
      u.k0 = 0, u.k_len = s.Cig;
    } else {
      u.n_valid = min(plan.block_n, s.Cig - u.n0);
      u.k0 = static_cast<int64_t>(u.split) * plan.split_length;
      u.k_len = static_cast<int>(min(static_cast<int64_t>(plan.split_length), s.in_pixels - u.k0));
    }
  }
  return u;
}

template <typename Math, int kPass>
__global__ void __launch_bounds__(kPwThreads, 1)
    pointwise_kernel(Tensors<typename Math::elem> t, Shape s, Buckets buckets, PointwisePlan plan,
                     typename Math::acc* __restrict__ partial) {
  using scalar_t = typename Math::elem;
  using acc_t = typename Math::acc;
  using Item = WarpItem<Math, kWarpM / 16, kWarpN / 8>;
  constexpr Major kMA = Majors<kPass>::A, kMB = Majors<kPass>::B;
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  unsigned char* smem = dynamic_smem();
  auto* rows_s = reinterpret_cast<int64_t*>(smem + plan.off_rows);
  auto* stages = reinterpret_cast<scalar_t*>(smem + plan.off_stages);
  auto* reduce = reinterpret_cast<acc_t*>(smem + plan.off_stages);  // after the ring: the k-split partials
  const int tid = static_cast<int>(threadIdx.x), warp = warp_id(), lane = lane_id();
  const int tile_warps = plan.warps_m * plan.warps_n;
  const int wk = warp / tile_warps, wm = (warp % tile_warps) / plan.warps_n, wn = warp % plan.warps_n;
  const int hw = static_cast<int>(s.in_pixels);
  const int stage_elems = plan.stage_a + plan.stage_b;
  int units;
  if constexpr (kPass == kPointwiseTemplates) {
    units = s.P * s.groups * plan.m_tiles * plan.n_tiles;
  } else {
    units = buckets.tile_count() * s.groups * plan.n_tiles * (kPass == kPointwiseWeight ? plan.splits : 1);
  }
  // The plane of channel c of group g of template p.
  const auto plane = [&](int p, int g, int c) {
    return t.templates + static_cast<int64_t>(p) * t.t_p + static_cast<int64_t>(g * s.Cig + c) * t.t_c;
  };

  for (int unit = static_cast<int>(blockIdx.x); unit < units; unit += static_cast<int>(gridDim.x)) {
    const PointwiseUnit u = pointwise_unit<kPass>(unit, s, buckets, plan);
    const bool has_template = u.p < s.P;
    __syncthreads();  // the previous unit's epilogue is done with rows_s
    if constexpr (kPass != kPointwiseTemplates) {
      for (int r = tid; r < plan.block_m; r += kPwThreads) {
        rows_s[r] = r < u.rows ? buckets.row_id(u.p, u.first + r, u.group, s.C_out) : -1;
      }
    }
    __syncthreads();  // rows_s is complete
    if (kPass == kPointwiseForward && !has_template) {  // out-of-range index: NaN rows
      for (int e = tid; e < u.rows * u.n_valid; e += kPwThreads) {
        t.output[rows_s[e / u.n_valid] * s.in_pixels + u.n0 + e % u.n_valid] = quiet_nan<scalar_t>();
      }
      continue;
    }
    const int k_blocks = ceil_div(u.k_len, plan.block_k);

    // The copies of reduction block kb into ring slot kb % kStages (one cp.async group, possibly empty).
    const auto issue = [&](int kb) {
      if (kb < k_blocks) {
        scalar_t* a = stages + (kb % kStages) * stage_elems;
        scalar_t* b = a + plan.stage_a;
        const int k0 = kb * plan.block_k, k_count = min(plan.block_k, u.k_len - k0);
        if constexpr (kPass == kPointwiseForward) {
          const scalar_t* w0 = t.weight + k0;
          copy_runs(a, plan.pitch_a, plan.block_m, k_count,
                    common_granule(reinterpret_cast<uintptr_t>(w0), static_cast<uint64_t>(s.K) * kElem),
                    [&](int m) { return rows_s[m] >= 0 ? w0 + rows_s[m] * s.K : nullptr; }, t.weight, 1,
                    plan.block_k);
          const scalar_t* t0 = plane(u.p, u.group, k0) + u.n0;
          copy_runs(b, plan.pitch_b, plan.block_k, u.n_valid,
                    common_granule(reinterpret_cast<uintptr_t>(t0), static_cast<uint64_t>(t.t_c) * kElem),
                    [&](int k) { return k < k_count ? t0 + k * t.t_c : nullptr; }, t.weight, 1, plan.block_n);
        } else if constexpr (kPass == kPointwiseWeight) {
          const scalar_t* g0 = t.grad_output + u.k0 + k0;
          copy_runs(a, plan.pitch_a, plan.block_m, k_count,
                    common_granule(reinterpret_cast<uintptr_t>(g0), s.in_pixels * kElem),
                    [&](int m) { return rows_s[m] >= 0 ? g0 + rows_s[m] * s.in_pixels : nullptr; }, t.weight, 1,
                    plan.block_k);
          if (has_template) {
            const scalar_t* t0 = plane(u.p, u.group, u.n0) + u.k0 + k0;
            copy_runs(b, plan.pitch_b, plan.block_n, k_count,
                      common_granule(reinterpret_cast<uintptr_t>(t0), static_cast<uint64_t>(t.t_c) * kElem),
                      [&](int n) { return n < u.n_valid ? t0 + n * t.t_c : nullptr; }, t.weight, 1, plan.block_k);
          }
        } else {
          const scalar_t* w0 = t.weight + u.m0;
          copy_runs(a, plan.pitch_a, plan.block_k, u.m_valid,
                    common_granule(reinterpret_cast<uintptr_t>(w0), static_cast<uint64_t>(s.K) * kElem),
                    [&](int k) {
                      return k < k_count ? w0 + buckets.row_id(u.p, k0 + k, u.group, s.C_out) * s.K : nullptr;
                    },
                    t.weight, 1, plan.block_m);
          const scalar_t* g0 = t.grad_output + u.n0;
          copy_runs(b, plan.pitch_b, plan.block_k, u.n_valid,
                    common_granule(reinterpret_cast<uintptr_t>(g0), s.in_pixels * kElem),
                    [&](int k) {
                      return k < k_count ? g0 + buckets.row_id(u.p, k0 + k, u.group, s.C_out) * s.in_pixels
                                         : nullptr;
                    },
                    t.weight, 1, plan.block_n);
        }
      }
      cp_async_commit();
    };

    const int m_tiles = max(0, min(kWarpM / 16, ceil_div(u.m_valid - wm * kWarpM, 16)));
    const int n_tiles = max(0, min(kWarpN / 8, ceil_div(u.n_valid - wn * kWarpN, 8)));
    const bool sums = kPass == kPointwiseWeight && u.n0 == 0 && wn == 0 && t.grad_bias != nullptr;
    const bool products = kPass != kPointwiseWeight || has_template;
    Item item;
    item.zero();
#pragma unroll
    for (int kb = 0; kb < kStages - 1; ++kb) issue(kb);
    for (int kb = 0; kb < k_blocks; ++kb) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // block kb landed everywhere; slot (kb - 1) % kStages is free again
      issue(kb + kStages - 1);
      if (kb % plan.k_split != wk || m_tiles == 0 || n_tiles == 0) continue;
      const scalar_t* a = stages + (kb % kStages) * stage_elems;
      const scalar_t* b = a + plan.stage_a;
      const int steps = plan.block_k / Math::kK;
      const auto row_a_k = [&](int i) { return a + (wm * kWarpM + i) * plan.pitch_a; };
      const auto row_a_mn = [&](int k, int i) { return a + k * plan.pitch_a + wm * kWarpM + i; };
      const auto row_b_k = [&](int i) { return b + (wn * kWarpN + i) * plan.pitch_b; };
      const auto row_b_mn = [&](int k, int i) { return b + k * plan.pitch_b + wn * kWarpN + i; };
      const auto run = [&](const auto& row_a, const auto& row_b) {
        item.template run<kMA, kMB, kPass == kPointwiseWeight>(row_a, row_b, steps, m_tiles, n_tiles, sums, products);
      };
      if constexpr (kPass == kPointwiseForward) {
        run(row_a_k, row_b_mn);
      } else if constexpr (kPass == kPointwiseWeight) {
        run(row_a_k, row_b_k);
      } else {
        run(row_a_mn, row_b_mn);
      }
    }
    cp_async_wait<0>();

    if (plan.k_split > 1) {  // warps sharing a warp tile add their sums in a fixed order
      constexpr int kWords = static_cast<int>(sizeof(Item) / sizeof(acc_t));
      const acc_t* mine = reinterpret_cast<const acc_t*>(&item);
      __syncthreads();  // the ring is no longer read
      if (wk > 0) {
        acc_t* slot = reduce + ((wk - 1) * tile_warps + wm * plan.warps_n + wn) * kWords * 32;
        for (int i = 0; i < kWords; ++i) slot[i * 32 + lane] = mine[i];
      }
      __syncthreads();
      if (wk == 0) {
        acc_t* acc = reinterpret_cast<acc_t*>(&item);
        for (int j = 1; j < plan.k_split; ++j) {
          const acc_t* slot = reduce + ((j - 1) * tile_warps + wm * plan.warps_n + wn) * kWords * 32;
          for (int i = 0; i < kWords; ++i) acc[i] += slot[i * 32 + lane];
        }
      }
    }
    if (wk != 0 || m_tiles == 0 || n_tiles == 0) continue;

    // Epilogue.
    if constexpr (kPass == kPointwiseForward) {
      item_results<kMA, kMB>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
        const int r = wm * kWarpM + m, px = wn * kWarpN + n;
        if (r < u.rows && px < u.n_valid) {
          const int64_t row = rows_s[r];
          if (t.bias != nullptr) v += static_cast<acc_t>(t.bias[row]);
          t.output[row * s.in_pixels + u.n0 + px] = static_cast<scalar_t>(v);
        }
      });
    } else if constexpr (kPass == kPointwiseWeight) {
      const int width = s.Cig + 1;  // partial sums: the weights' columns, then grad_bias
      acc_t* split_partial = partial != nullptr ? partial + static_cast<int64_t>(u.split) * s.N * s.C_out * width
                                                : nullptr;
      item_results<kMA, kMB>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
        const int r = wm * kWarpM + m, c = u.n0 + wn * kWarpN + n;
        if (r < u.rows && c < s.Cig) {
          if (!has_template) v = std::numeric_limits<acc_t>::quiet_NaN();
          if (split_partial != nullptr) {
            split_partial[rows_s[r] * width + c] = v;
          } else {
            t.grad_weight[rows_s[r] * s.Cig + c] = static_cast<scalar_t>(v);
          }
        }
      });
      if (sums) {
        item_sums<kMA>(item, m_tiles, [&](int m, acc_t v) {
          const int r = wm * kWarpM + m;
          if (r < u.rows) {
            if (split_partial != nullptr) {
              split_partial[rows_s[r] * width + s.Cig] = v;
            } else {
              t.grad_bias[rows_s[r]] = static_cast<scalar_t>(v);
            }
          }
        });
      }
    } else {
      const int64_t base = (static_cast<int64_t>(u.p) * s.C_in + u.group * s.Cig + u.m0) * s.in_pixels + u.n0;
      item_results<kMA, kMB>(item, m_tiles, n_tiles, [&](int m, int n, acc_t v) {
        const int c = wm * kWarpM + m, px = wn * kWarpN + n;
        if (c < u.m_valid && px < u.n_valid) t.grad_templates[base + c * s.in_pixels + px] = static_cast<scalar_t>(v);
      });
    }
    (void)hw;
  }
}

// grad_weight and grad_bias from the partial sums of the pixel ranges, added in range order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256)
    sum_splits_kernel(const acc_t* __restrict__ partial, int splits, int64_t rows, int width,
                      scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  const int64_t count = rows * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t row = i / width;
    if (grad_bias == nullptr && i - row * width + 1 == width) continue;  // no grad_bias asked for: never written
    acc_t sum = partial[i];
    for (int z = 1; z < splits; ++z) sum += partial[z * count + i];
    const int col = static_cast<int>(i - row * width);
    if (col + 1 < width) {
      grad_weight[row * (width - 1) + col] = static_cast<scalar_t>(sum);
    } else {
      grad_bias[row] = static_cast<scalar_t>(sum);
    }
  }
}

template <typename Math, int kPass>
void launch_pass(const PointwisePlan& plan, const Shape& s, const PassTensors& pt, const DeviceBuckets& b,
                 int64_t units) {
  using scalar_t = typename Math::elem;
  using acc_t = typename Math::acc;
  const Tensors<scalar_t> t = kernel_tensors<scalar_t>(pt);
  auto* kernel = &pointwise_kernel<Math, kPass>;
  allow_dynamic_smem(kernel, plan.smem);
  TORCH_CHECK(units < std::numeric_limits<int32_t>::max(), "instance_aware_conv (CUDA): too many tiles (", units, ")");
  const int64_t resident = static_cast<int64_t>(resident_blocks(kernel, kPwThreads, plan.smem)) * multiprocessor_count();
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(units, resident)));
  at::Tensor partial;
  if (kPass == kPointwiseWeight && plan.splits > 1) {
    partial = at::empty({plan.splits, s.N * static_cast<int64_t>(s.C_out) * (s.Cig + 1)},
                        pt.templates.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  acc_t* partial_ptr = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
  const Stream stream = current_stream();
  launch(kernel, dim3(blocks), kPwThreads, plan.smem, stream, t, s, b.view, plan, partial_ptr);
  if (partial.defined()) {
    const int64_t rows = static_cast<int64_t>(s.N) * s.C_out;
    const int64_t count = rows * (s.Cig + 1);
    const int sum_blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
    launch(&sum_splits_kernel<scalar_t, acc_t>, dim3(sum_blocks), 256, 0, stream, partial.const_data_ptr<acc_t>(),
           plan.splits, rows, s.Cig + 1, t.grad_weight, t.grad_bias);
  }
}

}  // namespace

bool pointwise_applies(const Shape& s, const at::Tensor& templates) {
  const bool pointwise = s.kH == 1 && s.kW == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
                         s.pad_w == 0 && s.H_out == s.H && s.W_out == s.W;
  const bool planes = templates.stride(3) == 1 && templates.stride(2) == s.W && templates.stride(1) == s.in_pixels;
  // Small templates go through the conv path, whose fused backward reads grad_output once.
  return pointwise && planes && templates.scalar_type() != at::kDouble && s.in_pixels >= 1024;
}

PointwisePlan plan_pointwise(int pass, const Shape& s, std::size_t element_size, bool identity) {
  PointwisePlan plan;
  plan.pass = pass;
  const int esize = static_cast<int>(element_size);
  plan.block_k = esize == 2 ? 32 : 16;
  const auto pitch = [&](int width) { return row_pitch(width, element_size); };
  const int hw = static_cast<int>(s.in_pixels);
  if (pass == kPointwiseForward) {
    plan.warps_m = 2, plan.warps_n = 4, plan.k_split = 1;
  } else if (pass == kPointwiseWeight) {
    plan.warps_n = std::min(4, ceil_div(s.Cig, kWarpN));
    plan.warps_m = 2;
    plan.k_split = kPwWarps / (plan.warps_m * plan.warps_n);
    plan.block_k *= 2;
  } else {
    plan.warps_m = std::min(2, ceil_div(s.Cig, kWarpM));
    plan.warps_n = kPwWarps / plan.warps_m;
    plan.k_split = 1;
  }
  if (pass == kPointwiseWeight && plan.warps_n == 3) plan.warps_n = 4, plan.k_split = 1;
  plan.block_m = kWarpM * plan.warps_m;
  plan.block_n = kWarpN * plan.warps_n;
  plan.tile_rows = plan.block_m;
  if (pass == kPointwiseForward) {
    plan.n_tiles = ceil_div(hw, plan.block_n);
    plan.pitch_a = pitch(plan.block_k), plan.stage_a = plan.block_m * plan.pitch_a;  // [m][k]
    plan.pitch_b = pitch(plan.block_n), plan.stage_b = plan.block_k * plan.pitch_b;  // [k][n]
  } else if (pass == kPointwiseWeight) {
    plan.n_tiles = ceil_div(s.Cig, plan.block_n);
    plan.pitch_a = pitch(plan.block_k), plan.stage_a = plan.block_m * plan.pitch_a;  // [m][k]
    plan.pitch_b = pitch(plan.block_k), plan.stage_b = plan.block_n * plan.pitch_b;  // [n][k]
    // Pixel ranges: enough units to fill a large GPU several times over (a constant, not the device's size, so
    // the summation order is the same everywhere), each at least 8 blocks long, partials at most 512 MiB.
    const int64_t tiles = identity ? static_cast<int64_t>(s.P) * ceil_div(s.Cog, plan.tile_rows)
                                   : static_cast<int64_t>(s.N) * s.Cog / plan.tile_rows + std::min(s.N, s.P + 1);
    const int64_t units = tiles * s.groups * plan.n_tiles;
    int64_t splits = std::clamp<int64_t>(ceil_div<int64_t>(1024, std::max<int64_t>(units, 1)), 1, 64);
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, hw / (8 * plan.block_k)));
    const int64_t partial_bytes = static_cast<int64_t>(s.N) * s.C_out * (s.Cig + 1) * (esize == 2 ? 4 : esize);
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t{512} << 20) / std::max<int64_t>(partial_bytes, 1)));
    plan.split_length = round_up(ceil_div(hw, static_cast<int>(splits)), plan.block_k);
    plan.splits = ceil_div(hw, plan.split_length);
  } else {
    plan.m_tiles = ceil_div(s.Cig, plan.block_m);
    plan.n_tiles = ceil_div(hw, plan.block_n);
    plan.pitch_a = pitch(plan.block_m), plan.stage_a = plan.block_k * plan.pitch_a;  // [k][m]
    plan.pitch_b = pitch(plan.block_n), plan.stage_b = plan.block_k * plan.pitch_b;  // [k][n]
  }
  SmemLayout l;
  plan.off_rows = l.take(sizeof(int64_t) * plan.block_m);
  const std::size_t ring = element_size * kStages * (plan.stage_a + plan.stage_b);
  const std::size_t item_bytes = (esize == 2 ? 4 : esize) * (16 * 4 + 16) * 32;  // a warp's accumulators + sums
  const std::size_t reduction = item_bytes * (plan.k_split - 1) * plan.warps_m * plan.warps_n;
  plan.off_stages = l.take(std::max(ring, reduction));
  plan.smem = l.bytes;
  return plan;
}

void run_pointwise(const PointwisePlan& plan, const Shape& s, const PassTensors& t, const DeviceBuckets& b,
                   bool tf32) {
  int64_t units;
  if (plan.pass == kPointwiseTemplates) {
    units = static_cast<int64_t>(s.P) * s.groups * plan.m_tiles * plan.n_tiles;
  } else {
    units = b.tile_capacity * s.groups * plan.n_tiles * (plan.pass == kPointwiseWeight ? plan.splits : 1);
  }
  if (units == 0) return;
  // float32 without TF32 multiplies on FFMA one k at a time (its operands are K-major in 64-row tiles); float64
  // never takes this path (pointwise_applies).
  with_math<ScalarFfmaMath<float>, false>(t.templates.scalar_type(), tf32, [&](auto math) {
    using Math = typename decltype(math)::type;
    switch (plan.pass) {
      case kPointwiseForward:
        return launch_pass<Math, kPointwiseForward>(plan, s, t, b, units);
      case kPointwiseWeight:
        return launch_pass<Math, kPointwiseWeight>(plan, s, t, b, units);
      default:
        return launch_pass<Math, kPointwiseTemplates>(plan, s, t, b, units);
    }
  });
}

}  // namespace pointins_ops::cuda
