// Tensor-core tile primitives (mma.sync) shared by the hand-written kernels.  Fragment layouts
// (PTX ISA, "Matrix Fragments for mma.m16n8k16" / "mma.m16n8k8"), lane = 4 g + q (g = lane / 4,
// q = lane % 4):
//   A 16 x K row-major: a[0] rows g, a[1] rows g + 8, a[2] rows g cols + K/2, a[3] rows g + 8
//     cols + K/2 (bf16: two packed values per register at cols 2q, 2q + 1; tf32: one at col q)
//   B K x 8 column-major: b0 rows (k) 2q, 2q + 1 (bf16) or q (tf32) of col g; b1 the same + K/2
//   C/D 16 x 8: d[0], d[1] row g cols 2q, 2q + 1; d[2], d[3] row g + 8, same cols
// Built for sm_90a (CMAKE_CUDA_ARCHITECTURES); on older targets the wrappers trap.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>

namespace blm {
namespace cuda {

// The TF32 bits of x, rounded to nearest (ties away), for an mma.m16n8k8 tf32 operand.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
}

// to_tf32 for a value that goes to the tensor cores and nowhere else: the bits of x plus half a
// TF32 ulp (0x1000), low 13 bits left as they fall.  The tensor cores read a TF32 operand's top
// 19 bits and ignore the rest, so the operand they see is to_tf32(x) exactly (finite x; Inf
// turns into NaN): tests/gpu/test_wgmma.cu checks wgmma products bit for bit against to_tf32
// operands.  One integer add, where cvt.rna.tf32.f32 is three instructions on sm_90 (FSETP for
// Inf/NaN, the add, the mask: seen in the SASS of the S kernels, whose per-slot operand building
// is most of their instructions).  Never for a value that is also used as a number.
__device__ __forceinline__ uint32_t tf32_operand(float x) { return __float_as_uint(x) + 0x1000u; }

// Two floats rounded to bf16 (nearest) in one register: lo in the low 16 bits (the operand with
// the smaller k or column index in a fragment).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a b for one m16n8k16 tile of bf16 operands (a: 4 registers of 2 packed bf16, b: 2).
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// d += a b for one m16n8k8 tile of TF32 operands (to_tf32 bits; a: 4 registers, b: 2).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// Four 8x8 bf16 matrices from shared memory; lane l gives the byte address (minus OFFSET) of row
// l % 8 of matrix l / 8 (16 bytes, 16-byte aligned); r[j] is matrix j's fragment (row g,
// columns 2c, 2c+1).  The _trans form: r[j] holds (row 2c, column g) and (row 2c+1, column g).
template <int OFFSET>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address), "n"(OFFSET));
}
template <int OFFSET>
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address), "n"(OFFSET));
}

}  // namespace cuda
}  // namespace blm
