// Bulk staging of global rows into shared memory with cp.async.
//
// The conv kernels read their operands as "runs": contiguous ranges of one tensor (a weight row, a grad_output
// row, a whole template, or one row of a template band). copy_runs issues a block's copies of a set of equal-
// length runs as cp.async of the widest granule (16, 8 or 4 bytes) that divides every run's source address,
// into rows of a raw shared buffer; a run's tail is zero-filled up to its granule, and a missing run (a row past
// the bucket) is zero-filled. Nothing waits: the caller commits the group and waits for it one stage later, so
// the copies of the next stage are in flight while the current one computes. Sources whose elements are not
// even 4-byte aligned (odd offsets of 16-bit tensors, strided views) fall back to ordinary loads (granule 0).
#pragma once

#include "conv_common.cuh"

namespace pointins_ops::cuda {

// The widest cp.async granule dividing `address` (bytes): 16, 8, 4, or 0 when none does.
__host__ __device__ constexpr int granule_of(uint64_t address) {
  return address % 16 == 0 ? 16 : address % 8 == 0 ? 8 : address % 4 == 0 ? 4 : 0;
}

// The granule dividing every run source base + i * stride (bytes) for all i.
__host__ __device__ constexpr int common_granule(uint64_t base, uint64_t stride) {
  const int a = granule_of(base), b = granule_of(stride);
  return a < b ? a : b;
}

template <int kGranule, typename T, typename Source>
PI_DEVICE void copy_runs_with(T* dst, int pitch, int runs, int count, const Source& source, const T* dummy,
                              int fill) {
  const int bytes = count * static_cast<int>(sizeof(T));
  const int per_run = (max(count, fill) * static_cast<int>(sizeof(T)) + kGranule - 1) / kGranule;
  const FastDiv div_run(static_cast<uint32_t>(per_run > 0 ? per_run : 1));
  for (int e = static_cast<int>(threadIdx.x); e < runs * per_run; e += static_cast<int>(blockDim.x)) {
    uint32_t run, piece;
    div_run.divmod(static_cast<uint32_t>(e), run, piece);
    const T* src = source(static_cast<int>(run));
    const int offset = static_cast<int>(piece) * kGranule;
    const int valid = src != nullptr ? max(0, min(kGranule, bytes - offset)) : 0;
    // Zero-fill copies name the dummy: an address past the end of a run need not be valid memory.
    const void* from = valid > 0 ? static_cast<const void*>(reinterpret_cast<const char*>(src) + offset)
                                 : static_cast<const void*>(dummy);
    cp_async<kGranule>(reinterpret_cast<char*>(dst + static_cast<int>(run) * pitch) + offset, from, valid);
  }
}

// Run r (r < runs) of `count` elements goes from source(r) (a global pointer, or null for zeros) to dst + r *
// pitch (16-byte aligned rows); with `fill` > count, each row is zero-filled up to `fill` elements (whole
// granules). `granule` divides every source address (common_granule), or is 0: then ordinary loads read
// element i of a run at source(r)[i * stride]. `dummy` is any valid 16-byte aligned global address (read by
// nothing, named by the zero-fill copies).
template <typename T, typename Source>
PI_DEVICE void copy_runs(T* dst, int pitch, int runs, int count, int granule, const Source& source, const T* dummy,
                         int64_t stride = 1, int fill = 0) {
  switch (granule) {
    case 16:
      return copy_runs_with<16>(dst, pitch, runs, count, source, dummy, fill);
    case 8:
      return copy_runs_with<8>(dst, pitch, runs, count, source, dummy, fill);
    case 4:
      return copy_runs_with<4>(dst, pitch, runs, count, source, dummy, fill);
    default: {
      const int width = max(count, fill);
      const FastDiv div_width(static_cast<uint32_t>(width > 0 ? width : 1));
      for (int e = static_cast<int>(threadIdx.x); e < runs * width; e += static_cast<int>(blockDim.x)) {
        uint32_t run, i;
        div_width.divmod(static_cast<uint32_t>(e), run, i);
        const T* src = source(static_cast<int>(run));
        dst[static_cast<int>(run) * pitch + static_cast<int>(i)] =
            src != nullptr && static_cast<int>(i) < count ? src[i * stride] : T(0);
      }
    }
  }
}

// Raw row pitch (elements) for runs of `count` elements: an odd number of 16-byte units (rows read as 16-byte
// vectors by consecutive threads then fall in distinct bank groups).
__host__ __device__ constexpr int raw_pitch(int count, int element_size) {
  const int units = (count * element_size + 15) / 16;
  return (units % 2 == 0 ? units + 1 : units) * (16 / element_size);
}

// Rearranges raw rows into a staged layout. Raw row r (r < rows; pitch raw_pitch, 16-byte aligned) holds `count`
// elements; element j < width of row r goes to dst[row_offset(r) + offset(j)], as zeros for j >= count and for
// rows r >= valid_rows. Each thread reads one 16-byte group of a row and scatters it; consecutive threads take
// consecutive rows, so their stores fall side by side when row_offset grows by one.
template <typename T, typename RowOffset, typename Offset>
PI_DEVICE void scatter_rows(const T* raw, int raw_pitch, int rows, int valid_rows, int count, int width, T* dst,
                            const RowOffset& row_offset, const Offset& offset) {
  constexpr int kVector = 16 / static_cast<int>(sizeof(T));
  const int groups = (width + kVector - 1) / kVector;
  const FastDiv div_rows(static_cast<uint32_t>(rows > 0 ? rows : 1));
  for (int e = static_cast<int>(threadIdx.x); e < rows * groups; e += static_cast<int>(blockDim.x)) {
    uint32_t group, r;
    div_rows.divmod(static_cast<uint32_t>(e), group, r);
    const int j0 = static_cast<int>(group) * kVector;
    T v[kVector];
    if (static_cast<int>(r) < valid_rows && j0 < count) {
      load_vector(v, raw + static_cast<int>(r) * raw_pitch + j0);
    }
    const int base = row_offset(static_cast<int>(r));
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      const int j = j0 + i;
      if (j < width) dst[base + offset(j)] = static_cast<int>(r) < valid_rows && j < count ? v[i] : T(0);
    }
  }
}

// The raw copy of a template region: rows of `row_count` elements at `pitch`, one per channel (a template whose
// rows are contiguous, when the region is all of it: a whole plane per row) or one per (region row, channel),
// in that order. Element (c, h, w) of the region is at element(c, h, w).
struct RegionLayout {
  bool planes;
  int row_count, pitch, c_count, plane_width;
  PI_DEVICE int element(int c, int h, int w) const {
    return planes ? c * pitch + h * plane_width + w : (h * c_count + c) * pitch + w;
  }
};

template <typename scalar_t>
PI_DEVICE RegionLayout template_region_layout(const Tensors<scalar_t>& t, const Shape& s, int c_count, int height,
                                              int width) {
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  RegionLayout l;
  l.planes = height == s.H && width == s.W && t.t_w == 1 && t.t_h == s.W;
  l.row_count = l.planes ? static_cast<int>(s.in_pixels) : width;
  l.pitch = raw_pitch(l.row_count, kElem);
  l.c_count = c_count;
  l.plane_width = s.W;
  return l;
}

// Shared-memory elements the raw copy of a region of (height x width) with up to c_count channels needs.
inline int64_t template_raw_elements(const Shape& s, int c_count, int height, int width, int element_size) {
  const int64_t rows = static_cast<int64_t>(c_count) * height * raw_pitch(width, element_size);
  const int64_t planes = height == s.H && width == s.W ? c_count * static_cast<int64_t>(raw_pitch(
                                                                       static_cast<int>(s.in_pixels), element_size))
                                                       : 0;
  return std::max(rows, planes);
}

// Issues the raw copy of a template region: channels [0, c_count) from `tpl` (the region's first channel),
// rows [h0, h0 + height), columns [w0, w0 + width), with cp.async where the rows are contiguous and aligned.
template <typename scalar_t>
PI_DEVICE RegionLayout copy_template_region(const scalar_t* tpl, const Tensors<scalar_t>& t, const Shape& s,
                                            int c_count, int h0, int w0, int height, int width, scalar_t* raw) {
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  const RegionLayout layout = template_region_layout(t, s, c_count, height, width);
  if (layout.planes) {
    copy_runs(raw, layout.pitch, c_count, layout.row_count,
              common_granule(reinterpret_cast<uintptr_t>(tpl), static_cast<uint64_t>(t.t_c) * kElem),
              [&](int c) { return tpl + static_cast<int64_t>(c) * t.t_c; }, t.weight);
    return layout;
  }
  const scalar_t* first = tpl + h0 * t.t_h + w0 * t.t_w;
  const int granule = t.t_w != 1 ? 0
                                 : min(common_granule(reinterpret_cast<uintptr_t>(first), t.t_c * kElem),
                                       granule_of(static_cast<uint64_t>(t.t_h * kElem)));
  const FastDiv div_c(static_cast<uint32_t>(max(c_count, 1)));
  copy_runs(raw, layout.pitch, c_count * height, width, granule,
            [&](int run) {
              uint32_t h, c;
              div_c.divmod(static_cast<uint32_t>(run), h, c);
              return first + static_cast<int64_t>(c) * t.t_c + static_cast<int64_t>(h) * t.t_h;
            },
            t.weight, t.t_w);
  return layout;
}

// The raw region rearranged channels-last: dst[slot * pitch + c] for slot = h * width + w and c < c_pad (zeros
// past c_count), followed by one slot of zeros.
template <typename scalar_t>
PI_DEVICE void template_to_channels_last(const scalar_t* raw, const RegionLayout& layout, int c_pad, int height,
                                         int width, scalar_t* dst, int pitch) {
  const int slots = height * width, c_count = layout.c_count;
  if (layout.planes) {
    scatter_rows(raw, layout.pitch, c_count, c_count, slots, slots, dst, [](int c) { return c; },
                 [&](int j) { return j * pitch; });
  } else {  // consecutive threads take consecutive channels of one region row
    const FastDiv div_c(static_cast<uint32_t>(max(c_count, 1)));
    const int rows = c_count * height;
    scatter_rows(raw, layout.pitch, rows, rows, width, width, dst,
                 [&](int i) {
                   uint32_t h, c;
                   div_c.divmod(static_cast<uint32_t>(i), h, c);
                   return static_cast<int>(h) * width * pitch + static_cast<int>(c);
                 },
                 [&](int j) { return j * pitch; });
  }
  // Channels past c_count, and the zero slot.
  const int extra = c_pad - c_count;
  for (int e = static_cast<int>(threadIdx.x); e < slots * extra; e += static_cast<int>(blockDim.x)) {
    dst[(e / extra) * pitch + c_count + e % extra] = scalar_t(0);
  }
  for (int c = static_cast<int>(threadIdx.x); c < c_pad; c += static_cast<int>(blockDim.x)) dst[slots * pitch + c] = scalar_t(0);
}

}  // namespace pointins_ops::cuda
