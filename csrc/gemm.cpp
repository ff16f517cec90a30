// gemm_into: cuBLASLt for CUDA bf16/fp16 (csrc/cuda/blaslt_gemm.cu), ATen otherwise.
#include "gemm.h"

#include <cstdlib>
#include <cstring>

namespace lora_fused {

namespace {

bool aten_requested() {
  const char* env = std::getenv("LORA_FUSED_BLAS");
  return env != nullptr && std::strcmp(env, "aten") == 0;
}

}  // namespace

void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate) {
#ifdef LORA_FUSED_WITH_CUDA
  if (out.is_cuda() && !aten_requested() && cuda::blaslt_gemm(out, a, b, alpha, accumulate)) return;
#endif
  at::Tensor o = out;  // a view: writing through it writes the caller's tensor
  if (accumulate) {
    o.addmm_(a, b, 1.0, alpha);
  } else {
    at::mm_out(o, a, b);
    if (alpha != 1.0) o.mul_(alpha);
  }
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_into(out, a, b, alpha, false);
  return out;
}

}  // namespace lora_fused
