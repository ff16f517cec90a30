// lora_shrink's tensor-core kernel (csrc/cuda/lora_shrink_mma.cu), called by its CUDA launcher.
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {

// u[M, r] = scale * x @ lora_a^T into the contiguous u, on tensor cores; x or lora_a whose rows
// are not 16-byte aligned and unit-stride along k (a view at an odd offset, a transposed B) are
// copied first, which still beats the simple kernel. Returns false, touching nothing, where the
// kernel does not apply: dtype other than bf16/fp16, k % 8 != 0, a GPU older than sm_80.
bool lora_shrink_mma(const at::Tensor& x, const at::Tensor& lora_a, double scale, at::Tensor& u);

}  // namespace lora_fused
