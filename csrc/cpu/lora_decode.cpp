// lora_decode on CPU: the composed layer (ATen GEMMs), correct for any M.
#include <torch/library.h>

#include "checks.h"
#include "lora_linear_composed.h"

namespace lora_fused {

at::Tensor lora_decode_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                           const at::Tensor& lora_b, double scale, const c10::optional<at::Tensor>& bias) {
  check_lora_linear_args(x, weight, lora_a, lora_b, bias, "lora_fused.lora_decode");
  check_device(x, at::kCPU, "lora_fused.lora_decode", "x");
  return lora_linear_composed(x, weight, lora_a, lora_b, scale, bias);
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_decode", &lora_decode_cpu); }

}  // namespace lora_fused
