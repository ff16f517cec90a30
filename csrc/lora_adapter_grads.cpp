// lora_adapter_grads: the LoRA branch's backward in one op (CPU and CUDA alike, through gemm_into:
// cuBLASLt with cached plans on CUDA), so a layer's backward costs the host one dispatch instead of
// the five or six torch.mm / mul_ calls it took from Python (each 20-140 us of host on the GPU machine:
// a 256-token QLoRA step is bound by the host, benchmarks/RESULTS.md sessions 13-14).
#include <torch/library.h>

#include "checks.h"
#include "gemm.h"
#ifdef LORA_FUSED_WITH_CUDA
#include "cuda/lora_dy_grads.h"
#endif

namespace lora_fused {
namespace {

// du = scale dY B [M, r]; dA = du^T x [r, K]; dB = dY^T u [N, r] with u = scale x A^T (made here
// unless given). A gradient not asked for comes back as a [0, ...] tensor. On CUDA, du and dB come
// from one kernel that reads dY once (cuda/lora_dy_grads.cu) where it applies, else two GEMMs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_adapter_grads(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                  double scale, const c10::optional<at::Tensor>& u,
                                                                  bool need_A, bool need_B) {
  check_lora_adapter_grads_args(grad_out, x, lora_A, lora_B, u);
  const int64_t r = lora_A.size(0);
  const auto grad_A = [&](const at::Tensor& du) {
    return need_A ? gemm(du.t(), x) : at::empty({0, x.size(1)}, x.options());
  };
  if (!need_B) {
    at::Tensor du = gemm(grad_out, lora_B, scale);
    return {du, grad_A(du), at::empty({0, r}, x.options())};
  }
  const at::Tensor uu = u.has_value() ? *u : gemm(x, lora_A.t(), scale);
#ifdef LORA_FUSED_WITH_CUDA
  at::Tensor du_fused, dB_fused;  // du and dB from one read of grad_out, where the kernel applies
  if (cuda::lora_dy_grads(grad_out, lora_B, uu, scale, du_fused, dB_fused)) {
    return {du_fused, grad_A(du_fused), dB_fused};
  }
#endif
  at::Tensor du = gemm(grad_out, lora_B, scale);
  return {du, grad_A(du), gemm(grad_out.t(), uu)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CPU, m) { m.impl("lora_adapter_grads", &lora_adapter_grads); }
#ifdef LORA_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) { m.impl("lora_adapter_grads", &lora_adapter_grads); }
#endif

}  // namespace lora_fused
