// nf4_linear and nf4_linear_grad_input on CUDA. Forward: up to 16 rows of x (decode) run the
// tensor-core kernel that streams the NF4 weight once (nf4_gemv.cu); on Hopper, 17-1024 bf16 rows run
// the NF4 CUTLASS GEMM (nf4_linear_sm90.cu); the rest, or shapes they do not take (K not a multiple
// of 32, fp32), run the tiled path: decode a slab of at most nf4_slab_elems() weights
// (nf4_dequantize_rect.cu) and hand it to cuBLAS; with lora_A at M >= 2048 (nf4_merge_mode), each slab
// gets the LoRA term s B A added as it is decoded (nf4_dequantize_rect_lora.cu). Backward dX is tiled
// likewise, except 17-1024 rows on Hopper with in_features <= out_features, which run the NF4 GEMM
// with a decoding warpgroup (nf4_linear_ss.cu; no slab). LORA_FUSED_NF4_GEMM=ss sends every bf16 call past the decode kernel,
// forward and backward, through that GEMM.
#include <torch/library.h>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/nf4_decode.cuh"
#include "cuda/nf4_linear_sm90.h"
#include "cuda/nf4_linear_ss.h"
#include "nf4_linear.h"

namespace lora_fused {
namespace {

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                           double offset, int64_t blocksize, int64_t nested_blocksize, int64_t out_features,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_u,
                           const c10::optional<at::Tensor>& lora_B, const c10::optional<at::Tensor>& lora_A,
                           double lora_scale) {
  const Nf4Weight w = check_nf4_linear_args(x, at::kCUDA, packed, absmax, nested_absmax, nested_code, offset,
                                            blocksize, nested_blocksize, out_features, bias, lora_u, lora_B, lora_A);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  if (nf4_gemv_cuda(x, w, bias, lora_u, lora_B, lora_A, lora_scale, out)) return out;
  if (cuda::nf4_ss_requested() && cuda::nf4_linear_ss(x, w, bias, lora_u, lora_B, lora_A, lora_scale, out)) return out;
  if (cuda::nf4_linear_sm90(x, w, bias, lora_u, lora_B, lora_A, lora_scale, out)) return out;
  // With lora_A the tiled path makes u itself or merges s B A into the slabs (nf4_merge_mode).
  return nf4_linear_tiled(x, w, bias, lora_u, lora_B, lora_A, lora_scale, nf4_dequantize_rect_cuda,
                          nf4_dequantize_rect_lora_cuda);
}

std::tuple<at::Tensor, at::Tensor> nf4_linear_with_u_cuda(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code, double offset,
    int64_t blocksize, int64_t nested_blocksize, int64_t out_features, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_B, const at::Tensor& lora_A, double lora_scale) {
  const Nf4Weight w = check_nf4_linear_args(x, at::kCUDA, packed, absmax, nested_absmax, nested_code, offset,
                                            blocksize, nested_blocksize, out_features, bias, c10::nullopt, lora_B,
                                            lora_A);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out, u;
  if (cuda::nf4_ss_requested() && cuda::nf4_linear_ss(x, w, bias, c10::nullopt, lora_B, lora_A, lora_scale, out, &u))
    return {out, u};
  // The decode and Hopper-GEMM kernels make u inside; for the backward it is made once more here.
  if (nf4_gemv_cuda(x, w, bias, c10::nullopt, lora_B, lora_A, lora_scale, out) ||
      cuda::nf4_linear_sm90(x, w, bias, c10::nullopt, lora_B, lora_A, lora_scale, out))
    return {out, nf4_lora_u(x, lora_A, lora_scale)};
  out = nf4_linear_tiled(x, w, bias, c10::nullopt, lora_B, lora_A, lora_scale, nf4_dequantize_rect_cuda,
                         nf4_dequantize_rect_lora_cuda, &u);
  return {out, u};
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_code, double offset, int64_t blocksize,
                                      int64_t nested_blocksize, int64_t in_features,
                                      const c10::optional<at::Tensor>& lora_du,
                                      const c10::optional<at::Tensor>& lora_A, const c10::optional<at::Tensor>& lora_B,
                                      double lora_scale) {
  const Nf4Weight w = check_nf4_linear_grad_input_args(grad_out, at::kCUDA, packed, absmax, nested_absmax, nested_code,
                                                       offset, blocksize, nested_blocksize, in_features, lora_du,
                                                       lora_A, lora_B);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor out;
  if (cuda::nf4_ss_for_grad_input(grad_out.size(0), w.in_features, w.out_features) &&
      cuda::nf4_linear_grad_input_ss(grad_out, w, lora_du, lora_A, lora_B, lora_scale, out))
    return out;
  return nf4_linear_grad_input_tiled(grad_out, w, lora_du, lora_A, lora_B, lora_scale, nf4_dequantize_rect_cuda,
                                     nf4_dequantize_rect_lora_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_fused, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_with_u", &nf4_linear_with_u_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace lora_fused
