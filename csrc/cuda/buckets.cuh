// Instances grouped by template, on the device, and the row tiles of the grouped GEMMs.
//
// Bucket p (p in [0, P)) holds the instances whose index is p, in increasing instance order; bucket P holds
// those whose index is out of range (their results are NaN, their templates never read). Within a bucket, the
// rows of a GEMM are (instance slot, output channel of a group): count_p * C_out_per_group rows, cut into row
// tiles of `tile_rows`; tile t is {p, first row}. Everything is computed on the current stream by one small
// kernel (no host synchronisation, so CUDA graphs capture it), or not at all when index is None.
#pragma once

#include "primitives.cuh"

#include "../instance_aware_conv.h"

#include <optional>

namespace pointins_ops::cuda {

struct TileInfo {
  int p;      // template (bucket) of the tile
  int first;  // first row of the tile within the bucket
};

// What the kernels read. With `identity` (index None, N == P) instance n uses template n and nothing is stored.
struct Buckets {
  const int32_t* order = nullptr;    // (N,) instances sorted by bucket
  const int32_t* offsets = nullptr;  // (P + 2,): bucket p is order[offsets[p] .. offsets[p + 1])
  const int2* tiles = nullptr;       // (tile capacity,) {p, first row}
  const int32_t* num_tiles = nullptr;
  int N = 0, P = 0;
  int rows_per_instance = 1;  // C_out / groups
  int tile_rows = 1;
  int identity_tiles = 1;  // tiles per template with identity: ceil(rows_per_instance / tile_rows)
  bool identity = false;

  PI_DEVICE int begin(int p) const { return identity ? (p < N ? p : N) : offsets[p]; }
  PI_DEVICE int count(int p) const { return identity ? (p < P ? 1 : 0) : offsets[p + 1] - offsets[p]; }
  PI_DEVICE int rows(int p) const { return count(p) * rows_per_instance; }
  PI_DEVICE int instance(int p, int slot) const { return identity ? p : order[offsets[p] + slot]; }
  PI_DEVICE int tile_count() const { return identity ? P * identity_tiles : *num_tiles; }
  PI_DEVICE TileInfo tile(int t) const {
    if (identity) return {t / identity_tiles, (t % identity_tiles) * tile_rows};
    const int2 v = tiles[t];
    return {v.x, v.y};
  }
  // The global row id (n * C_out + group * C_out_per_group + co) of row r of bucket p, group `group`.
  PI_DEVICE int64_t row_id(int p, int r, int group, int64_t C_out) const {
    const int slot = r / rows_per_instance, co = r - slot * rows_per_instance;
    return static_cast<int64_t>(instance(p, slot)) * C_out + static_cast<int64_t>(group) * rows_per_instance + co;
  }
};

struct DeviceBuckets {
  at::Tensor storage;  // keeps order / offsets / tiles alive
  Buckets view;
  int64_t tile_capacity = 0;  // an upper bound on the tile count, from shapes only (grids are sized by it)
};

// Buckets instances by template for row tiles of `tile_rows` rows, on the current stream.
DeviceBuckets bucket_instances(const std::optional<at::Tensor>& index, const ConvGeometry& g, int tile_rows,
                               const at::TensorOptions& options);

}  // namespace pointins_ops::cuda
