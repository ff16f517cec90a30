// The LoRA linear layer composed from ATen GEMMs (cuBLAS on CUDA), with the LoRA term folded into
// the base GEMM's epilogue: y = addmm(bias + scale * (x A^T) B^T, x, W^T), i.e. beta = 1, so no
// separate scale or add pass. The CPU implementation of lora_decode, and the CUDA one's fallback.
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {

at::Tensor lora_linear_composed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scale, const c10::optional<at::Tensor>& bias);

}  // namespace lora_fused
