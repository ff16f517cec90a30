// lora_adapter_grads: the LoRA branch's backward in one op (CPU and CUDA alike, through gemm_into:
// cuBLASLt with cached plans on CUDA), so a layer's backward costs the host one dispatch instead of
// the five or six torch.mm / mul_ calls it took from Python (each 20-140 us of host on the GPU machine:
// the QLoRA step at M = 4096 was bound by the host, benchmarks/RESULTS.md session 13).
#include <torch/library.h>

#include "checks.h"
#include "gemm.h"

namespace lora_fused {
namespace {

void check_lora_adapter_grads_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                                   const at::Tensor& b, const c10::optional<at::Tensor>& u) {
  const char* op = "lora_fused.lora_adapter_grads";
  check_lora_dtype(dy, op, "grad_out");
  check_rank(dy, 2, op, "grad_out");
  check_rank(x, 2, op, "x");
  check_rank(a, 2, op, "lora_A");
  check_rank(b, 2, op, "lora_B");
  check_same(dy, "grad_out", x, "x", op);
  check_same(dy, "grad_out", a, "lora_A", op);
  check_same(dy, "grad_out", b, "lora_B", op);
  TORCH_CHECK_VALUE(a.size(0) >= 1, op, ": the rank r = lora_A.shape[0] must be at least 1; got ", describe(a));
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0) && a.size(1) == x.size(1) && b.size(0) == dy.size(1) &&
                        b.size(1) == a.size(0),
                    op, ": expected grad_out [M, N], x [M, K], lora_A [r, K], lora_B [N, r]; got grad_out ",
                    dy.sizes(), ", x ", x.sizes(), ", lora_A ", a.sizes(), ", lora_B ", b.sizes());
  if (u.has_value()) {
    check_same(dy, "grad_out", *u, "u", op);
    TORCH_CHECK_VALUE(u->dim() == 2 && u->size(0) == dy.size(0) && u->size(1) == a.size(0), op,
                      ": u must be [M, r] = [", dy.size(0), ", ", a.size(0), "]; got a ", describe(*u));
  }
}

// du = scale dY B [M, r]; dA = du^T x [r, K]; dB = dY^T u [N, r] with u = scale x A^T (made here
// unless given). A gradient not asked for comes back as a [0, ...] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_adapter_grads(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                  double scale, const c10::optional<at::Tensor>& u,
                                                                  bool need_A, bool need_B) {
  check_lora_adapter_grads_args(grad_out, x, lora_A, lora_B, u);
  const int64_t r = lora_A.size(0);
  at::Tensor du = gemm(grad_out, lora_B, scale);
  at::Tensor dA = need_A ? gemm(du.t(), x) : at::empty({0, x.size(1)}, x.options());
  at::Tensor dB;
  if (need_B) {
    dB = gemm(grad_out.t(), u.has_value() ? *u : gemm(x, lora_A.t(), scale));
  } else {
    dB = at::empty({0, r}, x.options());
  }
  return {du, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_adapter_grads", &lora_adapter_grads); }
#ifdef LORA_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_adapter_grads", &lora_adapter_grads); }
#endif

}  // namespace lora_fused
