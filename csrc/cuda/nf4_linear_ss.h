// nf4_linear's and nf4_linear_grad_input's path through the NF4 GEMM with a decoding warpgroup
// (sm90/nf4_ss_gemm.cu) on Hopper: no 16-bit slab of W forward or backward, and the LoRA term as r
// more reduction columns of the same GEMM. By default only the input gradient at 17-1024 rows
// (nf4_ss_for_grad_input), where it beat the slab path on an H100; everywhere with
// LORA_FUSED_NF4_GEMM=ss (at 4096 tokens 1.2-1.3x cuBLAS, slower than the slab path: RESULTS.md,
// sessions 20 and 22).
#pragma once
#include <ATen/ATen.h>

#include "nf4_linear.h"

namespace lora_fused {
namespace cuda {

// Whether LORA_FUSED_NF4_GEMM=ss asks for this path (read at each call).
bool nf4_ss_requested();

// Whether nf4_linear_grad_input takes this path for m rows of grad_out and W [out_features,
// in_features]: always with LORA_FUSED_NF4_GEMM=ss, never with slab or sm90, and by default (auto)
// for kSsGradInputMinM ... kSsGradInputMaxM rows with in_features <= out_features. On an H100 there
// it took 0.53-0.83x the slab path's time (4096->11008 and 4096->4096, 64-1024 rows); with more
// in_features (11008->4096: fewer, longer k-loops for more output tiles) 0.96-1.24x, and from 1536
// rows 1.03-1.24x (benchmarks/RESULTS.md, session 22).
constexpr int64_t kSsGradInputMinM = 17, kSsGradInputMaxM = 1024;
bool nf4_ss_for_grad_input(int64_t m, int64_t in_features, int64_t out_features);

// out = x @ W^T + bias + u @ lora_B^T (u = lora_u, or lora_scale * x @ lora_A^T made here), and true,
// where the kernel applies: an sm_90 GPU and build, bf16, blocksize 64, K % 64 == 0. Else false, out
// untouched. A rank not a multiple of 8 (or misaligned
// LoRA tensors) leaves the LoRA term to one addmm after the GEMM. u_out (with lora_A): the u made.
bool nf4_linear_ss(const at::Tensor& x, const Nf4Weight& w, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& lora_u, const c10::optional<at::Tensor>& lora_B,
                   const c10::optional<at::Tensor>& lora_A, double lora_scale, at::Tensor& out,
                   at::Tensor* u_out = nullptr);

// out = grad_out @ W + du @ lora_A (du = lora_du, or lora_scale * grad_out @ lora_B made here) where
// the kernel applies (as above, and N % 8 == 0); else false.
bool nf4_linear_grad_input_ss(const at::Tensor& grad_out, const Nf4Weight& w, const c10::optional<at::Tensor>& lora_du,
                              const c10::optional<at::Tensor>& lora_A, const c10::optional<at::Tensor>& lora_B,
                              double lora_scale, at::Tensor& out);

}  // namespace cuda
}  // namespace lora_fused
