// Hopper's bulk copies (the TMA engine without a tensor map: cp.async.bulk, global -> shared, sizes
// in multiples of 16 bytes) and the transaction-counting mbarriers they complete. Compiled for an
// older target these trap: their kernels' launchers check the loaded binary first.
#pragma once
#include <cstdint>

namespace lora_fused {
namespace cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LORA_FUSED_SM90_ONLY(...) __trap()
#else
#define LORA_FUSED_SM90_ONLY(...) __VA_ARGS__
#endif

__device__ __forceinline__ void tx_mbarrier_init(uint32_t mbar, int count) {
  LORA_FUSED_SM90_ONLY(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(mbar), "r"(count) : "memory"));
}

// Makes the inits above visible to the async proxy (the bulk copies' completions) before first use.
__device__ __forceinline__ void tx_mbarrier_init_fence() {
  LORA_FUSED_SM90_ONLY(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}

// This thread's arrival, adding `bytes` to the phase's expected transaction count.
__device__ __forceinline__ void tx_mbarrier_arrive_expect(uint32_t mbar, uint32_t bytes) {
  LORA_FUSED_SM90_ONLY(
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mbar), "r"(bytes) : "memory"));
}

// A plain arrival (release: this thread's shared-memory reads and writes before it are ordered before the phase).
__device__ __forceinline__ void tx_mbarrier_arrive(uint32_t mbar) {
  LORA_FUSED_SM90_ONLY(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mbar) : "memory"));
}

// Waits until the phase of the given parity has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void tx_mbarrier_wait(uint32_t mbar, uint32_t parity) {
  LORA_FUSED_SM90_ONLY(asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(mbar),
      "r"(parity)
      : "memory"));
}

// bytes (a multiple of 16; both addresses 16-byte aligned) from global to this CTA's shared memory,
// counted as transactions on mbar when they have landed.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t mbar) {
  LORA_FUSED_SM90_ONLY(asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst), "l"(src),
      "r"(bytes), "r"(mbar)
      : "memory"));
}

// bar.sync on a named barrier (1..15) among `threads` threads (a multiple of 32) of the block.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace cuda
}  // namespace lora_fused
