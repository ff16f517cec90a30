// lora_expand on CPU: out = y + scale * u @ lora_B^T, accumulated in fp32 (fp64 for fp64 inputs)
// and rounded once to y's dtype.
#include <torch/library.h>

#include "checks.h"

namespace lora_fused {

at::Tensor lora_expand_cpu(const at::Tensor& y, const at::Tensor& u, const at::Tensor& lora_b, double scale) {
  check_lora_expand_args(y, u, lora_b);
  check_device(y, at::kCPU, "lora_fused.lora_expand", "y");
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::matmul(u.to(acc), lora_b.to(acc).t()).mul_(scale).add_(y.to(acc)).to(y.scalar_type());
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_expand", &lora_expand_cpu); }

}  // namespace lora_fused
