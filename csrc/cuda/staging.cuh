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

// Where the raw copy of a template region puts element (c, h, w): c * c_stride + h * h_stride + w.
struct RegionLayout {
  int c_stride, h_stride;
};

// Issues the raw copy of a template region: channels [0, c_count) from `tpl` (the region's first channel),
// rows [h0, h0 + height), columns [w0, w0 + width), into `raw` (row pitch raw_pitch elements). A contiguous
// template whose region is all of it is copied as one run in its own layout; otherwise one run per (channel,
// row), with cp.async where the rows are contiguous and aligned.
template <typename scalar_t>
PI_DEVICE RegionLayout copy_template_region(const scalar_t* tpl, const Tensors<scalar_t>& t, const Shape& s,
                                            int c_count, int h0, int w0, int height, int width, scalar_t* raw,
                                            int raw_row_pitch) {
  constexpr int kElem = static_cast<int>(sizeof(scalar_t));
  if (height == s.H && width == s.W && t.t_w == 1 && t.t_h == s.W && t.t_c == s.in_pixels) {
    copy_runs(raw, 0, 1, c_count * static_cast<int>(s.in_pixels), granule_of(reinterpret_cast<uintptr_t>(tpl)),
              [&](int) { return tpl; }, t.weight);
    return {static_cast<int>(s.in_pixels), s.W};
  }
  const scalar_t* first = tpl + h0 * t.t_h + w0 * t.t_w;
  const int granule = t.t_w != 1 ? 0
                                 : min(common_granule(reinterpret_cast<uintptr_t>(first), t.t_c * kElem),
                                       granule_of(static_cast<uint64_t>(t.t_h * kElem)));
  const FastDiv div_h(static_cast<uint32_t>(max(height, 1)));
  copy_runs(raw, raw_row_pitch, c_count * height, width, granule,
            [&](int run) {
              uint32_t c, h;
              div_h.divmod(static_cast<uint32_t>(run), c, h);
              return first + static_cast<int64_t>(c) * t.t_c + static_cast<int64_t>(h) * t.t_h;
            },
            t.weight, t.t_w);
  return {height * raw_row_pitch, raw_row_pitch};
}

// The layout copy_template_region chose for this region (the same test, without copying).
template <typename scalar_t>
PI_DEVICE RegionLayout template_region_layout(const Tensors<scalar_t>& t, const Shape& s, int height, int width,
                                              int raw_row_pitch) {
  if (height == s.H && width == s.W && t.t_w == 1 && t.t_h == s.W && t.t_c == s.in_pixels) {
    return {static_cast<int>(s.in_pixels), s.W};
  }
  return {height * raw_row_pitch, raw_row_pitch};
}

// The raw region rearranged channels-last: dst[slot * pitch + c] for slot = h * width + w and c < c_pad (zeros
// past c_count), followed by one slot of zeros.
template <typename scalar_t>
PI_DEVICE void template_to_channels_last(const scalar_t* raw, RegionLayout layout, int c_count, int c_pad,
                                         const FastDiv& div_c_pad, int height, int width, scalar_t* dst, int pitch) {
  const int slots = height * width;
  const FastDiv div_w(static_cast<uint32_t>(max(width, 1)));
  for (int e = static_cast<int>(threadIdx.x); e < (slots + 1) * c_pad; e += static_cast<int>(blockDim.x)) {
    uint32_t slot, c, h, w;
    div_c_pad.divmod(static_cast<uint32_t>(e), slot, c);
    div_w.divmod(slot, h, w);
    scalar_t v = scalar_t(0);
    if (static_cast<int>(slot) < slots && static_cast<int>(c) < c_count) {
      v = raw[c * layout.c_stride + h * layout.h_stride + w];
    }
    dst[slot * pitch + c] = v;
  }
}

// Raw row pitch (elements) for runs of `count` elements: whole 16-byte units.
__host__ __device__ constexpr int raw_pitch(int count, int element_size) {
  return (count * element_size + 15) / 16 * (16 / element_size);
}

}  // namespace pointins_ops::cuda
