// The two products of the LoRA backward that read grad_out, from one read of it (lora_dy_grads.cu).
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {
namespace cuda {

// du = scale * dy @ lora_B [M, r] and dB = dy^T @ u [N, r], each rounded once from fp32, into new
// tensors of dy's dtype. false (nothing done) where the kernel does not apply: not bf16/fp16, dy not
// contiguous or its row not a multiple of 8 elements, r odd or over 64, an empty dimension, a GPU
// older than sm_80; by default also under 2048 rows or r > 32, where two GEMMs were faster
// (LORA_FUSED_LORA_GRADS=fused runs it wherever it applies, =gemm never). Then the caller runs two GEMMs.
bool lora_dy_grads(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& u, double scale, at::Tensor& du,
                   at::Tensor& dB);

}  // namespace cuda
}  // namespace lora_fused
