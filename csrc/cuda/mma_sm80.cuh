// Warp-level tensor-core building blocks (sm_80 and newer): mma.sync m16n8k16 with fp32
// accumulators, ldmatrix, cp.async (and an mbarrier that tracks it). Shared by the kernels that use tensor cores without CUTLASS.
// Compiled for an older target they trap: their launchers check the GPU first.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lora_fused {
namespace cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LORA_FUSED_SM80_ONLY(...) __trap()
#else
#define LORA_FUSED_SM80_ONLY(...) __VA_ARGS__
#endif

// Two floats rounded to one 32-bit register of 16-bit values, the lower index in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<at::BFloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<at::Half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<at::BFloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LORA_FUSED_SM80_ONLY(asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
}
template <>
__device__ __forceinline__ void mma16816<at::Half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  LORA_FUSED_SM80_ONLY(asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
}

// Four 8x8 matrices of 16-bit values from shared memory; lane i gives the address of row i % 8 of
// matrix i / 8, and register j receives this lane's pair of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  LORA_FUSED_SM80_ONLY(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                                    : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                                    : "r"(smem_addr)));
}

// As ldmatrix_x4, each matrix transposed: register j receives, of matrix j, the elements at rows
// 2 (i % 4) and 2 (i % 4) + 1 of column i / 4 (lane i): a B (col) fragment from a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  LORA_FUSED_SM80_ONLY(asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                                    : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                                    : "r"(smem_addr)));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* src, int src_bytes) {
  LORA_FUSED_SM80_ONLY(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(src),
                                    "r"(src_bytes)));
}
// 4 bytes global -> shared (through L1: cp.async takes 16 bytes only with .cg); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* src, int src_bytes) {
  LORA_FUSED_SM80_ONLY(asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(src),
                                    "r"(src_bytes)));
}
__device__ __forceinline__ void cp_async_commit() { LORA_FUSED_SM80_ONLY(asm volatile("cp.async.commit_group;\n" ::)); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  LORA_FUSED_SM80_ONLY(asm volatile("cp.async.wait_group %0;\n" ::"n"(N)));
}


// An mbarrier that completes a phase when `count` threads have arrived through
// cp_async_arrive_on(), each once their earlier cp.async copies have landed.
__device__ __forceinline__ void mbarrier_init(uint32_t mbar, int count) {
  LORA_FUSED_SM80_ONLY(asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(mbar), "r"(count) : "memory"));
}
// This thread's arrival, when all the cp.async copies it issued so far are complete.
__device__ __forceinline__ void cp_async_arrive_on(uint32_t mbar) {
  LORA_FUSED_SM80_ONLY(asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(mbar) : "memory"));
}
// This thread's arrival (release: its shared-memory writes before it are seen by the threads that
// wait for the phase).
__device__ __forceinline__ void mbarrier_arrive(uint32_t mbar) {
  LORA_FUSED_SM80_ONLY(asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(mbar) : "memory"));
}
// Waits until the phase of the given parity (0, 1, 0, ...: phase number % 2) has completed.
__device__ __forceinline__ void mbarrier_wait_parity(uint32_t mbar, uint32_t parity) {
  LORA_FUSED_SM80_ONLY(asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.test_wait.parity.shared.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(mbar),
      "r"(parity)
      : "memory"));
}

}  // namespace cuda
}  // namespace lora_fused
