// The tensor-core kernel of lora_decode (M = 2..16 tokens): out = x @ W^T + scale * u @ B^T + bias
// with W streamed once straight from global memory into mma.sync fragments.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lora_fused {
namespace cuda {

struct LoraDecodeArgs {
  const void* x;  // [M, K], row stride ldx, 16-byte aligned rows
  int64_t ldx;
  const void* w;  // [D, K], row stride ldw, 16-byte aligned rows
  int64_t ldw;
  const void* u;  // [M, R] (T) with row stride ldu, or nullptr: then parts [splits][M][R] fp32
  int64_t ldu;
  const float* parts;
  int splits;
  const void* b;  // lora_B [D, R], strides b_sd, b_sr
  int64_t b_sd, b_sr;
  const void* bias;  // [D] or nullptr
  void* out;         // [M, D] contiguous
  int M, R;
  int64_t K, D;      // K % 8 == 0
  float scale;
  // The tensor-core kernel: a thread's elements of u loaded together, not one by one
  // (lora_decode_u_together).
  bool u_together;
};

// Whether the decode kernels load a weight of weight_bytes with streaming hints (stream_load.cuh): where
// it is larger than the GPU's L2 (on the H100 3-8% faster at 90 and 134 MB, and 37-64% slower at 32 MB,
// which stays in L2 across CUDA-graph replays: RESULTS.md, session 30); LORA_FUSED_DECODE_STREAM_HINTS
// = 0 / 1 forces them off / on (the tensor-core kernel's 16-row warps and the CUDA-core kernel's
// one-token blocks).
bool lora_decode_stream_hints(int64_t weight_bytes);

// Whether lora_decode's tensor-core kernel loads a thread's elements of u together, one round trip
// instead of one each (r = 64 at 16 tokens: 4 elements a thread): yes, unless
// LORA_FUSED_DECODE_U_TOGETHER=0.
bool lora_decode_u_together();

// bf16 or fp16, M <= 16, R <= 256, sm_80+; pdl: launched to overlap the shrink kernel before it
// (it then waits for it before it reads parts); stream_hints: lora_decode_stream_hints.
void lora_decode_mma_launch(const LoraDecodeArgs& a, at::ScalarType dtype, bool pdl, bool stream_hints, cudaStream_t stream);

}  // namespace cuda
}  // namespace lora_fused
