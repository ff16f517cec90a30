// The NF4 x bf16 Hopper GEMM (nf4_gemm_impl.cuh) with 128 weight rows x 256 tokens per tile, the
// weight in nf4_repack's layout.
#include "cuda/sm90/nf4_gemm.cuh"
#include "cuda/sm90/nf4_gemm_impl.cuh"

namespace lora_fused::sm90 {
const Nf4GemmOps kNf4Gemm128x256Shuffled = nf4_gemm_detail::Nf4Gemm<256, true>::ops();
}  // namespace lora_fused::sm90
