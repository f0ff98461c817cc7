// Warp-level instructions the kernels use, as inline PTX for sm_80 and newer, or as the emulation's functions
// (emulation/prelude.h) when compiled for the CPU. Every use of tensor cores, ldmatrix and cp.async in
// csrc/cuda/ goes through here, so the emulation runs exactly the code the GPU runs around them.
#pragma once

#include "platform.cuh"

#include <cstdint>

#define PI_DEVICE __device__ __forceinline__

namespace pointins_ops::cuda {

PI_DEVICE int lane_id() { return static_cast<int>(threadIdx.x % 32); }
PI_DEVICE int warp_id() { return static_cast<int>(threadIdx.x / 32); }

// Shared-memory addresses as the ldmatrix instructions take them: 32-bit offsets in the shared window on the GPU,
// host addresses in the emulation; byte arithmetic on them is the same on both.
#if defined(POINTINS_EMULATION)
using SmemAddr = uintptr_t;
PI_DEVICE SmemAddr smem_addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
#else
using SmemAddr = uint32_t;
PI_DEVICE SmemAddr smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
PI_DEVICE uint32_t shared_address(const void* p) { return smem_addr(p); }
#endif

// --- ldmatrix: four (or two) 8x8 matrices of 16-bit elements; `row` is this lane's row address (16-byte aligned,
// in shared memory). Lanes 8i..8i+7 address the rows of matrix i; register i of lane l receives elements
// (l / 4, 2 (l % 4) .. 2 (l % 4) + 1) of matrix i, or of its transpose with .trans.
PI_DEVICE void ldsm_x4(uint32_t (&r)[4], SmemAddr row) {
#if defined(POINTINS_EMULATION)
  emu::ldmatrix(r, 4, false, reinterpret_cast<const void*>(row));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#endif
}

PI_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], SmemAddr row) {
#if defined(POINTINS_EMULATION)
  emu::ldmatrix(r, 4, true, reinterpret_cast<const void*>(row));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#endif
}

// --- mma.sync: D += A * B on one warp. m16n8k16 for bfloat16 / float16 (kind 0 / 1), m16n8k8 for tf32.
// Fragments (g = lane / 4, t = lane % 4): A r0 (g, 2t..2t+1), r1 (g+8, ..), r2 (g, 2t+8..), r3 (g+8, 2t+8..);
// B r0 (k 2t..2t+1, n g), r1 (k 2t+8.., n g); D d0 (g, 2t), d1 (g, 2t+1), d2 (g+8, 2t), d3 (g+8, 2t+1).
// tf32: A r0 (g, t), r1 (g+8, t), r2 (g, t+4), r3 (g+8, t+4); B r0 (k t, n g), r1 (k t+4, n g).
template <int kKind>
PI_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(POINTINS_EMULATION)
  emu::mma(d, a, b, kKind);
#else
  if constexpr (kKind == 0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (kKind == 1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// float -> tf32 (round to nearest, ties away from zero), as cvt.rna.tf32.f32; the result keeps float32's layout.
PI_DEVICE uint32_t to_tf32(uint32_t float_bits) {
#if defined(POINTINS_EMULATION)
  const uint32_t exponent = float_bits & 0x7F800000u;
  if (exponent == 0x7F800000u) return float_bits;  // inf / nan unchanged
  return (float_bits + 0x1000u) & 0xFFFFE000u;
#else
  uint32_t result;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(result) : "f"(__uint_as_float(float_bits)));
  return result;
#endif
}

// --- cp.async: kBytes (4, 8 or 16) from global to shared memory, the last kBytes - src_bytes of them zeros
// (src_bytes = 0: nothing is read, and `global` need only be a valid, aligned address).
template <int kBytes>
PI_DEVICE void cp_async(void* smem, const void* global, int src_bytes) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if defined(POINTINS_EMULATION)
  emu::cp_async(smem, global, kBytes, src_bytes);
#else
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(global),
                 "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(smem)), "l"(global),
                 "n"(kBytes), "r"(src_bytes)
                 : "memory");
  }
#endif
}

PI_DEVICE void cp_async_commit() {
#if defined(POINTINS_EMULATION)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
PI_DEVICE void cp_async_wait() {
#if defined(POINTINS_EMULATION)
  emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// The kernel's dynamic shared memory (every kernel here uses dynamic shared memory only).
PI_DEVICE unsigned char* dynamic_smem() {
#if defined(POINTINS_EMULATION)
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char pointins_smem[];
  return pointins_smem;
#endif
}

// --- shared-memory vectors for the FFMA path: whole 16-byte vectors, or one 8- or 4-byte one ---
template <typename T, int kCount>
PI_DEVICE void load_vector(T (&out)[kCount], const T* p) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * kCount;
  static_assert(kBytes % 16 == 0 || kBytes == 8 || kBytes == 4, "16-byte vectors, or one 8- or 4-byte one");
  constexpr int kAlign = kBytes < 16 ? kBytes : 16;
#if defined(POINTINS_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % kAlign != 0) emu::fail("load_vector: address not aligned to its vector size");
  std::memcpy(out, p, kBytes);
#else
  if constexpr (kBytes == 4) {
    *reinterpret_cast<uint32_t*>(out) = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(p);
  } else {
#pragma unroll
    for (int v = 0; v < kBytes / 16; ++v) reinterpret_cast<uint4*>(out)[v] = reinterpret_cast<const uint4*>(p)[v];
  }
#endif
  (void)kAlign;
}

// Division by a divisor that many threads share: q = x / d for 0 <= x < 2^31 with a multiply-high and one
// correction, and a magic number that costs one 32-bit division to make (so kernels make their own per tile,
// without the subroutine call a 64-bit division would be). m = ceil(2^32 / d) puts umulhi(x, m) at q or q + 1.
struct FastDiv {
  uint32_t divisor = 1, multiplier = 0;
  FastDiv() = default;
  __host__ __device__ explicit FastDiv(uint32_t d) : divisor(d), multiplier(d > 1 ? 0xFFFFFFFFu / d + 1u : 0u) {}
  PI_DEVICE uint32_t div(uint32_t x) const {
    if (divisor == 1) return x;
#if defined(POINTINS_EMULATION)
    uint32_t q = static_cast<uint32_t>((static_cast<uint64_t>(x) * multiplier) >> 32);
#else
    uint32_t q = __umulhi(x, multiplier);
#endif
    return q * divisor > x ? q - 1 : q;
  }
  PI_DEVICE void divmod(uint32_t x, uint32_t& q, uint32_t& r) const {
    q = div(x);
    r = x - q * divisor;
  }
};

}  // namespace pointins_ops::cuda
