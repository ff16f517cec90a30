// lora_decode's Hopper kernel (lora_decode_bulk.cu): out = x @ W^T + scale * u @ B^T + bias for
// M = 1..16 tokens, W streamed into shared memory by bulk copies (TMA) in a ring that runs across a
// persistent block's row tiles. Not the default (LORA_FUSED_DECODE_KERNEL=bulk): slower than the
// other two kernels where they are used (benchmarks/RESULTS.md, session 29).
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "cuda/lora_decode_mma.h"

namespace lora_fused {
namespace cuda {

// Whether it can run here: an sm_90 GPU and a build whose loaded binary has sm_90 code.
bool lora_decode_bulk_available();

// bf16 or fp16, M <= 16, R <= 256, K % 8 == 0, x and W rows 16-byte aligned (the caller checks).
// LORA_FUSED_DECODE_ROWS (16 or 32 weight rows a tile; default 16) and LORA_FUSED_DECODE_STAGES
// (2..8 ring stages; default as many as let two blocks share an SM, at most 4) override the defaults.
void lora_decode_bulk_launch(const LoraDecodeArgs& a, at::ScalarType dtype, bool pdl, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_fused
