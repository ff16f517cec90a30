// Host side of the NF4 x bf16 Hopper GEMM (cuda/sm90/nf4_gemm.cuh) on ATen tensors, shared by the
// op lora_fused::nf4_gemm_sm90 and nf4_linear's Hopper path.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace lora_fused {
namespace cuda {

// t itself when contiguous and 16-byte aligned (as TMA needs), else a copy that is.
at::Tensor contiguous_aligned16(const at::Tensor& t);

// Whether this build and the current GPU run it at all (an sm_90a build on an sm_90 GPU).
bool nf4_gemm_sm90_available();

// Whether CUTLASS takes an [m, k] x [n, k] problem (k % 64 == 0, n % 8 == 0, 16-byte aligned rows).
bool nf4_gemm_sm90_can_implement(int64_t m, int64_t n, int64_t k, bool shuffled = false);

// y [m, n] bf16 = x [m, k] bf16 (contiguous, 16-byte aligned) times the NF4 weight `packed` ([n, k]
// codes, bitsandbytes' packing, 16-byte aligned) with bf16 scales [k / 64, n] (contiguous); tiles
// of 128 weight rows x tile_tokens (128 or 256) tokens; shuffled: packed in nf4_repack's layout.
at::Tensor nf4_gemm_sm90_run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n,
                             int64_t tile_tokens = 128, bool shuffled = false);

}  // namespace cuda
}  // namespace lora_fused
