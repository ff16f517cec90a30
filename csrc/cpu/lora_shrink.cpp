// lora_shrink on CPU: u = scale * x @ lora_A^T, accumulated in fp32 (fp64 for fp64 inputs) and
// rounded once to x's dtype. Simple and correct; speed lives in the CUDA version.
#include <torch/library.h>

#include "checks.h"

namespace lora_fused {

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_a, double scale) {
  check_lora_shrink_args(x, lora_a);
  check_device(x, at::kCPU, "lora_fused.lora_shrink", "x");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::matmul(x.to(acc), lora_a.to(acc).t()).mul_(scale).to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_shrink", &lora_shrink_cpu); }

}  // namespace lora_fused
