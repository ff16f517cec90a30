// gemm_concat_k: out = a·bᵀ + a2·b2ᵀ + bias, one GEMM over the concatenated K ([a | a2]·[b | b2]ᵀ).
// a [M, K1], b [N, K1], a2 [M, K2], b2 [N, K2], bias [N] or none; out [M, N] in a's dtype.
// For a LoRA layer: the forward [x | s·x·Aᵀ]·[W | B]ᵀ + bias and the input gradient
// [dY | s·dY·B]·[W ; A] (b = Wᵀ, b2 = Aᵀ as transposed views).
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {

void check_gemm_concat_k_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                              const c10::optional<at::Tensor>& bias, at::DeviceType device);

// ATen GEMMs: (bias + a2·b2ᵀ), then a·bᵀ accumulated onto it (beta = 1). The CPU implementation,
// and the CUDA one's where the Hopper kernel does not apply.
at::Tensor gemm_concat_k_composed(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                                  const c10::optional<at::Tensor>& bias);

}  // namespace lora_fused
