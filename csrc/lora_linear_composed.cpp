#include "lora_linear_composed.h"

namespace lora_fused {

at::Tensor lora_linear_composed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scale, const c10::optional<at::Tensor>& bias) {
  const at::Tensor u = at::mm(x, lora_a.t());
  const at::Tensor lora = bias.has_value() ? at::addmm(*bias, u, lora_b.t(), /*beta=*/1, /*alpha=*/scale)
                                           : at::mm(u.mul(scale), lora_b.t());
  return at::addmm(lora, x, weight.t());
}

}  // namespace lora_fused
