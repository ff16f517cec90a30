#include "gemm_concat_k.h"

#include "checks.h"
#include "gemm.h"

namespace lora_fused {

void check_gemm_concat_k_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                              const c10::optional<at::Tensor>& bias, at::DeviceType device) {
  const char* op = "lora_fused.gemm_concat_k";
  check_lora_dtype(a, op, "a");
  check_rank(a, 2, op, "a");
  check_rank(b, 2, op, "b");
  check_rank(a2, 2, op, "a2");
  check_rank(b2, 2, op, "b2");
  check_same(a, "a", b, "b", op);
  check_same(a, "a", a2, "a2", op);
  check_same(a, "a", b2, "b2", op);
  check_device(a, device, op, "a");
  TORCH_CHECK_VALUE(b.size(1) == a.size(1) && a2.size(0) == a.size(0) && b2.size(0) == b.size(0) &&
                        b2.size(1) == a2.size(1),
                    op, ": expected a [M, K1], b [N, K1], a2 [M, K2], b2 [N, K2]; got a ", a.sizes(), ", b ",
                    b.sizes(), ", a2 ", a2.sizes(), ", b2 ", b2.sizes());
  if (bias.has_value()) {
    check_same(a, "a", *bias, "bias", op);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == b.size(0), op, ": bias must have shape [", b.size(0),
                      "]; got a ", describe(*bias));
  }
}

at::Tensor gemm_concat_k_composed(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, const at::Tensor& b2,
                                  const c10::optional<at::Tensor>& bias) {
  at::Tensor out = bias.has_value() ? at::addmm(*bias, a2, b2.t()) : gemm(a2, b2.t());
  gemm_into(out, a, b.t(), 1.0, true);
  return out;
}

}  // namespace lora_fused
