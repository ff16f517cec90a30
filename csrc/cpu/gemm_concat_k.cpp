// gemm_concat_k on CPU: two ATen GEMMs (see gemm_concat_k.h).
#include <torch/library.h>

#include "gemm_concat_k.h"

namespace lora_fused {

at::Tensor gemm_concat_k_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                             const c10::optional<at::Tensor>& bias) {
  check_gemm_concat_k_args(a, b, a2, b2, bias, at::kCPU);
  return gemm_concat_k_composed(a, b, a2, b2, bias);
}

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("gemm_concat_k", &gemm_concat_k_cpu); }

}  // namespace lora_fused
