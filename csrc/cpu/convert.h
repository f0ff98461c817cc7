// Conversions between the kernels' element types and their accumulation type, written so loops of them
// vectorize: bfloat16 is the top half of a float (widening is a shift; narrowing rounds to nearest even, with a
// select for NaN, no branch), and the row loops work on the raw 16-bit patterns. float16 goes through c10
// (correct everywhere; CPU users train in bfloat16, so it is not tuned).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pointins_ops {
namespace cpu {

#define POINTINS_CONVERT_INLINE __attribute__((always_inline)) inline

POINTINS_CONVERT_INLINE float bf16_bits_to_float(uint16_t bits) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
}
POINTINS_CONVERT_INLINE uint16_t float_to_bf16_bits(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);  // NaN stays a (quiet) NaN
}

POINTINS_CONVERT_INLINE float to_acc(float x) { return x; }
POINTINS_CONVERT_INLINE double to_acc(double x) { return x; }
POINTINS_CONVERT_INLINE float to_acc(c10::Half x) { return static_cast<float>(x); }
POINTINS_CONVERT_INLINE float to_acc(c10::BFloat16 x) { return bf16_bits_to_float(__builtin_bit_cast(uint16_t, x)); }

template <typename scalar_t>
POINTINS_CONVERT_INLINE scalar_t from_acc(at::opmath_type<scalar_t> x) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return __builtin_bit_cast(c10::BFloat16, float_to_bf16_bits(x));
  } else {
    return static_cast<scalar_t>(x);
  }
}

// 16 bfloat16 values as vectors of their float32 and 16-bit patterns, so blocks of them convert in registers
// whatever the compiler's cost model makes of a short loop (a fully unrolled 16-element loop stays scalar).
typedef float FloatBlock __attribute__((vector_size(64)));
typedef uint32_t WordBlock __attribute__((vector_size(64)));
typedef int32_t MaskBlock __attribute__((vector_size(64)));
typedef uint16_t HalfBlock __attribute__((vector_size(32)));

// x rounded to bfloat16 (as float_to_bf16_bits, lane by lane), as 16-bit patterns.
POINTINS_CONVERT_INLINE void narrow_lanes(FloatBlock x, HalfBlock& narrow) {
  const WordBlock bits = reinterpret_cast<WordBlock>(x);
  WordBlock rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const MaskBlock nan = x != x;
  rounded = nan ? WordBlock{} + 0x7FC0u : rounded;
  narrow = __builtin_convertvector(rounded, HalfBlock);
}

POINTINS_CONVERT_INLINE void narrow_block(const float* __restrict__ src, float shift, uint16_t* __restrict__ dst) {
  FloatBlock x;
  std::memcpy(&x, src, sizeof(x));
  HalfBlock narrow;
  narrow_lanes(x + shift, narrow);
  std::memcpy(dst, &narrow, sizeof(narrow));
}

// 16 bfloat16 patterns widened to float32 (a shift per lane).
POINTINS_CONVERT_INLINE void widen_lanes(const HalfBlock& bits, FloatBlock& wide) {
  wide = reinterpret_cast<FloatBlock>(__builtin_convertvector(bits, WordBlock) << 16);
}

POINTINS_CONVERT_INLINE void widen_block(const uint16_t* __restrict__ src, float* __restrict__ dst) {
  HalfBlock bits;
  std::memcpy(&bits, src, sizeof(bits));
  FloatBlock wide;
  widen_lanes(bits, wide);
  std::memcpy(dst, &wide, sizeof(wide));
}

// dst[t] = from_acc(src[t] + shift) for t < n.
template <typename scalar_t>
POINTINS_CONVERT_INLINE void store_row(const at::opmath_type<scalar_t>* __restrict__ src,
                                       at::opmath_type<scalar_t> shift, int64_t n, scalar_t* __restrict__ dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) narrow_block(src + t, shift, bits + t);
    for (; t < n; ++t) bits[t] = float_to_bf16_bits(src[t] + shift);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = static_cast<scalar_t>(src[t] + shift);
  }
}

// dst[t] = to_acc(src[t]) for t < n.
template <typename scalar_t>
POINTINS_CONVERT_INLINE void load_row(const scalar_t* __restrict__ src, int64_t n,
                                      at::opmath_type<scalar_t>* __restrict__ dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) widen_block(bits + t, dst + t);
    for (; t < n; ++t) dst[t] = bf16_bits_to_float(bits[t]);
  } else {
    for (int64_t t = 0; t < n; ++t) dst[t] = to_acc(src[t]);
  }
}

}  // namespace cpu
}  // namespace pointins_ops
