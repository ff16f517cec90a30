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

// out += u @ v (+ bias) for a low-rank u [m, r] @ v [r, n] (the LoRA term after the base GEMMs):
// on CUDA (bf16/fp16, r <= 32, out's rows 8-byte aligned, n % 4 == 0) one streaming pass over
// out (csrc/cuda/add_low_rank.cu); elsewhere a GEMM with beta = 1 and the bias added after.
void add_low_rank_(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v,
                   const c10::optional<at::Tensor>& bias = c10::nullopt);

// Whether add_low_rank_ on a new row-major [m, n] tensor of like's dtype and device, with rank r,
// runs that streaming pass. Where it does not, the LoRA term is cheaper first, as the base GEMMs'
// accumulator (beta = 1), than after them as a GEMM of its own.
bool low_rank_pass_applies(const at::Tensor& like, int64_t n, int64_t r);

#ifdef LORA_FUSED_WITH_CUDA
namespace cuda {
// gemm_into through cuBLASLt; false (nothing done) where it does not apply: dtype other than
// bf16/fp16, out without unit column stride, an empty dimension, or no algorithm for the layout.
bool blaslt_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha, bool accumulate);
// add_low_rank_'s kernel; false (nothing done) where it does not apply.
bool add_low_rank(const at::Tensor& out, const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias);
bool add_low_rank_takes(at::ScalarType dtype, int64_t n, int64_t r);
}  // namespace cuda
#endif

}  // namespace lora_fused
