// The GEMM the host-side paths call (the NF4 slab loop, the LoRA terms): out = alpha * a @ b, or
// out += alpha * a @ b. On CUDA, bf16/fp16 go straight to cuBLASLt with a plan cached per shape
// (torch.mm costs the host 20-140 us a call, mostly cuBLAS's heuristic: benchmarks/RESULTS.md,
// session 14); everything else, and LORA_FUSED_BLAS=aten, goes through ATen.
#pragma once
#include <ATen/ATen.h>

namespace lora_fused {

// out [m, n] = alpha * a [m, k] @ b [k, n] (+ out when accumulate). a, b: any 2-D strides; out: a
// view with unit column stride (a column block of a row-major matrix is fine). Same dtype and device.
void gemm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate);

// alpha * a @ b as a new contiguous [m, n] tensor.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0);

#ifdef LORA_FUSED_WITH_CUDA
namespace cuda {
// gemm_into through cuBLASLt; false (nothing done) where it does not apply: dtype other than
// bf16/fp16, out without unit column stride, an empty dimension, or no algorithm for the layout.
bool blaslt_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate);
}  // namespace cuda
#endif

}  // namespace lora_fused
