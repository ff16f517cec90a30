// gemm_concat_k for fp16, B given as [K, N] with unit stride along N (dY·W: the input gradient).
#include "cuda/sm90/gemm_concat_k_impl.cuh"

namespace lora_fused::sm90 {
LORA_FUSED_INSTANTIATE_GEMM_CONCAT_K(cutlass::half_t, false)
}  // namespace lora_fused::sm90
