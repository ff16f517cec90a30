// gemm_concat_k for bf16, B given as [N, K] with unit stride along K (x·Wᵀ: the forward).
#include "cuda/sm90/gemm_concat_k_impl.cuh"

namespace lora_fused::sm90 {
LORA_FUSED_INSTANTIATE_GEMM_CONCAT_K(cutlass::bfloat16_t, true)
}  // namespace lora_fused::sm90
