// Bucketing of instances by template in one kernel launch (see buckets.cuh).
//
// One block of 1024 threads: warp w owns a contiguous segment of the instances and counts them per key (key =
// template, or P when out of range) in its own row of a shared-memory table, a group of equal keys at a time
// (__match_any_sync; the group's leader adds, so no atomics). A scan over (key, segment) in key-major order
// turns the counts into each segment's first position per key; the warps then walk their segments again and
// place every instance at its position plus its rank among equal keys before it in the same 32: a stable,
// deterministic counting sort. The same scans give the bucket offsets and each bucket's first row tile, and
// the tile table is filled in parallel. Templates too many for the table in shared memory (P + 1 > ~56k)
// fall back to a torch stable sort plus one kernel for the tile table.
#include "buckets.cuh"

#include <algorithm>
#include <limits>

namespace pointins_ops::cuda {
namespace {

constexpr int kBucketThreads = 1024;
constexpr int kScanScratch = 33;
constexpr int kHeldSteps = 8;  // 32-instance steps of a warp's segment whose index values stay in registers
constexpr unsigned kFullMask = 0xffffffffu;

template <typename index_t>
PI_DEVICE int bucket_key(index_t value, int P) {
  return (value >= 0 && value < static_cast<index_t>(P)) ? static_cast<int>(value) : P;
}

PI_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Exclusive prefix sum of `value` over the block's threads; `total` receives the sum. scratch: 33 ints.
PI_DEVICE int block_exclusive_scan(int value, int* scratch, int& total) {
  const int lane = lane_id(), warp = warp_id();
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int other = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int mine = lane < kBucketThreads / 32 ? scratch[lane] : 0;
    int prefix = mine;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int other = __shfl_up_sync(kFullMask, prefix, d);
      if (lane >= d) prefix += other;
    }
    scratch[lane] = prefix - mine;
    if (lane == 31) scratch[32] = prefix;
  }
  __syncthreads();
  total = scratch[32];
  const int result = scratch[warp] + inclusive - value;
  __syncthreads();  // scratch is reused by the next scan
  return result;
}

// The largest p in [0, P] with tile_start[p] <= t (tile_start nondecreasing, tile_start[0] = 0 <= t).
PI_DEVICE int bucket_of_tile(const int32_t* tile_start, int P, int t) {
  int lo = 0, hi = P;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename index_t>
__global__ void __launch_bounds__(kBucketThreads, 1)
    bucket_kernel(const index_t* __restrict__ index, int N, int P, int rows_per_instance, int tile_rows,
                  int segments, int32_t* __restrict__ order, int32_t* __restrict__ offsets, int2* __restrict__ tiles,
                  int32_t* __restrict__ num_tiles) {
  const int keys = P + 1;
  int* counts = reinterpret_cast<int*>(dynamic_smem());  // [segments][keys]
  int* tile_start = counts + segments * keys;            // [keys + 1]
  int* scratch = tile_start + keys + 1;                  // [33]
  const int tid = static_cast<int>(threadIdx.x), lane = lane_id(), warp = warp_id();

  for (int e = tid; e < segments * keys; e += kBucketThreads) counts[e] = 0;
  __syncthreads();

  const int segment_length = (N + segments - 1) / segments;
  const int segment_begin = min(N, warp * segment_length);
  const int segment_end = min(N, segment_begin + segment_length);
  int* mine = counts + warp * keys;
  // A warp walks its segment 32 instances at a time, twice (counts, then positions). Segments of up to
  // kHeldSteps steps are loaded once, every load issued before the first is used, and kept in registers for
  // both passes; longer ones load each step as they go.
  const bool held = segment_length <= 32 * kHeldSteps;
  int held_keys[kHeldSteps];
  if (warp < segments && held) {
#pragma unroll
    for (int j = 0; j < kHeldSteps; ++j) {
      const int i = segment_begin + j * 32 + lane;
      held_keys[j] = i < segment_end ? bucket_key(index[i], P) : -1;
    }
  }
  // step(i, key) for each step of the warp's segment (i: this lane's instance, key: its bucket or -1 past the end).
  const auto for_each_step = [&](const auto& step) {
    if (held) {
#pragma unroll
      for (int j = 0; j < kHeldSteps; ++j) {
        if (segment_begin + j * 32 < segment_end) step(segment_begin + j * 32 + lane, held_keys[j]);
      }
    } else {
      for (int base = segment_begin; base < segment_end; base += 32) {
        const int i = base + lane;
        step(i, i < segment_end ? bucket_key(index[i], P) : -1);
      }
    }
  };
  if (warp < segments) {
    for_each_step([&](int, int key) {
      const unsigned peers = __match_any_sync(kFullMask, key);
      if (key >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) mine[key] += __popc(peers);
      __syncwarp();
    });
  }
  __syncthreads();

  // Each thread scans a contiguous range of keys: totals, block scans, then per key the segments' bases.
  const int per_thread = ceil_div(keys, kBucketThreads);
  const int k_begin = min(keys, tid * per_thread), k_end = min(keys, k_begin + per_thread);
  int local_instances = 0, local_tiles = 0;
  for (int k = k_begin; k < k_end; ++k) {
    int total = 0;
    for (int s = 0; s < segments; ++s) total += counts[s * keys + k];
    local_instances += total;
    local_tiles += ceil_div(total * rows_per_instance, tile_rows);
  }
  int total_instances, total_tiles;
  int position = block_exclusive_scan(local_instances, scratch, total_instances);
  int tile = block_exclusive_scan(local_tiles, scratch, total_tiles);
  for (int k = k_begin; k < k_end; ++k) {
    offsets[k] = position;
    tile_start[k] = tile;
    const int first = position;
    for (int s = 0; s < segments; ++s) {
      const int c = counts[s * keys + k];
      counts[s * keys + k] = position;
      position += c;
    }
    tile += ceil_div((position - first) * rows_per_instance, tile_rows);
  }
  if (tid == 0) {
    offsets[keys] = N;
    tile_start[keys] = total_tiles;
    *num_tiles = total_tiles;
  }
  __syncthreads();

  if (warp < segments) {
    for_each_step([&](int i, int key) {
      const unsigned peers = __match_any_sync(kFullMask, key);
      const int leader = __ffs(static_cast<int>(peers)) - 1;
      const int rank = __popc(peers & ((1u << lane) - 1u));
      int first = 0;
      if (key >= 0 && lane == leader) first = mine[key];
      first = __shfl_sync(kFullMask, first, leader);
      if (key >= 0) order[first + rank] = i;
      if (key >= 0 && lane == leader) mine[key] = first + __popc(peers);
      __syncwarp();
    });
  }

  for (int t = tid; t < total_tiles; t += kBucketThreads) {
    const int p = bucket_of_tile(tile_start, P, t);
    tiles[t] = make_int2(p, (t - tile_start[p]) * tile_rows);
  }
}

// Fallback for very many templates: the tile table from offsets and tile_start computed with torch ops.
__global__ void __launch_bounds__(256)
    fill_tiles_kernel(const int32_t* __restrict__ tile_start, int P, int tile_rows, int capacity,
                      int2* __restrict__ tiles) {
  const int total = tile_start[P + 1];
  for (int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); t < min(total, capacity);
       t += static_cast<int>(gridDim.x * blockDim.x)) {
    const int p = bucket_of_tile(tile_start, P, t);
    tiles[t] = make_int2(p, (t - tile_start[p]) * tile_rows);
  }
}

}  // namespace

DeviceBuckets bucket_instances(const std::optional<at::Tensor>& index, const ConvGeometry& g, int tile_rows,
                               const at::TensorOptions& options) {
  TORCH_CHECK(g.N < std::numeric_limits<int32_t>::max() / std::max<int64_t>(1, g.C_out_per_group) &&
                  g.P < std::numeric_limits<int32_t>::max() - 2,
              "instance_aware_conv (CUDA): N * C_out / groups and P must stay below 2^31; got N = ", g.N,
              ", C_out / groups = ", g.C_out_per_group, ", P = ", g.P);
  DeviceBuckets result;
  Buckets& v = result.view;
  v.N = static_cast<int>(g.N);
  v.P = static_cast<int>(g.P);
  v.rows_per_instance = static_cast<int>(g.C_out_per_group);
  v.tile_rows = tile_rows;
  if (!index.has_value()) {
    v.identity = true;
    v.identity_tiles = static_cast<int>((g.C_out_per_group + tile_rows - 1) / tile_rows);
    result.tile_capacity = g.P * v.identity_tiles;
    return result;
  }

  const int64_t keys = g.P + 1;
  const int64_t capacity = g.N * g.C_out_per_group / tile_rows + std::min(g.N, keys);
  TORCH_CHECK(capacity < std::numeric_limits<int32_t>::max() / 2, "instance_aware_conv (CUDA): too many row tiles");
  result.tile_capacity = capacity;
  // order | offsets | num_tiles | (pad) | tiles (8-byte aligned) | tile_start (fallback only)
  const int64_t tiles_at = (g.N + (keys + 1) + 1 + 1) / 2 * 2;
  const int64_t tile_start_at = tiles_at + 2 * capacity;
  result.storage = at::empty({tile_start_at + keys + 1}, options.dtype(at::kInt));
  int32_t* base = result.storage.mutable_data_ptr<int32_t>();
  int32_t* order = base;
  int32_t* offsets = base + g.N;
  int32_t* num_tiles = offsets + keys + 1;
  int2* tiles = reinterpret_cast<int2*>(base + tiles_at);
  v.order = order;
  v.offsets = offsets;
  v.num_tiles = num_tiles;
  v.tiles = tiles;

  const at::Tensor idx = index->contiguous();
  const Stream stream = current_stream();
  const std::size_t fixed = static_cast<std::size_t>(keys + 1 + kScanScratch) * sizeof(int);
  const std::size_t budget = max_dynamic_smem();
  const int64_t segments =
      budget > fixed ? std::min<int64_t>(32, static_cast<int64_t>((budget - fixed) / (keys * sizeof(int)))) : 0;
  if (segments >= 1) {
    const std::size_t smem = fixed + static_cast<std::size_t>(segments * keys) * sizeof(int);
    const auto launch_with = [&](auto* typed_index) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(typed_index)>>;
      auto* kernel = &bucket_kernel<index_t>;
      allow_dynamic_smem(kernel, smem);
      launch(kernel, dim3(1), kBucketThreads, smem, stream, typed_index, v.N, v.P, v.rows_per_instance, tile_rows,
             static_cast<int>(segments), order, offsets, tiles, num_tiles);
    };
    if (idx.scalar_type() == at::kInt) {
      launch_with(idx.const_data_ptr<int32_t>());
    } else {
      launch_with(idx.const_data_ptr<int64_t>());
    }
    return result;
  }

  // Fallback: stable sort with torch, then the tile table.
  at::Tensor keys_t = idx.to(at::kLong);
  keys_t = keys_t.masked_fill(keys_t.lt(0).logical_or_(keys_t.ge(g.P)), g.P);
  auto [sorted_keys, sorted_order] = at::sort(keys_t, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor all_keys = at::arange(keys + 1, options.dtype(at::kLong));
  const at::Tensor bounds = at::searchsorted(sorted_keys, all_keys);  // (P + 2,): bounds[P + 1] = N
  result.storage.narrow(0, 0, g.N).copy_(sorted_order);
  result.storage.narrow(0, g.N, keys + 1).copy_(bounds);
  const at::Tensor tiles_per_key =
      at::div((bounds.slice(0, 1) - bounds.slice(0, 0, keys)) * g.C_out_per_group + (tile_rows - 1), tile_rows,
              "floor");
  const at::Tensor tile_start = at::cat({at::zeros({1}, options.dtype(at::kLong)), tiles_per_key.cumsum(0)});
  result.storage.narrow(0, tile_start_at, keys + 1).copy_(tile_start);
  result.storage.narrow(0, g.N + keys + 1, 1).copy_(tile_start.narrow(0, keys, 1));
  const int blocks = static_cast<int>(std::min<int64_t>((capacity + 255) / 256, 4096));
  launch(&fill_tiles_kernel, dim3(std::max(1, blocks)), 256, 0, stream, base + tile_start_at, v.P, tile_rows,
         static_cast<int>(capacity), tiles);
  return result;
}

}  // namespace pointins_ops::cuda
