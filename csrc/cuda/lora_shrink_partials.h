// The LoRA shrink of the decode kernels (nf4_linear's block-aligned kernel, lora_decode), x @ A^T
// for M <= 16 tokens as fp32 partial sums over slices of K, which those kernels add (in split order)
// and scale themselves; launched just before them, which may start while it runs (programmatic
// dependent launch).
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lora_fused {
namespace cuda {

// Slices of at least kLoraShrinkSplitCols columns (4x that with 32-warp blocks, the default:
// LORA_FUSED_LORA_SHRINK_WARPS), at most kLoraShrinkMaxSplits of them.
constexpr int kLoraShrinkSplitCols = 1024;
constexpr int kLoraShrinkMaxSplits = 8;
int lora_shrink_splits(int64_t k);

// parts [lora_shrink_splits(k)][m][r] fp32 = x @ lora_A^T summed over each slice. x [m, k] with row
// stride ldx and lora_A [r, k] contiguous, both 16-byte aligned (ldx % 8 == 0), k % 32 == 0, m <= 16,
// bf16 or fp16, sm_80+.
#ifdef __CUDACC__
// Element (m, j) of x @ lora_A^T from the partial sums parts [splits][m_total][r], added in split
// order (deterministic), for the decode kernels that read them.
__device__ __forceinline__ float lora_shrink_sum(const float* parts, int splits, int m_total, int r, int m, int j) {
  float v = 0.0f;
  for (int sp = 0; sp < splits; ++sp) v += parts[(sp * m_total + m) * r + j];
  return v;
}
#endif

void lora_shrink_partials_launch(const void* x, int64_t ldx, const void* lora_A, float* parts, int m, int r, int64_t k,
                                 at::ScalarType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_fused
